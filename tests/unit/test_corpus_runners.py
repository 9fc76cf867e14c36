"""Runner choice and code shipping for the corpus stage: names, options, and what remote workers receive."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from bertscale.config import RunnerConfig
from bertscale.corpus import runners
from bertscale.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["DaskRunner", "dask", runners.DASK_RUNNER])
def test_the_dask_runner_is_known_by_name_with_its_options(name):
    cfg = RunnerConfig(runner=name, pipeline_options=["--dask_client_address=tcp://127.0.0.1:8786"])
    runners.validate_runner(cfg)
    options = runners.beam_options(cfg).get_all_options(drop_default=True)
    assert options["runner"] == runners.BOUNDED_DASK_RUNNER and options["address"] == "tcp://127.0.0.1:8786"
    assert options["npartitions"] == runners.DASK_PARTITIONS  # units spread over the workers
    assert runners.shipping_flags(cfg) == []  # Dask workers get the code through ship_code instead


def test_unknown_options_and_runners_are_config_errors():
    with pytest.raises(ConfigError, match="unknown Beam option.*--dask_client_adress"):
        runners.validate_runner(RunnerConfig(runner="DaskRunner", pipeline_options=["--dask_client_adress=x"]))
    with pytest.raises(ConfigError, match="did you mean DaskRunner"):
        runners.validate_runner(RunnerConfig(runner="DaskRuner"))


def test_a_remote_runner_gets_this_source_tree_as_its_setup_file():
    cfg = RunnerConfig(runner="DataflowRunner", pipeline_options=["--project=p"])
    assert runners.shipping_flags(cfg) == [f"--setup_file={REPO / 'setup.py'}"]
    assert runners.shipping_flags(RunnerConfig(runner="DirectRunner")) == []


def test_explicit_shipping_replaces_the_automatic_setup_file(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("bertscale==0.1.0\n")
    cfg = RunnerConfig(runner="FlinkRunner", requirements_file=str(req))
    assert runners.shipping_flags(cfg) == [f"--requirements_file={req}"]
    image = RunnerConfig(runner="SparkRunner", sdk_container_image="registry/bertscale-beam:0.1.0")
    assert runners.shipping_flags(image) == ["--sdk_container_image=registry/bertscale-beam:0.1.0"]
    given = RunnerConfig(runner="DataflowRunner", pipeline_options=["--setup_file=/elsewhere/setup.py"])
    assert runners.shipping_flags(given) == []
    with pytest.raises(ConfigError, match="requirements_file='nope.txt' does not exist"):
        runners.validate_runner(RunnerConfig(runner="FlinkRunner", requirements_file="nope.txt"))


def test_beams_stager_builds_the_package_remote_workers_install(tmp_path):
    """What a portable runner uploads for --setup_file: an sdist of bertscale with the corpus stage in it."""
    from apache_beam.runners.portability.stager import Stager

    options = runners.beam_options(RunnerConfig(runner="DataflowRunner", pipeline_options=["--project=p"]))
    resources = Stager.create_job_resources(options, str(tmp_path), log_submission_env_dependencies=False)
    assert any(b"workflow.tar.gz" in r.role_payload for r in resources)  # staged as the workflow package
    (built,) = tmp_path.glob("bertscale-*.tar.gz")
    with tarfile.open(built) as sdist:
        names = sdist.getnames()
    assert any(n.endswith("bertscale/corpus/pipeline.py") for n in names)
    assert any(n.endswith("bertscale/corpus/runners.py") for n in names)
