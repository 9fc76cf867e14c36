"""bench/pretrain.py on a GPU: timing waits for queued kernels, and MFU uses the GPU's peak (no GPU needed)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "pretrain.py"


def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_pretrain", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cuda_steps_are_timed_between_synchronizations(monkeypatch):
    bench = load_bench(monkeypatch)
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Out:
        def __init__(self, x):
            events.append("forward")
            self.loss = model(x).sum()

    seconds = bench.train_step(lambda **kw: Out(kw["x"]), opt, {"x": torch.ones(2, 4)}, bf16=False,
                               device=torch.device("cuda"))
    assert events == ["sync", "forward", "sync"] and seconds >= 0
    events.clear()
    bench.train_step(lambda **kw: Out(kw["x"]), opt, {"x": torch.ones(2, 4)}, bf16=False, device=torch.device("cpu"))
    assert events == ["forward"]


def test_gpu_peak_comes_from_the_table_or_the_flag(monkeypatch):
    bench = load_bench(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    args = argparse.Namespace(device="cuda", peak_tflops=None)
    assert bench.bench_peak("bf16", args) == 989e12
    assert bench.bench_peak("bf16", argparse.Namespace(device="cuda", peak_tflops=500.0)) == 500e12
