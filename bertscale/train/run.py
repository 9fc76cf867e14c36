"""One pretraining run on this rank: `pretrain(cfg)` runs inside every launched process.

It joins the process group, loads the tokenizer and the sequence-length phases, plans the resume (or the warm
start), builds the DeepSpeed engine, runs the loop (`bertscale.train.loop`) inside rank 0's MLflow run (the one the
launching process opened: `tracking.rank_run`), writes the final checkpoint and, on rank 0, exports `<out>/hf` and
`train_result.json`. `exit_code` turns the result
into the process's exit status.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bertscale import tracking
from bertscale.config import PipelineConfig
from bertscale.errors import ConfigError, InputError
from bertscale.hardware import resolve_compile, resolve_precision
from bertscale.model import BertForPreTraining, config_from_pipeline
from bertscale.model.bert import compile_dense_blocks
from bertscale.model.weights import copy_tokenizer_files, export_checkpoint
from bertscale.tokenizer import load_tokenizer
from bertscale.tracking import StageRecord
from bertscale.train import deepspeed_engine, distributed, schedule
from bertscale.train.checkpoint import CheckpointManager
from bertscale.train.deepspeed_engine import EngineSpec, build_ds_config
from bertscale.train.distributed import DistEnv
from bertscale.train.loop import Trainer, trainer_peer_failure
from bertscale.train.metrics import MetricsSink, make_throughput
from bertscale.train.optim import build_optimizer
from bertscale.train.phases import load_phases
from bertscale.train.resume import initial_weights, plan_resume, resume_hint

log = logging.getLogger(__name__)

RESULT_FILE = "train_result.json"
EXIT_SIGNALLED = 128 + 15  # a signal-stopped run: 128 + SIGTERM, as a shell reports a process killed by it


@dataclass
class TrainResult:
    """What a pretraining run produced (paths and metrics are rank 0's view)."""

    output_dir: Path
    final_step: int
    metrics: dict[str, float]
    checkpoint: Path | None
    hf_dir: Path | None
    tokens_per_s: float
    mfu: float | None
    skipped_steps: int = 0  # non-finite micro batches
    stopped: str = "completed"  # completed | time_budget | signal
    overflow_skipped_steps: int = 0  # fp16: steps whose update DeepSpeed skipped on gradient overflow

    def summary(self) -> str:
        mfu = f"{self.mfu:.2%}" if self.mfu is not None and math.isfinite(self.mfu) else "n/a"
        lines = [f"pretraining {self.stopped} at step {self.final_step}: {self.output_dir}",
                 f"  {self.tokens_per_s:,.0f} real tokens/s, MFU {mfu}, {self.skipped_steps} skipped micro batches, "
                 f"{self.overflow_skipped_steps} updates skipped on fp16 overflow",
                 f"  last checkpoint: {self.checkpoint}", f"  HF export: {self.hf_dir}"]
        lines += [f"  {k}: {v:.4f}" for k, v in sorted(self.metrics.items())]
        return "\n".join(lines)

    def save(self) -> None:
        """Rank 0 writes `<out>/train_result.json`: how the launching process learns what the ranks did."""
        (self.output_dir / RESULT_FILE).write_text(json.dumps(
            {**self.__dict__, "output_dir": str(self.output_dir), "checkpoint": str(self.checkpoint),
             "hf_dir": str(self.hf_dir)}, indent=2, default=str))

    @classmethod
    def load(cls, out: str | Path) -> TrainResult:
        """The result rank 0 saved in `out`."""
        path = Path(out) / RESULT_FILE
        if not path.is_file():
            raise InputError(f"{path} not found: the pretraining job did not finish")
        d = json.loads(path.read_text())
        for key in ("output_dir", "checkpoint", "hf_dir"):
            d[key] = None if d[key] in (None, "None") else Path(d[key])
        return cls(**d)

    def record(self) -> StageRecord:
        """For tracking: the train section and the run's outcome (rank 0 logged the step metrics live)."""
        metrics = {"pretrain.final_step": self.final_step, "pretrain.tokens_per_s": self.tokens_per_s,
                   "pretrain.skipped_steps": self.skipped_steps,
                   "pretrain.overflow_skipped_steps": self.overflow_skipped_steps}
        if self.mfu is not None:
            metrics["pretrain.mfu"] = self.mfu
        return StageRecord("train", metrics=metrics, tags={"pretrain.stopped": self.stopped})


def build_engine(model: torch.nn.Module, cfg: PipelineConfig, env: DistEnv, load_universal: bool = False) -> Any:
    """The DeepSpeed engine of a pretraining run: our client optimizer and BERT's LR schedule over `max_steps`."""
    t = cfg.train
    device = env.device()
    ds_config = build_ds_config(EngineSpec.from_train(t), env.world_size, device.type == "cuda", load_universal)
    optimizer = build_optimizer(model, t, device)
    scheduler = schedule.build_scheduler(optimizer, t.warmup_steps, t.max_steps, t.decay, t.poly_power)
    return deepspeed_engine.initialize(model, optimizer, scheduler, ds_config)


def _quiet_other_ranks(env: DistEnv) -> None:
    if not env.is_main:
        logging.getLogger("bertscale").setLevel(logging.WARNING)
    # DeepSpeed logs every rank's config at INFO; keep its warnings.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def pretrain(cfg: PipelineConfig, data: str | Path | None = None, tokenizer: str | Path | None = None
             ) -> TrainResult:
    """Pretrain on this rank (see the module doc); rank 0 logs, writes metrics and exports `<out>/hf`."""
    env = distributed.read_env()
    chosen = resolve_precision(cfg.train.precision, env.device())
    # Every consumer (the DeepSpeed config, the MFU peak, checkpoint metadata) reads the concrete precision.
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": chosen.name})})
    # Every rank tears down what it started, in reverse order, on success and on a handled error: the DeepSpeed
    # engine (its hooks and buffers), then the process group, then the launcher variables (see
    # `distributed.process_group`). The watchdog and the signal handlers end with the loop, in `train_and_export`.
    with distributed.process_group(env, cfg.train.collective_timeout_s):
        _quiet_other_ranks(env)
        if env.is_main:
            log.info("precision %s (%s)", chosen.name, chosen.reason)
        data_dir = Path(data) if data else cfg.stage_dir("data")
        tok_dir = Path(tokenizer) if tokenizer else cfg.stage_dir("tokenizer")
        out = cfg.stage_dir("train")
        out.mkdir(parents=True, exist_ok=True)
        tok = load_tokenizer(tok_dir)
        model_cfg = config_from_pipeline(cfg, tok.get_vocab_size(with_added_tokens=True))
        phases = load_phases(cfg, data_dir, tok, env, model_cfg.max_position_embeddings)
        addresses = distributed.gather_addresses(env) if env.world_size > 1 else [env.master_addr]
        if env.is_main and env.world_size > 1:
            log.info("%d ranks: %s", env.world_size, ", ".join(f"rank {r} at {a}" for r, a in enumerate(addresses)))
        ckpt = CheckpointManager(out / "checkpoints", cfg.train.keep_checkpoints, env)
        tag, universal = plan_resume(cfg, env, ckpt)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        warm_start = tag is None and universal is None and cfg.train.init_from
        model = initial_weights(cfg, env, model_cfg, out) if warm_start else BertForPreTraining(model_cfg)
        compiled, why = resolve_compile(cfg.train.compile, env.device())
        if compiled and cfg.train.zero_stage == 3:
            if cfg.train.compile is True:
                raise ConfigError("train.compile=true is supported with ZeRO stages 0-2 only (stage 3 gathers "
                                  "parameters in module hooks): use zero_stage 0-2 or train.compile=false")
            compiled, why = False, "auto: not with ZeRO stage 3"
        if compiled:
            compile_dense_blocks(model)
        if env.is_main:
            log.info("torch.compile %s (%s)", "on" if compiled else "off", why)
        engine = build_engine(model, cfg, env, load_universal=universal is not None)
        try:
            torch.manual_seed(cfg.train.seed + 1 + env.rank)  # per-rank dropout streams (restored on resume)
            trainer = Trainer(cfg, env, engine, phases, tok, model_cfg, out, addresses, ckpt)
            with trainer_peer_failure(trainer, "resume"):
                trainer.resume(tag, universal)
            with tracking.rank_run(cfg, env.is_main):
                return train_and_export(trainer, tok_dir, chosen.reason)
        finally:
            deepspeed_engine.destroy(engine)


def exit_code(result: TrainResult) -> int:
    """The process exit status of a run: 0 when it finished or used up its time budget; 143 (128 + SIGTERM)
    when a signal stopped it, so launchers and schedulers see that it is not done."""
    return EXIT_SIGNALLED if result.stopped == "signal" else 0


def train_and_export(trainer: Trainer, tok_dir: Path, precision_reason: str = "set in the config") -> TrainResult:
    """The loop, the final checkpoint and (rank 0) the HF export; a signal-stopped run skips the export so it
    exits while the scheduler's grace period lasts."""
    cfg, env, out = trainer.cfg, trainer.env, trainer.out
    device = env.device()
    # The CPU peak probe draws random matrices: keep it off the RNG stream a resumed run has just restored.
    with torch.random.fork_rng(devices=[]):
        throughput = {p.seq_len: make_throughput(trainer.model_cfg, p.seq_len, cfg.train, device, env.world_size)
                      for p in trainer.phases}
    sink = MetricsSink(out, env, trainer.step, cfg.train.max_steps)
    if sink.tracked:
        tracking.set_tags({"pretrain.world_size": env.world_size, "pretrain.zero_stage": cfg.train.zero_stage,
                           "pretrain.precision": cfg.train.precision, "pretrain.device": device.type,
                           "pretrain.precision_reason": precision_reason})
    if env.world_size > 1:
        trainer.watchdog = distributed.Watchdog(cfg.train.collective_timeout_s,
                                                lambda: resume_hint(trainer.last_checkpoint)).start()
    try:
        with trainer_peer_failure(trainer):
            stopped = trainer.run(sink, throughput)
            trainer.save(final=True)
    finally:
        sink.close()
        if trainer.watchdog is not None:  # rank 0's export below may keep the others waiting: not a failure
            trainer.watchdog.stop()
    hf_dir = None
    if env.is_main and stopped != "signal" and trainer.last_checkpoint is not None:
        hf_dir = export_checkpoint(trainer.last_checkpoint, out / "hf")
        copy_tokenizer_files(tok_dir, hf_dir)
    distributed.barrier()
    meters = [m.overall() for m in throughput.values() if m.total_seconds]
    tps, mfu = meters[-1] if meters else (0.0, None)
    result = TrainResult(out, trainer.step, dict(trainer.last_metrics), trainer.last_checkpoint, hf_dir, tps, mfu,
                         trainer.bad.total, stopped, trainer.overflow_skips)
    if env.is_main:
        result.save()
    return result
