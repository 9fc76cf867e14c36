"""Token classification (NER) for BERT: words to sub-word windows and back, the training batches, entity-level
evaluation and predictions written in the input's layout.

Labels sit on the first sub-word of each word; the other sub-words, [CLS] and [SEP] carry -100 and are ignored by
the loss. A sentence longer than the window (max_length - 2 sub-words) is cut at word boundaries into windows that
overlap by up to `doc_stride` sub-words (half the window by default; the tokenizer's `stride`, as for question
answering), so no word is dropped; each word is predicted from the window where it has the most context on its
shorter side (BERT's SQuAD rule). A word the tokenizer turns into nothing (a control character) is read as [UNK],
so every word gets a prediction; a single word longer than the window keeps its first max_length - 2 sub-words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from bertscale.errors import ConfigError
from bertscale.finetune.batching import autocast, eval_batches
from bertscale.finetune.conll import write_conll, write_token_jsonl
from bertscale.finetune.tagging import sentence_entities
from bertscale.finetune.tasks import LoadedSplit, TaggingOptions, TaskSpec, subset

IGNORE = -100


@dataclass
class Windows:
    """A token classification split as model inputs: sentences (words, gold tags) and the windows cut from them.
    Training batches are drawn over windows; evaluation maps each word back through `owners`."""

    name: str
    idx: list[str]  # sentence ids
    words: list[list[str]]
    gold: list[list[str]] | None  # tag strings per sentence; None for unlabelled splits
    input_ids: list[list[int]]  # per window: [CLS] sub-words [SEP]
    labels: list[list[int]]  # per window: tag id on each word's first sub-word, -100 elsewhere
    sentence_of: list[int]  # per window: its sentence
    owners: list[list[tuple[int, int]]]  # per sentence, per word: (window, position) its prediction is read from
    source: str = ""  # the file the sentences came from (predictions are written in its layout)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


def word_pieces(tok: Tokenizer, sentences: Sequence[Sequence[str]], unk_id: int) -> list[list[list[int]]]:
    """Sub-word ids per word per sentence (pre-tokenized input: the tokenizer's normalizer and pre-tokenizer run
    inside each word, never across words); a word with no sub-word becomes [UNK]."""
    if tok.truncation is not None or tok.padding is not None:  # windows do the cutting; sub-words must all be seen
        tok = Tokenizer.from_str(tok.to_str())
        tok.no_truncation()
        tok.no_padding()
    out = []
    for enc, words in zip(tok.encode_batch([list(s) for s in sentences], is_pretokenized=True,
                                           add_special_tokens=False), sentences):
        pieces: list[list[int]] = [[] for _ in words]
        for token_id, word in zip(enc.ids, enc.word_ids):
            if word is not None:
                pieces[word].append(token_id)
        out.append([p or [unk_id] for p in pieces])
    return out


def cut_windows(counts: Sequence[int], capacity: int, overlap: int) -> list[tuple[int, int]]:
    """Word ranges [start, end) whose sub-word counts fit `capacity` (each count already at most capacity): the
    first from word 0, each next one starting where it repeats at most `overlap` sub-words of the previous one
    (whole words; never at or before the previous start, so every word is in some window and windows advance)."""
    if any(not 0 < c <= capacity for c in counts):
        raise ValueError(f"every word needs 1 to {capacity} sub-words to fit a window, got {list(counts)}")
    windows: list[tuple[int, int]] = []
    start = 0
    while True:
        end, used = start, 0
        while end < len(counts) and used + counts[end] <= capacity:
            used += counts[end]
            end += 1
        windows.append((start, end))
        if end >= len(counts):
            return windows
        nxt, repeated = end, 0
        while nxt - 1 > start and repeated + counts[nxt - 1] <= overlap:
            repeated += counts[nxt - 1]
            nxt -= 1
        start = nxt


def _owners(counts: Sequence[int], windows: Sequence[tuple[int, int]], first_window: int) -> list[tuple[int, int]]:
    """For each word: (window, position of its first sub-word) of the window where min(sub-words before it,
    sub-words after it) is largest; ties go to the earlier window."""
    best: list[tuple[float, int, int]] = [(-1.0, -1, -1)] * len(counts)
    for w, (start, end) in enumerate(windows):
        total = sum(counts[start:end])
        before = 0
        for word in range(start, end):
            context = min(before, total - before - counts[word])
            if context > best[word][0]:
                best[word] = (context, first_window + w, 1 + before)
            before += counts[word]
    return [(w, pos) for _, w, pos in best]


def encode_sentences(name: str, idx: Sequence[str], words: Sequence[Sequence[str]],
                     tags: Sequence[Sequence[str]] | None, tok: Tokenizer, specials: Mapping[str, int],
                     max_length: int, stride: int | None, label_ids: Mapping[str, int]) -> Windows:
    """Windows over every sentence (`specials`: the ids of cls, sep and unk); tags the label set lacks get -100
    (they still count as gold in the scores)."""
    if max_length < 3:
        raise ConfigError(f"max_length={max_length} leaves no room for a word between [CLS] and [SEP]")
    ids = specials
    capacity = max_length - 2
    stride = capacity // 2 if stride is None else stride
    pieces = word_pieces(tok, words, ids["unk"])
    out = Windows(name, list(idx), [list(w) for w in words], [list(t) for t in tags] if tags is not None else None,
                  [], [], [], [])
    for s, sentence in enumerate(pieces):
        sentence = [p[:capacity] for p in sentence]
        counts = [len(p) for p in sentence]
        windows = cut_windows(counts, capacity, stride)
        out.owners.append(_owners(counts, windows, len(out.input_ids)))
        for start, end in windows:
            input_ids, labels = [ids["cls"]], [IGNORE]
            for word in range(start, end):
                input_ids += sentence[word]
                tag = tags[s][word] if tags is not None else None
                labels += [label_ids.get(tag, IGNORE) if tag is not None else IGNORE] + [IGNORE] * (counts[word] - 1)
            out.input_ids.append(input_ids + [ids["sep"]])
            out.labels.append(labels + [IGNORE])
            out.sentence_of.append(s)
    return out


def encode(task: TaskSpec, split: LoadedSplit, tok: Tokenizer, specials: Mapping[str, int], max_length: int,
           limit: int | None = None) -> Windows:
    """A loaded token classification split (a `datasets.Dataset` of idx/tokens/tags) as windows."""
    ds = subset(split.dataset, limit)
    tags = ds["tags"] if "tags" in ds.column_names else None
    opt = task.tagging or TaggingOptions()
    data = encode_sentences(split.name, ds["idx"], ds["tokens"], tags, tok, specials, max_length, opt.doc_stride,
                            {t: i for i, t in enumerate(task.labels)})
    data.source = split.source
    return data


def collate(data: Windows, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Windows padded to the longest in the batch; labels padded with -100."""
    width = max(len(data.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        labels[row, :n] = torch.tensor(data.labels[i])
        mask[row, :n] = 1
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask, "labels": labels}


@torch.no_grad()
def window_logits(model: nn.Module, data: Windows, pad_id: int, precision: str = "bf16",
                  batch_size: int = 64) -> list[np.ndarray]:
    """[length, num_labels] fp32 logits per window, in window order."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = [np.empty(0)] * len(data)
    for indices in eval_batches(data.lengths, batch_size):
        batch = collate(data, indices, pad_id)
        batch.pop("labels")
        with autocast(device, precision):
            _, logits = model(**{k: v.to(device) for k, v in batch.items()})
        logits = logits.float().cpu().numpy()
        for row, i in enumerate(indices):
            out[i] = logits[row, : len(data.input_ids[i])]
    model.train(was_training)
    return out


def tags_from_logits(data: Windows, logits: Sequence[np.ndarray], labels: Sequence[str]) -> list[list[str]]:
    """The predicted tag of every word: the best label at its first sub-word in the window that owns it."""
    best = [x.argmax(-1) for x in logits]
    return [[labels[int(best[w][pos])] for w, pos in owners] for owners in data.owners]


def predict_tags(model: nn.Module, task: TaskSpec, data: Windows, pad_id: int,
                 precision: str = "bf16") -> list[list[str]]:
    return tags_from_logits(data, window_logits(model, data, pad_id, precision), task.labels)


def entities(words: Sequence[str], tags: Sequence[str]) -> list[dict[str, Any]]:
    """The entities of one predicted sentence as records: type, first and last word (inclusive), text."""
    return [{"entity": kind, "start_word": start, "end_word": end, "text": " ".join(words[start : end + 1])}
            for kind, start, end in sentence_entities(list(tags))]


def write_tagged(task: TaskSpec, source: str | Path, predictions: dict[str, list[str]], out_dir: Path,
                 name: str) -> Path:
    """Predictions in the input's layout: CoNLL lines with a predicted-tag column, or JSONL with
    `predicted_tags`."""
    if task.fmt == "jsonl":
        id_key = (task.tagging or TaggingOptions()).id_key
        return write_token_jsonl(source, out_dir / f"{name}.jsonl", predictions, id_key)
    return write_conll(source, out_dir / f"{name}.conll", predictions)
