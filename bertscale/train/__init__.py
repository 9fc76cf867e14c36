"""Pretraining with DeepSpeed ZeRO: the per-rank loop (`pretrain`), launchers, checkpoints and HF export."""

from bertscale.train.checkpoint import CheckpointManager, export_checkpoint
from bertscale.train.distributed import DistEnv, read_env
from bertscale.train.engine import TrainResult, build_ds_config, pretrain
from bertscale.train.launch import LaunchSpec, build_command, launch
from bertscale.train.schedule import lr_factor

__all__ = [
    "CheckpointManager",
    "DistEnv",
    "LaunchSpec",
    "TrainResult",
    "build_command",
    "build_ds_config",
    "export_checkpoint",
    "launch",
    "lr_factor",
    "pretrain",
    "read_env",
]
