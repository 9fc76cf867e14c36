"""The training loop of one rank: optimizer steps over micro batches, held-out evaluation, checkpoints, and the
stop conditions all ranks agree on (signal, time budget, checkpoint due).

Each optimizer step runs `grad_accum` micro batches; after every forward the ranks sum a small vector of
statistics (`bertscale.train.metrics.STATS`: losses, accuracy counts, tokens, a non-finite flag), so all ranks
agree before `backward` whether a micro batch is skipped. A skipped micro batch never reaches `backward` or
`step`, which keeps DeepSpeed's accumulation counters and ZeRO's gradient buffers clean on every stage;
`max_bad_steps` of them in a row abort the run.

Precision: bf16 uses DeepSpeed's own bf16 mode (bf16 weights and activations, fp32 master weights in the
optimizer), which works on CPU with ZeRO 0-3 here; fp16 (dynamic loss scale) needs a GPU. With fp16, DeepSpeed
skips the update of a step whose gradients overflow (and lowers the loss scale): the step still counts, as
DeepSpeed's `global_steps` and Megatron's iterations do, but it is counted as `overflow_skipped_steps` and
marked in the step log, and the loss scale is logged with the metrics. The LR schedule follows applied updates
(DeepSpeed does not step the scheduler on a skipped update).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bertscale.config import PipelineConfig
from bertscale.data import DistributedLoader
from bertscale.errors import BertscaleError, ConfigError
from bertscale.tokenizer import special_ids
from bertscale.train import distributed, schedule
from bertscale.train.checkpoint import CheckpointManager, CheckpointSaveError
from bertscale.train.deepspeed_engine import grad_norm, loss_scale
from bertscale.train.distributed import DistEnv
from bertscale.train.metrics import STATS, STEP_RECORD, MetricsSink, Throughput, micro_stats, step_metrics
from bertscale.train.phases import Phase, make_collator
from bertscale.train.resume import reshard_loader_state, resume_hint
from bertscale.train.signals import StopSignal

log = logging.getLogger(__name__)


def forward(engine: Any, batch: dict[str, torch.Tensor]) -> Any:
    """The model's PretrainingOutput for one micro batch (a seam the NaN-handling test replaces)."""
    return engine(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                  batch["masked_positions"], batch["masked_labels"], batch["next_sentence_label"])


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class BadSteps:
    """Counts non-finite micro batches; `limit` in a row is an error."""

    limit: int
    in_a_row: int = 0
    total: int = 0

    def record(self, bad: bool, where: str) -> None:
        if not bad:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        log.warning("non-finite loss at %s: micro batch skipped (%d in a row, %d in all)", where, self.in_a_row,
                    self.total)
        if self.in_a_row >= self.limit:
            raise BertscaleError(
                f"{self.in_a_row} consecutive non-finite losses (at {where}): training diverged. Lower train.lr, "
                "raise train.warmup_steps, use precision bf16/fp32, or resume from an earlier checkpoint"
            )


@torch.no_grad()
def evaluate_heldout(engine: Any, phase: Phase, cfg: PipelineConfig, tok: Any, env: DistEnv) -> dict[str, float]:
    """MLM loss/accuracy and NSP accuracy on the first `eval_batches` held-out batches (fixed masks)."""
    if phase.heldout is None:
        return {}
    collator = make_collator(cfg, tok, special_ids(tok), tok.get_vocab_size(with_added_tokens=True),
                             seed=cfg.train.seed + env.rank)
    batch_size = min(cfg.train.micro_batch_size, len(phase.heldout) // env.world_size)
    loader = DistributedLoader(phase.heldout, batch_size, collator, env.rank, env.world_size, shuffle=False)
    n_batches = min(cfg.train.eval_batches, len(loader))
    total = torch.zeros(len(STATS), dtype=torch.float64)
    engine.eval()
    try:
        for _, batch in zip(range(n_batches), loader):
            total += micro_stats(forward(engine, to_device(batch, engine.device)), batch)
    finally:
        engine.train()
    distributed.all_reduce(total)
    m = step_metrics(total, n_batches * env.world_size - int(total[0]))
    return {k: m[k] for k in ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc")}


class Trainer:
    """Owns the engine, phases, checkpoints and counters of one rank."""

    def __init__(self, cfg: PipelineConfig, env: DistEnv, engine: Any, phases: list[Phase], tok: Any,
                 model_cfg: Any, out: Path, addresses: list[str] | None = None,
                 ckpt: CheckpointManager | None = None) -> None:
        self.cfg, self.t, self.env, self.engine, self.phases, self.tok = cfg, cfg.train, env, engine, phases, tok
        self.model_cfg, self.out = model_cfg, out
        self.addresses = addresses or [env.master_addr]
        self.ckpt = ckpt or CheckpointManager(out / "checkpoints", self.t.keep_checkpoints, env)
        self.bad = BadSteps(self.t.max_bad_steps)
        self.step = 0
        self.overflow_skips = 0  # fp16 updates DeepSpeed skipped (steps counted, weights unchanged)
        self.failed_saves = 0  # in a row
        self.watchdog: distributed.Watchdog | None = None
        self.last_checkpoint: Path | None = None
        self.last_metrics: dict[str, float] = {}

    # --- state -------------------------------------------------------------------------------------------------
    def resume(self, tag: str | None, universal: Path | None = None) -> None:
        """Restore checkpoint `tag` (None: start fresh); from its `universal` conversion when it was written by a
        different number of ranks."""
        if tag is None:
            return
        if universal is not None:
            self.resume_elastic(tag, universal)
            return
        trainer_state, rank_state = self.ckpt.load(self.engine, tag)
        self.step = int(trainer_state["step"])
        self.bad.total = int(trainer_state.get("skipped_micro_batches", 0))
        self.overflow_skips = int(trainer_state.get("overflow_skipped_steps", 0))
        for phase, state in zip(self.phases, rank_state["loaders"]):
            try:
                phase.loader.load_state_dict(state)
            except ValueError as e:
                raise ConfigError(f"cannot resume from {self.ckpt.root / tag}: {e}; or set train.resume=false"
                                  ) from None
        self.last_checkpoint = self.ckpt.root / tag
        if self.env.is_main:
            log.info("resumed from %s at step %d", self.last_checkpoint, self.step)

    def beat(self, where: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(where)

    def resume_elastic(self, tag: str, universal: Path) -> None:
        """Resume on a new number of ranks: weights, Adam moments and the LR schedule from the universal
        checkpoint; each phase's data position re-split over the new ranks; fresh dropout and masking streams."""
        trainer_state, rank0 = self.ckpt.load_universal(self.engine, tag, universal)
        self.step = int(trainer_state["step"])
        self.bad.total = int(trainer_state.get("skipped_micro_batches", 0))
        self.overflow_skips = int(trainer_state.get("overflow_skipped_steps", 0))
        old_world = int(trainer_state["world_size"])
        for phase, state in zip(self.phases, rank0["loaders"]):
            phase.loader.load_state_dict(reshard_loader_state(state, old_world, self.env.world_size))
        # Continuing the old per-rank streams is impossible with other ranks; a step-dependent seed at least
        # keeps the dropout masks from replaying those of step 0.
        torch.manual_seed(self.t.seed + 1 + self.env.rank + 7919 * self.step)
        self.last_checkpoint = self.ckpt.root / tag
        if self.env.is_main:
            log.warning("elastic restart: resumed %s (written by %d ranks) on %d ranks at step %d via the "
                        "universal checkpoint %s; data order continues approximately (see docs/multinode.md)",
                        self.last_checkpoint, old_world, self.env.world_size, self.step, universal)

    def save(self, final: bool = False) -> None:
        """Checkpoint this step. A failed save only warns while `save_failures_tolerated` allows and it is not
        the final one: training goes on from intact state and the next checkpoint retries."""
        if self.last_checkpoint is not None and self.last_checkpoint.name == f"step{self.step:08d}":
            return  # already saved at this step
        state = {"skipped_micro_batches": self.bad.total, "overflow_skipped_steps": self.overflow_skips,
                 "world_size": self.env.world_size,
                 "zero_stage": self.t.zero_stage, "precision": self.t.precision,
                 "seq_lengths": [p.seq_len for p in self.phases]}
        loaders = {"loaders": [p.loader.state_dict() for p in self.phases]}
        self.beat(f"the checkpoint save at step {self.step}")
        try:
            self.last_checkpoint = self.ckpt.save(self.engine, self.step, state, loaders, self.model_cfg.to_dict())
        except CheckpointSaveError as e:
            self.failed_saves += 1
            if final or self.failed_saves > self.t.save_failures_tolerated:
                raise
            if self.env.is_main:
                log.warning("%s; training continues and retries at the next checkpoint (%d of %d failed saves in "
                            "a row tolerated, train.save_failures_tolerated)", e, self.failed_saves,
                            self.t.save_failures_tolerated)
            return
        self.failed_saves = 0

    # --- one optimizer step ------------------------------------------------------------------------------------
    def train_step(self, phase: Phase) -> dict[str, float]:
        """`grad_accum` finite micro batches, backward and DeepSpeed `step` each (it updates on the last)."""
        total = torch.zeros(len(STATS), dtype=torch.float64)
        good = 0
        lr = float(self.engine.get_lr()[0])  # the rate this step's update uses (the scheduler moves in `step`)
        skipped_before = self.engine.skipped_steps  # DeepSpeed counts updates it skipped on fp16 overflow
        while good < self.t.grad_accum:
            batch = phase.next_batch()
            out = forward(self.engine, to_device(batch, self.engine.device))
            stats = distributed.all_reduce(micro_stats(out, batch))
            bad = stats[0] > 0
            self.bad.record(bool(bad), f"step {self.step} (seq{phase.seq_len})")
            if bad:
                continue
            self.engine.backward(out.loss)
            last_micro = good == self.t.grad_accum - 1
            # ZeRO 0 reports no norm, and its gradients are only whole before `step` clips them.
            norm = grad_norm(self.engine, from_grads=True) if last_micro and self.t.zero_stage == 0 else None
            self.engine.step()
            total += stats
            good += 1
        metrics = step_metrics(total, good * self.env.world_size)  # all ranks skip the same micro batches
        metrics["grad_norm"] = norm if norm is not None else grad_norm(self.engine)
        metrics["lr"] = lr
        self.record_overflow(self.engine.skipped_steps > skipped_before, metrics)
        return metrics

    def record_overflow(self, skipped: bool, metrics: dict[str, float]) -> None:
        """Count an update DeepSpeed skipped on fp16 overflow; add the loss scale (after its adjustment)."""
        scale = loss_scale(self.engine)
        if scale is not None:
            metrics["loss_scale"] = scale
        if not skipped:
            return
        self.overflow_skips += 1
        metrics["overflow"] = 1.0
        if self.env.is_main:
            log.info("step %d: fp16 gradients overflowed, update skipped (loss scale now %s; %d skipped in all)",
                     self.step + 1, scale, self.overflow_skips)

    def control(self, stop: StopSignal, started: float, last_ckpt_time: float) -> tuple[bool, bool, bool]:
        """(signal received, time budget spent, checkpoint due by minutes), agreed on by all ranks."""
        now = time.monotonic()
        flags = torch.tensor([
            stop.received is not None,
            self.t.max_minutes is not None and now - started >= self.t.max_minutes * 60,
            self.t.checkpoint_minutes is not None and now - last_ckpt_time >= self.t.checkpoint_minutes * 60,
        ], dtype=torch.float64)
        distributed.all_reduce(flags, op="max")
        return bool(flags[0]), bool(flags[1]), bool(flags[2])

    def run(self, sink: MetricsSink, throughput: dict[int, Throughput]) -> str:
        started = last_ckpt = time.monotonic()
        boundaries = [p.start for p in self.phases]
        with StopSignal() as stop:
            while self.step < self.t.max_steps:
                self.beat(f"step {self.step + 1}")
                phase = self.phases[schedule.phase_at(self.step, boundaries)]
                metrics = self.train_step(phase)
                self.step += 1
                meter = throughput[phase.seq_len]
                meter.add(metrics.pop("real_tokens"), metrics.pop("sequences"))
                sink.step(self.step, {k: metrics[k] for k in STEP_RECORD if k in metrics})
                signalled, out_of_time, ckpt_due = self.control(stop, started, last_ckpt)
                # A run that spends its time budget ends as a completed one does: metrics and a final evaluation
                # (which the registry's gate reads), then the checkpoint below and the HF export.
                self.after_step(phase, metrics, meter, sink, final=out_of_time and not signalled)
                if self.step % self.t.checkpoint_every == 0 or ckpt_due or signalled or out_of_time:
                    self.save()
                    last_ckpt = time.monotonic()
                if signalled or out_of_time:
                    return "signal" if signalled else "time_budget"
        return "completed"

    def after_step(self, phase: Phase, metrics: dict[str, float], meter: Throughput, sink: MetricsSink,
                   final: bool = False) -> None:
        last = self.step == self.t.max_steps or final
        metrics.pop("overflow", None)  # per step, in the step log; the metrics carry the running count
        if self.step % self.t.log_every == 0 or last:
            metrics.update(meter.flush(), skipped_micro_batches=float(self.bad.total),
                           overflow_skipped_steps=float(self.overflow_skips))
            self.last_metrics.update(metrics)
            sink.log(self.step, metrics, "train")
        if self.step % self.t.eval_every == 0 or last:
            self.beat(f"the evaluation at step {self.step}")
            ev = evaluate_heldout(self.engine, phase, self.cfg, self.tok, self.env)
            if ev:
                self.last_metrics.update({f"eval_{k}": v for k, v in ev.items()})
                sink.log(self.step, ev, "eval")


def trainer_peer_failure(trainer: Trainer, during: str | None = None) -> Any:
    """Communication failures inside the block become a one-line `PeerLostError` naming the peer, the step and
    the checkpoint the job will resume from."""
    def where() -> str:
        return during or f"step {trainer.step + 1}"

    return distributed.peer_failure(trainer.env, trainer.addresses, where, trainer.t.collective_timeout_s,
                                    lambda: resume_hint(trainer.last_checkpoint))
