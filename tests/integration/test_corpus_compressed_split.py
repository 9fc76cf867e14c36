"""The corpus stage on one BGZF file split into many work units writes the shards it writes for the same file as
plain gzip (one unit), byte for byte, and the rows it writes for the same content uncompressed (whose document ids
and sources differ only by the file name)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow.parquet as pq

from bertscale.config import load_config
from bertscale.corpus import run_plain
from bertscale.corpus.compression import bgzf_compress


def article(i: int) -> str:
    return " ".join(f"Article {i} talks about topic {i * 7 % 13} and item {j}." for j in range(30))


def run(tmp_path: Path, source: Path, name: str):
    return run_plain(load_config(None, [f"workdir={tmp_path / name}", f"corpus.inputs=[{source}]",
                                        "corpus.runner.num_workers=1", "corpus.target_shard_bytes=8192",
                                        "corpus.bundle_bytes=2048"]))


def rows(result, name: str) -> list[dict]:
    out = []
    for shard in result.manifest["shards"]:
        for row in pq.read_table(result.output_dir / shard["name"]).to_pylist():
            out.append({**row, **{key: row[key].replace(name, "NAME") for key in ("doc_id", "source")}})
    return out


def test_a_bgzf_file_split_into_units_gives_the_shards_of_one_unit(tmp_path):
    docs = [article(i) for i in range(80)] + [article(5), article(9).replace("item 29.", "item twenty-nine.")]
    text = "".join(f'<doc id="{i}" url="u{i}" title="T{i}">\nT{i}\n{doc}\n</doc>\n' for i, doc in enumerate(docs))
    source = tmp_path / "in" / "wiki_00.gz"
    source.parent.mkdir()
    source.write_bytes(bgzf_compress(text.encode(), block_size=1500))
    split = run(tmp_path, source, "bgzf")
    source.write_bytes(gzip.compress(text.encode()))  # the same path: document ids and sources are the same
    whole = run(tmp_path, source, "gzip")
    source.with_suffix("").write_text(text)
    plain = run(tmp_path, source.with_suffix(""), "plain")

    assert split.counts["units"] > 30 and whole.counts["units"] == 1
    assert split.counts["duplicates"] >= 2 and split.counts["kept"] > 60
    assert [s["sha256"] for s in split.manifest["shards"]] == [s["sha256"] for s in whole.manifest["shards"]]
    assert {k: v for k, v in split.counts.items() if k not in ("units", "input_bytes")} == \
        {k: v for k, v in plain.counts.items() if k not in ("units", "input_bytes")}
    assert rows(split, "wiki_00.gz") == rows(plain, "wiki_00")
