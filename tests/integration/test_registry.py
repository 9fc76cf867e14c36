"""Model Registry workflow against the local SQLite store and a real `mlflow server` over HTTP: register,
the challenger/champion promotion gate, and `models:/name@alias` resolution (also through the CLI)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import free_port, wait_http

from bertscale import tracking
from bertscale.cli import main
from bertscale.config import load_config
from bertscale.errors import BertscaleError


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "art"),
           "--workers", "1"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, root / "server.log", timeout=120)
    except (RuntimeError, TimeoutError):
        proc.kill()
        raise
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(params=["sqlite", "http"])
def store(request, tmp_path):
    if request.param == "http":
        uri = request.getfixturevalue("mlflow_server")
        return [f"workdir={tmp_path}", f"tracking.tracking_uri={uri}", f"tracking.experiment=reg-{time.time_ns()}"]
    return [f"workdir={tmp_path}"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random-init encoder in the HF layout with its tokenizer."""
    from conftest import make_keyword_task

    return make_keyword_task(tmp_path_factory.mktemp("tiny"), ["a", "b"], k=3, rows=16)[1]


def _model_dir(base: Path, path: Path, tag: str) -> Path:
    """A copy of `base` whose config.json records `tag` (an extra field that loading ignores)."""
    shutil.copytree(base, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tag": tag}))
    return path


def test_register_promote_resolve(store, tiny_model, tmp_path, capsys):
    cfg = load_config(overrides=store)
    name = f"bert-{time.time_ns()}"
    versions, decisions = {}, {}
    for tag, score in [("v1", 0.70), ("v2", 0.69), ("v3", 0.75)]:
        with tracking.stage_run(cfg, "finetune"):
            versions[tag] = tracking.register_model(_model_dir(tiny_model, tmp_path / tag, tag), name, score=score,
                                                    tags={"bertscale.task": "SST-2"})
        decisions[tag] = tracking.promote(name, versions[tag], margin=0.01)
    assert [decisions[t].promoted for t in ("v1", "v2", "v3")] == [True, False, True]
    assert decisions["v1"].reason == "no champion yet"
    assert decisions["v2"].reason == "score 0.6900 vs champion 0.7000 (margin 0.01)"
    assert decisions["v3"].champion_version == versions["v1"]

    champion = tracking.resolve_model_uri(f"models:/{name}@champion", dst=tmp_path / "champ")
    assert json.loads((champion / "config.json").read_text())["tag"] == "v3"
    challenger = tracking.resolve_model_uri(f"models:/{name}/{versions['v2']}", dst=tmp_path / "v2")
    assert json.loads((challenger / "config.json").read_text())["tag"] == "v2"
    assert (challenger / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()

    shown = tracking.show_model(name)
    aliases = {v["version"]: v["aliases"] for v in shown["versions"]}
    assert aliases[versions["v3"]] == ["challenger", "champion"]
    assert aliases[versions["v2"]] == []
    assert [m for m in tracking.list_models() if m["name"] == name][0]["aliases"]["champion"] == versions["v3"]

    # The CLI resolves the same alias, and a missing one is a one-line user error.
    sets = [x for s in store for x in ("--set", s)]
    assert main(["models", "resolve", f"{name}@champion", *sets, "--dst", str(tmp_path / "cli")]) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]).joinpath("config.json").exists()
    assert main(["models", "resolve", f"{name}@nope", *sets]) == 2
    assert f"model {name!r} has no alias 'nope'; its aliases: challenger" in capsys.readouterr().err
    with pytest.raises(BertscaleError, match="give an alias or a version"):
        tracking.resolve_model_uri(f"models:/{name}")
