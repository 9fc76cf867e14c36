"""HF import edge cases that need no transformers: DDP prefixes, foreign models, damaged files, another task's
classifier."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bertscale.errors import InputError
from bertscale.model import BertConfig, BertForPreTraining, BertForSequenceClassification
from bertscale.model.hf import export_hf, load_pretrained


@pytest.fixture()
def config() -> BertConfig:
    return BertConfig(vocab_size=61, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32)


def rewrite(path, rename=lambda k: k, **config_fields) -> None:
    """Rename the keys of an exported checkpoint and/or change fields of its config.json."""
    state = load_file(path / "model.safetensors")
    save_file({rename(k): v for k, v in state.items()}, path / "model.safetensors")
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, **config_fields}))


def test_ddp_module_prefix_is_stripped(tmp_path, config):
    ours = BertForPreTraining(config)
    export_hf(ours, tmp_path)
    rewrite(tmp_path, lambda k: "module." + k)
    loaded, report = load_pretrained(tmp_path)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(loaded.bert.encoder.layer[0].output.dense.weight, ours.bert.encoder.layer[0].output.dense.weight)


def test_keys_of_another_model_are_an_error_not_a_fresh_model(tmp_path, config):
    export_hf(BertForPreTraining(config), tmp_path)
    rewrite(tmp_path, lambda k: k.replace("bert.", "roberta.", 1))
    with pytest.raises(InputError, match="none of its .* weights is a BERT embedding or encoder weight.*roberta"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("fields, message", [
    ({"model_type": "roberta"}, "model_type is 'roberta'"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type is 'relative_key'"),
])
def test_non_bert_configs_are_refused(tmp_path, config, fields, message):
    export_hf(BertForPreTraining(config), tmp_path)
    rewrite(tmp_path, **fields)
    with pytest.raises(InputError, match=message):
        load_pretrained(tmp_path)


def test_a_damaged_safetensors_file_is_an_input_error_naming_it(tmp_path, config):
    export_hf(BertForPreTraining(config), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(InputError, match=f"cannot read weights file {weights}"):
        load_pretrained(tmp_path)


def test_a_classifier_for_another_number_of_labels_is_reinitialised(tmp_path, config, caplog):
    mnli = BertForSequenceClassification(config, num_labels=3)
    export_hf(mnli, tmp_path)
    with caplog.at_level("WARNING"):
        rte, report = load_pretrained(tmp_path, BertForSequenceClassification, num_labels=2)
    assert rte.num_labels == 2 and rte.classifier.weight.shape == (2, config.hidden_size)
    assert report.mismatched == ["classifier.bias", "classifier.weight"]
    assert report.initialised == ["classifier"] and "another shape" in report.summary()
    assert "classifier.weight has shape (3, 16)" in caplog.text
    assert torch.equal(rte.bert.pooler.dense.weight, mnli.bert.pooler.dense.weight)


def test_an_encoder_of_another_shape_is_still_an_error(tmp_path, config):
    export_hf(BertForSequenceClassification(config, num_labels=3), tmp_path)
    wider = BertConfig(**{**config.to_dict(), "intermediate_size": 48})
    with pytest.raises(InputError, match=r"intermediate\.dense\.\w+ has shape"):
        load_pretrained(tmp_path, BertForSequenceClassification, config=wider, num_labels=2)
