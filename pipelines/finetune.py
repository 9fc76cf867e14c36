"""Prefect flow for fine-tuning: GLUE and custom tasks of every kind (classification, regression, NER, question
answering), fanned out as Prefect tasks over tasks, tracked in MLflow."""

from __future__ import annotations

from prefect import flow, task

from bertscale.config import PipelineConfig
from bertscale.finetune import run_finetune
from pipelines import runtime


def finetune_tracked(cfg: PipelineConfig, checkpoint: str | None = None, tags: dict[str, str] | None = None,
                     parent_run_id: str | None = None, tokenizer: str | None = None) -> dict:
    """Run the fine-tuning suite (it logs its own parent run, nested runs per task/seed, and registers models)."""
    result = run_finetune(cfg, checkpoint=checkpoint, tokenizer=tokenizer,
                          tags={**runtime.prefect_tags(), **(tags or {})}, parent_run_id=parent_run_id)
    runtime.markdown("finetune-results", "## Fine-tuning results\n\n" + result.table(), "Dev-set results")
    return result.to_dict()


finetune_task = task(name="finetune", retries=1, retry_delay_seconds=10, retry_condition_fn=runtime.retry_transient)(
    finetune_tracked
)


@task(name="finetune-task")
def _one_task(cfg: PipelineConfig, name: str, checkpoint: str | None, tokenizer: str | None) -> dict:
    section = cfg.finetune.model_copy(update={"tasks": [name], "output": str(cfg.stage_dir("finetune") / name)})
    return finetune_tracked(cfg.model_copy(update={"finetune": section}), checkpoint, tokenizer=tokenizer)


@flow(name="bertscale-finetune", log_prints=True)
def finetune_flow(config: str | None = None, overrides: list[str] | None = None, checkpoint: str | None = None,
                  tokenizer: str | None = None) -> dict[str, dict]:
    """Fine-tune on every configured task, one Prefect task per task running concurrently."""
    cfg = runtime.load(config, overrides)
    futures = {name: _one_task.submit(cfg, name, checkpoint, tokenizer) for name in cfg.finetune.tasks}
    return {name: f.result() for name, f in futures.items()}


if __name__ == "__main__":
    import sys

    finetune_flow(config=sys.argv[1] if len(sys.argv) > 1 else None, overrides=sys.argv[2:])
