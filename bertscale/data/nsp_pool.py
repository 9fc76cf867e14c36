"""The B pool: a bounded, seeded sample of documents from every corpus shard, the source of random NSP Bs.

Devlin et al. take a random B from any other document of the corpus. Holding the whole corpus to draw from
made the stage's memory grow with the corpus; the pool instead holds at most `data.nsp_pool_documents`
documents per split, sampled evenly over all corpus shards (at most 1 in 10 of a shard's documents, each cut to
a window of a few sequence lengths from a random sentence on), so the memory is bounded by the pool size
whatever the corpus size, and the pool adds at most ~10% to the tokenization work. A shard takes
its random Bs from the pool part of its own split (train pairs never carry held-out text) and never from A's
own document: a document's identity is (shard, row), and `BCandidates` steps over A's copy in the pool.

The pool is built before the shards, stored with the protocol of `storage.py` in `<out>/nsp_pool/` and reused
by a re-run with the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bertscale.data.documents import heldout_rows, keep_documents, read_sentences, tokenize_batch, tokenizer
from bertscale.data.instances import TokenizedDocs, ranges, concat_docs, select_sentences
from bertscale.data.storage import read_verified, save_arrays, staged_dir, write_json

MARKER = "pool.json"
SPLITS = ("train", "heldout")
POOL_MAX_SHARE = 10  # the pool takes at most 1 in 10 documents of a shard's split
CHARS_PER_TOKEN = 6  # generous for WordPiece on English (~4.5): the token window, not this, sets the length
_LOADED: dict[str, dict[str, "PoolPart"]] = {}  # per process: the pool every shard of a build shares


@dataclass
class PoolPart:
    """The pool documents of one split, in ascending order of their corpus-wide key (shard << 32 | row)."""

    docs: TokenizedDocs
    keys: np.ndarray


@dataclass(frozen=True)
class PoolSample:
    """How to sample one corpus shard into the pool (picklable, for worker processes)."""

    index: int
    source: str
    per_split: int  # documents to draw from each split of this shard
    tok_path: str
    unk_id: int
    seed: int
    heldout_fraction: float
    max_unk_fraction: float | None
    window: int  # tokens kept per pool document


def per_shard_counts(total: int, num_shards: int) -> list[int]:
    """`total` spread evenly over the shards (the first ones take the remainder)."""
    return [total // num_shards + (k < total % num_shards) for k in range(num_shards)]


def sample_shard(job: PoolSample) -> dict[str, PoolPart]:
    """Up to `per_split` usable documents of each split of one corpus shard, windowed, with their keys.

    Only each document's window is tokenized, so the pool costs the same whatever the documents' lengths. The
    [UNK] filter is applied to the window: a pool document is usable text itself.
    """
    n_rows = pq.ParquetFile(job.source).metadata.num_rows
    held = heldout_rows(n_rows, job.heldout_fraction, job.seed, job.index)
    rng = np.random.default_rng([job.seed, 0xB0, job.index])
    chosen = {}
    for split in SPLITS:
        rows = np.flatnonzero(held == (split == "heldout"))
        # At most a tenth of a shard's documents: on a small corpus the pool would otherwise tokenize it twice.
        k = min(job.per_split, len(rows), max(2, -(-len(rows) // POOL_MAX_SHARE)))
        chosen[split] = np.sort(rng.choice(rows, k, replace=False)).astype(np.int64)
    rows = np.sort(np.concatenate(list(chosen.values())))
    if len(rows) == 0:
        return {split: PoolPart(_no_docs(), np.zeros(0, np.int64)) for split in SPLITS}
    texts = text_windows(next(read_sentences(job.source, rows)), CHARS_PER_TOKEN * job.window, rng)
    sd = tokenize_batch(texts, tokenizer(job.tok_path), job.unk_id)
    keep, _ = keep_documents(sd.num_tokens, sd.unk_tokens, job.max_unk_fraction)
    out = {}
    for split in SPLITS:
        usable = keep[np.isin(rows[keep], chosen[split])]  # positions in `rows`, ascending
        keys = (np.int64(job.index) << 32) | rows[usable]
        out[split] = PoolPart(window(sd.docs.select(usable), job.window, rng), keys)
    return out


def text_windows(col: pa.ListArray, max_chars: int, rng: np.random.Generator) -> pa.ListArray:
    """Each document's sentences from a random one on, up to about `max_chars` characters (whole documents
    when they are shorter): what `window` will keep, cut before tokenizing so that long articles cost nothing."""
    offsets = col.offsets.to_numpy().astype(np.int64)
    chars = np.concatenate([[0], np.cumsum(pc.utf8_length(col.flatten()).to_numpy(zero_copy_only=False))])
    lo, hi = offsets[:-1].copy(), offsets[1:].copy()
    for d in np.flatnonzero(chars[hi] - chars[lo] > max_chars):
        lo[d] += int(rng.integers(0, hi[d] - lo[d]))
        # chars[i] is the length of sentences before i: the first i reaching the budget ends the window.
        hi[d] = min(hi[d], int(np.searchsorted(chars, chars[lo[d]] + max_chars)))
    idx = ranges(lo, hi)
    new_offsets = pa.array(np.concatenate([[0], np.cumsum(hi - lo)]), pa.int64())
    return pa.LargeListArray.from_arrays(new_offsets, col.flatten().take(pa.array(idx, pa.int64())))


def window(docs: TokenizedDocs, max_tokens: int, rng: np.random.Generator) -> TokenizedDocs:
    """Each document cut to whole sentences from a random one on, stopping once `max_tokens` are reached.

    A B segment is at most one sequence long; a window of a few sequences keeps B's random start point varied
    while a long article costs the pool no more than a short one.
    """
    lo, hi = docs.doc_offsets[:-1].copy(), docs.doc_offsets[1:].copy()
    for d in range(docs.num_docs):
        if docs.sent_offsets[hi[d]] - docs.sent_offsets[lo[d]] <= max_tokens:
            continue
        lo[d] += int(rng.integers(0, hi[d] - lo[d]))
        ends = docs.sent_offsets[lo[d] + 1 : hi[d] + 1]
        hi[d] = lo[d] + 1 + min(int(np.searchsorted(ends, docs.sent_offsets[lo[d]] + max_tokens)), len(ends) - 1)
    return select_sentences(docs, lo, hi)


def _no_docs() -> TokenizedDocs:
    return TokenizedDocs(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(1, np.int64))


def build_pool(out: Path, jobs: list[PoolSample], key: str,
               run: Callable[[Callable, Iterable], Iterable]) -> dict[str, int]:
    """Sample every shard (through `run`, a map over processes) and store the pool; reuse an intact one."""
    final = out / "nsp_pool"
    record = read_verified(final, MARKER, key)
    if record is not None:
        return record["documents"]
    samples = list(run(sample_shard, jobs))
    with staged_dir(final) as tmp:
        files, counts = {}, {}
        for split in SPLITS:
            part = PoolPart(concat_docs([s[split].docs for s in samples] or [_no_docs()]),
                            np.concatenate([s[split].keys for s in samples] + [np.zeros(0, np.int64)]))
            counts[split] = part.docs.num_docs
            files.update(save_arrays(tmp / split, {"tokens": part.docs.tokens, "keys": part.keys,
                                                   "sent_offsets": part.docs.sent_offsets,
                                                   "doc_offsets": part.docs.doc_offsets}, tmp))
        write_json(tmp / MARKER, {"key": key, "documents": counts, "files": files})
    return counts


def load_pool(pool_dir: str) -> dict[str, PoolPart]:
    """The stored pool, memory-mapped, loaded once per process."""
    if pool_dir not in _LOADED:
        parts = {}
        for split in SPLITS:
            a = {n: np.load(Path(pool_dir) / split / f"{n}.npy", mmap_mode="r")
                 for n in ("tokens", "keys", "sent_offsets", "doc_offsets")}
            parts[split] = PoolPart(TokenizedDocs(a["tokens"], a["sent_offsets"], a["doc_offsets"]), a["keys"])
        _LOADED[pool_dir] = parts
    return _LOADED[pool_dir]
