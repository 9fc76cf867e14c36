"""Contract tests with Hugging Face transformers: our export loads there with equal logits, and HF checkpoints
(BertModel, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification) load here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bertscale.errors import BertscaleError, InputError
from bertscale.model import BertConfig, BertForPreTraining, BertForSequenceClassification, BertModel
from bertscale.model.hf import export_hf, load_pretrained

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

VOCAB = 101


@pytest.fixture()
def config() -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64)


@pytest.fixture()
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([16, 9, 12])
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (3, 16), generator=g) * mask
    types = (torch.arange(16)[None] >= 6).long() * mask
    return dict(input_ids=ids, token_type_ids=types, attention_mask=mask)


def hf_config(config: BertConfig, **kw):
    fields = config.architecture()
    return transformers.BertConfig(**fields, **kw)


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def test_export_loads_in_transformers_with_equal_logits(tmp_path, config, batch):
    torch.manual_seed(0)
    ours = BertForPreTraining(config).eval()
    with torch.no_grad():  # non-zero biases so that a dropped bias would show
        ours.cls.predictions.bias.normal_()
    export_hf(ours, tmp_path / "hf")
    theirs, info = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    theirs.eval()
    with torch.no_grad():
        ref = theirs(**batch)
        out = ours(**batch)
    valid = batch["attention_mask"].bool()
    assert (ref.prediction_logits[valid] - out.mlm_logits[valid]).abs().max() <= 1e-4
    assert (ref.seq_relationship_logits - out.nsp_logits).abs().max() <= 1e-4
    config_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config_json["model_type"] == "bert" and config_json["architectures"] == ["BertForPreTraining"]
    assert "unpad" not in config_json and "attention" not in config_json


def test_export_import_roundtrip_keeps_weights(tmp_path, config):
    ours = BertForPreTraining(config)
    export_hf(ours, tmp_path)
    loaded, report = load_pretrained(tmp_path, BertForPreTraining)
    assert report.missing == [] and report.unexpected == [] and report.initialised == []
    for (name, a), b in zip(ours.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight


def test_import_hf_pretraining_checkpoint_equal_logits(tmp_path, config, batch):
    torch.manual_seed(0)
    theirs = transformers.BertForPreTraining(hf_config(config)).eval()
    save_hf(theirs, tmp_path)
    ours, report = load_pretrained(tmp_path)  # config read from config.json
    assert report.missing == [] and report.unexpected == []
    ours.eval()
    with torch.no_grad():
        ref = theirs(**batch)
        out = ours(**batch)
    valid = batch["attention_mask"].bool()
    assert (ref.prediction_logits[valid] - out.mlm_logits[valid]).abs().max() <= 1e-4


def test_import_hf_base_model_initialises_heads(tmp_path, config, batch):
    torch.manual_seed(0)
    theirs = transformers.BertModel(hf_config(config)).eval()
    save_hf(theirs, tmp_path)  # keys without the `bert.` prefix, no heads
    ours, report = load_pretrained(tmp_path, BertForPreTraining)
    assert report.initialised == ["cls.predictions", "cls.seq_relationship"]
    assert "cls.predictions.transform.dense.weight" in report.missing
    assert not any(k.startswith("bert.") for k in report.missing)
    base, base_report = load_pretrained(tmp_path, BertModel)
    assert base_report.missing == [] and base_report.unexpected == []
    base.eval()
    with torch.no_grad():
        ref = theirs(**batch)
        seq, pooled = base(**batch)
    valid = batch["attention_mask"].bool()
    assert (ref.last_hidden_state[valid] - seq[valid]).abs().max() <= 1e-4
    assert (ref.pooler_output - pooled).abs().max() <= 1e-4


def test_import_hf_masked_lm_reports_pooler_and_nsp(tmp_path, config):
    save_hf(transformers.BertForMaskedLM(hf_config(config)), tmp_path)
    _, report = load_pretrained(tmp_path, BertForPreTraining)
    assert report.initialised == ["bert.pooler", "cls.seq_relationship"]


def test_import_hf_sequence_classification(tmp_path, config, batch):
    torch.manual_seed(0)
    theirs = transformers.BertForSequenceClassification(hf_config(config, num_labels=3)).eval()
    save_hf(theirs, tmp_path)
    ours, report = load_pretrained(tmp_path, BertForSequenceClassification)
    assert ours.num_labels == 3 and report.missing == []
    ours.eval()
    with torch.no_grad():
        ref = theirs(**batch).logits
        _, logits = ours(**batch)
    assert (ref - logits).abs().max() <= 1e-4
    # A pretraining checkpoint for classification: the classifier is new, the NSP/MLM heads unused.
    export_hf(BertForPreTraining(config), tmp_path / "pre")
    _, report = load_pretrained(tmp_path / "pre", BertForSequenceClassification, num_labels=2)
    assert report.initialised == ["classifier"]
    assert "cls.seq_relationship.weight" in report.unexpected


def test_import_weights_file_with_explicit_config_and_old_names(tmp_path, config):
    ours = BertForPreTraining(config)
    export_hf(ours, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    save_file(renamed, tmp_path / "old.safetensors")
    (tmp_path / "config.json").unlink()
    with pytest.raises(InputError, match="config"):
        load_pretrained(tmp_path / "old.safetensors")
    loaded, report = load_pretrained(tmp_path / "old.safetensors", config=config)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(loaded.bert.embeddings.LayerNorm.weight, ours.bert.embeddings.LayerNorm.weight)


def test_pickle_refused_unless_allowed(tmp_path, config):
    ours = BertForPreTraining(config)
    export_hf(ours, tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(BertscaleError, match="allow_pickle"):
        load_pretrained(tmp_path)
    loaded, report = load_pretrained(tmp_path, allow_pickle=True)
    assert report.missing == []
    assert torch.equal(loaded.cls.seq_relationship.weight, ours.cls.seq_relationship.weight)


def test_shape_mismatch_is_a_clear_error(tmp_path, config):
    export_hf(BertForPreTraining(config), tmp_path)
    wrong = BertConfig(**{**config.to_dict(), "vocab_size": VOCAB + 5})
    with pytest.raises(InputError, match="word_embeddings.*shape"):
        load_pretrained(tmp_path, config=wrong)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="not an HF checkpoint"):
        load_pretrained(tmp_path)
