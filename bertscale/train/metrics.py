"""Training metrics: per-micro-batch statistics summed over ranks, throughput and MFU, and rank 0's metrics sink
(the per-step jsonl that exact-resume checks read, the progress bar, MLflow).

Every rank computes a small STATS vector per micro batch (losses, accuracy counts, tokens, a non-finite flag)
which the loop sums over ranks, so all ranks agree on every number; `step_metrics` turns sums into averages.
MFU counts FLOPs per real (unpadded) token with `bertscale.model.flops` against the peak of the dtype in use.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bertscale import tracking
from bertscale.config import TrainConfig
from bertscale.model.flops import flops_per_token, peak_flops
from bertscale.progress import progress_bar
from bertscale.train.distributed import DistEnv

log = logging.getLogger(__name__)

STEPS_FILE = "steps.jsonl"
# Indices of the per-micro-batch statistics summed over ranks.
STATS = ("nonfinite", "loss", "mlm_loss", "nsp_loss", "mlm_correct", "mlm_count", "nsp_correct", "nsp_count",
         "real_tokens", "sequences")
# Fields of a step's line in steps.jsonl (loss_scale and overflow only with fp16).
STEP_RECORD = ("loss", "mlm_loss", "nsp_loss", "lr", "grad_norm", "loss_scale", "overflow")


def micro_stats(out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """This rank's STATS vector for one micro batch (float64, so token counts stay exact when summed)."""
    loss = out.loss.detach().float()
    finite = bool(torch.isfinite(loss))
    vals = [0.0 if finite else 1.0, loss.item() if finite else 0.0]
    for t in (out.mlm_loss, out.nsp_loss):
        vals.append(t.item() if finite and t is not None else 0.0)
    for t in (out.mlm_correct, out.mlm_count, out.nsp_correct, out.nsp_count):
        vals.append(float(t) if t is not None else 0.0)
    vals += [float((batch["attention_mask"] > 0).sum()), float(batch["input_ids"].shape[0])]
    return torch.tensor(vals, dtype=torch.float64)


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
        self.tracked = self.enabled and tracking.is_active()  # rank 0 inside an MLflow run
        self.bar = None
        if not self.enabled:
            return
        truncate_steps(self.path, start_step)
        self.bar = progress_bar(max_steps, "pretrain", "step", initial=start_step, is_main=env.is_main)

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
        if self.tracked:
            tracking.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def truncate_steps(path: Path, start_step: int) -> None:
    """Drop records of steps after `start_step` (the checkpoint's step, i.e. updates done): a resumed run
    recomputes them (a killed run may have logged steps past its last checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
    path.write_text("".join(line + "\n" for line in keep))
