"""The distributed loader: disjoint equal rank shares, determinism, exact resume with the collator's RNG."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bertscale.data.loader import DistributedLoader
from bertscale.data.masking import MLMCollator
from bertscale.errors import ConfigError

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def dataset(n: int) -> list[dict]:
    """Instance i starts with token 10 + i after [CLS], so batches say which instances they hold."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        body = rng.integers(10 + n, 300, int(rng.integers(3, 20)))
        ids = np.concatenate([[2, 10 + i], body, [3]])
        out.append({"input_ids": ids, "token_type_ids": np.zeros(len(ids), dtype=np.int64),
                    "next_sentence_label": -100})
    return out


def identity(examples: list) -> list:
    return list(examples)


def ids_of(batch: list[dict]) -> list[int]:
    return [int(e["input_ids"][1]) - 10 for e in batch]


def test_ranks_read_disjoint_equal_parts_and_the_tail_is_counted():
    data = dataset(103)
    loaders = [DistributedLoader(data, 8, identity, rank=r, world_size=4, seed=1) for r in range(4)]
    parts = [[i for b in loader for i in ids_of(b)] for loader in loaders]
    assert all(len(p) == 25 for p in parts)
    assert len(set().union(*map(set, parts))) == 100
    assert loaders[0].dropped_per_epoch == 3
    assert len(loaders[0]) == 4  # ceil(25 / 8)


def test_epochs_are_deterministic_and_differ():
    data = dataset(40)
    a = DistributedLoader(data, 5, identity, seed=3)
    b = DistributedLoader(data, 5, identity, seed=3)
    epoch0 = [ids_of(x) for x in a]
    assert epoch0 == [ids_of(x) for x in b]
    epoch1 = [ids_of(x) for x in a]
    assert sorted(sum(epoch0, [])) == sorted(sum(epoch1, [])) == list(range(40))
    assert epoch0 != epoch1
    assert a.epoch == 2


def test_drop_last_keeps_full_batches_only():
    loader = DistributedLoader(dataset(23), 5, identity, drop_last=True)
    assert [len(b) for b in loader] == [5, 5, 5, 5]


def run(loader: DistributedLoader, steps: int) -> list[dict]:
    return list(itertools.islice(loader.forever(), steps))


@pytest.mark.parametrize("stop_after", [3, 7, 10, 17])
def test_resume_gives_the_same_batches_as_the_uninterrupted_run(stop_after):
    data = dataset(70)

    def make() -> DistributedLoader:
        return DistributedLoader(data, 8, MLMCollator(SPECIAL, 300, seed=5), rank=1, world_size=2, seed=9)

    full = run(make(), 25)
    first = make()
    run(first, stop_after)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = run(resumed, 25 - stop_after)
    for expected, got in zip(full[stop_after:], rest):
        assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_loader_stopped_at_an_epoch_end_continues_with_the_next_epoch():
    loader = DistributedLoader(dataset(16), 4, identity, seed=2)
    it = iter(loader)
    first_epoch = [ids_of(next(it)) for _ in range(4)]  # consumed every batch without exhausting the iterator
    second_epoch = [ids_of(b) for b in loader]
    assert len(second_epoch) == 4 and loader.epoch == 2
    assert second_epoch != first_epoch


def test_state_from_another_world_size_is_refused():
    state = DistributedLoader(dataset(20), 2, identity, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        DistributedLoader(dataset(20), 2, identity, world_size=4).load_state_dict(state)


def test_too_little_data_is_a_config_error():
    with pytest.raises(ConfigError, match="too few"):
        DistributedLoader(dataset(3), 2, identity, world_size=4)
