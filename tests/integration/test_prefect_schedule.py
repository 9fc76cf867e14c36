"""Schedules that fire: the `continual-pretraining` deployment of deploy/prefect.yaml, deployed on the `local`
process pool with a short interval, runs by itself through a real `prefect server` and process worker (nothing
triggers a run). The second run reuses every stage; a changed corpus snapshot makes the next run start over
from the corpus, continue from the base encoder's champion (pinned to its version) and pass the promotion gate."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from servers import free_port, wait_http
from test_prefect_deployment import BIN, REPO, _prefect

from bertscale import tracking
from bertscale.config import load_config
from bertscale.errors import BertscaleError

INTERVAL_S = 15
STAGES = ["corpus", "tokenizer", "data", "train"]
SPEECHES = sorted((REPO / "data" / "sample" / "inaugural").glob("*.txt"))


@pytest.fixture()
def scheduler(tmp_path):
    """A Prefect server whose scheduler looks every few seconds, and a process worker on the `local` pool."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "3",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "BERTSCALE_HOME": str(REPO),
    }
    procs: list[subprocess.Popen] = []
    logs = [open(tmp_path / "server.log", "w"), open(tmp_path / "worker.log", "w")]
    try:
        procs.append(subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                       str(port)], env=env, stdout=logs[0], stderr=subprocess.STDOUT))
        wait_http(f"{env['PREFECT_API_URL']}/health", procs[0], tmp_path / "server.log")
        _prefect(env, "work-pool", "create", "local", "--type", "process")
        procs.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "local"], env=env,
                                      cwd=REPO, stdout=logs[1], stderr=subprocess.STDOUT))
        yield env
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()


def _api(env: dict, method: str, path: str, body: dict | None = None):
    req = urllib.request.Request(f"{env['PREFECT_API_URL']}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read()
    return json.loads(text) if text else None


def _runs(env: dict, deployment_id: str, started: bool = True) -> list[dict]:
    """The deployment's flow runs (those that have started, oldest first)."""
    runs = _api(env, "POST", "/flow_runs/filter",
                {"deployments": {"id": {"any_": [deployment_id]}}, "sort": "START_TIME_ASC", "limit": 200})
    return [r for r in runs if r["start_time"] or not started]


def _wait_for_scheduled(env: dict, deployment_id: str, tmp_path: Path, timeout: float = 60) -> None:
    # The server's scheduler creates the runs; when it cannot (a database library it does not support), say so
    # now rather than after waiting for runs that will never come.
    deadline = time.time() + timeout
    while not _runs(env, deployment_id, started=False):
        assert time.time() < deadline, ("the server scheduled no run:\n"
                                        + (tmp_path / "server.log").read_text()[-4000:])
        time.sleep(1)


def _wait_for_completed(env: dict, deployment_id: str, count: int, since: float, tmp_path: Path,
                        timeout: float = 420) -> list[dict]:
    """Wait until `count` runs that started after `since` (epoch seconds) have completed; no run may fail."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = [r for r in _runs(env, deployment_id) if _epoch(r["start_time"]) > since]
        failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
        assert not failed, (failed[0]["state"], (tmp_path / "worker.log").read_text()[-6000:])
        done = [r for r in runs if r["state_type"] == "COMPLETED"]
        if len(done) >= count:
            return done
        time.sleep(2)
    raise AssertionError(f"fewer than {count} scheduled runs completed:\n"
                         + (tmp_path / "worker.log").read_text()[-6000:])


def _epoch(timestamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _seed_base_encoder(cfg, out: Path) -> None:
    """An earlier pretraining's encoder: a tokenizer trained on the snapshot and tiny weights in the HF layout,
    registered as `base-encoder` and made champion in the registry the scheduled runs use."""
    import torch

    from bertscale.config import TokenizerConfig
    from bertscale.model import BertForPreTraining, config_from_pipeline
    from bertscale.model.hf import export_hf
    from bertscale.tokenizer import save_tokenizer, train_wordpiece

    texts = [p.read_text() for p in SPEECHES[:20]]
    vocab = save_tokenizer(train_wordpiece(TokenizerConfig(vocab_size=1000), iter([texts])), out).vocab_size
    torch.manual_seed(0)
    export_hf(BertForPreTraining(config_from_pipeline(cfg, vocab)), out)
    tracking.configure(cfg)
    with tracking.stage_run(cfg, "pretrain"):
        version = tracking.register_model(out, "base-encoder", score=7.5)
    tracking.promote("base-encoder", version)


def test_a_scheduled_deployment_reuses_its_cache_and_reruns_on_a_new_snapshot(scheduler, tmp_path):
    from mlflow.tracking import MlflowClient

    env = scheduler
    snapshot, work, base = tmp_path / "snapshot", tmp_path / "work", tmp_path / "base-encoder"
    snapshot.mkdir()
    for p in SPEECHES[:20]:
        shutil.copy(p, snapshot)
    config = tmp_path / "continual-test.yaml"
    # configs/continual.yaml, continued from the base encoder, at the debug config's size.
    config.write_text(f"""base: {REPO / 'configs' / 'continual.yaml'}
workdir: {work}
corpus:
  inputs: [{snapshot}]
  target_shard_bytes: 131072
  runner: {{num_workers: 1}}
tokenizer: {{pretrained: {base}, heldout_docs: 5}}
data: {{seq_lengths: [64], dupe_factor: 1, heldout_fraction: 0.05, num_proc: 1}}
model: {{size: tiny, max_position_embeddings: 128}}
train: {{init_from: "models:/base-encoder@champion", num_procs: 1, lr: 1.0e-3, warmup_steps: 2,
         max_steps: 6, micro_batch_size: 8, log_every: 3, eval_every: 6, eval_batches: 2, checkpoint_every: 6}}
""")
    cfg = load_config(str(config))
    _seed_base_encoder(cfg, base)
    # A registry alias that does not exist: one line naming the model's aliases.
    with pytest.raises(BertscaleError, match=r"^models:/base-encoder@best: model 'base-encoder' has no alias "
                                             r"'best'; its aliases: challenger \(version 1\), champion \(version 1\)$"):
        tracking.alias_version("models:/base-encoder@best")

    # The yaml's deployment as it is, with a schedule that fires every few seconds and the test's config.
    _prefect(env, "--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--name", "continual-pretraining",
             "--interval", str(INTERVAL_S), "--param", f"config={config}", "--param", "until=train")
    deployment = _api(env, "GET", "/deployments/name/bertscale-pipeline/continual-pretraining")
    assert deployment["parameters"]["if_busy"] == "skip"
    assert deployment["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    _wait_for_scheduled(env, deployment["id"], tmp_path)
    client = MlflowClient(cfg.tracking_uri())

    def parent(run: dict):
        found = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                   f"tags.`prefect.flow_run_id` = '{run['id']}'")
        (pipeline,) = [r for r in found if r.data.tags["bertscale.stage"] == "pipeline"]
        return pipeline

    def reused(run: dict) -> dict[str, bool]:
        tags = parent(run).data.tags
        return {s: tags[f"bertscale.{s}.reused"] == "True" for s in STAGES}

    try:
        first, second = _wait_for_completed(env, deployment["id"], 2, since=0, tmp_path=tmp_path)[:2]
        assert reused(first) == dict.fromkeys(STAGES, False)
        assert reused(second) == dict.fromkeys(STAGES, True)
        assert parent(first).data.params["train.init_from"] == "models:/base-encoder/1"
        # The cached run registered nothing new: one encoder version, the champion (there was none before).
        assert [str(v.version) for v in client.search_model_versions("name='continual-encoder'")] == ["1"]
        assert str(client.get_model_version_by_alias("continual-encoder", "champion").version) == "1"

        # A new snapshot: two more speeches. The next run to start re-runs everything from the corpus.
        changed_at = time.time()
        for p in SPEECHES[20:22]:
            shutil.copy(p, snapshot)
        (third,) = _wait_for_completed(env, deployment["id"], 1, since=changed_at, tmp_path=tmp_path)[:1]
        assert reused(third) == dict.fromkeys(STAGES, False)
        assert parent(third).data.params["train.init_from"] == "models:/base-encoder/1"
        v2 = client.get_model_version("continual-encoder", "2")
        gate = v2.tags["bertscale.promotion"]
        assert re.fullmatch(r"(promoted|kept): score [\d.]+ vs champion [\d.]+ \(margin .*", gate), gate
        champion = str(client.get_model_version_by_alias("continual-encoder", "champion").version)
        assert champion == ("2" if gate.startswith("promoted") else "1")
        assert str(client.get_model_version_by_alias("continual-encoder", "challenger").version) == "2"
    finally:
        # Stop the schedule, then let a run that already started end before the worker goes.
        _api(env, "POST", f"/deployments/{deployment['id']}/pause_deployment")
        deadline = time.time() + 120
        while time.time() < deadline and any(r["state_type"] in ("PENDING", "RUNNING")
                                             for r in _runs(env, deployment["id"])):
            time.sleep(2)
