"""`bertscale corpus`, `tokenizer` and `data` track by default and `--no-tracking` tracks nothing: the command
line records each stage through `tracking.track_stage`, the same function the Prefect flows call."""

from __future__ import annotations

import pytest

from bertscale.cli import main


@pytest.fixture()
def stage_args(sample_corpus):
    return ["--set", f"corpus.inputs=[{sample_corpus / 'inaugural'}]", "--set", "corpus.runner.num_workers=1",
            "--set", "corpus.filters.min_chars=100", "--set", "corpus.filters.min_words=15",
            "--set", "tokenizer.vocab_size=1500", "--set", "tokenizer.heldout_docs=3",
            "--set", "data.seq_lengths=[64]", "--set", "data.num_proc=1"]


def test_stages_track_by_default_into_the_workdir_store(tmp_path, stage_args):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    for stage in ("corpus", "tokenizer", "data"):
        assert main([stage, "--workdir", str(work), *stage_args]) == 0
    store = work / "mlflow.db"
    assert store.is_file()
    client = MlflowClient(f"sqlite:///{store.resolve()}")
    runs = {r.data.tags["bertscale.stage"]: r for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])}
    assert set(runs) == {"corpus", "tokenizer", "data"}
    corpus = runs["corpus"]
    assert corpus.info.run_name == "corpus" and corpus.info.status == "FINISHED"
    assert corpus.data.metrics["corpus.kept"] > 0 and corpus.data.params["corpus.filters.min_words"] == "15"
    assert "manifest.json" in {a.path for a in client.list_artifacts(corpus.info.run_id)}
    assert len(corpus.data.tags["bertscale.corpus_manifest_sha256"]) == 64
    assert runs["tokenizer"].data.metrics["tokenizer.vocab_size"] <= 1500
    assert runs["data"].data.metrics["data.seq64.train.instances"] > 0


def test_no_tracking_records_nothing(tmp_path, stage_args):
    work = tmp_path / "work"
    assert main(["corpus", "--workdir", str(work), "--no-tracking", *stage_args]) == 0
    assert (work / "corpus" / "manifest.json").is_file()
    assert not (work / "mlflow.db").exists() and not (work / "mlartifacts").exists()
