"""Random access to the pretraining instances written by `build_pretraining_data`, over memory-mapped arrays.

The output is sharded, one output shard per corpus shard. One split of one sequence-length phase of shard k
lives in `<data>/shards/<k>/seq<L>/<split>/`:

- `input_ids.npy`  flat token ids of the shard's instances back to back, [CLS]/[SEP] included (uint16 when the
  vocabulary fits, else uint32)
- `offsets.npy`    int64 [n+1]: instance i of the shard is input_ids[offsets[i]:offsets[i+1]] (64-bit, so a
  shard may hold more than 2^31 tokens)
- `len_a.npy`      uint16 [n]: length of [CLS] A [SEP]; token type 0 there and 1 after
- `nsp_label.npy`  int8 [n]: 0 = B follows A, 1 = random B, -100 = packed sequence (no NSP)

`manifest.json` lists, per phase and split, the shards in order with their instance counts and checksums; a
global index i is in the shard whose cumulative count first exceeds i (`np.searchsorted`), so the reader holds
one int64 per shard, not per instance. The arrays are opened on first access (at most `MAX_OPEN_SHARDS` at a
time, as every memory map costs a kernel mapping) and reopened in a forked child, so a dataset object can be
handed to worker processes before or after it was used.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bertscale.errors import ConfigError, InputError

ARRAYS = ("input_ids", "offsets", "len_a", "nsp_label")
MANIFEST = "manifest.json"
SHARD_MARKER = "shard.json"  # written last into a shard's directory: its presence means the shard is complete
MAX_OPEN_SHARDS = 256


def shard_split_dir(shard_dir: str | Path, seq_len: int, split: str) -> Path:
    return Path(shard_dir) / f"seq{seq_len}" / split


def read_manifest(root: str | Path) -> dict:
    """The data stage's manifest.json, or an InputError saying how to create it."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise InputError(f"{path} not found: build the pretraining data first (`bertscale data`)")
    return json.loads(path.read_text())


class PretrainingDataset:
    """Instances of one phase (`seq_len`) and split, read lazily from the memory-mapped arrays."""

    def __init__(self, path: str | Path, seq_len: int, split: Literal["train", "heldout"] = "train") -> None:
        self.root = Path(path)
        self.seq_len = int(seq_len)
        self.split = split
        self.manifest = read_manifest(self.root)
        phases = self.manifest.get("phases", {})
        if str(self.seq_len) not in phases:
            raise InputError(
                f"{self.root} has no phase with seq_len={self.seq_len} (built: {sorted(int(k) for k in phases)}); "
                f"rebuild with data.seq_lengths including {self.seq_len}"
            )
        entry = phases[str(self.seq_len)][split]
        if "shards" not in entry:
            raise InputError(f"{self.root} was written by an older `bertscale data` (one array file per split): "
                             "rebuild it")
        self.dirs = [self.root / sh["dir"] for sh in entry["shards"]]
        missing = [str(d / f"{a}.npy") for d in self.dirs for a in ARRAYS if not (d / f"{a}.npy").is_file()]
        if missing:
            raise InputError(f"{missing[0]} is missing ({len(missing)} files in all): the data build did not "
                             "finish or was moved; rebuild it")
        # Cumulative instance counts: the only per-shard state, and int64 whatever the corpus size.
        self.ends = np.cumsum([int(sh["instances"]) for sh in entry["shards"]], dtype=np.int64)
        self._len = int(self.ends[-1]) if len(self.ends) else 0
        self._open_shards: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._pid: int | None = None

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        # Memory maps are per process: reopen after a fork instead of sharing the parent's file handles.
        if self._pid != os.getpid():
            self._open_shards, self._pid = OrderedDict(), os.getpid()
        if k in self._open_shards:
            self._open_shards.move_to_end(k)
        else:
            self._open_shards[k] = {a: np.load(self.dirs[k] / f"{a}.npy", mmap_mode="r") for a in ARRAYS}
            if len(self._open_shards) > MAX_OPEN_SHARDS:
                self._open_shards.popitem(last=False)
        return self._open_shards[k]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, index inside the shard) of global instance i."""
        k = int(np.searchsorted(self.ends, i, side="right"))
        return k, i - (int(self.ends[k - 1]) if k else 0)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open_shards"], state["_pid"] = OrderedDict(), None  # pickled to a worker: reopen there
        return state

    def __len__(self) -> int:
        return self._len

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every instance (for length statistics or length-grouped batching)."""
        parts = [np.diff(self._shard(k)["offsets"]) for k in range(len(self.dirs))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self.manifest["tokenizer"]["special_ids"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def check_compatible(self, vocab_size: int, max_position_embeddings: int, tokenizer: Any | None = None) -> None:
        """ConfigError at start-up, not an index error mid-training, when the model cannot take this data.

        With `tokenizer` (the `tokenizers.Tokenizer` training will use), also check that it is the one the data
        was built with: a retrained tokenizer of the same size gives other ids, which train silently on garbage.
        """
        if self.vocab_size != vocab_size:
            raise ConfigError(
                f"{self.root} was tokenized with a {self.vocab_size}-token vocabulary but the model has "
                f"vocab_size={vocab_size}: set model.vocab_size={self.vocab_size} (or leave it unset), or rebuild "
                "the data with the model's tokenizer"
            )
        if self.seq_len > max_position_embeddings:
            raise ConfigError(
                f"phase seq_len={self.seq_len} exceeds model.max_position_embeddings={max_position_embeddings}"
            )
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """ConfigError unless `tokenizer` has the fingerprint and special token ids recorded in the manifest."""
        from bertscale.tokenizer import special_ids, tokenizer_fingerprint

        built = self.manifest["tokenizer"]
        rebuild = (f"use the tokenizer the data was built with ({built.get('path')}), or rebuild the data with "
                   "this tokenizer (`bertscale data --tokenizer DIR`)")
        ids = special_ids(tokenizer)
        if ids != self.special_ids:
            raise ConfigError(f"{self.root} was built with special token ids {self.special_ids} but the tokenizer "
                              f"has {ids}: {rebuild}")
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint != built.get("fingerprint"):
            raise ConfigError(f"{self.root} was built with another tokenizer (fingerprint "
                              f"{str(built.get('fingerprint'))[:16]}, not {fingerprint[:16]}: same size, but other "
                              f"tokens or normalization): {rebuild}")

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -self._len <= i < self._len:
            raise IndexError(f"instance {i} out of range for {self._len} instances of seq{self.seq_len} {self.split}")
        k, j = self.locate(int(i) % self._len)
        arr = self._shard(k)
        lo, hi = int(arr["offsets"][j]), int(arr["offsets"][j + 1])
        ids = np.asarray(arr["input_ids"][lo:hi], dtype=np.int64)
        types = np.zeros(hi - lo, dtype=np.int64)
        types[int(arr["len_a"][j]) :] = 1
        return {"input_ids": ids, "token_type_ids": types, "next_sentence_label": int(arr["nsp_label"][j])}
