"""Model FLOPs for MFU (model FLOPs utilisation), and the peak FLOP/s to divide them by.

FLOPs count the work a padding-free implementation must do (the same count is used for any implementation, so
MFU compares useful work): a multiply-add is 2 FLOPs, and a training step is 3x the forward pass (backward =
2x forward, as in the PaLM/Chinchilla accounting). Per layer and real token, with hidden H and FFN size I:

- projections Q, K, V, O and the FFN: 2 * (4 H^2 + 2 H I)
- attention scores and the weighted sum: 2 * 2 * H per (query, key) pair of the same sequence, i.e.
  4 H * len for each token of a sequence of length len;

plus the MLM head at masked tokens only, 2 * (H^2 + H V) each (transform + tied decoder), and the pooler + NSP
head per sequence, 2 * (H^2 + 2 H). Embedding lookups, LayerNorm, softmax and the optimizer are not counted.

The peak is the device's dense bf16/fp16 tensor-core figure on known GPUs and a measured matmul rate on CPU
(`measure_peak_flops`): CPUs differ too much (AVX-512 bf16 or not, AMX or not, core count) for a table. A GPU
the table does not know gets no MFU (None, with a warning) rather than a guess: set `train.peak_tflops`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence

import torch

from bertscale.model.bert import BertConfig

log = logging.getLogger(__name__)

# Dense (no sparsity) peak FLOP/s per GPU from NVIDIA's datasheets: bf16/fp16 tensor cores, fp32 = the TF32
# tensor-core figure where there is one (else plain FP32). None: the GPU has no such mode (bf16 before Ampere).
# Matched in order against torch.cuda.get_device_name(), so variants come before the family (H100 PCIe before
# H100); the patterns are whole words, so "A10" cannot match "A100" or "A10G" (whose figures NVIDIA does not
# publish).
GPU_PEAK_FLOPS: list[tuple[str, dict[str, float | None]]] = [
    (r"A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    (r"H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    (r"H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 418e12}),
    (r"H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),  # SXM
    (r"H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),  # SXM
    (r"L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    (r"L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    (r"A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12}),
    (r"V100-PCIE", {"bf16": None, "fp16": 112e12, "fp32": 14e12}),
    (r"V100", {"bf16": None, "fp16": 125e12, "fp32": 15.7e12}),  # SXM2
    (r"T4", {"bf16": None, "fp16": 65e12, "fp32": 8.1e12}),
]


def forward_flops(config: BertConfig, lengths: Sequence[int], num_masked: int) -> float:
    """Forward FLOPs of a batch of sequences with the given real lengths and `num_masked` MLM positions."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    tokens = sum(lengths)
    pairs = sum(n * n for n in lengths)
    per_layer = 2 * (4 * h * h + 2 * h * i) * tokens + 4 * h * pairs
    heads = 2 * (h * h + h * v) * num_masked + 2 * (h * h + 2 * h) * len(lengths)
    return float(config.num_hidden_layers * per_layer + heads)


def training_flops(config: BertConfig, lengths: Sequence[int], num_masked: int) -> float:
    """FLOPs of one forward + backward pass (3x forward)."""
    return 3.0 * forward_flops(config, lengths, num_masked)


def flops_per_token(config: BertConfig, seq_len: int, mask_prob: float = 0.15) -> float:
    """Training FLOPs per real token for full sequences of `seq_len` tokens (for quick MFU estimates)."""
    masked = round(mask_prob * seq_len)
    return training_flops(config, [seq_len], masked) / seq_len


def measure_peak_flops(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """Matmul FLOP/s of this CPU in `dtype` with torch's current thread count: a practical peak for MFU.

    The size grows from 256 up to `n` only while one product stays fast: a CPU without native bf16 runs bf16
    matmuls ~100x slower than fp32, and a fixed 2048^3 product would then take tens of seconds. The whole
    probe is bounded by about `seconds` (plus the one product that crosses the deadline).
    """
    deadline = time.perf_counter() + seconds
    size, best = 256, 0.0
    while True:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up: thread pool start and kernel selection are not part of the rate
        elapsed = 0.0
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            elapsed = time.perf_counter() - start
            best = max(best, 2 * size**3 / elapsed)
            if time.perf_counter() > deadline:
                return best
        # The next size costs 8x this one: only go there if it still fits in the budget.
        if size >= n or time.perf_counter() + 16 * elapsed > deadline:
            return best
        size *= 2


def gpu_peak_flops(name: str, precision: str) -> float | None:
    """The table's dense peak of GPU `name` (as torch reports it) in `precision`; None if unknown."""
    for pattern, peaks in GPU_PEAK_FLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){pattern}(?![A-Za-z0-9])", name):
            return peaks[precision]
    return None


def peak_flops(device: torch.device | str = "cpu", precision: str = "bf16") -> float | None:
    """Peak FLOP/s for MFU: a table for known GPUs, a measurement on CPU; None (MFU n/a) for a GPU or
    precision the table lacks, with a warning naming `train.peak_tflops`.

    `precision` is the training precision: "fp32", "bf16" or "fp16".
    """
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision {precision!r}: use fp32, bf16 or fp16")
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, precision)
        if peak is None:
            log.warning("no %s peak FLOP/s known for GPU %r: MFU is reported as n/a; set train.peak_tflops to "
                        "the device's dense %s TFLOP/s to get it", precision, name, precision)
        return peak
    return measure_peak_flops(torch.float32 if precision == "fp32" else torch.bfloat16)
