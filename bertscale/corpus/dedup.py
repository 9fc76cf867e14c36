"""Deduplication cores: exact keys, MinHash signatures, LSH banding and duplicate resolution.

Exact duplicates share the hash of their case- and whitespace-normalized text. Near duplicates are found with
MinHash over word n-gram shingles and LSH banding (bands x rows chosen from the Jaccard threshold, as datasketch
does), candidate pairs are verified by the estimated Jaccard similarity, and each connected cluster of verified
pairs keeps its smallest document (by `doc_sort_key`). The Beam graph only moves keys and document ids around;
everything here is plain Python/numpy and deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Hashable, Iterable
from functools import lru_cache

import numpy as np

_CHUNK = 4096  # shingles per numpy block: bounds memory at CHUNK x num_perm x 8 bytes
_CACHE_LIMIT = 1_000_000  # word-hash cache entries per process before it is reset


def exact_key(text: str) -> str:
    """Hash of the lowercased, whitespace-collapsed text: copies differing only in case or spacing collide."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=16).hexdigest()


class MinHasher:
    """MinHash signatures of word n-gram shingles with multiply-shift hash permutations (uint32 values)."""

    def __init__(self, num_perm: int = 128, shingle_size: int = 5, seed: int = 1) -> None:
        rng = np.random.Generator(np.random.PCG64(seed))
        self.num_perm, self.shingle_size = num_perm, shingle_size
        # Odd multipliers make x -> a*x mod 2^64 a bijection; the top 32 bits are the hash (multiply-shift).
        self._a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self._mix = rng.integers(1, 2**63, size=shingle_size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._word_hash: dict[str, int] = {}

    def _word_hashes(self, words: list[str]) -> np.ndarray:
        cache = self._word_hash
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        for w in set(words).difference(cache):
            cache[w] = zlib.crc32(w.encode("utf-8"))
        return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))

    def shingle_hashes(self, text: str) -> np.ndarray:
        """One 64-bit hash per word n-gram (a single shingle for documents shorter than n words)."""
        words = text.lower().split()  # whitespace tokens: 5x cheaper than a \w+ regex, as good for overlap
        if not words:
            return np.zeros(1, dtype=np.uint64)
        wh = self._word_hashes(words)
        k = min(self.shingle_size, len(wh))
        n = len(wh) - k + 1
        acc = np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(k):
                acc += wh[j:j + n] * self._mix[j]
        return acc

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature (num_perm uint32) of a document."""
        shingles = self.shingle_hashes(text)
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for lo in range(0, len(shingles), _CHUNK):
                block = shingles[lo:lo + _CHUNK, None] * self._a[None, :] + self._b[None, :]
                np.minimum(sig, block.min(axis=0), out=sig)
        return (sig >> np.uint64(32)).astype(np.uint32)


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


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[int]:
    """One 64-bit key per LSH band; the band index is hashed in so equal values in different bands differ."""
    keys = []
    for i in range(bands):
        chunk = signature[i * rows:(i + 1) * rows].tobytes()
        digest = hashlib.blake2b(i.to_bytes(2, "little") + chunk, digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little"))
    return keys


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def bucket_of(key: int | str, buckets: int) -> int:
    """Stable bucket of a key (an int key, or the leading hex digits of a hex digest)."""
    value = key if isinstance(key, int) else int(key[:12], 16)
    return value % buckets


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

    def __init__(self, sort_key: Callable[[str], Hashable]) -> None:
        self._parent: dict[str, str] = {}
        self._key = sort_key

    def find(self, x: str) -> str:
        root = self._parent.setdefault(x, x)
        while self._parent[root] != root:
            root = self._parent[root]
        while x != root:  # path compression, iterative so long chains cannot hit the recursion limit
            self._parent[x], x = root, self._parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb), key=self._key)
            self._parent[hi] = lo

    def members(self) -> list[str]:
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
