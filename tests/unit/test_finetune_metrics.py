"""GLUE metrics against scikit-learn and scipy on known inputs, and the official GLUE average."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from bertscale.finetune import metrics as M

RNG = np.random.default_rng(0)
Y = RNG.integers(0, 2, 200)
P = np.where(RNG.random(200) < 0.7, Y, 1 - Y)
Y3 = RNG.integers(0, 3, 300)
P3 = np.where(RNG.random(300) < 0.6, Y3, RNG.integers(0, 3, 300))


def test_accuracy_f1_matthews_match_sklearn() -> None:
    assert M.accuracy(Y, P) == pytest.approx(skm.accuracy_score(Y, P))
    assert M.f1(Y, P) == pytest.approx(skm.f1_score(Y, P))
    assert M.matthews_corrcoef(Y, P) == pytest.approx(skm.matthews_corrcoef(Y, P))
    assert M.matthews_corrcoef(Y3, P3) == pytest.approx(skm.matthews_corrcoef(Y3, P3))
    assert M.confusion_matrix(Y3, P3).tolist() == skm.confusion_matrix(Y3, P3).tolist()


def test_degenerate_predictions_follow_sklearn() -> None:
    # CoLA models that predict one class everywhere score 0 MCC; F1 with no positive predictions is 0.
    ones = np.ones_like(Y)
    assert M.matthews_corrcoef(Y, ones) == pytest.approx(skm.matthews_corrcoef(Y, ones)) == 0.0
    zeros = np.zeros_like(Y)
    assert M.f1(Y, zeros) == skm.f1_score(Y, zeros, zero_division=0) == 0.0


def test_correlations_match_scipy() -> None:
    y = RNG.uniform(0, 5, 100)
    p = y + RNG.normal(0, 1, 100)
    assert M.pearson(y, p) == pytest.approx(stats.pearsonr(y, p)[0])
    assert M.spearman(y, p) == pytest.approx(stats.spearmanr(y, p)[0])
    assert M.pearson(y, np.full_like(y, 2.5)) == 0.0  # constant predictions: no correlation, not nan


def test_compute_averages_multi_metric_tasks() -> None:
    out = M.compute(("f1", "accuracy"), Y, P)
    assert out["score"] == pytest.approx((skm.f1_score(Y, P) + skm.accuracy_score(Y, P)) / 2)


def test_glue_average_merges_mnli_and_ignores_ax() -> None:
    scores = {"CoLA": 0.5, "MNLI-m": 0.8, "MNLI-mm": 0.6, "AX": 0.1}
    assert M.glue_average(scores) == pytest.approx((0.5 + (0.8 + 0.6) / 2) / 2)
    assert np.isnan(M.glue_average({})) and np.isnan(M.glue_average({"AX": 0.3}))


def test_glue_average_reproduces_the_leaderboard() -> None:
    # BERT-base on the GLUE leaderboard: CoLA 52.1, SST-2 93.5, MRPC 88.9/84.8, STS-B 87.1/85.8, QQP 71.2/89.2,
    # MNLI-m 84.6, MNLI-mm 83.4, QNLI 90.5, RTE 66.4, WNLI 65.1, AX 34.2 -> score 78.3.
    rows = {"CoLA": [52.1], "SST-2": [93.5], "MRPC": [88.9, 84.8], "STS-B": [87.1, 85.8], "QQP": [71.2, 89.2],
            "MNLI-m": [84.6], "MNLI-mm": [83.4], "QNLI": [90.5], "RTE": [66.4], "WNLI": [65.1], "AX": [34.2]}
    scores = {task: float(np.mean(v)) for task, v in rows.items()}
    assert round(M.glue_average(scores), 1) == 78.3


def test_median_and_spread() -> None:
    assert M.median_and_spread([0.7, 0.5, 0.9]) == (pytest.approx(0.7), pytest.approx(0.4))
