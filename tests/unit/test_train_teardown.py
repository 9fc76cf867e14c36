"""Teardown: a run leaves the process as it found it (no process group, no launcher variables, no threads).

A gloo group left alive for interpreter exit can abort a finished rank ("terminate called without an active
exception", SIGABRT); these tests pin the contract of `distributed.process_group` on one in-process rank.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import torch.distributed as dist

from bertscale.errors import ConfigError
from bertscale.train import distributed
from bertscale.train.distributed import LAUNCH_VARS, DistEnv, PeerLostError, Watchdog


@pytest.fixture()
def bare_env(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    yield
    if dist.is_initialized():  # a failed test must not leave its group to the next one
        dist.destroy_process_group()


def one_rank() -> DistEnv:
    return DistEnv(master_port=distributed.free_port())


def test_a_group_it_creates_is_destroyed_and_the_variables_restored(bare_env, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # set before: kept as it was
    with distributed.process_group(one_rank()) as created:
        assert created and dist.is_initialized() and os.environ["RANK"] == "0"
        distributed.all_reduce(torch.ones(2))
    assert not dist.is_initialized()
    assert [k for k in LAUNCH_VARS if k in os.environ] == ["MASTER_ADDR"]


@pytest.mark.parametrize("error", [ValueError("a bug"), ConfigError("a user error")])
def test_an_error_in_one_process_still_tears_the_group_down(bare_env, error):
    with pytest.raises(type(error)), distributed.process_group(one_rank()):
        raise error
    assert not dist.is_initialized() and "RANK" not in os.environ


def test_a_lost_peer_leaves_the_group_to_the_exit_path_on_several_ranks(bare_env, monkeypatch):
    # Destroying a group whose peer is gone can block: the rank exits with os._exit instead.
    env = one_rank()
    monkeypatch.setattr(distributed, "init", lambda e, t: True)
    destroyed = []
    monkeypatch.setattr(distributed, "shutdown", lambda: destroyed.append(True))
    two = DistEnv(rank=0, world_size=2, master_port=env.master_port)
    with pytest.raises(PeerLostError), distributed.process_group(two):
        raise PeerLostError("rank 1 was lost")
    with pytest.raises(ConfigError), distributed.process_group(two):
        raise ConfigError("every rank says so")
    assert destroyed == [True]


def test_groups_can_be_created_again_in_one_process(bare_env):
    port = distributed.free_port()
    for _ in range(3):  # the same rendezvous port: every group meets under keys of its own
        with distributed.process_group(DistEnv(master_port=port)):
            assert distributed.all_reduce(torch.ones(1)).item() == 1.0
    assert not dist.is_initialized()


def test_an_existing_group_is_left_alone(bare_env):
    with distributed.process_group(one_rank()):
        with distributed.process_group(one_rank()) as created:
            assert not created
        assert dist.is_initialized()
    assert not dist.is_initialized()


def test_watchdog_stop_ends_its_thread():
    dog = Watchdog(timeout_s=0.5, resume_hint=lambda: "").start()
    time.sleep(0.05)
    dog.stop()
    assert not any(t.name == "bertscale-watchdog" for t in threading.enumerate())
