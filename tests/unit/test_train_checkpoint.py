"""Checkpoint bookkeeping without DeepSpeed: latest pointer, keep-last-K, path resolution, signals, RNG."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from bertscale.errors import InputError
from bertscale.train.checkpoint import (
    MODEL_CONFIG,
    TRAINER_STATE,
    CheckpointManager,
    StopSignal,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
    tag_for,
)
from bertscale.train.distributed import DistEnv


def fake_checkpoints(root: Path, steps: list[int], latest: int | None) -> None:
    for s in steps:
        d = root / tag_for(s)
        d.mkdir(parents=True)
        (d / TRAINER_STATE).write_text("{}")
        (d / MODEL_CONFIG).write_text("{}")
    if latest is not None:
        (root / "latest").write_text(tag_for(latest))


def test_prune_keeps_the_newest_k_and_never_the_latest(tmp_path):
    fake_checkpoints(tmp_path, [5, 10, 15, 20], latest=20)
    mgr = CheckpointManager(tmp_path, keep=2, env=DistEnv())
    assert mgr.latest() == tag_for(20)
    assert mgr.prune() == [tag_for(5), tag_for(10)]
    assert mgr.tags() == [tag_for(15), tag_for(20)]


def test_latest_ignores_a_pointer_to_an_incomplete_checkpoint(tmp_path):
    fake_checkpoints(tmp_path, [5], latest=None)
    (tmp_path / "latest").write_text(tag_for(10))
    assert CheckpointManager(tmp_path, 1, DistEnv()).latest() is None


def test_resolve_checkpoint_from_output_root_or_tag_dir(tmp_path):
    ckpts = tmp_path / "train" / "checkpoints"
    fake_checkpoints(ckpts, [3, 6], latest=6)
    assert resolve_checkpoint(tmp_path / "train") == (ckpts, tag_for(6))
    assert resolve_checkpoint(ckpts) == (ckpts, tag_for(6))
    assert resolve_checkpoint(ckpts / tag_for(3)) == (ckpts, tag_for(3))
    with pytest.raises(InputError, match="not a bertscale checkpoint"):
        resolve_checkpoint(tmp_path)


def test_stop_signal_sets_a_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_rng_state_roundtrip_replays_every_generator():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_a_relayed_second_signal_is_ignored():
    before = signal.getsignal(signal.SIGINT)
    with StopSignal(force_after_s=60) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's relay of the same stop
        os.kill(os.getpid(), signal.SIGINT)  # within force_after_s: still just a stop request
        assert stop.received == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before
