"""Input discovery and streaming readers for the corpus stage.

Inputs are paths, directories, globs or URIs resolved through Beam's `FileSystems`, so gs://, s3:// and hdfs://
work through the same code as local paths. Each file becomes one or more `WorkUnit`s so that workers share even a
single big file. Line-based files (WikiExtractor, JSONL, blank-line separated text) are split into byte ranges of
about `bundle_bytes`. A range owns the records that *start* inside it, as Beam's text source does, and record
positions are byte offsets in the decompressed file, so document ids never depend on how the files were split.
Parquet files larger than `bundle_bytes` are split into ranges of whole row groups (positions are row indices).

Compressed files are split at BGZF members and zstd frames found from their headers alone: see
`bertscale.corpus.compression`. Those under `bundle_bytes / _MAX_TEXT_RATIO` are not opened by the launcher: they
could not fill two units.

Readers stream line by line with a length cap: memory stays bounded by `max_doc_bytes` whatever the file size.
Anything unusable becomes a `Rejected` record with its position and reason, never an exception. A compressed stream
that fails is rejected at the decompressed offset where its readable content ends, by the unit whose range that
offset cuts short, so a truncated file gives the same records and the same one rejection read as one unit or many.
A corrupt member in the middle of a split file may be reported by two neighbouring units, and the units after it
still read their records.
"""

from __future__ import annotations

import html
import io
import json
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from bertscale.config import CorpusConfig, is_uri
from bertscale.corpus.cleaning import DecodeError, decode_utf8
from bertscale.corpus.compression import DECODE_ERRORS, compression_of, decodes, open_decoded, plan_split
from bertscale.errors import InputError

LINE_FORMATS = ("wikiextractor", "jsonl", "txt_blank_line")
_HEAD_BYTES = 8192
_BLANK_LINE_MAX = 4096  # a longer whitespace-only line counts as text, so range readers can look back a bounded way
_LOOK_BACK = _BLANK_LINE_MAX + 2  # the furthest a range reader seeks before its start (see `_prev_line_blank`)
_MAX_TEXT_RATIO = 8  # text compresses less than this, so a smaller compressed file holds at most one bundle
_GLOB = re.compile(r"[*?\[]")
_DOC_OPEN = re.compile(rb"<doc\b([^>]*)>")
_ATTR = re.compile(rb'(\w+)="([^"]*)"')
# Everything a truncated or corrupt archive or parquet file raises while being read.
_STREAM_ERRORS = (*DECODE_ERRORS, pa.ArrowException)


@dataclass(frozen=True)
class InputFile:
    path: str  # full path or URI, as matched
    rel: str  # stable name relative to its input root; prefixes document ids
    size: int


@dataclass(frozen=True)
class WorkUnit:
    """A slice of one input file: a byte range [start, end) of its decompressed content or, for parquet, row groups
    [start, end). A unit of a split compressed file decompresses from the gzip member or zstd frame at compressed
    offset `entry_offset`, whose content begins at `entry_position`, at least `_LOOK_BACK` bytes before `start`."""

    file: InputFile
    start: int = 0
    end: int | None = None  # None = to the end of the file
    format: str | None = None  # resolved format; None = sniffed by the worker
    entry_offset: int = 0
    entry_position: int = 0


@dataclass
class Record:
    position: int  # byte offset of the record in the decompressed file, or parquet row index
    text: str
    metadata: dict = field(default_factory=dict)
    invalid_bytes: int = 0  # invalid UTF-8 bytes dropped while decoding


@dataclass
class Rejected:
    position: int
    reason: str


def make_doc_id(rel: str, position: int) -> str:
    return f"{rel}#{position:012d}"


def doc_sort_key(doc_id: str) -> tuple[str, int]:
    """The canonical document order: by source name, then position within it."""
    rel, _, pos = doc_id.rpartition("#")
    return rel, int(pos)


# ------------------------------------------------------------------------------------------------------------
# Discovery
# ------------------------------------------------------------------------------------------------------------
def _is_local(path: str) -> bool:
    return not is_uri(path)


def _match(pattern: str) -> list:
    try:
        return list(FileSystems.match([pattern])[0].metadata_list)
    except Exception as err:  # Beam wraps every filesystem failure (missing plugin, auth, bad bucket) in one type
        raise InputError(f"cannot list {pattern}: {str(err).splitlines()[0]}") from None


def _match_spec(spec: str) -> tuple[list, str]:
    """Matched file metadata of one input spec, and the root that document names are made relative to."""
    if _is_local(spec):
        # Document ids are made relative to the input's parent directory: resolving first makes `corpus`,
        # `./corpus` and `/abs/corpus` give the same ids (a relative dir would otherwise have the root '').
        spec = os.path.abspath(spec)
    if _GLOB.search(spec):
        prefix = spec[: _GLOB.search(spec).start()]
        root = posixpath.dirname(posixpath.dirname(prefix))  # names keep the globbed directory's own name
        metas = _match(spec)
        if not metas:
            raise InputError(f"corpus input glob {spec!r} matched no files")
        return metas, root
    trimmed = spec.rstrip("/") or spec
    if _is_local(spec) and os.path.isfile(spec):
        metas = _match(spec)
        return metas, posixpath.dirname(metas[0].path) if metas else ""
    if _is_local(spec) and not os.path.isdir(spec):
        raise InputError(f"corpus input {spec} does not exist")
    metas = _match(trimmed + "/**")
    if not metas and not _is_local(spec):
        metas = _match(trimmed)
        return metas, posixpath.dirname(trimmed)
    if not metas:
        raise InputError(f"corpus input directory {spec} contains no files")
    return metas, posixpath.dirname(trimmed)


def expand_inputs(inputs: list[str]) -> list[InputFile]:
    """Every file of every input spec, sorted by name; a name clash between inputs falls back to the full path."""
    if not inputs:
        raise InputError("no corpus inputs: pass paths, directories or globs (config: corpus.inputs)")
    by_path: dict[str, InputFile] = {}
    used: set[str] = set()
    for spec in inputs:
        metas, root = _match_spec(spec)
        for meta in sorted(metas, key=lambda m: m.path):
            path = meta.path
            name = posixpath.basename(path)
            if path in by_path or name.startswith(".") or (_is_local(path) and os.path.isdir(path)):
                continue
            rel = path[len(root):].lstrip("/") if root and path.startswith(root) else name
            if rel in used:
                rel = path
            used.add(rel)
            by_path[path] = InputFile(path=path, rel=rel, size=int(meta.size_in_bytes))
    if not by_path:
        raise InputError(f"corpus inputs {inputs} matched no readable files")
    return sorted(by_path.values(), key=lambda f: f.rel)


# ------------------------------------------------------------------------------------------------------------
# Opening and format detection
# ------------------------------------------------------------------------------------------------------------
def open_stream(path: str, entry_offset: int = 0, entry_position: int = 0) -> BinaryIO:
    """A buffered binary stream of the decompressed content, decoded from the member or frame at compressed offset
    `entry_offset` (whose content begins at `entry_position`) on, with offsets of the whole decompressed file.
    Truncated or corrupt archives raise one of `_STREAM_ERRORS` while being read."""
    kind = compression_of(path)
    if decodes(kind):
        return open_decoded(path, kind, entry_offset, entry_position)
    raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    if kind != CompressionTypes.UNCOMPRESSED:
        raw.close()
        return FileSystems.open(path, compression_type=kind)
    return raw if hasattr(raw, "readline") else io.BufferedReader(raw)  # type: ignore[return-value]


def _strip_compression(name: str) -> str:
    root, ext = posixpath.splitext(name)
    return root if compression_of(name) != CompressionTypes.UNCOMPRESSED else name


def resolve_format(path: str, cfg: CorpusConfig, head: bytes) -> str:
    """The reader for a file: the configured format, or by extension with <doc> sniffing for WikiExtractor."""
    fmt = cfg.format
    if fmt == "auto":
        name = _strip_compression(posixpath.basename(path).lower())
        if name.endswith((".jsonl", ".json", ".ndjson")):
            fmt = "jsonl"
        elif name.endswith(".parquet"):
            fmt = "parquet"
        else:
            fmt = "wikiextractor" if head.lstrip().startswith(b"<doc") else "txt"
    if fmt == "txt" and cfg.txt_mode == "blank_line":
        return "txt_blank_line"
    return fmt


def read_head(path: str) -> bytes:
    with open_stream(path) as fh:
        return fh.read(_HEAD_BYTES)


# ------------------------------------------------------------------------------------------------------------
# Planning work units
# ------------------------------------------------------------------------------------------------------------
def plan_units(files: list[InputFile], cfg: CorpusConfig) -> list[WorkUnit]:
    """Work units in document order: big line-based files (plain, BGZF, or zstd with frame sizes in its headers)
    are split into ranges of about `bundle_bytes` decompressed bytes, big parquet files into row-group ranges."""
    units: list[WorkUnit] = []
    for f in files:
        kind = compression_of(f.path)
        if kind in (CompressionTypes.GZIP, CompressionTypes.ZSTD) and f.size * _MAX_TEXT_RATIO > cfg.bundle_bytes:
            units.extend(compressed_units(f, kind, cfg))
        elif kind == CompressionTypes.UNCOMPRESSED and f.size > cfg.bundle_bytes:
            units.extend(_uncompressed_units(f, cfg))
        else:
            units.append(WorkUnit(f))
    return units


def _splittable_format(f: InputFile, cfg: CorpusConfig) -> str | None:
    """The format of a file that may be split, from its head; None for an unreadable or binary head (the worker
    that reads the file as one unit reports it)."""
    try:
        head = read_head(f.path)
    except _STREAM_ERRORS:
        return None
    fmt = resolve_format(f.path, cfg, head)
    return None if fmt != "parquet" and b"\x00" in head else fmt


def _uncompressed_units(f: InputFile, cfg: CorpusConfig) -> list[WorkUnit]:
    fmt = _splittable_format(f, cfg)
    if fmt == "parquet":
        return parquet_units(f, cfg.bundle_bytes)
    if fmt not in LINE_FORMATS:
        return [WorkUnit(f, format=fmt)]
    return [WorkUnit(f, start, min(start + cfg.bundle_bytes, f.size), fmt)
            for start in range(0, f.size, cfg.bundle_bytes)]


def compressed_units(f: InputFile, kind: str, cfg: CorpusConfig) -> list[WorkUnit]:
    """The units of a gzip or zstd file, split at members or frames found from their headers alone (see
    `bertscale.corpus.compression`); one unit for a file that cannot be split, whose worker reports anything wrong
    with it."""
    try:
        points = plan_split(f.path, kind, f.size, cfg.bundle_bytes, _LOOK_BACK)
    except _STREAM_ERRORS:
        return [WorkUnit(f)]
    fmt = _splittable_format(f, cfg) if points else None
    if fmt not in LINE_FORMATS:
        return [WorkUnit(f, format=fmt)]
    starts = [(0, 0, 0), *points]
    ends: list[int | None] = [start for start, _, _ in points] + [None]
    return [WorkUnit(f, start, end, fmt, offset, position) for (start, offset, position), end in zip(starts, ends)]


def parquet_units(f: InputFile, bundle_bytes: int) -> list[WorkUnit]:
    """Ranges of whole row groups of about `bundle_bytes` (uncompressed) each: a row group is the smallest part
    of a parquet file that can be read on its own. A file whose footer cannot be read stays one unit, and the
    worker that reads it reports why."""
    import pyarrow.parquet as pq

    try:
        with FileSystems.open(f.path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            meta = pq.ParquetFile(fh).metadata
    except _STREAM_ERRORS:
        return [WorkUnit(f, format="parquet")]
    units: list[WorkUnit] = []
    start, size = 0, 0
    for i in range(meta.num_row_groups):
        size += meta.row_group(i).total_byte_size
        if size >= bundle_bytes and i + 1 < meta.num_row_groups:
            units.append(WorkUnit(f, start, i + 1, "parquet"))
            start, size = i + 1, 0
    units.append(WorkUnit(f, start, None, "parquet"))
    return units


# ------------------------------------------------------------------------------------------------------------
# Line streaming
# ------------------------------------------------------------------------------------------------------------
def iter_lines(fh: BinaryIO, offset: int, max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(offset, line, length) per line; `line` is None for a line longer than `max_bytes`, which is skipped in
    chunks without ever being held in memory."""
    while True:
        line = fh.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            n = len(line)
            while True:
                chunk = fh.readline(1 << 20)
                n += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield offset, None, n
            offset += n
        else:
            yield offset, line, len(line)
            offset += len(line)


def _align(fh: BinaryIO, start: int) -> int:
    """Seek to the first line that starts at or after `start`; returns its offset."""
    if start == 0:
        return 0
    fh.seek(start - 1)
    offset = start - 1
    while True:
        chunk = fh.readline(1 << 20)
        offset += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return offset


def _is_blank(line: bytes | None) -> bool:
    return line is not None and len(line) <= _BLANK_LINE_MAX and not line.strip()


def _prev_line_blank(fh: BinaryIO, pos: int) -> bool:
    """Whether the line ending just before `pos` is blank, looking back at most one blank-line length."""
    lo = max(0, pos - _LOOK_BACK)
    fh.seek(lo)
    body = fh.read(pos - lo)[:-1]
    fh.seek(pos)
    cut = body.rfind(b"\n")
    if cut < 0 and lo > 0:
        return False
    return _is_blank(body[cut + 1:] + b"\n")


# ------------------------------------------------------------------------------------------------------------
# Record assembly
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    """A multi-line record being assembled, with a size cap."""

    offset: int
    limit: int
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    oversized: bool = False
    attrs: dict = field(default_factory=dict)

    def add(self, line: bytes | None, n: int) -> None:
        self.size += n
        if line is None or self.size > self.limit:
            self.oversized, self.parts = True, []
        elif not self.oversized:
            self.parts.append(line)


def _too_big(offset: int, size: int, cfg: CorpusConfig) -> Rejected:
    return Rejected(offset, f"document of {size} bytes exceeds corpus.max_doc_bytes={cfg.max_doc_bytes}; "
                            "raise the limit or split the document")


def _decode(offset: int, data: bytes, cfg: CorpusConfig, metadata: dict | None = None) -> Record | Rejected:
    try:
        decoded = decode_utf8(data, cfg.max_invalid_utf8_ratio)
    except DecodeError as err:
        return Rejected(offset, str(err))
    return Record(offset, decoded.text, metadata or {}, decoded.invalid_bytes)


def _finish_wiki(doc: _Pending, cfg: CorpusConfig) -> Record | Rejected:
    if doc.oversized:
        return _too_big(doc.offset, doc.size, cfg)
    out = _decode(doc.offset, b"".join(doc.parts), cfg, doc.attrs)
    if isinstance(out, Record):
        title = doc.attrs.get("title", "")
        first, _, rest = out.text.lstrip("\n").partition("\n")
        if title and html.unescape(first.strip()) == title:
            out.text = rest  # WikiExtractor repeats the title as the first line; it is kept in the metadata
    return out


def _wiki_attrs(line: bytes) -> dict:
    match = _DOC_OPEN.match(line)
    attrs = _ATTR.findall(match.group(1)) if match else []
    return {k.decode(): html.unescape(v.decode("utf-8", errors="replace")) for k, v in attrs}


def read_wikiextractor(
    fh: BinaryIO, start: int, end: float, cfg: CorpusConfig, stats: dict[str, int]
) -> Iterator[Record | Rejected]:
    """`<doc id url title>` ... `</doc>` blocks that start in [start, end)."""
    doc: _Pending | None = None
    seen_doc = start == 0
    for off, line, n in iter_lines(fh, _align(fh, start), cfg.max_doc_bytes):
        if line is not None and line.startswith(b"<doc"):
            if doc is not None:
                stats["unterminated_docs"] = stats.get("unterminated_docs", 0) + 1
                yield _finish_wiki(doc, cfg)
            if off >= end:
                return
            doc, seen_doc = _Pending(off, cfg.max_doc_bytes, attrs=_wiki_attrs(line)), True
        elif line is not None and line.startswith(b"</doc>") and doc is not None:
            yield _finish_wiki(doc, cfg)
            doc = None
        elif doc is not None:
            doc.add(line, n)
        elif off >= end:
            return
        elif seen_doc and (line is None or line.strip()):
            stats["unparsed_lines"] = stats.get("unparsed_lines", 0) + 1
    if doc is not None:
        stats["unterminated_docs"] = stats.get("unterminated_docs", 0) + 1
        yield _finish_wiki(doc, cfg)


def read_blank_line_text(fh: BinaryIO, start: int, end: float, cfg: CorpusConfig) -> Iterator[Record | Rejected]:
    """Documents separated by blank lines, those whose first line starts in [start, end)."""
    pos = _align(fh, start)
    skipping = start > 0 and pos > 0 and not _prev_line_blank(fh, pos)
    doc: _Pending | None = None
    for off, line, n in iter_lines(fh, pos, cfg.max_doc_bytes):
        blank = _is_blank(line)
        if skipping:
            skipping = not blank
            continue
        if blank:
            if doc is not None:
                yield _too_big(doc.offset, doc.size, cfg) if doc.oversized else _decode(doc.offset, b"".join(doc.parts), cfg)
            doc = None
            continue
        if doc is None:
            if off >= end:
                return
            doc = _Pending(off, cfg.max_doc_bytes)
        doc.add(line, n)
    if doc is not None:
        yield _too_big(doc.offset, doc.size, cfg) if doc.oversized else _decode(doc.offset, b"".join(doc.parts), cfg)


def _json_record(off: int, line: bytes, cfg: CorpusConfig) -> Record | Rejected:
    decoded = _decode(off, line, cfg)
    if isinstance(decoded, Rejected):
        return decoded
    try:
        obj = json.loads(decoded.text)
    except json.JSONDecodeError as err:
        return Rejected(off, f"malformed JSON line: {err.msg} at column {err.colno}")
    except ValueError as err:  # e.g. an integer longer than Python's int-parsing digit limit
        return Rejected(off, f"unparseable JSON line: {str(err).splitlines()[0][:200]}")
    except RecursionError:
        return Rejected(off, "JSON line nested too deeply to parse")
    if not isinstance(obj, dict):
        return Rejected(off, f"JSON line is a {type(obj).__name__}, not an object")
    if cfg.text_field not in obj:
        fields = ", ".join(sorted(obj)[:8])
        return Rejected(off, f"JSON object has no field {cfg.text_field!r} (has: {fields}); set corpus.text_field")
    text = obj.pop(cfg.text_field)
    if not isinstance(text, str):
        return Rejected(off, f"JSON field {cfg.text_field!r} is {type(text).__name__}, not a string")
    return Record(off, text, obj, decoded.invalid_bytes)


def read_jsonl(fh: BinaryIO, start: int, end: float, cfg: CorpusConfig) -> Iterator[Record | Rejected]:
    """One JSON object per line; the text field is configurable, the other fields become metadata."""
    for off, line, n in iter_lines(fh, _align(fh, start), cfg.max_doc_bytes):
        if off >= end:
            return
        if line is None:
            yield _too_big(off, n, cfg)
        elif line.strip():
            yield _json_record(off, line, cfg)


def read_whole_text(fh: BinaryIO, cfg: CorpusConfig) -> Iterator[Record | Rejected]:
    """One document per file, read up to `max_doc_bytes`; a bigger file is measured in chunks and rejected."""
    data = fh.read(cfg.max_doc_bytes + 1)
    if len(data) > cfg.max_doc_bytes:
        size = len(data)
        del data
        while chunk := fh.read(1 << 20):
            size += len(chunk)
        yield _too_big(0, size, cfg)
        return
    yield _decode(0, data, cfg)


def read_parquet(fh: BinaryIO, unit: WorkUnit, cfg: CorpusConfig) -> Iterator[Record | Rejected]:
    """The text column of a parquet file, batch by batch; positions are row indices; id/title/url kept."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(fh)
    names = pf.schema_arrow.names
    if cfg.parquet_column not in names:
        yield Rejected(0, f"parquet file has no column {cfg.parquet_column!r} (has: {', '.join(names[:8])}); "
                          "set corpus.parquet_column")
        return
    meta_cols = [c for c in ("id", "title", "url") if c in names and c != cfg.parquet_column]
    groups = list(range(unit.start, pf.num_row_groups if unit.end is None else unit.end))
    row = sum(pf.metadata.row_group(i).num_rows for i in range(unit.start))
    for batch in pf.iter_batches(batch_size=512, row_groups=groups, columns=[cfg.parquet_column, *meta_cols]):
        columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        for i, text in enumerate(columns[0]):
            meta = {c: columns[j + 1][i] for j, c in enumerate(meta_cols)}
            if isinstance(text, bytes):
                yield _decode(row + i, text, cfg, meta)
            elif isinstance(text, str):
                yield Record(row + i, text, meta)
            else:
                yield Rejected(row + i, f"column {cfg.parquet_column!r} holds {type(text).__name__}, not text")
        row += batch.num_rows


def _read_format(fh: BinaryIO, unit: WorkUnit, fmt: str, cfg: CorpusConfig, stats: dict[str, int]):
    end = float("inf") if unit.end is None else unit.end
    if fmt == "wikiextractor":
        return read_wikiextractor(fh, unit.start, end, cfg, stats)
    if fmt == "jsonl":
        return read_jsonl(fh, unit.start, end, cfg)
    if fmt == "txt_blank_line":
        return read_blank_line_text(fh, unit.start, end, cfg)
    if fmt == "parquet":
        return read_parquet(fh, unit, cfg)
    return read_whole_text(fh, cfg)


def read_unit(unit: WorkUnit, cfg: CorpusConfig, stats: dict[str, int]) -> Iterator[Record | Rejected]:
    """Every record of a work unit; empty, binary, truncated and corrupt input become `Rejected` records."""
    last, fh = unit.start, None
    try:
        head = read_head(unit.file.path)
        fmt = unit.format or resolve_format(unit.file.path, cfg, head)
        if not head:
            if unit.start == 0:
                yield Rejected(0, "empty file (0 bytes of content)")
            return
        if fmt != "parquet" and b"\x00" in head:
            if unit.start == 0:
                yield Rejected(0, "binary file (NUL bytes in its first 8 KiB); not text, skipped")
            return
        with open_stream(unit.file.path, unit.entry_offset, unit.entry_position) as fh:
            for item in _read_format(fh, unit, fmt, cfg, stats):
                last = item.position
                yield item
    except _STREAM_ERRORS as err:
        yield from _unreadable(unit, getattr(getattr(fh, "raw", None), "failed_at", None), last, err)


def _unreadable(unit: WorkUnit, failed_at: int | None, last: int, err: BaseException) -> Iterator[Rejected]:
    """The rejection for a stream that failed while `unit` was read. A decoded stream names the offset where its
    readable content ended; the unit that reports it is one whose range that offset cuts short. A unit that failed
    while finishing a record past its end stays silent: the next unit reads on from its entry to the same offset."""
    kind, what = compression_of(unit.file.path), f"{type(err).__name__}: {err}"
    if failed_at is None:
        yield Rejected(last, f"unreadable input ({kind}) after position {last}: {what}; records before it were kept")
    elif unit.end is None or failed_at < unit.end:
        yield Rejected(failed_at, f"unreadable input ({kind}): its content ends at byte {failed_at} with {what}; "
                                  "records that end before it were kept")
