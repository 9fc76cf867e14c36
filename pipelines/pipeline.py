"""The whole pipeline as one Prefect flow: corpus -> tokenizer -> pretraining data -> pretraining -> GLUE
fine-tuning -> registration and promotion, described by one config file.

Every stage output is content-addressed (`bertscale.lineage`): `<workdir>/<stage>/<fingerprint>/`, with the
fingerprint covering the upstream fingerprints (or the raw input files: the corpus, the fine-tuning task files),
the stage's config sections and its code. Prefect caches each stage on that key, and the completion marker backs
the cache up, so a re-run skips finished stages; a changed config re-runs that stage and everything after it; a
failed stage leaves no marker and is never reused. After training, the encoder is registered as `<name>-encoder`
and gated, once per training fingerprint; fine-tuning registers and gates each task's model.

A run holds the workdir's lock (`bertscale.workdir_lock`) from start to end, so two runs never write the same
stage directory: a second run waits, or with `if_busy="skip"` (what schedules use) ends Cancelled at once,
saying who holds the workdir. `train.init_from=models:/name@alias` is pinned to the alias's current version once
the lock is held, so the train stage re-runs when the alias has moved since it last ran, and only then.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.exceptions import MissingContextError
from prefect.states import Cancelled, State

from bertscale import lineage, tracking, workdir_lock
from bertscale.config import PipelineConfig
from bertscale.errors import ConfigError
from pipelines import runtime

STAGES = ["corpus", "tokenizer", "data", "train", "finetune"]


def _stage_function(stage: str) -> Callable[..., dict]:
    # Imported on use so that a pipeline restricted to early stages does not import the later ones.
    if stage == "corpus":
        from pipelines.corpus import corpus_tracked as fn
    elif stage == "tokenizer":
        from pipelines.tokenizer import tokenizer_tracked as fn
    elif stage == "data":
        from pipelines.pretraining_data import data_tracked as fn
    elif stage == "train":
        from pipelines.pretrain import pretrain_tracked as fn
    else:
        from pipelines.finetune import finetune_tracked as fn
    return fn


def _with_output(cfg: PipelineConfig, stage: str, path: Path) -> PipelineConfig:
    section = getattr(cfg, stage).model_copy(update={"output": str(path)})
    return cfg.model_copy(update={stage: section})


def _cache_key(context: Any, parameters: dict[str, Any]) -> str:
    # The output path is part of the key: the same fingerprint in another workdir is another output.
    return f"bertscale-{parameters['stage']}-{parameters['fingerprint']}-{lineage._sha256(parameters['output'])[:12]}"


@task(name="stage", cache_key_fn=_cache_key, persist_result=True, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=runtime.retry_transient)
def run_stage(stage: str, fingerprint: str, output: str, cfg: PipelineConfig, kwargs: dict[str, Any],
              tags: dict[str, str], parent_run_id: str | None) -> dict:
    """Run one stage into its content-addressed output, unless that output is already complete."""
    logger = get_run_logger()
    out = lineage.StageOutput(stage, fingerprint, Path(output))
    done = out.completed()
    if done is not None:
        logger.info("%s: reusing complete output %s", stage, out.path)
        return {**done, "reused": True}
    # Training resumes from its own checkpoints; any other stage starts from an empty directory.
    if stage != "train":
        out.prepare()
    out.path.mkdir(parents=True, exist_ok=True)
    result = _stage_function(stage)(_with_output(cfg, stage, out.path), tags=tags, parent_run_id=parent_run_id,
                                    **kwargs)
    result = {**result, "fingerprint": fingerprint}
    out.complete(result)
    return {**result, "reused": False}


def _submit(cfg: PipelineConfig, stage: str, upstream: list[str], kwargs: dict[str, Any],
            lineage_tags: dict[str, str], parent_run_id: str | None, extra: Any = None) -> dict:
    fingerprint = lineage.stage_fingerprint(cfg, stage, upstream, extra)
    out = lineage.StageOutput.for_stage(cfg.workdir, stage, fingerprint)
    refresh = out.completed() is None
    tags = {**runtime.prefect_tags(), **lineage_tags, "bertscale.fingerprint": fingerprint}
    stage_task = run_stage.with_options(name=stage, refresh_cache=refresh)
    result = stage_task(stage, fingerprint, str(out.path.resolve()), cfg, kwargs, tags, parent_run_id)
    # A complete output is reused whether Prefect's cache or the marker answered (a cached result still carries
    # the `reused` flag of the run that produced it).
    return {**result, "reused": not refresh}


def _logger() -> logging.Logger | logging.LoggerAdapter:
    # The flow run's logger, so that the line shows in Prefect's UI; the module's outside a flow run.
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _run_name() -> str:
    tags = runtime.prefect_tags()
    if "prefect.flow_run_name" in tags:
        return f"flow run {tags['prefect.flow_run_name']!r} ({tags['prefect.flow_run_id']})"
    return f"pipeline pid {os.getpid()}"


def run_pipeline(cfg: PipelineConfig, until: str = "finetune", wait_s: float | None = None) -> dict[str, dict]:
    """Run the chain up to and including `until` inside a parent MLflow run; returns each stage's result.

    Holds the workdir's lock throughout; if another run holds it, waits `wait_s` seconds for it (None: until it
    ends), then raises `WorkdirBusy`."""
    if until not in STAGES:
        raise ConfigError(f"unknown stage {until!r}: choose one of {', '.join(STAGES)}")
    with workdir_lock.hold(cfg.workdir, wait_s=wait_s, by=_run_name(), on_wait=_logger().info):
        alias = cfg.train.init_from
        if STAGES.index(until) >= STAGES.index("train") and lineage.is_registry_alias(alias):
            cfg = lineage.pin_init_from(cfg)
            _logger().info("train.init_from=%s is %s now", alias, cfg.train.init_from)
        # The fine-tuning tasks' dev/test text is kept out of the corpus; the corpus fingerprint covers those files.
        from pipelines.corpus import with_task_eval_files

        return _run_chain(with_task_eval_files(cfg), until)


def _run_chain(cfg: PipelineConfig, until: str) -> dict[str, dict]:
    wanted = STAGES[: STAGES.index(until) + 1]
    results: dict[str, dict] = {}
    with tracking.stage_run(cfg, "pipeline", tags={**runtime.prefect_tags(), "bertscale.pipeline": cfg.name}) as parent:
        tracking.log_config(cfg)
        corpus = _submit(cfg, "corpus", [lineage.input_fingerprint(cfg.corpus.inputs)], {}, {}, parent)
        results["corpus"] = corpus
        tags = {"bertscale.corpus_manifest_sha256": corpus["manifest_sha256"]}
        if "tokenizer" in wanted:
            extra = lineage.input_fingerprint([cfg.tokenizer.pretrained]) if cfg.tokenizer.pretrained else None
            tok = _submit(cfg, "tokenizer", [corpus["fingerprint"]], {"corpus": corpus["output_dir"]}, tags,
                          parent, extra)
            results["tokenizer"] = tok
            # Two different hashes, two names: the vocabulary's content hash, and the stage output's fingerprint.
            tags = {**tags, "bertscale.tokenizer_fingerprint": tok["vocab_fingerprint"],
                    "bertscale.tokenizer_stage_fingerprint": tok["fingerprint"]}
        if "data" in wanted:
            data = _submit(cfg, "data", [corpus["fingerprint"], tok["fingerprint"]],
                           {"corpus": corpus["output_dir"], "tokenizer": tok["output_dir"]}, tags, parent)
            results["data"] = data
        if "train" in wanted:
            train = _submit(cfg, "train", [data["fingerprint"], tok["fingerprint"]],
                            {"data": data["output_dir"], "tokenizer": tok["output_dir"]}, tags, parent)
            tags = {**tags, "bertscale.pretrain_run_id": str(train.get("mlflow_run_id"))}
            if cfg.registry.register_encoder and train.get("mlflow_run_id"):
                train = {**train, "encoder": tracking.register_encoder(
                    cfg, train["hf_dir"], train.get("metrics") or {}, train["mlflow_run_id"], train["fingerprint"],
                    tags)}
            results["train"] = train
        if "finetune" in wanted:
            results["finetune"] = _submit(cfg, "finetune", [train["fingerprint"]],
                                          {"checkpoint": train["hf_dir"]}, tags, parent,
                                          lineage.task_inputs_fingerprint(cfg))
        tracking.set_tags({f"bertscale.{k}.reused": str(v.get("reused")) for k, v in results.items()})
    _report(cfg, results)
    return results


def _report(cfg: PipelineConfig, results: dict[str, dict]) -> None:
    rows = [{"stage": s, "reused": r.get("reused"), "output": r.get("output_dir"),
             "fingerprint": str(r.get("fingerprint", ""))[:16]} for s, r in results.items()]
    runtime.table("pipeline-stages", rows, "Stages of this pipeline run: reused (cached) or run")
    log = logging.getLogger(__name__)
    for row in rows:
        log.info("%-10s %-6s %s", row["stage"], "cached" if row["reused"] else "ran", row["output"])


def print_where_to_look(cfg: PipelineConfig, results: dict[str, dict]) -> None:
    """The end of the main job: what ran, where the outputs are, and how to look at them."""
    print("\nbertscale pipeline finished:")
    for stage, r in results.items():
        print(f"  {stage:<10} {'reused' if r.get('reused') else 'ran   '}  {r.get('output_dir')}")
    encoder = (results.get("train") or {}).get("encoder")
    if encoder:
        print(f"\nencoder: {encoder['uri']} ({encoder['promotion']}); fine-tune it with "
              f"--checkpoint models:/{encoder['name']}@champion")
    finetune = results.get("finetune")
    if finetune:
        print("\nFine-tuning results (dev):")
        print(finetune.get("table", ""))
        for name, version in (finetune.get("registered") or {}).items():
            print(f"  registered model: models:/{name}/{version}")
    if cfg.tracking.enabled:
        print(f"\nMLflow UI:  mlflow ui --backend-store-uri {cfg.tracking_uri()}   (then open http://127.0.0.1:5000)")


@flow(name="bertscale-pipeline", log_prints=True)
def pipeline_flow(config: str | None = None, overrides: list[str] | None = None, until: str = "finetune",
                  if_busy: Literal["wait", "skip"] = "wait") -> dict[str, dict] | State:
    """Corpus -> tokenizer -> pretraining data -> pretraining -> fine-tuning, cached per stage fingerprint.

    `if_busy`: when another run holds the workdir, wait for it to end, or skip this run (it ends Cancelled with
    a message naming the holder; a schedule's next firing picks up whatever changed)."""
    cfg = runtime.load(config, overrides)
    try:
        return run_pipeline(cfg, until, wait_s=None if if_busy == "wait" else 0)
    except workdir_lock.WorkdirBusy as e:
        message = f"skipped: {e}"
        _logger().warning(message)
        return Cancelled(message=message)


if __name__ == "__main__":
    import sys

    pipeline_flow(config=sys.argv[1] if len(sys.argv) > 1 else None, overrides=sys.argv[2:])
