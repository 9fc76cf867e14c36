"""The real deployment path: `prefect server start`, a process worker, `prefect deploy` from deploy/prefect.yaml,
a run triggered through the API, waited for until it completes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("prefect server did not become healthy")


@pytest.fixture()
def prefect_server(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "BERTSCALE_HOME": str(REPO),
    }
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    procs = [server]
    try:
        _wait_healthy(env["PREFECT_API_URL"], server)
        yield env, procs
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()


def _prefect(env: dict, *args: str) -> str:
    out = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_deploy_and_run_through_a_process_worker(prefect_server, tmp_path, sample_corpus):
    env, procs = prefect_server
    config = tmp_path / "deploy-run.yaml"
    config.write_text(
        f"workdir: {tmp_path / 'work'}\n"
        f"corpus:\n  inputs: [{sample_corpus / 'inaugural'}]\n  runner:\n    num_workers: 1\n"
        "  filters:\n    min_chars: 100\n    min_words: 15\n"
    )
    _prefect(env, "work-pool", "create", "local", "--type", "process")
    # The README's single-machine command: every deployment on the local pool, by name.
    local = ["demo", "corpus", "tokenizer", "pretraining-data", "pretrain", "finetune"]
    _prefect(env, "--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml",
             *(arg for name in local for arg in ("--name", name)))
    listed = _prefect({**env, "COLUMNS": "300"}, "deployment", "ls")  # wide enough that no name is cut
    for name in local:
        assert name in listed, listed

    worker_log = open(tmp_path / "worker.log", "w")
    procs.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "local"],
                                  env=env, cwd=REPO, stdout=worker_log, stderr=subprocess.STDOUT))

    # Trigger through the API and wait for a terminal state.
    code = f"""
import json, sys
from prefect.deployments import run_deployment
run = run_deployment("bertscale-corpus/corpus", parameters={{"config": {str(config)!r}}}, timeout=600)
print(json.dumps({{"state": run.state.type.value, "name": run.state.name}}))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=700)
    worker_log.flush()
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["state"] == "COMPLETED", (state, (tmp_path / "worker.log").read_text()[-3000:])
    manifest = json.loads((tmp_path / "work" / "corpus" / "manifest.json").read_text())
    assert manifest["counts"]["kept"] > 0
