"""Our BERT: names, init, tying, and each speed trick against the plain computation."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from bertscale.config import PipelineConfig
from bertscale.errors import ConfigError
from bertscale.model import (
    SIZES,
    BertConfig,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
    config_from_pipeline,
    num_parameters,
)
from bertscale.model.flops import flops_per_token, forward_flops, measure_peak_flops, training_flops

VOCAB = 97


def tiny_config(**kw) -> BertConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertConfig(**{**base, **kw})


def make_batch(lengths: list[int], seed: int = 0, mask_prob: float = 0.3) -> dict[str, torch.Tensor]:
    """A padded pretraining batch in the collator's format (masked positions at real tokens only)."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, VOCAB, (b, t), generator=g) * mask
    types = ((torch.arange(t)[None] >= torch.tensor(lengths)[:, None] // 2) & mask.bool()).long()
    real = mask.flatten().nonzero().squeeze(1)
    chosen = real[torch.rand(len(real), generator=g) < mask_prob].sort().values
    return dict(input_ids=ids, token_type_ids=types, attention_mask=mask, masked_positions=chosen,
                masked_labels=ids.flatten()[chosen], next_sentence_label=torch.randint(0, 2, (b,), generator=g))


def test_named_sizes_and_overrides():
    base = BertConfig.from_name("base", vocab_size=30522)
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads, base.intermediate_size) == (
        12, 768, 12, 3072)
    assert set(SIZES) == {"tiny", "mini", "small", "medium", "base", "large"}
    assert BertConfig.from_name("mini", hidden_size=512).hidden_size == 512
    with pytest.raises(ConfigError, match="unknown model size"):
        BertConfig.from_name("huge")
    with pytest.raises(ConfigError, match="divisible"):
        BertConfig(hidden_size=100, num_attention_heads=3)


def test_config_from_pipeline_applies_overrides_and_checks_vocab():
    cfg = PipelineConfig.model_validate({"model": {"size": "mini", "num_hidden_layers": 2, "hidden_dropout_prob": 0}})
    config = config_from_pipeline(cfg, vocab_size=5000)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (2, 256, 5000)
    assert config.hidden_dropout_prob == 0
    cfg = PipelineConfig.model_validate({"model": {"vocab_size": 4000}})
    with pytest.raises(ConfigError, match="tokenizer"):
        config_from_pipeline(cfg, vocab_size=5000)


def test_parameter_names_match_transformers_layout():
    names = set(BertForPreTraining(tiny_config()).state_dict())
    for expected in ["bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight",
                     "bert.encoder.layer.1.attention.self.query.weight", "bert.encoder.layer.0.attention.output.dense.bias",
                     "bert.encoder.layer.0.intermediate.dense.weight", "bert.encoder.layer.0.output.LayerNorm.bias",
                     "bert.pooler.dense.weight", "cls.predictions.transform.dense.weight", "cls.predictions.bias",
                     "cls.predictions.decoder.weight", "cls.seq_relationship.weight"]:
        assert expected in names


def test_bert_base_parameter_count():
    # BERT-base with the uncased vocab has 110M parameters (decoder tied to the embeddings).
    model = BertForPreTraining(BertConfig.from_name("base"))
    assert 109_000_000 < num_parameters(model) < 111_000_000


def test_init_follows_bert():
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config(hidden_size=256, intermediate_size=512, initializer_range=0.02))
    w = model.bert.encoder.layer[0].intermediate.dense.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.all(model.bert.encoder.layer[0].intermediate.dense.bias == 0)
    assert torch.all(model.bert.embeddings.word_embeddings.weight[0] == 0)  # the [PAD] row
    assert torch.all(model.bert.embeddings.LayerNorm.weight == 1)
    assert torch.all(model.cls.predictions.bias == 0)


def test_decoder_is_tied_to_word_embeddings():
    model = BertForPreTraining(tiny_config())
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    out = model(**make_batch([10, 7]))
    out.loss.backward()
    # One gradient collects both uses (input lookup and output projection).
    assert model.bert.embeddings.word_embeddings.weight.grad is not None


@pytest.mark.parametrize("lengths", [[16, 5, 11, 1, 9], [3, 12]])
def test_unpadded_equals_padded(lengths):
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config()).eval()
    batch = make_batch(lengths)
    valid = batch["attention_mask"].bool()
    model.config.unpad = True
    seq_u, pooled_u = model.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    out_u = model(**batch)
    model.config.unpad = False
    seq_p, pooled_p = model.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    out_p = model(**batch)
    torch.testing.assert_close(seq_u[valid], seq_p[valid], atol=1e-5, rtol=0)
    assert torch.all(seq_u[~valid] == 0)
    torch.testing.assert_close(pooled_u, pooled_p, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_u.mlm_logits, out_p.mlm_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_u.loss, out_p.loss, atol=1e-5, rtol=0)


def test_unpadded_gradients_equal_padded():
    torch.manual_seed(0)
    batch = make_batch([12, 3, 8])
    grads = []
    for unpad in (True, False):
        torch.manual_seed(1)
        model = BertForPreTraining(tiny_config(unpad=unpad))
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_padding_does_not_change_a_sequence():
    # The same sequence alone and next to a longer one gives the same output: attention stays in its sequence.
    torch.manual_seed(0)
    model = BertModel(tiny_config()).eval()
    batch = make_batch([6, 14])
    alone, _ = model(batch["input_ids"][:1, :6], batch["token_type_ids"][:1, :6])
    together, _ = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    torch.testing.assert_close(together[0, :6], alone[0], atol=1e-5, rtol=0)


def test_mlm_head_at_masked_positions_equals_full_head():
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config()).eval()
    batch = make_batch([16, 9, 13])
    sparse = model(**batch)
    full = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    b, t, v = full.mlm_logits.shape
    at_masked = full.mlm_logits.reshape(b * t, v)[batch["masked_positions"]]
    torch.testing.assert_close(sparse.mlm_logits, at_masked, atol=1e-5, rtol=0)
    expected = F.cross_entropy(at_masked, batch["masked_labels"]) + F.cross_entropy(
        full.nsp_logits, batch["next_sentence_label"])
    torch.testing.assert_close(sparse.loss, expected, atol=1e-5, rtol=0)
    assert sparse.mlm_count.item() == len(batch["masked_positions"])
    assert sparse.nsp_count.item() == 3


def test_nsp_ignored_in_packed_mode():
    model = BertForPreTraining(tiny_config())
    batch = make_batch([10, 10])
    batch["next_sentence_label"] = torch.full((2,), -100)
    out = model(**batch)
    assert out.nsp_loss.item() == 0.0 and out.nsp_count.item() == 0
    torch.testing.assert_close(out.loss, out.mlm_loss)


def test_bf16_autocast_close_to_fp32_and_losses_fp32():
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config()).eval()
    batch = make_batch([16, 7, 12])
    ref = model(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out.loss.dtype == torch.float32 and out.mlm_loss.dtype == torch.float32
    assert abs(out.loss.item() - ref.loss.item()) < 0.05 * ref.loss.item()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_training_reduces_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config())
    batch = make_batch([16, 12, 9, 14])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model(**batch).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_masked_position_on_padding_is_rejected():
    model = BertForPreTraining(tiny_config())
    batch = make_batch([10, 4])
    batch["masked_positions"] = torch.tensor([10 + 8])  # row 1, column 8: padding
    batch["masked_labels"] = torch.tensor([5])
    with pytest.raises(ValueError, match="padding"):
        model(**batch)


@pytest.mark.parametrize("num_labels", [1, 3])
def test_sequence_classification(num_labels):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(), num_labels=num_labels)
    batch = make_batch([9, 12, 5])
    labels = torch.randn(3) if num_labels == 1 else torch.tensor([0, 2, 1])
    loss, logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], labels=labels)
    assert logits.shape == (3, num_labels)
    expected = (F.mse_loss(logits.squeeze(-1), labels) if num_labels == 1 else F.cross_entropy(logits, labels))
    torch.testing.assert_close(loss, expected)
    _, pooled = model.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    torch.testing.assert_close(logits, model.classifier(pooled))  # dropout is 0 in tiny_config


def test_flops_formula():
    config = BertConfig.from_name("base")
    # Dominated by 6 * parameters-per-token of the encoder (6 * 85M) plus attention and the head.
    per_token = flops_per_token(config, 128)
    encoder = 6 * 12 * (4 * 768**2 + 2 * 768 * 3072)
    assert encoder < per_token < 1.5 * encoder
    assert training_flops(config, [128, 64], 20) == 3 * forward_flops(config, [128, 64], 20)
    assert forward_flops(config, [128], 10) > forward_flops(config, [64, 64], 10)  # attention is quadratic


def test_peak_probe_measures_something():
    assert measure_peak_flops(torch.float32, n=256, seconds=0.05) > 1e8


def test_peak_matches_the_training_precision(monkeypatch):
    from bertscale.model import flops

    seen = []
    monkeypatch.setattr(flops, "measure_peak_flops", lambda dtype: seen.append(dtype) or 1.0)
    flops.peak_flops("cpu", "fp32")
    flops.peak_flops("cpu", "bf16")
    assert seen == [torch.float32, torch.bfloat16]
    with pytest.raises(ValueError, match="precision"):
        flops.peak_flops("cpu", torch.float32)


def test_peak_probe_stays_small_where_a_dtype_is_slow():
    # bf16 without native CPU support is ~100x slower than fp32: the probe must not grow to 2048^3 there.
    start = time.perf_counter()
    assert measure_peak_flops(torch.bfloat16, seconds=0.1) > 0
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("name, precision, expected", [
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 80GB HBM3", "fp16", 989e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA L40S", "fp32", 183e12),
    ("NVIDIA A10", "bf16", 125e12),
    ("Tesla V100-SXM2-16GB", "fp16", 125e12),
    ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 before Ampere
    ("NVIDIA A10G", "bf16", None),  # "A10" must not match A10G (or A100)
    ("NVIDIA L40", "bf16", None),  # "L4" must not match L40
])
def test_gpu_peak_table(name, precision, expected):
    from bertscale.model.flops import gpu_peak_flops

    assert gpu_peak_flops(name, precision) == expected


def test_an_unknown_gpu_gives_no_mfu_instead_of_crashing(monkeypatch, caplog):
    from bertscale.config import TrainConfig
    from bertscale.model import flops
    from bertscale.train.metrics import make_throughput

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Quantum X9")
    with caplog.at_level("WARNING"):
        assert flops.peak_flops("cuda", "bf16") is None
    assert "Quantum X9" in caplog.text and "train.peak_tflops" in caplog.text
    meter = make_throughput(tiny_config(), 16, TrainConfig(precision="bf16"), torch.device("cuda"), world=2)
    assert meter.peak_flops is None and "mfu" not in meter.flush() and meter.overall()[1] is None
    explicit = make_throughput(tiny_config(), 16, TrainConfig(peak_tflops=100), torch.device("cuda"), world=2)
    assert explicit.peak_flops == 200e12


def test_compiled_dense_blocks_match_eager_and_keep_parameter_names():
    import copy

    from bertscale.model.bert import compile_dense_blocks

    torch.manual_seed(0)
    eager = BertForPreTraining(tiny_config())
    compiled = copy.deepcopy(eager)
    assert compile_dense_blocks(compiled) == 3 * eager.config.num_hidden_layers
    for lengths in ([16, 5, 11], [7, 3, 2, 9]):  # another token count reuses the graphs (dynamic shapes)
        batch = make_batch(lengths)
        out_e, out_c = eager(**batch), compiled(**batch)
        out_e.loss.backward()
        out_c.loss.backward()
        torch.testing.assert_close(out_c.mlm_logits, out_e.mlm_logits, atol=1e-5, rtol=1e-5)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, atol=1e-5, rtol=1e-4, msg=name)
