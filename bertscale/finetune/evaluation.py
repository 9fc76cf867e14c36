"""Evaluation and prediction of a fine-tuned sentence(-pair) model: predictions per split, the evaluation record
every task kind returns, and the test-set predictions in GLUE's submission format."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from bertscale.finetune.batching import autocast, eval_batches
from bertscale.finetune.encoding import Encoded, collate, encode_split
from bertscale.finetune.tasks import GLUE_TASKS, TaskSpec, load_test

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """One dev split's evaluation: metrics (fractions; `score` is what best-epoch selection and the registry
    compare), a confusion matrix for classifiers, the kind's other numbers (the official SQuAD output, entity
    supports), and its predictions by example id where the kind writes dev predictions."""

    metrics: dict[str, float]
    confusion: list[list[int]] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    predictions: dict[str, Any] | None = None


@torch.no_grad()
def predict(model: nn.Module, data: Encoded, pad_id: int, batch_size: int = 64, precision: str = "bf16",
            device: torch.device | None = None) -> np.ndarray:
    """Raw outputs in row order: class ids, or floats for a regression head."""
    device = device or next(model.parameters()).device
    regression = getattr(model, "num_labels", 2) == 1
    was_training = model.training
    model.eval()
    out = np.zeros(len(data), dtype=np.float32 if regression else np.int64)
    for indices in eval_batches(data.lengths, batch_size):
        batch = collate(data, indices, pad_id, regression)
        batch.pop("labels", None)
        with autocast(device, precision):
            _, logits = model(**{k: v.to(device) for k, v in batch.items()})
        logits = logits.float().cpu()
        out[indices] = logits.squeeze(-1).numpy() if regression else logits.argmax(-1).numpy()
    model.train(was_training)
    return out


def write_submission(task: TaskSpec, data: Encoded, preds: np.ndarray, out_dir: Path) -> Path:
    """`<name>.tsv` with `index<TAB>prediction` rows: label strings, or floats for regression (GLUE's format)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{data.name}.tsv"
    with open(path, "w", encoding="utf-8") as f:
        f.write("index\tprediction\n")
        for idx, p in zip(data.idx, preds.tolist()):
            f.write(f"{idx}\t{p:.3f}\n" if task.kind == "regression" else f"{idx}\t{task.labels[int(p)]}\n")
    return path


def write_predictions(model: nn.Module, task: TaskSpec, tok: Tokenizer, pad_id: int, data_dir: str | Path | None,
                      out_dir: Path, precision: str = "bf16") -> dict[str, str]:
    """Submission files for the task's test splits (and AX, from the MNLI model); absent test files are skipped."""
    targets = [task] + [t for t in _glue_dependents(task)]
    written = {}
    for spec in targets:
        if spec.fmt == "glue" and data_dir is None and spec.hub is None:
            continue
        try:
            splits = load_test(spec, data_dir)
        except Exception as e:  # noqa: BLE001 - a missing diagnostic set must not lose the trained model
            log.warning("%s: no test predictions (%s)", spec.name, e)
            continue
        for split in splits:
            data = encode_split(split, tok)
            written[split.name] = str(write_submission(spec, data, predict(model, data, pad_id, precision=precision),
                                                       out_dir))
    return written


def _glue_dependents(task: TaskSpec) -> list[TaskSpec]:
    """Tasks predicted with this task's model (AX with MNLI's)."""
    return [t for t in GLUE_TASKS.values() if t.predict_with == task.name and task.fmt == "glue"]
