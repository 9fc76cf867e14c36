"""The pretraining-data stage: corpus shards -> tokenized documents -> instances -> memory-mapped shards.

1. The corpus's parquet shards are read with `datasets` and their `sentences` column tokenized with
   `Dataset.map(batched=True, num_proc=N)`. The Arrow cache lives in `<out>/.cache` under a fingerprint of the
   corpus manifest, the tokenizer's vocabulary and this stage's code, so a re-run (or a run after a crash)
   reuses the tokenized data.
2. The token ids are taken out of Arrow as flat arrays (`TokenizedDocs`); documents with no tokens or mostly
   [UNK] are dropped and counted; documents are split by document into train and held-out.
3. For every sequence-length phase and split, instances are created (`instances.py`), shuffled, and written as
   the arrays `PretrainingDataset` reads (see `dataset.py`). `manifest.json` is written last: its presence
   means the output is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bertscale.config import PipelineConfig, dump_config
from bertscale.data.dataset import MANIFEST, split_dir
from bertscale.data.instances import (
    Instances,
    TokenizedDocs,
    create_nsp_instances,
    create_packed_instances,
    materialize,
    split_long_sentences,
)
from bertscale.errors import InputError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Bump when the tokenized cache's content changes meaning (it keys datasets' cache with the inputs).
TOKENIZE_VERSION = "1"
SPLITS = ("train", "heldout")


@dataclass
class DataResult:
    """What the stage wrote and what it counted (flat numeric stats, ready to log as metrics)."""

    output_dir: Path
    manifest: dict
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        s = self.stats
        lines = [
            f"pretraining data ({self.manifest['mode']}) -> {self.output_dir}",
            f"  documents: {s['documents']} used ({s['documents_train']} train, {s['documents_heldout']} held out), "
            f"skipped: {s['skipped_empty']} empty, {s['skipped_unk']} mostly [UNK]; "
            f"{s['empty_shards']} empty shards, {s['empty_sentences']} empty sentences",
        ]
        for L in self.manifest["seq_lengths"]:
            for split in SPLITS:
                p = f"seq{L}.{split}"
                nsp = f", NSP random {s[p + '.nsp_random_ratio']:.3f}" if self.manifest["mode"] == "nsp" else ""
                lines.append(
                    f"  seq {L} {split}: {s[p + '.instances']} instances, {s[p + '.tokens']} tokens, "
                    f"real-token fraction {s[p + '.real_token_fraction']:.3f}{nsp}"
                )
        lines.append(f"  took {s['seconds']:.1f} s")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def corpus_shards(corpus: Path) -> tuple[list[Path], int, str | None]:
    """Non-empty parquet shards of a corpus dir (manifest order), the number of empty ones, the manifest sha256."""
    manifest_path = corpus / "manifest.json"
    if manifest_path.is_file():
        raw = manifest_path.read_bytes()
        try:
            names = [s["name"] for s in json.loads(raw)["shards"]]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{manifest_path} is not a corpus manifest ({e!r}); rebuild the corpus") from None
        shards, sha = [corpus / n for n in names], hashlib.sha256(raw).hexdigest()
    else:
        shards, sha = sorted(corpus.glob("shards/*.parquet")) or sorted(corpus.glob("*.parquet")), None
    if not shards:
        raise InputError(f"no corpus at {corpus}: expected manifest.json or parquet shards (run `bertscale corpus`)")
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise InputError(f"corpus shards listed in {manifest_path} are missing: {missing[:3]}; rebuild the corpus")
    nonempty = [p for p in shards if _shard_rows(p) > 0]
    if not nonempty:
        raise InputError(f"every corpus shard in {corpus} is empty: nothing to build pretraining data from")
    return nonempty, len(shards) - len(nonempty), sha


def _shard_rows(path: Path) -> int:
    """Rows of a corpus shard, after checking it is readable parquet with a `sentences` column."""
    try:
        meta = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"cannot read corpus shard {path} ({e}); rebuild the corpus") from None
    if "sentences" not in meta.schema_arrow.names:
        raise InputError(f"{path} has no `sentences` column; is it a bertscale corpus shard?")
    return meta.metadata.num_rows


class DocumentEncoder:
    """`datasets.map` function: token ids per sentence, empty sentences dropped and counted, [UNK]s counted."""

    def __init__(self, tok_path: str | Path, unk_id: int) -> None:
        from bertscale.tokenizer import encode_batch_for_datasets

        self.encode = encode_batch_for_datasets(tok_path, column="sentences", output="input_ids")
        self.unk_id = unk_id

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        encoded = self.encode(batch)["input_ids"]
        ids, empty, unk, tokens = [], [], [], []
        for sentences in encoded:
            kept = [s for s in sentences if s]
            ids.append(kept)
            empty.append(len(sentences) - len(kept))
            unk.append(sum(s.count(self.unk_id) for s in kept))
            tokens.append(sum(len(s) for s in kept))
        return {"input_ids": ids, "empty_sentences": empty, "unk_tokens": unk, "num_tokens": tokens}


def tokenize_corpus(
    shards: list[Path], tok_path: Path, unk_id: int, cache_dir: Path, num_proc: int, fingerprint: str
) -> Any:
    """The corpus as a `datasets.Dataset` with per-document `input_ids` (list of sentences of ids)."""
    import datasets

    ds = datasets.Dataset.from_parquet(
        [str(p) for p in shards], columns=["doc_id", "sentences"], cache_dir=str(cache_dir)
    )
    num_proc = max(1, min(num_proc, len(ds)))
    features = datasets.Features(
        {
            "doc_id": datasets.Value("string"),
            "input_ids": datasets.List(datasets.List(datasets.Value("int32"))),
            "empty_sentences": datasets.Value("int32"),
            "unk_tokens": datasets.Value("int64"),
            "num_tokens": datasets.Value("int64"),
        }
    )
    return ds.map(
        DocumentEncoder(tok_path, unk_id),
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["sentences"],
        features=features,
        new_fingerprint=f"bertscale-tokenized-{fingerprint}-np{num_proc}",
        desc="tokenizing",
    )


def docs_from_arrow(column: pa.ChunkedArray | pa.Array) -> TokenizedDocs:
    """Flat arrays straight from Arrow's list<list<int32>> buffers (no Python object per token)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    inner = arr.flatten()
    outer_off = arr.offsets.to_numpy().astype(np.int64)
    inner_off = inner.offsets.to_numpy().astype(np.int64)
    tokens = inner.flatten().to_numpy(zero_copy_only=False)
    return TokenizedDocs(tokens, inner_off - inner_off[0], outer_off - outer_off[0])


# ----------------------------------------------------------------------------------------------------------------
# Document selection and the held-out split
# ----------------------------------------------------------------------------------------------------------------
def keep_documents(
    num_tokens: np.ndarray, unk_tokens: np.ndarray, max_unk_fraction: float | None
) -> tuple[np.ndarray, dict[str, int]]:
    """Indices of usable documents and how many were skipped for each reason."""
    empty = num_tokens == 0
    frac = unk_tokens / np.maximum(num_tokens, 1)
    # Mostly-[UNK] documents are usually a script the vocabulary does not cover: only noise to the model.
    unk = ~empty & (frac > max_unk_fraction) if max_unk_fraction is not None else np.zeros_like(empty)
    keep = np.flatnonzero(~empty & ~unk)
    return keep, {"skipped_empty": int(empty.sum()), "skipped_unk": int(unk.sum())}


def heldout_split(num_docs: int, fraction: float, seed: int, min_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out document indices (in a seeded random order): whole documents, never parts.

    `min_docs` is the fewest documents a non-empty split may have (NSP needs two: B comes from another one).
    """
    order = np.random.default_rng([seed, 0x4E1D]).permutation(num_docs)
    n_held = int(round(num_docs * fraction))
    if fraction > 0:
        n_held = max(n_held, min_docs)
    if num_docs - n_held < min_docs:
        raise InputError(
            f"only {num_docs} usable documents: too few for a training split of >= {min_docs} documents and "
            f"data.heldout_fraction={fraction}; add documents or lower data.heldout_fraction"
        )
    # Shuffled document order, as the reference shuffles documents (packed sequences join neighbours).
    return order[n_held:], order[:n_held]


# ----------------------------------------------------------------------------------------------------------------
# Instances and their arrays
# ----------------------------------------------------------------------------------------------------------------
def make_instances(docs: TokenizedDocs, cfg: PipelineConfig, seq_len: int, rng: np.random.Generator
                   ) -> tuple[TokenizedDocs, Instances, int]:
    """Instances of one phase and split (shuffled), the docs their spans point into, and sentences cut."""
    d = cfg.data
    if d.mode == "nsp":
        # Half the pair budget per piece: a run-on sentence then still fills A and B instead of being truncated.
        docs, n_cut = split_long_sentences(docs, max(1, (seq_len - 3) // 2))
        inst = create_nsp_instances(docs, seq_len, d.short_seq_prob, d.dupe_factor, rng)
    else:
        docs, n_cut = split_long_sentences(docs, seq_len - 2)
        inst = create_packed_instances(docs, seq_len)
    return docs, inst.take(rng.permutation(len(inst))), n_cut


def write_split(out: Path, docs: TokenizedDocs, inst: Instances, seq_len: int, special: dict[str, int],
                vocab_size: int) -> dict[str, float]:
    """The four arrays of one split (see dataset.py); returns its counts."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    n = len(inst)
    token_dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    lengths = np.zeros(n, dtype=np.int64)
    len_a = np.zeros(n, dtype=np.uint16)
    pieces = []
    for i in range(n):
        ids, len_a[i] = materialize(docs, inst, i, special["cls"], special["sep"])
        lengths[i] = len(ids)
        pieces.append(ids.astype(token_dtype))
    if n and int(lengths.max()) > seq_len:
        raise AssertionError(f"an instance has {int(lengths.max())} tokens > seq_len {seq_len}")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=token_dtype)
    for name, arr in (("input_ids", tokens), ("offsets", offsets), ("len_a", len_a),
                      ("nsp_label", inst.nsp_label.astype(np.int8))):
        np.save(out / f"{name}.npy", arr)
    nsp = inst.nsp_label[inst.nsp_label >= 0]
    return {
        "instances": n,
        "tokens": int(offsets[-1]),
        "real_token_fraction": float(offsets[-1] / (n * seq_len)) if n else 0.0,
        "mean_length": float(lengths.mean()) if n else 0.0,
        "nsp_random_ratio": float(nsp.mean()) if len(nsp) else 0.0,
    }


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------
def _load_tokenizer(tok_path: Path) -> tuple[Any, dict[str, int], str, int]:
    from bertscale.tokenizer import load_tokenizer, special_ids, tokenizer_fingerprint

    tok = load_tokenizer(tok_path)
    if tok.truncation is not None:
        log.warning("tokenizer %s truncates its inputs (%s): long sentences will be cut short", tok_path,
                    tok.truncation)
    return tok, special_ids(tok), tokenizer_fingerprint(tok), tok.get_vocab_size(with_added_tokens=True)


def _tokenized_docs(cfg: PipelineConfig, corpus: Path, tok_path: Path, out: Path, unk_id: int, tok_fp: str
                    ) -> tuple[TokenizedDocs, dict[str, int], str | None, int]:
    """Tokenize (or reuse the cache), drop unusable documents; returns docs, counts, corpus sha, doc count."""
    shards, empty_shards, corpus_sha = corpus_shards(corpus)
    # The cache key names everything the tokenized data depends on; size and mtime catch a shard rewritten in
    # place without a new manifest.
    files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in shards]
    key = hashlib.sha256(json.dumps([corpus_sha, files, tok_fp, TOKENIZE_VERSION]).encode()).hexdigest()[:24]
    num_proc = cfg.data.num_proc or os.cpu_count() or 1
    ds = tokenize_corpus(shards, tok_path, unk_id, out / ".cache", num_proc, key)
    table = ds.with_format("arrow")[:]
    num_tokens = table.column("num_tokens").to_numpy()
    keep, counts = keep_documents(num_tokens, table.column("unk_tokens").to_numpy(), cfg.data.max_unk_fraction)
    docs = docs_from_arrow(table.column("input_ids")).select(keep)
    sent_per_doc = np.diff(docs.doc_offsets)
    counts.update(
        empty_shards=empty_shards,
        empty_sentences=int(table.column("empty_sentences").to_numpy().sum()),
        one_sentence_docs=int((sent_per_doc == 1).sum()),
        unk_tokens=int(table.column("unk_tokens").to_numpy()[keep].sum()),
    )
    return docs, counts, corpus_sha, len(table)


def _build_phases(cfg: PipelineConfig, docs: TokenizedDocs, splits: dict[str, np.ndarray], out: Path,
                  special: dict[str, int], vocab_size: int) -> dict[str, dict[str, dict]]:
    """Write every phase and split; returns their counts as {seq_len: {split: counts}}."""
    phases: dict[str, dict[str, dict]] = {}
    for seq_len in cfg.data.seq_lengths:
        phases[str(seq_len)] = {}
        for code, split in enumerate(SPLITS):
            # One generator per (phase, split): adding a phase never changes the instances of another.
            rng = np.random.default_rng([cfg.data.seed, seq_len, code])
            split_docs, inst, n_cut = make_instances(docs.select(splits[split]), cfg, seq_len, rng)
            counts = write_split(split_dir(out, seq_len, split), split_docs, inst, seq_len, special, vocab_size)
            phases[str(seq_len)][split] = {**counts, "documents": len(splits[split]), "long_sentences_cut": n_cut}
            log.info("seq %d %s: %d instances, %d tokens", seq_len, split, counts["instances"], counts["tokens"])
    return phases


def build_pretraining_data(cfg: PipelineConfig, corpus: str | Path | None = None,
                           tokenizer: str | Path | None = None) -> DataResult:
    """Tokenize the corpus and write instances for every phase in `cfg.data.seq_lengths` (see module doc)."""
    t0 = time.perf_counter()
    corpus_dir = Path(corpus) if corpus else cfg.stage_dir("corpus")
    tok_path = Path(tokenizer) if tokenizer else cfg.stage_dir("tokenizer")
    out = cfg.stage_dir("data")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    _, special, tok_fp, vocab_size = _load_tokenizer(tok_path)
    docs, counts, corpus_sha, n_input = _tokenized_docs(cfg, corpus_dir, tok_path, out, special["unk"], tok_fp)
    min_docs = 2 if cfg.data.mode == "nsp" else 1
    train_ids, held_ids = heldout_split(docs.num_docs, cfg.data.heldout_fraction, cfg.data.seed, min_docs)
    phases = _build_phases(cfg, docs, {"train": train_ids, "heldout": held_ids}, out, special, vocab_size)
    stats: dict[str, Any] = {"documents_input": n_input, "documents": docs.num_docs,
                             "documents_train": len(train_ids), "documents_heldout": len(held_ids),
                             "corpus_tokens": int(len(docs.tokens)), **counts}
    for L, by_split in phases.items():
        stats.update({f"seq{L}.{split}.{k}": v for split, c in by_split.items() for k, v in c.items()})
    stats["seconds"] = time.perf_counter() - t0
    manifest = {
        "format": FORMAT_VERSION, "mode": cfg.data.mode, "seq_lengths": list(cfg.data.seq_lengths),
        "tokenizer": {"path": str(tok_path), "fingerprint": tok_fp, "vocab_size": vocab_size,
                      "special_ids": special},
        "corpus": {"path": str(corpus_dir), "manifest_sha256": corpus_sha},
        "phases": phases, "counts": {k: v for k, v in stats.items() if not k.startswith("seq")},
        "config": dump_config(cfg)["data"],
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / MANIFEST)
    return DataResult(output_dir=out, manifest=manifest, stats=stats)
