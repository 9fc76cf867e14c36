"""Batches for fine-tuning, for every task kind: which examples go together, and the autocast they run under.

Training examples are batched with others of similar length (sorted within shuffled mega-batches), so dynamic
padding pads little; evaluation runs sorted by length and puts predictions back in example order. Matmuls run
under bf16 autocast when the precision is bf16 (weights stay fp32).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int,
                           mega: int | None = None) -> list[list[int]]:
    """Shuffled batches of similar-length examples: shuffle, sort within mega-batches of `mega` batches, split,
    then shuffle the batch order so that length does not follow a schedule. Every index appears exactly once.

    `mega` defaults to 50 batches, but to at most a quarter of the data (transformers' LengthGroupedSampler rule):
    sorting a small training set whole would make every batch one length band and cost accuracy.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if mega is None:
        mega = max(1, min(50, len(order) // (4 * batch_size)))
    span = batch_size * mega
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation order: sorted by length (least padding); predictions are put back in row order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast of the matmuls when `precision` is bf16 (weights stay fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
