"""Corpus stage files: per-unit spill files written by workers, the final parquet shards, the manifest and the
quarantine list.

Every write goes through Beam's `FileSystems` (local paths and gs:// alike). Final shards are written with fixed
pyarrow settings and no timestamps, in the canonical document order, and cut by accumulated text bytes, so the same
input and config give byte-identical shards whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from bertscale.config import is_uri

SHARD_SCHEMA = pa.schema([
    ("doc_id", pa.string()),
    ("text", pa.string()),
    ("sentences", pa.list_(pa.string())),
    ("source", pa.string()),
    ("metadata", pa.string()),
])
SPILL_SCHEMA = SHARD_SCHEMA.append(pa.field("minhash", pa.binary()))
_SHARD_ROW_GROUP = 1000
_SPILL_FLUSH_ROWS = 2000


def join(base: str, *parts: str) -> str:
    return FileSystems.join(base, *parts)


def write_bytes(path: str, data: bytes) -> None:
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        fh.write(data)


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
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
# Spill files: one per work unit, written by the worker, read back by the shard writer
# ------------------------------------------------------------------------------------------------------------
class SpillWriter:
    """Streams a unit's kept documents into one parquet file, a few thousand rows per row group."""

    def __init__(self, path: str) -> None:
        self.path, self.rows = path, 0
        self._fh = FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)
        self._writer = pq.ParquetWriter(self._fh, SPILL_SCHEMA, compression="lz4")
        self._columns: dict[str, list] = {name: [] for name in SPILL_SCHEMA.names}

    def add(self, doc_id: str, text: str, sentences: list[str], source: str, metadata: str,
            minhash: bytes | None) -> None:
        for name, value in zip(SPILL_SCHEMA.names, (doc_id, text, sentences, source, metadata, minhash)):
            self._columns[name].append(value)
        self.rows += 1
        if len(self._columns["doc_id"]) >= _SPILL_FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._columns["doc_id"]:
            self._writer.write_table(pa.table(self._columns, schema=SPILL_SCHEMA))
            self._columns = {name: [] for name in SPILL_SCHEMA.names}

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._fh.close()


def read_spill(path: str, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        yield from pq.ParquetFile(fh).iter_batches(batch_size=4096, columns=columns)


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


def _write_shard(out_dir: str, index: int, tables: list[pa.Table], text_bytes: int) -> ShardInfo:
    """Serialize in memory (one shard is bounded by target_shard_bytes), hash, then write the bytes once."""
    table = pa.concat_tables(tables).select(SHARD_SCHEMA.names) if tables else SHARD_SCHEMA.empty_table()
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", compression_level=1, row_group_size=_SHARD_ROW_GROUP,
                   use_dictionary=False, write_statistics=True, store_schema=True)
    data = sink.getvalue().to_pybytes()
    name = shard_name(index)
    write_bytes(join(out_dir, name), data)
    sentences = int(pc.sum(pc.list_value_length(table.column("sentences"))).as_py() or 0)
    return ShardInfo(name, table.num_rows, len(data), hashlib.sha256(data).hexdigest(), text_bytes, sentences)


@dataclass
class ShardCutter:
    """Accumulates kept rows in order and cuts a shard when its text reaches `target_bytes`."""

    out_dir: str
    target_bytes: int
    shards: list[ShardInfo] = field(default_factory=list)
    _tables: list[pa.Table] = field(default_factory=list)
    _bytes: int = 0

    def add(self, table: pa.Table) -> None:
        while table.num_rows:
            sizes = pc.binary_length(table.column("text")).to_numpy(zero_copy_only=False)
            cumulative = sizes.cumsum() + self._bytes
            full = int((cumulative < self.target_bytes).sum()) + 1  # rows until the shard reaches the target
            take = min(full, table.num_rows)
            self._tables.append(table.slice(0, take))
            self._bytes = int(cumulative[take - 1])
            table = table.slice(take)
            if self._bytes >= self.target_bytes:
                self.cut()

    def cut(self) -> None:
        if self._tables:
            self.shards.append(_write_shard(self.out_dir, len(self.shards), self._tables, self._bytes))
        self._tables, self._bytes = [], 0

    def finish(self) -> list[ShardInfo]:
        self.cut()
        if not self.shards:  # an empty corpus still gets one (empty) shard so readers find the schema
            self.shards.append(_write_shard(self.out_dir, 0, [], 0))
        return self.shards


def write_shards(spill_paths: Iterable[str], drop: set[str], out_dir: str, target_bytes: int,
                 progress: bool = False, total: int | None = None) -> list[ShardInfo]:
    """Stream the spill files in order, skip dropped ids, and cut shards by text bytes."""
    cutter = ShardCutter(out_dir, target_bytes)
    drop_array = pa.array(sorted(drop), type=pa.string())
    bar = _progress_bar(progress, total)
    for path in spill_paths:
        for batch in read_spill(path, columns=SHARD_SCHEMA.names):
            table = pa.Table.from_batches([batch])
            if len(drop_array):
                table = table.filter(pc.invert(pc.is_in(table.column("doc_id"), value_set=drop_array)))
            cutter.add(table)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return cutter.finish()


def _progress_bar(enabled: bool, total: int | None):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="writing shards", unit="unit", leave=False)


# ------------------------------------------------------------------------------------------------------------
# Quarantine and manifest
# ------------------------------------------------------------------------------------------------------------
def write_quarantine(path: str, records: list[dict]) -> None:
    """One JSON object per rejected record: file, position, reason; sorted so re-runs give the same bytes."""
    records = sorted(records, key=lambda r: (r["file"], r["position"], r["reason"]))
    lines = [json.dumps({"file": r["file"], "position": r["position"], "reason": r["reason"]}, ensure_ascii=False)
             for r in records]
    write_bytes(path, ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))


def file_fingerprint(path: str) -> dict:
    """Size and sha256 of an input file, streamed."""
    digest, size = hashlib.sha256(), 0
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"path": path, "size": size, "sha256": digest.hexdigest()}
