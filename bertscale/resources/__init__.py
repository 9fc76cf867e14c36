"""Data files the package reads at run time, shipped inside it so that an installed wheel finds them:
`deepspeed/zero<stage>.json` (the base DeepSpeed config of each ZeRO stage) and `deploy/` (the SLURM and
Kubernetes job templates `bertscale submit` renders). The repository's `configs/deepspeed` and `deploy/{slurm,k8s}`
templates are links to these files, for reading and copying."""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def resource(relative: str) -> Traversable:
    """A file shipped in this folder, e.g. `resource("deepspeed/zero2.json")`."""
    return files(__name__).joinpath(*relative.split("/"))
