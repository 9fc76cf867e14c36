"""Corpus shard -> tokenized documents, as flat arrays, in batches whose size bounds the memory.

The `sentences` column is read with pyarrow in row batches and every batch goes through one `tokenizers`
`encode_batch` call; the ids are moved into flat numpy arrays at once (`TokenizedDocs`: int32 tokens, int64
offsets), so a shard costs ~4 bytes per token and no offsets wrap at 2^31.

`datasets` is not used here on purpose: its `map` writes the whole tokenized corpus to an Arrow cache as
list<list<int32>> (32-bit offsets that overflow past 2^31 tokens) and converts every id list to Arrow and back,
which costs more than the tokenizer itself. Per-shard outputs that are reused after a crash take the place of
its cache; `datasets` remains the reader of fine-tuning tasks (`bertscale.finetune.tasks`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bertscale.data.instances import TokenizedDocs, concat_docs
from bertscale.errors import InputError

READ_BATCH_ROWS = 1024  # documents per encode_batch call: bounds the tokenizer's per-token Encoding objects
_TOKENIZERS: dict[str, Any] = {}  # one loaded tokenizer per process and path


def tokenizer(path: str) -> Any:
    """The tokenizer at `path`, loaded once per process, never truncating or padding (instances decide)."""
    if path not in _TOKENIZERS:
        from bertscale.tokenizer import load_tokenizer

        tok = load_tokenizer(path)
        tok.no_truncation()
        tok.no_padding()
        _TOKENIZERS[path] = tok
    return _TOKENIZERS[path]


def read_sentences(path: str | Path, rows: np.ndarray | None = None) -> Iterator[pa.ListArray]:
    """The `sentences` column of a corpus shard in batches (only `rows`, sorted, if given).

    A shard that cannot be read is an InputError naming it: a silently skipped shard would be data loss.
    """
    try:
        f = pq.ParquetFile(path)
        if rows is not None:
            yield _as_list(f.read(columns=["sentences"]).column(0).take(pa.array(rows, pa.int64())))
            return
        for batch in f.iter_batches(batch_size=READ_BATCH_ROWS, columns=["sentences"]):
            yield _as_list(batch.column(0))
    except (pa.ArrowException, OSError, KeyError) as e:
        raise InputError(f"cannot read corpus shard {path} ({e}); rebuild the corpus") from None


def _as_list(col: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], pa.list_(pa.string()))
    # Large offsets: a shard's sentences never wrap 32-bit offsets, whatever the shard's size.
    return col.cast(pa.large_list(pa.large_string()))


@dataclass
class ShardDocs:
    """Tokenized documents of one shard (every row, empty sentences dropped) and per-row counts."""

    docs: TokenizedDocs
    num_tokens: np.ndarray  # [rows]
    unk_tokens: np.ndarray  # [rows]
    empty_sentences: int


def tokenize_batch(col: pa.ListArray, tok: Any, unk_id: int) -> ShardDocs:
    """Token ids of every sentence of a batch of documents, as flat arrays (no Python object per token kept)."""
    sent_per_doc = np.diff(col.offsets.to_numpy()).astype(np.int64)
    texts = col.flatten().to_pylist()
    ids = [e.ids for e in tok.encode_batch([t or "" for t in texts], add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    doc_of_sent = np.repeat(np.arange(len(sent_per_doc)), sent_per_doc)
    kept = lengths > 0
    kept_per_doc = np.bincount(doc_of_sent[kept], minlength=len(sent_per_doc))
    sent_offsets = np.concatenate([[0], np.cumsum(lengths[kept])]).astype(np.int64)
    doc_offsets = np.concatenate([[0], np.cumsum(kept_per_doc)]).astype(np.int64)
    doc_tok = sent_offsets[doc_offsets]
    unk_cum = np.concatenate([[0], np.cumsum(tokens == unk_id)])
    return ShardDocs(TokenizedDocs(tokens, sent_offsets, doc_offsets), np.diff(doc_tok),
                     unk_cum[doc_tok[1:]] - unk_cum[doc_tok[:-1]], int((~kept).sum()))


def tokenize_shard(path: str | Path, tok: Any, unk_id: int, rows: np.ndarray | None = None) -> ShardDocs:
    """`tokenize_batch` over a whole shard (or its `rows`), batch by batch, joined at the end."""
    parts = [tokenize_batch(col, tok, unk_id) for col in read_sentences(path, rows)]
    if not parts:
        empty = TokenizedDocs(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(1, np.int64))
        return ShardDocs(empty, np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    return ShardDocs(concat_docs([p.docs for p in parts]), np.concatenate([p.num_tokens for p in parts]),
                     np.concatenate([p.unk_tokens for p in parts]), sum(p.empty_sentences for p in parts))


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


def heldout_rows(num_rows: int, fraction: float, seed: int, shard: int) -> np.ndarray:
    """Boolean mask of the rows of corpus shard `shard` that are held out: whole documents, never parts.

    One seeded draw per row: the split of a document depends only on its shard and row, so the B pool and the
    shard builder agree on it without talking to each other, and the held-out share is `fraction` on average
    over the corpus however it is sharded.
    """
    return np.random.default_rng([seed, 0x4E1D, shard]).random(num_rows) < fraction
