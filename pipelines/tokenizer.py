"""Prefect flow for tokenizer training: WordPiece in the HF layout, tracked in MLflow."""

from __future__ import annotations

from prefect import flow, task

from bertscale import tracking
from bertscale.config import PipelineConfig
from bertscale.tokenizer import train_tokenizer
from pipelines import runtime


def tokenizer_tracked(cfg: PipelineConfig, corpus: str | None = None, tags: dict[str, str] | None = None,
                      parent_run_id: str | None = None) -> dict:
    """Train (or import) the tokenizer in its MLflow run (`tracking.track_stage`); publish its stats."""
    result, run_id = tracking.track_stage(cfg, "tokenizer", lambda: train_tokenizer(cfg, corpus=corpus),
                                          tags={**runtime.prefect_tags(), **(tags or {})}, parent_run_id=parent_run_id)
    runtime.markdown("tokenizer-summary", runtime.counts_markdown(
        "Tokenizer", {"vocab_size": result.vocab_size, "fingerprint": result.fingerprint[:16], **result.stats}))
    # `vocab_fingerprint` too: in the pipeline, `fingerprint` is replaced by the stage output's fingerprint.
    return {"output_dir": str(result.output_dir), "fingerprint": result.fingerprint,
            "vocab_fingerprint": result.fingerprint,
            "vocab_size": result.vocab_size, "stats": result.stats, "mlflow_run_id": run_id}


tokenizer_task = task(name="tokenizer", retries=1, retry_delay_seconds=10, retry_condition_fn=runtime.retry_transient)(
    tokenizer_tracked
)


@flow(name="bertscale-tokenizer", log_prints=True)
def tokenizer_flow(config: str | None = None, overrides: list[str] | None = None, corpus: str | None = None) -> dict:
    """Train a WordPiece vocabulary on the corpus stage's shards (or any parquet/txt input)."""
    return tokenizer_task(runtime.load(config, overrides), corpus=corpus)


if __name__ == "__main__":
    import sys

    tokenizer_flow(config=sys.argv[1] if len(sys.argv) > 1 else None, overrides=sys.argv[2:])
