"""The launch path's input checks: a user's mistake is one clear error in the calling process, before any
launcher or rank starts (the command line turns it into one line and exit code 2)."""

from __future__ import annotations

import pytest

from bertscale.config import load_config
from bertscale.errors import BertscaleError
from bertscale.train.launch import check_inputs


@pytest.fixture()
def tokenizer_dir(tmp_path):
    from bertscale.config import TokenizerConfig
    from bertscale.tokenizer import save_tokenizer, train_wordpiece

    out = tmp_path / "tok"
    texts = ["the quick brown fox jumps over the lazy dog"] * 20
    save_tokenizer(train_wordpiece(TokenizerConfig(vocab_size=60, min_frequency=1), iter([texts])), out)
    return out


def test_a_missing_tokenizer_is_named(tmp_path):
    cfg = load_config(overrides=[f"workdir={tmp_path}"])
    with pytest.raises(BertscaleError, match=f"no tokenizer at {tmp_path / 'nowhere'}"):
        check_inputs(cfg, data=tmp_path / "data", tokenizer=tmp_path / "nowhere")


def test_missing_data_is_named(tmp_path, tokenizer_dir):
    cfg = load_config(overrides=[f"workdir={tmp_path}"])
    with pytest.raises(BertscaleError, match="manifest.json not found: build the pretraining data first"):
        check_inputs(cfg, data=tmp_path / "nodata", tokenizer=tokenizer_dir)


def test_an_unwritable_output_is_named(tmp_path, tokenizer_dir, monkeypatch):
    import bertscale.data.dataset as dataset

    monkeypatch.setattr(dataset.PretrainingDataset, "__init__", lambda self, *a, **k: None)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = load_config(overrides=[f"workdir={tmp_path}", f"train.output={blocker / 'train'}"])
    with pytest.raises(BertscaleError, match="cannot write to the train output dir"):
        check_inputs(cfg, data=tmp_path, tokenizer=tokenizer_dir)


def test_a_missing_init_from_is_named_unless_the_run_resumes(tmp_path, tokenizer_dir, monkeypatch):
    import bertscale.data.dataset as dataset

    monkeypatch.setattr(dataset.PretrainingDataset, "__init__", lambda self, *a, **k: None)
    cfg = load_config(overrides=[f"workdir={tmp_path}", f"train.init_from={tmp_path / 'gone'}"])
    with pytest.raises(BertscaleError, match="train.init_from=.*gone does not exist"):
        check_inputs(cfg, data=tmp_path, tokenizer=tokenizer_dir)
    # A run that resumes from its own checkpoints ignores init_from.
    ckpts = cfg.stage_dir("train") / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "latest").write_text("step00000010")
    check_inputs(cfg, data=tmp_path, tokenizer=tokenizer_dir)
    # A registry reference is resolved by rank 0 (it needs the tracking server), not here.
    check_inputs(load_config(overrides=[f"workdir={tmp_path / 'w'}", "train.init_from=models:/enc@champion"]),
                 data=tmp_path, tokenizer=tokenizer_dir)
