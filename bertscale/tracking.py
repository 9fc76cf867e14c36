"""All MLflow calls of the project: runs, params, metrics, artifacts and the Model Registry.

The default store is a local SQLite file under the run's workdir, so nothing needs to be running; point
`tracking.tracking_uri` at an `mlflow server` (HTTP) to share runs across a team.

Stages know nothing of MLflow: each returns a result whose `record()` is a `StageRecord` (the config section to
log as params, metrics, artifacts, tags). `track_stage` is the one function that runs a stage inside its MLflow
run and records it; the CLI and the Prefect flows both call it, so `--no-tracking` (`tracking.enabled=false`)
means the same everywhere. Pretraining's ranks run in other processes: the launching process opens the run,
`rank_env` names it in the ranks' environment, and rank 0 logs into it through `rank_run` and `log_metrics`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bertscale.config import PipelineConfig, dump_config, flatten
from bertscale.errors import BertscaleError

log = logging.getLogger(__name__)

# MLflow rejects param values longer than this; longer ones are truncated with a marker.
_MAX_PARAM_LEN = 6000
# The run rank 0 of a launched pretraining job logs into, named by the launching process (see `rank_env`).
RUN_ID_ENV = "BERTSCALE_MLFLOW_RUN_ID"

R = TypeVar("R")


def _mlflow():
    # Imported lazily: `import mlflow` costs ~1 s and most CLI paths (--help, errors) never need it.
    import mlflow

    return mlflow


def configure(cfg: PipelineConfig) -> str:
    """Point MLflow at the configured store and experiment; returns the tracking URI."""
    mlflow = _mlflow()
    uri = cfg.tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    # Keep the SQLite store's artifacts beside it rather than in ./mlruns of whatever the cwd is.
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        artifact_location = None
        if uri.startswith("sqlite:///"):
            artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location)
    mlflow.set_experiment(cfg.tracking.experiment)
    return uri


@contextlib.contextmanager
def stage_run(
    cfg: PipelineConfig,
    stage: str,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
) -> Iterator[str | None]:
    """An MLflow run for one stage; yields its run id (None when tracking is disabled).

    With `run_id`, resumes that run (rank 0 of a launched job: `rank_run`; the registry logging into a finished
    pretraining run). The run is nested under `parent_run_id`, else under the run named by the
    `BERTSCALE_PARENT_RUN_ID` environment variable, else under this thread's active run, if any.
    """
    if not cfg.tracking.enabled:
        yield None
        return
    mlflow = _mlflow()
    configure(cfg)
    all_tags = {"bertscale.stage": stage, **(tags or {})}
    nested = mlflow.active_run() is not None
    parent = parent_run_id or os.environ.get("BERTSCALE_PARENT_RUN_ID")
    if parent and not nested and run_id is None:
        all_tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else stage, nested=nested, tags=all_tags) as run:
        yield run.info.run_id


@dataclass
class StageRecord:
    """What a stage reports to tracking: plain data, built by the stage's result (`result.record()`)."""

    section: str | None  # the config section logged as params (None: the whole config)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)  # (local file or dir, artifact folder)
    documents: dict[str, Any] = field(default_factory=dict)  # artifact name -> JSON-able object
    tags: dict[str, str] = field(default_factory=dict)


def record(cfg: PipelineConfig, result: Any) -> None:
    """Log a stage's record to the active run: its config section as params (and the whole config as
    `config.yaml`), then its metrics, artifacts, documents and tags."""
    rec: StageRecord = result.record()
    log_config(cfg, rec.section)
    log_metrics(rec.metrics)
    for path, folder in rec.artifacts:
        log_artifact(path, folder)
    for name, obj in rec.documents.items():
        log_json(obj, name)
    set_tags(rec.tags)


def track_stage(cfg: PipelineConfig, stage: str, run: Callable[[], R], tags: Mapping[str, str] | None = None,
                parent_run_id: str | None = None) -> tuple[R, str | None]:
    """Run one stage (`run()`) inside its MLflow run and record its result; returns (result, run id).

    The one way a stage is tracked, from the CLI and from the flows alike. With tracking disabled the stage just
    runs (run id None). A stage that raises leaves a FAILED run.
    """
    with stage_run(cfg, stage, tags=tags, parent_run_id=parent_run_id) as run_id:
        result = run()
        if run_id is not None:
            record(cfg, result)
    return result, run_id


def rank_env() -> dict[str, str]:
    """Environment for launched ranks: the active run's id, so rank 0 logs into it (empty without a run)."""
    run_id = active_run_id() if is_active() else None
    return {RUN_ID_ENV: run_id} if run_id else {}


@contextlib.contextmanager
def rank_run(cfg: PipelineConfig, is_main: bool) -> Iterator[None]:
    """On rank 0 of a launched job, the run the launching process named (`rank_env`) is active inside; a rank
    started in-process under an active run keeps that one; any other rank logs nothing."""
    run_id = os.environ.get(RUN_ID_ENV) if is_main and cfg.tracking.enabled else None
    if run_id and not is_active():
        with stage_run(cfg, "pretrain", run_id=run_id):
            yield
        return
    yield


def is_active() -> bool:
    """Whether this process has an MLflow run open; never imports mlflow (a process that has not imported it
    has no run)."""
    mlflow = sys.modules.get("mlflow")
    return mlflow is not None and mlflow.active_run() is not None


def create_run(cfg: PipelineConfig, stage: str, tags: Mapping[str, str] | None = None,
               parent_run_id: str | None = None) -> str | None:
    """Create a run without activating it, for another process to log into (its id in `RUN_ID_ENV`)."""
    if not cfg.tracking.enabled:
        return None
    configure(cfg)
    from mlflow.tracking import MlflowClient

    all_tags = {"bertscale.stage": stage, "mlflow.runName": stage, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    exp = _mlflow().get_experiment_by_name(cfg.tracking.experiment)
    return MlflowClient().create_run(exp.experiment_id, tags=all_tags).info.run_id


def end_run(run_id: str | None, status: str = "FINISHED") -> None:
    if run_id:
        from mlflow.tracking import MlflowClient

        MlflowClient().set_terminated(run_id, status=status)


def run_data(run_id: str) -> tuple[dict[str, float], dict[str, str]]:
    """(latest metrics, tags) of a run: how a flow reads what a training subprocess logged."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(run_id)
    return dict(run.data.metrics), dict(run.data.tags)


def log_config(cfg: PipelineConfig, section: str | None = None) -> None:
    """Log the config (or one section of it) as flat params, and the whole config as a YAML artifact."""
    if not cfg.tracking.enabled:
        return
    mlflow = _mlflow()
    data = dump_config(cfg)
    params = flatten(data[section], section + ".") if section else flatten(data)
    params = {k: (str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()}
    mlflow.log_params(params)
    mlflow.log_dict(data, "config.yaml")


def log_params(params: Mapping[str, Any]) -> None:
    mlflow = _mlflow()
    if mlflow.active_run() is None:
        return
    mlflow.log_params({k: str(v)[:_MAX_PARAM_LEN] for k, v in params.items()})


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log finite numeric metrics to the active run (no-op without one)."""
    mlflow = _mlflow()
    if mlflow.active_run() is None:
        return
    clean = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            # MLflow metric names allow only a limited character set.
            clean[k.replace(" ", "_").replace("(", "").replace(")", "")] = f
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow = _mlflow()
    if mlflow.active_run() is None:
        return
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_json(obj: Any, name: str) -> None:
    mlflow = _mlflow()
    if mlflow.active_run() is None:
        return
    mlflow.log_dict(json.loads(json.dumps(obj, default=str)), name)


def log_text(text: str, name: str) -> None:
    mlflow = _mlflow()
    if mlflow.active_run() is None:
        return
    mlflow.log_text(text, name)


def set_tags(tags: Mapping[str, Any]) -> None:
    mlflow = _mlflow()
    if mlflow.active_run() is None:
        return
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def active_run_id() -> str | None:
    run = _mlflow().active_run()
    return run.info.run_id if run else None


# ----------------------------------------------------------------------------------------------------------------
# Model Registry
# ----------------------------------------------------------------------------------------------------------------
SCORE_TAG = "bertscale.score"
# What the score measures; the gate compares only scores of the same metric.
SCORE_METRIC_TAG = "bertscale.score_metric"


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def register_model(
    model_dir: str | Path, name: str, score: float | None = None, tags: Mapping[str, Any] | None = None,
    artifact_path: str = "model",
) -> str:
    """Log an HF-format model dir to the active run as an MLflow model (bertscale.serving's pyfunc, with
    signature and input example) and register it as a new version of `name`.

    `mlflow.pyfunc.load_model("models:/<name>/<version>")` and `mlflow models serve` load what is registered;
    `resolve_model_uri` gets the HF dir back. `score` is stored as a version tag for the promotion gate.
    Returns the version.
    """
    mlflow = _mlflow()
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_model needs an active MLflow run")
    from bertscale import serving

    info = serving.log_model(model_dir, name=artifact_path)
    client = _client()
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"bertscale": "true"})
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    all_tags["bertscale.kind"] = serving.model_kind(Path(model_dir))
    if score is not None:
        all_tags[SCORE_TAG] = repr(float(score))
    version = mlflow.register_model(info.model_uri, name, tags=all_tags)
    return str(version.version)


@dataclass
class Promotion:
    """What the promotion gate decided for one new model version."""

    name: str
    version: str
    score: float | None
    champion_version: str | None
    champion_score: float | None
    promoted: bool
    reason: str


def promote(name: str, version: str, margin: float = 0.0, higher_is_better: bool = True) -> Promotion:
    """Make `version` the `challenger`, and the `champion` only if its score beats the champion's by `margin`."""
    from mlflow.exceptions import MlflowException

    client = _client()
    new = client.get_model_version(name, version)
    score = float(new.tags[SCORE_TAG]) if SCORE_TAG in new.tags else None
    client.set_registered_model_alias(name, "challenger", version)
    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champ = None
    champ_score = float(champ.tags[SCORE_TAG]) if champ is not None and SCORE_TAG in champ.tags else None
    metric = new.tags.get(SCORE_METRIC_TAG)
    champ_metric = champ.tags.get(SCORE_METRIC_TAG) if champ is not None else None
    if champ is None:
        promoted, reason = True, "no champion yet"
    elif str(champ.version) == str(version):
        promoted, reason = True, "already champion"
    elif score is None:
        promoted, reason = False, "the new version has no score"
    elif champ_score is None:
        promoted, reason = True, "the champion has no score"
    elif metric and champ_metric and metric != champ_metric:
        promoted, reason = False, f"scored on {metric}, the champion on {champ_metric}: not comparable"
    else:
        gain = (score - champ_score) if higher_is_better else (champ_score - score)
        promoted = gain > margin
        direction = "" if higher_is_better else ", lower is better"
        reason = f"score {score:.4f} vs champion {champ_score:.4f} (margin {margin}{direction})"
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
    client.set_model_version_tag(name, version, "bertscale.promotion", ("promoted: " if promoted else "kept: ") + reason)
    return Promotion(name, str(version), score, str(champ.version) if champ else None, champ_score, promoted, reason)


def find_version(name: str, tag: str, value: str) -> str | None:
    """The newest version of `name` whose tag `tag` equals `value`, or None (also when `name` is not registered):
    how a re-run finds what it registered before instead of registering it again."""
    matches = [int(v.version) for v in _client().search_model_versions(f"name='{name}'")
               if v.tags.get(tag) == value]
    return str(max(matches)) if matches else None


def resolve_model_uri(uri: str, dst: str | Path | None = None) -> Path:
    """Download the model behind `models:/name@alias` or `models:/name/version` and return its HF-format dir."""
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        raise BertscaleError(f"{uri!r} is not a registry URI (models:/name@alias or models:/name/version)")
    ref = uri.removeprefix("models:/")
    if "@" not in ref and "/" not in ref:
        raise BertscaleError(f"{uri!r}: give an alias or a version, e.g. models:/{ref}@champion")
    name, version = alias_version(uri).removeprefix("models:/").split("/", 1)  # an alias names a version now
    client = _client()
    try:
        client.get_model_version(name, version)
    except MlflowException as e:
        raise BertscaleError(f"{uri} not found in the registry at {_mlflow().get_tracking_uri()}: "
                             f"{e.message.splitlines()[0]}") from None
    from mlflow.artifacts import download_artifacts

    from bertscale.serving import hf_dir_of

    local = download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst) if dst else None)
    return hf_dir_of(Path(local))


def list_models() -> list[dict[str, Any]]:
    """Registered models with their aliases and latest version."""
    out = []
    for m in _client().search_registered_models():
        out.append({"name": m.name, "aliases": {a: str(v) for a, v in (m.aliases or {}).items()},
                    "latest": max((int(v.version) for v in m.latest_versions), default=None),
                    "description": m.description or ""})
    return out


def show_model(name: str) -> dict[str, Any]:
    """Every version of a registered model: aliases, score, source run, tags."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise BertscaleError(f"no registered model named {name!r}; see `bertscale models list`") from None
    by_version: dict[str, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    return {"name": name, "versions": [
        {"version": str(v.version), "aliases": sorted(by_version.get(str(v.version), [])), "run_id": v.run_id,
         "score": v.tags.get(SCORE_TAG), "tags": dict(v.tags), "source": v.source} for v in versions]}


def register_encoder(cfg: PipelineConfig, hf_dir: str | Path, metrics: Mapping[str, float], run_id: str,
                     fingerprint: str, lineage: Mapping[str, str]) -> dict[str, Any]:
    """Register a pretraining run's HF export as `<cfg.name>-encoder` and pass it through the promotion gate on
    `registry.encoder_metric` (a `...loss` is lower-is-better). The export is logged into the pretraining run
    itself. A version already registered for this training fingerprint is reused, so a re-run whose training
    stage was cached registers nothing new."""
    name = f"{cfg.name}-encoder"
    metric = cfg.registry.encoder_metric
    info: dict[str, Any] = {"name": name, "metric": metric}
    version = find_version(name, "bertscale.fingerprint", fingerprint)
    if version is not None:
        # Gated when it was registered; gating it again would move `challenger` back from a newer version.
        recorded = _client().get_model_version(name, version).tags
        return {**info, "version": version, "uri": f"models:/{name}/{version}", "registered_now": False,
                "score": float(recorded[SCORE_TAG]) if SCORE_TAG in recorded else None,
                "promotion": recorded.get("bertscale.promotion", "")}
    score = metrics.get(metric)
    if score is None:
        log.warning("pretraining logged no %s (no held-out set?); %s is registered without a score and becomes "
                    "champion only if there is none", metric, name)
    tags = {**lineage, "bertscale.fingerprint": fingerprint, "bertscale.pretrain_run_id": run_id,
            SCORE_METRIC_TAG: metric}
    with stage_run(cfg, "pretrain", run_id=run_id):
        version = register_model(hf_dir, name, score=score, tags=tags)
    gate = promote(name, version, cfg.registry.encoder_margin, higher_is_better=not metric.endswith("loss"))
    return {**info, "version": version, "uri": f"models:/{name}/{version}", "registered_now": True,
            "score": gate.score, "promotion": ("promoted: " if gate.promoted else "kept: ") + gate.reason}


# ----------------------------------------------------------------------------------------------------------------
# Aliases pinned to versions
# ----------------------------------------------------------------------------------------------------------------
def alias_version(uri: str) -> str:
    """`models:/name@alias` as the version the alias names now, `models:/name/N` (a version URI comes back as
    is): what a run records and a stage cache key covers, so that a moved alias is a new input. A model or an
    alias that does not exist is one line naming the model's aliases."""
    from mlflow.exceptions import MlflowException

    ref = uri.removeprefix("models:/")
    if not uri.startswith("models:/") or not ("@" in ref or "/" in ref):
        raise BertscaleError(f"{uri!r} is not a registry URI: give models:/name@alias or models:/name/version")
    if "@" not in ref:
        return uri
    name, alias = ref.split("@", 1)
    try:
        aliases = {a: str(v) for a, v in (_client().get_registered_model(name).aliases or {}).items()}
    except MlflowException:
        raise BertscaleError(f"{uri}: no registered model named {name!r} in the registry at "
                             f"{_mlflow().get_tracking_uri()}; see `bertscale models list`") from None
    if alias not in aliases:
        have = ", ".join(f"{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
        raise BertscaleError(f"{uri}: model {name!r} has no alias {alias!r}; its aliases: {have}")
    return f"models:/{name}/{aliases[alias]}"
