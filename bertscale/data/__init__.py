"""Pretraining data: instances (NSP pairs or packed), memory-mapped shards, dynamic masking, a resumable loader.

The names below load on first use: the data-building processes import only what they need (no torch, which
costs every worker ~200 MB and a second of start-up), while `from bertscale.data import MLMCollator` still works.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DataResult": "bertscale.data.build",
    "build_pretraining_data": "bertscale.data.build",
    "PretrainingDataset": "bertscale.data.dataset",
    "read_manifest": "bertscale.data.dataset",
    "Instances": "bertscale.data.instances",
    "TokenizedDocs": "bertscale.data.instances",
    "create_nsp_instances": "bertscale.data.instances",
    "create_packed_instances": "bertscale.data.instances",
    "split_long_sentences": "bertscale.data.instances",
    "truncate_pair": "bertscale.data.instances",
    "DistributedLoader": "bertscale.data.loader",
    "MLMCollator": "bertscale.data.masking",
    "continuation_lookup": "bertscale.data.masking",
}
__all__ = [
    "DataResult",
    "DistributedLoader",
    "Instances",
    "MLMCollator",
    "PretrainingDataset",
    "TokenizedDocs",
    "build_pretraining_data",
    "continuation_lookup",
    "create_nsp_instances",
    "create_packed_instances",
    "read_manifest",
    "split_long_sentences",
    "truncate_pair",
]

if TYPE_CHECKING:
    from bertscale.data.build import DataResult, build_pretraining_data
    from bertscale.data.dataset import PretrainingDataset, read_manifest
    from bertscale.data.instances import (
        Instances,
        TokenizedDocs,
        create_nsp_instances,
        create_packed_instances,
        split_long_sentences,
        truncate_pair,
    )
    from bertscale.data.loader import DistributedLoader
    from bertscale.data.masking import MLMCollator, continuation_lookup


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bertscale.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
