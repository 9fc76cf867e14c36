"""Registered models are MLflow models: a fine-tuning suite registers a classifier (one sentence) and a
regressor (sentence pairs), a pretraining export registers an encoder; MLflow's own `mlflow.pyfunc.load_model`
and `mlflow models serve` (a real scoring server on localhost) give the fine-tuning code's own predictions;
malformed requests get a 400 with a readable message; a model with missing artifacts fails at start, naming
what is missing."""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_keyword_task
from servers import free_port, wait_http

from bertscale import tracking
from bertscale.config import CustomTaskConfig, PipelineConfig
from bertscale.errors import BertscaleError
from bertscale.finetune import get_task, load_eval, run_finetune
from bertscale.finetune.encoding import encode_split, prepare_tokenizer
from bertscale.finetune.evaluation import predict
from bertscale.model import BertForSequenceClassification
from bertscale.model.hf import load_pretrained
from bertscale.tokenizer import load_tokenizer

BIN = Path(sys.executable).parent
WORDS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> dict:
    """One store with `mm-yesno` (classifier), `mm-pairsim` (pair regressor) and `mm-encoder` registered."""
    tmp = tmp_path_factory.mktemp("mlflow-models")
    yesno, ckpt = make_keyword_task(tmp, WORDS, k=4, rows=64)
    rng = random.Random(1)
    rows = [(" ".join(rng.choices(WORDS, k=3)), " ".join(rng.choices(WORDS, k=3))) for _ in range(48)]
    pairs = tmp / "pairs.csv"
    pairs.write_text("s1,s2,sim\n" + "".join(f"{x},{y},{len(set(x.split()) & set(y.split()))}\n" for x, y in rows))
    pairsim = CustomTaskConfig(name="pairsim", train=str(pairs), dev=str(pairs), text_a="s1", text_b="s2",
                               label="sim", kind="regression")
    cfg = PipelineConfig.model_validate({
        "name": "mm", "workdir": str(tmp / "work"),
        "finetune": {"tasks": ["yesno", "pairsim"], "custom_tasks": [yesno.model_dump(), pairsim.model_dump()],
                     "seeds": [0], "epochs": 2, "batch_size": 16, "max_length": 16, "lr": 3e-3,
                     "precision": "fp32", "predict_test": False},
    })
    result = run_finetune(cfg, checkpoint=str(ckpt))
    assert set(result.registered) == {"mm-yesno", "mm-pairsim"}
    tracking.configure(cfg)
    with tracking.stage_run(cfg, "pretrain"):
        encoder = tracking.register_model(ckpt, "mm-encoder", score=1.0)
    tracking.promote("mm-encoder", encoder)
    return {"cfg": cfg, "tasks": {"yesno": yesno, "pairsim": pairsim}, "ckpt": ckpt, "tmp": tmp,
            "uri": mlflow.get_tracking_uri()}


def _own_predictions(model_dir: Path, task: CustomTaskConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """The dev split as a DataFrame, and the fine-tuning code's own predictions on it (fp32)."""
    spec = get_task(task.name, [task])
    split = load_eval(spec, None)[0]
    model, _ = load_pretrained(model_dir, BertForSequenceClassification)
    tok = load_tokenizer(model_dir)
    preds = predict(model, encode_split(split, prepare_tokenizer(tok, 16)), pad_id=0, precision="fp32")
    ds = split.dataset
    frame = pd.DataFrame({"text": ds["text_a"]})
    if task.text_b:
        frame["text_pair"] = ds["text_b"]
    return frame, preds


def test_pyfunc_gives_the_fine_tuning_codes_predictions(registry):
    mlflow.set_tracking_uri(registry["uri"])
    classifier = mlflow.pyfunc.load_model("models:/mm-yesno@champion")
    sig = classifier.metadata.signature
    assert sig.inputs.input_names() == ["text"] and sig.outputs.input_names() == ["label", "score"]
    frame, own = _own_predictions(tracking.resolve_model_uri("models:/mm-yesno@champion"), registry["tasks"]["yesno"])
    out = classifier.predict(frame)
    labels = get_task("yesno", [registry["tasks"]["yesno"]]).labels
    assert out["label"].tolist() == [labels[i] for i in own]
    assert ((out["score"] >= 0.5) & (out["score"] <= 1.0)).all()  # the winning class's probability

    regressor = mlflow.pyfunc.load_model("models:/mm-pairsim@champion")
    assert regressor.metadata.signature.inputs.input_names() == ["text", "text_pair"]
    frame, own = _own_predictions(tracking.resolve_model_uri("models:/mm-pairsim@champion"),
                                  registry["tasks"]["pairsim"])
    out = regressor.predict(frame)
    assert list(out.columns) == ["score"]
    np.testing.assert_allclose(out["score"].to_numpy(), own, rtol=1e-5, atol=1e-5)
    with pytest.raises(mlflow.exceptions.MlflowException, match="text_pair"):
        regressor.predict(frame[["text"]])

    # The version carries what it is and where it comes from.
    version = mlflow.MlflowClient().get_model_version_by_alias("mm-yesno", "champion")
    assert version.tags["bertscale.kind"] == "classifier" and "bertscale.source_checkpoint" in version.tags


def test_encoder_fills_masks_and_embeds(registry):
    mlflow.set_tracking_uri(registry["uri"])
    encoder = mlflow.pyfunc.load_model("models:/mm-encoder@champion")
    filled = encoder.predict(pd.DataFrame({"text": ["a [MASK] c yes", "[MASK] b [MASK] no"]}), params={"top_k": 3})
    assert [len(t) for t in filled["tokens"]] == [1, 2]  # one list per mask
    assert all(len(top) == 3 for row in filled["tokens"] for top in row)
    for row in filled["scores"]:
        for top in row:
            assert top == sorted(top, reverse=True) and 0 < sum(top) <= 1 + 1e-6
    assert "[MASK]" not in filled["sequence"][0]
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"rows \[0\] have no \[MASK\]"):
        encoder.predict(pd.DataFrame({"text": ["a b c"]}))

    embedded = encoder.predict(pd.DataFrame({"text": ["a b c", "c b a yes"]}), params={"output": "embedding"})
    hidden = json.loads((registry["ckpt"] / "config.json").read_text())["hidden_size"]
    assert [len(e) for e in embedded["embedding"]] == [hidden, hidden]
    # Mean of the last hidden states over the tokens, as our own model computes it.
    from bertscale.model import BertForPreTraining

    model, _ = load_pretrained(registry["ckpt"], BertForPreTraining)
    ids = load_tokenizer(registry["ckpt"]).encode("a b c").ids
    with torch.no_grad():
        hidden_states, _ = model.eval().bert(torch.tensor([ids]))
    np.testing.assert_allclose(embedded["embedding"][0], hidden_states[0].mean(0).numpy(), rtol=1e-4, atol=1e-5)


def test_missing_alias_names_the_aliases_it_has(registry):
    tracking.configure(registry["cfg"])
    with pytest.raises(BertscaleError, match="has no alias 'nope'; its aliases: challenger"):
        tracking.resolve_model_uri("models:/mm-yesno@nope")


# ----------------------------------------------------------------------------------------------------------------
# `mlflow models serve`
# ----------------------------------------------------------------------------------------------------------------
def _serve(uri: str, tracking_uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # The server runs `uvicorn` from PATH, as in an activated virtual environment.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_serve_the_champion(registry, tmp_path):
    mlflow.set_tracking_uri(registry["uri"])
    frame, _ = _own_predictions(tracking.resolve_model_uri("models:/mm-yesno@champion"), registry["tasks"]["yesno"])
    frame = frame.head(8)
    expected = mlflow.pyfunc.load_model("models:/mm-yesno@champion").predict(frame)
    log = tmp_path / "serve.log"
    proc, url = _serve("models:/mm-yesno@champion", registry["uri"], log)
    try:
        wait_http(f"{url}/ping", proc, log, timeout=120)
        status, split = _post(url, {"dataframe_split": frame.to_dict(orient="split")})
        assert status == 200, split
        got = pd.DataFrame(split["predictions"])
        assert got["label"].tolist() == expected["label"].tolist()
        np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-6)
        status, inputs = _post(url, {"inputs": {"text": frame["text"].tolist()}})
        assert status == 200 and inputs["predictions"] == split["predictions"]

        # Malformed payloads: 400s with a message a person can act on.
        status, err = _post(url, {"dataframe_split": {"columns": ["sentence"], "data": [["a b"]]}})
        assert status == 400 and "text" in err["message"], err
        # (A null in an `inputs` payload reaches the model as the string "None": MLflow's own parsing.)
        status, err = _post(url, {"dataframe_split": {"columns": ["text"], "data": [[None], ["a b"]]}})
        assert status == 400 and "not strings" in err["message"], err
        status, err = _post(url, b"{not json")
        assert status == 400 and err.get("message"), err

        # Latency of one-row requests, for the record (not asserted: shared machines are noisy).
        one = {"inputs": {"text": [frame["text"][0]]}}
        times = []
        for _ in range(100):
            start = time.perf_counter()
            assert _post(url, one)[0] == 200
            times.append(time.perf_counter() - start)
        print(f"served predict latency, one row: p50 {statistics.median(times) * 1000:.1f} ms, "
              f"p90 {sorted(times)[89] * 1000:.1f} ms over 100 requests")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serving_a_model_with_missing_artifacts_fails_at_start(registry, tmp_path):
    mlflow.set_tracking_uri(registry["uri"])
    local = Path(mlflow.artifacts.download_artifacts("models:/mm-yesno/1", dst_path=str(tmp_path / "copy")))
    (tracking.resolve_model_uri("models:/mm-yesno/1", tmp_path / "hf")).exists()
    broken = next(local.rglob("model.safetensors"))
    broken.unlink()
    log = tmp_path / "serve.log"
    proc, _ = _serve(str(local), registry["uri"], log)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"a model without weights was served:\n{log.read_text()[-2000:]}")
    assert proc.returncode != 0
    assert "incomplete: missing the weights (model.safetensors)" in log.read_text()
    shutil.rmtree(local)
