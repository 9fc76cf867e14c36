"""Prefect flow for the pretraining data: tokenized, MLM/NSP instances in memory-mapped shards."""

from __future__ import annotations

from prefect import flow, task

from bertscale import tracking
from bertscale.config import PipelineConfig
from bertscale.data import build_pretraining_data
from pipelines import runtime


def data_tracked(cfg: PipelineConfig, corpus: str | None = None, tokenizer: str | None = None,
                 tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> dict:
    """Build the instances in their MLflow run (`tracking.track_stage`); publish the instance stats."""
    result, run_id = tracking.track_stage(
        cfg, "data", lambda: build_pretraining_data(cfg, corpus=corpus, tokenizer=tokenizer),
        tags={**runtime.prefect_tags(), **(tags or {})}, parent_run_id=parent_run_id)
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
