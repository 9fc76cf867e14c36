"""`bertscale export` on a tiny checkpoint, and `bertscale pretrain --launcher none`'s exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bertscale.cli import main
from bertscale.model import BertConfig, BertForPreTraining
from bertscale.model.hf import load_pretrained
from bertscale.train.checkpoint import MODEL_CONFIG, tag_for
from bertscale.train.run import TrainResult


def stage0_checkpoint(root: Path, step: int = 3) -> BertForPreTraining:
    """A ZeRO-0 checkpoint as the trainer writes it: the module's state, our bert_config.json, `latest`."""
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    model = BertForPreTraining(config)
    tag_dir = root / tag_for(step)
    tag_dir.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag_dir / "mp_rank_00_model_states.pt")
    (tag_dir / MODEL_CONFIG).write_text(json.dumps(config.to_dict()))
    (root / "latest").write_text(tag_for(step))
    return model


def test_export_writes_an_hf_dir_from_a_checkpoint(tmp_path, capsys):
    model = stage0_checkpoint(tmp_path / "train" / "checkpoints")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("[PAD]\n")
    assert main(["export", str(tmp_path / "train"), "-o", str(tmp_path / "hf"), "--tokenizer",
                 str(tmp_path / "tok")]) == 0
    assert "exported" in capsys.readouterr().out
    loaded, report = load_pretrained(tmp_path / "hf")
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(loaded.bert.encoder.layer[0].attention.self.query.weight,
                       model.bert.encoder.layer[0].attention.self.query.weight)
    assert (tmp_path / "hf" / "vocab.txt").is_file()


@pytest.mark.parametrize("argv, message", [
    (["export", "{tmp}/nothing", "-o", "{tmp}/hf"], "is not a bertscale checkpoint"),
    (["export", "{tmp}/ckpt", "-o", "{tmp}/hf", "--tokenizer", "{tmp}/no-tok"], "no-tok does not exist"),
    (["export", "{tmp}/ckpt", "-o", "{tmp}/file/hf"], "cannot write the export"),
])
def test_export_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    stage0_checkpoint(tmp_path / "ckpt")
    (tmp_path / "file").write_text("a file, not a directory")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_export_help_and_missing_output(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0 and "CHECKPOINT_DIR" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["export", "somewhere"])
    assert e.value.code == 2


@pytest.mark.parametrize("stopped, code", [("signal", 143), ("completed", 0), ("time_budget", 0)])
def test_pretrain_without_launcher_exits_like_a_rank(tmp_path, monkeypatch, stopped, code):
    """Consistent with `python -m bertscale.train`: a signal-stopped run is not done (128 + SIGTERM)."""
    result = TrainResult(tmp_path, 3, {}, None, None, 0.0, None, stopped=stopped)
    monkeypatch.setattr("bertscale.train.pretrain", lambda cfg, data=None, tokenizer=None: result)
    assert main(["pretrain", "--launcher", "none", "--workdir", str(tmp_path), "--no-tracking"]) == code
