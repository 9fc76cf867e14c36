"""The whole pipeline on the debug config: every stage runs, a re-run reuses everything, and a config change
re-runs that stage and the ones after it, nothing before (a fine-tuning change re-runs only fine-tuning); the
encoder and the fine-tuned model are in the registry, the encoder once per training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bertscale import tracking
from bertscale.config import load_config
from bertscale.tokenizer import load_tokenizer, tokenizer_fingerprint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def overrides(tmp_path_factory, shared_data):
    work = tmp_path_factory.mktemp("pipeline")
    return [f"workdir={work}", f"corpus.inputs=[{REPO / 'data/sample/inaugural'}]",
            f"finetune.glue_dir={shared_data / 'glue'}"]


def _states(results: dict) -> dict[str, bool]:
    return {stage: r["reused"] for stage, r in results.items()}


def test_pipeline_runs_caches_and_reruns_downstream(overrides, prefect_harness):
    from mlflow.tracking import MlflowClient

    from pipelines.pipeline import pipeline_flow

    config = str(REPO / "configs" / "debug.yaml")
    first = pipeline_flow(config=config, overrides=overrides)
    assert _states(first) == dict.fromkeys(["corpus", "tokenizer", "data", "train", "finetune"], False)
    for stage, result in first.items():
        marker = Path(result["output_dir"]) / "_COMPLETE.json"
        assert json.loads(marker.read_text())["fingerprint"] == result["fingerprint"], stage
    assert (Path(first["train"]["hf_dir"]) / "model.safetensors").exists()

    encoder = first["train"]["encoder"]
    assert (encoder["name"], encoder["version"], encoder["registered_now"]) == ("debug-encoder", "1", True)
    assert encoder["promotion"].startswith("promoted") and encoder["metric"] == "eval/mlm_loss"
    assert encoder["score"] == pytest.approx(first["train"]["metrics"]["eval/mlm_loss"])
    assert first["finetune"]["registered"] == {"debug-authors": "1"}

    second = pipeline_flow(config=config, overrides=overrides)
    assert all(_states(second).values())
    assert {s: r["output_dir"] for s, r in second.items()} == {s: r["output_dir"] for s, r in first.items()}
    assert (second["train"]["encoder"]["version"], second["train"]["encoder"]["registered_now"]) == ("1", False)

    third = pipeline_flow(config=config, overrides=[*overrides, "data.short_seq_prob=0.3"], until="data")
    assert _states(third) == {"corpus": True, "tokenizer": True, "data": False}
    assert third["data"]["output_dir"] != first["data"]["output_dir"]

    # A fine-tuning change re-runs fine-tuning only: the encoder is not trained or registered again.
    fourth = pipeline_flow(config=config, overrides=[*overrides, "finetune.lr=5.0e-4"])
    assert _states(fourth) == {**dict.fromkeys(["corpus", "tokenizer", "data", "train"], True), "finetune": False}
    assert fourth["train"]["output_dir"] == first["train"]["output_dir"]
    assert fourth["finetune"]["output_dir"] != first["finetune"]["output_dir"]
    assert fourth["train"]["encoder"]["version"] == "1" and fourth["finetune"]["registered"] == {"debug-authors": "2"}

    # A time budget ends training as cramming does: a final evaluation and checkpoint, the HF export, the registry.
    budget = pipeline_flow(config=config, overrides=[*overrides, "train.max_minutes=0.02", "train.max_steps=100000"],
                           until="train")
    assert _states(budget) == {**dict.fromkeys(["corpus", "tokenizer", "data"], True), "train": False}
    trained = budget["train"]
    assert trained["stopped"] == "time_budget" and 0 < trained["final_step"] < 100000
    assert (Path(trained["output_dir"]) / "checkpoints" / f"step{trained['final_step']:08d}").is_dir()
    assert (Path(trained["hf_dir"]) / "model.safetensors").exists()
    assert "eval/mlm_loss" in trained["metrics"] and trained["encoder"]["version"] == "2"

    # MLflow: one parent run per pipeline run, a nested run per stage that ran, lineage tags, Prefect ids.
    cfg = load_config(config, overrides)
    client = MlflowClient(cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("bertscale.stage") == "pipeline"]
    assert len(parents) == 5
    first_parent = min(parents, key=lambda r: r.info.start_time)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first_parent.info.run_id]
    assert {r.data.tags["bertscale.stage"] for r in children} >= {"corpus", "tokenizer", "data", "pretrain"}
    pretrain = next(r for r in children if r.data.tags["bertscale.stage"] == "pretrain")
    vocabulary = tokenizer_fingerprint(load_tokenizer(first["tokenizer"]["output_dir"]))
    assert pretrain.data.tags["bertscale.tokenizer_stage_fingerprint"] == first["tokenizer"]["fingerprint"]
    assert pretrain.data.tags["bertscale.tokenizer_fingerprint"] == vocabulary
    assert pretrain.data.tags["bertscale.corpus_manifest_sha256"] == first["corpus"]["manifest_sha256"]
    assert all("prefect.flow_run_id" in r.data.tags for r in children)

    # The registry: the encoder (logged into its pretraining run, with its lineage) and the fine-tuned models.
    enc = client.get_model_version("debug-encoder", "1")
    assert enc.run_id == first["train"]["mlflow_run_id"] == pretrain.info.run_id
    assert enc.tags["bertscale.corpus_manifest_sha256"] == first["corpus"]["manifest_sha256"]
    assert enc.tags["bertscale.tokenizer_fingerprint"] == vocabulary
    assert enc.tags["bertscale.pretrain_run_id"] == pretrain.info.run_id
    # Version 2 is the time-budget run's encoder; the gate made it champion only if its held-out MLM loss beat
    # version 1's by the margin (how many steps fit in the budget depends on the machine).
    assert len(client.search_model_versions("name='debug-encoder'")) == 2
    budget_loss = float(client.get_model_version("debug-encoder", "2").tags[tracking.SCORE_TAG])
    beats = float(enc.tags[tracking.SCORE_TAG]) - budget_loss > cfg.registry.encoder_margin
    assert str(client.get_model_version_by_alias("debug-encoder", "champion").version) == ("2" if beats else "1")
    tuned = client.get_model_version("debug-authors", "1")
    assert tuned.tags["bertscale.tokenizer_fingerprint"] == vocabulary
    assert tuned.tags["bertscale.pretrain_run_id"] == pretrain.info.run_id
    assert str(client.get_model_version_by_alias("debug-authors", "challenger").version) == "2"
