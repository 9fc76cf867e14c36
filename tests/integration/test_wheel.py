"""An installed wheel works outside the source tree: built with `pip wheel`, installed into a fresh venv (its
dependencies seen through a .pth file pointing at this environment's site-packages), run from another directory.
The DeepSpeed base configs and job templates it needs ship as package data; `bertscale pretrain` launches ranks
from the installed package on the debug config, and rank 0 logs into the MLflow run the command line opened."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def test_installed_wheel_pretrains_on_the_debug_data(tmp_path, sample_corpus):
    dist, venv, work, src = tmp_path / "dist", tmp_path / "venv", tmp_path / "work", tmp_path / "src"
    # Built from a copy of the sources: setuptools' build/ in the tree could hold files deleted since.
    for name in ("bertscale", "pipelines"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w",
          str(dist)], tmp_path)
    wheel = next(dist.glob("bertscale-*.whl"))
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], tmp_path)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path).stdout.strip())
    (site / "bertscale-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = _run([str(python), "-c", "import bertscale, pipelines; print(bertscale.__file__)"], tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(site)

    bertscale = str(venv / "bin" / "bertscale")
    common = ["--config", str(REPO / "configs" / "debug.yaml"), "--workdir", str(work),
              "--set", f"corpus.inputs=[{sample_corpus / 'inaugural'}]"]
    for stage in ("corpus", "tokenizer", "data"):
        _run([bertscale, stage, "--no-tracking", *common], tmp_path)
    _run([bertscale, "pretrain", "--set", "train.max_steps=10", *common], tmp_path)
    assert (work / "train" / "hf" / "model.safetensors").is_file()
    assert (work / "train" / "hf" / "vocab.txt").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(work / 'mlflow.db').resolve()}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "pretrain" and run.info.status == "FINISHED"
    assert "train/loss" in run.data.metrics and run.data.metrics["pretrain.final_step"] == 10
    assert run.data.params["train.max_steps"] == "10"
