"""The cheaper CPU dropout: the drop rate, the scaling, the backward pass and reproducibility from the seed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertscale.model.attention import attend
from bertscale.model.dropout import Dropout, dropout, keep_mask


def test_drop_rate_and_unbiased_scaling():
    torch.manual_seed(0)
    x = torch.ones(1_000_003)
    y = dropout(x, 0.1)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.002
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - 6554 / 65536)))  # p = 0.1 rounded to 1/65536
    assert abs(y.mean().item() - 1.0) < 0.003


def test_backward_uses_the_forward_mask_and_the_seed_reproduces_it():
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(7)
    y = dropout(x, 0.3)
    y.sum().backward()
    assert torch.equal(x.grad != 0, y != 0)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.3), y)
    assert torch.equal(dropout(x, 0.3, training=False), x) and torch.equal(dropout(x, 0.0), x)


def test_module_keeps_nn_dropout_behaviour_in_eval():
    module = Dropout(0.5)
    x = torch.randn(10)
    assert isinstance(module, torch.nn.Dropout) and torch.equal(module.eval()(x), x)


def test_attention_with_dropout_is_the_math_with_that_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    mask = torch.arange(9)[None, None, None, :] < torch.tensor([9, 5])[:, None, None, None]
    torch.manual_seed(3)
    out = attend(q, k, v, mask, 0.2)
    torch.manual_seed(3)
    keep = keep_mask(torch.Size([2, 4, 9, 9]), 0.2, torch.device("cpu"))
    probs = (q @ k.transpose(-2, -1) / 8 ** 0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    expected = (probs * keep / (1 - 13107 / 65536)) @ v
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(attend(q, k, v, mask, 0.0), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
