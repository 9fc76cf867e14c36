"""Suite bookkeeping on hand-made run results: the grid point with the best median wins, seeds give median and
spread, MNLI's two dev sets become one GLUE entry, users' own tasks stay out of the GLUE average."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from bertscale.finetune import metrics as M
from bertscale.finetune.suite import SuiteResult, summarize
from bertscale.finetune.tasks import Hparams
from bertscale.finetune.trainer import EpochRecord, TaskResult


def _run(task: str, seed: int, lr: float, scores: dict[str, float]) -> TaskResult:
    metrics = {split: {"accuracy": v, "score": v} for split, v in scores.items()}
    selection = sum(scores.values()) / len(scores)
    history = [EpochRecord(1, 10, 0.5, lr, 1.0, metrics, selection)]
    return TaskResult(task, seed, asdict(Hparams(lr=lr)), 1, metrics, history, [])


def test_summarize_picks_the_grid_point_by_median_and_reports_spread() -> None:
    runs = [_run("RTE", s, 2e-5, {"RTE": v}) for s, v in enumerate([0.60, 0.70, 0.65])]
    runs += [_run("RTE", s, 5e-5, {"RTE": v}) for s, v in enumerate([0.50, 0.90, 0.62])]  # best single, worse median
    (summary,) = summarize(runs).values()
    assert summary.hparams["lr"] == 2e-5
    assert summary.grid == {"lr2e-05_bs32": pytest.approx(0.65), "lr5e-05_bs32": pytest.approx(0.62)}
    assert summary.stats["RTE"]["accuracy"] == (pytest.approx(0.65), pytest.approx(0.10))
    assert summary.best.seed == 1  # the registered model is the chosen point's best seed


def test_glue_average_merges_mnli_and_leaves_out_custom_tasks() -> None:
    runs = [_run("MNLI", 0, 2e-5, {"MNLI-m": 0.8, "MNLI-mm": 0.6}), _run("RTE", 0, 2e-5, {"RTE": 0.5}),
            _run("reviews", 0, 2e-5, {"reviews": 0.99})]
    result = SuiteResult(summarize(runs), 0.0, "out")
    assert set(result.glue_scores()) == {"MNLI-m", "MNLI-mm", "RTE"}
    assert M.glue_average(result.glue_scores()) == pytest.approx((0.7 + 0.5) / 2)
    result.glue_average = M.glue_average(result.glue_scores())
    table = result.table()
    assert "| MNLI-mm |" in table and "| reviews |" in table and "**60.0**" in table
