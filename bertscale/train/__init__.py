"""Pretraining with DeepSpeed ZeRO: the per-rank run (`pretrain`), its loop, checkpoints and launchers.

One concept per module: `run` (one rank's run, start to export), `loop` (optimizer steps, evaluation, stop
conditions), `deepspeed_engine` (the only door to DeepSpeed), `optim` and `schedule` (shared with fine-tuning),
`phases` (sequence-length phases), `metrics` (step statistics, throughput/MFU, the metrics sink), `resume`
(resume planning and warm start), `checkpoint` (save/verify/load), `distributed` and `signals` (the process's
environment), `launch` (starting the ranks).
"""

from bertscale.train.checkpoint import CheckpointManager
from bertscale.train.deepspeed_engine import build_ds_config
from bertscale.train.distributed import DistEnv, read_env
from bertscale.train.launch import LaunchSpec, build_command, launch
from bertscale.train.run import TrainResult, pretrain
from bertscale.train.schedule import lr_factor

__all__ = [
    "CheckpointManager",
    "DistEnv",
    "LaunchSpec",
    "TrainResult",
    "build_command",
    "build_ds_config",
    "launch",
    "lr_factor",
    "pretrain",
    "read_env",
]
