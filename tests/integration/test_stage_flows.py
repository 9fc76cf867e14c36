"""Tokenizer and pretraining-data Prefect flows chained on real text, each tracked in MLflow."""

from __future__ import annotations

import pytest

from bertscale.config import load_config


@pytest.fixture()
def cfg_file(tmp_path, sample_corpus):
    cfg = tmp_path / "stages.yaml"
    cfg.write_text(
        f"workdir: {tmp_path / 'work'}\n"
        f"corpus:\n  inputs: [{sample_corpus / 'inaugural'}]\n  runner:\n    num_workers: 1\n"
        "  filters:\n    min_chars: 100\n    min_words: 15\n"
        "tokenizer:\n  vocab_size: 1500\n  heldout_docs: 3\n"
        "data:\n  seq_lengths: [64]\n  num_proc: 1\n"
    )
    return cfg


def test_tokenizer_and_data_flows(cfg_file, prefect_harness):
    from mlflow.tracking import MlflowClient

    from pipelines.corpus import corpus_flow
    from pipelines.pretraining_data import data_flow
    from pipelines.tokenizer import tokenizer_flow

    corpus_flow(config=str(cfg_file))
    tok = tokenizer_flow(config=str(cfg_file))
    data = data_flow(config=str(cfg_file))
    cfg = load_config(cfg_file)
    client = MlflowClient(cfg.tracking_uri())

    tok_run = client.get_run(tok["mlflow_run_id"])
    assert tok_run.data.tags["bertscale.tokenizer_fingerprint"] == tok["fingerprint"]
    assert tok_run.data.metrics["tokenizer.vocab_size"] == tok["vocab_size"] <= 1500
    assert 0 <= tok_run.data.metrics["tokenizer.unk_rate"] < 0.01
    assert tok_run.data.metrics["tokenizer.tokens_per_word"] > 1
    files = {a.path for a in client.list_artifacts(tok_run.info.run_id, "tokenizer")}
    assert {"tokenizer/tokenizer.json", "tokenizer/vocab.txt", "tokenizer/tokenizer_config.json",
            "tokenizer/special_tokens_map.json"} <= files

    data_run = client.get_run(data["mlflow_run_id"])
    instances = data_run.data.metrics["data.seq64.train.instances"]
    assert instances == data["stats"]["seq64.train.instances"] > 0
    assert 0.45 < data_run.data.metrics["data.seq64.train.nsp_random_ratio"] < 0.55
    assert "manifest.json" in {a.path for a in client.list_artifacts(data_run.info.run_id)}
