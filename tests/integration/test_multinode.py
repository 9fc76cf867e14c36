"""Multi-node pretraining over TCP between two "hosts" (network namespaces joined by a veth pair).

One rank per host, each started by its own per-node launcher (`torchrun --nnodes 2 --node_rank i`, no ssh), gloo
bound to the host's veth: the same ZeRO-2 job as two local ranks, step for step. Also: elastic restarts, a ZeRO
checkpoint written by 2 ranks resumed on 1 and the other way round.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netns import Host, TwoHosts, require_netns  # noqa: E402
from test_pretrain import REPO, TINY, clean_env, steps, workdir  # noqa: E402,F401 - shared fixtures

from bertscale.config import PipelineConfig, load_config  # noqa: E402
from bertscale.train.launch import LaunchSpec, build_command, write_config  # noqa: E402

# ZeRO-2 over 2 ranks, 8 steps, checkpoints every 3 (at 3, 6 and the final 8).
RUN = ["train.max_steps=8", "train.checkpoint_every=3", "train.eval_every=100", "train.zero_stage=2",
       "train.collective_timeout_s=20", "train.keep_checkpoints=5", "train.peak_tflops=1"]  # no CPU peak probe


def config(workdir: Path, out: Path, *overrides: str) -> PipelineConfig:
    return load_config(None, [f"workdir={workdir}", f"train.output={out}", *TINY, *RUN, *overrides])


def free_port() -> int:
    from bertscale.train.distributed import read_env

    return read_env({}).master_port


def launch_local(cfg: PipelineConfig, num_procs: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """All ranks on this host (torchrun, 127.0.0.1)."""
    cmd, env = build_command(LaunchSpec("torchrun", num_procs=num_procs, master_port=free_port()), write_config(cfg))
    return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def start_on_hosts(cfg: PipelineConfig, hosts: tuple[Host, Host], logs: Path, port: int | None = None
                   ) -> list[subprocess.Popen]:
    """One per-node torchrun per host; rank 0's host is the master."""
    config_file = write_config(cfg)
    port = port or random.randint(20000, 60000)  # a fresh namespace has every port free
    procs = []
    for node_rank, host in enumerate(hosts):
        spec = LaunchSpec("torchrun", num_procs=1, nnodes=2, node_rank=node_rank, master_addr=hosts[0].address,
                          master_port=port)
        cmd, env = build_command(spec, config_file)
        procs.append(host.popen(cmd, env=env, log=logs / f"node{node_rank}.log", cwd=REPO))
    return procs


def losses(out: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in steps(out).items()}


@pytest.fixture(scope="module")
def local_run(workdir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "train"
    done = launch_local(config(workdir, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_hosts_zero2_over_tcp_equals_two_local_ranks(workdir, local_run, tmp_path):
    require_netns()
    out = tmp_path / "train"
    with TwoHosts() as hosts:
        started = time.monotonic()
        procs = start_on_hosts(config(workdir, out), hosts, tmp_path)
        codes = [p.wait(timeout=300) for p in procs]
        elapsed = time.monotonic() - started
        logs = {p.name: p.read_text() for p in tmp_path.glob("node*.log")}
        assert codes == [0, 0], logs
        # The ranks really met over the veth: rank 0 saw rank 1 at the second host's address.
        assert f"rank 1 at {hosts[1].address}" in logs["node0.log"], logs["node0.log"][-2000:]
    ref, got = losses(local_run), losses(out)
    assert sorted(got) == list(range(1, 9)) and sorted(ref) == sorted(got)
    for s in ref:  # gloo sums the same two partial gradients in the same order: bitwise equal
        assert got[s] == pytest.approx(ref[s], abs=1e-6), f"step {s}"
    print(f"\ntwo hosts: 8 ZeRO-2 steps in {elapsed:.1f} s (launch included); losses equal to 2 local ranks")


# ----------------------------------------------------------------------------------------------------------------
# Elastic restarts: a ZeRO-2 checkpoint resumed on a different number of ranks (universal checkpoint)
# ----------------------------------------------------------------------------------------------------------------
def rewind(src: Path, dst: Path, step: int) -> None:
    """A copy of run `src` as if it had stopped after checkpoint `step` (later checkpoints removed)."""
    shutil.copytree(src, dst)
    for tag_dir in (dst / "checkpoints").glob("step*"):
        if int(tag_dir.name.removeprefix("step")) > step:
            shutil.rmtree(tag_dir)
    (dst / "checkpoints" / "latest").write_text(f"step{step:08d}")
    shutil.rmtree(dst / "hf", ignore_errors=True)


def adam_step(tag_dir: Path) -> int:
    """The optimizer's step counter stored in a ZeRO checkpoint (it restarts at 0 with a fresh optimizer)."""
    state = torch.load(next(tag_dir.glob("zero_pp_rank_0_*optim_states.pt")), weights_only=False)
    base = state["optimizer_state_dict"]["base_optimizer_state"]
    inner = base["state"] if isinstance(base, dict) else base[0]
    return int(next(iter(inner.values()))["step"])


def test_elastic_restart_two_ranks_to_one_and_back(workdir, local_run, tmp_path, clean_env, monkeypatch):
    from bertscale.model.weights import consolidated_state_dict
    from bertscale.train import loop, pretrain

    ref = steps(local_run)
    # 2 -> 1: the step-6 checkpoint of the 2-rank run, resumed on 1 rank (in this process) with twice the
    # accumulation (the same global batch of 16 sequences), checkpointing every step.
    one = tmp_path / "one-rank"
    rewind(local_run, one, 6)
    saved = consolidated_state_dict(one / "checkpoints", "step00000006")
    real_forward, seen = loop.forward, {}

    def check_weights_once(eng, batch):
        if not seen:  # the weights the first resumed step starts from
            live = {k: v.detach().float() for k, v in eng.module.state_dict().items()}
            seen["max_diff"] = max((live[k] - v).abs().max().item() for k, v in saved.items() if k in live)
        return real_forward(eng, batch)

    monkeypatch.setattr(loop, "forward", check_weights_once)
    result = pretrain(config(workdir, one, "train.grad_accum=2", "train.checkpoint_every=1"))
    assert result.final_step == 8 and seen["max_diff"] == 0.0  # the 2-rank weights, exactly
    got = steps(one)
    assert sorted(got) == list(range(1, 9))
    for s in (7, 8):
        assert got[s]["lr"] == ref[s]["lr"]  # the LR schedule continued
        # The same 16 instances per step (the data position was re-split); masks and dropout differ.
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=0.02)
    assert adam_step(one / "checkpoints" / "step00000008") == 8  # Adam moments carried over, not restarted
    # 1 -> 2: the 1-rank checkpoint at step 7, resumed on 2 ranks.
    two = tmp_path / "two-ranks"
    rewind(one, two, 7)
    done = launch_local(config(workdir, two))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "written by 1 ranks" in done.stdout + done.stderr
    got = steps(two)
    assert got[8]["lr"] == ref[8]["lr"] and got[8]["loss"] == pytest.approx(ref[8]["loss"], rel=0.02)
    assert adam_step(two / "checkpoints" / "step00000008") == 8


# ----------------------------------------------------------------------------------------------------------------
# bertscale doctor across two hosts
# ----------------------------------------------------------------------------------------------------------------
SERVE = "import sys; from bertscale import doctor; r = doctor.serve(int(sys.argv[1]), 1, 60, sys.argv[2]); " \
        "print(r.render()); sys.exit(0 if r.ok else 1)"
# Retries (argv[4] times) while rank 0's side is still starting up and its port is closed.
CHECK = """
import sys, time
from bertscale import doctor
from bertscale.config import load_config
cfg = load_config(None, [f"workdir={sys.argv[3]}"])
for attempt in range(int(sys.argv[4])):
    r = doctor.run_doctor(cfg, sys.argv[1], int(sys.argv[2]), 5)
    if not any(c.name == "master port" and c.status == "fail" for c in r.checks):
        break
    time.sleep(1)
print(r.render())
sys.exit(0 if r.ok else 1)
"""


def test_doctor_checks_a_node_against_rank0_across_hosts(tmp_path):
    require_netns()
    shared = tmp_path / "train" / "checkpoints"
    with TwoHosts() as (a, b):
        port = random.randint(20000, 60000)
        server = a.popen([sys.executable, "-c", SERVE, str(port), str(shared)], log=tmp_path / "serve.log", cwd=REPO)
        check = b.popen([sys.executable, "-c", CHECK, a.address, str(port), str(tmp_path), "60"],
                        log=tmp_path / "b.log", cwd=REPO)
        assert check.wait(timeout=120) == 0, (tmp_path / "b.log").read_text()
        assert server.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
        text = (tmp_path / "b.log").read_text()
        for line in ("master port: ", "versions match rank 0: identical", "shared checkpoint dir: ",
                     f"GLOO_SOCKET_IFNAME: {b.ifname}"):
            assert line in text, text
        assert not list(shared.glob(".doctor-*"))  # rank 0 removed its marker
        # A pulled cable: the interface is down and rank 0's port unreachable, and doctor says both.
        b.link(up=False)
        check = b.popen([sys.executable, "-c", CHECK, a.address, str(port), str(tmp_path), "1"],
                        log=tmp_path / "cut.log", cwd=REPO)
        assert check.wait(timeout=120) == 1
        text = (tmp_path / "cut.log").read_text()
        assert f"[FAIL] GLOO_SOCKET_IFNAME: interface(s) ['{b.ifname}'] down" in text, text
        assert f"[FAIL] master port: cannot reach {a.address}:{port}" in text, text
