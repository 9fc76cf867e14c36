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


def test_registry_and_name_move_only_the_finetune_fingerprint():
    base = _fps(load_config())
    for change in ("registry.margin=0.02", "registry.higher_is_better=false", "name=other",
                   "finetune.register_models=false"):
        changed = _fps(load_config(overrides=[change]))
        assert changed[:4] == base[:4] and changed[4] != base[4], change
    # Whether the encoder is registered is decided after training, outside every stage's cache.
    assert _fps(load_config(overrides=["registry.register_encoder=false"])) == base


def test_task_inputs_fingerprint_follows_the_task_files(tmp_path):
    task = tmp_path / "task.tsv"
    task.write_text("text\tlabel\na\tx\n")
    custom = ['finetune.tasks=[mine]',
              f'finetune.custom_tasks=[{{name: mine, train: {task}, dev: {task}, text_a: text}}]']
    first = lineage.task_inputs_fingerprint(load_config(overrides=custom))
    assert lineage.task_inputs_fingerprint(load_config(overrides=custom)) == first
    task.write_text("text\tlabel\na\tx\nb\ty\n")
    assert lineage.task_inputs_fingerprint(load_config(overrides=custom)) != first

    glue = tmp_path / "glue"
    for folder in ("RTE", "SST-2"):
        (glue / folder).mkdir(parents=True)
        (glue / folder / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    rte = ["finetune.tasks=[RTE]", f"finetune.glue_dir={glue}"]
    before = lineage.task_inputs_fingerprint(load_config(overrides=rte))
    (glue / "SST-2" / "dev.tsv").write_text("another task's file\n")
    assert lineage.task_inputs_fingerprint(load_config(overrides=rte)) == before
    (glue / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    assert lineage.task_inputs_fingerprint(load_config(overrides=rte)) != before
    # MNLI's model also predicts AX: its folder (diagnostic/ in GLUE's layout) is an input too.
    mnli = ["finetune.tasks=[MNLI]", f"finetune.glue_dir={glue}"]
    without_ax = lineage.task_inputs_fingerprint(load_config(overrides=mnli))
    (glue / "diagnostic").mkdir()
    (glue / "diagnostic" / "diagnostic.tsv").write_text("index\tsentence1\tsentence2\n")
    assert lineage.task_inputs_fingerprint(load_config(overrides=mnli)) != without_ax
