"""Pretraining data: instances (NSP pairs or packed), memory-mapped shards, dynamic masking, a resumable loader."""

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
