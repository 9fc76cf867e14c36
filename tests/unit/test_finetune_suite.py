"""Suite bookkeeping on hand-made run results: the grid point with the best median wins, seeds give median and
spread, MNLI's two dev sets become one GLUE entry, users' own tasks stay out of the GLUE average, which is called
so only with all nine tasks; failed jobs are reported and fail the suite only when a task has no successful run;
which submission files were written."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from bertscale.errors import InputError
from bertscale.finetune import metrics as M
from bertscale.finetune import suite
from bertscale.finetune.suite import Job, SuiteResult, summarize
from bertscale.finetune.tasks import Hparams, get_task
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


def _glue_runs(tasks: list[str]) -> list[TaskResult]:
    splits = {"MNLI": ["MNLI-m", "MNLI-mm"]}
    return [_run(t, 0, 2e-5, dict.fromkeys(splits.get(t, [t]), 0.8)) for t in tasks]


def test_glue_average_is_labelled_so_only_with_all_nine_tasks() -> None:
    nine = ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"]
    full = SuiteResult(summarize(_glue_runs(nine)), 0.8, "out")
    assert full.glue_complete() and "| **GLUE average** |" in full.table()
    some = SuiteResult(summarize(_glue_runs(["RTE", "MNLI"])), 0.8, "out")
    assert not some.glue_complete() and some.average_label() == "mean of 2 GLUE tasks"
    assert "GLUE average" not in some.table() and "| **mean of 2 GLUE tasks** |" in some.table()
    # MNLI counts as one entry, and only with both of its dev sets.
    half_mnli = [r for r in _glue_runs(nine) if r.task != "MNLI"] + [_run("MNLI", 0, 2e-5, {"MNLI-m": 0.8})]
    assert not SuiteResult(summarize(half_mnli), 0.8, "out").glue_complete()
    assert M.is_complete_glue({**{t: 0.5 for t in nine if t != "MNLI"}, "MNLI-m": 0.5, "MNLI-mm": 0.5, "AX": 0.1})


def _job(task: str, seed: int) -> Job:
    return Job(get_task(task), Hparams(), seed, "model", "tok", "out", None, None, None, "fp32", True, False)


def test_a_failed_job_is_reported_and_the_others_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run_job(job: Job) -> TaskResult:
        if job.seed == 2:
            raise RuntimeError("worker ran out of memory\nlong traceback")
        return _run(job.task.name, job.seed, job.hparams.lr, {job.task.name: 0.5 + job.seed / 10})

    monkeypatch.setattr(suite, "run_job", fake_run_job)
    finished: list[tuple[int, bool]] = []
    jobs = [_job("RTE", s) for s in (1, 2, 3)]
    results, failures = suite.run_jobs(jobs, on_done=lambda j, r, e: finished.append((j.seed, e is None)))
    assert [r.seed for r in results] == [1, 3] and finished == [(1, True), (2, False), (3, True)]
    assert [(f.task, f.seed, f.point, f.error) for f in failures] == [
        ("RTE", 2, "lr2e-05_bs32", "RuntimeError: worker ran out of memory")]
    summaries = summarize(results)
    suite.raise_if_lost(summaries, failures)  # RTE has successful seeds: the suite goes on
    result = SuiteResult(summaries, 0.6, "out", failures=failures)
    assert "| RTE (seed 2, lr2e-05_bs32) | **failed**: RuntimeError: worker ran out of memory |" in result.table()
    assert result.to_dict()["failures"] == [{"task": "RTE", "seed": 2, "point": "lr2e-05_bs32",
                                             "error": "RuntimeError: worker ran out of memory"}]


def test_a_task_without_any_successful_run_fails_the_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run_job(job: Job) -> TaskResult:
        if job.task.name == "WNLI":
            raise InputError("WNLI/train.tsv:7: label 'x' is not one of WNLI's labels")
        return _run(job.task.name, job.seed, job.hparams.lr, {job.task.name: 0.6})

    monkeypatch.setattr(suite, "run_job", fake_run_job)
    results, failures = suite.run_jobs([_job("RTE", 1), _job("WNLI", 1), _job("WNLI", 2)])
    assert [r.task for r in results] == ["RTE"] and len(failures) == 2
    with pytest.raises(InputError, match=r"WNLI/train.tsv:7: label 'x'"):  # a user error keeps its message
        suite.raise_if_lost(summarize(results), failures)


def test_submission_files_written_and_missing(tmp_path) -> None:
    runs = _glue_runs(["MNLI", "RTE"])
    for r, names in zip(runs, (["MNLI-m"], ["RTE"])):
        for n in names:
            (tmp_path / f"{n}-pred.tsv").write_text("index\tprediction\n")
            r.predictions[n] = str(tmp_path / f"{n}-pred.tsv")
    summaries = summarize(runs)
    sub, written = suite.collect_submission(summaries, tmp_path / "out")
    assert written == ["MNLI-m.tsv", "RTE.tsv"] and (sub / "RTE.tsv").is_file()
    assert [f for f in suite.expected_submission(summaries) if f not in written] == ["MNLI-mm.tsv", "AX.tsv"]
