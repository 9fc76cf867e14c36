"""Instance creation: Devlin et al. NSP pairs, packed sequences, truncation, over-long sentences."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from bertscale.data.instances import (
    NSP_IGNORE,
    Instances,
    TokenizedDocs,
    create_nsp_instances,
    create_packed_instances,
    inner_boundaries,
    materialize,
    materialize_all,
    split_long_sentences,
    truncate_pair,
    truncation_amounts,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from factories import synthetic_docs  # noqa: E402

CLS, SEP = 2, 3


def doc_of_token(docs: TokenizedDocs) -> np.ndarray:
    return np.repeat(np.arange(docs.num_docs), np.diff(docs.sent_offsets[docs.doc_offsets]))


def naive_truncation(a: int, b: int, max_tokens: int) -> tuple[int, int]:
    """The reference loop, popping one token at a time from the longer list (A on a tie)."""
    cut_a = cut_b = 0
    while (a - cut_a) + (b - cut_b) > max_tokens:
        if a - cut_a >= b - cut_b:
            cut_a += 1
        else:
            cut_b += 1
    return cut_a, cut_b


def test_truncation_amounts_match_the_reference_loop():
    for a, b, m in itertools.product(range(0, 30), range(0, 30), [2, 5, 17, 40]):
        assert truncation_amounts(a, b, m) == naive_truncation(a, b, m), (a, b, m)


def test_truncate_pair_stays_inside_the_spans_and_fits():
    rng = np.random.default_rng(0)
    fronts = 0
    for _ in range(500):
        a0, b0 = int(rng.integers(0, 100)), int(rng.integers(200, 300))
        a = (a0, a0 + int(rng.integers(1, 80)))
        b = (b0, b0 + int(rng.integers(1, 80)))
        (ta0, ta1), (tb0, tb1) = truncate_pair(a, b, 61, rng)
        assert a[0] <= ta0 < ta1 <= a[1] and b[0] <= tb0 < tb1 <= b[1]
        assert (ta1 - ta0) + (tb1 - tb0) <= 61
        fronts += (ta0 - a[0]) + (tb0 - b[0])
    assert fronts > 0, "truncation never removed tokens from the front"


@pytest.mark.parametrize("seq_len", [16, 64, 128])
def test_nsp_instances_never_exceed_the_max_length(seq_len):
    docs = synthetic_docs(60, seed=seq_len)
    docs, _ = split_long_sentences(docs, (seq_len - 3) // 2)
    inst = create_nsp_instances(docs, seq_len, 0.1, 2, np.random.default_rng(1))
    total = (inst.a_end - inst.a_start) + (inst.b_end - inst.b_start) + 3
    assert len(inst) > 50
    assert total.max() <= seq_len
    assert (inst.a_end > inst.a_start).all() and (inst.b_end > inst.b_start).all()


def test_nsp_random_next_is_about_half_and_never_the_same_document():
    docs = synthetic_docs(400, seed=3, max_sents=20, max_len=20)
    inst = create_nsp_instances(docs, 128, 0.1, 1, np.random.default_rng(7))
    owner = doc_of_token(docs)
    rand = inst.nsp_label == 1
    assert 0.46 < rand.mean() < 0.54, rand.mean()
    assert (inst.doc_b[rand] != inst.doc_a[rand]).all()
    # Tokens tell where they came from: random B really lies in another document, actual B in A's document.
    assert (owner[inst.b_start[rand]] != owner[inst.a_start[rand]]).all()
    assert (owner[inst.b_start[~rand]] == owner[inst.a_start[~rand]]).all()
    assert (owner[inst.b_end[~rand] - 1] == owner[inst.a_start[~rand]]).all()


def test_actual_next_b_follows_a_when_nothing_was_truncated():
    docs = synthetic_docs(100, seed=5, max_sents=10, max_len=8)
    inst = create_nsp_instances(docs, 128, 0.0, 1, np.random.default_rng(2))
    follows = inst.nsp_label == 0
    assert follows.any()
    assert (inst.b_start[follows] == inst.a_end[follows]).all()


def test_nsp_needs_two_documents():
    with pytest.raises(ValueError, match="two documents"):
        create_nsp_instances(synthetic_docs(1), 64, 0.1, 1, np.random.default_rng(0))


def test_short_seq_prob_makes_some_instances_shorter():
    docs = synthetic_docs(100, seed=9, max_sents=80, max_len=6)
    long_only = create_nsp_instances(docs, 128, 0.0, 1, np.random.default_rng(0))
    mixed = create_nsp_instances(docs, 128, 0.5, 1, np.random.default_rng(0))
    short = lambda i: (((i.a_end - i.a_start) + (i.b_end - i.b_start)) < 64).mean()  # noqa: E731
    assert short(mixed) > short(long_only) + 0.1
    assert len(mixed) > 1.2 * len(long_only)


def test_split_long_sentences_keeps_every_token_and_the_documents():
    docs = TokenizedDocs.from_lists([[[1] * 25, [2] * 3], [[3] * 10]])
    out, n_cut = split_long_sentences(docs, 10)
    assert n_cut == 1
    assert np.diff(out.sent_offsets).tolist() == [10, 10, 5, 3, 10]
    assert out.doc_offsets.tolist() == [0, 4, 5]
    assert np.array_equal(out.tokens, docs.tokens)


def test_select_reorders_documents():
    docs = TokenizedDocs.from_lists([[[1, 1], [2]], [[3, 3, 3]], [[4], [5], [6]]])
    out = docs.select(np.array([2, 0]))
    assert out.tokens.tolist() == [4, 5, 6, 1, 1, 2]
    assert out.doc_offsets.tolist() == [0, 3, 5]
    assert np.diff(out.sent_offsets).tolist() == [1, 1, 1, 2, 1]


def test_packed_instances_cover_every_token_once_and_fit():
    docs, _ = split_long_sentences(synthetic_docs(50, seed=11), 62)
    inst = create_packed_instances(docs, 64)
    assert (inst.nsp_label == NSP_IGNORE).all()
    spans = sorted(zip(inst.a_start.tolist(), inst.a_end.tolist()))
    assert spans[0][0] == 0 and spans[-1][1] == len(docs.tokens)
    assert all(prev[1] == nxt[0] for prev, nxt in zip(spans, spans[1:]))
    by_start = {int(s): i for i, s in enumerate(inst.a_start)}
    lengths = {int(s): len(materialize(docs, inst, i, CLS, SEP)[0]) for s, i in by_start.items()}
    assert max(lengths.values()) <= 64
    # Greedy: no sequence had room for the first sentence of the next one (plus a [SEP] at a document start).
    doc_starts = set(docs.sent_offsets[docs.doc_offsets[:-1]].tolist())
    sent_end = dict(zip(docs.sent_offsets[:-1].tolist(), docs.sent_offsets[1:].tolist()))
    for start, end in spans[:-1]:
        first_sentence = sent_end[end] - end
        assert lengths[start] + first_sentence + (end in doc_starts) > 64


def test_packed_sequences_mark_document_boundaries_with_sep():
    docs = TokenizedDocs.from_lists([[[10, 11]], [[20, 21, 22]], [[30]]])
    inst = create_packed_instances(docs, 16)
    assert len(inst) == 1
    ids, len_a = materialize(docs, inst, 0, CLS, SEP)
    assert ids.tolist() == [CLS, 10, 11, SEP, 20, 21, 22, SEP, 30, SEP]
    assert len_a == len(ids)
    assert inner_boundaries(docs, 0, 6).tolist() == [2, 5]


def test_materialize_places_cls_sep_and_segment_a_length():
    docs = TokenizedDocs.from_lists([[[10, 11, 12]], [[20, 21]]])
    inst = Instances.from_rows([(0, 3, 3, 5, 1, 0, 1)])
    ids, len_a = materialize(docs, inst, 0, CLS, SEP)
    assert ids.tolist() == [CLS, 10, 11, 12, SEP, 20, 21, SEP]
    assert len_a == 5  # token type 0 on [CLS] A [SEP], 1 on B [SEP]


def test_no_documents_give_no_instances():
    empty = synthetic_docs(5).select(np.zeros(0, dtype=np.int64))
    assert empty.num_docs == 0
    assert len(create_nsp_instances(empty, 64, 0.1, 1, np.random.default_rng(0))) == 0
    assert len(create_packed_instances(split_long_sentences(empty, 62)[0], 64)) == 0


@pytest.mark.parametrize("mode", ["nsp", "packed"])
def test_materialize_all_equals_materialize_instance_by_instance(mode):
    """The one-gather writer against the plain per-instance path, [SEP]s at document boundaries included."""
    docs = synthetic_docs(40, seed=11)
    if mode == "nsp":
        inst = create_nsp_instances(docs, 48, 0.3, 2, np.random.default_rng(5))
    else:
        docs = split_long_sentences(docs, 46)[0]
        inst = create_packed_instances(docs, 48)
    inst = inst.take(np.random.default_rng(0).permutation(len(inst)))
    tokens, offsets, len_a = materialize_all(docs, inst, CLS, SEP)
    assert offsets.dtype == np.int64 and len(offsets) == len(inst) + 1
    for i in range(len(inst)):
        ids, la = materialize(docs, inst, i, CLS, SEP)
        assert tokens[offsets[i] : offsets[i + 1]].tolist() == ids.tolist()
        assert len_a[i] == la
