"""The one door to DeepSpeed: its config, `deepspeed.initialize`, what the loop reads from the engine (gradient
norm, fp16 loss scale), the CPU Adam kernel, universal-checkpoint conversion and teardown.

Pretraining and fine-tuning both build their engine here, each from an `EngineSpec` (pretraining's comes from
`train`, fine-tuning's from the task's hyper-parameters) with a client optimizer (`bertscale.train.optim`) and
a `LambdaLR` schedule (`bertscale.train.schedule`) that DeepSpeed steps with the optimizer. No other module
imports deepspeed (the one exception: `bertscale.model.weights` reads ZeRO shards with `zero_to_fp32`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bertscale.config import TrainConfig
from bertscale.errors import ConfigError
from bertscale.resources import resource

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class EngineSpec:
    """The DeepSpeed settings we own: ZeRO stage, precision, batch shape and clipping."""

    zero_stage: int
    precision: str  # fp32 | bf16 | fp16
    micro_batch_size: int
    grad_accum: int = 1
    grad_clip: float = 1.0
    base_config: str | None = None  # a DeepSpeed JSON to start from; None: the shipped zero<stage>.json

    @classmethod
    def from_train(cls, train: TrainConfig) -> EngineSpec:
        return cls(train.zero_stage, train.precision, train.micro_batch_size, train.grad_accum, train.grad_clip,
                   train.ds_config)


def base_ds_config(zero_stage: int, path: str | Path | None = None) -> dict:
    """The base DeepSpeed config of a ZeRO stage: `path`, else the package's deepspeed/zero<stage>.json
    (`bertscale.resources`; the repository's configs/deepspeed links to it)."""
    p = Path(path) if path else resource(f"deepspeed/zero{zero_stage}.json")
    if not p.is_file():
        if path:
            raise ConfigError(f"train.ds_config file {p} does not exist")
        return {"zero_optimization": {"stage": zero_stage}, "steps_per_print": 10**9}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {p} is not valid JSON: {e}") from None


def build_ds_config(spec: EngineSpec | TrainConfig, world_size: int, on_gpu: bool, load_universal: bool = False
                    ) -> dict:
    """Our settings merged over the base config; the fields we own always win. `load_universal` makes
    `load_checkpoint` read a universal checkpoint (an elastic restart)."""
    s = EngineSpec.from_train(spec) if isinstance(spec, TrainConfig) else spec
    if s.precision == "fp16" and not on_gpu:
        raise ConfigError("train.precision=fp16 needs a GPU (no fp16 loss scaling on CPU): use bf16 or fp32")
    ds = base_ds_config(s.zero_stage, s.base_config)
    ds.setdefault("zero_optimization", {})["stage"] = s.zero_stage
    ds.update(
        train_micro_batch_size_per_gpu=s.micro_batch_size,
        gradient_accumulation_steps=s.grad_accum,
        train_batch_size=s.micro_batch_size * s.grad_accum * world_size,
        gradient_clipping=s.grad_clip,
        # Our optimizer is a client optimizer (torch AdamW / CPU Adam / LAMB), not one DeepSpeed builds.
        zero_allow_untested_optimizer=True,
        zero_force_ds_cpu_optimizer=False,
    )
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    ds["bf16"] = {"enabled": s.precision == "bf16"}
    ds["fp16"] = {"enabled": s.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                  "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return ds


def version() -> str:
    """The installed DeepSpeed's version (ranks on different nodes must agree on it)."""
    import deepspeed

    return deepspeed.__version__


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, ds_config: dict) -> Any:
    """`deepspeed.initialize` with our client optimizer and schedule (DeepSpeed steps the schedule with the
    optimizer, and not on an update it skips); the process group must exist already."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    return engine


def cpu_adam(params: Iterable, lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """DeepSpeed's CPU Adam in AdamW mode: about 2.5x faster than torch's unfused AdamW on CPU (AVX kernels,
    built on first use)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=lr, betas=betas, eps=eps, adamw_mode=True)


def grad_norm(engine: Any, from_grads: bool = False) -> float:
    """Global gradient norm before clipping: DeepSpeed's (after `step`) for ZeRO >= 1, where the gradients are
    partitioned; with `from_grads` (ZeRO 0, before `step`) from the full gradients of the module."""
    norm = None if from_grads else engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else float("nan")


def loss_scale(engine: Any) -> float | None:
    """The current fp16 dynamic loss scale; None without fp16 (bf16 and fp32 do not scale the loss)."""
    if not engine.fp16_enabled():
        return None
    scale = getattr(engine.optimizer, "loss_scale", None)
    return float(scale) if scale is not None else None


def destroy(engine: Any) -> None:
    """Release an engine's hooks and buffers (before the process group it uses goes)."""
    engine.destroy()


def destroy_comm() -> bool:
    """Destroy the process group through DeepSpeed when DeepSpeed joined it: it keeps the groups it derived from
    ours (world, data-parallel) in module globals, and its own destroy drops them with ours, or the next engine in
    this process would use destroyed groups. False (nothing done) when DeepSpeed never set up its comm."""
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is None or not ds_comm.is_initialized():
        return False
    rank = ds_comm.get_rank()
    ds_comm.destroy_process_group()
    release_shared_memory(rank)
    return True


def release_shared_memory(rank: int, root: Path = Path("/dev/shm")) -> None:
    """Unlink this rank's CPU all-reduce buffer, which DeepSpeed creates in shared memory
    (`deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`, 66 MiB) and never removes: every CPU
    run would otherwise leave its ranks' buffers in RAM until reboot. Unlinking only drops the name; mappings
    that peers still hold stay valid until they exit."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        (root / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)


def convert_to_universal(tag_dir: Path, out: Path) -> str | None:
    """DeepSpeed's `ds_to_universal` in a child process (it starts worker pools); None, or what went wrong."""
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    # Our checkpoints do not carry Megatron's `universal_checkpoint_info`; the converter can add the default.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", workers,
           "--num_merge_workers", workers]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 0 and (out / "zero").is_dir():
        log.info("converted %s to a universal checkpoint in %s", tag_dir, out)
        return None
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return f"ds_to_universal exited with {done.returncode}: {tail[0][:300]}"
