"""BERT pretraining with DeepSpeed ZeRO: config building, the training loop, evaluation and metrics.

`pretrain(cfg)` runs inside every launched process. Each optimizer step runs `grad_accum` micro batches; after
every forward the ranks sum a small vector of statistics (losses, accuracy counts, tokens, a non-finite flag),
so all ranks agree before `backward` whether a micro batch is skipped. A skipped micro batch never reaches
`backward` or `step`, which keeps DeepSpeed's accumulation counters and ZeRO's gradient buffers clean on every
stage; `max_bad_steps` of them in a row abort the run.

Precision: bf16 uses DeepSpeed's own bf16 mode (bf16 weights and activations, fp32 master weights in the
optimizer), which works on CPU with ZeRO 0-3 here; fp16 (dynamic loss scale) needs a GPU. With fp16, DeepSpeed
skips the update of a step whose gradients overflow (and lowers the loss scale): the step still counts, as
DeepSpeed's `global_steps` and Megatron's iterations do, but it is counted as `overflow_skipped_steps` and
marked in the step log, and the loss scale is logged with the metrics. The LR schedule follows applied updates
(DeepSpeed does not step the scheduler on a skipped update).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bertscale import tracking
from bertscale.config import PipelineConfig, TrainConfig
from bertscale.errors import BertscaleError, ConfigError
from bertscale.model.flops import flops_per_token, peak_flops
from bertscale.train import distributed, schedule
from bertscale.train.checkpoint import (
    CheckpointManager,
    CheckpointSaveError,
    StopSignal,
    copy_tokenizer_files,
    export_checkpoint,
)
from bertscale.train.distributed import DistEnv
from bertscale.train.optim import build_optimizer

log = logging.getLogger(__name__)

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
STEPS_FILE = "steps.jsonl"
EXIT_SIGNALLED = 128 + 15  # a signal-stopped run: 128 + SIGTERM, as a shell reports a process killed by it
# Indices of the per-micro-batch statistics summed over ranks.
STATS = ("nonfinite", "loss", "mlm_loss", "nsp_loss", "mlm_correct", "mlm_count", "nsp_correct", "nsp_count",
         "real_tokens", "sequences")
# Fields of a step's line in steps.jsonl (loss_scale and overflow only with fp16).
STEP_RECORD = ("loss", "mlm_loss", "nsp_loss", "lr", "grad_norm", "loss_scale", "overflow")


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


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed config
# ----------------------------------------------------------------------------------------------------------------
def base_ds_config(zero_stage: int, path: str | Path | None = None) -> dict:
    """The base DeepSpeed config of a ZeRO stage: `path`, else configs/deepspeed/zero<stage>.json."""
    p = Path(path) if path else DS_CONFIG_DIR / f"zero{zero_stage}.json"
    if not p.is_file():
        if path:
            raise ConfigError(f"train.ds_config file {p} does not exist")
        return {"zero_optimization": {"stage": zero_stage}, "steps_per_print": 10**9}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {p} is not valid JSON: {e}") from None


def build_ds_config(train: TrainConfig, world_size: int, on_gpu: bool, load_universal: bool = False) -> dict:
    """Our TrainConfig merged over the base config; the fields we own always win. `load_universal` makes
    `load_checkpoint` read a universal checkpoint (an elastic restart)."""
    if train.precision == "fp16" and not on_gpu:
        raise ConfigError("train.precision=fp16 needs a GPU (no fp16 loss scaling on CPU): use bf16 or fp32")
    ds = base_ds_config(train.zero_stage, train.ds_config)
    ds.setdefault("zero_optimization", {})["stage"] = train.zero_stage
    ds.update(
        train_micro_batch_size_per_gpu=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum,
        train_batch_size=train.micro_batch_size * train.grad_accum * world_size,
        gradient_clipping=train.grad_clip,
        # Our optimizer is a client optimizer (torch AdamW / CPU Adam / LAMB), not one DeepSpeed builds.
        zero_allow_untested_optimizer=True,
        zero_force_ds_cpu_optimizer=False,
    )
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    ds["bf16"] = {"enabled": train.precision == "bf16"}
    ds["fp16"] = {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                  "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return ds


# ----------------------------------------------------------------------------------------------------------------
# Data phases
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Phase:
    """One sequence-length phase: its training loader and held-out set."""

    seq_len: int
    start: int
    loader: Any  # bertscale.data.DistributedLoader
    heldout: Any | None  # bertscale.data.PretrainingDataset, or None when too small to split over the ranks
    batches: Iterator[dict] | None = None

    def next_batch(self) -> dict:
        if self.batches is None:
            self.batches = self.loader.forever()
        return next(self.batches)


def make_collator(cfg: PipelineConfig, tok: Any, special: dict[str, int], vocab: int, seed: int) -> Any:
    from bertscale.data import MLMCollator, continuation_lookup

    lookup = continuation_lookup(tok) if cfg.data.whole_word_mask else None
    return MLMCollator(special, vocab, mask_prob=cfg.data.mask_prob, whole_word_mask=cfg.data.whole_word_mask,
                       seed=seed, is_continuation=lookup)


def load_phases(cfg: PipelineConfig, data_dir: Path, tok: Any, env: DistEnv, max_positions: int) -> list[Phase]:
    """Datasets and loaders for every phase in `data.seq_lengths`, checked against the model up front."""
    from bertscale.data import DistributedLoader, PretrainingDataset
    from bertscale.tokenizer import special_ids

    special, vocab = special_ids(tok), tok.get_vocab_size(with_added_tokens=True)
    starts = schedule.phase_boundaries(cfg.train.max_steps, cfg.train.phase_steps, len(cfg.data.seq_lengths))
    phases = []
    for i, (seq_len, start) in enumerate(zip(cfg.data.seq_lengths, starts)):
        train_set = PretrainingDataset(data_dir, seq_len, "train")
        train_set.check_compatible(vocab, max_positions, tokenizer=tok)
        # Distinct masking streams per rank and phase; the loader's state carries them across resumes.
        collator = make_collator(cfg, tok, special, vocab, seed=cfg.train.seed * 1000 + env.rank * 10 + i)
        loader = DistributedLoader(train_set, cfg.train.micro_batch_size, collator, env.rank, env.world_size,
                                   seed=cfg.train.seed + i, drop_last=True)
        heldout = PretrainingDataset(data_dir, seq_len, "heldout")
        if len(heldout) < env.world_size:
            log.warning("held-out split of seq%d has %d instances for %d ranks: evaluation disabled", seq_len,
                        len(heldout), env.world_size)
            heldout = None
        phases.append(Phase(seq_len, start, loader, heldout))
    return phases


# ----------------------------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------------------------
def forward(engine: Any, batch: dict[str, torch.Tensor]) -> Any:
    """The model's PretrainingOutput for one micro batch (a seam the NaN-handling test replaces)."""
    return engine(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                  batch["masked_positions"], batch["masked_labels"], batch["next_sentence_label"])


def micro_stats(out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """This rank's STATS vector for one micro batch (float64, so token counts stay exact when summed)."""
    loss = out.loss.detach().float()
    finite = bool(torch.isfinite(loss))
    vals = [0.0 if finite else 1.0, loss.item() if finite else 0.0]
    for t in (out.mlm_loss, out.nsp_loss):
        vals.append(t.item() if finite and t is not None else 0.0)
    for t in (out.mlm_correct, out.mlm_count, out.nsp_correct, out.nsp_count):
        vals.append(float(t) if t is not None else 0.0)
    vals += [float(batch["attention_mask"].sum()), float(batch["input_ids"].shape[0])]
    return torch.tensor(vals, dtype=torch.float64)


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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def step_metrics(total: torch.Tensor, count: int) -> dict[str, float]:
    """Averages from STATS summed over `count` finite micro batches (all ranks together)."""
    s = dict(zip(STATS, total.tolist()))
    n = max(count, 1)
    return {
        "loss": s["loss"] / n, "mlm_loss": s["mlm_loss"] / n, "nsp_loss": s["nsp_loss"] / n,
        "mlm_acc": s["mlm_correct"] / max(s["mlm_count"], 1),
        "nsp_acc": s["nsp_correct"] / s["nsp_count"] if s["nsp_count"] else float("nan"),
        "real_tokens": s["real_tokens"], "sequences": s["sequences"],
    }


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


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Throughput:
    """Real-token and sequence rates over a logging window, and MFU against the devices' peak."""

    flops_per_token: float
    peak_flops: float | None  # of all devices together
    window_start: float = field(default_factory=time.perf_counter)
    tokens: float = 0.0
    sequences: float = 0.0
    total_tokens: float = 0.0
    total_seconds: float = 0.0

    def add(self, tokens: float, sequences: float) -> None:
        self.tokens += tokens
        self.sequences += sequences

    def flush(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self.window_start, 1e-9)
        tps = self.tokens / dt
        out = {"tokens_per_s": tps, "sequences_per_s": self.sequences / dt}
        if self.peak_flops:
            out["mfu"] = tps * self.flops_per_token / self.peak_flops
        self.total_tokens += self.tokens
        self.total_seconds += dt
        self.window_start, self.tokens, self.sequences = now, 0.0, 0.0
        return out

    def overall(self) -> tuple[float, float | None]:
        tps = self.total_tokens / self.total_seconds if self.total_seconds else 0.0
        return tps, (tps * self.flops_per_token / self.peak_flops if self.peak_flops else None)


def make_throughput(model_cfg: Any, seq_len: int, train: TrainConfig, device: torch.device, world: int
                    ) -> Throughput:
    """MFU bookkeeping: FLOPs per real token from `bertscale.model.flops` (the formula is documented there),
    peak from `train.peak_tflops` or the device's default (a measured probe on CPU)."""
    per_device = train.peak_tflops * 1e12 if train.peak_tflops else peak_flops(device, train.precision)
    return Throughput(float(flops_per_token(model_cfg, seq_len)), per_device * world if per_device else None)


class MetricsSink:
    """Rank 0's outputs: the per-step jsonl (exact-resume checks read it), MLflow, and the progress bar."""

    def __init__(self, out: Path, env: DistEnv, start_step: int, max_steps: int) -> None:
        self.enabled = env.is_main
        self.path = out / STEPS_FILE
        self.mlflow = self.enabled and mlflow_active()
        self.bar = None
        if not self.enabled:
            return
        truncate_steps(self.path, start_step)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=max_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True,
                        mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def step(self, step: int, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        if not self.enabled:
            return
        shown = {k: round(v, 4) for k, v in metrics.items() if k in ("loss", "tokens_per_s", "mlm_acc")}
        if self.bar is not None and prefix == "train":
            self.bar.set_postfix(shown)
        log.info("step %d %s: %s", step, prefix, ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        if self.mlflow:
            tracking.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def mlflow_active() -> bool:
    """True if a flow handed us a run id, or the caller has an MLflow run open (mlflow already imported)."""
    if os.environ.get("BERTSCALE_MLFLOW_RUN_ID"):
        return True
    mlflow = sys.modules.get("mlflow")
    return mlflow is not None and mlflow.active_run() is not None


def truncate_steps(path: Path, start_step: int) -> None:
    """Drop records of steps after `start_step` (the checkpoint's step, i.e. updates done): a resumed run
    recomputes them (a killed run may have logged steps past its last checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
    path.write_text("".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(engine: Any, phase: Phase, cfg: PipelineConfig, tok: Any, env: DistEnv) -> dict[str, float]:
    """MLM loss/accuracy and NSP accuracy on the first `eval_batches` held-out batches (fixed masks)."""
    from bertscale.data import DistributedLoader
    from bertscale.tokenizer import special_ids

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


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
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
                self.after_step(phase, metrics, meter, sink)
                signalled, out_of_time, ckpt_due = self.control(stop, started, last_ckpt)
                if self.step % self.t.checkpoint_every == 0 or ckpt_due or signalled or out_of_time:
                    self.save()
                    last_ckpt = time.monotonic()
                if signalled or out_of_time:
                    return "signal" if signalled else "time_budget"
        return "completed"

    def after_step(self, phase: Phase, metrics: dict[str, float], meter: Throughput, sink: MetricsSink) -> None:
        last = self.step == self.t.max_steps
        metrics.pop("overflow", None)  # per step, in the step log; the metrics carry the running count
        if self.step % self.t.log_every == 0 or last:
            metrics.update(meter.flush(), skipped_micro_batches=float(self.bad.total),
                           overflow_skipped_steps=float(self.overflow_skips))
            self.last_metrics.update(metrics)
            sink.log(self.step, metrics, "train")
        if self.step % self.t.eval_every == 0 or last:
            self.beat(f"the evaluation at step {self.step}")
            ev = evaluate(self.engine, phase, self.cfg, self.tok, self.env)
            if ev:
                self.last_metrics.update({f"eval_{k}": v for k, v in ev.items()})
                sink.log(self.step, ev, "eval")


def reshard_loader_state(state: dict, old_world: int, new_world: int) -> dict:
    """A loader state for `new_world` ranks that continues the epoch where `old_world` ranks stopped.

    Rank r of W reads positions r, r+W, ... of the epoch's permutation, so after p instances per rank the job
    has read the first p*W. With W' ranks each starts at p*W // W' (exact when W' divides p*W, else a few
    instances are read twice). The masking stream restarts from the new ranks' seeds."""
    consumed = int(state["position"]) * old_world
    return {"epoch": int(state["epoch"]), "position": consumed // new_world, "seed": state["seed"],
            "world_size": new_world, "collator": None}


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------
def initialize(model: torch.nn.Module, cfg: PipelineConfig, env: DistEnv, load_universal: bool = False) -> Any:
    """deepspeed.initialize with our client optimizer and a LambdaLR that DeepSpeed steps with the optimizer."""
    import deepspeed

    t = cfg.train
    device = env.device()
    ds_config = build_ds_config(t, env.world_size, device.type == "cuda", load_universal)
    optimizer = build_optimizer(model, t, device)
    lr_fn = partial(schedule.lr_factor, warmup_steps=t.warmup_steps, total_steps=t.max_steps, decay=t.decay,
                    power=t.poly_power)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    return engine


def _quiet_other_ranks(env: DistEnv) -> None:
    if not env.is_main:
        logging.getLogger("bertscale").setLevel(logging.WARNING)
    # DeepSpeed logs every rank's config at INFO; keep its warnings.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def pretrain(cfg: PipelineConfig, data: str | Path | None = None, tokenizer: str | Path | None = None
             ) -> TrainResult:
    """Pretrain on this rank (see the module doc); rank 0 logs, writes metrics and exports `<out>/hf`."""
    from bertscale.model import BertForPreTraining, config_from_pipeline
    from bertscale.tokenizer import load_tokenizer

    env = distributed.read_env()
    # Every rank tears down what it started, in reverse order, on success and on a handled error: the DeepSpeed
    # engine (its hooks and buffers), then the process group, then the launcher variables (see
    # `distributed.process_group`). The watchdog and the signal handlers end with the loop, in `_train`.
    with distributed.process_group(env, cfg.train.collective_timeout_s):
        _quiet_other_ranks(env)
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
        engine = initialize(model, cfg, env, load_universal=universal is not None)
        try:
            torch.manual_seed(cfg.train.seed + 1 + env.rank)  # per-rank dropout streams (restored on resume)
            trainer = Trainer(cfg, env, engine, phases, tok, model_cfg, out, addresses, ckpt)
            with peer_failure(trainer, "resume"):
                trainer.resume(tag, universal)
            run_id = os.environ.get("BERTSCALE_MLFLOW_RUN_ID") if env.is_main and cfg.tracking.enabled else None
            if run_id:
                with tracking.stage_run(cfg, "pretrain", run_id=run_id):
                    return _train(trainer, tok_dir)
            return _train(trainer, tok_dir)
        finally:
            engine.destroy()


def initial_weights(cfg: PipelineConfig, env: DistEnv, model_cfg: Any, out: Path) -> torch.nn.Module:
    """The model loaded from `train.init_from`. Rank 0 resolves it (a registry download or a ZeRO export) into
    `<out>/init`, which the other ranks then read: the output dir is shared by all nodes."""
    from bertscale.finetune.suite import resolve_checkpoint  # the same references fine-tuning accepts
    from bertscale.model import BertForPreTraining
    from bertscale.model.hf import load_pretrained

    ref, staged = cfg.train.init_from, out / "init"
    found: tuple[str | None, str | None] = (None, None)
    if env.is_main:
        if staged.exists():
            shutil.rmtree(staged)
        try:
            found = (str(resolve_checkpoint(ref, staged, cfg)), None)
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


def peer_failure(trainer: Trainer, during: str | None = None) -> Any:
    """Communication failures inside the block become a one-line `PeerLostError` naming the peer, the step and
    the checkpoint the job will resume from."""
    def where() -> str:
        return during or f"step {trainer.step + 1}"

    return distributed.peer_failure(trainer.env, trainer.addresses, where, trainer.t.collective_timeout_s,
                                    partial(resume_hint, trainer))


def resume_hint(trainer: Trainer) -> str:
    """How to recover: which checkpoint a restart resumes from."""
    if trainer.last_checkpoint is None:
        return "no checkpoint was written yet: restart the job on every node to start over"
    return (f"restart the job on every node: it resumes from {trainer.last_checkpoint} "
            f"(step {int(trainer.last_checkpoint.name.removeprefix('step'))})")


def exit_code(result: TrainResult) -> int:
    """The process exit status of a run: 0 when it finished or used up its time budget; 143 (128 + SIGTERM)
    when a signal stopped it, so launchers and schedulers see that it is not done."""
    return EXIT_SIGNALLED if result.stopped == "signal" else 0


def _train(trainer: Trainer, tok_dir: Path) -> TrainResult:
    """The loop, the final checkpoint and (rank 0) the HF export; a signal-stopped run skips the export so it
    exits while the scheduler's grace period lasts."""
    cfg, env, out = trainer.cfg, trainer.env, trainer.out
    device = env.device()
    # The CPU peak probe draws random matrices: keep it off the RNG stream a resumed run has just restored.
    with torch.random.fork_rng(devices=[]):
        throughput = {p.seq_len: make_throughput(trainer.model_cfg, p.seq_len, cfg.train, device, env.world_size)
                      for p in trainer.phases}
    sink = MetricsSink(out, env, trainer.step, cfg.train.max_steps)
    if sink.mlflow:
        tracking.set_tags({"pretrain.world_size": env.world_size, "pretrain.zero_stage": cfg.train.zero_stage,
                           "pretrain.precision": cfg.train.precision, "pretrain.device": device.type})
    if env.world_size > 1:
        trainer.watchdog = distributed.Watchdog(cfg.train.collective_timeout_s, partial(resume_hint, trainer)).start()
    try:
        with peer_failure(trainer):
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
        (out / "train_result.json").write_text(json.dumps({**result.__dict__, "output_dir": str(out),
                                                          "checkpoint": str(result.checkpoint),
                                                          "hf_dir": str(hf_dir)}, indent=2, default=str))
    return result
