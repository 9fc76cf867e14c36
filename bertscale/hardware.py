"""What this machine computes fast: its CPU facts, and `precision: auto`, which resolves here once per process,
with its reason.

bf16 pays only where the hardware computes it: CUDA GPUs with bf16 tensor cores (compute capability 8.0+), and
CPUs with AMX (`amx_bf16`) or AVX-512 BF16 (`avx512_bf16`) instructions, where a bf16 matmul runs 4-6x faster
than fp32. Elsewhere torch emulates bf16 and it runs far slower than fp32 (about 80x on an AVX2-only EPYC), so
`auto` picks fp32 there.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on use: benchmarks read the CPU facts without loading it
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 dot products; either is enough


@dataclass(frozen=True)
class CpuFacts:
    model: str
    cores: int
    flags: frozenset[str]

    @property
    def bf16_flags(self) -> list[str]:
        return sorted(f for f in self.flags if "bf16" in f or f.startswith("amx"))

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in CPU_BF16_FLAGS)

    def describe(self) -> str:
        return f"{self.model}, {self.cores} cores, bf16: {', '.join(self.bf16_flags) or 'none (emulated)'}"


@functools.lru_cache(maxsize=1)
def cpu_facts(cpuinfo: str = "/proc/cpuinfo") -> CpuFacts:
    """CPU model, core count and instruction flags from /proc/cpuinfo (empty flags where it cannot be read)."""
    model, flags = "unknown", frozenset()
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return CpuFacts(model, os.cpu_count() or 1, flags)


@dataclass(frozen=True)
class Precision:
    """A concrete precision (fp32, bf16 or fp16) and why it was chosen."""

    name: str
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"


def resolve_precision(requested: str, device: torch.device | str, cpu: CpuFacts | None = None) -> Precision:
    """`requested` as is when explicit; for `auto`, bf16 where `device` computes it natively, else fp32.
    `cpu` defaults to this machine's facts."""
    import torch

    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return Precision(requested, "set in the config")
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            return Precision("bf16", f"auto: {name} (compute capability {major}.{minor}) has bf16 tensor cores")
        return Precision("fp32", f"auto: {name} (compute capability {major}.{minor}) has no native bf16")
    if device.type == "cpu":
        cpu = cpu or cpu_facts()
        if cpu.native_bf16:
            return Precision("bf16", f"auto: the CPU ({cpu.model}) has {', '.join(cpu.bf16_flags)}: native bf16")
        return Precision("fp32", f"auto: the CPU ({cpu.model}) has neither {' nor '.join(CPU_BF16_FLAGS)}: "
                                 "bf16 would be emulated, far slower than fp32")
    return Precision("fp32", f"auto: no bf16 capability known for device type {device.type!r}")


def resolve_compile(requested: bool | str, device: torch.device | str) -> tuple[bool, str]:
    """Whether to `torch.compile` the model's dense blocks: true/false as set; `auto` compiles on CUDA only.

    On a 2-core CPU the compiled model measured slower than the eager one (0.88x in bf16, README), after about
    a minute of compiling, so CPU runs compile only when asked to.
    """
    import torch

    if isinstance(requested, bool):
        return requested, "set in the config"
    if requested != "auto":
        raise ValueError(f"compile {requested!r}: use auto, true or false")
    if torch.device(device).type == "cuda":
        return True, "auto: CUDA device"
    return False, "auto: CPU (the compiled model measured slower than eager on CPU; compile: true to try)"
