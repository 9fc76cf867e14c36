"""Encoding a task for BERT: a tokenizer checked against the checkpoint, `[CLS] A [SEP] B [SEP]` ids with token
types, length-grouped batches and dynamic padding.

Examples are batched with others of similar length (sorted within shuffled mega-batches), so dynamic padding
pads little; evaluation runs sorted by length and puts predictions back in row order.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import Tokenizer

from bertscale.errors import ConfigError
from bertscale.finetune.tasks import LoadedSplit, TaskSpec, load_eval, load_train, subset
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


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int,
                           mega: int | None = None) -> list[list[int]]:
    """Shuffled batches of similar-length examples: shuffle, sort within mega-batches of `mega` batches, split,
    then shuffle the batch order so that length does not follow a schedule. Every index appears exactly once.

    `mega` defaults to 50 batches, but to at most a quarter of the data (transformers' LengthGroupedSampler rule):
    sorting a small training set whole would make every batch one length band and cost accuracy.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if mega is None:
        mega = max(1, min(50, len(order) // (4 * batch_size)))
    span = batch_size * mega
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation order: sorted by length (least padding); predictions are put back in row order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


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


def load_task_data(task: TaskSpec, tok: Tokenizer, data_dir: str | Path | None, max_train: int | None,
                   max_eval: int | None) -> tuple[Encoded, list[Encoded], int]:
    """The encoded training split, the encoded dev splits, and how many rows were skipped as unreadable."""
    train_split = load_train(task, data_dir)
    evals = load_eval(task, data_dir)
    if not evals:
        raise ConfigError(f"task {task.name} has no dev split: add one (custom_tasks[].dev) for evaluation")
    train_enc = encode_split(subset(train_split.dataset, max_train), tok, "train")
    eval_enc = [encode_split(subset(s.dataset, max_eval), tok, s.name) for s in evals]
    return train_enc, eval_enc, train_split.skipped + sum(s.skipped for s in evals)
