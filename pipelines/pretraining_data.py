"""Prefect flow for the pretraining data: tokenized, MLM/NSP instances in memory-mapped shards."""

from __future__ import annotations

from prefect import flow, task

from bertscale import tracking
from bertscale.config import PipelineConfig
from bertscale.data import build_pretraining_data
from pipelines import runtime


def data_tracked(cfg: PipelineConfig, corpus: str | None = None, tokenizer: str | None = None,
              tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> dict:
    """Build the instances; log the instance stats as metrics and the manifest as an artifact."""
    with tracking.stage_run(cfg, "data", tags={**runtime.prefect_tags(), **(tags or {})},
                            parent_run_id=parent_run_id) as run_id:
        result = build_pretraining_data(cfg, corpus=corpus, tokenizer=tokenizer)
        tracking.log_config(cfg, "data")
        numeric = {k: v for k, v in result.stats.items() if isinstance(v, (int, float))}
        tracking.log_metrics({f"data.{k}": v for k, v in numeric.items()})
        tracking.log_json(result.manifest, "manifest.json")
    runtime.markdown("pretraining-data-summary", runtime.counts_markdown("Pretraining data", result.stats))
    return {"output_dir": str(result.output_dir), "stats": result.stats, "mlflow_run_id": run_id}


data_task = task(name="pretraining-data", retries=1, retry_delay_seconds=10, retry_condition_fn=runtime.retry_transient)(
    data_tracked
)


@flow(name="bertscale-pretraining-data", log_prints=True)
def data_flow(config: str | None = None, overrides: list[str] | None = None, corpus: str | None = None,
              tokenizer: str | None = None) -> dict:
    """Tokenize the corpus and build MLM/NSP instances for every sequence-length phase."""
    return data_task(runtime.load(config, overrides), corpus=corpus, tokenizer=tokenizer)


if __name__ == "__main__":
    import sys

    data_flow(config=sys.argv[1] if len(sys.argv) > 1 else None, overrides=sys.argv[2:])
