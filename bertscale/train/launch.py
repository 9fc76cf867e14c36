"""Start the ranks of a pretraining job: the DeepSpeed launcher, torchrun, or SLURM's srun.

The one launch path. `check_inputs` catches a user's mistakes (no data, no tokenizer, a missing `init_from`, an
unwritable output) in the calling process, before any launcher starts. `write_config` writes the resolved
config (overrides applied) once; every rank runs `rank_command`: `python -u -m bertscale.train --config <it>`,
so that all ranks (and nodes) train with exactly the same settings. The local launchers below, the SLURM and
Kubernetes jobs (`bertscale.jobs`) and the pretraining flow all wrap that one command. Layouts:

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
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import yaml

from bertscale import tracking
from bertscale.config import PipelineConfig, dump_config
from bertscale.data.dataset import PretrainingDataset
from bertscale.errors import BertscaleError, ConfigError, InputError
from bertscale.tokenizer import load_tokenizer
from bertscale.train.distributed import DEFAULT_MASTER_PORT, free_port
from bertscale.train.run import TrainResult

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


def rank_args(config_file: str | Path, data: str | Path | None = None, tokenizer: str | Path | None = None
              ) -> list[str]:
    """What every rank runs after the interpreter (and the launcher's own arguments)."""
    args = ["-m", "bertscale.train", "--config", str(config_file)]
    if data:
        args += ["--data", str(data)]
    if tokenizer:
        args += ["--tokenizer", str(tokenizer)]
    return args


def rank_command(config_file: str | Path, data: str | Path | None = None, tokenizer: str | Path | None = None,
                 python: str = sys.executable) -> list[str]:
    """The command of one rank, whatever starts it (srun runs it as is; the others take `rank_args`)."""
    return [python, "-u", *rank_args(config_file, data, tokenizer)]


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


CONFIG_FILE = "launch-config.yaml"


def config_text(cfg: PipelineConfig) -> str:
    """The resolved config as YAML: what every rank of every launch path reads."""
    return yaml.safe_dump(dump_config(cfg), sort_keys=False)


def write_config(cfg: PipelineConfig, path: str | Path | None = None) -> Path:
    """Write the resolved config (overrides already applied) for the ranks; default `<train out>/launch-config.yaml`."""
    if path is None:
        out = cfg.stage_dir("train")
        out.mkdir(parents=True, exist_ok=True)
        path = out / CONFIG_FILE
    path = Path(path)
    path.write_text(config_text(cfg))
    return path.resolve()


def check_inputs(cfg: PipelineConfig, data: str | Path | None = None, tokenizer: str | Path | None = None) -> None:
    """What a user can get wrong, checked here before any launcher starts: the tokenizer, the data of every
    phase (manifest and shard files), `train.init_from` when there is nothing to resume, and a writable output
    dir. Raises the error the ranks would have raised, as one line."""
    tok_dir = Path(tokenizer) if tokenizer else cfg.stage_dir("tokenizer")
    data_dir = Path(data) if data else cfg.stage_dir("data")
    load_tokenizer(tok_dir)
    for seq_len in cfg.data.seq_lengths:
        PretrainingDataset(data_dir, seq_len, "train")
    out = cfg.stage_dir("train")
    ref = cfg.train.init_from
    resumable = cfg.train.resume and (out / "checkpoints" / "latest").is_file()
    if ref and not resumable and not ref.startswith("models:/") and not Path(ref).exists():
        raise ConfigError(f"train.init_from={ref} does not exist: give an HF dir, a DeepSpeed checkpoint dir or "
                          "models:/<name>@<alias>")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as e:
        raise InputError(f"cannot write to the train output dir {out}: {e.strerror or e}; set train.output "
                         "(or --workdir) to a writable directory") from None


class LaunchFailed(BertscaleError):
    """The launched ranks exited with a non-zero status (already reported on their output)."""

    def __init__(self, exit_code: int, tail: list[str]) -> None:
        super().__init__(f"pretraining exited with code {exit_code}" +
                         (":\n" + "\n".join(tail) if tail else ""))
        self.exit_code = exit_code


def launch_pretraining(cfg: PipelineConfig, spec: LaunchSpec, data: str | Path | None = None,
                       tokenizer: str | Path | None = None, output: Callable[[str], None] | None = None
                       ) -> TrainResult:
    """Launch the job, wait for it and return rank 0's `TrainResult`; `LaunchFailed` if it did not succeed.

    What the CLI and the pretraining flow run inside `tracking.track_stage`: the active MLflow run is named in
    the ranks' environment, so rank 0 logs its step metrics into it.
    """
    tail: list[str] = []

    def keep(line: str) -> None:
        tail[:] = (tail + [line])[-20:]
        if output is not None:
            output(line)

    code = launch(cfg, spec, data=data, tokenizer=tokenizer, output=keep if output is not None else None)
    if code != 0:
        raise LaunchFailed(code, tail)
    return TrainResult.load(cfg.stage_dir("train"))


def launch(cfg: PipelineConfig, spec: LaunchSpec, config_path: str | Path | None = None,
           overrides: list[str] | None = None, data: str | Path | None = None,
           tokenizer: str | Path | None = None, output: Callable[[str], None] | None = None) -> int:
    """Check the inputs, write the resolved config and run the job in the foreground; returns the launcher's
    exit code. Its output goes to ours, or line by line to `output` (progress-bar redraws dropped).

    `config_path` and `overrides` are what `cfg` was loaded from; they are recorded in the log, while the
    ranks read the resolved `cfg` itself. SIGINT/SIGTERM are forwarded so the ranks checkpoint and stop.
    """
    spec.validate()
    check_inputs(cfg, data, tokenizer)
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
    env = {**base, **tracking.rank_env(), **extra_env}
    # Binary, so the progress bar's carriage returns survive to `output_lines`, which drops its redraws.
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "bufsize": 0} if output else {}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, **pipe)
    signalled: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        signalled.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    in_main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        if output is not None:
            assert proc.stdout is not None
            for line in output_lines(proc.stdout):
                output(line)
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
