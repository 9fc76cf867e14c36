"""For Beam's `--setup_file`: remote Beam workers (Dataflow, Flink, Spark) build and install bertscale from this
source tree with `python setup.py sdist`. All metadata lives in pyproject.toml."""

from setuptools import setup

setup()
