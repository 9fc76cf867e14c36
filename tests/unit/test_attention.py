"""Variable-length attention against the plain computation: per-segment SDPA, and the padded model with masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bertscale.model import BertConfig, BertForPreTraining, BertModel
from bertscale.model.attention import Segments, choose_backend, flash_available, varlen_attention
from bertscale.model.bert import Padding

VOCAB = 97


def tiny_config(**kw) -> BertConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertConfig(**{**base, **kw})


def reference(qkv: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Each segment on its own through SDPA: what variable-length attention must equal."""
    outs, start = [], 0
    for n in lengths:
        q, k, v = qkv[start:start + n].permute(1, 2, 0, 3)  # 3 x [heads, n, dim]
        outs.append(F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(n, -1))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", [[7], [5, 1, 9, 9, 3, 12, 2], [4, 4, 4]])
@pytest.mark.parametrize("buckets", [1, 2, 4, 16])
def test_bucketed_sdpa_equals_per_segment_attention_with_gradients(lengths, buckets):
    torch.manual_seed(0)
    qkv = torch.randn(sum(lengths), 3, 2, 8, dtype=torch.float64, requires_grad=True)
    segments = Segments.from_lengths(torch.tensor(lengths), max_buckets=buckets)
    assert segments.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert segments.max_seqlen == max(lengths) and len(segments.buckets) == min(buckets, len(lengths))
    assert sorted(segments.restore.tolist()) == list(range(sum(lengths)))
    out = varlen_attention(qkv, segments, 0.0, "sdpa")
    ref = reference(qkv, lengths)
    torch.testing.assert_close(out, ref)
    weights = torch.randn_like(ref)
    (grad,) = torch.autograd.grad((out * weights).sum(), qkv)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), qkv)
    torch.testing.assert_close(grad, ref_grad)


def test_buckets_pad_less_than_one_grid():
    lengths = torch.tensor([128, 32, 40, 100, 64, 127, 33, 90])
    one = Segments.from_lengths(lengths, max_buckets=1)
    four = Segments.from_lengths(lengths, max_buckets=4)
    area = lambda s: sum(b.count * b.length ** 2 for b in s.buckets)  # noqa: E731 - attention work
    assert area(one) == 8 * 128 ** 2
    assert area(four) < 0.65 * area(one)


def test_segments_follow_rows_and_document_numbers():
    mask = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 2, 3, 3, 0, 0]])
    padding = Padding.from_mask(mask)
    assert padding.segments.cu_seqlens.tolist() == [0, 3, 5, 11, 12, 13, 15]


def doc_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two packed rows (documents numbered 1, 2, ...) and padding: the collator's packed format."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1] * 5 + [2] * 7 + [3] * 3 + [0] * 3, [1] * 9 + [2] * 9])
    ids = torch.randint(1, VOCAB, mask.shape, generator=g) * (mask > 0)
    real = (mask > 0).flatten().nonzero().squeeze(1)
    chosen = real[torch.rand(len(real), generator=g) < 0.3].sort().values
    return dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=mask, masked_positions=chosen,
                masked_labels=ids.flatten()[chosen], next_sentence_label=torch.full((2,), -100))


def test_document_attention_unpadded_equals_padded_block_mask_with_gradients():
    batch = doc_batch()
    results = []
    for unpad in (True, False):
        torch.manual_seed(1)
        model = BertForPreTraining(tiny_config(unpad=unpad))
        out = model(**batch)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_u, grads_u), (out_p, grads_p) = results
    torch.testing.assert_close(out_u.mlm_logits, out_p.mlm_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_u.loss, out_p.loss, atol=1e-5, rtol=0)
    for name in grads_u:
        torch.testing.assert_close(grads_u[name], grads_p[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("unpad", [True, False])
def test_a_document_never_sees_its_neighbours(unpad):
    torch.manual_seed(0)
    model = BertModel(tiny_config(unpad=unpad)).eval()
    batch = doc_batch()
    changed = batch["input_ids"].clone()
    changed[0, 5:12] = torch.randint(1, VOCAB, (7,))  # document 2 of row 0
    args = (batch["token_type_ids"], batch["attention_mask"])
    before, _ = model(batch["input_ids"], *args)
    after, _ = model(changed, *args)
    torch.testing.assert_close(after[0, :5], before[0, :5], atol=1e-6, rtol=0)  # document 1
    torch.testing.assert_close(after[0, 12:15], before[0, 12:15], atol=1e-6, rtol=0)  # document 3
    torch.testing.assert_close(after[1], before[1], atol=1e-6, rtol=0)
    assert not torch.allclose(after[0, 5:12], before[0, 5:12])
    # An HF mask (all ones) over the same row lets the documents see each other.
    plain, _ = model(changed, batch["token_type_ids"], (batch["attention_mask"] > 0).long())
    assert not torch.allclose(plain[0, :5], after[0, :5])


def test_flash_is_refused_where_it_cannot_run():
    qkv = torch.zeros(4, 3, 2, 8)
    assert choose_backend("auto", qkv) == "sdpa"
    with pytest.raises(RuntimeError, match="flash-attn package, a CUDA device and bf16/fp16"):
        choose_backend("flash", qkv)
    with pytest.raises(ValueError, match="auto, flash, sdpa"):
        choose_backend("xformers", qkv)


@pytest.mark.skipif(not (torch.cuda.is_available() and flash_available()), reason="needs CUDA and flash-attn")
def test_flash_varlen_equals_per_segment_attention_on_cuda():
    lengths = [5, 1, 90, 33, 128]
    qkv = torch.randn(sum(lengths), 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    segments = Segments.from_lengths(torch.tensor(lengths, device="cuda"))
    out = varlen_attention(qkv, segments, 0.0, "flash")
    torch.testing.assert_close(out.float(), reference(qkv.float(), lengths), atol=2e-2, rtol=2e-2)
