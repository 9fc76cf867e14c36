"""Prefect flow for the corpus stage: Beam cleaning, dedup and sharding, tracked in MLflow."""

from __future__ import annotations

from prefect import flow, task

from bertscale import tracking
from bertscale.config import PipelineConfig, is_uri
from bertscale.corpus import run_corpus
from pipelines import runtime


def corpus_tracked(cfg: PipelineConfig, tags: dict[str, str] | None = None,
                   parent_run_id: str | None = None) -> dict:
    """Run the stage in an MLflow run: config as params, per-rule counts as metrics, the manifest as artifact."""
    with tracking.stage_run(cfg, "corpus", tags={**runtime.prefect_tags(), **(tags or {})},
                            parent_run_id=parent_run_id) as run_id:
        result = run_corpus(cfg)
        digest = result.manifest_sha256
        tracking.log_config(cfg, "corpus")
        tracking.log_metrics({f"corpus.{k}": v for k, v in result.counts.items()})
        if is_uri(str(result.output_dir)):
            # The manifest and quarantine stay in the object store; the run records where.
            tracking.set_tags({"bertscale.corpus_output": str(result.output_dir)})
        else:
            tracking.log_artifact(result.manifest_path)
            quarantine = result.output_dir / "quarantine.jsonl"
            if quarantine.exists():
                tracking.log_artifact(quarantine)
        tracking.set_tags({"bertscale.corpus_manifest_sha256": digest})
    runtime.markdown("corpus-summary", runtime.counts_markdown("Corpus", result.counts), "Corpus stage counts")
    return {"output_dir": str(result.output_dir), "manifest_sha256": digest, "counts": result.counts,
            "mlflow_run_id": run_id}


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
