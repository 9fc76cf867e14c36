"""Sequence-length phases: each phase's training loader and held-out set (BERT's 128 -> 512 schedule is two).

Which optimizer step belongs to which phase is `bertscale.train.schedule`'s pure arithmetic; this module builds
the datasets and loaders, checked against the model and tokenizer up front, with distinct masking streams per
rank and phase (the loaders' states carry them across resumes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertscale.config import PipelineConfig
from bertscale.data import DistributedLoader, MLMCollator, PretrainingDataset, continuation_lookup
from bertscale.tokenizer import special_ids
from bertscale.train import schedule
from bertscale.train.distributed import DistEnv

log = logging.getLogger(__name__)


@dataclass
class Phase:
    """One sequence-length phase: its training loader and held-out set."""

    seq_len: int
    start: int
    loader: Any  # bertscale.data.DistributedLoader
    heldout: Any | None  # bertscale.data.PretrainingDataset, or None when too small to split over the ranks
    batches: Iterator[dict] | None = None

    def next_batch(self) -> dict:
        if self.batches is None:
            self.batches = self.loader.forever()
        return next(self.batches)


def make_collator(cfg: PipelineConfig, tok: Any, special: dict[str, int], vocab: int, seed: int) -> MLMCollator:
    """The MLM/NSP collator of the data config (whole-word masking needs the tokenizer's continuation marks)."""
    lookup = continuation_lookup(tok) if cfg.data.whole_word_mask else None
    return MLMCollator(special, vocab, mask_prob=cfg.data.mask_prob, whole_word_mask=cfg.data.whole_word_mask,
                       seed=seed, is_continuation=lookup, document_attention=cfg.train.document_attention)


def load_phases(cfg: PipelineConfig, data_dir: Path, tok: Any, env: DistEnv, max_positions: int) -> list[Phase]:
    """Datasets and loaders for every phase in `data.seq_lengths`, checked against the model up front."""
    special, vocab = special_ids(tok), tok.get_vocab_size(with_added_tokens=True)
    starts = schedule.phase_boundaries(cfg.train.max_steps, cfg.train.phase_steps, len(cfg.data.seq_lengths))
    phases = []
    for i, (seq_len, start) in enumerate(zip(cfg.data.seq_lengths, starts)):
        train_set = PretrainingDataset(data_dir, seq_len, "train")
        train_set.check_compatible(vocab, max_positions, tokenizer=tok)
        # Distinct masking streams per rank and phase; the loader's state carries them across resumes.
        collator = make_collator(cfg, tok, special, vocab, seed=cfg.train.seed * 1000 + env.rank * 10 + i)
        loader = DistributedLoader(train_set, cfg.train.micro_batch_size, collator, env.rank, env.world_size,
                                   seed=cfg.train.seed + i, drop_last=True)
        heldout = PretrainingDataset(data_dir, seq_len, "heldout")
        if len(heldout) < env.world_size:
            log.warning("held-out split of seq%d has %d instances for %d ranks: evaluation disabled", seq_len,
                        len(heldout), env.world_size)
            heldout = None
        phases.append(Phase(seq_len, start, loader, heldout))
    return phases
