"""Content addressing: fingerprints change exactly when a stage's inputs, config or code change."""

from __future__ import annotations

import json

import pytest

from bertscale import lineage, tracking
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


def test_an_init_from_alias_is_pinned_to_a_version_and_the_train_fingerprint_follows_it(tmp_path, monkeypatch):
    # The registry's answer (tracking.alias_version against a real registry: tests/integration/
    # test_prefect_schedule.py): which version each alias names right now.
    aliases = {"champion": "1"}
    monkeypatch.setattr(tracking, "configure", lambda cfg: cfg.tracking_uri())
    monkeypatch.setattr(tracking, "alias_version", lambda uri: f"models:/enc/{aliases[uri.split('@')[1]]}")

    def cfg(ref: str):
        return load_config(overrides=[f"workdir={tmp_path}", f"train.init_from={ref}"])

    champion = cfg("models:/enc@champion")
    # The alias string itself is never a cache key: it would keep reusing what it named back then.
    with pytest.raises(ValueError, match="alias"):
        _fps(champion)
    pinned = lineage.pin_init_from(champion)
    assert pinned.train.init_from == "models:/enc/1" and champion.train.init_from == "models:/enc@champion"
    # The alias has not moved: the same key, so the train stage is reused.
    assert _fps(lineage.pin_init_from(champion)) == _fps(pinned)
    aliases["champion"] = "2"
    moved = _fps(lineage.pin_init_from(champion))
    assert moved[:3] == _fps(pinned)[:3] and all(a != b for a, b in zip(moved[3:], _fps(pinned)[3:]))
    assert moved == _fps(cfg("models:/enc/2"))
    # A version or a path is left as it is.
    for ref in ("models:/enc/1", str(tmp_path)):
        assert lineage.pin_init_from(cfg(ref)).train.init_from == ref


def test_a_local_init_from_is_fingerprinted_by_its_files(tmp_path):
    weights = tmp_path / "hf"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"one")
    warm = load_config(overrides=[f"train.init_from={weights}"])
    first = _fps(warm)
    assert _fps(warm) == first and first[3] != _fps(load_config())[3]
    (weights / "model.safetensors").write_bytes(b"other weights")
    assert _fps(warm)[:3] == first[:3] and _fps(warm)[3] != first[3]
