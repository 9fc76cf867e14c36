"""Prefect flow for the corpus stage: Beam cleaning, dedup and sharding, tracked in MLflow."""

from __future__ import annotations

from prefect import flow, task

from bertscale import tracking
from bertscale.config import PipelineConfig
from bertscale.corpus import run_corpus
from pipelines import runtime


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
                inputs: list[str] | None = None) -> dict:
    """Clean, filter, deduplicate and shard raw text. `inputs` overrides corpus.inputs."""
    cfg = runtime.load(config, overrides, {"corpus": {"inputs": inputs}} if inputs else None)
    return corpus_task(cfg)


if __name__ == "__main__":
    import sys

    corpus_flow(config=sys.argv[1] if len(sys.argv) > 1 else None, overrides=sys.argv[2:])
