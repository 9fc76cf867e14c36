"""Exact keys, MinHash estimates, LSH parameters and candidates, and deterministic cluster resolution."""

from __future__ import annotations

import numpy as np
import pytest

from bertscale.corpus.dedup import (
    MinHasher,
    UnionFind,
    band_keys,
    candidate_pairs,
    estimated_jaccard,
    exact_duplicates,
    exact_key,
    lsh_params,
    near_duplicates,
)
from bertscale.corpus.readers import doc_sort_key

WORDS = [f"w{i}" for i in range(400)]


def shingles(words: list[str], k: int = 5) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + k]) for i in range(len(words) - k + 1)}


def test_exact_key_ignores_case_and_spacing_only():
    assert exact_key("Hello  World\n") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello world!")


@pytest.mark.parametrize("text", ["Hello  World\n", "İstanbul ẞtraße\u00a0x", "a\n\nB c"])
def test_exact_key_from_the_filters_words_is_the_same_key(text):
    assert exact_key(text, text.split()) == exact_key(text)


def test_minhash_estimates_jaccard_and_is_deterministic():
    hasher = MinHasher(num_perm=256, shingle_size=5, seed=3)
    a = WORDS[:300]
    b = WORDS[:240] + [f"x{i}" for i in range(60)]
    true = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
    sa, sb = hasher.signature(" ".join(a)), hasher.signature(" ".join(b))
    assert abs(estimated_jaccard(sa, sb) - true) < 0.1
    assert np.array_equal(sa, MinHasher(num_perm=256, shingle_size=5, seed=3).signature(" ".join(a)))
    assert not np.array_equal(sa, MinHasher(num_perm=256, shingle_size=5, seed=4).signature(" ".join(a)))
    assert hasher.signature("tiny").shape == (256,)


def test_lsh_params_fit_num_perm_and_move_with_threshold():
    b8, r8 = lsh_params(0.8, 128)
    b5, r5 = lsh_params(0.5, 128)
    assert b8 * r8 <= 128 and b5 * r5 <= 128
    assert r8 > r5  # a higher threshold needs longer bands
    # The S-curve's midpoint (1/b)^(1/r) sits near the threshold.
    assert abs((1 / b8) ** (1 / r8) - 0.8) < 0.1


def test_band_keys_collide_only_for_equal_bands():
    sig = np.arange(128, dtype=np.uint32)
    other = sig.copy()
    other[0] += 1
    ka, kb = band_keys(sig, 8, 16), band_keys(other, 8, 16)
    assert ka[0] != kb[0] and ka[1:] == kb[1:]
    assert len(set(ka)) == 8


def test_exact_duplicates_keep_the_smallest_doc_id():
    pairs = [("k1", "b#000000000001"), ("k1", "a#000000000009"), ("k2", "c#000000000000"),
             ("k1", "a#000000000010")]
    assert sorted(exact_duplicates(pairs, doc_sort_key)) == ["a#000000000010", "b#000000000001"]


def test_candidate_pairs_all_pairs_or_star():
    ids = [f"d#{i:012d}" for i in range(5)]
    assert len(candidate_pairs(ids, doc_sort_key)) == 10
    star = candidate_pairs(ids, doc_sort_key, max_all_pairs=3)
    assert star == [(ids[0], x) for x in ids[1:]]


def test_near_duplicates_cluster_by_union_find_and_verify():
    sig = np.arange(64, dtype=np.uint32)
    close = sig.copy()
    close[:4] += 1000  # Jaccard estimate 60/64
    far = sig + 5000
    sigs = {"a#000000000002": sig, "a#000000000001": close, "b#000000000000": close.copy(), "c#000000000000": far}
    pairs = [("a#000000000002", "a#000000000001"), ("a#000000000001", "b#000000000000"),
             ("a#000000000002", "c#000000000000")]
    drops = near_duplicates(pairs, sigs, 0.8, doc_sort_key)
    assert drops == ["a#000000000002", "b#000000000000"]  # the cluster keeps a#1; c is not similar


def test_union_find_long_chain_root_is_smallest():
    uf = UnionFind(doc_sort_key)
    ids = [f"x#{i:012d}" for i in range(5000)]
    for a, b in zip(ids[1:], ids[2:]):
        uf.union(b, a)
    uf.union(ids[-1], ids[0])
    assert uf.find(ids[4000]) == ids[0]
