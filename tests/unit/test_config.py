"""Config loading: precedence, validation messages, known-bad combinations."""

from __future__ import annotations

from pathlib import Path

import pytest

from bertscale.config import PipelineConfig, flatten, load_config, parse_override
from bertscale.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, PipelineConfig)
    assert cfg.corpus.dedup.threshold == 0.8
    assert cfg.stage_dir("corpus") == Path("runs/default/corpus")


def test_precedence_file_then_extra_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("workdir: from-file\ncorpus:\n  dedup:\n    threshold: 0.7\n    num_perm: 64\n")
    cfg = load_config(f, ["corpus.dedup.threshold=0.95"], {"workdir": "from-flag"})
    assert cfg.workdir == "from-flag"
    assert cfg.corpus.dedup.threshold == 0.95
    assert cfg.corpus.dedup.num_perm == 64


def test_base_chaining(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 7\ntrain:\n  lr: 0.001\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  max_steps: 5\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.seed, cfg.train.lr, cfg.train.max_steps) == (7, 0.001, 5)


def test_override_values_are_typed():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=true") == (["a"], True)
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("novalue")


@pytest.mark.parametrize(
    "override, message",
    [
        ("corpus.normalization=NFX", "corpus.normalization: Input should be 'NFC'"),
        ("corpus.dedup.threshold=1.5", "corpus.dedup.threshold"),
        ("corpus.nope=1", "corpus.nope: Extra inputs are not permitted"),
        ("train.zero_stage=5", "train.zero_stage"),
    ],
)
def test_invalid_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(overrides=[override])


def test_known_bad_combinations():
    with pytest.raises(ConfigError, match="lamb needs train.zero_stage=0"):
        load_config(overrides=["train.optimizer=lamb", "train.zero_stage=2"])
    load_config(overrides=["train.optimizer=lamb", "train.zero_stage=0"])
    with pytest.raises(ConfigError, match="phase_steps"):
        load_config(overrides=["data.seq_lengths=[128, 512]", "train.phase_steps=[10]"])
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        load_config(overrides=["data.seq_lengths=[1024]"])


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name):
    load_config(REPO / "configs" / name)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
