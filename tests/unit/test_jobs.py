"""Cluster job rendering: the SLURM script and the Kubernetes manifest are complete and consistent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml
import pytest

from bertscale.config import load_config
from bertscale.errors import BertscaleError, ConfigError
from bertscale.jobs import JobSpec, submit


@pytest.fixture()
def cfg(tmp_path):
    return load_config(overrides=[f"workdir={tmp_path}", "train.zero_stage=3"])


def test_slurm_script(cfg):
    out = submit(cfg, "slurm", JobSpec(nodes=4, procs_per_node=8, gpus_per_node=8, partition="gpu"), dry_run=True)
    script = open(out["script"]).read()
    assert "#SBATCH --nodes=4" in script
    assert "#SBATCH --ntasks-per-node=8" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --gpus-per-node=8" in script
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "srun --kill-on-bad-exit=1" in script and "-m bertscale.train --config" in script
    assert "${" not in script  # every placeholder was filled
    assert load_config(out["config"]).train.zero_stage == 3


def test_k8s_manifest(cfg):
    out = submit(cfg, "k8s", JobSpec(job_name="bert-a", nodes=3, procs_per_node=2, gpus_per_node=2), dry_run=True)
    docs = list(yaml.safe_load_all(open(out["manifest"])))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Service", "ConfigMap", "Job"]
    service, configmap, job = docs
    assert service["spec"]["clusterIP"] == "None"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == "bert-a"
    command = pod["containers"][0]["args"][0]
    assert "--nnodes=3" in command and "--node_rank=$JOB_COMPLETION_INDEX" in command
    assert "--master_addr=bert-a-0.bert-a" in command
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # The ConfigMap carries the whole pipeline config, which validates.
    assert yaml.safe_load(configmap["data"]["pipeline.yaml"])["train"]["zero_stage"] == 3


def test_bad_job_name_and_missing_tool(cfg, monkeypatch):
    with pytest.raises(ConfigError, match="DNS label"):
        submit(cfg, "k8s", JobSpec(job_name="Bad_Name"), dry_run=True)
    with pytest.raises(ConfigError, match=r"environment names \['1X', 'A.B'\]"):
        submit(cfg, "slurm", JobSpec(env={"OK_1": "x", "A.B": "y", "1X": "z"}), dry_run=True)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(BertscaleError, match="sbatch` not found"):
        submit(cfg, "slurm", JobSpec())


def test_slurm_master_port_follows_the_job_id_unless_given(cfg):
    script = open(submit(cfg, "slurm", JobSpec(), dry_run=True)["script"]).read()
    line = next(ln for ln in script.splitlines() if ln.startswith("export MASTER_PORT="))
    ports = {job: subprocess.run(["bash", "-c", f"{line}; echo $MASTER_PORT"], env={"SLURM_JOB_ID": job},
                                 capture_output=True, text=True, check=True).stdout.strip()
             for job in ("17", "18")}
    assert ports == {"17": "20017", "18": "20018"}  # two jobs on one node get different ports
    fixed = open(submit(cfg, "slurm", JobSpec(master_port=31000), dry_run=True)["script"]).read()
    assert "export MASTER_PORT=31000" in fixed
    with pytest.raises(ConfigError, match="master port 80"):
        submit(cfg, "slurm", JobSpec(master_port=80), dry_run=True)


def test_slurm_tasks_get_their_rank_from_slurm_not_the_submitting_shell(cfg, tmp_path):
    script = submit(cfg, "slurm", JobSpec(), dry_run=True)["script"]
    # Stand-ins for scontrol and srun: srun records the environment its tasks would start with.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node0\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\nenv > {tmp_path / 'task-env'}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    stale = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node0", **stale}
    subprocess.run(["bash", script], env=env, check=True, capture_output=True, cwd=tmp_path)
    task_env = dict(line.split("=", 1) for line in (tmp_path / "task-env").read_text().splitlines() if "=" in line)
    assert not set(stale) & set(task_env)
    assert task_env["MASTER_ADDR"] == "node0" and task_env["MASTER_PORT"] == "20007"


@pytest.mark.parametrize("backend, tool", [("k8s", "kubectl apply -f"), ("slurm", "sbatch --parsable")])
def test_dry_run_prints_the_command_that_would_submit_the_job(tmp_path, capsys, backend, tool):
    from bertscale.cli import main

    assert main(["submit", "--backend", backend, "--dry-run", "--workdir", str(tmp_path), "--no-tracking",
                 "--job-name", "bert-b", "--env", "NCCL_DEBUG=INFO"]) == 0
    out = json.loads(capsys.readouterr().out)
    rendered = out["manifest" if backend == "k8s" else "script"]
    assert out["command"] == f"{tool} {rendered}" and Path(rendered).is_file()
    assert rendered == str(tmp_path.resolve() / "jobs" / ("bert-b.k8s.yaml" if backend == "k8s" else "bert-b.sbatch"))
    if backend == "k8s":
        job = list(yaml.safe_load_all(Path(rendered).read_text()))[2]
        env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {"name": "NCCL_DEBUG", "value": "INFO"} in env  # a plain value stays exactly itself
