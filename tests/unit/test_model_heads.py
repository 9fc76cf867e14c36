"""The token classification and question answering heads: the unpadded path (logits computed on real tokens only)
equals the plain padded computation, the losses are the plain cross-entropies, and bad head sizes are errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bertscale.errors import ConfigError
from bertscale.model import BertConfig, BertForQuestionAnswering, BertForTokenClassification


@pytest.fixture()
def config() -> BertConfig:
    return BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32)


@pytest.fixture()
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(12)[None] < torch.tensor([12, 5, 9])[:, None]).long()
    return dict(input_ids=torch.randint(1, 50, (3, 12), generator=g) * mask,
                token_type_ids=(torch.arange(12)[None] >= 4).long() * mask, attention_mask=mask)


def _padded(model: torch.nn.Module) -> torch.nn.Module:
    model.config.unpad = False
    return model


def test_token_classifier_unpadded_equals_padded(config, batch):
    torch.manual_seed(0)
    model = BertForTokenClassification(config, num_labels=4).eval()
    labels = torch.randint(0, 4, (3, 12), generator=torch.Generator().manual_seed(1))
    labels[batch["attention_mask"] == 0] = -100
    labels[1, :3] = -100  # sub-words after the first carry no label
    with torch.no_grad():
        loss, logits = model(**batch, labels=labels)
        ref_loss, ref_logits = _padded(model)(**batch, labels=labels)
    valid = batch["attention_mask"].bool()
    assert (logits[valid] - ref_logits[valid]).abs().max() <= 1e-5
    assert (logits[~valid] == 0).all()
    plain = F.cross_entropy(ref_logits.reshape(-1, 4), labels.reshape(-1), ignore_index=-100)
    assert abs(float(loss) - float(plain)) <= 1e-5 and abs(float(ref_loss) - float(plain)) <= 1e-5


def test_qa_unpadded_equals_padded_and_loss_is_the_mean_of_start_and_end(config, batch):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(config).eval()
    starts, ends = torch.tensor([3, 0, 7]), torch.tensor([4, 0, 8])
    with torch.no_grad():
        _, start_logits, end_logits = model(**batch)
        loss, ref_start, ref_end = _padded(model)(**batch, start_positions=starts, end_positions=ends)
    valid = batch["attention_mask"].bool()
    assert (start_logits[valid] - ref_start[valid]).abs().max() <= 1e-5
    assert (end_logits[valid] - ref_end[valid]).abs().max() <= 1e-5
    plain = (F.cross_entropy(ref_start, starts) + F.cross_entropy(ref_end, ends)) / 2
    assert abs(float(loss) - float(plain)) <= 1e-5
    # A position past the sequence is clamped to its length and ignored, as transformers does.
    with torch.no_grad():
        outside, _, _ = model(**batch, start_positions=torch.tensor([3, 0, 40]), end_positions=torch.tensor([4, 0, 40]))
    kept = (F.cross_entropy(ref_start[:2], starts[:2]) + F.cross_entropy(ref_end[:2], ends[:2])) / 2
    assert abs(float(outside) - float(kept)) <= 1e-5


def test_head_sizes_are_checked(config):
    with pytest.raises(ConfigError, match="num_labels=1"):
        BertForTokenClassification(config, num_labels=1)
    model = BertForTokenClassification(config, num_labels=3)
    assert model.bert.pooler is None and model.classifier.out_features == 3
    assert BertForQuestionAnswering(config).qa_outputs.out_features == 2
