"""Deduplication cores: exact keys, MinHash signatures, LSH banding and duplicate resolution.

Exact duplicates share the hash of their case- and whitespace-normalized text. Near duplicates are found with
MinHash over word n-gram shingles (one-permutation hashing, batched in numpy: ~10x datasketch's throughput on
the shared Wikipedia extract, see bench/corpus.py) and LSH banding (bands x rows chosen from the Jaccard
threshold, as datasketch does), candidate pairs are verified by the estimated Jaccard similarity, and each
connected cluster of verified pairs keeps its smallest document (by `doc_sort_key`, or the smallest integer
reference in the pipeline). The Beam graph only moves keys and document references around; everything here is
plain Python/numpy and deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any
from functools import lru_cache

import numpy as np



def exact_key(text: str, words: list[str] | None = None) -> bytes:
    """128-bit hash of the lowercased, whitespace-collapsed text: copies differing only in case or spacing
    collide. `words`, when given, must be `text.split()` (the filters' word list, reused to save a split);
    lowercasing neither makes nor removes whitespace, so lowering after the split gives the same key."""
    joined = " ".join(text.split() if words is None else words).lower()
    return hashlib.blake2b(joined.encode("utf-8"), digest_size=16).digest()


# A word ends at any byte <= 32: ASCII whitespace, and NUL, which separates documents in a batch. Cleaning removed
# every other control character and turned the other Unicode blanks into spaces or newlines, so on cleaned text
# this splits words exactly like str.split().
_DIRECT_POWERS = 1 << 22  # batch bytes up to which powers of the whole batch are kept (2 x 32 MiB)
_POLY = np.uint64(0x100000001B3)  # odd, so invertible mod 2^64
_POLY_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64 finalizer


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mix (the splitmix64 finalizer), element-wise: spreads structured hashes over all bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


class MinHasher:
    """MinHash signatures of word n-gram shingles by one-permutation hashing with rotation densification.

    Classic MinHash applies `num_perm` hash functions to every shingle (num_perm x shingles work). One-permutation
    hashing (Li, Owen, Zhang 2012) hashes each shingle once, uses part of the hash to pick one of `num_perm` bins
    and keeps the minimum of the rest per bin; empty bins of short documents borrow from the next non-empty bin
    to the right plus a distance offset (Shrivastava & Li 2014), so equal bins still estimate Jaccard similarity.
    All of it runs in numpy over a batch of documents at once: words are found and hashed on the UTF-8 bytes with
    a polynomial prefix sum, so no Python loop runs per word or per shingle.
    """

    def __init__(self, num_perm: int = 128, shingle_size: int = 5, seed: int = 1) -> None:
        rng = np.random.Generator(np.random.PCG64(seed))
        self.num_perm, self.shingle_size = num_perm, shingle_size
        self._mix = rng.integers(1, 2**63, size=shingle_size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._salt = rng.integers(0, 2**63, dtype=np.uint64)
        self._pow = self._inv = np.ones(1, dtype=np.uint64)

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """p^i and p^-i mod 2^64 for i < n, grown on demand and kept between batches."""
        if len(self._pow) < n:
            size = max(n, 2 * len(self._pow))
            with np.errstate(over="ignore"):
                self._pow = np.cumprod(np.full(size, _POLY, dtype=np.uint64)) * _POLY_INV
                self._inv = np.cumprod(np.full(size, _POLY_INV, dtype=np.uint64)) * _POLY
        return self._pow[:n], self._inv[:n]

    def _words(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(hash, document index) of every whitespace-separated lowercase word of the batch, in order. A word's
        hash is the polynomial sum_j b_j p^j mod 2^64 of its bytes, summed per word with one reduceat."""
        data = np.frombuffer("\x00".join(texts).lower().encode("utf-8"), dtype=np.uint8)
        end = data <= 32
        inside = np.concatenate(([False], ~end, [False]))
        starts = np.flatnonzero(inside[1:] != inside[:-1])[0::2]
        if not len(starts):
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
        with np.errstate(over="ignore"):
            if len(data) <= _DIRECT_POWERS:
                # b_i p^i over the whole batch, then each word shifted back by p^-start: the fast path.
                pw, inv = self._powers(len(data))
                hashes = np.add.reduceat(np.where(end, np.uint8(0), data) * pw, starts) * inv[starts]
            else:
                # A huge batch: exponents counted from each word's start, so the powers stay word-sized.
                marks = np.zeros(len(data), dtype=np.int64)
                marks[starts] = starts
                offset = np.arange(len(data)) - np.maximum.accumulate(marks)
                pw, _ = self._powers(int(offset.max()) + 1)
                hashes = np.add.reduceat(np.where(end, np.uint8(0), data) * pw[offset], starts)
        return hashes, np.searchsorted(np.flatnonzero(data == 0), starts)

    def _shingles(self, hashes: np.ndarray, doc: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        """(shingle hash, document index): every run of `shingle_size` words inside one document; a document with
        fewer words is one shingle of all of them, one without words the shingle 0."""
        k = self.shingle_size
        counts = np.bincount(doc, minlength=n_docs)
        parts_h, parts_d = [], []
        if len(hashes) >= k:
            n = len(hashes) - k + 1
            acc = np.zeros(n, dtype=np.uint64)
            with np.errstate(over="ignore"):
                for j in range(k):
                    acc += hashes[j:j + n] * self._mix[j]
            same = doc[:n] == doc[k - 1:]
            parts_h.append(acc[same])
            parts_d.append(doc[:n][same])
        first = np.concatenate(([0], np.cumsum(counts)[:-1]))
        for d in np.flatnonzero(counts < k):  # short documents: rare after the length filters
            words = hashes[first[d]:first[d] + counts[d]]
            with np.errstate(over="ignore"):
                parts_h.append(np.array([(words * self._mix[:len(words)]).sum()], dtype=np.uint64))
            parts_d.append(np.array([d]))
        return np.concatenate(parts_h), np.concatenate(parts_d)

    def signatures(self, texts: list[str]) -> np.ndarray:
        """The MinHash signatures (len(texts) x num_perm, uint32) of a batch of documents."""
        if not texts:
            return np.zeros((0, self.num_perm), dtype=np.uint32)
        shingles, doc = self._shingles(*self._words(texts), len(texts))
        with np.errstate(over="ignore"):
            h = splitmix64(shingles ^ self._salt)
        cell = doc * self.num_perm + ((h >> np.uint64(32)) % np.uint64(self.num_perm)).astype(np.int64)
        sig = np.full(len(texts) * self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        np.minimum.at(sig, cell, (h & np.uint64(0xFFFFFFFF)).astype(np.uint32))
        filled = np.zeros(len(sig), dtype=bool)
        filled[cell] = True
        return self._densify(sig.reshape(len(texts), -1), filled.reshape(len(texts), -1))

    def _densify(self, sig: np.ndarray, filled: np.ndarray) -> np.ndarray:
        """Empty bins take the value of the next non-empty bin to the right (circularly) plus an offset per step."""
        if filled.all():
            return sig
        p = self.num_perm
        pos = np.where(np.tile(filled, 2), np.arange(2 * p), 3 * p)
        nxt = np.minimum.accumulate(pos[:, ::-1], axis=1)[:, ::-1][:, :p]
        rows = np.arange(len(sig))[:, None]
        with np.errstate(over="ignore"):
            borrowed = sig[rows, nxt % p] + (nxt - np.arange(p)).astype(np.uint32) * np.uint32(0x9E3779B1)
        return np.where(filled, sig, borrowed)

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature (num_perm uint32) of one document."""
        return self.signatures([text])[0]


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising equal-weighted false-positive and false-negative probability mass at `threshold`."""
    best, best_err = (1, num_perm), float("inf")
    lo = np.linspace(0.0, threshold, 201)
    hi = np.linspace(threshold, 1.0, 201)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = np.trapezoid(1 - (1 - lo**rows) ** bands, lo)
            fn = np.trapezoid((1 - hi**rows) ** bands, hi)
            if fp + fn < best_err:
                best, best_err = (bands, rows), fp + fn
    return best


_BAND_MIX = splitmix64(np.arange(1, 1025, dtype=np.uint64)) | np.uint64(1)  # fixed odd multipliers per row


def band_key_matrix(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per LSH band per document (documents x bands); the band index is mixed in so equal values in
    different bands differ. Computed for a whole batch in numpy."""
    block = signatures[:, :bands * rows].astype(np.uint64).reshape(len(signatures), bands, rows)
    with np.errstate(over="ignore"):
        combined = (block * _BAND_MIX[:rows]).sum(axis=2) + np.arange(bands, dtype=np.uint64) * _M2
        return splitmix64(combined)


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[int]:
    """The LSH band keys of one signature."""
    return band_key_matrix(signature[None, :], bands, rows)[0].tolist()


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
    """Share of equal MinHash values: of two signatures, or row by row of two stacks of signatures."""
    return np.mean(a == b, axis=-1)


def exact_duplicates(pairs: Iterable[tuple[str, str]], sort_key: Callable[[str], Hashable]) -> list[str]:
    """Given (exact_key, doc_id) pairs, the ids to drop: every copy but the smallest doc id of each key."""
    groups: dict[str, list[str]] = {}
    for key, doc_id in pairs:
        groups.setdefault(key, []).append(doc_id)
    drops = []
    for ids in groups.values():
        if len(ids) > 1:
            drops.extend(sorted(ids, key=sort_key)[1:])
    return drops


def candidate_pairs(ids: list[str], sort_key: Callable[[str], Hashable], max_all_pairs: int = 32) -> list[tuple[str, str]]:
    """Pairs to verify among the documents sharing one LSH band: all pairs, or a star on the smallest if large."""
    ids = sorted(set(ids), key=sort_key)
    if len(ids) <= max_all_pairs:
        return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
    return [(ids[0], b) for b in ids[1:]]


class UnionFind:
    """Disjoint sets whose representative is always the smallest member by `sort_key` (deterministic)."""

    def __init__(self, sort_key: Callable[[Any], Hashable] | None = None) -> None:
        self._parent: dict = {}
        self._key = sort_key

    def find(self, x):
        root = self._parent.setdefault(x, x)
        while self._parent[root] != root:
            root = self._parent[root]
        while x != root:  # path compression, iterative so long chains cannot hit the recursion limit
            self._parent[x], x = root, self._parent[x]
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb), key=self._key)
            self._parent[hi] = lo

    def members(self) -> list:
        return list(self._parent)


def near_duplicates(
    pairs: Iterable[tuple[str, str]],
    signatures: dict[str, np.ndarray],
    threshold: float,
    sort_key: Callable[[str], Hashable],
) -> list[str]:
    """Ids to drop: members of clusters of verified pairs (estimated Jaccard >= threshold) except the smallest."""
    uf = UnionFind(sort_key)
    for a, b in pairs:
        if a in signatures and b in signatures and estimated_jaccard(signatures[a], signatures[b]) >= threshold:
            uf.union(a, b)
    return sorted((x for x in uf.members() if uf.find(x) != x), key=sort_key)


# ------------------------------------------------------------------------------------------------------------
# Bucket-level steps of the distributed graph (documents are integer references; smaller = earlier = kept)
# ------------------------------------------------------------------------------------------------------------
# Dedup keys are packed numpy records, not Python tuples: a (key, ref) tuple of two ints costs ~120 bytes of
# memory and a record 16 (24 for an exact key). Keys are hashes, so their low bits pick the bucket.
BAND_RECORD = np.dtype([("key", "<u8"), ("ref", "<i8")])
EXACT_RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("ref", "<i8")])


def band_records(keys: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Records of a (documents x bands) key matrix and the documents' references."""
    out = np.empty(keys.size, dtype=BAND_RECORD)
    out["key"] = keys.reshape(-1)
    out["ref"] = np.repeat(refs, keys.shape[1] if keys.ndim == 2 else 1)
    return out


def exact_records(digests: list[bytes], refs: np.ndarray) -> np.ndarray:
    """Records of 16-byte exact keys and their documents' references."""
    words = np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, 2)
    out = np.empty(len(digests), dtype=EXACT_RECORD)
    out["hi"], out["lo"], out["ref"] = words[:, 0], words[:, 1], refs
    return out


def bucket_order(records: np.ndarray, buckets: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The records sorted by their key's bucket (stably), and (bucket, start, end) of every non-empty bucket."""
    if not len(records):
        return records, []
    key = records["key"] if "key" in records.dtype.names else records["lo"]
    bucket = (key % np.uint64(buckets)).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    bucket = bucket[order]
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    ends = [*starts[1:].tolist(), len(bucket)]
    return records[order], [(int(bucket[s]), int(s), e) for s, e in zip(starts.tolist(), ends)]


def _unpack(batches: Iterable[bytes], dtype: np.dtype) -> np.ndarray:
    return np.concatenate([np.frombuffer(b, dtype=dtype) for b in batches] or [np.empty(0, dtype=dtype)])


def exact_drops_in_bucket(batches: Iterable[bytes]) -> list[int]:
    """References to drop among all exact-key records of one bucket (packed batches): every copy but the
    first."""
    r = _unpack(batches, EXACT_RECORD)
    r = r[np.lexsort((r["ref"], r["lo"], r["hi"]))]
    repeat = (r["hi"][1:] == r["hi"][:-1]) & (r["lo"][1:] == r["lo"][:-1])
    return r["ref"][1:][repeat].tolist()


def candidates_in_bucket(batches: Iterable[bytes]) -> list[tuple[int, int]]:
    """Candidate pairs (a < b) among the documents sharing an LSH band key in one bucket (packed batches)."""
    r = np.unique(_unpack(batches, BAND_RECORD))  # sorted by (key, ref); a document counts once per key
    key = r["key"]
    shared = np.r_[key[1:] == key[:-1], False] | np.r_[False, key[1:] == key[:-1]]
    r = r[shared]
    if not len(r):
        return []
    starts = np.flatnonzero(np.r_[True, r["key"][1:] != r["key"][:-1]])
    refs = r["ref"].tolist()
    pairs: set[tuple[int, int]] = set()
    for start, end in zip(starts.tolist(), [*starts[1:].tolist(), len(refs)]):
        pairs.update(candidate_pairs(refs[start:end], None))
    return sorted(pairs)


# ------------------------------------------------------------------------------------------------------------
# Connected components by min-label propagation (see the pipeline module for why this method)
# ------------------------------------------------------------------------------------------------------------
def initial_label(node: int, neighbors: Iterable[int]) -> int:
    return min(node, min(neighbors, default=node))


def spread_label(node: int, neighbors: Iterable[int], label: int) -> Iterator[tuple[int, int]]:
    """One propagation step from `node`: its label to itself and to every neighbor (combined by min)."""
    yield node, label
    for other in neighbors:
        yield other, label


def label_conflicts(own: int, received: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Pairs of labels that meet across an edge: the components they name are not merged yet."""
    for label in set(received):
        if label != own:
            yield min(own, label), max(own, label)


def merge_labels(conflicts: Iterable[tuple[int, int]]) -> dict[int, int]:
    """label -> final label (the smallest label of its merged group), for labels that change."""
    uf = UnionFind()
    for a, b in conflicts:
        uf.union(a, b)
    return {x: root for x in uf.members() if (root := uf.find(x)) != x}
