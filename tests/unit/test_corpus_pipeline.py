"""The corpus stage end to end on tiny inputs: Beam transforms under TestPipeline, the in-process twin, the
manifest/quarantine contract, the document-count invariant and the user errors."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.io.filesystem import FileMetadata, FileSystem
from apache_beam.testing.util import assert_that, equal_to

from bertscale.config import RunnerConfig, load_config
from bertscale.corpus.dedup import (
    UnionFind,
    band_records,
    bucket_order,
    candidates_in_bucket,
    exact_drops_in_bucket,
    exact_records,
)
from bertscale.corpus.output import SHARD_SCHEMA, assign_shards, write_shard
from bertscale.corpus.pipeline import (
    StagePlan,
    build_graph,
    connected_components,
    dedup_buckets,
    run_corpus,
    run_plain,
    validate_runner,
)
from bertscale.corpus.readers import expand_inputs, plan_units
from bertscale.corpus.sentences import split_sentences
from bertscale.corpus.units import read_keys, write_keys
from bertscale.errors import ConfigError, InputError

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


def test_bucket_steps_keep_the_first_copy_and_pair_band_mates(tmp_path: Path):
    digests = {name: hashlib.blake2b(name.encode(), digest_size=16).digest() for name in ("aa", "bb")}
    keys, refs = ["aa", "bb", "aa", "aa"], np.array([5, 7, 2, 9])
    exact = exact_records([digests[k] for k in keys], refs)
    (tmp_path / "units").mkdir()
    spans = write_keys(str(tmp_path), 3, "exact", exact, 4)
    assert sum(end - start for _, start, end in spans) == 4 and len({b for b, _, _ in spans}) == len(spans)
    batches = [list(read_keys(str(tmp_path), "exact", [(3, start, end)])) for _, start, end in spans]
    assert sorted(r for batch in batches for r in exact_drops_in_bucket(batch)) == [5, 9]  # "aa" keeps ref 2
    bands = band_records(np.array([11, 11, 12, 11, 13], dtype=np.uint64), np.array([3, 1, 3, 8, 4]))
    assert candidates_in_bucket([bands[:2].tobytes(), bands[2:].tobytes()]) == [(1, 3), (1, 8), (3, 8)]
    ordered, spans = bucket_order(bands, 2)
    assert [b for b, _, _ in spans] == [0, 1] and sorted(ordered.tolist()) == sorted(bands.tolist())
    assert candidates_in_bucket([ordered[s:e].tobytes() for _, s, e in spans]) == [(1, 3), (1, 8), (3, 8)]


def test_shard_bytes_do_not_depend_on_how_the_rows_arrive(tmp_path: Path):
    rows = 2345
    table = pa.table({"doc_id": [f"d{i}" for i in range(rows)], "text": [f"text {i} " * (i % 9 + 1) for i in range(rows)],
                      "sentences": [[f"text {i}"] * (i % 3) for i in range(rows)], "source": ["s"] * rows,
                      "metadata": ["{}"] * rows}, schema=SHARD_SCHEMA)
    infos = []
    for cuts in ([rows], [1, 999, 1000, 345], [7] * 335):
        out = tmp_path / f"cut{len(cuts)}"
        (out / "shards").mkdir(parents=True)
        starts = np.cumsum([0, *cuts[:-1]])
        infos.append(write_shard(str(out), 0, (table.slice(s, n) for s, n in zip(starts, cuts))))
        assert pq.read_table(out / infos[-1].name).equals(table)
    assert len({(i.sha256, i.bytes) for i in infos}) == 1
    assert infos[0].rows == rows and infos[0].sentences == sum(i % 3 for i in range(rows))


def test_dedup_buckets_grow_with_the_input():
    assert dedup_buckets(0) == dedup_buckets(64 * 2**20) == 32
    assert dedup_buckets(8 * 2**30) == 256 and dedup_buckets(2**50) == 8192


@pytest.mark.parametrize("rounds", [0, 1, 4])
def test_connected_components_match_union_find_whatever_the_rounds(rounds):
    """A chain longer than the rounds can resolve, a star, a clique and a pair: the residue step must finish what
    the propagation rounds leave, so every round count gives the union-find answer."""
    chain = [(i, i + 1) for i in range(100, 112)]
    edges = chain[::-1] + [(50, 60), (50, 61), (50, 62), (7, 8), (8, 9), (7, 9), (300, 200)]
    uf = UnionFind()
    for a, b in edges:
        uf.union(a, b)
    expected = [(n, uf.find(n)) for n in uf.members()]
    with BeamTestPipeline() as p:
        labels, unconverged = connected_components(p | beam.Create(edges), rounds)
        assert_that(labels, equal_to(expected), label="labels")
        if rounds == 4:
            assert_that(unconverged | beam.Map(lambda kv: kv[1] > 0), equal_to([True]), label="residue")


def test_shard_slots_follow_the_offset_in_the_kept_text():
    sizes = np.array([40, 70, 10, 300, 5])
    slots = {k: v.tolist() for k, v in assign_shards(90, sizes, 100)}
    assert slots == {0: [0], 1: [1], 2: [2, 3], 5: [4]}  # starts 90, 130, 200, 210, 510
    # Placing a unit alone gives the same slots as placing it after its predecessors in one piece.
    whole = {i - 1: k for k, v in assign_shards(0, np.concatenate([[90], sizes]), 100) for i in v.tolist() if i}
    assert whole == {i: k for k, v in slots.items() for i in v}


def test_a_document_bigger_than_a_shard_leaves_no_gap_in_shard_names(tmp_path, corpus_dir):
    (corpus_dir / "books" / "long.txt").write_text(" ".join(article(20 + i) for i in range(8)))
    result = run_plain(make_cfg(tmp_path, [corpus_dir]))
    names = [s["name"] for s in result.manifest["shards"]]
    assert names == [f"shards/part-{i:05d}.parquet" for i in range(len(names))]
    assert sorted(p.name for p in (result.output_dir / "shards").iterdir()) == [n.split("/")[1] for n in names]


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
    from bertscale.corpus.pipeline import _run

    plain = run_plain(make_cfg(tmp_path / "plain", [corpus_dir]))

    def engine(cfg, plan: StagePlan):
        with BeamTestPipeline() as p:
            build_graph(p, plan, cfg)

    beam_result = _run(make_cfg(tmp_path / "beam", [corpus_dir]), engine)
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


# ---------------------------------------------------------------------------------------------------------------
# Cloud outputs: an in-memory object store registered with Beam's FileSystems under memfs://
# ---------------------------------------------------------------------------------------------------------------
class MemFileSystem(FileSystem):
    """A flat key -> bytes store like GCS or S3: no directories, deleting a "directory" name deletes nothing."""

    objects: dict[str, bytes] = {}

    @classmethod
    def scheme(cls):
        return "memfs"

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/"), *(p.strip("/") for p in paths)])

    def split(self, path):
        head, _, tail = path.rpartition("/")
        return head, tail

    def mkdirs(self, path):
        pass

    def has_dirs(self):
        return False

    def _list(self, prefix):
        for key in sorted(self.objects):
            if key.startswith(prefix):
                yield FileMetadata(key, len(self.objects[key]), 0.0)

    def create(self, path, mime_type=None, compression_type=None):
        store = self.objects

        class Writer(io.BytesIO):
            def close(self):
                if not self.closed:
                    store[path] = self.getvalue()
                super().close()

        return Writer()

    def open(self, path, mime_type=None, compression_type=None):
        return io.BytesIO(self.objects[path])

    def copy(self, sources, destinations):
        for s, d in zip(sources, destinations):
            self.objects[d] = self.objects[s]

    def rename(self, sources, destinations):
        for s, d in zip(sources, destinations):
            self.objects[d] = self.objects.pop(s)

    def exists(self, path):
        return path in self.objects

    def size(self, path):
        return len(self.objects[path])

    def last_updated(self, path):
        return 0.0

    def checksum(self, path):
        return str(len(self.objects[path]))

    def metadata(self, path):
        return FileMetadata(path, len(self.objects[path]), 0.0)

    def delete(self, paths):
        for path in paths:
            self.objects.pop(path, None)


@pytest.fixture()
def memfs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a mangled "memfs:/bucket" path would land
    MemFileSystem.objects.clear()
    yield MemFileSystem.objects
    MemFileSystem.objects.clear()


def test_uri_output_is_written_through_beam_filesystems(tmp_path, corpus_dir, memfs):
    cfg = make_cfg(tmp_path, [corpus_dir], "corpus.output=memfs://bucket/corpus")
    result = run_plain(cfg)
    assert result.output_dir == "memfs://bucket/corpus"
    assert result.manifest_path == "memfs://bucket/corpus/manifest.json"
    manifest = json.loads(memfs["memfs://bucket/corpus/manifest.json"])
    assert manifest == result.manifest and result.manifest_sha256 == hashlib.sha256(
        memfs["memfs://bucket/corpus/manifest.json"]).hexdigest()
    for shard in manifest["shards"]:
        assert hashlib.sha256(memfs[f"memfs://bucket/corpus/{shard['name']}"]).hexdigest() == shard["sha256"]
    assert "memfs://bucket/corpus/quarantine.jsonl" in memfs
    assert not [k for k in memfs if "/_work/" in k]  # the work files under the prefix are gone too
    assert not (tmp_path / "memfs:").exists()


def test_stage_location_keeps_uris_and_stage_dir_refuses_them():
    cfg = load_config(None, ["corpus.output=gs://bucket/corpus", "workdir=s3://b/run"])
    assert cfg.stage_location("corpus") == "gs://bucket/corpus"
    assert cfg.stage_location("tokenizer") == "s3://b/run/tokenizer"
    with pytest.raises(ConfigError, match="gs://bucket/corpus is a URI"):
        cfg.stage_dir("corpus")
    assert load_config(None, ["workdir=runs/x"]).stage_dir("corpus") == Path("runs/x/corpus")


# ---------------------------------------------------------------------------------------------------------------
# Failures that must not crash the job or leave a stale output behind
# ---------------------------------------------------------------------------------------------------------------
def test_a_record_that_breaks_processing_is_quarantined_not_fatal(tmp_path, corpus_dir, monkeypatch):
    from bertscale.corpus import units

    def split_or_fail(text, min_chars):
        if "Article 4 " in text:
            raise RecursionError("maximum recursion depth exceeded")
        return split_sentences(text, min_chars)

    monkeypatch.setattr(units, "split_sentences", split_or_fail)
    result = run_plain(make_cfg(tmp_path, [corpus_dir]))
    c = result.counts
    assert c["read"] == c["kept"] + c["filtered"] + c["duplicates"] + c["quarantined"]
    quarantine = [json.loads(line) for line in (result.output_dir / "quarantine.jsonl").read_text().splitlines()]
    failed = [q for q in quarantine if "processing failed: RecursionError" in q["reason"]]
    assert [Path(q["file"]).name for q in failed] == ["b4.txt"]


def test_a_reader_that_raises_is_quarantined_and_keeps_earlier_records(tmp_path, corpus_dir, monkeypatch):
    from bertscale.corpus import units

    real = units.read_unit

    def read_then_fail(unit, cfg, counts):
        yield from real(unit, cfg, counts)
        if unit.file.path.endswith("d.jsonl.gz"):
            raise MemoryError("simulated")

    monkeypatch.setattr(units, "read_unit", read_then_fail)
    result = run_plain(make_cfg(tmp_path, [corpus_dir]))
    c = result.counts
    assert c["read"] == c["kept"] + c["filtered"] + c["duplicates"] + c["quarantined"]
    reasons = (result.output_dir / "quarantine.jsonl").read_text()
    assert "reader failed after position" in reasons and "MemoryError" in reasons
    ids = [i for s in result.manifest["shards"]
           for i in pq.read_table(result.output_dir / s["name"], columns=["doc_id"]).column(0).to_pylist()]
    assert any(i.startswith("in/d.jsonl.gz#") for i in ids)  # the records read before the failure are kept


def test_a_failed_run_leaves_no_stale_manifest(tmp_path, corpus_dir):
    first = run_plain(make_cfg(tmp_path, [corpus_dir]))
    assert first.manifest_path.is_file()
    with pytest.raises(InputError, match="no documents survived"):
        run_plain(make_cfg(tmp_path, [corpus_dir], "corpus.filters.min_chars=1000000"))
    assert not first.manifest_path.exists()


# ---------------------------------------------------------------------------------------------------------------
# Runner validation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("runner,options", [
    ("DirectRunner", []), ("direct", []), ("DataflowRunner", ["--project=p", "--region=r"]),
    ("FlinkRunner", ["--flink_master=localhost:8081", "--parallelism=2"]),
    ("SparkRunner", ["--spark_master_url=spark://h:7077"]),
    ("apache_beam.runners.direct.direct_runner.DirectRunner", ["--save_main_session"]),
])
def test_known_runners_and_options_pass(runner, options):
    validate_runner(RunnerConfig(runner=runner, pipeline_options=options))


@pytest.mark.parametrize("runner,options,message", [
    ("DirectRuner", [], r"'DirectRuner' is not a Beam runner: did you mean DirectRunner\?"),
    ("DirectRunner", ["--direct_num_worker=2"], r"unknown Beam option.*--direct_num_worker \(did you mean "
                                                r"--direct_num_workers\?\)"),
    ("DirectRunner", ["project=p"], r"must be of the form --name=value"),
    ("DirectRunner", ["--runner=Flnk"], r"'Flnk' is not a Beam runner: did you mean FlinkRunner\?"),
])
def test_runner_typos_and_unknown_options_are_config_errors(runner, options, message):
    with pytest.raises(ConfigError, match=message):
        validate_runner(RunnerConfig(runner=runner, pipeline_options=options))


def test_run_corpus_rejects_a_bad_runner_before_reading_inputs(tmp_path):
    cfg = make_cfg(tmp_path, [tmp_path / "missing"], "corpus.runner.runner=Dataflw")
    with pytest.raises(ConfigError, match="did you mean DataflowRunner"):
        run_corpus(cfg)
