"""The corpus stage on real text (a Wikipedia + Gutenberg subset) with the local multi-processing Beam runner:
the count invariant, byte-identical output with 1 and 2 workers and in one process, and removal of injected exact
and near duplicates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bertscale.config import load_config
from bertscale.corpus import run_corpus, run_plain

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("BERTSCALE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    wiki, books = SHARED / "corpus" / "wikipedia", SHARED / "corpus" / "gutenberg" / "inaugural"
    if not wiki.is_dir() or not books.is_dir():
        pytest.skip(f"shared corpus not found under {SHARED}; set BERTSCALE_SHARED_DATA")
    injected = tmp_path_factory.mktemp("injected")
    original = (books / "1861-Lincoln.txt").read_text(encoding="utf-8")
    words = original.split()
    # 0.5% of words changed: 5-shingle Jaccard ~0.95, where LSH pairs the copies with probability > 0.99. (At 2%,
    # Jaccard ~0.82 sits on the 0.8 threshold, where the banding S-curve makes detection a coin flip by design.)
    near = " ".join(w if i % 200 else w.upper() + "x" for i, w in enumerate(words))
    (injected / "dup.jsonl").write_text(json.dumps({"text": original, "id": "exact"}) + "\n"
                                        + json.dumps({"text": near, "id": "near"}) + "\n")
    return [str(wiki / "wiki_0[0-3]"), str(books), str(injected)]


def config(tmp_path: Path, inputs: list[str], workers: int):
    return load_config(None, [f"workdir={tmp_path}", f"corpus.runner.num_workers={workers}",
                              "corpus.target_shard_bytes=1048576", "corpus.bundle_bytes=262144"],
                       extra={"corpus": {"inputs": inputs}})


def shard_bytes(result) -> list[bytes]:
    return [(result.output_dir / s["name"]).read_bytes() for s in result.manifest["shards"]]


def test_corpus_stage_on_real_text(tmp_path, inputs):
    first = run_corpus(config(tmp_path / "a", inputs, 2))
    second = run_corpus(config(tmp_path / "b", inputs, 1))
    plain = run_plain(config(tmp_path / "c", inputs, 2))

    c = first.counts
    assert c["read"] == c["kept"] + c["filtered"] + c["duplicates"] + c["quarantined"]
    assert c["kept"] > 1000 and c["units"] > c["files"]  # wiki files were split into byte ranges
    assert c["files"] == 4 + 55 + 1

    # Same input and config: byte-identical shards and manifest with 2 workers, 1 worker and in one process.
    assert shard_bytes(first) == shard_bytes(second) == shard_bytes(plain)
    assert first.manifest_path.read_bytes() == plain.manifest_path.read_bytes()
    without_runner = [{**r.manifest, "config": {**r.manifest["config"], "runner": None}} for r in (first, second)]
    assert without_runner[0] == without_runner[1]
    assert len(first.manifest["shards"]) > 1
    assert first.manifest["near_dedup"]["unconverged_edges"] == 0

    ids = [i for s in first.manifest["shards"] for i in pq.read_table(first.output_dir / s["name"],
                                                                          columns=["doc_id"]).column(0).to_pylist()]
    assert not any(i.startswith("injected") for i in ids)  # both injected copies dropped, originals kept
    assert any("1861-Lincoln" in i for i in ids)
    assert c["exact_duplicates"] >= 1 and c["near_duplicates"] >= 1
