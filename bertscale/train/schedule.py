"""Learning-rate schedule and sequence-length phases, as pure functions of the optimizer step.

The schedule is BERT's: linear warmup from lr/warmup to the peak, then linear (or polynomial) decay to zero at
the last step, one curve over all phases (the 128 -> 512 switch does not restart it). Step numbers count
optimizer steps from 0; `lr_factor(s)` multiplies the peak lr for the update made at step s. `build_scheduler`
wraps it as the torch schedule that pretraining and fine-tuning both step.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import torch

Decay = Literal["linear", "polynomial", "constant"]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """(step + 1) / warmup during warmup, so the first update already moves the weights; 1.0 after it."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def decay_factor(step: int, warmup_steps: int, total_steps: int, decay: Decay = "linear", power: float = 1.0) -> float:
    """1.0 at the end of warmup falling to 0.0 at `total_steps` (polynomial with `power`; linear is power 1)."""
    if decay == "constant" or step < warmup_steps:
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    remaining = min(max(total_steps - step, 0), span) / span
    return remaining if decay == "linear" else remaining**power


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: Decay = "linear", power: float = 1.0) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (what `LambdaLR` calls)."""
    return warmup_factor(step, warmup_steps) * decay_factor(step, warmup_steps, total_steps, decay, power)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, decay: Decay = "linear",
                    power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a torch schedule on `optimizer` (pretraining and fine-tuning; DeepSpeed steps it with the
    optimizer when it drives the update)."""
    factor = partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, decay=decay, power=power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def phase_boundaries(max_steps: int, phase_steps: Sequence[int] | None, num_phases: int) -> list[int]:
    """First step of each phase; without `phase_steps` every step is in the first phase."""
    if phase_steps is None:
        return [0] + [max_steps] * (num_phases - 1)
    starts, acc = [], 0
    for n in phase_steps:
        starts.append(acc)
        acc += n
    return starts


def phase_at(step: int, boundaries: Sequence[int]) -> int:
    """Index of the phase that optimizer step `step` belongs to (the last phase whose start is <= step)."""
    phase = 0
    for i, start in enumerate(boundaries):
        if step >= start:
            phase = i
    return phase
