"""Contract tests for the token classification and question answering heads with Hugging Face transformers: our
exports load in `AutoModelForTokenClassification` / `AutoModelForQuestionAnswering` with no missing keys, equal
logits, equal losses and the real tag names, and HF checkpoints of both kinds load here with their heads."""

from __future__ import annotations

import json

import pytest
import torch

from bertscale.config import CustomTaskConfig
from bertscale.finetune.kinds import TokenKind
from bertscale.finetune.tasks import get_task
from bertscale.model import BertConfig, BertForPreTraining, BertForQuestionAnswering, BertForTokenClassification
from bertscale.model.hf import export_hf, load_pretrained

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

VOCAB = 101
TAGS = ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]


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


def _randomise_heads(model: torch.nn.Module) -> None:
    with torch.no_grad():  # non-zero biases, so that a dropped bias would show
        for name, p in model.named_parameters():
            if not name.startswith("bert."):
                p.normal_()


def test_token_classifier_export_loads_in_transformers_with_equal_logits_and_loss(tmp_path, config, batch):
    torch.manual_seed(0)
    ours = BertForTokenClassification(config, num_labels=len(TAGS)).eval()
    _randomise_heads(ours)
    export_hf(ours, tmp_path, labels=TAGS)
    theirs, info = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert type(theirs).__name__ == "BertForTokenClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert theirs.config.id2label == dict(enumerate(TAGS)) and theirs.config.label2id["I-PER"] == 4
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["architectures"] == ["BertForTokenClassification"]
    labels = torch.randint(0, len(TAGS), batch["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    labels[batch["attention_mask"] == 0] = -100
    labels[:, 0] = -100
    theirs.eval()
    with torch.no_grad():
        ref = theirs(**batch, labels=labels)
        loss, logits = ours(**batch, labels=labels)
    valid = batch["attention_mask"].bool()
    assert (ref.logits[valid] - logits[valid]).abs().max() <= 1e-4
    assert abs(float(ref.loss) - float(loss)) <= 1e-4


def test_qa_export_loads_in_transformers_with_equal_logits_and_loss(tmp_path, config, batch):
    torch.manual_seed(0)
    ours = BertForQuestionAnswering(config).eval()
    _randomise_heads(ours)
    export_hf(ours, tmp_path)
    theirs, info = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path, output_loading_info=True)
    assert type(theirs).__name__ == "BertForQuestionAnswering"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # Answers inside the sequences, at [CLS] (no answer), and one past the end (ignored, as HF does).
    starts, ends = torch.tensor([3, 0, 40]), torch.tensor([5, 0, 41])
    # The padded path, where padding positions take part in the softmax as in HF.
    ours.config.unpad = False
    theirs.eval()
    with torch.no_grad():
        ref = theirs(**batch, start_positions=starts, end_positions=ends)
        loss, start_logits, end_logits = ours(**batch, start_positions=starts, end_positions=ends)
        ours.config.unpad = True
        _, start_unpadded, end_unpadded = ours(**batch)
    valid = batch["attention_mask"].bool()
    assert (ref.start_logits - start_logits).abs().max() <= 1e-4
    assert (ref.end_logits - end_logits).abs().max() <= 1e-4
    assert abs(float(ref.loss) - float(loss)) <= 1e-4
    assert (ref.start_logits[valid] - start_unpadded[valid]).abs().max() <= 1e-4
    assert (ref.end_logits[valid] - end_unpadded[valid]).abs().max() <= 1e-4


def test_hf_token_classification_checkpoint_loads_with_its_head(tmp_path, config, batch):
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(**config.architecture(), num_labels=len(TAGS),
                                        id2label=dict(enumerate(TAGS)), label2id={t: i for i, t in enumerate(TAGS)})
    theirs = transformers.BertForTokenClassification(hf_config).eval()
    _randomise_heads(theirs)
    theirs.save_pretrained(tmp_path)
    ours, report = load_pretrained(tmp_path, BertForTokenClassification)
    assert ours.num_labels == len(TAGS) and report.missing == [] and report.unexpected == []
    ours.eval()
    with torch.no_grad():
        ref = theirs(**batch).logits
        _, logits = ours(**batch)
    valid = batch["attention_mask"].bool()
    assert (ref[valid] - logits[valid]).abs().max() <= 1e-4

    # Fine-tuning it on a task whose tags come in another order: the classifier's rows follow the tag names.
    task_tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    data = tmp_path / "tags.conll"
    data.write_text("x B-PER\ny I-PER\nz B-LOC\nw I-LOC\nv O\n")
    spec = get_task("ner", [CustomTaskConfig(name="ner", train=str(data), kind="token_classification",
                                             labels=task_tags)])
    aligned, _ = TokenKind().load_model(spec, tmp_path, allow_pickle=False)
    aligned.eval()
    with torch.no_grad():
        _, reordered = aligned(**batch)
    order = [TAGS.index(t) for t in task_tags]
    assert (ref[valid][:, order] - reordered[valid]).abs().max() <= 1e-4


def test_hf_qa_checkpoint_loads_with_its_head(tmp_path, config, batch):
    torch.manual_seed(0)
    theirs = transformers.BertForQuestionAnswering(transformers.BertConfig(**config.architecture())).eval()
    _randomise_heads(theirs)
    theirs.save_pretrained(tmp_path)
    ours, report = load_pretrained(tmp_path, BertForQuestionAnswering)
    assert report.missing == [] and report.unexpected == []
    ours.eval()
    with torch.no_grad():
        ref = theirs(**batch)
        _, start_logits, end_logits = ours(**batch)
    valid = batch["attention_mask"].bool()
    assert (ref.start_logits[valid] - start_logits[valid]).abs().max() <= 1e-4
    assert (ref.end_logits[valid] - end_logits[valid]).abs().max() <= 1e-4


def test_pretraining_checkpoint_gets_fresh_heads(tmp_path, config):
    export_hf(BertForPreTraining(config), tmp_path)
    _, report = load_pretrained(tmp_path, BertForTokenClassification, num_labels=3)
    assert report.initialised == ["classifier"]
    assert "bert.pooler.dense.weight" in report.unexpected
    _, report = load_pretrained(tmp_path, BertForQuestionAnswering)
    assert report.initialised == ["qa_outputs"]
