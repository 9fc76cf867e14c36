"""Checkpoints: save/resume of the whole training state, keep-last-K, stop signals, and HF export.

A checkpoint is one DeepSpeed tag directory `<dir>/step00000123/` holding DeepSpeed's files (model, optimizer
and scheduler states, ZeRO shards) plus ours: `trainer_state.json` (step, counters; rank 0),
`bert_config.json` (the architecture; rank 0) and `rank_{r}.pt` per rank (data-loader positions and the Python,
NumPy and torch RNG states, so dropout and masking continue exactly). Our files are written before DeepSpeed's
`latest` pointer moves, so a process killed mid-save leaves `latest` on the previous, complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from bertscale.errors import InputError
from bertscale.train import distributed
from bertscale.train.distributed import DistEnv

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step(\d{8})$")
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "bert_config.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves and finds checkpoints under one directory; every rank calls `save` and `load`."""

    def __init__(self, root: str | Path, keep: int, env: DistEnv) -> None:
        self.root, self.keep, self.env = Path(root), keep, env

    def tags(self) -> list[str]:
        """Complete-looking checkpoint tags, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and TAG_RE.match(p.name))

    def latest(self) -> str | None:
        """The tag DeepSpeed's `latest` file names (written last, so it is always complete), if any."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        return tag if (self.root / tag / TRAINER_STATE).is_file() else None

    def save(self, engine: Any, step: int, trainer_state: dict, rank_state: dict, model_config: dict) -> Path:
        tag = tag_for(step)
        tag_dir = self.root / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        torch.save({**rank_state, "rng": rng_state()}, tag_dir / f"rank_{self.env.rank}.pt")
        if self.env.is_main:
            (tag_dir / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
            (tag_dir / MODEL_CONFIG).write_text(json.dumps(model_config, indent=2))
        distributed.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=True)
        distributed.barrier()
        if self.env.is_main:
            self.prune()
        distributed.barrier()
        return tag_dir

    def prune(self) -> list[str]:
        """Delete all but the newest `keep` checkpoints (never the one `latest` names); returns the deleted tags."""
        tags = self.tags()
        latest = self.latest()
        doomed = [t for t in tags[: max(len(tags) - self.keep, 0)] if t != latest]
        for t in doomed:
            shutil.rmtree(self.root / t, ignore_errors=True)
        return doomed

    def load(self, engine: Any, tag: str) -> tuple[dict, dict]:
        """Restore DeepSpeed's state and this rank's RNGs; returns (trainer_state, rank_state)."""
        tag_dir = self.root / tag
        rank_file = tag_dir / f"rank_{self.env.rank}.pt"
        if not rank_file.is_file():
            raise InputError(
                f"{rank_file} is missing: checkpoint {tag_dir} was written by fewer processes than the "
                f"{self.env.world_size} running now; resume with the same number of processes or start a new "
                "output directory (train.output) / set train.resume=false"
            )
        path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise InputError(f"DeepSpeed could not load checkpoint {tag_dir}; delete it or set train.resume=false")
        rank_state = torch.load(rank_file, weights_only=False)
        set_rng_state(rank_state.pop("rng"))
        trainer_state = json.loads((tag_dir / TRAINER_STATE).read_text())
        return trainer_state, rank_state


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop polls, so it can checkpoint and exit between steps.

    Launchers relay a stop, so one event often arrives twice (Ctrl-C reaches the ranks from the terminal and
    again as SIGTERM from the launcher): repeats are ignored, except a SIGINT at least `force_after_s` after
    the first signal, which restores the previous handler's behaviour (Ctrl-C pressed again kills).
    """

    def __init__(self, force_after_s: float = 2.0) -> None:
        self.received: int | None = None
        self.force_after_s = force_after_s
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self._first_at = signum, time.monotonic()
            log.warning("received %s: checkpointing after the current step, then stopping",
                        signal.Signals(signum).name)
        elif signum == signal.SIGINT and time.monotonic() - self._first_at >= self.force_after_s:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoint root, tag) from a root dir (its `latest`), a tag dir, or a train output dir."""
    p = Path(path)
    for root in (p, p / "checkpoints"):
        if (root / "latest").is_file():
            return root, (root / "latest").read_text().strip()
    if (p / MODEL_CONFIG).is_file():
        return p.parent, p.name
    raise InputError(
        f"{p} is not a bertscale checkpoint: expected a checkpoint dir with {MODEL_CONFIG}, or a directory whose "
        "`latest` file names one (e.g. <workdir>/train/checkpoints)"
    )


def consolidated_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint: ZeRO shards merged (1-3) or the module's own state (stage 0)."""
    tag_dir = root / tag
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise InputError(f"{tag_dir} holds neither ZeRO shards nor {model_file.name}: the checkpoint is incomplete")
    # Stage 0 keeps no fp32 copy on disk outside the optimizer, so bf16 runs export bf16-rounded weights.
    module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in module.items()}


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write any checkpoint as a Hugging Face BERT dir (config.json + model.safetensors, + tokenizer files)."""
    from bertscale.model import BertConfig, BertForPreTraining
    from bertscale.model.hf import export_hf

    root, tag = resolve_checkpoint(checkpoint_dir)
    config = BertConfig.from_dict(json.loads((root / tag / MODEL_CONFIG).read_text()))
    model = BertForPreTraining(config)
    state = consolidated_state_dict(root, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The MLM decoder is tied to the word embeddings, so it may be stored under either name only.
    missing = [k for k in missing if not k.startswith("cls.predictions.decoder.")]
    if missing or unexpected:
        raise InputError(f"checkpoint {root / tag} does not match its bert_config.json: missing {missing}, "
                         f"unexpected {unexpected}")
    out = Path(out_dir)
    export_hf(model, out)
    if tokenizer is not None:
        copy_tokenizer_files(tokenizer, out)
    return out


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer_files(tokenizer: str | Path, out: Path) -> list[str]:
    """Copy the HF tokenizer files that exist beside the model, so `out` is a complete HF model dir."""
    src = Path(tokenizer)
    src_dir = src.parent if src.is_file() else src
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out / name)
            copied.append(name)
    return copied
