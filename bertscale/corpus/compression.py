"""Compressed corpus files: decoding them from any member or frame, finding where they can be split, writing BGZF.

Compressed files are split where headers alone say where independently decompressible pieces start and how much
each holds; the launcher reads those headers and the 8 KiB head that tells the format, never the compressed text:
- BGZF (gzip as `bgzip` writes it, .gz or .bgz: members of at most 64 KiB, each naming its size in a `BC` extra
  field): ~22 bytes per member, its header and its ISIZE trailer.
- zstd in the seekable format (a seek table in a skippable frame at the end): the table only, its sizes trusted once
  each entry used is seen to start with a frame magic. Other zstd files: the frame headers and 3-byte block headers
  of consecutive frames that declare their content size.
A unit of such a file is a decompressed range [start, end) plus the member or frame it decompresses from
(`entry_offset` in the file, `entry_position` in the content). A range after the first starts `look_back` bytes
(the readers' `_LOOK_BACK`) into its entry's content because a range reader looks back at most that far (the byte
before `start`, and the line before it in blank-line text): a unit decompresses ~4 KiB it does not own, whatever the
member or frame size. The walk stops at the first member or frame it cannot vouch for (a plain gzip member, a frame
without a content size, a truncated or foreign tail) and the last unit reads on to the end of the file: plain gzip
and single-frame zstd stay one unit, and a truncated file splits like its intact prefix. bz2 and xz stay one unit:
their headers give no decompressed sizes (multi-stream bz2, each stream a unit, could be a later extension).

The decoders hand out every byte they decoded before failing, and the decoded stream records the offset where the
readable content ended (`failed_at`), so that a reader can reject a truncated or corrupt file at that offset.
"""

from __future__ import annotations

import bz2
import io
import lzma
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

import zstandard
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from bertscale.config import is_uri

_CHUNK = 1 << 16  # compressed bytes per read while decoding, and the decoded stream's buffer size
_HISTORY = 1 << 17  # decoded bytes kept for backward seeks: more than one decoded chunk plus the look-back
_ZSTD_FRAME = 0xFD2FB528
_ZSTD_SKIPPABLE = 0x184D2A50  # the low 4 bits are free
_SEEK_TABLE = 0x184D2A5E  # the skippable frame holding a seekable zstd file's seek table
_SEEKABLE = 0x8F92EAB1  # the last 4 bytes of a seekable zstd file
_ZSTD_MAGICS = tuple(n.to_bytes(4, "little") for n in (_ZSTD_FRAME, *range(_ZSTD_SKIPPABLE, _ZSTD_SKIPPABLE + 16)))
_BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
# Everything a truncated or corrupt compressed file raises while being read.
DECODE_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


def compression_of(path: str) -> str:
    if path.lower().endswith(".bgz"):  # BGZF's own extension, unknown to Beam
        return CompressionTypes.GZIP
    return CompressionTypes.detect_compression_type(path)


def _open_raw(path: str, buffered: bool = True) -> BinaryIO:
    """The file's bytes as stored; a local file opened unbuffered reads only what is asked (the planner's header
    reads)."""
    if not is_uri(path):
        return open(path, "rb", buffering=-1 if buffered else 0)
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


# ------------------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------------------
class _Decoder(io.RawIOBase):
    """Decompressed bytes of a compressed source, in order, from a member or frame boundary on; owns the source."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()


class _GzipRaw(_Decoder):
    """Concatenated gzip members (plain gzip or BGZF). Like `gzip.GzipFile` it checks each member's CRC and length,
    allows zero padding after a member and rejects other trailing bytes; unlike it, it can start at any member and
    hands out every byte it decoded before raising (EOFError for input that ends inside a member)."""

    def __init__(self, source: BinaryIO) -> None:
        super().__init__(source)
        self._member, self._input = None, b""

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while len(buffer):
            if self._member is None and not self._next_member():
                return 0
            if not self._input:
                self._input = self._source.read(_CHUNK)
                if not self._input:
                    raise EOFError("gzip stream ended inside a member (truncated file)")
            out = self._member.decompress(self._input, len(buffer))
            if self._member.eof:
                self._input, self._member = self._member.unused_data, None
            else:
                self._input = self._member.unconsumed_tail
            if out:
                buffer[:len(out)] = out
                return len(out)
        return 0

    def _next_member(self) -> bool:
        """Start the next member after any zero padding; False at the end of the input."""
        self._input = self._input.lstrip(b"\0")
        while not self._input:
            self._input = self._source.read(_CHUNK)
            if not self._input:
                return False
            self._input = self._input.lstrip(b"\0")
        self._member = zlib.decompressobj(wbits=31)
        return True


class _ZstdRaw(_Decoder):
    """Concatenated zstd frames (skippable ones included). Unlike `zstandard.stream_reader` it raises on a truncated
    last frame, and it hands out what it decoded before a corrupt frame before raising."""

    def __init__(self, source: BinaryIO) -> None:
        super().__init__(source)
        self._dctx = zstandard.ZstdDecompressor()
        self._obj, self._pending, self._frame_open = self._dctx.decompressobj(), b"", False
        self._error: zstandard.ZstdError | None = None

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not self._pending:
            if self._error is not None:
                raise self._error
            chunk = self._source.read(_CHUNK)
            if not chunk:
                if self._frame_open:
                    raise EOFError("zstd stream ended before the end of its last frame (truncated file)")
                return 0
            self._pending = self._decompress(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        try:
            while chunk:
                self._frame_open = True
                out.append(self._obj.decompress(chunk))
                if not self._obj.eof:
                    break
                chunk, self._frame_open = self._obj.unused_data, False  # concatenated frames
                self._obj = self._dctx.decompressobj()
        except zstandard.ZstdError as err:
            if not out:
                raise
            self._error = err  # raised once the frames before it are handed out
        return b"".join(out)


class _Read1(_Decoder):
    """bz2 or xz through the standard library's reader, one decoded piece per call (nothing decoded is lost)."""

    def __init__(self, source: BinaryIO, reader: Callable[[BinaryIO], BinaryIO]) -> None:
        super().__init__(source)
        self._reader = reader(source)

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self._reader.read1(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
        super().close()


class _Decoded(io.RawIOBase):
    """A decoder's output as a seekable stream whose offsets are those of the whole decompressed file, the decoder
    having started at a member or frame whose content begins at `base`. Forward seeks decode and discard; backward
    seeks are served from the last `_HISTORY` bytes, or else by decoding again from the entry (the planner keeps
    the readers' `_LOOK_BACK` bytes between `base` and a unit's start, so a range reader never needs more). When
    the decoder raises, `failed_at` is the offset where the readable content ended."""

    def __init__(self, open_decoder: Callable[[], io.RawIOBase], base: int) -> None:
        self._open, self._base, self._pos = open_decoder, base, base
        self._decoder: io.RawIOBase | None = None
        self.failed_at: int | None = None
        self._rewind()

    def _rewind(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
        self._decoder, self._end, self._history = self._open(), self._base, bytearray()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a compressed stream cannot seek from its end")
        if offset < self._base:
            raise ValueError(f"seek to {offset}, before this stream's first offset {self._base}")
        self._pos = offset
        return offset

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._pos < self._end - len(self._history):
            self._rewind()
        while self._pos > self._end:
            if not self._decode(min(self._pos - self._end, _CHUNK)):
                return 0
        if self._pos == self._end and not self._decode(min(len(buffer), _CHUNK)):
            return 0
        at = len(self._history) - (self._end - self._pos)
        n = min(len(buffer), self._end - self._pos)
        buffer[:n] = self._history[at:at + n]
        self._pos += n
        return n

    def _decode(self, size: int) -> int:
        try:
            data = self._decoder.read(size)  # type: ignore[union-attr]
        except DECODE_ERRORS:
            self.failed_at = self._end
            raise
        self._end += len(data)
        self._history += data
        if len(self._history) > _HISTORY:
            del self._history[:len(self._history) - _HISTORY]
        return len(data)

    def close(self) -> None:
        if not self.closed and self._decoder is not None:
            self._decoder.close()
        super().close()


_DECODERS: dict[str, Callable[[BinaryIO], io.RawIOBase]] = {
    CompressionTypes.GZIP: _GzipRaw,
    CompressionTypes.ZSTD: _ZstdRaw,
    CompressionTypes.BZIP2: lambda source: _Read1(source, bz2.BZ2File),
    CompressionTypes.LZMA: lambda source: _Read1(source, lzma.LZMAFile),
}



def decodes(kind: str) -> bool:
    """Whether `kind` (a Beam `CompressionTypes` value) is decoded here, from any member or frame."""
    return kind in _DECODERS


def open_decoded(path: str, kind: str, entry_offset: int = 0, entry_position: int = 0) -> BinaryIO:
    """A buffered binary stream of the decompressed content of a `kind` file (one that `decodes`), decoded from the
    member or frame at compressed offset `entry_offset` (whose content begins at `entry_position`) on, with offsets
    of the whole decompressed file. Truncated or corrupt archives raise one of `DECODE_ERRORS` while being read."""
    def open_decoder() -> io.RawIOBase:
        source = _open_raw(path)
        source.seek(entry_offset)
        return _DECODERS[kind](source)

    stream = io.BufferedReader(_Decoded(open_decoder, entry_position), buffer_size=_CHUNK)
    return stream  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------------
# Members and frames of compressed files, from their headers
# ------------------------------------------------------------------------------------------------------------
def plan_split(path: str, kind: str, size: int, bundle_bytes: int, look_back: int) -> list[tuple[int, int, int]]:
    """(start, entry offset, entry position) of each unit after the first of a gzip or zstd file of `size` bytes,
    found from its headers alone (see the module docstring); [] for a file that cannot be split. Reading the
    headers may raise one of `DECODE_ERRORS`."""
    with _open_raw(path, buffered=False) as fh:
        walk = _bgzf_members(fh, size) if kind == CompressionTypes.GZIP else _zstd_frames(fh, size)
        points = _split_points(walk, bundle_bytes, look_back)
        # The seek table is trusted for sizes; a unit's entry must at least be where a member or frame starts.
        magics = (b"\x1f\x8b",) if kind == CompressionTypes.GZIP else _ZSTD_MAGICS
        if not all(_read_at(fh, offset, 4).startswith(magics) for _, offset, _ in points):
            return []
    return points


def _split_points(members: Iterator[tuple[int, int, int]], bundle_bytes: int, look_back: int
                  ) -> list[tuple[int, int, int]]:
    """(start, entry offset, entry position) of each unit after the first, from (offset, position, size) of each
    member or frame. A unit starts `look_back` bytes into its entry once the previous one holds `bundle_bytes`;
    none starts at or past the end of the walked members: it would be empty, or would not be the unit that a
    truncated tail cuts short."""
    points: list[tuple[int, int, int]] = []
    last = end = 0
    for offset, position, size in members:
        start = position + look_back
        if position and start - last >= bundle_bytes:
            points.append((start, offset, position))
            last = start
        end = position + size
    while points and points[-1][0] >= end:
        points.pop()
    return points


def _read_at(fh: BinaryIO, offset: int, size: int) -> bytes:
    fh.seek(offset)
    return fh.read(size)


def _bgzf_members(fh: BinaryIO, size: int) -> Iterator[tuple[int, int, int]]:
    """(offset, position, decompressed size) of each BGZF member, reading its header and its ISIZE trailer only;
    stops at the first member that is not BGZF-shaped or not wholly in the file."""
    offset = position = 0
    head = _read_at(fh, 0, 18)
    while (bsize := _bgzf_block_size(fh, offset, head)) is not None and offset + bsize + 1 <= size:
        end = offset + bsize + 1
        tail = _read_at(fh, end - 4, 4 + 18)  # this member's ISIZE, then the next member's header
        isize = int.from_bytes(tail[:4], "little")
        yield offset, position, isize
        offset, position, head = end, position + isize, tail[4:]


def _bgzf_block_size(fh: BinaryIO, offset: int, head: bytes) -> int | None:
    """BSIZE (the member's size - 1) from the `BC` extra subfield of a gzip header; None if it has none."""
    if len(head) < 12 or not head.startswith(b"\x1f\x8b\x08") or not head[3] & 4:
        return None
    xlen = int.from_bytes(head[10:12], "little")
    extra = head[12:12 + xlen] if len(head) >= 12 + xlen else _read_at(fh, offset + 12, xlen)
    i = 0
    while i + 4 <= len(extra):
        length = int.from_bytes(extra[i + 2:i + 4], "little")
        if extra[i:i + 2] == b"BC" and length == 2 and i + 6 <= len(extra):
            bsize = int.from_bytes(extra[i + 4:i + 6], "little")
            return bsize if bsize + 1 >= 12 + xlen + 8 else None
        i += 4 + length
    return None


def _zstd_frames(fh: BinaryIO, size: int) -> Iterator[tuple[int, int, int]]:
    """(offset, position, decompressed size) of each zstd frame: from the seek table if the file ends with one,
    else by walking frame and block headers up to the first frame that declares no content size."""
    footer = _read_at(fh, size - 9, 9) if size >= 17 else b""
    if len(footer) == 9 and int.from_bytes(footer[5:], "little") == _SEEKABLE and not footer[4] & 0x7C:
        count, width = int.from_bytes(footer[:4], "little"), 12 if footer[4] & 0x80 else 8
        table = count * width + 9
        head = _read_at(fh, size - table - 8, 8) if table + 8 <= size else b""
        if head == _SEEK_TABLE.to_bytes(4, "little") + table.to_bytes(4, "little"):
            yield from _seek_table_frames(fh, size - table, count, width, size - table - 8)
            return
    yield from _walk_zstd_frames(fh, size)


def _seek_table_frames(fh: BinaryIO, at: int, count: int, width: int, data_end: int
                       ) -> Iterator[tuple[int, int, int]]:
    offset = position = 0
    for first in range(0, count, 4096):  # entries in batches: memory stays bounded for any number of frames
        batch = _read_at(fh, at + first * width, min(4096, count - first) * width)
        for i in range(0, len(batch) - width + 1, width):
            packed, unpacked = int.from_bytes(batch[i:i + 4], "little"), int.from_bytes(batch[i + 4:i + 8], "little")
            if offset + packed > data_end:
                return
            yield offset, position, unpacked
            offset, position = offset + packed, position + unpacked


def _walk_zstd_frames(fh: BinaryIO, size: int) -> Iterator[tuple[int, int, int]]:
    offset = position = 0
    while offset + 8 <= size:
        head = _read_at(fh, offset, 18)
        magic = int.from_bytes(head[:4], "little")
        if magic & ~0xF == _ZSTD_SKIPPABLE:
            offset += 8 + int.from_bytes(head[4:8], "little")
            continue
        try:
            params, header = zstandard.get_frame_parameters(head), zstandard.frame_header_size(head)
        except zstandard.ZstdError:
            return  # not a zstd frame, or its header is cut off
        content = params.content_size
        if magic != _ZSTD_FRAME or content >= zstandard.CONTENTSIZE_ERROR:
            return
        end = _zstd_frame_end(fh, offset + header, size)
        if end is None or end + (4 if params.has_checksum else 0) > size:
            return
        end += 4 if params.has_checksum else 0
        yield offset, position, content
        offset, position = end, position + content


def _zstd_frame_end(fh: BinaryIO, offset: int, size: int) -> int | None:
    """The offset just after a frame's last block, seeking past each block by its 3-byte header; None if the
    blocks run past the end of the file or a block type is invalid."""
    while offset + 3 <= size:
        block = int.from_bytes(_read_at(fh, offset, 3), "little")
        kind, length = (block >> 1) & 3, block >> 3
        if kind == 3:
            return None
        offset += 3 + (1 if kind == 1 else length)  # an RLE block stores its one byte
        if block & 1:
            return offset if offset <= size else None
    return None


# ------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------
def bgzf_compress(data: bytes, block_size: int = 0xFF00, level: int = 6, eof: bool = True) -> bytes:
    """`data` as BGZF, as `bgzip` writes it: gzip members of at most `block_size` input bytes, each naming its size
    in a `BC` extra field so that the corpus stage can split the file without decompressing it, then the empty
    end-of-file member. The outputs of several calls, all but the last with eof=False, concatenate into one file."""
    members = []
    for i in range(0, len(data), block_size):
        block = data[i:i + block_size]
        deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
        body = deflate.compress(block) + deflate.flush()
        bsize = 18 + len(body) + 8 - 1
        if bsize > 0xFFFF:
            raise ValueError(f"a BGZF member holds at most 64 KiB compressed; block_size={block_size} is too big")
        members += [b"\x1f\x8b\x08\x04\0\0\0\0\0\xff\x06\0BC\x02\0", bsize.to_bytes(2, "little"), body,
                    zlib.crc32(block).to_bytes(4, "little"), len(block).to_bytes(4, "little")]
    return b"".join([*members, _BGZF_EOF if eof else b""])

