"""The corpus Prefect flow on real text: runs the Beam stage and logs params, counts and the manifest to MLflow."""

from __future__ import annotations

import json

import pytest

from bertscale.config import load_config


@pytest.fixture()
def cfg_file(tmp_path, sample_corpus):
    cfg = tmp_path / "corpus.yaml"
    cfg.write_text(
        f"workdir: {tmp_path / 'work'}\n"
        f"corpus:\n  inputs: [{sample_corpus / 'inaugural'}]\n  runner:\n    num_workers: 1\n"
        "  filters:\n    min_chars: 100\n    min_words: 15\n"
    )
    return cfg


def test_corpus_flow_tracks_in_mlflow(cfg_file, prefect_harness):
    from mlflow.tracking import MlflowClient

    from pipelines.corpus import corpus_flow

    result = corpus_flow(config=str(cfg_file))
    cfg = load_config(cfg_file)
    manifest = json.loads((cfg.stage_dir("corpus") / "manifest.json").read_text())
    assert result["counts"] == manifest["counts"]
    assert result["counts"]["kept"] > 0

    client = MlflowClient(cfg.tracking_uri())
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["corpus.dedup.threshold"] == "0.8"
    assert run.data.metrics["corpus.kept"] == manifest["counts"]["kept"]
    assert run.data.tags["bertscale.corpus_manifest_sha256"] == result["manifest_sha256"]
    assert "prefect.flow_run_id" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "config.yaml"} <= artifacts
