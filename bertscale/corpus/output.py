"""Corpus stage files: per-unit spill files written by workers, the final parquet shards, the manifest and the
quarantine list.

Every write goes through Beam's `FileSystems` (local paths and gs:// alike). Final shards are written by the
workers with fixed pyarrow settings and no timestamps, in the canonical document order, and placed by their
offset in the kept text (`assign_shards`), so the same input and config give byte-identical shards whatever the
number of workers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from bertscale.config import is_uri
from bertscale.corpus.readers import doc_sort_key

SHARD_SCHEMA = pa.schema([
    ("doc_id", pa.string()),
    ("text", pa.string()),
    ("sentences", pa.list_(pa.string())),
    ("source", pa.string()),
    ("metadata", pa.string()),
])
SPILL_SCHEMA = SHARD_SCHEMA.append(pa.field("minhash", pa.binary())).append(pa.field("text_bytes", pa.int64()))
_SPILL_INPUT = ("doc_id", "text", "sentences", "source", "metadata", "minhash")
_SHARD_ROW_GROUP = 1000
_SPILL_FLUSH_ROWS = 2000


def join(base: str, *parts: str) -> str:
    return FileSystems.join(base, *parts)


def write_bytes(path: str, data: bytes) -> None:
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        fh.write(data)


def open_for_read(path: str):
    """A seekable binary file on any Beam filesystem, read as stored (no decompression by file name)."""
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_bytes(path: str) -> bytes:
    with open_for_read(path) as fh:
        return fh.read()


def write_json(path: str, obj: object) -> None:
    """Canonical JSON (sorted keys, fixed indentation): equal content gives equal bytes."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def read_json(path: str) -> object:
    return json.loads(read_bytes(path))


def write_json_atomic(path: str, obj: object) -> None:
    """`write_json` through a temporary name and a rename, so readers never see a half-written file."""
    tmp = path + ".tmp"
    write_json(tmp, obj)
    delete_matching(path)  # object stores' rename is copy + delete and may refuse to overwrite
    FileSystems.rename([tmp], [path])


def delete_matching(pattern: str) -> None:
    paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    if paths:
        FileSystems.delete(paths)


def delete_tree(path: str) -> None:
    """Remove a directory and everything under it. Object stores have no directories, only names under a
    prefix, so for a URI every object under `path/` is deleted."""
    if is_uri(path):
        delete_matching(join(path, "**"))
    elif FileSystems.exists(path):
        FileSystems.delete([path])


def metadata_json(metadata: dict) -> str:
    # Lone surrogates from JSON escapes cannot be stored as UTF-8; replace them rather than fail the write.
    text = json.dumps(metadata, sort_keys=True, ensure_ascii=False, default=str)
    return text.encode("utf-8", errors="replace").decode("utf-8")


# ------------------------------------------------------------------------------------------------------------
# Spill files: one per work unit, written by the worker that processed it, read by the shard writers
# ------------------------------------------------------------------------------------------------------------
class SpillWriter:
    """Streams a unit's kept documents into one parquet file, a few thousand rows per row group."""

    def __init__(self, path: str) -> None:
        self.path, self.rows = path, 0
        self._fh = FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)
        self._writer = pq.ParquetWriter(self._fh, SPILL_SCHEMA, compression="lz4")
        self._columns: dict[str, list] = {name: [] for name in _SPILL_INPUT}

    def add(self, doc_id: str, text: str, sentences: list[str], source: str, metadata: str,
            minhash: bytes | None) -> None:
        for name, value in zip(_SPILL_INPUT, (doc_id, text, sentences, source, metadata, minhash)):
            self._columns[name].append(value)
        self.rows += 1
        if len(self._columns["doc_id"]) >= _SPILL_FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._columns["doc_id"]:
            text = pa.array(self._columns.pop("text"), type=pa.string())
            # UTF-8 text bytes per row, computed once in C so shard planning never reads the text column.
            arrays = {**self._columns, "text": text, "text_bytes": pc.binary_length(text).cast(pa.int64())}
            self._writer.write_table(pa.table(arrays, schema=SPILL_SCHEMA))
            self._columns = {name: [] for name in _SPILL_INPUT}

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._fh.close()


def read_spill(path: str, columns: list[str] | None = None) -> pa.Table:
    with open_for_read(path) as fh:
        return pq.read_table(fh, columns=columns)


# ------------------------------------------------------------------------------------------------------------
# Final shards
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ShardInfo:
    name: str
    rows: int
    bytes: int
    sha256: str
    text_bytes: int
    sentences: int


def shard_name(index: int) -> str:
    return f"shards/part-{index:05d}.parquet"


def assign_shards(offset: int, sizes: np.ndarray, target_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
    """(shard slot, row positions) of a unit's kept documents, given the kept text bytes of all earlier units.

    Slot k holds the documents whose first byte lies in [k * target, (k + 1) * target) of the concatenated kept
    text in document order. That needs only each unit's own sizes and one prefix sum over unit totals, so every
    unit is placed independently and the result cannot depend on how the work was spread over workers.
    """
    starts = offset + np.cumsum(sizes) - sizes
    slots = starts // target_bytes
    for slot in np.unique(slots):
        yield int(slot), np.flatnonzero(slots == slot)


def read_spill_rows(path: str, rows: np.ndarray, columns: list[str]) -> Iterator[pa.Table]:
    """The given rows (ascending) of a spill file, one spill row group at a time: memory stays bounded by a row
    group, not by the unit."""
    with open_for_read(path) as fh:
        spill = pq.ParquetFile(fh)
        bounds = np.cumsum([0] + [spill.metadata.row_group(g).num_rows for g in range(spill.num_row_groups)])
        groups = np.searchsorted(bounds, rows, side="right") - 1
        for g in np.unique(groups):
            wanted = rows[groups == g] - bounds[g]
            yield spill.read_row_group(int(g), columns=columns).take(pa.array(wanted, type=pa.int64()))


class _HashingSink:
    """A write-only file that hashes and counts what passes through it to `fh`."""

    def __init__(self, fh) -> None:
        self.fh, self.sha256, self.size, self.closed = fh, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        data = bytes(data)
        self.sha256.update(data)
        self.size += len(data)
        return self.fh.write(data) or len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.closed = True


def write_shard(out_dir: str, index: int, chunks: Iterable[pa.Table]) -> ShardInfo:
    """Stream a shard's rows (tables in document order) into fixed-size row groups, hashing as it writes.

    Memory is bounded by a row group, not by the shard; the bytes equal a single `write_table` of all rows with
    the same settings, so shards are identical whatever the chunking of their input.
    """
    name = shard_name(index)
    rows = text_bytes = sentences = 0
    with FileSystems.create(join(out_dir, name), compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        sink = _HashingSink(fh)
        writer = pq.ParquetWriter(sink, SHARD_SCHEMA, compression="zstd", compression_level=1,
                                  use_dictionary=False, write_statistics=True, store_schema=True)
        for group in _row_groups((chunk.select(SHARD_SCHEMA.names) for chunk in chunks), _SHARD_ROW_GROUP):
            writer.write_table(group, row_group_size=_SHARD_ROW_GROUP)
            rows += group.num_rows
            sentences += int(pc.sum(pc.list_value_length(group.column("sentences"))).as_py() or 0)
            text_bytes += int(pc.sum(pc.binary_length(group.column("text"))).as_py() or 0)
        if not rows:
            writer.write_table(SHARD_SCHEMA.empty_table())
        writer.close()
    return ShardInfo(name, rows, sink.size, sink.sha256.hexdigest(), text_bytes, sentences)


def _row_groups(chunks: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    """Tables re-cut into groups of exactly `size` rows (the last one shorter), each one contiguous: the parquet
    writer breaks pages at chunk boundaries, so the bytes would otherwise depend on how the input was chunked."""
    held: list[pa.Table] = []
    count = 0
    for chunk in chunks:
        while chunk.num_rows:
            head = chunk.slice(0, size - count)
            chunk = chunk.slice(head.num_rows)
            held.append(head)
            count += head.num_rows
            if count == size:
                yield pa.concat_tables(held).combine_chunks()
                held, count = [], 0
    if count:
        yield pa.concat_tables(held).combine_chunks()


# ------------------------------------------------------------------------------------------------------------
# Quarantine and manifest
# ------------------------------------------------------------------------------------------------------------
def write_quarantine(path: str, records: list[dict]) -> None:
    """One JSON object per rejected record: file, position, reason; sorted so re-runs give the same bytes."""
    records = sorted(records, key=lambda r: (r["file"], r["position"], r["reason"]))
    lines = [json.dumps({"file": r["file"], "position": r["position"], "reason": r["reason"]}, ensure_ascii=False)
             for r in records]
    write_bytes(path, ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))


REPORT_FIELDS = ("doc_id", "source", "task", "split", "ngram", "action", "passages")


def write_decontamination_report(path: str, records: list[dict]) -> None:
    """One JSON object per (document, task, split) of a document that matched an eval set, in document order:
    the first matching n-gram, and whether the document went or lost `passages` sentences."""
    records = sorted(records, key=lambda r: (*doc_sort_key(r["doc_id"]), r["task"], r["split"]))
    lines = [json.dumps({k: r[k] for k in REPORT_FIELDS}, ensure_ascii=False) for r in records]
    write_bytes(path, ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))


def file_fingerprint(path: str) -> dict:
    """Size and sha256 of an input file, streamed."""
    digest, size = hashlib.sha256(), 0
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"path": path, "size": size, "sha256": digest.hexdigest()}
