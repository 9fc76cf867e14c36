"""Fine-tuning a plain Hugging Face encoder dir, the way public BERT checkpoints ship: `transformers.BertModel`
weights (no `bert.` prefix, no heads) in safetensors with only vocab.txt + tokenizer_config.json beside them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from bertscale.config import CustomTaskConfig, TokenizerConfig
from bertscale.errors import ConfigError
from bertscale.finetune import finetune_task
from bertscale.finetune.tasks import Hparams
from bertscale.model import BertForSequenceClassification
from bertscale.model.hf import load_pretrained
from bertscale.tokenizer import save_tokenizer, train_wordpiece


@pytest.fixture()
def encoder_dir(tmp_path: Path) -> tuple[Path, CustomTaskConfig]:
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    rng = random.Random(0)
    rows = [(f"{' '.join(rng.choices(['One', 'two', 'Three'], k=4))} {'Good' if i % 2 else 'Bad'}", i % 2)
            for i in range(160)]
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"sentence": t, "y": y}) + "\n" for t, y in rows))
    full = tmp_path / "full"
    vocab = save_tokenizer(train_wordpiece(TokenizerConfig(vocab_size=80, min_frequency=1),
                                           iter([[t for t, _ in rows]])), full).vocab_size
    out = tmp_path / "encoder"
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(out, safe_serialization=True)
    (out / "vocab.txt").write_bytes((full / "vocab.txt").read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    task = CustomTaskConfig(name="goodbad", train=str(data), dev=str(data), text_a="sentence", label="y")
    return out, task


def test_headless_encoder_with_vocab_txt_fine_tunes(encoder_dir: tuple[Path, CustomTaskConfig],
                                                    tmp_path: Path) -> None:
    ckpt, task = encoder_dir
    assert not (ckpt / "tokenizer.json").exists()
    result = finetune_task("goodbad", ckpt, ckpt, Hparams(lr=3e-3, batch_size=16, epochs=5, max_length=16), seed=0,
                           custom_tasks=[task], output_dir=tmp_path / "out", precision="fp32")
    assert result.metrics["goodbad"]["accuracy"] > 0.7  # majority: 0.5
    model, report = load_pretrained(result.model_dir, BertForSequenceClassification)
    assert report.missing == [] and model.num_labels == 2  # the trained head was saved with the encoder
    assert (Path(result.model_dir) / "vocab.txt").is_file()


def test_vocab_txt_of_another_size_is_refused(encoder_dir: tuple[Path, CustomTaskConfig], tmp_path: Path) -> None:
    ckpt, task = encoder_dir
    other = tmp_path / "other"
    other.mkdir()
    (other / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    with pytest.raises(ConfigError, match=rf"tokenizer {other} has 7 tokens but checkpoint {ckpt} has vocab_size="):
        finetune_task("goodbad", ckpt, other, Hparams(epochs=1), custom_tasks=[task])
