"""Content addressing: fingerprints change exactly when a stage's inputs, config or code change."""

from __future__ import annotations

import json

from bertscale import lineage
from bertscale.config import load_config


def _fps(cfg):
    c = lineage.stage_fingerprint(cfg, "corpus", ["inputs"])
    t = lineage.stage_fingerprint(cfg, "tokenizer", [c])
    d = lineage.stage_fingerprint(cfg, "data", [c, t])
    tr = lineage.stage_fingerprint(cfg, "train", [d, t])
    return [c, t, d, tr, lineage.stage_fingerprint(cfg, "finetune", [tr])]


def test_fingerprints_are_stable():
    assert _fps(load_config()) == _fps(load_config())


def test_a_config_change_moves_that_stage_and_all_later_ones():
    base = _fps(load_config())
    changed = _fps(load_config(overrides=["data.short_seq_prob=0.2"]))
    assert changed[:2] == base[:2]
    assert all(a != b for a, b in zip(changed[2:], base[2:]))


def test_where_and_how_fast_do_not_change_fingerprints():
    base = _fps(load_config())
    moved = _fps(load_config(overrides=["corpus.output=/elsewhere", "corpus.runner.num_workers=7",
                                        "data.num_proc=3"]))
    assert moved == base


def test_input_fingerprint_follows_file_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    first = lineage.input_fingerprint([str(tmp_path)])
    assert lineage.input_fingerprint([str(tmp_path)]) == first
    f.write_text("one two")
    assert lineage.input_fingerprint([str(tmp_path)]) != first


def test_stage_output_marker_lifecycle(tmp_path):
    out = lineage.StageOutput.for_stage(tmp_path, "corpus", "ab" * 32)
    out.prepare()
    (out.path / "partial.parquet").write_text("x")
    assert out.completed() is None
    # A partial output from a failed attempt is moved aside, never reused.
    out.prepare()
    assert not (out.path / "partial.parquet").exists()
    assert list(tmp_path.glob("corpus/*.incomplete-*/partial.parquet"))
    out.complete({"rows": 3})
    assert out.completed() == {"rows": 3}
    # A marker written for another fingerprint does not count.
    other = lineage.StageOutput("corpus", "cd" * 32, out.path)
    assert other.completed() is None
    assert json.loads(out.marker.read_text())["fingerprint"] == "ab" * 32
