"""Random access to the pretraining instances written by `build_pretraining_data`, over memory-mapped arrays.

One split of one sequence-length phase lives in `<data>/seq<L>/<split>/`:

- `input_ids.npy`  flat token ids of all instances back to back, [CLS]/[SEP] included (uint16 when the
  vocabulary fits, else uint32)
- `offsets.npy`    int64 [N+1]: instance i is input_ids[offsets[i]:offsets[i+1]]
- `len_a.npy`      uint16 [N]: length of [CLS] A [SEP]; token type 0 there and 1 after
- `nsp_label.npy`  int8 [N]: 0 = B follows A, 1 = random B, -100 = packed sequence (no NSP)

The arrays are opened on first access and reopened in a forked child, so a dataset object can be handed to
worker processes before or after it was used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bertscale.errors import ConfigError, InputError

ARRAYS = ("input_ids", "offsets", "len_a", "nsp_label")
MANIFEST = "manifest.json"


def split_dir(root: str | Path, seq_len: int, split: str) -> Path:
    return Path(root) / f"seq{seq_len}" / split


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
        self.dir = split_dir(self.root, self.seq_len, split)
        missing = [a for a in ARRAYS if not (self.dir / f"{a}.npy").is_file()]
        if missing:
            raise InputError(f"{self.dir} lacks {missing}: the data build did not finish; rebuild it")
        self._arrays: dict[str, np.ndarray] | None = None
        self._pid: int | None = None
        self._len = int(phases[str(self.seq_len)][split]["instances"])

    def _open(self) -> dict[str, np.ndarray]:
        # Memory maps are per process: reopen after a fork instead of sharing the parent's file handles.
        if self._arrays is None or self._pid != os.getpid():
            self._arrays = {a: np.load(self.dir / f"{a}.npy", mmap_mode="r") for a in ARRAYS}
            self._pid = os.getpid()
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"] = None, None  # pickled to a worker: reopen there
        return state

    def __len__(self) -> int:
        return self._len

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every instance (for length statistics or length-grouped batching)."""
        return np.diff(self._open()["offsets"])

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
            raise IndexError(f"instance {i} out of range for {self._len} instances in {self.dir}")
        i = int(i) % self._len
        arr = self._open()
        lo, hi = int(arr["offsets"][i]), int(arr["offsets"][i + 1])
        ids = np.asarray(arr["input_ids"][lo:hi], dtype=np.int64)
        types = np.zeros(hi - lo, dtype=np.int64)
        types[int(arr["len_a"][i]) :] = 1
        return {"input_ids": ids, "token_type_ids": types, "next_sentence_label": int(arr["nsp_label"][i])}
