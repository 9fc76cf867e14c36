"""Fine-tuning through a DeepSpeed engine (ZeRO stage 1, one CPU process, gloo): the same data, seed and
hyper-parameters as the plain torch loop give the same training curve and the same dev accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_keyword_task

from bertscale.config import CustomTaskConfig
from bertscale.finetune import finetune_task
from bertscale.finetune.tasks import Hparams
from bertscale.model import BertForSequenceClassification
from bertscale.model.hf import load_pretrained


@pytest.fixture()
def keyword_task(tmp_path: Path) -> tuple[CustomTaskConfig, Path]:
    return make_keyword_task(tmp_path, ['a', 'b', 'c', 'd'], k=5, rows=96)


def test_deepspeed_zero1_matches_the_plain_loop(keyword_task: tuple[CustomTaskConfig, Path], tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    task, ckpt = keyword_task
    hp = Hparams(lr=3e-3, batch_size=16, epochs=6, max_length=16)  # learns from the 4th epoch
    common = dict(custom_tasks=[task], precision="fp32", predict_test=False)
    plain = finetune_task("yesno", ckpt, ckpt, hp, seed=0, **common)
    ds = finetune_task("yesno", ckpt, ckpt, hp, seed=0, output_dir=tmp_path / "ds", zero_stage=1, **common)
    assert [h.step for h in ds.history] == [6, 12, 18, 24, 30, 36]
    assert [h.train_loss for h in ds.history] == pytest.approx([h.train_loss for h in plain.history], rel=1e-3)
    assert [h.lr for h in ds.history] == pytest.approx([h.lr for h in plain.history])
    assert ds.metrics["yesno"]["accuracy"] == plain.metrics["yesno"]["accuracy"] > 0.7  # majority: 0.5
    model, report = load_pretrained(ds.model_dir, BertForSequenceClassification)  # saved like any other run
    assert report.missing == [] and next(model.parameters()).dtype == torch.float32
