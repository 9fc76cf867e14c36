"""Decontamination in the corpus stage on real text: a Wikipedia + Gutenberg subset and a planted document (a
Jane Austen chapter quoting an RTE dev sentence, recased and repunctuated), checked against the dev and test
files of every GLUE task in the shared data. The planted document is removed and reported with its task, the
count invariant holds, and shards, manifest and report are byte-identical with 1 and 2 workers and in one
process; `bertscale corpus --decontaminate` does the same from the command line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bertscale import lineage
from bertscale.config import load_config
from bertscale.corpus import run_corpus, run_plain
from bertscale.corpus.decontaminate import normalize

REPO = Path(__file__).resolve().parents[2]
GLUE_TASKS = ["CoLA", "SST-2", "MRPC", "STS-B", "QNLI", "RTE", "WNLI"]


@pytest.fixture(scope="module")
def planted(shared_data, tmp_path_factory) -> tuple[Path, str]:
    """A directory with the planted document, and the RTE dev sentence it quotes."""
    with open(shared_data / "glue" / "RTE" / "dev.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    sentence = next(row[1] for row in rows if len(row[1].split()) >= 25)
    emma = (shared_data / "corpus" / "gutenberg" / "gutenberg" / "austen-emma.txt").read_text(encoding="utf-8")
    chapter = emma[emma.index("CHAPTER II"):][:6000]
    quoted = sentence.upper().replace(",", " ;").replace(".", "!")
    out = tmp_path_factory.mktemp("planted")
    (out / "emma-quoting-rte.txt").write_text(f"{chapter[:3000]}\n\n\u201c{quoted}\u201d\n\n{chapter[3000:]}\n")
    return out, sentence


def config(root: Path, inputs: list[str], glue: Path, workers: int):
    cfg = load_config(None, [f"workdir={root}", f"corpus.runner.num_workers={workers}",
                             "corpus.target_shard_bytes=1048576", "corpus.bundle_bytes=262144",
                             f"finetune.glue_dir={glue}", f"finetune.tasks=[{','.join(GLUE_TASKS)}]"],
                      extra={"corpus": {"inputs": inputs}})
    cfg.corpus.decontamination.eval_files = lineage.task_eval_files(cfg)
    return cfg


def outputs(result) -> list[bytes]:
    names = [s["name"] for s in result.manifest["shards"]] + ["manifest.json", "decontamination.jsonl"]
    return [(result.output_dir / name).read_bytes() for name in names]


def test_planted_glue_sentence_is_removed_and_reported_identically_by_every_runner(shared_data, planted, tmp_path):
    corpus = shared_data / "corpus"
    inputs = [str(corpus / "wikipedia" / "wiki_0[0-1]"), str(corpus / "gutenberg" / "inaugural"), str(planted[0])]
    glue = shared_data / "glue"
    two = run_corpus(config(tmp_path / "a", inputs, glue, 2))
    one = run_corpus(config(tmp_path / "b", inputs, glue, 1))
    plain = run_plain(config(tmp_path / "c", inputs, glue, 2))

    c = two.counts
    assert c["read"] == c["kept"] + c["filtered"] + c["duplicates"] + c["quarantined"] + c["decontaminated"]
    assert c["decontaminated"] >= 1 and c["decontaminated_task_RTE"] >= 1
    assert set(GLUE_TASKS) <= {k.removeprefix("decontaminated_task_") for k in c}  # every task counted, 0 or more
    section = two.manifest["decontamination"]
    assert section["active"] and section["index_ngrams"] > 100_000
    assert {(f["task"], f["split"]) for f in section["eval_files"]} == {(t, s) for t in GLUE_TASKS
                                                                           for s in ("dev", "test")}

    report = [json.loads(line) for line in (two.output_dir / "decontamination.jsonl").read_text().splitlines()]
    hits = [r for r in report if "emma-quoting-rte" in r["doc_id"]]
    assert [(r["task"], r["split"], r["action"]) for r in hits] == [("RTE", "dev", "document")]
    assert hits[0]["ngram"] in normalize(planted[1]) and len(hits[0]["ngram"].split()) == 13
    assert sum(section["documents"].get(t, {}).get(s, 0) for t in GLUE_TASKS for s in ("dev", "test")) == len(report)

    ids = [i for s in two.manifest["shards"]
           for i in pq.read_table(two.output_dir / s["name"], columns=["doc_id"]).column(0).to_pylist()]
    assert not any("emma-quoting-rte" in i for i in ids) and len(ids) == c["kept"]

    # Same input and config: the same bytes with 2 workers, 1 worker and in one process.
    assert outputs(two) == outputs(plain)
    assert outputs(one)[:-2] == outputs(two)[:-2] and outputs(one)[-1] == outputs(two)[-1]
    print(f"\nreal contamination in the subset: {c['decontaminated']} documents, "
          + ", ".join(f"{t}={c[f'decontaminated_task_{t}']}" for t in GLUE_TASKS))


def test_the_command_line_decontaminates_against_named_tasks(shared_data, planted, tmp_path):
    books = shared_data / "corpus" / "gutenberg" / "inaugural"
    cmd = [sys.executable, "-m", "bertscale", "corpus", str(planted[0]), str(books / "1861-Lincoln.txt"),
           "--no-tracking", "--workdir", str(tmp_path), "--num-workers", "1", "--decontaminate", "RTE", "MRPC",
           "--glue-dir", str(shared_data / "glue"), "--decontamination-mode", "passage"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "decontaminated 0, edited 1 (2 passages removed); documents per task: RTE=1" in done.stdout
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert [(f["task"], f["split"]) for f in manifest["decontamination"]["eval_files"]] == [
        ("RTE", "dev"), ("RTE", "test"), ("MRPC", "dev"), ("MRPC", "test")]
    texts = [t for s in manifest["shards"]
             for t in pq.read_table(tmp_path / "corpus" / s["name"], columns=["text"]).column(0).to_pylist()]
    emma = next(t for t in texts if "CHAPTER II" in t)
    assert normalize(planted[1])[:60] not in normalize(emma) and "Weston" in emma  # the quote went, Emma stayed
