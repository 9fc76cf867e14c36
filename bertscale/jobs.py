"""Cluster job submission: render the SLURM / Kubernetes job templates from a config, and submit them.

Starting ranks is `bertscale.train.launch`'s job; this module only wraps it for a scheduler. Every backend runs
the same per-rank command (`rank_args` / `srun_command`) on the same resolved config
(`write_config` / `config_text`). `local` runs the job here through `launch_pretraining`,
tracked like `bertscale pretrain`; `slurm` writes an sbatch script and calls `sbatch`; `k8s` writes a manifest
(headless Service + ConfigMap + Indexed Job) and calls `kubectl apply`. `dry_run` renders only and returns the
command that would submit the job (`sbatch ...`, `kubectl apply -f ...`), so the files can be reviewed first or
submitted by other means. The templates ship in the package (`bertscale/resources/deploy/`; the
repository's `deploy/slurm` and `deploy/k8s` link to them); `--template` replaces one.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import string
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bertscale import tracking
from bertscale.config import PipelineConfig
from bertscale.errors import BertscaleError, ConfigError
from bertscale.resources import resource
from bertscale.train.launch import (CONFIG_FILE, LaunchFailed, LaunchSpec, build_command, check_inputs,
                                    config_text, launch_pretraining, rank_args, srun_command, write_config)

# Where the ConfigMap holding the resolved config is mounted in every pod.
K8S_CONFIG = "/etc/bertscale/pipeline.yaml"
Backend = Literal["local", "slurm", "k8s"]
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
        bad = sorted(k for k in self.env if not _ENV_NAME.fullmatch(k))
        if bad:
            raise ConfigError(f"job environment names {bad}: use letters, digits and underscores, not starting "
                              "with a digit (names both a shell and Kubernetes accept)")


def _template(spec: JobSpec, default: str) -> string.Template:
    path = Path(spec.template) if spec.template else resource(f"deploy/{default}")
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
    # srun inside the allocation: one task per device, every one running the rank command.
    srun = srun_command(LaunchSpec("srun", num_procs=spec.procs_per_node, nnodes=spec.nodes),
                               rank_args(config_path))
    return _template(spec, "slurm/pretrain.sbatch").substitute(
        job_name=spec.job_name, nodes=spec.nodes, procs_per_node=spec.procs_per_node,
        cpus_per_task=spec.cpus_per_task, time_limit=spec.time_limit, log_dir=Path(cfg.workdir).resolve(),
        extra_directives="\n".join(directives), env_exports=exports,
        master_port=spec.master_port or "$((20000 + SLURM_JOB_ID % 20000))",
        workdir=shlex.quote(workdir), srun_command=shlex.join(srun),
    )


def render_k8s(cfg: PipelineConfig, spec: JobSpec) -> str:
    resolved = config_text(cfg)
    env = {"PYTHONUNBUFFERED": "1", **spec.env}
    # A JSON string is a YAML double-quoted scalar: every value stays a string, whatever it looks like.
    env_list = "\n".join(f"            - {{name: {json.dumps(k)}, value: {json.dumps(str(v))}}}"
                         for k, v in sorted(env.items()))
    limits = {"cpu": str(spec.cpus_per_task * spec.procs_per_node)}
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    limit_lines = "\n".join(f"              {k}: \"{v}\"" for k, v in limits.items())
    return _template(spec, "k8s/pretrain-job.yaml").substitute(
        job_name=spec.job_name, nodes=spec.nodes, procs_per_node=spec.procs_per_node,
        master_port=spec.master_port or 29500, image=spec.image, pvc=spec.pvc, workdir=spec.workdir or cfg.workdir,
        backoff_limit=0, config_indented=textwrap.indent(resolved, "    "), env_list=env_list,
        resource_limits=limit_lines, rank_args=shlex.join(rank_args(K8S_CONFIG)),
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
    """Render the job for `backend` into `<workdir>/jobs/` and submit it; returns paths and the job id (with
    `dry_run`: paths and the command that would submit it)."""
    spec.validate()
    if backend not in ("local", "slurm", "k8s"):
        raise ConfigError(f"unknown backend {backend!r}: choose local, slurm or k8s")
    jobs_dir = Path(cfg.workdir).resolve() / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    if backend == "local":
        train = cfg.train.model_copy(update={"num_procs": spec.procs_per_node})
        cfg = cfg.model_copy(update={"train": train})
        local = LaunchSpec(num_procs=spec.procs_per_node)
        if dry_run:
            config_path = write_config(cfg)
            cmd, _ = build_command(local, config_path)
            return {"command": shlex.join(cmd), "config": str(config_path)}
        check_inputs(cfg)
        try:
            tracking.track_stage(cfg, "pretrain", lambda: launch_pretraining(cfg, local))
        except LaunchFailed as e:
            raise BertscaleError(f"local job exited with code {e.exit_code}") from None
        return {"config": str(cfg.stage_dir("train") / CONFIG_FILE), "job_id": "local"}
    # The scheduler's ranks read this file; k8s carries it in its ConfigMap as well.
    config_path = write_config(cfg, jobs_dir / f"{spec.job_name}.yaml")
    if backend == "slurm":
        script = jobs_dir / f"{spec.job_name}.sbatch"
        script.write_text(render_slurm(cfg, spec, config_path))
        cmd = ["sbatch", "--parsable", str(script)]
        if dry_run:
            return {"script": str(script), "config": str(config_path), "command": shlex.join(cmd)}
        out = _run(cmd)
        return {"script": str(script), "config": str(config_path), "job_id": out.split(";")[0]}
    manifest = jobs_dir / f"{spec.job_name}.k8s.yaml"
    manifest.write_text(render_k8s(cfg, spec))
    cmd = ["kubectl", "apply", "-f", str(manifest)]
    if dry_run:
        return {"manifest": str(manifest), "command": shlex.join(cmd)}
    _run(cmd)
    return {"manifest": str(manifest), "job_id": spec.job_name}
