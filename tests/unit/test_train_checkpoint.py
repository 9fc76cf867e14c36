"""Checkpoint bookkeeping without DeepSpeed: latest pointer, keep-last-K, path resolution, signals, RNG."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from bertscale.errors import InputError
from bertscale.train.checkpoint import (
    MANIFEST,
    MODEL_CONFIG,
    TRAINER_STATE,
    CheckpointManager,
    rng_state,
    set_rng_state,
    tag_for,
)
from bertscale.model.weights import locate_checkpoint
from bertscale.train.distributed import DistEnv
from bertscale.train.signals import StopSignal


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


def test_locate_checkpoint_from_output_root_or_tag_dir(tmp_path):
    ckpts = tmp_path / "train" / "checkpoints"
    fake_checkpoints(ckpts, [3, 6], latest=6)
    assert locate_checkpoint(tmp_path / "train") == (ckpts, tag_for(6))
    assert locate_checkpoint(ckpts) == (ckpts, tag_for(6))
    assert locate_checkpoint(ckpts / tag_for(3)) == (ckpts, tag_for(3))
    with pytest.raises(InputError, match="not a bertscale checkpoint"):
        locate_checkpoint(tmp_path)


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


# ----------------------------------------------------------------------------------------------------------------
# Integrity manifests and fallback (one process, no DeepSpeed)
# ----------------------------------------------------------------------------------------------------------------
def good_checkpoints(root: Path, steps: list[int]) -> CheckpointManager:
    """Checkpoints with a payload file and a manifest each, `latest` on the newest."""
    from bertscale.train.checkpoint import hash_share, write_manifest

    fake_checkpoints(root, steps, latest=steps[-1])
    for s in steps:
        d = root / tag_for(s)
        (d / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * (s + 1))
        write_manifest(d, s, hash_share(d, DistEnv()), world_size=1)
    return CheckpointManager(root, keep=5, env=DistEnv())


def test_select_takes_the_newest_checkpoint_that_verifies(tmp_path):
    mgr = good_checkpoints(tmp_path, [2, 4])
    assert mgr.select() == tag_for(4)
    assert json.loads((tmp_path / tag_for(4) / MANIFEST).read_text())["files"]["mp_rank_00_model_states.pt"]["size"] \
        == 256 * 5


def test_select_skips_truncated_and_corrupted_checkpoints_and_says_why(tmp_path, caplog):
    mgr = good_checkpoints(tmp_path, [2, 4, 6])
    with open(tmp_path / tag_for(6) / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(10)
    payload = tmp_path / tag_for(4) / "mp_rank_00_model_states.pt"
    data = bytearray(payload.read_bytes())
    data[3] ^= 1
    payload.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        assert mgr.select() == tag_for(2)
    text = caplog.text
    assert f"skipping checkpoint {tmp_path / tag_for(6)}: mp_rank_00_model_states.pt has 10 bytes" in text
    assert "fails its sha256 check" in text
    assert (tmp_path / f"{tag_for(6)}.corrupt").is_dir() and (tmp_path / f"{tag_for(4)}.corrupt").is_dir()
    assert (tmp_path / "latest").read_text() == tag_for(2)  # the pointer follows the fallback


def test_an_unfinished_save_is_skipped_but_an_old_checkpoint_without_manifest_loads(tmp_path, caplog):
    mgr = good_checkpoints(tmp_path, [2])
    fake_checkpoints(tmp_path, [4], latest=None)  # no manifest, newer than `latest`: killed mid-save
    assert mgr.select() == tag_for(2)
    assert (tmp_path / f"{tag_for(4)}.incomplete").is_dir()
    legacy = tmp_path / "legacy"
    fake_checkpoints(legacy, [3], latest=3)  # written before manifests existed: loaded with a warning
    with caplog.at_level("WARNING"):
        assert CheckpointManager(legacy, 1, DistEnv()).select() == tag_for(3)
    assert "loading it unverified" in caplog.text


def test_save_error_message_names_the_cause_and_the_intact_checkpoint(tmp_path):
    import errno

    from bertscale.train.checkpoint import save_error_message

    tag_dir = tmp_path / "checkpoints" / tag_for(8)
    msg = save_error_message([(1, errno.ENOSPC, str(tag_dir / "x.pt"), "No space left on device")], tag_dir,
                             tag_for(4))
    assert msg.startswith(f"checkpoint save failed: no space left on {tmp_path / 'checkpoints'} (rank(s) 1: ")
    assert msg.endswith(f"the previous checkpoint step 4 is intact ({tmp_path / 'checkpoints' / tag_for(4)})")
    ro = save_error_message([(0, errno.EROFS, str(tag_dir), "Read-only file system")], tag_dir, None)
    assert "is on a read-only file system" in ro and "no earlier checkpoint exists" in ro


def test_write_failures_without_errno_are_diagnosed_from_the_file_system(tmp_path):
    import errno

    from bertscale.train.checkpoint import record_os_errors

    failures: list[OSError] = []
    with record_os_errors(failures, tmp_path):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")
    assert failures[0].errno == errno.EIO  # this disk has room and is writable: a plain I/O error
    with pytest.raises(RuntimeError, match="unrelated"), record_os_errors(failures, tmp_path):
        raise RuntimeError("unrelated bug")
