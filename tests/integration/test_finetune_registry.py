"""Registry round trip on the local SQLite store: a suite fine-tunes and registers its best model, the promotion
gate makes it the champion, `models:/<name>@champion` resolves back to a directory that loads and predicts the
same; a second suite that does not beat the champion by the margin stays the challenger; the gate compares the
median over seeds, not the best seed."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from conftest import make_keyword_task

from bertscale import tracking
from bertscale.config import CustomTaskConfig, PipelineConfig
from bertscale.finetune import get_task, load_eval, run_finetune
from bertscale.finetune.suite import TaskSummary, register_best, summarize
from bertscale.finetune.tasks import Hparams
from bertscale.finetune.encoding import encode_split, prepare_tokenizer
from bertscale.finetune.evaluation import predict
from bertscale.finetune.trainer import EpochRecord, TaskResult
from bertscale.model.weights import resolve_weights
from bertscale.model import BertForSequenceClassification
from bertscale.model.hf import load_pretrained
from bertscale.tokenizer import load_tokenizer


@pytest.fixture()
def yesno(tmp_path: Path) -> tuple[CustomTaskConfig, Path]:
    """A keyword task (CSV) and a tiny random-init checkpoint with a tokenizer trained on it."""
    return make_keyword_task(tmp_path, ['a', 'b', 'c'], k=4, rows=64)


def _config(tmp_path: Path, task: CustomTaskConfig, margin: float) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "name": "rt", "workdir": str(tmp_path / "work"), "registry": {"margin": margin},
        "finetune": {"tasks": ["yesno"], "custom_tasks": [task.model_dump()], "seeds": [0], "epochs": 1,
                     "batch_size": 16, "max_length": 16, "precision": "fp32", "predict_test": False},
    })


def _predictions(model_dir: str | Path, task: CustomTaskConfig) -> np.ndarray:
    model, report = load_pretrained(model_dir, BertForSequenceClassification)
    assert report.missing == []  # the classifier head travels with the registered model
    data = encode_split(load_eval(get_task(task.name, [task]), None)[0],
                        prepare_tokenizer(load_tokenizer(model_dir), 16))
    return predict(model, data, pad_id=0, precision="fp32")


def test_finetune_register_resolve_load(yesno: tuple[CustomTaskConfig, Path], tmp_path: Path) -> None:
    import mlflow

    task, ckpt = yesno
    cfg = _config(tmp_path, task, margin=0.0)
    first = run_finetune(cfg, checkpoint=str(ckpt))
    assert cfg.tracking_uri().startswith("sqlite:///")
    assert first.registered == {"rt-yesno": "1"} and first.promotions["rt-yesno"].startswith("champion")
    local = resolve_weights("models:/rt-yesno@champion", tmp_path / "resolved", cfg)
    assert (local / "model.safetensors").is_file() and (local / "tokenizer.json").is_file()
    np.testing.assert_array_equal(_predictions(local, task), _predictions(first.tasks["yesno"].best.model_dir, task))
    client = mlflow.tracking.MlflowClient()
    version = client.get_model_version("rt-yesno", "1")
    assert version.tags["bertscale.task"] == "yesno" and version.tags["bertscale.source_checkpoint"] == str(ckpt)
    assert len(version.tags["bertscale.tokenizer_fingerprint"]) == 64
    # Same data, same seed: no gain over the champion, so a positive margin keeps version 2 the challenger.
    second = run_finetune(_config(tmp_path, task, margin=0.05), checkpoint=str(ckpt))
    assert second.registered == {"rt-yesno": "2"} and second.promotions["rt-yesno"].startswith("challenger")
    assert str(client.get_model_version_by_alias("rt-yesno", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("rt-yesno", "challenger").version) == "2"


def _summary(scores: list[float], model_dir: Path) -> TaskSummary:
    """A task's chosen grid point with one run per seed; the best seed's model is a stand-in directory."""
    runs = []
    for seed, v in enumerate(scores):
        metrics = {"RTE": {"accuracy": v, "score": v}}
        history = [EpochRecord(1, 1, 0.5, 1e-5, 1.0, metrics, v)]
        runs.append(TaskResult("RTE", seed, asdict(Hparams()), 1, metrics, history, [], model_dir=str(model_dir)))
    (summary,) = summarize(runs).values()
    return summary


def test_gate_compares_the_median_over_seeds_not_the_best_seed(yesno: tuple[CustomTaskConfig, Path],
                                                                tmp_path: Path) -> None:
    cfg = PipelineConfig.model_validate({"name": "gate", "workdir": str(tmp_path), "registry": {"margin": 0.05}})
    model = yesno[1]  # registered models are MLflow models of real weights
    decisions = []
    # Champion median 0.70. Challenger: median 0.72 (gain 0.02 < margin) though its best seed is far ahead (0.95);
    # then median 0.80 (gain 0.10 > margin).
    for scores in ([0.60, 0.70, 0.80], [0.50, 0.72, 0.95], [0.78, 0.80, 0.81]):
        with tracking.stage_run(cfg, "finetune-RTE"):
            version, gate = register_best(cfg, _summary(scores, model), {})
        decisions.append((version, gate.promoted, gate.score))
    assert decisions == [("1", True, pytest.approx(0.70)), ("2", False, pytest.approx(0.72)),
                         ("3", True, pytest.approx(0.80))]
    client = tracking._client()
    assert str(client.get_model_version_by_alias("gate-RTE", "champion").version) == "3"
    assert client.get_model_version("gate-RTE", "2").tags["bertscale.best_seed_score"] == "0.95"
