"""Resume planning without DeepSpeed: a fresh run sets an earlier run's checkpoints aside, and a checkpoint of
another ZeRO stage or precision is refused before DeepSpeed tries to load it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bertscale.config import load_config
from bertscale.errors import ConfigError
from bertscale.train.checkpoint import (
    MODEL_CONFIG,
    TRAINER_STATE,
    CheckpointManager,
    hash_share,
    tag_for,
    write_manifest,
)
from bertscale.train.distributed import DistEnv
from bertscale.train.resume import plan_resume


def checkpoint(root: Path, step: int, **state) -> None:
    """A verifiable fake checkpoint with the given trainer state; `latest` names it."""
    d = root / tag_for(step)
    d.mkdir(parents=True)
    (d / TRAINER_STATE).write_text(json.dumps({"step": step, "world_size": 1, **state}))
    (d / MODEL_CONFIG).write_text("{}")
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
    write_manifest(d, step, hash_share(d, DistEnv()), world_size=1)
    (root / "latest").write_text(tag_for(step))


def test_a_fresh_run_moves_an_earlier_runs_checkpoints_aside(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        checkpoint(root, step)
    (root / f"{tag_for(30)}.corrupt").mkdir()
    ckpt = CheckpointManager(root, keep=2, env=DistEnv())
    cfg = load_config(overrides=["train.resume=false"])
    with caplog.at_level("WARNING"):
        assert plan_resume(cfg, DistEnv(), ckpt) == (None, None)
    (archive,) = [p for p in root.iterdir() if p.name.startswith("previous-")]
    assert sorted(p.name for p in archive.iterdir()) == ["latest", tag_for(10), tag_for(20),
                                                         f"{tag_for(30)}.corrupt"]
    assert str(archive) in caplog.text and "train.resume=false" in caplog.text
    assert ckpt.tags() == [] and ckpt.latest() is None
    # The new run's checkpoints are the only ones pruning and the next resume see.
    checkpoint(root, 2)
    checkpoint(root, 4)
    checkpoint(root, 6)
    assert ckpt.prune() == [tag_for(2)]
    assert plan_resume(load_config(), DistEnv(), ckpt) == (tag_for(6), None)


def test_a_fresh_run_into_an_empty_directory_moves_nothing(tmp_path):
    ckpt = CheckpointManager(tmp_path / "checkpoints", keep=2, env=DistEnv())
    assert ckpt.archive_previous() is None
    (tmp_path / "checkpoints").mkdir()
    assert ckpt.archive_previous() is None and list((tmp_path / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("overrides, message", [
    (["train.zero_stage=3", "train.precision=bf16"], "written with train.zero_stage=2, this run has train.zero_stage=3"),
    (["train.precision=fp32"], "written with train.precision=bf16, this run has train.precision=fp32"),
    (["train.zero_stage=1", "train.precision=fp32"], "train.zero_stage=2, train.precision=bf16, this run"),
])
def test_resume_with_another_zero_stage_or_precision_is_a_config_error(tmp_path, overrides, message):
    checkpoint(tmp_path, 8, zero_stage=2, precision="bf16")
    ckpt = CheckpointManager(tmp_path, keep=2, env=DistEnv())
    with pytest.raises(ConfigError, match=message) as e:
        plan_resume(load_config(overrides=overrides), DistEnv(), ckpt)
    assert "Resume with" in str(e.value) and "train.resume=false" in str(e.value)
    assert plan_resume(load_config(overrides=["train.zero_stage=2", "train.precision=bf16"]), DistEnv(), ckpt) \
        == (tag_for(8), None)


def test_checkpoints_without_a_recorded_precision_are_checked_for_the_stage_only(tmp_path):
    checkpoint(tmp_path, 8, zero_stage=2)
    ckpt = CheckpointManager(tmp_path, keep=2, env=DistEnv())
    assert plan_resume(load_config(overrides=["train.precision=fp32"]), DistEnv(), ckpt) == (tag_for(8), None)
