"""One owner per outside system and per data file: MLflow only in `bertscale.tracking` (and in
`bertscale.serving`, the pyfunc model that MLflow itself loads), Prefect only in
`pipelines/` (the command line loads it only for `bertscale pipeline`), and the package's data files inside the
package, with the repository's `configs/` and `deploy/` copies identical to them."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def _sources() -> list[Path]:
    return sorted([*(REPO / "bertscale").rglob("*.py"), *(REPO / "pipelines").rglob("*.py")])


def test_only_tracking_and_the_mlflow_model_import_mlflow():
    importers = [p.relative_to(REPO).as_posix() for p in _sources() if "mlflow" in _imports(p)]
    assert importers == ["bertscale/serving.py", "bertscale/tracking.py"]  # resources/mlflow_model.py: via serving


def test_prefect_stays_in_pipelines_and_the_cli_loads_it_only_on_use():
    importers = {p.relative_to(REPO).as_posix() for p in _sources() if "prefect" in _imports(p)}
    assert importers and all(p.startswith("pipelines/") for p in importers)
    assert not {"prefect", "pipelines"} & _imports(REPO / "bertscale" / "cli.py", top_level_only=True)


@pytest.mark.parametrize("name", [f"deepspeed/zero{s}.json" for s in range(4)])
def test_deepspeed_templates_ship_in_the_package_and_configs_matches(name):
    from bertscale.resources import resource
    from bertscale.train.deepspeed_engine import base_ds_config

    shipped = resource(name)
    assert shipped.is_file()
    assert (REPO / "configs" / name).read_text() == shipped.read_text()
    stage = int(name[-6])
    assert base_ds_config(stage) == json.loads(shipped.read_text())
    assert base_ds_config(stage)["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("name", ["slurm/pretrain.sbatch", "k8s/pretrain-job.yaml"])
def test_job_templates_ship_in_the_package_and_deploy_matches(name):
    from bertscale.resources import resource

    shipped = resource(f"deploy/{name}")
    assert shipped.is_file()
    assert (REPO / "deploy" / name).read_text() == shipped.read_text()
