"""Fine-tuning through a DeepSpeed engine (ZeRO stage 1, one CPU process, gloo): the same data, seed and
hyper-parameters as the plain torch loop give the same training curve and the same dev accuracy."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from bertscale.config import CustomTaskConfig, TokenizerConfig
from bertscale.finetune import finetune_task
from bertscale.finetune.tasks import Hparams
from bertscale.model import BertConfig, BertForPreTraining, BertForSequenceClassification
from bertscale.model.hf import export_hf, load_pretrained
from bertscale.tokenizer import save_tokenizer, train_wordpiece


@pytest.fixture()
def keyword_task(tmp_path: Path) -> tuple[CustomTaskConfig, Path]:
    torch.set_num_threads(1)
    rng = random.Random(0)
    rows = [(f"{' '.join(rng.choices(['a', 'b', 'c', 'd'], k=5))} {'yes' if i % 2 else 'no'}", i % 2)
            for i in range(96)]
    data = tmp_path / "task.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    ckpt = tmp_path / "ckpt"
    vocab = save_tokenizer(train_wordpiece(TokenizerConfig(vocab_size=60, min_frequency=1),
                                           iter([[t for t, _ in rows]])), ckpt).vocab_size
    torch.manual_seed(0)
    export_hf(BertForPreTraining(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64,
                                            max_position_embeddings=32)), ckpt)
    return CustomTaskConfig(name="yesno", train=str(data), dev=str(data), text_a="text"), ckpt


def test_deepspeed_zero1_matches_the_plain_loop(keyword_task: tuple[CustomTaskConfig, Path], tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    task, ckpt = keyword_task
    hp = Hparams(lr=3e-3, batch_size=16, epochs=3, max_length=16)
    common = dict(custom_tasks=[task], precision="fp32", predict_test=False)
    plain = finetune_task("yesno", ckpt, ckpt, hp, seed=0, **common)
    ds = finetune_task("yesno", ckpt, ckpt, hp, seed=0, output_dir=tmp_path / "ds", zero_stage=1, **common)
    assert [h.step for h in ds.history] == [6, 12, 18]
    assert [h.train_loss for h in ds.history] == pytest.approx([h.train_loss for h in plain.history], rel=1e-3)
    assert [h.lr for h in ds.history] == pytest.approx([h.lr for h in plain.history])
    assert ds.metrics["yesno"]["accuracy"] == plain.metrics["yesno"]["accuracy"] > 0.7  # majority: 0.5
    model, report = load_pretrained(ds.model_dir, BertForSequenceClassification)  # saved like any other run
    assert report.missing == [] and next(model.parameters()).dtype == torch.float32
