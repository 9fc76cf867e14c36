"""What every flow needs: config loading, the Prefect run's identity for MLflow tags, and Prefect artifacts."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from bertscale.config import PipelineConfig, load_config


def load(config: str | None, overrides: Sequence[str] | None = None, extra: dict | None = None) -> PipelineConfig:
    """The same precedence as the CLI: defaults < file < extra < `key=value` overrides."""
    return load_config(config, list(overrides or []), extra)


def prefect_tags() -> dict[str, str]:
    """Tags linking an MLflow run to the Prefect flow run that produced it (empty outside a flow run)."""
    from prefect.runtime import deployment, flow_run

    tags: dict[str, str] = {}
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)
        tags["prefect.flow_run_name"] = str(flow_run.name)
        tags["prefect.flow_name"] = str(flow_run.flow_name)
    if deployment.id:
        tags["prefect.deployment_id"] = str(deployment.id)
    return tags


def _artifact_key(key: str) -> str:
    # Prefect artifact keys allow only lowercase letters, digits and dashes.
    return re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")


def markdown(key: str, text: str, description: str | None = None) -> None:
    """Publish a markdown artifact on the current flow run; never fails the flow for a reporting problem."""
    try:
        create_markdown_artifact(key=_artifact_key(key), markdown=text, description=description)
    except Exception as e:  # noqa: BLE001 - an artifact is a report, not a result
        logging.getLogger(__name__).warning("could not create Prefect artifact %s: %s", key, e)


def table(key: str, rows: Sequence[Mapping[str, Any]], description: str | None = None) -> None:
    try:
        create_table_artifact(key=_artifact_key(key), table=[dict(r) for r in rows], description=description)
    except Exception as e:  # noqa: BLE001
        logging.getLogger(__name__).warning("could not create Prefect artifact %s: %s", key, e)


def counts_markdown(title: str, counts: Mapping[str, Any]) -> str:
    lines = [f"## {title}", "", "| what | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    return "\n".join(lines)


def retry_transient(task, task_run, state) -> bool:
    """Retry a failed stage unless the failure is a user error (bad input or config): those fail fast."""
    from bertscale.errors import BertscaleError

    try:
        state.result()
    except BertscaleError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient (I/O, a lost worker, a port in use)
        return True
    return False
