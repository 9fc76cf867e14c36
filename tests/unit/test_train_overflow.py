"""fp16 overflow bookkeeping with a stub engine (fp16 needs a GPU, which DeepSpeed's real engine would need too):
an update DeepSpeed skips is counted, marked in the step log, logged with the loss scale, and survives a resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from bertscale.config import load_config
from bertscale.model import PretrainingOutput
from bertscale.train import deepspeed_engine
from bertscale.train import loop as loop_mod
from bertscale.train.distributed import DistEnv
from bertscale.train.loop import Trainer
from bertscale.train.metrics import MetricsSink, Throughput
from bertscale.train.phases import Phase


class StubEngine:
    """DeepSpeed's engine as the loop sees it: the update of optimizer steps in `overflow_at` (1-based) is
    skipped, which halves the loss scale as DeepSpeed's dynamic scaler does."""

    device = torch.device("cpu")

    def __init__(self, grad_accum: int, overflow_at: set[int]) -> None:
        self.grad_accum, self.overflow_at = grad_accum, overflow_at
        self.micro = 0
        self.skipped_steps = 0
        self.optimizer = SimpleNamespace(loss_scale=65536.0)

    def fp16_enabled(self) -> bool:
        return True

    def get_lr(self) -> list[float]:
        return [1e-4]

    def backward(self, loss: torch.Tensor) -> None:
        pass

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.grad_accum == 0 and self.micro // self.grad_accum in self.overflow_at:
            self.skipped_steps += 1
            self.optimizer.loss_scale /= 2

    def get_global_grad_norm(self) -> float:
        return 1.0


class Loader:
    def forever(self):
        while True:
            yield {"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8)}

    def state_dict(self) -> dict:
        return {}


def fake_forward(eng, batch) -> PretrainingOutput:
    one = torch.tensor(1.0)
    return PretrainingOutput(one, one, one, torch.zeros(1), torch.zeros(1), one, one, one, one)


class FakeCheckpoints:
    """Keeps what `save` was given and hands it back to `load`."""

    root = None

    def save(self, engine, step, state, rank_state, model_config):
        self.state = {**state, "step": step}
        return loop_mod.Path(f"/nonexistent/step{step:08d}")

    def load(self, engine, tag):
        return self.state, {"loaders": [{}]}


def test_overflow_skipped_updates_are_counted_logged_and_resumed(tmp_path, monkeypatch):
    monkeypatch.setattr(loop_mod, "forward", fake_forward)
    cfg = load_config(overrides=["tracking.enabled=false", "train.grad_accum=2", "train.max_steps=4",
                                 "train.log_every=2", "train.eval_every=1000", "train.checkpoint_every=1000",
                                 "train.zero_stage=2"])
    eng = StubEngine(grad_accum=2, overflow_at={1, 2})
    ckpt = FakeCheckpoints()
    phase = Phase(8, 0, Loader(), None)
    trainer = Trainer(cfg, DistEnv(), eng, [phase], None, SimpleNamespace(to_dict=dict), tmp_path, ckpt=ckpt)
    sink = MetricsSink(tmp_path, DistEnv(), 0, 4)
    assert trainer.run(sink, {8: Throughput(1.0, None)}) == "completed"
    sink.close()
    records = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r.get("overflow") for r in records] == [1.0, 1.0, None, None]
    assert [r["loss_scale"] for r in records] == [32768.0, 16384.0, 16384.0, 16384.0]
    assert trainer.overflow_skips == 2
    assert trainer.last_metrics["overflow_skipped_steps"] == 2 and trainer.last_metrics["loss_scale"] == 16384.0
    assert "overflow" not in trainer.last_metrics  # a per-step mark, not a metric
    trainer.save(final=True)
    assert ckpt.state["overflow_skipped_steps"] == 2
    resumed = Trainer(cfg, DistEnv(), StubEngine(2, set()), [Phase(8, 0, SimpleNamespace(
        load_state_dict=lambda s: None), None)], None, None, tmp_path, ckpt=ckpt)
    ckpt.root = tmp_path
    resumed.resume("step00000004")
    assert resumed.step == 4 and resumed.overflow_skips == 2


def test_without_fp16_no_loss_scale_is_logged(monkeypatch):
    eng = StubEngine(1, set())
    monkeypatch.setattr(eng, "fp16_enabled", lambda: False)
    assert deepspeed_engine.loss_scale(eng) is None
