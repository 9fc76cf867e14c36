"""Corpus readers: every format, byte-range splitting, and the bad inputs (truncated archives, binary, empty,
huge single-line files, malformed JSON, invalid UTF-8), each turned into records or rejections, never a crash."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from bertscale.config import CorpusConfig
from bertscale.corpus.compression import bgzf_compress
from bertscale.corpus.readers import (
    Record,
    Rejected,
    expand_inputs,
    make_doc_id,
    doc_sort_key,
    plan_units,
    read_unit,
)
from bertscale.errors import InputError


def read_all(path: Path, **cfg_fields) -> tuple[list[Record | Rejected], dict]:
    cfg = CorpusConfig(**cfg_fields)
    stats: dict[str, int] = {}
    out = []
    for unit in plan_units(expand_inputs([str(path)]), cfg):
        out.extend(read_unit(unit, cfg, stats))
    return out, stats


def texts(items) -> list[str]:
    return [r.text for r in items if isinstance(r, Record)]


WIKI = (
    '<doc id="1" url="?curid=1" title="Alpha">\nAlpha\n\nAlpha is the first letter.\n</doc>\n'
    '<doc id="2" url="?curid=2" title="Beta &amp; Co">\nBeta &amp; Co\nBeta follows alpha.\nSecond line.\n</doc>\n'
)


# ---------------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------------
def test_wikiextractor_keeps_metadata_and_drops_title_line(tmp_path):
    (tmp_path / "wiki_00").write_text(WIKI)
    items, _ = read_all(tmp_path / "wiki_00")
    assert [r.metadata["title"] for r in items] == ["Alpha", "Beta & Co"]
    assert items[0].metadata == {"id": "1", "url": "?curid=1", "title": "Alpha"}
    assert texts(items)[0].strip() == "Alpha is the first letter."
    assert texts(items)[1].startswith("Beta follows alpha.")
    assert items[1].position == WIKI.index("<doc id=\"2\"")


def test_txt_one_document_per_file_and_blank_line_mode(tmp_path):
    body = "First para line one\nline two.\n\n\nSecond para.\n   \nThird."
    (tmp_path / "a.txt").write_text(body)
    assert texts(read_all(tmp_path / "a.txt")[0]) == [body]
    paras, _ = read_all(tmp_path / "a.txt", txt_mode="blank_line")
    assert [t.strip() for t in texts(paras)] == ["First para line one\nline two.", "Second para.", "Third."]
    assert [r.position for r in paras] == [0, body.index("Second"), body.index("Third")]


def test_jsonl_text_field_and_metadata(tmp_path):
    rows = [{"content": "hello world", "id": 7, "url": "u"}, {"content": "second doc"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items, _ = read_all(tmp_path / "d.jsonl", text_field="content")
    assert texts(items) == ["hello world", "second doc"]
    assert items[0].metadata == {"id": 7, "url": "u"}


def test_parquet_column_and_row_positions(tmp_path):
    table = pa.table({"body": ["one doc", None, "three"], "title": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    items, _ = read_all(tmp_path / "d.parquet", parquet_column="body")
    assert [(type(r).__name__, r.position) for r in items] == [("Record", 0), ("Rejected", 1), ("Record", 2)]
    assert items[2].metadata == {"title": "c"}
    missing, _ = read_all(tmp_path / "d.parquet")
    assert len(missing) == 1 and "no column 'text'" in missing[0].reason


def test_big_parquet_is_split_by_row_groups_with_the_same_records(tmp_path):
    rows = [f"document number {i} " + "x" * 200 for i in range(60)]
    pq.write_table(pa.table({"text": rows, "id": list(range(60))}), tmp_path / "big.parquet", row_group_size=7,
                   compression="none")
    whole, _ = read_all(tmp_path / "big.parquet", bundle_bytes=2**20)
    units = plan_units(expand_inputs([str(tmp_path / "big.parquet")]), CorpusConfig(bundle_bytes=1024))
    assert len(units) > 3 and all(u.format == "parquet" for u in units)
    assert [u.start for u in units[1:]] == [u.end for u in units[:-1]] and units[-1].end is None
    split, _ = read_all(tmp_path / "big.parquet", bundle_bytes=1024)
    assert [(r.position, r.text, r.metadata) for r in split] == [(r.position, r.text, r.metadata) for r in whole]
    assert [r.position for r in split] == list(range(60))


@pytest.mark.parametrize("suffix,compress", [
    (".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress),
    (".zst", lambda b: zstandard.ZstdCompressor().compress(b)), (".bgz", lambda b: bgzf_compress(b, block_size=50)),
])
def test_compressed_variants_read_like_plain(tmp_path, suffix, compress):
    (tmp_path / f"wiki_00{suffix}").write_bytes(compress(WIKI.encode()))
    (tmp_path / f"d.jsonl{suffix}").write_bytes(compress(b'{"text": "x y z"}\n'))
    assert texts(read_all(tmp_path / f"wiki_00{suffix}")[0]) == texts(read_all_plain(tmp_path))
    assert texts(read_all(tmp_path / f"d.jsonl{suffix}")[0]) == ["x y z"]


def read_all_plain(tmp_path: Path) -> list[Record | Rejected]:
    (tmp_path / "plain").mkdir(exist_ok=True)
    (tmp_path / "plain" / "wiki_00").write_text(WIKI)
    return read_all(tmp_path / "plain" / "wiki_00")[0]


@pytest.mark.parametrize("fmt", ["wikiextractor", "jsonl", "blank_line"])
def test_byte_range_splitting_reads_each_record_exactly_once(tmp_path, fmt):
    if fmt == "wikiextractor":
        body = "".join(f'<doc id="{i}" url="u" title="T{i}">\nT{i}\n' + f"text {i} " * (i % 7 + 1) + "\n</doc>\n"
                       for i in range(300))
    elif fmt == "jsonl":
        body = "".join(json.dumps({"text": f"doc {i} " * (i % 9 + 1)}) + "\n" for i in range(300))
    else:
        body = "".join(f"para {i}\n" + "line\n" * (i % 5) + "\n" * (1 + i % 3) + " \n" * (i % 2) for i in range(300))
    name = {"wikiextractor": "wiki_00", "jsonl": "d.jsonl", "blank_line": "d.txt"}[fmt]
    (tmp_path / name).write_text(body)
    mode = {"txt_mode": "blank_line"} if fmt == "blank_line" else {}
    whole, _ = read_all(tmp_path / name, **mode)
    split, _ = read_all(tmp_path / name, bundle_bytes=1024, **mode)
    assert len(plan_units(expand_inputs([str(tmp_path / name)]), CorpusConfig(bundle_bytes=1024, **mode))) > 5
    assert len(whole) == 300
    assert [(r.position, r.text) for r in split] == [(r.position, r.text) for r in whole]


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def test_truncated_gzip_keeps_records_before_the_error(tmp_path):
    body = "".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(2000)).encode()
    data = gzip.compress(body)
    (tmp_path / "d.jsonl.gz").write_bytes(data[: len(data) // 2])
    items, _ = read_all(tmp_path / "d.jsonl.gz")
    assert 100 < len(texts(items)) < 2000
    assert isinstance(items[-1], Rejected) and "EOFError" in items[-1].reason


def test_truncated_zstd_is_reported(tmp_path):
    # Incompressible content, so the first half of the archive holds complete blocks.
    docs = "".join(f'<doc id="{i}" url="u" title="T">\nT\n{os.urandom(2000).hex()}\n</doc>\n' for i in range(300))
    data = zstandard.ZstdCompressor().compress(docs.encode())
    (tmp_path / "wiki.zst").write_bytes(data[: len(data) // 2])
    items, _ = read_all(tmp_path / "wiki.zst")
    assert isinstance(items[-1], Rejected) and "truncated" in items[-1].reason
    assert len(texts(items)) > 0


def test_binary_and_empty_files_are_rejected(tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "empty.txt").write_bytes(b"")
    (binary,), _ = read_all(tmp_path / "blob.bin")
    (empty,), _ = read_all(tmp_path / "empty.txt")
    assert isinstance(binary, Rejected) and "binary" in binary.reason
    assert isinstance(empty, Rejected) and "empty" in empty.reason


def test_malformed_json_lines_are_rejected_individually(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "good one"}\n{"text": broken\n[1, 2]\n{"other": 1}\n{"text": 5}\n'
                                      '{"text": "good two"}\n')
    items, _ = read_all(tmp_path / "d.jsonl")
    assert texts(items) == ["good one", "good two"]
    reasons = [r.reason for r in items if isinstance(r, Rejected)]
    assert len(reasons) == 4
    assert "malformed JSON" in reasons[0] and "not an object" in reasons[1]
    assert "no field 'text'" in reasons[2] and "not a string" in reasons[3]


def test_invalid_utf8_in_the_middle(tmp_path):
    good = b'<doc id="1" url="u" title="A">\nA\n' + b"fine text " * 50 + b"\n</doc>\n"
    few_bad = b'<doc id="2" url="u" title="B">\nB\n' + b"caf\xe9 " + b"more text " * 50 + b"\n</doc>\n"
    mostly_bad = b'<doc id="3" url="u" title="C">\nC\n' + b"\xff\xfe" * 100 + b"\n</doc>\n"
    (tmp_path / "wiki_00").write_bytes(good + few_bad + mostly_bad + good)
    items, _ = read_all(tmp_path / "wiki_00")
    assert [type(r).__name__ for r in items] == ["Record", "Record", "Rejected", "Record"]
    assert items[1].invalid_bytes == 1 and "caf more" in items[1].text
    assert "invalid UTF-8" in items[2].reason


def test_huge_single_line_file_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as fh:  # 50 MB, no newline
        chunk = b"x" * (1 << 20)
        fh.write(b'{"text": "')
        for _ in range(50):
            fh.write(chunk)
    (tmp_path / "huge.txt").symlink_to(path)
    tracemalloc.start()
    items, _ = read_all(path, max_doc_bytes=1 << 20)
    whole_file, _ = read_all(tmp_path / "huge.txt", max_doc_bytes=1 << 20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(items) == 1 and "exceeds corpus.max_doc_bytes" in items[0].reason
    assert len(whole_file) == 1 and "exceeds corpus.max_doc_bytes" in whole_file[0].reason
    assert peak < 8 * 2**20



def test_json_lines_that_break_the_parser_are_rejected_not_raised(tmp_path):
    # A deeply nested line raises RecursionError and a huge integer ValueError, neither a JSONDecodeError.
    deep = "[" * 100_000 + "]" * 100_000
    huge = '{"text": "big number", "n": ' + "9" * 5000 + "}"
    (tmp_path / "d.jsonl").write_text(f'{{"text": "good one"}}\n{deep}\n{huge}\n{{"text": "good two"}}\n')
    items, _ = read_all(tmp_path / "d.jsonl")
    assert texts(items) == ["good one", "good two"]
    reasons = [r.reason for r in items if isinstance(r, Rejected)]
    assert len(reasons) == 2 and "nested too deeply" in reasons[0] and "digits" in reasons[1]


def test_doc_ids_do_not_depend_on_how_the_input_dir_is_spelled(tmp_path, monkeypatch):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    for name in ("a.txt", "sub/b.txt"):
        (tmp_path / "corpus" / name).write_text("x")
    monkeypatch.chdir(tmp_path / "corpus" / "sub")
    spellings = ["../../corpus", "..", "../", str(tmp_path / "corpus"), "../../corpus/sub/.."]
    for spec in spellings:
        assert [f.rel for f in expand_inputs([spec])] == ["corpus/a.txt", "corpus/sub/b.txt"], spec
    monkeypatch.chdir(tmp_path)
    assert [f.rel for f in expand_inputs(["corpus"])] == ["corpus/a.txt", "corpus/sub/b.txt"]
    assert [f.rel for f in expand_inputs(["corpus/*.txt"])] == ["corpus/a.txt"]


# ---------------------------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------------------------
def test_expand_directories_globs_and_missing_inputs(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    for name in ("a.txt", "sub/b.txt", ".hidden"):
        (tmp_path / "corpus" / name).write_text("x")
    files = expand_inputs([str(tmp_path / "corpus")])
    assert [f.rel for f in files] == ["corpus/a.txt", "corpus/sub/b.txt"]
    assert [f.rel for f in expand_inputs([str(tmp_path / "corpus" / "*.txt")])] == ["corpus/a.txt"]
    with pytest.raises(InputError, match="does not exist"):
        expand_inputs([str(tmp_path / "nope")])
    with pytest.raises(InputError, match="matched no files"):
        expand_inputs([str(tmp_path / "corpus" / "*.jsonl")])
    with pytest.raises(InputError, match="no corpus inputs"):
        expand_inputs([])


def test_doc_ids_sort_by_source_then_position():
    ids = [make_doc_id("b.txt", 5), make_doc_id("a b.txt", 100), make_doc_id("a", 20), make_doc_id("a", 3)]
    assert sorted(ids, key=doc_sort_key) == ["a#000000000003", "a#000000000020", "a b.txt#000000000100",
                                             "b.txt#000000000005"]
