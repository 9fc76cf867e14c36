"""`bertscale submit --backend slurm` against a real single-node SLURM (slurmctld + slurmd + munge on localhost):
the rendered sbatch script runs two ranks with srun, which pretrain a tiny model together and checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
needs_slurm = pytest.mark.skipif(
    shutil.which("slurmctld") is None or shutil.which("sbatch") is None or os.geteuid() != 0,
    reason="needs Debian's slurm-wlm + munge and root (.ci/run installs them)",
)


@pytest.fixture()
def slurm(tmp_path):
    state = tmp_path / "slurm"
    script = REPO / "deploy" / "slurm" / "local-cluster.sh"
    out = subprocess.run([str(script), "start", str(state)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.fail(f"local SLURM did not start:\n{out.stdout}\n{out.stderr}")
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        subprocess.run([str(script), "stop", str(state)], capture_output=True)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bertscale", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


@needs_slurm
def test_submit_pretraining_to_slurm(slurm, tmp_path, sample_corpus):
    work = tmp_path / "work"
    sets = [f"--workdir={work}", "--no-tracking", f"--config={REPO / 'configs' / 'debug.yaml'}",
            f"--set=corpus.inputs=[{sample_corpus / 'inaugural'}]"]
    for stage in ("corpus", "tokenizer", "data"):
        done = _cli(stage, *sets)
        assert done.returncode == 0, done.stderr
    submitted = _cli("submit", "--backend", "slurm", "--procs-per-node", "2", "--cpus-per-task", "1",
                     "--time-limit", "00:10:00", "--set=train.max_steps=6", "--set=train.checkpoint_every=3",
                     "--set=train.micro_batch_size=4", *sets, env=slurm)
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["job_id"].isdigit()

    deadline = time.time() + 420
    state = ""
    while time.time() < deadline:
        q = subprocess.run(["scontrol", "show", "job", job["job_id"]], env=slurm, capture_output=True, text=True)
        state = next((w.split("=")[1] for w in q.stdout.split() if w.startswith("JobState=")), "")
        if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
            break
        time.sleep(3)
    logs = "\n".join(p.read_text()[-4000:] for p in work.glob("*.out"))
    assert state == "COMPLETED", f"job ended {state!r}:\n{logs}"
    train = work / "train"
    assert (train / "hf" / "model.safetensors").exists(), logs
    # Two srun tasks trained together: ZeRO-2 wrote one optimizer partition per rank.
    partitions = {p.name for p in train.rglob("*zero_pp_rank_*optim_states.pt")}
    assert any("rank_0" in p for p in partitions) and any("rank_1" in p for p in partitions), (partitions, logs)
