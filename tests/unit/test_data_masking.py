"""Dynamic masking: 15% selection, 80/10/10, special tokens, whole words, padding, the batch contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordPiece

from bertscale.data.masking import MLMCollator, continuation_lookup

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
VOCAB = 200


def make_examples(n: int, seed: int, min_len: int = 20, max_len: int = 120) -> list[dict]:
    """[CLS] A [SEP] B [SEP] with some [UNK]s inside, random lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        la, lb = int(rng.integers(min_len // 2, max_len // 2)), int(rng.integers(min_len // 2, max_len // 2))
        a, b = rng.integers(5, VOCAB, la), rng.integers(5, VOCAB, lb)
        a[rng.random(la) < 0.05] = SPECIAL["unk"]
        ids = np.concatenate([[2], a, [3], b, [3]])
        types = np.concatenate([np.zeros(la + 2, dtype=np.int64), np.ones(lb + 1, dtype=np.int64)])
        out.append({"input_ids": ids, "token_type_ids": types, "next_sentence_label": int(rng.integers(0, 2))})
    return out


def test_batch_contract_shapes_padding_and_labels():
    examples = make_examples(8, seed=0)
    batch = MLMCollator(SPECIAL, VOCAB, seed=1)(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    B, T = batch["input_ids"].shape
    assert (B, T) == (8, max(lengths))
    assert all(batch[k].dtype == torch.long for k in batch)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == SPECIAL["pad"]).all()
    original = np.zeros((B, T), dtype=np.int64)
    for r, e in enumerate(examples):
        original[r, : len(e["input_ids"])] = e["input_ids"]
        assert batch["token_type_ids"][r, : len(e["input_ids"])].tolist() == e["token_type_ids"].tolist()
    pos = batch["masked_positions"].numpy()
    assert (np.diff(pos) > 0).all()
    assert batch["masked_labels"].tolist() == original.reshape(-1)[pos].tolist()
    assert batch["next_sentence_label"].tolist() == [e["next_sentence_label"] for e in examples]


def test_masking_statistics_15_percent_and_80_10_10():
    collator = MLMCollator(SPECIAL, VOCAB, mask_prob=0.15, seed=3)
    n_maskable = n_selected = n_mask = n_keep = n_random = 0
    for step in range(40):
        batch = collator(make_examples(32, seed=step))
        ids = batch["input_ids"].reshape(-1).numpy()
        pos, labels = batch["masked_positions"].numpy(), batch["masked_labels"].numpy()
        real = batch["attention_mask"].reshape(-1).numpy() == 1
        originals = ids.copy()
        originals[pos] = labels
        n_maskable += int((real & ~np.isin(originals, list(SPECIAL.values()))).sum())
        n_selected += len(pos)
        n_mask += int((ids[pos] == SPECIAL["mask"]).sum())
        n_keep += int((ids[pos] == labels).sum())
        n_random += int(((ids[pos] != labels) & (ids[pos] != SPECIAL["mask"])).sum())
    assert n_selected / n_maskable == pytest.approx(0.15, abs=0.005)
    assert n_mask / n_selected == pytest.approx(0.8, abs=0.015)
    # A random replacement equal to the original (1 in ~195) counts as kept: within the tolerance.
    assert n_keep / n_selected == pytest.approx(0.1, abs=0.01)
    assert n_random / n_selected == pytest.approx(0.1, abs=0.01)


def test_special_tokens_and_padding_are_never_selected_nor_produced():
    collator = MLMCollator(SPECIAL, VOCAB, mask_prob=0.5, seed=5)
    for step in range(10):
        batch = collator(make_examples(16, seed=100 + step))
        labels = batch["masked_labels"].numpy()
        assert not np.isin(labels, list(SPECIAL.values())).any()
        replaced = batch["input_ids"].reshape(-1)[batch["masked_positions"]].numpy()
        produced_special = np.isin(replaced, [SPECIAL[k] for k in ("pad", "unk", "cls", "sep")])
        assert not produced_special.any()


def test_every_sequence_gets_at_least_one_prediction():
    short = [{"input_ids": np.array([2, 50, 3, 60, 3]), "token_type_ids": np.array([0, 0, 0, 1, 1]),
              "next_sentence_label": 0}] * 4
    batch = MLMCollator(SPECIAL, VOCAB, seed=0)(short)
    rows = batch["masked_positions"] // batch["input_ids"].shape[1]
    assert sorted(set(rows.tolist())) == [0, 1, 2, 3]


def wordpiece_vocab() -> tuple[Tokenizer, dict[str, int]]:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    for w in ["un", "believ", "able", "the", "cat", "sat", "on", "mat", "ing", "s"]:
        vocab[w] = len(vocab)
        vocab["##" + w] = len(vocab)
    return Tokenizer(WordPiece(vocab, unk_token="[UNK]")), vocab


def test_continuation_lookup_marks_hash_pieces():
    tok, vocab = wordpiece_vocab()
    lookup = continuation_lookup(tok)
    assert lookup[vocab["##able"]] and lookup[vocab["##s"]]
    assert not lookup[vocab["un"]] and not lookup[vocab["[CLS]"]]


def test_whole_word_masking_masks_whole_words():
    tok, vocab = wordpiece_vocab()
    lookup = continuation_lookup(tok)
    rng = np.random.default_rng(0)
    starts = [vocab[w] for w in ["un", "believ", "the", "cat", "sat", "on", "mat"]]
    conts = [vocab["##" + w] for w in ["able", "ing", "s", "believ"]]
    examples = []
    for _ in range(32):
        ids = [2]
        for _ in range(int(rng.integers(10, 30))):
            ids.append(int(rng.choice(starts)))
            ids.extend(int(c) for c in rng.choice(conts, int(rng.integers(0, 3))))
        ids.append(3)
        examples.append({"input_ids": np.array(ids), "token_type_ids": np.zeros(len(ids), dtype=np.int64),
                         "next_sentence_label": 0})
    collator = MLMCollator(SPECIAL, len(lookup), whole_word_mask=True, is_continuation=lookup, seed=4)
    batch = collator(examples)
    T = batch["input_ids"].shape[1]
    selected = np.zeros(len(examples) * T, dtype=bool)
    selected[batch["masked_positions"].numpy()] = True
    selected = selected.reshape(len(examples), T)
    n_cont_selected = 0
    for r, e in enumerate(examples):
        ids = e["input_ids"]
        for i in range(1, len(ids) - 1):
            if lookup[ids[i]]:  # a continuation piece goes with the token before it
                assert selected[r, i] == selected[r, i - 1], (r, i)
                n_cont_selected += int(selected[r, i])
    assert n_cont_selected > 0
    frac = selected.sum() / sum(len(e["input_ids"]) - 2 for e in examples)
    assert 0.10 < frac <= 0.16


def test_rng_state_restores_identical_batches():
    examples = make_examples(8, seed=9)
    collator = MLMCollator(SPECIAL, VOCAB, seed=11)
    collator(examples)
    state = collator.state_dict()
    first = collator(examples)
    collator.load_state_dict(state)
    again = collator(examples)
    assert all(torch.equal(first[k], again[k]) for k in first)
    different = collator(examples)
    assert not torch.equal(first["masked_positions"], different["masked_positions"])


def test_pad_to_multiple_of():
    batch = MLMCollator(SPECIAL, VOCAB, seed=0, pad_to_multiple_of=16)(make_examples(4, seed=1))
    assert batch["input_ids"].shape[1] % 16 == 0


def test_whole_word_mask_needs_the_lookup():
    with pytest.raises(ValueError, match="continuation_lookup"):
        MLMCollator(SPECIAL, VOCAB, whole_word_mask=True)


def test_packed_sequences_number_their_documents_in_the_attention_mask():
    packed = {"input_ids": np.array([2, 9, 9, 9, 3, 8, 8, 3, 7, 3]), "token_type_ids": np.zeros(10, dtype=np.int64),
              "next_sentence_label": -100}
    pair = make_examples(1, seed=3)[0]
    batch = MLMCollator(SPECIAL, VOCAB, seed=1, document_attention=True)([packed, pair])
    n = len(pair["input_ids"])
    assert batch["attention_mask"][0, :10].tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 3, 3]
    assert (batch["attention_mask"][0, 10:] == 0).all()
    assert batch["attention_mask"][1, :n].tolist() == [1] * n  # an NSP pair keeps HF's mask
    # The same tokens are maskable with or without document numbers.
    plain = MLMCollator(SPECIAL, VOCAB, seed=1)([packed, pair])
    assert plain["attention_mask"][0, :10].tolist() == [1] * 10
    assert batch["masked_positions"].tolist() == plain["masked_positions"].tolist()
