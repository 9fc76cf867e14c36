"""Extractive question answering for BERT: SQuAD windows as training batches, start/end logits decoded into
answers, the official metrics and the official prediction files (`bertscale.finetune.squad` does the SQuAD
parts as pure functions; this module runs the model over them).

SQuAD 2.0's no-answer decision compares each question's null odds (no-answer score minus best span score) with a
threshold. On dev the threshold is tuned as the official script's `best_f1_thresh` over the best-span predictions;
the dev predictions, the reported exact/F1 and the test predictions all use it, and the saved model's task
record carries it for serving.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from bertscale.finetune.batching import autocast, eval_batches
from bertscale.finetune.squad import (
    Features,
    SquadExample,
    SquadSet,
    apply_null_threshold,
    decode,
    make_features,
    squad_evaluate,
    write_predictions,
)
from bertscale.finetune.tasks import LoadedSplit, QaOptions, TaskSpec

# Padding positions get this logit, so that they never crowd real tokens out of the n-best lists.
PAD_LOGIT = -1e4
# What the table shows and the seeds' medians cover (fractions); the official output stays in `details`.
HEADLINE = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact", "best_f1")


@dataclass
class QaSplit:
    """A SQuAD split as model inputs: its questions and the windows (features) cut from their contexts."""

    name: str
    examples: SquadSet
    features: Features
    source: str = ""

    def __len__(self) -> int:
        return len(self.features)

    @property
    def lengths(self) -> list[int]:
        return self.features.attention_mask.sum(1).tolist()

    @property
    def version(self) -> str:
        return self.examples.version


def doc_stride(opt: QaOptions, max_length: int) -> int:
    """The configured stride, else 128 capped at half the context room of a window (so that short max_lengths,
    e.g. the 128 of sentence tasks, still give overlapping windows)."""
    if opt.doc_stride is not None:
        return opt.doc_stride
    return max(0, min(128, (max_length - opt.max_query_length - 3) // 2))


def encode(task: TaskSpec, split: LoadedSplit, tok: Tokenizer, max_length: int, limit: int | None = None,
           train: bool = False) -> QaSplit:
    """Windows over every question (at most `limit` questions, a fixed random subset); with `train`, answer token
    positions, and the questions training leaves out counted in the split's `skipped`."""
    squad: SquadSet = split.dataset
    opt = task.qa or QaOptions()
    examples = list(squad.examples)
    if limit is not None and limit < len(examples):
        examples = [examples[i] for i in sorted(random.Random(0).sample(range(len(examples)), limit))]
    version = squad.version if opt.version == "auto" else opt.version
    kept = SquadSet(squad.path, version, examples, dict(squad.skipped), dict(squad.skipped_ids))
    features = make_features(examples, tok, max_length, doc_stride(opt, max_length), opt.max_query_length, train)
    if train:
        split.skipped += sum(features.skipped.values())
    return QaSplit(split.name, kept, features, split.source)


def collate(data: QaSplit, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """The windows `indices`, cut to the longest of them; answer positions when the split has them."""
    f = data.features
    rows = np.asarray(indices)
    width = int(f.attention_mask[rows].sum(1).max())
    batch = {"input_ids": torch.from_numpy(f.input_ids[rows, :width]),
             "token_type_ids": torch.from_numpy(f.token_type_ids[rows, :width]),
             "attention_mask": torch.from_numpy(f.attention_mask[rows, :width])}
    if f.start_positions is not None and f.end_positions is not None:
        batch["start_positions"] = torch.from_numpy(f.start_positions[rows])
        batch["end_positions"] = torch.from_numpy(f.end_positions[rows])
    return batch


@torch.no_grad()
def span_logits(model: nn.Module, data: QaSplit, pad_id: int, precision: str = "bf16",
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Start and end logits [windows, max_length] in fp32; padding positions at PAD_LOGIT."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    shape = data.features.input_ids.shape
    starts, ends = np.full(shape, PAD_LOGIT, np.float32), np.full(shape, PAD_LOGIT, np.float32)
    for indices in eval_batches(data.lengths, batch_size):
        batch = collate(data, indices, pad_id)
        batch.pop("start_positions", None)
        batch.pop("end_positions", None)
        with autocast(device, precision):
            _, s, e = model(**{k: v.to(device) for k, v in batch.items()})
        mask = batch["attention_mask"].bool().numpy()
        width = mask.shape[1]
        starts[indices, :width] = np.where(mask, s.float().cpu().numpy(), PAD_LOGIT)
        ends[indices, :width] = np.where(mask, e.float().cpu().numpy(), PAD_LOGIT)
    model.train(was_training)
    return starts, ends


def answers(task: TaskSpec, data: QaSplit, starts: np.ndarray, ends: np.ndarray,
            threshold: float | None) -> tuple[dict[str, str], dict[str, float]]:
    """Answer texts and null odds per question id; for SQuAD 2.0, "" where the null odds exceed `threshold`
    (None: the best span everywhere)."""
    opt = task.qa or QaOptions()
    return decode(data.examples, data.features, starts, ends, opt.n_best_size, opt.max_answer_length,
                  threshold=threshold, version=data.version)


def evaluate(model: nn.Module, task: TaskSpec, data: QaSplit, pad_id: int,
             precision: str) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
    """(metrics, details, predictions) by the official scoring: v1.1 exact and F1; v2.0 with the null threshold
    tuned on this split (the official best_f1_thresh), then exact/F1 and the HasAns/NoAns splits at that
    threshold. `score` is F1; the official output (percent) is in the details."""
    starts, ends = span_logits(model, data, pad_id, precision)
    best, null_odds = answers(task, data, starts, ends, threshold=None)
    if data.version == "1.1":
        official = squad_evaluate(data.examples, best, version="1.1")
        predictions, odds, threshold = best, None, None
    else:
        threshold = squad_evaluate(data.examples, best, null_odds, version="2.0")["best_f1_thresh"]
        predictions, odds = apply_null_threshold(best, null_odds, threshold), null_odds
        official = squad_evaluate(data.examples, predictions, null_odds, version="2.0")
    metrics = {k: official[k] / 100 for k in HEADLINE if k in official}
    metrics["score"] = metrics["f1"]
    details: dict[str, Any] = {"official": official, "version": data.version, "questions": len(data.examples),
                               "windows": len(data.features)}
    if threshold is not None:
        details["null_threshold"] = threshold
    return metrics, details, {"predictions": predictions, "null_odds": odds}


def write_files(out_dir: Path, name: str, predictions: Mapping[str, str],
                null_odds: Mapping[str, float] | None) -> dict[str, str]:
    """`<out_dir>/<name>/predictions.json` (and `null_odds.json` for SQuAD 2.0), as the official scripts read
    them; returned as {name: predictions, name-null_odds: null odds}."""
    paths = write_predictions(out_dir / name, predictions, null_odds)
    files = {name: str(paths[0])}
    if len(paths) > 1:
        files[f"{name}-null_odds"] = str(paths[1])
    return files


def dev_threshold(dev_details: Sequence[Mapping[str, Any]]) -> float:
    """The null threshold tuned on the dev split(s) (their mean when there are several; 0 when none was)."""
    tuned = [d["null_threshold"] for d in dev_details if "null_threshold" in d]
    return float(np.mean(tuned)) if tuned else 0.0


def example(question: str, context: str, qid: str) -> SquadExample:
    """An unlabelled question on a context, for prediction."""
    return SquadExample(qid, "", question, context, ())
