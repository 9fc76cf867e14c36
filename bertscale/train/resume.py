"""Where a run starts: resume planning (which checkpoint, and whether it needs DeepSpeed's universal form because
another number of ranks wrote it), the data position re-split for an elastic restart, and the warm start from
`train.init_from` when there is nothing to resume.

Planning happens before the engine exists: loading a universal checkpoint is an engine setting, and a checkpoint
of another ZeRO stage or precision is refused here with a message, not deep inside DeepSpeed's loader.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from bertscale.config import PipelineConfig, TrainConfig
from bertscale.errors import BertscaleError, ConfigError
from bertscale.model import BertForPreTraining
from bertscale.model.hf import load_pretrained
from bertscale.model.weights import resolve_weights
from bertscale.train import distributed
from bertscale.train.checkpoint import CheckpointManager
from bertscale.train.distributed import DistEnv

log = logging.getLogger(__name__)


def plan_resume(cfg: PipelineConfig, env: DistEnv, ckpt: CheckpointManager) -> tuple[str | None, Path | None]:
    """(checkpoint to resume, its universal conversion if it was written by another number of ranks); decided
    before the engine exists, since loading a universal checkpoint is an engine setting."""
    if not cfg.train.resume:
        ckpt.archive_previous()
        return None, None
    tag = ckpt.select()
    if tag is not None:
        check_resumable(ckpt.trainer_state(tag), cfg.train, ckpt.root / tag)
    if tag is None or ckpt.saved_world_size(tag) == env.world_size:
        return tag, None
    return tag, ckpt.to_universal(tag, int(ckpt.trainer_state(tag).get("zero_stage", cfg.train.zero_stage)))


def check_resumable(saved: dict, train: TrainConfig, tag_dir: Path) -> None:
    """A ConfigError if the checkpoint was written with another ZeRO stage or precision: DeepSpeed lays out the
    optimizer state per stage and precision and would fail deep inside `load_checkpoint`. (Checkpoints written
    before the precision was recorded are only checked for the stage.)"""
    now = {"zero_stage": train.zero_stage, "precision": train.precision}
    differ = {k: saved[k] for k in now if k in saved and saved[k] != now[k]}
    if not differ:
        return
    was = ", ".join(f"train.{k}={v}" for k, v in differ.items())
    raise ConfigError(
        f"cannot resume from {tag_dir}: it was written with {was}, this run has "
        f"{', '.join(f'train.{k}={now[k]}' for k in differ)}. DeepSpeed's optimizer state is laid out per ZeRO "
        f"stage and precision, so it cannot be loaded as it is (only the number of ranks may change, via a "
        f"universal checkpoint). Resume with {was}; or keep its weights without the optimizer state "
        f"(`bertscale export {tag_dir} -o DIR`); or start a fresh run with train.resume=false (the existing "
        "checkpoints are moved aside, not deleted)"
    )


def reshard_loader_state(state: dict, old_world: int, new_world: int) -> dict:
    """A loader state for `new_world` ranks that continues the epoch where `old_world` ranks stopped.

    Rank r of W reads positions r, r+W, ... of the epoch's permutation, so after p instances per rank the job
    has read the first p*W. With W' ranks each starts at p*W // W' (exact when W' divides p*W, else a few
    instances are read twice). The masking stream restarts from the new ranks' seeds."""
    consumed = int(state["position"]) * old_world
    return {"epoch": int(state["epoch"]), "position": consumed // new_world, "seed": state["seed"],
            "world_size": new_world, "collator": None}


def resume_hint(last_checkpoint: Path | None) -> str:
    """How to recover from a lost peer: which checkpoint a restart resumes from."""
    if last_checkpoint is None:
        return "no checkpoint was written yet: restart the job on every node to start over"
    return (f"restart the job on every node: it resumes from {last_checkpoint} "
            f"(step {int(last_checkpoint.name.removeprefix('step'))})")


def initial_weights(cfg: PipelineConfig, env: DistEnv, model_cfg: Any, out: Path) -> torch.nn.Module:
    """The model loaded from `train.init_from` (any reference `bertscale.model.weights` resolves). Rank 0 resolves it (a registry download or a ZeRO export) into
    `<out>/init`, which the other ranks then read: the output dir is shared by all nodes."""
    ref, staged = cfg.train.init_from, out / "init"
    found: tuple[str | None, str | None] = (None, None)
    if env.is_main:
        if staged.exists():
            shutil.rmtree(staged)
        try:
            found = (str(resolve_weights(ref, staged, cfg)), None)
        except BertscaleError as e:  # every rank raises it, none is left waiting for rank 0
            found = (None, f"train.init_from={ref}: {e}")
    source, error = distributed.broadcast_object(found)
    if error:
        raise ConfigError(error)
    source = Path(source)
    # Our model config, not the checkpoint's: a checkpoint of another size or vocabulary is a clear error here.
    model, report = load_pretrained(source, BertForPreTraining, config=model_cfg)
    if env.is_main:
        log.info("initialised from %s (%s): %s", ref, source, report.summary())
    return model
