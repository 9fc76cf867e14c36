"""Encoding a sentence(-pair) task for BERT: a tokenizer checked against the checkpoint, `[CLS] A [SEP] B [SEP]`
ids with token types, and dynamic padding (batches come from `bertscale.finetune.batching`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import Tokenizer

from bertscale.errors import ConfigError
from bertscale.finetune.batching import length_grouped_batches  # noqa: F401 - where callers found it before
from bertscale.finetune.tasks import LoadedSplit
from bertscale.model.hf import read_config
from bertscale.tokenizer import load_tokenizer, special_ids
from bertscale.tokenizer.wordpiece import STATS_FILE

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """A tokenized split: variable-length id lists plus labels (None for test splits)."""

    name: str
    idx: list[str]
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


def prepare_tokenizer(tok: Tokenizer, max_length: int) -> Tokenizer:
    """A copy that truncates pairs longest-first to max_length (specials included) and never pads."""
    out = Tokenizer.from_str(tok.to_str())
    out.enable_truncation(max_length, strategy="longest_first")
    out.no_padding()
    return out


def encode_split(split: LoadedSplit | "datasets.Dataset", tok: Tokenizer, name: str | None = None) -> Encoded:
    """`[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` for every row, with BERT's token types."""
    ds = split.dataset if isinstance(split, LoadedSplit) else split
    a, b = ds["text_a"], ds["text_b"]
    inputs = [x if y is None else (x, y) for x, y in zip(a, b)]
    encodings = tok.encode_batch(inputs, add_special_tokens=True)
    labels = np.asarray(ds["label"]) if "label" in ds.column_names else None
    return Encoded(name or getattr(split, "name", "split"), list(ds["idx"]), [e.ids for e in encodings],
                   [e.type_ids for e in encodings], labels)


def collate(data: Encoded, indices: Sequence[int], pad_id: int, regression: bool) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of this batch (dynamic padding)."""
    width = max(len(data.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(indices), width), dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        types[row, :n] = torch.tensor(data.token_type_ids[i])
        mask[row, :n] = 1
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    if data.labels is not None:
        labels = data.labels[list(indices)]
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    return batch


def recorded_tokenizer(model_path: str | Path) -> tuple[int, dict[str, int]] | None:
    """(size, special token ids) of the tokenizer a checkpoint was saved with: `bertscale_tokenizer.json`'s record,
    else the tokenizer files beside the weights; None when the checkpoint carries no tokenizer."""
    path = Path(model_path)
    try:
        meta = json.loads((path / STATS_FILE).read_text())
    except (OSError, ValueError):
        meta = {}
    if isinstance(meta.get("special_ids"), dict) and meta.get("vocab_size"):
        return int(meta["vocab_size"]), {k: int(v) for k, v in meta["special_ids"].items()}
    if not any((path / n).is_file() for n in ("tokenizer.json", "vocab.txt")):
        return None
    own = load_tokenizer(path)
    return own.get_vocab_size(with_added_tokens=True), special_ids(own)


def load_checked_tokenizer(tokenizer: str | Path | Tokenizer, model_path: str | Path) -> Tokenizer:
    """The tokenizer, after checking that it fits the checkpoint (ConfigError naming both otherwise): no more
    tokens than embedding rows (fewer is fine: tables are often padded, e.g. 30522 tokens in 30528 rows), and, if
    the checkpoint records the tokenizer it was saved with, that tokenizer's size and [PAD]/[UNK]/[CLS]/[SEP]/[MASK]
    ids."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    name = tokenizer if isinstance(tokenizer, (str, Path)) else "<object>"
    model_vocab = read_config(model_path).get("vocab_size")
    tok_vocab = tok.get_vocab_size(with_added_tokens=True)
    recorded = recorded_tokenizer(model_path)
    hint = "use the tokenizer the checkpoint was pretrained with"
    if model_vocab is not None and tok_vocab > model_vocab:
        raise ConfigError(f"tokenizer {name} has {tok_vocab} tokens but checkpoint {model_path} has vocab_size="
                          f"{model_vocab}: ids past the embedding table cannot be looked up; {hint}")
    if recorded is not None and recorded[0] != tok_vocab:
        raise ConfigError(f"tokenizer {name} has {tok_vocab} tokens but checkpoint {model_path} has vocab_size="
                          f"{model_vocab} and was saved with a tokenizer of {recorded[0]} tokens; {hint}")
    if recorded is None and model_vocab is not None and model_vocab - tok_vocab >= 128:
        log.warning("tokenizer %s has %d tokens for %d embedding rows, more than padding; is it the tokenizer "
                    "checkpoint %s was pretrained with?", name, tok_vocab, model_vocab, model_path)
    if recorded is not None:
        ours = special_ids(tok)
        differ = {k: (ours.get(k), v) for k, v in recorded[1].items() if ours.get(k) != v}
        if differ:
            shown = ", ".join(f"[{k.upper()}] {a} vs {b}" for k, (a, b) in differ.items())
            raise ConfigError(f"tokenizer {name} and the tokenizer recorded with checkpoint {model_path} give "
                              f"special tokens different ids ({shown}); {hint}")
    return tok
