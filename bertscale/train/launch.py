"""Start the ranks of a pretraining job: the DeepSpeed launcher, torchrun, or SLURM's srun.

Every rank runs `python -m bertscale.train --config <resolved config>`; the config is written once, fully
resolved, so that all ranks (and nodes) train with exactly the same settings. Layouts:

- one node, N processes: `deepspeed --num_gpus N` (on CPU the ranks talk over gloo) or `torchrun --nproc_per_node N`;
- several nodes over ssh: a DeepSpeed hostfile (`hostname slots=N` per line);
- several nodes without ssh: one launcher per node with its `node_rank` (DeepSpeed `--no_ssh`, or torchrun
  `--nnodes --node_rank --master_addr`);
- SLURM: `srun` starts one task per device; each rank reads SLURM_PROCID/SLURM_NTASKS (see distributed.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import yaml

from bertscale.config import PipelineConfig, dump_config
from bertscale.errors import ConfigError
from bertscale.train.distributed import DEFAULT_MASTER_PORT, free_port

log = logging.getLogger(__name__)

Launcher = Literal["deepspeed", "torchrun", "srun"]


@dataclass
class LaunchSpec:
    """How many processes on how many nodes, and which launcher starts them."""

    launcher: Launcher = "deepspeed"
    num_procs: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    # None: a free port for a single-node job (so two jobs on one machine never collide), 29500 across nodes.
    master_port: int | None = None
    hostfile: str | None = None
    extra_args: list[str] = field(default_factory=list)  # passed to the launcher before the module

    def resolved_port(self) -> int:
        """The rendezvous port; fixed once resolved, so every launcher argument names the same one."""
        if self.master_port is None:
            single_node = self.nnodes == 1 and not self.hostfile and self.launcher != "srun"
            self.master_port = free_port() if single_node else DEFAULT_MASTER_PORT
        return self.master_port

    def validate(self) -> None:
        if self.launcher not in ("deepspeed", "torchrun", "srun"):
            raise ConfigError(f"launcher {self.launcher!r}: use deepspeed, torchrun or srun")
        if self.num_procs < 1 or self.nnodes < 1:
            raise ConfigError(f"num_procs={self.num_procs} and nnodes={self.nnodes} must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"node_rank={self.node_rank} is not in [0, nnodes={self.nnodes})")
        if self.hostfile and not Path(self.hostfile).is_file():
            raise ConfigError(f"hostfile {self.hostfile} does not exist")


def rank_args(config_file: Path, data: str | Path | None, tokenizer: str | Path | None) -> list[str]:
    """What every rank runs after the launcher's own arguments."""
    args = ["-m", "bertscale.train", "--config", str(config_file)]
    if data:
        args += ["--data", str(data)]
    if tokenizer:
        args += ["--tokenizer", str(tokenizer)]
    return args


def write_hostfile(path: Path, nnodes: int, slots: int) -> Path:
    """A placeholder hostfile for `--no_ssh` launches: DeepSpeed only needs the node count and slots there."""
    path.write_text("".join(f"node{i} slots={slots}\n" for i in range(nnodes)))
    return path


def deepspeed_command(spec: LaunchSpec, rank: list[str], workdir: Path) -> list[str]:
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--master_port", str(spec.resolved_port()),
           "--no_local_rank"]
    if spec.hostfile:
        cmd += ["--hostfile", spec.hostfile, "--master_addr", spec.master_addr]
        if spec.nnodes > 1:
            cmd += ["--num_nodes", str(spec.nnodes)]
    elif spec.nnodes > 1:
        hostfile = write_hostfile(workdir / "hostfile", spec.nnodes, spec.num_procs)
        cmd += ["--hostfile", str(hostfile), "--master_addr", spec.master_addr]
    if spec.nnodes > 1 and not spec.hostfile:
        cmd += ["--no_ssh", "--node_rank", str(spec.node_rank)]
    cmd += ["--num_gpus", str(spec.num_procs)]
    # The runner takes a script path; `--module` makes it `python -m <module>`.
    return cmd + spec.extra_args + ["--module", rank[1]] + rank[2:]


def torchrun_command(spec: LaunchSpec, rank: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(spec.nnodes), "--nproc_per_node",
           str(spec.num_procs), "--node_rank", str(spec.node_rank), "--master_addr", spec.master_addr,
           "--master_port", str(spec.resolved_port())]
    return cmd + spec.extra_args + rank


def srun_command(spec: LaunchSpec, rank: list[str]) -> list[str]:
    cmd = ["srun", "--kill-on-bad-exit=1", "--cpu-bind=none", f"--nodes={spec.nnodes}",
           f"--ntasks-per-node={spec.num_procs}"]
    return cmd + spec.extra_args + [sys.executable, "-u"] + rank


def build_command(spec: LaunchSpec, config_file: Path, data: str | Path | None = None,
                  tokenizer: str | Path | None = None) -> tuple[list[str], dict[str, str]]:
    """The launcher command line and the extra environment it needs."""
    spec.validate()
    rank = rank_args(config_file, data, tokenizer)
    env = {"PYTHONUNBUFFERED": "1"}
    if spec.launcher == "deepspeed":
        return deepspeed_command(spec, rank, config_file.parent), env
    if spec.launcher == "torchrun":
        return torchrun_command(spec, rank), env
    env.update(MASTER_ADDR=spec.master_addr, MASTER_PORT=str(spec.resolved_port()))
    return srun_command(spec, rank), env


STALE_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def write_config(cfg: PipelineConfig) -> Path:
    """The resolved config every rank reads (overrides already applied)."""
    out = cfg.stage_dir("train")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "launch-config.yaml"
    path.write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False))
    return path.resolve()


def launch(cfg: PipelineConfig, spec: LaunchSpec, config_path: str | Path | None = None,
           overrides: list[str] | None = None, data: str | Path | None = None,
           tokenizer: str | Path | None = None) -> int:
    """Run the job in the foreground, its output streamed to ours; returns the launcher's exit code.

    `config_path` and `overrides` are what `cfg` was loaded from; they are recorded in the log, while the
    ranks read the resolved `cfg` itself. SIGINT/SIGTERM are forwarded so the ranks checkpoint and stop.
    """
    cmd, extra_env = build_command(spec, write_config(cfg), data, tokenizer)
    log.info("launching %d process(es) x %d node(s) from %s %s: %s", spec.num_procs, spec.nnodes,
             config_path or "defaults", " ".join(overrides or []), shlex.join(cmd))
    # Its own process group, so a signal reaches every rank directly: the DeepSpeed runner itself dies on
    # SIGTERM without passing it on.
    base = dict(os.environ)
    if spec.launcher == "srun":
        # Ranks read RANK/WORLD_SIZE before SLURM's ids: stale ones from this shell would make every task rank 0.
        for name in STALE_RANK_VARS:
            base.pop(name, None)
    proc = subprocess.Popen(cmd, env={**base, **extra_env}, start_new_session=True)
    signalled: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        signalled.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    in_main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        code = proc.wait()
        if signalled:
            wait_for_group(proc.pid, STOP_GRACE_S)
        return code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def output_lines(stream: IO[bytes]) -> Iterator[str]:
    """The lines of a job's output worth a log record: progress-bar redraws dropped, each bar's last state kept.

    A bar redraws itself with `\r<bar>` and ends with a newline, so a line reads `\r<bar 1>\r<bar 2>...\n`;
    only the text after its last carriage return is what a terminal would show. The stream must be binary
    (or text with newline=''): universal-newline text mode turns every `\r` into a line break of its own.
    """
    for raw in iter(stream.readline, b""):
        fragments = [f for f in raw.decode("utf-8", errors="replace").rstrip("\n").split("\r") if f.strip()]
        if fragments:
            yield fragments[-1].rstrip()


# How long the ranks get to write their checkpoint after a stop signal (DeepSpeed's launcher allows 30 s).
STOP_GRACE_S = 60.0


def wait_for_group(pgid: int, timeout: float) -> bool:
    """Wait until no process of group `pgid` is left (the ranks finishing their checkpoint); True if none is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    log.warning("ranks of process group %d still running %.0f s after the stop signal", pgid, timeout)
    return False
