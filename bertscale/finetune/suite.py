"""A fine-tuning suite: tasks x grid points x seeds, the results table, the GLUE average, submission files,
and MLflow logging (a parent run per suite, a nested run per task/seed, the best model per task registered).

Jobs are independent, so the grid and the seeds fan out over a `concurrent.futures` process pool (each worker
gets its share of the CPU threads); each job is logged as it finishes, and a failed job is reported, not fatal:
the suite fails only if a task has no successful run. The grid point with the best median dev score is kept for
each task; its seeds give the reported median and spread, the promotion gate compares that median, and its best
seed's model is the one registered.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertscale import tracking
from bertscale.config import FinetuneConfig, PipelineConfig
from bertscale.errors import BertscaleError, ConfigError, InputError
from bertscale.finetune import metrics as M
from bertscale.finetune.encoding import load_checked_tokenizer
from bertscale.finetune.plots import plot_confusion, plot_learning_curves
from bertscale.finetune.tasks import (
    GLUE_TASKS,
    Hparams,
    TaskSpec,
    get_task,
    hparams_for,
)
from bertscale.finetune.trainer import TaskResult, finetune_task
from bertscale.hardware import resolve_precision
from bertscale.model.weights import resolve_weights
from bertscale.tokenizer import load_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)

TOKENIZER_MARKERS = ("tokenizer.json", "vocab.txt")


@dataclass
class Job:
    """One fine-tuning run, as plain data for a worker process."""

    task: TaskSpec
    hparams: Hparams
    seed: int
    model_path: str
    tokenizer: str
    output_dir: str
    data_dir: str | None
    max_train_examples: int | None
    max_eval_examples: int | None
    precision: str
    group_by_length: bool
    predict_test: bool
    zero_stage: int | None = None
    allow_pickle: bool = False
    compile: bool | str = "auto"


@dataclass
class JobFailure:
    """A job that raised: which task, seed and grid point, and the error in one line."""

    task: str
    seed: int
    point: str
    error: str
    cause: BaseException | None = field(default=None, repr=False, compare=False)  # for re-raising; not serialised

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "seed": self.seed, "point": self.point, "error": self.error}


@dataclass
class TaskSummary:
    """One task's chosen grid point: its seeds' runs, median and spread of every metric, and the best run."""

    task: str
    hparams: dict[str, Any]
    runs: list[TaskResult]
    stats: dict[str, dict[str, tuple[float, float]]]  # eval split -> metric -> (median, spread)
    best: TaskResult
    grid: dict[str, float] = field(default_factory=dict)  # "lr=..,bs=.." -> median score

    @property
    def median_score(self) -> float:
        """The task score's median over the chosen point's seeds: what the table reports and the gate compares."""
        return M.median_and_spread([r.score for r in self.runs])[0]

    def to_dict(self) -> dict[str, Any]:
        """Every metric as {median, spread} per eval split (fractions), the best run's other numbers (the official
        SQuAD output, entity supports) and its prediction files."""
        return {"hparams": self.hparams, "seeds": [r.seed for r in self.runs], "best_seed": self.best.seed,
                "best_epoch": self.best.best_epoch,
                "metrics": {split: {m: {"median": v[0], "spread": v[1]} for m, v in stats.items()}
                            for split, stats in self.stats.items()},
                "details": self.best.details, "dev_predictions": self.best.dev_predictions,
                "test_predictions": self.best.predictions, "grid": self.grid}


@dataclass
class SuiteResult:
    """Everything a suite produced; `table()` and `summary()` render it for people."""

    tasks: dict[str, TaskSummary]
    glue_average: float
    output_dir: str
    registered: dict[str, str] = field(default_factory=dict)  # registered model name -> version
    promotions: dict[str, str] = field(default_factory=dict)  # registered model name -> the gate's decision
    submission_dir: str | None = None
    submission_files: list[str] = field(default_factory=list)  # GLUE submission files written
    submission_missing: list[str] = field(default_factory=list)  # ... expected for the tasks run, not written
    failures: list[JobFailure] = field(default_factory=list)
    mlflow_run_id: str | None = None

    def task_scores(self) -> dict[str, float]:
        """Median score per evaluation entry (MNLI-m and MNLI-mm separately), as the GLUE average takes them."""
        return {split: stats["score"][0] for s in self.tasks.values() for split, stats in s.stats.items()}

    def glue_scores(self) -> dict[str, float]:
        """`task_scores` restricted to GLUE tasks: users' own tasks never enter the GLUE average."""
        return {split: stats["score"][0] for s in self.tasks.values() if s.task in GLUE_TASKS
                for split, stats in s.stats.items()}

    def glue_complete(self) -> bool:
        """All nine GLUE tasks are here (MNLI with both dev sets), so the average is the leaderboard's score."""
        return M.is_complete_glue(self.glue_scores())

    def average_label(self) -> str:
        n = len(M.glue_entries(self.glue_scores()))
        return "GLUE average" if self.glue_complete() else f"mean of {n} GLUE task{'s' if n != 1 else ''}"

    def table(self) -> str:
        """Markdown: one row per evaluation, metrics x100 as median ± spread over seeds (per-type and other dotted
        metrics only in results.json); failed jobs last."""
        lines = ["| task | metrics (median ± spread over seeds, x100) | score | seeds | lr | batch | best epoch |",
                 "|---|---|---|---|---|---|---|"]
        for s in self.tasks.values():
            for split, stats in s.stats.items():
                shown = ", ".join(f"{m} {v[0] * 100:.1f} ± {v[1] * 100:.1f}" for m, v in stats.items()
                                  if m != "score" and "." not in m)
                lines.append(f"| {split} | {shown} | {stats['score'][0] * 100:.1f} | {len(s.runs)} | "
                             f"{s.hparams['lr']:g} | {s.hparams['batch_size']} | {s.best.best_epoch} |")
        if not np.isnan(self.glue_average):
            lines.append(f"| **{self.average_label()}** | | **{self.glue_average * 100:.1f}** | | | | |")
        for f in self.failures:
            lines.append(f"| {f.task} (seed {f.seed}, {f.point}) | **failed**: {f.error} | | | | | |")
        return "\n".join(lines)

    def summary(self) -> str:
        parts = [self.table(), "", f"outputs: {self.output_dir}"]
        if self.submission_dir:
            parts.append(f"test predictions (GLUE submission format): {self.submission_dir} "
                         f"({', '.join(self.submission_files)})")
        if self.submission_missing:
            parts.append(f"submission files not written (no test file): {', '.join(self.submission_missing)}")
        parts += [f"registered model: models:/{name}/{version} ({self.promotions.get(name, 'not gated')})"
                  for name, version in self.registered.items()]
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for flows and JSON: table, scores, best model dirs, registered versions."""
        return {"output_dir": self.output_dir, "table": self.table(), "glue_average": self.glue_average,
                "glue_complete": self.glue_complete(), "average_label": self.average_label(),
                "scores": self.task_scores(), "registered": self.registered, "promotions": self.promotions,
                "submission_dir": self.submission_dir, "submission_files": self.submission_files,
                "submission_missing": self.submission_missing, "failures": [f.to_dict() for f in self.failures],
                "best_models": {t: s.best.model_dir for t, s in self.tasks.items()},
                "tasks": {t: s.to_dict() for t, s in self.tasks.items()},
                "mlflow_run_id": self.mlflow_run_id}


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def resolve_tokenizer(checkpoint: Path, tokenizer: str | None, cfg: PipelineConfig) -> Path:
    """`tokenizer` when given (with a warning if the checkpoint has its own), else the checkpoint's own tokenizer
    files, else the pipeline's tokenizer stage output."""
    own = any((checkpoint / n).is_file() for n in TOKENIZER_MARKERS)
    if tokenizer and own:
        log.warning("using the tokenizer %s, not the one saved with checkpoint %s (as --tokenizer asks); its "
                    "special token ids and size are checked against the checkpoint's", tokenizer, checkpoint)
    if own and not tokenizer:
        return checkpoint
    candidate = Path(tokenizer) if tokenizer else cfg.stage_dir("tokenizer")
    if not (candidate.is_file() or any((candidate / n).is_file() for n in TOKENIZER_MARKERS)):
        what = "the given tokenizer" if tokenizer else f"checkpoint {checkpoint} has no tokenizer files and none"
        raise InputError(f"{what} was not found at {candidate}; pass --tokenizer <dir with tokenizer.json or "
                         "vocab.txt>")
    return candidate


def grid_points(task: TaskSpec, ft: FinetuneConfig) -> list[Hparams]:
    """lr x batch size from the config's grid, each axis falling back to the single configured value."""
    base = hparams_for(task, ft)
    lrs = ft.grid_lr or [base.lr]
    sizes = ft.grid_batch_size or [base.batch_size]
    return [hparams_for(task, ft, lr=lr, batch_size=bs) for lr, bs in itertools.product(lrs, sizes)]


def _point_name(hp: Hparams) -> str:
    return f"lr{hp.lr:g}_bs{hp.batch_size}"


def build_jobs(cfg: PipelineConfig, model_path: Path, tokenizer: Path, out: Path) -> list[Job]:
    ft = cfg.finetune
    jobs = []
    for name in ft.tasks:
        task = get_task(name, ft.custom_tasks)
        if task.predict_with:
            raise ConfigError(f"{task.name} is not trained: it is predicted by the {task.predict_with} model; "
                              f"put {task.predict_with} in finetune.tasks instead")
        if task.fmt == "glue" and ft.glue_dir is None:
            log.info("%s: finetune.glue_dir is not set; loading %s from the hub", task.name, task.hub)
        for hp in grid_points(task, ft):
            for seed in ft.seeds:
                jobs.append(Job(task, hp, seed, str(model_path), str(tokenizer),
                                str(out / task.name / _point_name(hp) / f"seed{seed}"), ft.glue_dir,
                                ft.max_train_examples, ft.max_eval_examples, ft.precision, ft.group_by_length,
                                ft.predict_test, ft.zero_stage, ft.allow_pickle, ft.compile))
    return jobs


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------
def run_job(job: Job) -> TaskResult:
    """Run one job (in this process or a worker)."""
    return finetune_task(job.task, job.model_path, job.tokenizer, job.hparams, job.seed, data_dir=job.data_dir,
                         output_dir=job.output_dir, max_train_examples=job.max_train_examples,
                         max_eval_examples=job.max_eval_examples, precision=job.precision,
                         group_by_length=job.group_by_length, predict_test=job.predict_test,
                         zero_stage=job.zero_stage, allow_pickle=job.allow_pickle, compile=job.compile)


def _init_worker(threads: int) -> None:
    # Workers share the cores: oversubscribed OpenMP threads spin and slow every worker down.
    torch.set_num_threads(threads)


OnDone = Callable[[Job, "TaskResult | None", "BaseException | None"], None]


def run_jobs(jobs: list[Job], num_workers: int = 1,
             on_done: OnDone | None = None) -> tuple[list[TaskResult], list[JobFailure]]:
    """Every job (in a spawn-started process pool when num_workers > 1): the results in job order, and the jobs
    that raised. `on_done(job, result, error)` is called as each job finishes, in finishing order."""
    done: dict[int, TaskResult] = {}
    failures: list[JobFailure] = []

    def finished(i: int, result: TaskResult | None, error: BaseException | None) -> None:
        job = jobs[i]
        if error is None and result is not None:
            done[i] = result
        else:
            first_line = str(error).splitlines()[0] if str(error) else ""
            message = f"{type(error).__name__}: {first_line}".replace("|", "/")
            failures.append(JobFailure(job.task.name, job.seed, _point_name(job.hparams), message, error))
            log.error("%s seed %d (%s) failed: %s", job.task.name, job.seed, _point_name(job.hparams), message)
        if on_done is not None:
            on_done(job, result, error)

    workers = min(num_workers, len(jobs))
    if workers <= 1:
        for i, job in enumerate(jobs):
            try:
                result = run_job(job)
            except Exception as e:  # noqa: BLE001 - one failed job must not lose the others
                finished(i, None, e)
            else:
                finished(i, result, None)
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(threads,)) as pool:
            futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                error = future.exception()
                finished(futures[future], None if error else future.result(), error)
    return [done[i] for i in sorted(done)], failures


def raise_if_lost(summaries: Mapping[str, "TaskSummary"], failures: list[JobFailure]) -> None:
    """Fail the suite when a task has no successful run; a user error (bad file, bad config) is re-raised as is,
    so that its message names the file and line."""
    lost = [f for f in failures if f.task not in summaries]
    if not lost:
        return
    first = lost[0].cause
    tasks = sorted({f.task for f in lost})
    if isinstance(first, BertscaleError):
        raise first
    raise RuntimeError(f"fine-tuning failed for every run of {', '.join(tasks)}: {lost[0].error}") from first


def summarize(results: list[TaskResult]) -> dict[str, TaskSummary]:
    """Per task: the grid point with the best median score, its seeds' median/spread, and its best seed."""
    by_task: dict[str, dict[str, list[TaskResult]]] = {}
    for r in results:
        by_task.setdefault(r.task, {}).setdefault(_point_name(Hparams(**r.hparams)), []).append(r)
    out = {}
    for task, points in by_task.items():
        medians = {p: M.median_and_spread([r.score for r in runs])[0] for p, runs in points.items()}
        chosen = max(medians, key=medians.get)
        runs = points[chosen]
        stats = {split: {m: M.median_and_spread([r.metrics[split][m] for r in runs]) for m in metrics}
                 for split, metrics in runs[0].metrics.items()}
        best = max(runs, key=lambda r: r.score)
        out[task] = TaskSummary(task, runs[0].hparams, runs, stats, best, medians)
    return out


def expected_submission(summaries: Mapping[str, TaskSummary]) -> list[str]:
    """The GLUE submission files the tasks run should give: their test splits, and AX with MNLI."""
    names = []
    for s in summaries.values():
        task = GLUE_TASKS.get(s.task)
        if task is not None:
            names += list(task.test) + [n for t in GLUE_TASKS.values() if t.predict_with == task.name for n in t.test]
    return [f"{n}.tsv" for n in names]


def collect_submission(summaries: dict[str, TaskSummary], out: Path) -> tuple[Path | None, list[str]]:
    """Copy each task's best-run test predictions into one folder, named as the GLUE server expects (`<name>.tsv`;
    other kinds keep their file's suffix: `.conll`, `.jsonl`, `.json`); returns the folder (None when there is
    nothing to submit) and the file names written."""
    files = {f"{name}{Path(path).suffix}": path for s in summaries.values() for name, path in s.best.predictions.items()}
    if not files:
        return None, []
    sub = out / "submission"
    sub.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        shutil.copyfile(path, sub / name)
    return sub, sorted(files)


# ----------------------------------------------------------------------------------------------------------------
# MLflow
# ----------------------------------------------------------------------------------------------------------------
def _log_run(cfg: PipelineConfig, r: TaskResult, tags: Mapping[str, str]) -> str | None:
    """A nested run for one (task, seed, grid point): params, per-epoch metrics, result JSON. Returns its id."""
    with tracking.stage_run(cfg, f"finetune-{r.task}", tags={**tags, "bertscale.task": r.task,
                                                             "bertscale.seed": str(r.seed)}) as run_id:
        tracking.log_params({"task": r.task, "seed": r.seed, **r.hparams, "train_examples": r.train_examples})
        for h in r.history:
            metrics = {f"{split}.{m}": v for split, ms in h.eval.items() for m, v in ms.items()}
            tracking.log_metrics({**metrics, "train_loss": h.train_loss, "dev_score": h.selection}, step=h.epoch)
        for step, loss in r.loss_curve:
            tracking.log_metrics({"train_loss_step": loss}, step=step)
        tracking.log_metrics({"best_epoch": r.best_epoch, "best_score": r.score,
                              "tokens_per_second": r.tokens_per_second, "train_seconds": r.train_seconds})
        tracking.log_json(asdict(r), "result.json")
        return run_id


def register_best(cfg: PipelineConfig, s: TaskSummary, lineage: Mapping[str, str]) -> tuple[str, tracking.Promotion]:
    """Log the best model of a task into the active run, register it as `<cfg.name>-<task>`, and pass it through
    the promotion gate on the median score over seeds (the table's number; one lucky seed does not promote)."""
    tags = {**lineage, "bertscale.task": s.task, "bertscale.seed": s.best.seed,
            "bertscale.hparams": json.dumps(s.hparams), "bertscale.finetune_run_id": tracking.active_run_id(),
            "bertscale.seeds": len(s.runs), "bertscale.best_seed_score": repr(s.best.score),
            tracking.SCORE_METRIC_TAG: "median task score over seeds"}
    name = f"{cfg.name}-{s.task}"
    version = tracking.register_model(s.best.model_dir, name, score=s.median_score, tags=tags)
    # The new version is the challenger; it becomes the champion only past the configured margin.
    return version, tracking.promote(name, version, cfg.registry.margin, cfg.registry.higher_is_better)


def _lineage(checkpoint: str, tokenizer: Path, extra: Mapping[str, str] | None) -> dict[str, str]:
    """Where the fine-tuned models come from: the pretraining run and checkpoint, the tokenizer's content hash
    (computed here from the tokenizer used, so it wins over a caller's tag of the same name)."""
    tags = {"bertscale.source_checkpoint": checkpoint,
            "bertscale.tokenizer_fingerprint": tokenizer_fingerprint(load_tokenizer(tokenizer))}
    if os.environ.get("BERTSCALE_PRETRAIN_RUN_ID"):
        tags["bertscale.pretrain_run_id"] = os.environ["BERTSCALE_PRETRAIN_RUN_ID"]
    return {**(extra or {}), **tags}


def log_suite(cfg: PipelineConfig, result: SuiteResult, run_ids: Mapping[int, str | None],
              lineage: Mapping[str, str], out: Path) -> None:
    """Registration of each task's best model (into its already-logged run), per-task plots, the results table.
    `run_ids` maps id(TaskResult) to the nested run logged when that job finished."""
    if cfg.finetune.register_models:
        for s in result.tasks.values():
            if s.best.model_dir is None:
                continue
            name = f"{cfg.name}-{s.task}"
            with tracking.stage_run(cfg, f"finetune-{s.task}", run_id=run_ids.get(id(s.best))):
                version, gate = register_best(cfg, s, lineage)
            result.registered[name] = version
            result.promotions[name] = ("champion: " if gate.promoted else "challenger: ") + gate.reason
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for s in result.tasks.values():
        task = get_task(s.task, cfg.finetune.custom_tasks)
        plot_learning_curves(s.task, s.runs, plots / f"{s.task}-learning-curves.png")
        for split, matrix in s.best.confusion.items():
            plot_confusion(task, matrix, f"{split} (seed {s.best.seed})", plots / f"{split}-confusion.png")
    tracking.log_artifact(plots, "plots")
    tracking.log_text(result.table(), "results.md")
    tracking.log_json(result.to_dict(), "results.json")
    scores = {f"{k}.score": v for k, v in result.task_scores().items()}
    # A subset's mean is not the GLUE score: it gets its own metric name.
    average = "glue_average" if result.glue_complete() else "glue_tasks_mean"
    tracking.log_metrics({**scores, average: result.glue_average, "failed_jobs": len(result.failures)})
    if result.failures:
        tracking.set_tags({"bertscale.failed_jobs": "; ".join(f"{f.task} seed {f.seed}" for f in result.failures)})


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------
def run_finetune(cfg: PipelineConfig, checkpoint: str | None = None, tokenizer: str | None = None,
                 tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> SuiteResult:
    """Fine-tune a checkpoint on every configured task x grid point x seed; table, submission files, MLflow.

    `checkpoint` defaults to finetune.checkpoint. The tokenizer is `tokenizer` if given (a warning says so when
    the checkpoint has its own), else the checkpoint's own, else the tokenizer stage's output; it must fit the
    checkpoint (size, special token ids). `tags` (e.g. the pretraining run id) are added to every run and
    registered model as lineage. A failed job is reported in the table; the suite raises, after writing its
    results, only if a task has no successful run.
    """
    ref = checkpoint or cfg.finetune.checkpoint
    if not ref:
        raise ConfigError("no checkpoint to fine-tune: set finetune.checkpoint or pass --checkpoint "
                          "(an HF dir, a DeepSpeed checkpoint dir or models:/<name>@<alias>)")
    out = cfg.stage_dir("finetune")
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_weights(ref, out / "checkpoint", cfg if cfg.tracking.enabled else None)
    tok_path = resolve_tokenizer(model_path, tokenizer, cfg)
    load_checked_tokenizer(tok_path, model_path)  # a mismatch fails here, before any job starts
    jobs = build_jobs(cfg, model_path, tok_path, out)
    chosen = resolve_precision(cfg.finetune.precision, "cuda" if torch.cuda.is_available() else "cpu")
    log.info("fine-tuning precision %s (%s)", chosen.name, chosen.reason)
    lineage = _lineage(ref, tok_path, tags)
    with tracking.stage_run(cfg, "finetune", tags=lineage, parent_run_id=parent_run_id) as run_id:
        tracking.log_config(cfg, "finetune")
        run_ids: dict[int, str | None] = {}

        def log_job(job: Job, r: TaskResult | None, error: BaseException | None) -> None:
            if r is not None and run_id is not None:  # logged as it finishes: a later crash keeps it
                run_ids[id(r)] = _log_run(cfg, r, lineage)

        results, failures = run_jobs(jobs, cfg.finetune.num_workers, log_job)
        summaries = summarize(results)
        result = SuiteResult(summaries, 0.0, str(out), failures=failures, mlflow_run_id=run_id)
        result.glue_average = M.glue_average(result.glue_scores())
        sub, written = collect_submission(summaries, out)
        result.submission_dir, result.submission_files = (str(sub) if sub else None), written
        if cfg.finetune.predict_test:
            result.submission_missing = [f for f in expected_submission(summaries) if f not in written]
            if result.submission_missing:
                log.warning("GLUE submission incomplete: no %s (test files missing)",
                            ", ".join(result.submission_missing))
        if run_id is not None:
            log_suite(cfg, result, run_ids, lineage, out)
        (out / "results.md").write_text(result.table() + "\n")
        (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        raise_if_lost(summaries, failures)
    return result
