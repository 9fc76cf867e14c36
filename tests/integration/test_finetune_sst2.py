"""A short real fine-tune: a random-init tiny BERT (transformers' format) on 2,000 SST-2 sentences beats the
majority-class baseline on the real dev set, through the whole suite: MLflow runs, registry, table, submission."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from bertscale.config import PipelineConfig, TokenizerConfig
from bertscale.finetune import get_task, load_eval, load_train, run_finetune
from bertscale.finetune.tasks import subset
from bertscale.tokenizer import save_tokenizer, train_wordpiece


@pytest.fixture(scope="module")
def sst2_checkpoint(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """transformers.BertForPreTraining (random init, 2 layers x 128) + a WordPiece vocab from SST-2's train text."""
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)  # shared cores: one thread is faster than two contended ones for a tiny model
    out = tmp_path_factory.mktemp("sst2") / "checkpoint"
    texts = subset(load_train(get_task("SST-2"), shared_data / "glue").dataset, 2000)["text_a"]
    vocab = save_tokenizer(train_wordpiece(TokenizerConfig(vocab_size=3000, min_frequency=1), iter([texts])),
                           out).vocab_size
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=512, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.BertForPreTraining(config).save_pretrained(out, safe_serialization=True)
    return out


def test_sst2_beats_majority_baseline(shared_data: Path, sst2_checkpoint: Path, tmp_path: Path) -> None:
    import mlflow

    cfg = PipelineConfig.model_validate({
        "name": "it", "workdir": str(tmp_path),
        "finetune": {"glue_dir": str(shared_data / "glue"), "tasks": ["SST-2"], "seeds": [1], "lr": 1e-3,
                     "batch_size": 32, "epochs": 3, "max_length": 64, "max_train_examples": 2000,
                     "precision": "fp32"},
    })
    result = run_finetune(cfg, checkpoint=str(sst2_checkpoint))
    (dev,) = load_eval(get_task("SST-2"), shared_data / "glue")
    majority = max(Counter(dev.dataset["label"]).values()) / len(dev.dataset)
    accuracy = result.tasks["SST-2"].stats["SST-2"]["accuracy"][0]
    assert accuracy > majority + 0.08, f"dev accuracy {accuracy:.3f} vs majority {majority:.3f}"
    assert result.glue_average == pytest.approx(accuracy)
    # One task is not the GLUE score: the table and MLflow say "mean of 1 GLUE task".
    assert "| SST-2 |" in result.table() and "| **mean of 1 GLUE task** |" in result.table()
    assert "GLUE average" not in result.table() and result.submission_files == ["SST-2.tsv"]
    # Submission file for all 1,821 test sentences, label strings as GLUE expects.
    lines = (Path(result.submission_dir) / "SST-2.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1822 and {l.split("\t")[1] for l in lines[1:]} <= {"0", "1"}
    # MLflow: a parent run, a nested run with per-epoch metrics, the best model registered with lineage tags.
    mlflow.set_tracking_uri(cfg.tracking_uri())
    client = mlflow.tracking.MlflowClient()
    parent = client.get_run(result.mlflow_run_id)
    assert parent.data.metrics["glue_tasks_mean"] == pytest.approx(result.glue_average)
    assert "glue_average" not in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 1
    history = client.get_metric_history(children[0].info.run_id, "SST-2.accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "plots"} <= artifacts
    version = client.get_model_version("it-SST-2", result.registered["it-SST-2"])
    assert result.promotions["it-SST-2"].startswith("champion")  # the first version passes the gate
    assert len(version.tags["bertscale.tokenizer_fingerprint"]) == 64
    assert version.tags["bertscale.source_checkpoint"] == str(sst2_checkpoint)
