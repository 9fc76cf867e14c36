"""Registry round trip against a real `mlflow server`: register a fine-tuned model, alias it `champion`,
resolve `models:/<name>@champion` back to a directory, load it and get the same predictions."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from bertscale import tracking
from bertscale.config import CustomTaskConfig, PipelineConfig, TokenizerConfig
from bertscale.finetune import finetune_task, get_task, load_eval, resolve_checkpoint
from bertscale.finetune.trainer import collate, encode_split, prepare_tokenizer
from bertscale.model import BertConfig, BertForPreTraining, BertForSequenceClassification
from bertscale.model.hf import export_hf, load_pretrained
from bertscale.tokenizer import load_tokenizer, save_tokenizer, train_wordpiece


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking + registry server on 127.0.0.1 with a SQLite store and a proxied artifact store."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(1)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture()
def tiny_finetuned(tmp_path: Path) -> tuple[str, CustomTaskConfig]:
    """A fine-tuned tiny classifier (one short epoch on a keyword task): its model dir and task."""
    torch.set_num_threads(1)
    rng = random.Random(0)
    rows = [(f"{' '.join(rng.choices(['a', 'b', 'c'], k=4))} {'yes' if i % 2 else 'no'}", i % 2) for i in range(64)]
    data = tmp_path / "task.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    ckpt = tmp_path / "ckpt"
    vocab = save_tokenizer(train_wordpiece(TokenizerConfig(vocab_size=60, min_frequency=1),
                                           iter([[t for t, _ in rows]])), ckpt).vocab_size
    export_hf(BertForPreTraining(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64,
                                            max_position_embeddings=32)), ckpt)
    task = CustomTaskConfig(name="yesno", train=str(data), dev=str(data), text_a="text")
    result = finetune_task("yesno", ckpt, ckpt, {"epochs": 1, "batch_size": 16, "max_length": 16}, seed=0,
                           custom_tasks=[task], output_dir=tmp_path / "out", precision="fp32")
    return result.model_dir, task


def _predictions(model_dir: str | Path, task: CustomTaskConfig) -> np.ndarray:
    model, _ = load_pretrained(model_dir, BertForSequenceClassification)
    split = load_eval(get_task(task.name, [task]), None)[0]
    data = encode_split(split, prepare_tokenizer(load_tokenizer(model_dir), 16))
    batch = collate(data, list(range(len(data))), pad_id=0, regression=False)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        return model(**batch)[1].numpy()


def test_register_alias_resolve_load(mlflow_server: str, tiny_finetuned: tuple[str, CustomTaskConfig],
                                     tmp_path: Path) -> None:
    import mlflow

    model_dir, task = tiny_finetuned
    cfg = PipelineConfig.model_validate({"workdir": str(tmp_path), "tracking": {"tracking_uri": mlflow_server,
                                                                                "experiment": "registry-test"}})
    with tracking.stage_run(cfg, "finetune") as run_id:
        version = tracking.register_model(model_dir, "yesno-classifier", score=0.9, tags={"bertscale.task": "yesno"})
    assert tracking.promote("yesno-classifier", version).promoted  # first version: becomes the champion
    registered = mlflow.tracking.MlflowClient().get_model_version("yesno-classifier", version)
    assert registered.run_id == run_id and registered.tags["bertscale.task"] == "yesno"
    local = resolve_checkpoint("models:/yesno-classifier@champion", tmp_path / "resolved", cfg)
    assert (local / "model.safetensors").is_file() and (local / "tokenizer.json").is_file()
    np.testing.assert_array_equal(_predictions(local, task), _predictions(model_dir, task))
    by_version = resolve_checkpoint(f"models:/yesno-classifier/{version}", tmp_path / "by-version", cfg)
    assert (by_version / "bertscale_finetune.json").is_file()
