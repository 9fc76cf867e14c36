"""One corpus shard -> one output shard: read, tokenize, filter, split, build instances, write atomically.

Everything a shard needs is in a picklable `ShardJob`, so shards are built in any order, in any process, and
the output of shard k depends only on shard k, the B pool (`nsp_pool.py`) and the config: the same bytes
whatever `data.num_proc` is.

Integrity protocol of an output shard `<out>/shards/<k>/`:

1. Its arrays and then its `shard.json` (the shard's counts, its build key and the sha256 of every file) are
   written into a temporary sibling directory `.tmp-<k>-<pid>`.
2. The temporary directory is renamed to `<k>` (after removing an incomplete `<k>` left by a killed run).
   A directory named `<k>` is therefore complete exactly when it holds `shard.json`.
3. A re-run reuses `<k>` when its `shard.json` carries the same build key and every file still has its
   recorded sha256; otherwise the shard is rebuilt. Leftover `.tmp-*` directories are never read.
4. An OSError while writing (disk full, permissions) removes the temporary directory and raises an InputError
   naming the path: nothing half-written is ever marked complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertscale.data.dataset import SHARD_MARKER, shard_split_dir
from bertscale.data.documents import heldout_rows, keep_documents, tokenize_shard, tokenizer
from bertscale.data.instances import (
    BCandidates,
    Instances,
    TokenizedDocs,
    concat_docs,
    create_nsp_instances,
    create_packed_instances,
    materialize_all,
    split_long_sentences,
)
from bertscale.data.nsp_pool import PoolPart, load_pool
from bertscale.data.storage import read_verified, save_arrays, staged_dir, write_json
from bertscale.errors import InputError

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class BuildSettings:
    """What every shard of one build shares: tokenizer, special ids and the data config's relevant fields."""

    tok_path: str
    special: dict[str, int]
    vocab_size: int
    mode: str
    seq_lengths: tuple[int, ...]
    short_seq_prob: float
    dupe_factor: int
    heldout_fraction: float
    seed: int
    max_unk_fraction: float | None


@dataclass(frozen=True)
class ShardJob:
    """Build corpus shard `index` (at `source`) into `<out>/shards/<index>`; `key` names all its inputs."""

    index: int
    source: str
    out: str
    key: str
    settings: BuildSettings
    pool_dir: str | None  # the B pool (NSP mode)


# ----------------------------------------------------------------------------------------------------------------
# Instances of one shard
# ----------------------------------------------------------------------------------------------------------------
def doc_keys(shard: int, rows: np.ndarray) -> np.ndarray:
    """Corpus-wide document identity: (shard, row) in one int64."""
    return (np.int64(shard) << 32) | rows.astype(np.int64)


def shard_instances(docs: TokenizedDocs, keys: np.ndarray, pool: PoolPart | None, s: BuildSettings, seq_len: int,
                    rng: np.random.Generator) -> tuple[TokenizedDocs, Instances, int]:
    """Instances of one split of one shard for one phase (shuffled), the docs their spans point into, and
    the number of sentences cut. NSP takes random Bs from `pool` (the split's part of the B pool)."""
    if s.mode == "packed":
        docs, n_cut = split_long_sentences(docs, seq_len - 2)
        inst = create_packed_instances(docs, seq_len)
        return docs, inst.take(rng.permutation(len(inst))), n_cut
    if docs.num_docs == 0:
        return docs, Instances.empty(), 0
    n_src = docs.num_docs
    # The twin of a source document is its copy in the pool, if it was sampled: B must never be that either.
    pos = np.searchsorted(pool.keys, keys)
    found = (pos < len(pool.keys)) & (pool.keys[np.minimum(pos, len(pool.keys) - 1)] == keys)
    twin = np.where(found, n_src + pos, -1)
    candidates = BCandidates(n_src, n_src + pool.docs.num_docs, twin)
    if pool.docs.num_docs - int(found.any()) < 1:
        raise InputError("too few usable documents for NSP pairs in a split (a random B must come from another "
                         "document): add documents, raise data.heldout_fraction, or set it to 0")
    # Half the pair budget per piece: a run-on sentence then still fills A and B instead of being truncated.
    both, n_cut = split_long_sentences(concat_docs([docs, pool.docs]), max(1, (seq_len - 3) // 2))
    inst = create_nsp_instances(both, seq_len, s.short_seq_prob, s.dupe_factor, rng, n_src, candidates)
    return both, inst.take(rng.permutation(len(inst))), n_cut


def split_arrays(docs: TokenizedDocs, inst: Instances, seq_len: int, s: BuildSettings
                 ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The four arrays of one split (see dataset.py) and its raw counts (sums, so shards add up)."""
    tokens, offsets, len_a = materialize_all(docs, inst, s.special["cls"], s.special["sep"])
    if len(inst) and int(np.diff(offsets).max()) > seq_len:
        raise AssertionError(f"an instance has {int(np.diff(offsets).max())} tokens > seq_len {seq_len}")
    token_dtype = np.uint16 if s.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    arrays = {"input_ids": tokens.astype(token_dtype), "offsets": offsets, "len_a": len_a.astype(np.uint16),
              "nsp_label": inst.nsp_label.astype(np.int8)}
    labelled = inst.nsp_label[inst.nsp_label >= 0]
    counts = {"instances": len(inst), "tokens": int(offsets[-1]), "nsp_random": int(labelled.sum()),
              "nsp_labelled": len(labelled)}
    return arrays, counts


# ----------------------------------------------------------------------------------------------------------------
# One shard, end to end
# ----------------------------------------------------------------------------------------------------------------
def shard_name(index: int) -> str:
    return f"{index:05d}"


def build_shard(job: ShardJob) -> dict:
    """Build (or reuse, after verifying) output shard `job.index`; returns its record (see module doc)."""
    final = Path(job.out) / "shards" / shard_name(job.index)
    record = read_verified(final, SHARD_MARKER, job.key)
    if record is not None:
        return {**record, "reused": True}
    s = job.settings
    splits, counts = split_documents(job)
    pool = load_pool(job.pool_dir) if job.pool_dir else None
    with staged_dir(final) as tmp:
        phases, files = {}, {}
        for seq_len in s.seq_lengths:
            phases[str(seq_len)] = {}
            for code, split in enumerate(SPLITS):
                # One generator per (shard, phase, split): adding a phase never changes another's instances.
                rng = np.random.default_rng([s.seed, seq_len, code, job.index])
                docs, inst, n_cut = shard_instances(*splits[split], b_source(pool, split), s, seq_len, rng)
                arrays, c = split_arrays(docs, inst, seq_len, s)
                files.update(save_arrays(shard_split_dir(tmp, seq_len, split), arrays, tmp))
                phases[str(seq_len)][split] = {**c, "documents": splits[split][0].num_docs,
                                               "long_sentences_cut": n_cut}
        record = {"key": job.key, "source": job.source, "counts": counts, "phases": phases, "files": files}
        write_json(tmp / SHARD_MARKER, record)
    return {**record, "reused": False}


def b_source(pool: dict[str, PoolPart] | None, split: str) -> PoolPart | None:
    """The pool part random Bs of `split` come from: the split's own, so that training never sees held-out
    text, except when a tiny corpus held out fewer than two documents: then held-out pairs borrow training
    text as B (evaluation still never trains on anything)."""
    if pool is None:
        return None
    if split == "heldout" and pool["heldout"].docs.num_docs < 2:
        return pool["train"]
    return pool[split]


def split_documents(job: ShardJob) -> tuple[dict[str, tuple[TokenizedDocs, np.ndarray]], dict[str, int]]:
    """The shard's usable documents of each split (shuffled) with their keys, and the document counts."""
    s = job.settings
    sd = tokenize_shard(job.source, tokenizer(s.tok_path), s.special["unk"])
    keep, counts = keep_documents(sd.num_tokens, sd.unk_tokens, s.max_unk_fraction)
    held = heldout_rows(len(sd.num_tokens), s.heldout_fraction, s.seed, job.index)
    splits = {}
    for code, split in enumerate(SPLITS):
        rows = keep[held[keep] == (split == "heldout")]
        # Shuffled document order, as the reference shuffles documents (packed sequences join neighbours).
        rows = rows[np.random.default_rng([s.seed, 0x5EED, job.index, code]).permutation(len(rows))]
        splits[split] = (sd.docs.select(rows), doc_keys(job.index, rows))
    counts.update(documents_input=len(sd.num_tokens), empty_sentences=sd.empty_sentences,
                  one_sentence_docs=int((np.diff(sd.docs.doc_offsets)[keep] == 1).sum()),
                  unk_tokens=int(sd.unk_tokens[keep].sum()), corpus_tokens=int(sd.num_tokens[keep].sum()),
                  documents_train=splits["train"][0].num_docs, documents_heldout=splits["heldout"][0].num_docs)
    return splits, counts
