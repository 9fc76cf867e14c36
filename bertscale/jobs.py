"""Cluster job submission: render the SLURM / Kubernetes templates in `deploy/` from a config, and submit them.

`local` runs the job here (the DeepSpeed launcher on this machine's devices); `slurm` writes an sbatch script and
calls `sbatch`; `k8s` writes a manifest (headless Service + ConfigMap + Indexed Job) and calls `kubectl apply`.
`dry_run` renders only, so the files can be reviewed or submitted by other means.
"""

from __future__ import annotations

import shlex
import shutil
import string
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from bertscale.config import PipelineConfig, dump_config
from bertscale.errors import BertscaleError, ConfigError

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"
Backend = Literal["local", "slurm", "k8s"]


@dataclass
class JobSpec:
    """Where and how big a training job is; the model and data come from the pipeline config."""

    job_name: str = "bertscale-pretrain"
    nodes: int = 1
    procs_per_node: int = 1
    cpus_per_task: int = 8
    time_limit: str = "24:00:00"
    # None: under SLURM a port derived from the job id (two jobs sharing a node never collide); 29500 on k8s,
    # where every pod has its own network namespace.
    master_port: int | None = None
    partition: str | None = None
    gpus_per_node: int = 0
    image: str = "bertscale:latest"
    pvc: str = "bertscale-workdir"
    workdir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    template: str | None = None

    def validate(self) -> None:
        if self.nodes < 1 or self.procs_per_node < 1:
            raise ConfigError("job nodes and procs_per_node must be >= 1")
        if self.master_port is not None and not 1024 <= self.master_port < 65536:
            raise ConfigError(f"master port {self.master_port}: use a port in [1024, 65536)")
        if not self.job_name.replace("-", "").isalnum() or self.job_name != self.job_name.lower():
            raise ConfigError(f"job name {self.job_name!r}: use lowercase letters, digits and dashes (a DNS label)")


def _template(spec: JobSpec, default: str) -> string.Template:
    path = Path(spec.template) if spec.template else DEPLOY_DIR / default
    if not path.is_file():
        raise BertscaleError(f"job template {path} not found; pass --template PATH")
    return string.Template(path.read_text())


def render_slurm(cfg: PipelineConfig, spec: JobSpec, config_path: Path) -> str:
    workdir = spec.workdir or str(Path.cwd())
    directives = []
    if spec.partition:
        directives.append(f"#SBATCH --partition={spec.partition}")
    if spec.gpus_per_node:
        directives.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(spec.env.items()))
    return _template(spec, "slurm/pretrain.sbatch").substitute(
        job_name=spec.job_name, nodes=spec.nodes, procs_per_node=spec.procs_per_node,
        cpus_per_task=spec.cpus_per_task, time_limit=spec.time_limit, log_dir=Path(cfg.workdir).resolve(),
        extra_directives="\n".join(directives), env_exports=exports,
        master_port=spec.master_port or "$((20000 + SLURM_JOB_ID % 20000))",
        workdir=shlex.quote(workdir), python=shlex.quote(sys.executable), config=shlex.quote(str(config_path)),
    )


def render_k8s(cfg: PipelineConfig, spec: JobSpec) -> str:
    config_text = yaml.safe_dump(dump_config(cfg), sort_keys=False)
    env = {"PYTHONUNBUFFERED": "1", **spec.env}
    env_list = "\n".join(f"            - {{name: {k}, value: {yaml.safe_dump(v).strip()!s}}}"
                         for k, v in sorted(env.items()))
    limits = {"cpu": str(spec.cpus_per_task * spec.procs_per_node)}
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    limit_lines = "\n".join(f"              {k}: \"{v}\"" for k, v in limits.items())
    return _template(spec, "k8s/pretrain-job.yaml").substitute(
        job_name=spec.job_name, nodes=spec.nodes, procs_per_node=spec.procs_per_node,
        master_port=spec.master_port or 29500, image=spec.image, pvc=spec.pvc, workdir=spec.workdir or cfg.workdir,
        backoff_limit=0, config_indented=textwrap.indent(config_text, "    "), env_list=env_list,
        resource_limits=limit_lines,
    )


def _run(cmd: list[str]) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        raise BertscaleError(f"`{cmd[0]}` not found on PATH: install it, or use --dry-run to only render the job")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BertscaleError(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip()


def submit(cfg: PipelineConfig, backend: Backend, spec: JobSpec, dry_run: bool = False) -> dict[str, str]:
    """Render the job for `backend` into `<workdir>/jobs/` and submit it; returns paths and the job id."""
    spec.validate()
    jobs_dir = Path(cfg.workdir).resolve() / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    config_path = jobs_dir / f"{spec.job_name}.yaml"
    config_path.write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False))
    if backend == "local":
        cmd = [sys.executable, "-m", "bertscale", "pretrain", "--config", str(config_path),
               "--num-procs", str(spec.procs_per_node)]
        if dry_run:
            return {"command": shlex.join(cmd), "config": str(config_path)}
        code = subprocess.call(cmd)
        if code != 0:
            raise BertscaleError(f"local job exited with code {code}")
        return {"command": shlex.join(cmd), "config": str(config_path), "job_id": "local"}
    if backend == "slurm":
        script = jobs_dir / f"{spec.job_name}.sbatch"
        script.write_text(render_slurm(cfg, spec, config_path))
        if dry_run:
            return {"script": str(script), "config": str(config_path)}
        out = _run(["sbatch", "--parsable", str(script)])
        return {"script": str(script), "config": str(config_path), "job_id": out.split(";")[0]}
    if backend == "k8s":
        manifest = jobs_dir / f"{spec.job_name}.k8s.yaml"
        manifest.write_text(render_k8s(cfg, spec))
        if dry_run:
            return {"manifest": str(manifest)}
        _run(["kubectl", "apply", "-f", str(manifest)])
        return {"manifest": str(manifest), "job_id": spec.job_name}
    raise ConfigError(f"unknown backend {backend!r}: choose local, slurm or k8s")
