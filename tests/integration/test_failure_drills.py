"""Failure drills, each with a time bound: a killed host, a cut network, a full or read-only checkpoint disk, a
corrupted checkpoint. Every drill checks that the failure is detected with a clear message, that recovery loses
at most the steps since the last checkpoint, and that the resumed job ends exactly like an uninterrupted one.

The measured numbers (time to detect, time to recover, steps lost) are printed (`pytest -s`) and appended to
`$BERTSCALE_DRILLS_JSON` (default: <tmp>/drills.json) for the operator documentation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netns import TwoHosts, require_netns  # noqa: E402
from test_multinode import config, launch_local, local_run, losses, start_on_hosts  # noqa: E402,F401
from test_pretrain import clean_env, steps, workdir  # noqa: E402,F401 - shared fixtures

from bertscale.model.weights import consolidated_state_dict  # noqa: E402
from bertscale.train.checkpoint import CheckpointManager, CheckpointSaveError  # noqa: E402
from bertscale.train.distributed import EXIT_PEER_LOST, DistEnv  # noqa: E402

TIMEOUT_S = 8  # train.collective_timeout_s of the drills
DRILL = [f"train.collective_timeout_s={TIMEOUT_S}"]


def record(name: str, **numbers: float | int | str) -> None:
    """Print a drill's numbers and append them to the drills JSON file."""
    path = Path(os.environ.get("BERTSCALE_DRILLS_JSON", Path(os.environ.get("TMPDIR", "/tmp")) / "drills.json"))
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = numbers
    path.write_text(json.dumps(data, indent=2))
    print(f"\n[drill] {name}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in numbers.items()))


def first_line(text: str, needle: str) -> str:
    """The first log line containing `needle`, without the logging prefix (for the drills report)."""
    line = next((ln for ln in text.splitlines() if needle in ln), "")
    return line[line.index(needle):] if line else ""


def wait_for_step(out: Path, step: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "steps.jsonl").is_file() and len((out / "steps.jsonl").read_text().splitlines()) >= step:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a node exited early with {[p.poll() for p in procs]}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def rank_process(launcher: subprocess.Popen) -> psutil.Process:
    """The training rank a per-node torchrun started (its child running bertscale.train)."""
    for _ in range(100):
        for child in psutil.Process(launcher.pid).children(recursive=True):
            if "bertscale.train" in " ".join(child.cmdline()):
                return child
        time.sleep(0.05)
    raise AssertionError("no training rank under the launcher")


def rank_exit_code(log: str) -> int | None:
    """The rank's exit status as its torchrun reports it (a rank is not our child, so we cannot wait for it)."""
    match = re.search(r"exitcode\s*:\s*(-?\d+)", log)
    return int(match.group(1)) if match else None


def checkpoint_step(out: Path) -> int:
    return int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step"))


def resume_on_hosts_and_compare(workdir: Path, out: Path, hosts, logs: Path, reference: Path) -> float:
    """Restart both nodes; the job must finish with every step's loss equal to the reference. Returns seconds."""
    started = time.monotonic()
    procs = start_on_hosts(config(workdir, out, *DRILL), hosts, logs)
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], (logs / "node0.log").read_text()[-3000:]
    assert "resumed from" in (logs / "node0.log").read_text()
    ref, got = losses(reference), losses(out)
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert got[s] == pytest.approx(ref[s], abs=1e-6), f"step {s}"
    return time.monotonic() - started


# ----------------------------------------------------------------------------------------------------------------
# Hosts and network
# ----------------------------------------------------------------------------------------------------------------
def test_killed_host_rank_is_detected_and_the_job_resumes(workdir, local_run, tmp_path):
    require_netns()
    out = tmp_path / "train"
    with TwoHosts() as hosts:
        procs = start_on_hosts(config(workdir, out, *DRILL), hosts, tmp_path)
        survivor, victim = rank_process(procs[0]), rank_process(procs[1])
        wait_for_step(out, 4, procs)  # past the step-3 checkpoint
        killed_after = max(steps(out))
        victim.kill()
        killed_at = time.monotonic()
        survivor.wait(timeout=TIMEOUT_S + 30)
        detect = time.monotonic() - killed_at
        [p.wait(timeout=60) for p in procs]
        log0 = (tmp_path / "node0.log").read_text()
        assert rank_exit_code(log0) == EXIT_PEER_LOST, log0[-3000:]
        assert f"rank 1 at {hosts[1].address} was lost during step" in log0
        assert "resumes from" in log0
        assert detect < TIMEOUT_S + 5
        ckpt = checkpoint_step(out)
        recover = resume_on_hosts_and_compare(workdir, out, hosts, tmp_path, local_run)
    lost = killed_after - ckpt
    assert 0 <= lost <= 3  # at most the steps since the last checkpoint (every 3)
    record("sigkill_one_host", detect_s=detect, recover_s=recover, steps_done_before_kill=killed_after,
           resumed_from_step=ckpt, steps_lost=lost, message=first_line(log0, "error: "))


def test_cut_network_times_out_on_both_hosts_and_the_job_resumes(workdir, local_run, tmp_path):
    require_netns()
    out = tmp_path / "train"
    with TwoHosts() as hosts:
        procs = start_on_hosts(config(workdir, out, *DRILL), hosts, tmp_path)
        ranks = [rank_process(p) for p in procs]
        wait_for_step(out, 4, procs)
        hosts[1].link(up=False)
        cut_at = time.monotonic()
        cut_after = max(steps(out))
        for r in ranks:
            r.wait(timeout=TIMEOUT_S + 60)
        detect = time.monotonic() - cut_at
        [p.wait(timeout=60) for p in procs]
        logs = [(tmp_path / f"node{i}.log").read_text() for i in (0, 1)]
        log0 = logs[0]
        assert [rank_exit_code(log) for log in logs] == [EXIT_PEER_LOST, EXIT_PEER_LOST], log0[-3000:]
        # Seen by gloo's timeout (after TIMEOUT_S), or else by the loop's watchdog (after 2 x TIMEOUT_S).
        assert "stopped responding during step" in log0 and str(TIMEOUT_S) in first_line(log0, "error: ")
        assert TIMEOUT_S - 1 < detect < 2 * TIMEOUT_S + 15
        hosts[1].link(up=True)
        ckpt = checkpoint_step(out)
        recover = resume_on_hosts_and_compare(workdir, out, hosts, tmp_path, local_run)
    lost = cut_after - ckpt
    assert 0 <= lost <= 3
    record("network_cut", detect_s=detect, recover_s=recover, timeout_s=TIMEOUT_S, steps_done_before_cut=cut_after,
           resumed_from_step=ckpt, steps_lost=lost, message=first_line(log0, "error: "))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint storage
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def small_mount(tmp_path):
    """A 3 MiB tmpfs (one tiny checkpoint of ~2.3 MB fits, two do not), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "train" / "checkpoints"
    mnt.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def assert_intact(root: Path, step: int) -> None:
    """`latest` names checkpoint `step`, it verifies against its manifest, and its weights load."""
    mgr = CheckpointManager(root, keep=5, env=DistEnv())
    assert mgr.latest() == f"step{step:08d}"
    assert mgr.select() == f"step{step:08d}"
    state = consolidated_state_dict(root, f"step{step:08d}")
    assert state and all(t.isfinite().all() for t in state.values())


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(workdir, tmp_path, small_mount):
    out = tmp_path / "train"
    started = time.monotonic()
    done = launch_local(config(workdir, out, "train.keep_checkpoints=1", "train.checkpoint_every=2",
                               "train.max_steps=6"))
    elapsed = time.monotonic() - started
    # Step 2 fits; step 4 runs out of space (warned, training goes on); the final save at 6 fails: exit 2.
    assert done.returncode != 0, done.stdout[-2000:]
    text = done.stdout + done.stderr
    assert f"checkpoint save failed: no space left on {small_mount}" in text
    assert "the previous checkpoint step 2 is intact" in text
    assert "training continues and retries" in text
    assert max(steps(out)) == 6  # training went on after the first failed save
    assert sorted(p.name for p in small_mount.glob("step*")) == ["step00000002"]  # partial saves removed
    assert_intact(small_mount, 2)
    record("checkpoint_disk_full", run_s=elapsed, steps_lost=6 - 2,
           note="save at 4 failed (warned), final save at 6 failed (stopped); step 2 intact",
           message=first_line(text, "error: checkpoint save failed"))


def test_read_only_checkpoint_dir_keeps_the_previous_checkpoint(workdir, tmp_path, small_mount, clean_env,
                                                                 monkeypatch):
    from bertscale.train import loop, pretrain

    real_forward, calls = loop.forward, {"n": 0}

    def remount_after_first_checkpoint(eng, batch):
        calls["n"] += 1
        if (small_mount / "latest").is_file() and calls["n"] < 100:
            subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
            calls["n"] = 100
        return real_forward(eng, batch)

    monkeypatch.setattr(loop, "forward", remount_after_first_checkpoint)
    out = tmp_path / "train"
    with pytest.raises(CheckpointSaveError, match="read-only file system") as err:
        pretrain(config(workdir, out, "train.checkpoint_every=2", "train.max_steps=6", "train.zero_stage=1"))
    assert "the previous checkpoint step 2 is intact" in str(err.value)
    assert_intact(small_mount, 2)
    record("checkpoint_read_only", steps_lost=6 - 2, note="saves at 4 (warned) and 6 (stopped) failed",
           message=str(err.value))


def test_corrupted_checkpoints_are_skipped_and_resume_falls_back(workdir, local_run, tmp_path):
    out = tmp_path / "train"
    shutil.copytree(local_run, out)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step*")) == ["step00000003", "step00000006", "step00000008"]
    shard = root / "step00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:  # truncated
        f.truncate(shard.stat().st_size // 2)
    model = root / "step00000006" / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    model.write_bytes(bytes(data))
    started = time.monotonic()
    done = launch_local(config(workdir, out))
    recover = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout + done.stderr
    assert "skipping checkpoint" in text and "truncated" in text and "fails its sha256 check" in text
    assert "resumed from" in text and "step00000003" in text
    assert (root / "step00000008.corrupt").is_dir() and (root / "step00000006.corrupt").is_dir()
    ref, got = losses(local_run), losses(out)
    assert all(got[s] == pytest.approx(ref[s], abs=1e-6) for s in ref)
    record("corrupted_checkpoints", recover_s=recover, resumed_from_step=3, steps_lost=8 - 3,
           note="newest two checkpoints damaged (truncated shard, flipped byte)",
           message=first_line(text, "skipping checkpoint"))


WATCHDOG = ("import time; from bertscale.train.distributed import Watchdog; "
            "w = Watchdog(0.5, lambda: 'resume hint').start(); w.beat('step 7'); time.sleep(30)")


def test_watchdog_ends_a_rank_stuck_past_twice_the_timeout():
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", WATCHDOG], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == EXIT_PEER_LOST, done.stderr
    assert "a peer stopped responding during step 7 (no progress for 1 s" in done.stderr
    assert "resume hint" in done.stderr and elapsed < 20
