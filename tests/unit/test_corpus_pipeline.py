"""The corpus stage end to end on tiny inputs: Beam transforms under TestPipeline, the in-process twin, the
manifest/quarantine contract, the document-count invariant and the user errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from bertscale.config import load_config
from bertscale.corpus.pipeline import (
    NUM_BUCKETS,
    UnitKeys,
    band_buckets,
    build_graph,
    candidates_in_bucket,
    exact_buckets,
    exact_drops_in_bucket,
    run_plain,
)
from bertscale.corpus.readers import expand_inputs, plan_units
from bertscale.errors import InputError

SENTENCE = "The committee met on Tuesday to discuss the budget for the coming year and agreed on it. "


def article(i: int) -> str:
    return " ".join(f"Article {i} talks about topic {i * 7 % 13} and item {j}." for j in range(30))


@pytest.fixture()
def corpus_dir(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    (root / "books").mkdir(parents=True)
    for i in range(6):
        (root / "books" / f"b{i}.txt").write_text(article(i))
    (root / "books" / "copy.txt").write_text(article(2).upper())  # exact duplicate after normalization
    near = article(3).replace("item 29.", "item twenty-nine.")
    (root / "books" / "near.txt").write_text(near)
    (root / "short.txt").write_text("Too short.")
    (root / "empty.txt").write_text("")
    rows = [{"text": article(10 + i)} for i in range(3)]
    (root / "d.jsonl.gz").write_bytes(gzip.compress(("\n".join(map(json.dumps, rows)) + "\n{bad json\n").encode()))
    return root


def make_cfg(tmp_path: Path, inputs: list[Path], *extra: str):
    return load_config(None, [f"workdir={tmp_path / 'work'}", f"corpus.inputs=[{','.join(map(str, inputs))}]",
                              "corpus.runner.num_workers=1", "corpus.target_shard_bytes=4096", *extra])


def test_bucket_transforms_under_test_pipeline():
    keys = [UnitKeys(0, exact=[("aa", "x#000000000001"), ("bb", "x#000000000002")], bands=[(5, "x#000000000001")]),
            UnitKeys(1, exact=[("aa", "w#000000000000")], bands=[(5, "y#000000000000"), (6, "y#000000000000")])]
    with BeamTestPipeline() as p:
        pc = p | beam.Create(keys)
        drops = (pc | "E" >> beam.FlatMap(exact_buckets, NUM_BUCKETS) | "GE" >> beam.GroupByKey()
                 | "D" >> beam.FlatMap(lambda kv: exact_drops_in_bucket(kv[1])))
        pairs = (pc | "B" >> beam.FlatMap(band_buckets, NUM_BUCKETS) | "GB" >> beam.GroupByKey()
                 | "C" >> beam.FlatMap(lambda kv: candidates_in_bucket(kv[1])))
        assert_that(drops, equal_to(["x#000000000001"]), label="exact")
        assert_that(pairs, equal_to([("x#000000000001", "y#000000000000")]), label="pairs")


def test_plain_run_writes_contract_outputs(tmp_path, corpus_dir):
    result = run_plain(make_cfg(tmp_path, [corpus_dir]))
    c = result.counts
    assert c["read"] == c["kept"] + c["filtered"] + c["duplicates"] + c["quarantined"]
    assert c["exact_duplicates"] == 1 and c["near_duplicates"] == 1
    assert c["quarantined"] == 2  # empty.txt and the malformed JSON line
    assert c["filtered_min_chars"] == 1 and c["kept"] == 9
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["counts"] == c and len(manifest["shards"]) >= 2
    assert {i["path"].rsplit("/", 1)[-1] for i in manifest["inputs"]} >= {"b0.txt", "d.jsonl.gz"}
    tables = [pq.read_table(result.output_dir / s["name"]) for s in manifest["shards"]]
    assert [t.num_rows for t in tables] == [s["rows"] for s in manifest["shards"]]
    ids = [i for t in tables for i in t.column("doc_id").to_pylist()]
    assert ids == sorted(ids) and not any("copy.txt" in i or "near.txt" in i for i in ids)
    assert tables[0].column_names == ["doc_id", "text", "sentences", "source", "metadata"]
    assert all(len(s) > 0 for t in tables for s in t.column("sentences").to_pylist())
    quarantine = [json.loads(line) for line in (result.output_dir / "quarantine.jsonl").read_text().splitlines()]
    assert {q["reason"].split(":")[0] for q in quarantine} == {"empty file (0 bytes of content)", "malformed JSON line"}
    assert not (result.output_dir / "_work").exists()
    assert "kept 9" in result.summary()


def test_beam_graph_output_equals_plain_run(tmp_path, corpus_dir):
    """The Beam graph under TestPipeline (in-memory runner) gives the same shards, byte for byte."""
    from bertscale.corpus.pipeline import _run, finalize  # noqa: F401  (finalize is what both paths share)

    plain = run_plain(make_cfg(tmp_path / "plain", [corpus_dir]))

    def engine(cfg, units, files, work_dir):
        with BeamTestPipeline() as p:
            build_graph(p, units, files, cfg, work_dir)

    beam_result = _run(make_cfg(tmp_path / "beam", [corpus_dir]), False, engine)
    assert beam_result.counts == plain.counts
    for shard in plain.manifest["shards"]:
        assert (beam_result.output_dir / shard["name"]).read_bytes() == (plain.output_dir / shard["name"]).read_bytes()
    assert beam_result.manifest["shards"] == plain.manifest["shards"]


def test_split_units_give_identical_output(tmp_path):
    src = tmp_path / "wiki_00"
    src.write_text("".join(f'<doc id="{i}" url="u" title="T{i}">\nT{i}\n{article(i)}\n</doc>\n' for i in range(40)))
    whole = run_plain(make_cfg(tmp_path / "a", [src]))
    split = run_plain(make_cfg(tmp_path / "b", [src], "corpus.bundle_bytes=2048"))
    assert split.counts["units"] > 5 and whole.counts["units"] == 1
    assert [s["sha256"] for s in split.manifest["shards"]] == [s["sha256"] for s in whole.manifest["shards"]]


def test_nothing_kept_names_the_rules(tmp_path, corpus_dir):
    with pytest.raises(InputError, match=r"no documents survived.*min_chars: \d+.*relax corpus.filters.min_chars"):
        run_plain(make_cfg(tmp_path, [corpus_dir], "corpus.filters.min_chars=1000000"))


def test_missing_input_is_a_one_line_error(tmp_path):
    with pytest.raises(InputError, match="does not exist") as err:
        run_plain(make_cfg(tmp_path, [tmp_path / "missing"]))
    assert "\n" not in str(err.value)


def test_units_are_planned_in_document_order(tmp_path, corpus_dir):
    units = plan_units(expand_inputs([str(corpus_dir)]), load_config().corpus)
    names = [u.file.rel for u in units]
    assert names == sorted(names) and names[0] == "in/books/b0.txt"
