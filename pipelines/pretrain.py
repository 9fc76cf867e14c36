"""Prefect flow for pretraining: the one launch path (`bertscale.train.launch`) inside the stage's MLflow run,
the ranks' output streamed to the flow's log."""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger, task

from bertscale import tracking
from bertscale.config import PipelineConfig
from bertscale.train.launch import LaunchSpec, check_inputs, launch_pretraining
from pipelines import runtime


def pretrain_tracked(cfg: PipelineConfig, data: str | None = None, tokenizer: str | None = None,
                     tags: dict[str, str] | None = None, parent_run_id: str | None = None,
                     launcher: str = "deepspeed") -> dict:
    """Launch the ranks (`cfg.train.num_procs` on this node) in the stage's MLflow run; rank 0 logs into it."""
    logger = get_run_logger()
    spec = LaunchSpec(launcher=launcher, num_procs=cfg.train.num_procs)
    check_inputs(cfg, data, tokenizer)
    result, run_id = tracking.track_stage(
        cfg, "pretrain", lambda: launch_pretraining(cfg, spec, data, tokenizer, output=logger.info),
        tags={**runtime.prefect_tags(), **(tags or {})}, parent_run_id=parent_run_id)
    metrics = tracking.run_data(run_id)[0] if run_id else {}
    runtime.markdown("pretrain-summary", runtime.counts_markdown(
        "Pretraining", {k: round(v, 4) for k, v in sorted(metrics.items()) if not k.startswith("system")}))
    return {"output_dir": str(result.output_dir), "hf_dir": str(result.output_dir / "hf"), "metrics": metrics,
            "mlflow_run_id": run_id, "stopped": result.stopped, "final_step": result.final_step}


pretrain_task = task(name="pretrain", retries=1, retry_delay_seconds=10, retry_condition_fn=runtime.retry_transient)(
    pretrain_tracked
)


@flow(name="bertscale-pretrain", log_prints=True)
def pretrain_flow(config: str | None = None, overrides: list[str] | None = None, data: str | None = None,
                  tokenizer: str | None = None, launcher: str = "deepspeed") -> dict:
    """Pretrain BERT with DeepSpeed ZeRO on the pretraining data."""
    return pretrain_task(runtime.load(config, overrides), data=data, tokenizer=tokenizer, launcher=launcher)


if __name__ == "__main__":
    pretrain_flow(config=sys.argv[1] if len(sys.argv) > 1 else None, overrides=sys.argv[2:])
