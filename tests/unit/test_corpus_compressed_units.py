"""Splitting compressed inputs into work units from their headers alone: BGZF gzip, zstd frames that declare their
content size, and seekable zstd. Whatever the split, the records (positions, texts, metadata) and the rejections
are those of the file read as one unit and of the same content uncompressed; files that cannot be split stay one
unit; the planner reads headers, not the compressed text."""

from __future__ import annotations

import gzip
import json
import os
import random
import struct
import zlib
from pathlib import Path

import pytest
import zstandard

from bertscale.corpus import compression, readers
from bertscale.config import CorpusConfig
from bertscale.corpus.compression import bgzf_compress
from bertscale.corpus.readers import (
    Record,
    Rejected,
    expand_inputs,
    open_stream,
    plan_units,
    read_unit,
)

ONE_UNIT = 2**30  # a bundle size no test file reaches


# ---------------------------------------------------------------------------------------------------------------
# Writers, built from the format descriptions (not from the library) so that the two check each other
# ---------------------------------------------------------------------------------------------------------------
def bgzf_members(data: bytes, block: int, level: int = 6) -> list[bytes]:
    """BGZF as bgzip writes it: deflated blocks, each a gzip member whose `BC` extra subfield holds its size - 1,
    then an empty member that marks the end of the file."""
    out = []
    for i in [*range(0, len(data), block), len(data)]:
        piece = data[i:i + block]
        deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
        body = deflate.compress(piece) + deflate.flush() if piece else b"\x03\x00"
        header = struct.pack("<4BI2BH2BHH", 31, 139, 8, 4, 0, 0, 255, 6, ord("B"), ord("C"), 2, 18 + len(body) + 7)
        out.append(header + body + struct.pack("<II", zlib.crc32(piece), len(piece)))
    return out


def bgzf(data: bytes, block: int, level: int = 6) -> bytes:
    return b"".join(bgzf_members(data, block, level))


def zstd_frames(data: bytes, chunk: int, content_size: bool = True) -> bytes:
    """Chunks compressed one by one and concatenated: one frame per chunk, and a skippable frame after the first."""
    cctx = zstandard.ZstdCompressor(write_content_size=content_size, write_checksum=True)
    frames = [cctx.compress(data[i:i + chunk]) for i in range(0, len(data), chunk)]
    return b"".join(frames[:1] + [struct.pack("<II", 0x184D2A50, 4) + b"\0\1\2\3"] + frames[1:])


def seekable_zstd(data: bytes, chunk: int, checksums: bool = True) -> bytes:
    """The zstd seekable format: frames without content sizes (the seek table has them), a skippable frame after the
    first one, and the seek table in a skippable frame at the end."""
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    frames = [(cctx.compress(piece), len(piece)) for piece in pieces]
    frames.insert(1, (struct.pack("<II", 0x184D2A53, 5) + b"extra", 0))
    entries = b"".join(struct.pack("<II", len(frame), size) + (b"\0\0\0\0" if checksums else b"")
                       for frame, size in frames)
    footer = struct.pack("<IBI", len(frames), 0x80 if checksums else 0, 0x8F92EAB1)
    table = struct.pack("<II", 0x184D2A5E, len(entries) + len(footer)) + entries + footer
    return b"".join(frame for frame, _ in frames) + table


CONTAINERS = {
    "bgzf": (".gz", lambda data: bgzf(data, 700)),
    "zstd-frames": (".zst", lambda data: zstd_frames(data, 900)),
    "zstd-seekable": (".zst", lambda data: seekable_zstd(data, 1100)),
}


def corpus(fmt: str, n: int = 300) -> tuple[str, bytes, dict]:
    """A file name, its content and the reader settings: records of 30-700 bytes, so they span members."""
    rng = random.Random(n)

    def words(k: int) -> str:
        return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "épsilon"]) for _ in range(k))

    if fmt == "wikiextractor":
        body = "".join(f'<doc id="{i}" url="u{i}" title="T{i}">\nT{i}\n{words(rng.randint(5, 120))}\n</doc>\n'
                       for i in range(n))
        return "wiki_00", body.encode(), {}
    if fmt == "jsonl":
        body = "".join(json.dumps({"text": words(rng.randint(5, 120)), "id": i}) + "\n" for i in range(n))
        return "d.jsonl", (body + "{broken\n").encode(), {}
    body = "".join(f"{words(rng.randint(3, 20))}\n" * rng.randint(1, 5) + "\n" * rng.randint(1, 3) + " \n" * (i % 2)
                   for i in range(n))
    return "d.txt", body.encode(), {"txt_mode": "blank_line"}


def read_file(path: Path, bundle_bytes: int, **fields) -> tuple[list[tuple], list[readers.WorkUnit]]:
    cfg = CorpusConfig(bundle_bytes=bundle_bytes, **fields)
    units = plan_units(expand_inputs([str(path)]), cfg)
    items = [item for unit in units for item in read_unit(unit, cfg, {})]
    return [summary(item) for item in items], units


def summary(item: Record | Rejected) -> tuple:
    if isinstance(item, Record):
        return "record", item.position, item.text, item.metadata, item.invalid_bytes
    return "rejected", item.position, item.reason


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def check_contiguous(units: list[readers.WorkUnit]) -> None:
    assert units[0].start == 0 and units[0].entry_offset == 0 and units[-1].end is None
    assert [u.start for u in units[1:]] == [u.end for u in units[:-1]]
    for unit in units[1:]:
        assert unit.entry_offset > 0 and unit.entry_position <= unit.start - readers._LOOK_BACK


# ---------------------------------------------------------------------------------------------------------------
# Same records whatever the split
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("container", sorted(CONTAINERS))
@pytest.mark.parametrize("fmt", ["wikiextractor", "jsonl", "blank_line"])
def test_split_compressed_files_read_like_one_unit_and_like_plain_text(tmp_path, container, fmt):
    name, data, fields = corpus(fmt)
    suffix, compress = CONTAINERS[container]
    plain, _ = read_file(write(tmp_path, f"plain/{name}", data), 1024, **fields)
    packed = write(tmp_path, f"packed/{name}{suffix}", compress(data))
    whole, units = read_file(packed, ONE_UNIT, **fields)
    assert len(units) == 1 and len(plain) >= 300
    assert whole == plain
    for bundle_bytes in (1024, 3000, 20_000):
        split, units = read_file(packed, bundle_bytes, **fields)
        assert len(units) >= len(data) // (bundle_bytes + 2000), bundle_bytes
        check_contiguous(units)
        assert split == plain, bundle_bytes


@pytest.mark.parametrize("container", ["bgzf", "zstd-frames"])
def test_truncated_last_member_is_rejected_once_at_the_same_position(tmp_path, container):
    name, data, fields = corpus("jsonl", 400)
    data += json.dumps({"text": "a long last line " * 500}).encode() + b"\n"  # units inside it stay silent
    suffix, _ = CONTAINERS[container]
    packed = bgzf(data, 700)[:-28] if container == "bgzf" else zstd_frames(data, 900)  # BGZF: no end-of-file member
    path = write(tmp_path, name + suffix, packed[:-20])  # cut inside the last member
    whole, units = read_file(path, ONE_UNIT, **fields)
    assert len(units) == 1
    kind, position, reason = whole[-1]
    assert kind == "rejected" and "truncated" in reason and f"ends at byte {position} " in reason
    assert len(data) - 1500 < position < len(data) - 20
    plain, _ = read_file(write(tmp_path, "plain/" + name, data), ONE_UNIT, **fields)
    assert whole[:-1] == [r for r in plain if data.index(b"\n", r[1]) < position] and len(whole) > 300
    for bundle_bytes in (1024, 5000):
        split, units = read_file(path, bundle_bytes, **fields)
        assert len(units) > 5
        check_contiguous(units)
        assert split == whole, bundle_bytes


def test_corrupt_member_in_the_middle_is_rejected_not_raised(tmp_path):
    name, data, _ = corpus("wikiextractor")
    members = bgzf_members(data, 700)
    bad = len(members) // 2
    members[bad] = members[bad][:-8] + bytes(4) + members[bad][-4:]  # a wrong CRC: caught at the member's end
    path = write(tmp_path, name + ".gz", b"".join(members))

    def before(items: list[tuple]) -> list[tuple]:
        return [r for r in items if r[0] == "record" and data.index(b"</doc>", r[1]) < 700 * bad]

    def after(items: list[tuple]) -> list[tuple]:
        return [r for r in items if r[0] == "record" and r[1] > 700 * (bad + 2)]

    whole, _ = read_file(path, ONE_UNIT)
    split, units = read_file(path, 1024)
    for items in (whole, split):
        rejected = [r for r in items if r[0] == "rejected"]
        assert rejected and all("unreadable input (gzip)" in r[2] and "Error -3" in r[2] for r in rejected)
        assert all(700 * bad <= r[1] <= 700 * (bad + 1) for r in rejected)
    assert before(whole) == before(split) and len(before(whole)) > 100
    assert not after(whole) and len(after(split)) > 100  # the units after the damage still read theirs


# ---------------------------------------------------------------------------------------------------------------
# What stays one unit
# ---------------------------------------------------------------------------------------------------------------
def test_plain_gzip_and_single_frame_zstd_stay_one_unit(tmp_path):
    name, data, _ = corpus("jsonl")
    half = data.index(b"\n", len(data) // 2) + 1
    padded = gzip.compress(data[:half]) + bytes(10) + gzip.compress(data[half:]) + bytes(100)  # gzip allows zeros
    single = [write(tmp_path, "gz/" + name + ".gz", padded),
              write(tmp_path, "zst/" + name + ".zst", zstandard.ZstdCompressor().compress(data)),
              write(tmp_path, "nosize/" + name + ".zst", zstd_frames(data, 900, content_size=False))]
    for path in single:
        items, units = read_file(path, 1024)
        assert len(units) == 1, path
        assert items == read_file(write(tmp_path, "plain/" + name, data), ONE_UNIT)[0]


def test_a_frame_without_content_size_ends_the_split_and_the_rest_is_the_last_unit(tmp_path):
    name, data, _ = corpus("jsonl", 600)
    cut = data.index(b"\n", len(data) // 2) + 1
    head, tail = zstd_frames(data[:cut], 900), zstd_frames(data[cut:], 900, content_size=False)
    items, units = read_file(write(tmp_path, name + ".zst", head + tail), 1024)
    check_contiguous(units)
    assert 5 < len(units) and units[-1].entry_offset < len(head) and units[-1].start <= cut
    assert items == read_file(write(tmp_path, "plain/" + name, data), ONE_UNIT)[0]


def block_types(packed: bytes) -> set[int]:
    """The types of the blocks of a run of zstd frames: 0 raw, 1 RLE, 2 compressed."""
    types, at = set(), 0
    while at < len(packed):
        if packed[at:at + 4] == struct.pack("<I", 0x184D2A50):
            at += 8 + int.from_bytes(packed[at + 4:at + 8], "little")
            continue
        at += zstandard.frame_header_size(packed[at:at + 18])
        last = 0
        while not last:
            header = int.from_bytes(packed[at:at + 3], "little")
            last, kind = header & 1, (header >> 1) & 3
            types.add(kind)
            at += 3 + (1 if kind == 1 else header >> 3)
        at += 4  # the checksum
    return types


def test_raw_and_rle_blocks_are_walked_by_their_headers(tmp_path):
    _, text, _ = corpus("jsonl", 100)
    noise = os.urandom(300_000)  # incompressible: raw blocks (its lines are rejected as malformed JSON)
    data = text + b'{"text": "' + b"a" * 600_000 + b'"}\n' + noise + b"\n" + text  # the run of a: RLE blocks
    packed = zstd_frames(data, 150_000)
    assert block_types(packed) == {0, 1, 2}
    items, units = read_file(write(tmp_path, "d.jsonl.zst", packed), 20_000, max_doc_bytes=2**20)
    check_contiguous(units)
    assert len(units) >= len(data) // 150_000 - 1 and units[-1].start > len(data) - 160_000
    assert items == read_file(write(tmp_path, "plain/d.jsonl", data), ONE_UNIT, max_doc_bytes=2**20)[0]


def test_bz2_xz_whole_text_and_binary_content_stay_one_unit(tmp_path):
    import bz2
    import lzma

    name, data, _ = corpus("blank_line")
    for path in (write(tmp_path, "a.txt.bz2", bz2.compress(data)), write(tmp_path, "a.txt.xz", lzma.compress(data)),
                 write(tmp_path, "whole.txt.gz", bgzf(data, 700)),
                 write(tmp_path, "blob.jsonl.gz", bgzf(b"\0\1\2" * 20_000, 700))):
        assert len(plan_units(expand_inputs([str(path)]), CorpusConfig(bundle_bytes=1024))) == 1, path
    assert len(plan_units(expand_inputs([str(tmp_path / "whole.txt.gz")]),
                          CorpusConfig(bundle_bytes=1024, txt_mode="blank_line"))) > 5


# ---------------------------------------------------------------------------------------------------------------
# The planner reads headers, not text
# ---------------------------------------------------------------------------------------------------------------
class CountingFile:
    """A file object that counts the bytes read through it."""

    total = 0

    def __init__(self, fh) -> None:
        self.fh = fh

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        CountingFile.total += len(data)
        return data

    def seek(self, *args) -> int:
        return self.fh.seek(*args)

    def close(self) -> None:
        self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.mark.parametrize("container", ["bgzf", "zstd-frames", "zstd-seekable"])
def test_planning_reads_only_headers(tmp_path, monkeypatch, container):
    rng = random.Random(0)
    text = "".join(json.dumps({"text": " ".join(f"w{rng.randint(0, 10**6)}" for _ in range(80))}) + "\n"
                   for _ in range(6000)).encode()  # ~4 MB, ~2.5:1 compressible
    packed = {"bgzf": lambda: bgzf(text, 0xFF00), "zstd-frames": lambda: zstd_frames(text, 1 << 18),
              "zstd-seekable": lambda: seekable_zstd(text, 1 << 18)}[container]()
    path = write(tmp_path, "big.jsonl" + CONTAINERS[container][0], packed)
    real_open = compression._open_raw
    monkeypatch.setattr(compression, "_open_raw", lambda *args, **kw: CountingFile(real_open(*args, **kw)))
    CountingFile.total = 0
    units = plan_units(expand_inputs([str(path)]), CorpusConfig(bundle_bytes=1 << 19))
    assert len(units) >= len(text) // (1 << 19) - 1
    # The 8 KiB head that tells the format is decoded from one 64 KiB read; the rest are headers and trailers.
    assert CountingFile.total < 80_000 + 40 * (len(text) // 0xFF00), CountingFile.total
    assert CountingFile.total < len(packed) // 25


def test_small_compressed_files_are_not_opened(tmp_path, monkeypatch):
    path = write(tmp_path, "d.jsonl.gz", bgzf(b'{"text": "x"}\n' * 50, 100))

    def refuse(*args, **kwargs):
        raise AssertionError("the planner opened a small compressed file")

    monkeypatch.setattr(compression, "_open_raw", refuse)
    assert len(plan_units(expand_inputs([str(path)]), CorpusConfig(bundle_bytes=len(path.read_bytes()) * 8))) == 1


# ---------------------------------------------------------------------------------------------------------------
# The decoded stream and the writer
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("container", ["bgzf", "zstd-frames"])
def test_decoded_stream_speaks_file_offsets_from_any_entry(tmp_path, container):
    data = os.urandom(400_000).hex().encode()  # 800 KB that compress 2:1, so history alone cannot serve every seek
    suffix, _ = CONTAINERS[container]
    path = write(tmp_path, "x.txt" + suffix, bgzf(data, 0xFF00) if container == "bgzf" else zstd_frames(data, 50_000))
    units = plan_units(expand_inputs([str(path)]), CorpusConfig(bundle_bytes=100_000, format="jsonl"))
    unit = units[3]
    with open_stream(str(path), unit.entry_offset, unit.entry_position) as fh:
        assert fh.tell() == unit.entry_position
        fh.seek(unit.start - 1)
        assert fh.read(10) == data[unit.start - 1: unit.start + 9]
        fh.seek(unit.start + 300_000)  # forward: decoded and discarded
        assert fh.read(5) == data[unit.start + 300_000: unit.start + 300_005]
        fh.seek(unit.entry_position + 7)  # far back, past the history: decoded again from the entry
        assert fh.read(100_000) == data[unit.entry_position + 7: unit.entry_position + 100_007]
        assert fh.tell() == unit.entry_position + 100_007
        with pytest.raises(ValueError, match="before this stream's first offset"):
            fh.seek(unit.entry_position - 1)


def test_bgzf_writer_writes_what_the_format_says(tmp_path):
    data = b"".join(b"line %d of the corpus\n" % i for i in range(20_000))
    written = bgzf_compress(data, block_size=5000)
    assert written == bgzf(data, 5000)
    assert gzip.decompress(written) == data
    assert bgzf_compress(data[:5000], eof=False) + bgzf_compress(data[5000:]) == bgzf(data[:5000], 0xFF00)[:-28] + \
        bgzf(data[5000:], 0xFF00)
    with pytest.raises(ValueError, match="64 KiB"):
        bgzf_compress(os.urandom(70_000), block_size=70_000)


@pytest.mark.parametrize("suffix,compress", [(".gz", gzip.compress), (".zst", zstandard.ZstdCompressor().compress)])
def test_big_reads_of_very_compressible_text_come_back_whole(tmp_path, suffix, compress):
    data = b"".join(b"%d the same words again and again\n" % (i // 1000) for i in range(60_000))
    path = write(tmp_path, "a.txt" + suffix, compress(data))
    with open_stream(str(path)) as fh:
        assert fh.read(1_500_000) == data[:1_500_000] and fh.read() == data[1_500_000:]
    items, _ = read_file(path, 1024, max_doc_bytes=4 * 2**20)
    assert [item[2] for item in items] == [data.decode()]
