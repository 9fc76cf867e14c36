"""A data-parallel loader whose position can be saved and restored exactly.

Every epoch is a permutation of the dataset drawn from (seed, epoch); rank r of W takes positions r, r+W, r+2W..
of it, so the ranks read disjoint, equal-sized parts (the ragged tail of fewer than W instances is dropped and
counted). The state is (epoch, position in this rank's part, the collator's RNG state); restoring it makes the
next batches identical to those of the uninterrupted run. There is no read-ahead, so the state after a batch
was yielded is exactly the state that produces the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from bertscale.errors import ConfigError


class Indexable(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Any: ...


class DistributedLoader:
    """Batches of `collator([dataset[i] for i in ...])` for one data-parallel rank.

    Iterating yields the rest of the current epoch and then moves to the next epoch, so `for batch in loader`
    is one epoch and a training loop that needs more steps simply iterates again (or uses `forever()`).
    """

    def __init__(
        self,
        dataset: Indexable,
        batch_size: int,
        collator: Callable[[Sequence[Any]], Any],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.collator = dataset, batch_size, collator
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.per_rank = len(dataset) // world_size
        # Instances no rank sees in an epoch (a different few each epoch when shuffled): reported, not hidden.
        self.dropped_per_epoch = len(dataset) - self.per_rank * world_size
        if self.per_rank == 0 or (drop_last and self.per_rank < batch_size):
            raise ConfigError(
                f"{len(dataset)} instances are too few for {world_size} ranks x batch size {batch_size}: "
                "build more data or lower the batch size"
            )
        self.epoch = 0
        self.position = 0  # instances of this rank's part already yielded in this epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.per_rank // self.batch_size if self.drop_last else -(-self.per_rank // self.batch_size)

    def rank_indices(self, epoch: int) -> np.ndarray:
        """The dataset indices this rank reads in `epoch`, in order."""
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[: self.per_rank * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Any]:
        usable = len(self) * self.batch_size if self.drop_last else self.per_rank
        if self.position >= usable:  # stopped right after an epoch's last batch: that epoch is done
            self.epoch, self.position = self.epoch + 1, 0
        indices = self.rank_indices(self.epoch)
        while self.position < usable:
            batch_idx = indices[self.position : self.position + self.batch_size]
            batch = self.collator([self.dataset[int(i)] for i in batch_idx])
            self.position += len(batch_idx)
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def forever(self) -> Iterator[Any]:
        """Batches across epochs without end."""
        while True:
            yield from self

    def state_dict(self) -> dict[str, Any]:
        collator_state = self.collator.state_dict() if hasattr(self.collator, "state_dict") else None
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "collator": collator_state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("seed", "world_size"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]} but this loader has {key}={getattr(self, key)}: "
                    "exact resume needs the same data order"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if state.get("collator") is not None and hasattr(self.collator, "load_state_dict"):
            self.collator.load_state_dict(state["collator"])
