"""Prefect flow for the corpus stage: Beam cleaning, decontamination, dedup and sharding, tracked in MLflow."""

from __future__ import annotations

from prefect import flow, task

from bertscale import lineage, tracking
from bertscale.config import PipelineConfig
from bertscale.corpus import run_corpus
from pipelines import runtime


def with_task_eval_files(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with the fine-tuning tasks' dev and test files (`lineage.task_eval_files`) added to
    corpus.decontamination.eval_files, unless decontamination is disabled: the corpus a pipeline pretrains on then
    never holds the text it is evaluated on. Fill it before fingerprinting the corpus stage, whose fingerprint
    covers these files' content."""
    d = cfg.corpus.decontamination
    if not d.enabled:
        return cfg
    listed = {(e.task, e.split, e.path) for e in d.eval_files}
    added = [e for e in lineage.task_eval_files(cfg) if (e.task, e.split, e.path) not in listed]
    if not added:
        return cfg
    corpus = cfg.corpus.model_copy(update={"decontamination": d.model_copy(
        update={"eval_files": [*d.eval_files, *added]})})
    return cfg.model_copy(update={"corpus": corpus})


def corpus_tracked(cfg: PipelineConfig, tags: dict[str, str] | None = None,
                   parent_run_id: str | None = None) -> dict:
    """Run the stage in its MLflow run (`tracking.track_stage`), and publish its counts on the flow run."""
    result, run_id = tracking.track_stage(cfg, "corpus", lambda: run_corpus(cfg),
                                          tags={**runtime.prefect_tags(), **(tags or {})}, parent_run_id=parent_run_id)
    runtime.markdown("corpus-summary", runtime.counts_markdown("Corpus", result.counts), "Corpus stage counts")
    return {"output_dir": str(result.output_dir), "manifest_sha256": result.manifest_sha256,
            "counts": result.counts, "mlflow_run_id": run_id}


corpus_task = task(name="corpus", retries=1, retry_delay_seconds=10, retry_condition_fn=runtime.retry_transient)(
    corpus_tracked
)


@flow(name="bertscale-corpus", log_prints=True)
def corpus_flow(config: str | None = None, overrides: list[str] | None = None,
                inputs: list[str] | None = None, decontaminate_tasks: bool = True) -> dict:
    """Clean, filter, decontaminate, deduplicate and shard raw text. `inputs` overrides corpus.inputs;
    `decontaminate_tasks` removes the text of the config's fine-tuning tasks' dev and test files."""
    cfg = runtime.load(config, overrides, {"corpus": {"inputs": inputs}} if inputs else None)
    return corpus_task(with_task_eval_files(cfg) if decontaminate_tasks else cfg)


if __name__ == "__main__":
    import sys

    corpus_flow(config=sys.argv[1] if len(sys.argv) > 1 else None, overrides=sys.argv[2:])
