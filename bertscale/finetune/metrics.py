"""GLUE metrics exactly as the benchmark defines them, as pure functions on label/prediction arrays.

CoLA: Matthews correlation; MRPC and QQP: F1 (positive class 1) and accuracy; STS-B: Pearson and Spearman;
MNLI (matched and mismatched), QNLI, RTE, WNLI, SST-2: accuracy. A task's score is the mean of its metrics, and
the GLUE average is the mean of the task scores, MNLI's being the mean of MNLI-m and MNLI-mm, as the GLUE
leaderboard computes it. Metrics are fractions in [0, 1] (correlations in [-1, 1]); tables show them x100.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import stats


def accuracy(labels: Sequence[int], preds: Sequence[int]) -> float:
    y, p = np.asarray(labels), np.asarray(preds)
    return float((y == p).mean()) if len(y) else 0.0


def f1(labels: Sequence[int], preds: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class; 0 when there are no true positives (scikit-learn's zero_division=0)."""
    y, p = np.asarray(labels) == positive, np.asarray(preds) == positive
    tp = float((y & p).sum())
    denom = float(y.sum() + p.sum())
    return 2 * tp / denom if tp > 0 else 0.0


def matthews_corrcoef(labels: Sequence[int], preds: Sequence[int]) -> float:
    """Matthews correlation from the confusion matrix (multi-class form, as scikit-learn); 0 when undefined."""
    y, p = np.asarray(labels), np.asarray(preds)
    classes = np.union1d(y, p)
    c = confusion_matrix(y, p, classes).astype(np.float64)
    t_k, p_k = c.sum(axis=1), c.sum(axis=0)
    n, correct = c.sum(), np.trace(c)
    cov_yp = correct * n - t_k @ p_k
    cov_yy = n * n - t_k @ t_k
    cov_pp = n * n - p_k @ p_k
    if cov_yy == 0 or cov_pp == 0:
        return 0.0
    return float(cov_yp / np.sqrt(cov_yy * cov_pp))


def pearson(labels: Sequence[float], preds: Sequence[float]) -> float:
    y, p = np.asarray(labels, dtype=np.float64), np.asarray(preds, dtype=np.float64)
    # A constant prediction has no correlation; scipy would warn and return nan.
    if len(y) < 2 or np.ptp(y) == 0 or np.ptp(p) == 0:
        return 0.0
    return float(stats.pearsonr(y, p)[0])


def spearman(labels: Sequence[float], preds: Sequence[float]) -> float:
    y, p = np.asarray(labels, dtype=np.float64), np.asarray(preds, dtype=np.float64)
    if len(y) < 2 or np.ptp(y) == 0 or np.ptp(p) == 0:
        return 0.0
    return float(stats.spearmanr(y, p)[0])


def confusion_matrix(labels: Sequence[int], preds: Sequence[int], classes: Sequence[int] | None = None) -> np.ndarray:
    """Counts [true class, predicted class] over `classes` (default: the classes seen in either array)."""
    y, p = np.asarray(labels), np.asarray(preds)
    classes = np.union1d(y, p) if classes is None else np.asarray(classes)
    index = {c: i for i, c in enumerate(classes.tolist())}
    out = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, q in zip(y.tolist(), p.tolist()):
        out[index[t], index[q]] += 1
    return out


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def compute(metric_names: Sequence[str], labels: Sequence, preds: Sequence) -> dict[str, float]:
    """The named metrics plus `score`, their mean (the task's single GLUE number)."""
    out = {name: METRICS[name](labels, preds) for name in metric_names}
    out["score"] = float(np.mean([out[name] for name in metric_names]))
    return out


# The leaderboard's nine entries; MNLI is one entry, the mean of matched and mismatched.
GLUE_ENTRIES = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI")


def glue_entries(task_scores: Mapping[str, float]) -> set[str]:
    """The leaderboard entries `task_scores` covers (MNLI-m and MNLI-mm both count as MNLI; AX never counts)."""
    return {"MNLI" if name in ("MNLI-m", "MNLI-mm") else name for name in task_scores if name != "AX"}


def is_complete_glue(task_scores: Mapping[str, float]) -> bool:
    """True when every one of the nine entries is there, MNLI with both dev sets: only then is the average the
    GLUE score."""
    return set(GLUE_ENTRIES) <= glue_entries(task_scores) and {"MNLI-m", "MNLI-mm"} <= set(task_scores)


def glue_average(task_scores: Mapping[str, float]) -> float:
    """The GLUE score: the mean of the task scores (each already the mean of its metrics), as the leaderboard
    computes it. MNLI-m and MNLI-mm given separately first average into one MNLI score (the leaderboard's BERT-base
    row, 78.3, only comes out this way); AX is a diagnostic and never enters the average.
    """
    merged: dict[str, list[float]] = {}
    for name, score in task_scores.items():
        if name == "AX":
            continue
        merged.setdefault("MNLI" if name in ("MNLI-m", "MNLI-mm") else name, []).append(score)
    if not merged:
        return float("nan")
    return float(np.mean([np.mean(v) for v in merged.values()]))


def median_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """(median, max - min) over seeds: the median is robust to the odd failed seed small GLUE tasks are known for."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(np.median(arr)), float(arr.max() - arr.min())
