"""Prefect flow for pretraining: launches the DeepSpeed job as a subprocess, streams its log, links the MLflow run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task

from bertscale import tracking
from bertscale.config import PipelineConfig, dump_config
from bertscale.errors import BertscaleError
from bertscale.train.launch import output_lines
from pipelines import runtime


def _launch_command(config_file: Path, data: str | None, tokenizer: str | None, launcher: str) -> list[str]:
    cmd = [sys.executable, "-m", "bertscale", "pretrain", "--config", str(config_file), "--launcher", launcher]
    if data:
        cmd += ["--data", data]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    return cmd


def pretrain_tracked(cfg: PipelineConfig, data: str | None = None, tokenizer: str | None = None,
                  tags: dict[str, str] | None = None, parent_run_id: str | None = None,
                  launcher: str = "deepspeed") -> dict:
    """Run `bertscale pretrain` in a subprocess (it starts the ranks); rank 0 logs into the run created here."""
    logger = get_run_logger()
    out = cfg.stage_dir("train")
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "pipeline-config.yaml"
    config_file.write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False))
    run_id = tracking.create_run(cfg, "pretrain", tags={**runtime.prefect_tags(), **(tags or {})},
                                 parent_run_id=parent_run_id)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if run_id:
        env["BERTSCALE_MLFLOW_RUN_ID"] = run_id
    cmd = _launch_command(config_file, data, tokenizer, launcher)
    logger.info("launching: %s", " ".join(cmd))
    # Binary, so the progress bar's carriage returns survive to `output_lines`, which drops its redraws.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in output_lines(proc.stdout):
        logger.info(line)
        tail = (tail + [line])[-20:]
    code = proc.wait()
    tracking.end_run(run_id, "FINISHED" if code == 0 else "FAILED")
    if code != 0:
        raise BertscaleError(f"pretraining exited with code {code}; last lines:\n" + "\n".join(tail))
    metrics = tracking.run_data(run_id)[0] if run_id else {}
    hf_dir = out / "hf"
    runtime.markdown("pretrain-summary", runtime.counts_markdown(
        "Pretraining", {k: round(v, 4) for k, v in sorted(metrics.items()) if not k.startswith("system")}))
    return {"output_dir": str(out), "hf_dir": str(hf_dir), "metrics": metrics, "mlflow_run_id": run_id}


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
