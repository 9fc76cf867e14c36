"""Checkpoints: save/resume of the whole training state, integrity manifests, keep-last-K, elastic conversion.

A checkpoint is one DeepSpeed tag directory `<dir>/step00000123/` holding DeepSpeed's files (model, optimizer
and scheduler states, ZeRO shards) plus ours: `trainer_state.json` (step, counters; rank 0),
`bert_config.json` (the architecture; rank 0) and `rank_{r}.pt` per rank (data-loader positions and the Python,
NumPy and torch RNG states, so dropout and masking continue exactly).

Integrity: once every rank has written its files, rank 0 writes `manifest.json` (size and sha256 of every file,
hashed by all ranks in parallel) with tmp + rename, and only then moves the `latest` pointer (also tmp + rename).
So a checkpoint without a manifest is an unfinished save, and a file that no longer matches the manifest is
damaged. Resume verifies the newest checkpoint and falls back to older ones, saying which it skipped and why;
skipped directories are renamed `<tag>.corrupt` / `<tag>.incomplete`, never deleted.

A fresh run (`train.resume=false`) into a directory that holds another run's checkpoints first moves them into
`<dir>/previous-<timestamp>/`: keep-last-K and resume rank checkpoints by step, so the old run's higher steps
would otherwise be pruned last and resumed first.

A save that fails on any rank (disk full, read-only file system, permissions) fails on all of them together:
every rank records its own OS error instead of raising, so no rank is left waiting in a collective; the ranks
agree, the partial directory is removed, `latest` still names the previous checkpoint, and
`CheckpointSaveError` says what happened.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertscale.errors import BertscaleError, ConfigError, InputError
from bertscale.model.weights import MODEL_CONFIG
from bertscale.train import deepspeed_engine, distributed
from bertscale.train.distributed import DistEnv

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step(\d{8})$")
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
HASH_CHUNK = 1 << 22


class CheckpointSaveError(BertscaleError):
    """A checkpoint could not be written on some rank; the previous checkpoint is untouched."""

    def __init__(self, message: str, errnos: list[int]) -> None:
        super().__init__(message)
        self.errnos = errnos


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
    """Saves, verifies and finds checkpoints under one directory; every rank calls `save` and `select`."""

    def __init__(self, root: str | Path, keep: int, env: DistEnv) -> None:
        self.root, self.keep, self.env = Path(root), keep, env

    def tags(self) -> list[str]:
        """Checkpoint tags on disk (finished or not), oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and TAG_RE.match(p.name))

    def latest(self) -> str | None:
        """The tag the `latest` pointer names (moved only after a complete save), if it exists."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        return tag if (self.root / tag / TRAINER_STATE).is_file() else None

    # --- save --------------------------------------------------------------------------------------------------
    def save(self, engine: Any, step: int, trainer_state: dict, rank_state: dict, model_config: dict) -> Path:
        """Write a checkpoint on every rank, then its manifest and the `latest` pointer (rank 0).

        Raises `CheckpointSaveError` on every rank if any rank failed to write; the previous checkpoint stays
        the `latest` one."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        failures: list[OSError] = []
        with record_os_errors(failures, tag_dir):
            tag_dir.mkdir(parents=True, exist_ok=True)
            torch.save({**rank_state, "rng": rng_state()}, tag_dir / f"rank_{self.env.rank}.pt")
            if self.env.is_main:
                write_atomic(tag_dir / TRAINER_STATE, json.dumps({**trainer_state, "step": step}, indent=2))
                write_atomic(tag_dir / MODEL_CONFIG, json.dumps(model_config, indent=2))
        self._agree(failures, tag_dir)
        with deepspeed_writes_recorded(engine, failures, tag_dir):
            engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        self._agree(failures, tag_dir)
        entries = hash_share(tag_dir, self.env)
        if self.env.is_main:
            with record_os_errors(failures, tag_dir):
                write_manifest(tag_dir, step, entries, self.env.world_size)
                write_atomic(self.root / "latest", tag)
        self._agree(failures, tag_dir)
        if self.env.is_main:
            self.prune()
        distributed.barrier()
        return tag_dir

    def _agree(self, failures: list[OSError], tag_dir: Path) -> None:
        """All ranks learn every rank's errors; on any, the partial checkpoint is removed and all raise."""
        mine = [(e.errno or 0, str(e.filename or tag_dir), e.strerror or str(e)) for e in failures]
        everyone = distributed.all_gather_object(mine)
        errors = [(rank, *err) for rank, errs in enumerate(everyone) for err in errs]  # type: ignore[union-attr]
        if not errors:
            return
        if self.env.is_main:
            # Frees the space a full disk needs back; on a read-only file system there is nothing to remove.
            shutil.rmtree(tag_dir, ignore_errors=True)
        distributed.barrier()
        raise CheckpointSaveError(save_error_message(errors, tag_dir, self.latest()),
                                  sorted({e[1] for e in errors}))

    def prune(self) -> list[str]:
        """Delete all but the newest `keep` checkpoints (never the one `latest` names); returns the deleted tags."""
        tags = self.tags()
        latest = self.latest()
        doomed = [t for t in tags[: max(len(tags) - self.keep, 0)] if t != latest]
        for t in doomed:
            shutil.rmtree(self.root / t, ignore_errors=True)
        return doomed

    def archive_previous(self) -> Path | None:
        """Move an earlier run's checkpoints (tags, `latest`, set-aside and universal dirs) into
        `<dir>/previous-<timestamp>/` (rank 0; all ranks wait), so a fresh run never mixes with them."""
        moved: Path | None = None
        if self.env.is_main and self.root.is_dir():
            old = [p for p in self.root.iterdir() if p.name == "latest" or p.name == "universal"
                   or TAG_RE.match(p.name.split(".")[0])]
            if any(TAG_RE.match(p.name.split(".")[0]) for p in old):
                moved = self.root / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
                n = 1
                while moved.exists():
                    n += 1
                    moved = moved.with_name(f"{moved.name.split('.')[0]}.{n}")
                moved.mkdir()
                for p in old:
                    p.rename(moved / p.name)
                log.warning("train.resume=false: moved %d checkpoint entries of an earlier run from %s to %s; "
                            "this run starts from step 0 (delete that directory once you no longer need it)",
                            len(old), self.root, moved)
        distributed.barrier()
        return moved

    # --- resume ------------------------------------------------------------------------------------------------
    def select(self) -> str | None:
        """The newest checkpoint that verifies against its manifest, agreed on by all ranks.

        Newer checkpoints that fail (unfinished save, missing/truncated/changed file, unreadable manifest) are
        logged with the reason and renamed aside; `latest` is pointed at the one chosen."""
        pointer = (self.root / "latest").read_text().strip() if (self.root / "latest").is_file() else None
        candidates = distributed.broadcast_object(self.tags()[::-1] if self.env.is_main else None)
        for tag in candidates:  # type: ignore[union-attr]
            problems = self._verify_together(tag, legacy_ok=tag == pointer)
            if not problems:
                if self.env.is_main and pointer != tag:
                    write_atomic(self.root / "latest", tag)
                distributed.barrier()
                return tag
            if self.env.is_main:
                self._set_aside(tag, problems)
            distributed.barrier()
        return None

    def _verify_together(self, tag: str, legacy_ok: bool) -> list[str]:
        """Problems found by all ranks, each checking its share of the manifest's files."""
        tag_dir = self.root / tag
        manifest_path = tag_dir / MANIFEST
        if not manifest_path.is_file():
            if legacy_ok and (tag_dir / TRAINER_STATE).is_file():
                if self.env.is_main:
                    log.warning("checkpoint %s has no %s (written by an older version): loading it unverified",
                                tag_dir, MANIFEST)
                return []
            return [f"no {MANIFEST}: the save did not finish"]
        try:
            files = json.loads(manifest_path.read_text())["files"]
        except (OSError, ValueError, KeyError) as e:
            return [f"{MANIFEST} is unreadable ({e})"]
        mine = sorted(files)[self.env.rank :: self.env.world_size]
        found = [verify_file(tag_dir / name, files[name]) for name in mine]
        everyone = distributed.all_gather_object([p for p in found if p])
        return [p for ps in everyone for p in ps]  # type: ignore[union-attr]

    def _set_aside(self, tag: str, problems: list[str]) -> None:
        kind = "incomplete" if problems[0].startswith(f"no {MANIFEST}") else "corrupt"
        target = self.root / f"{tag}.{kind}"
        n = 1
        while target.exists():
            n += 1
            target = self.root / f"{tag}.{kind}{n}"
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        try:
            (self.root / tag).rename(target)
            where = f"moved to {target.name}"
        except OSError as e:
            where = f"left in place ({e.strerror})"
        log.warning("skipping checkpoint %s: %s; %s, falling back to the previous checkpoint", self.root / tag,
                    shown, where)

    def load(self, engine: Any, tag: str) -> tuple[dict, dict]:
        """Restore DeepSpeed's state and this rank's RNGs; returns (trainer_state, rank_state)."""
        tag_dir = self.root / tag
        rank_file = tag_dir / f"rank_{self.env.rank}.pt"
        if not rank_file.is_file():
            raise InputError(
                f"{rank_file} is missing: checkpoint {tag_dir} was written by fewer processes than the "
                f"{self.env.world_size} running now; resume with the same number of processes, convert it for a "
                "new world size (see docs/multinode.md, elastic restarts) or set train.resume=false"
            )
        path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise InputError(f"DeepSpeed could not load checkpoint {tag_dir}; delete it or set train.resume=false")
        rank_state = torch.load(rank_file, weights_only=False)
        set_rng_state(rank_state.pop("rng"))
        trainer_state = json.loads((tag_dir / TRAINER_STATE).read_text())
        return trainer_state, rank_state

    # --- elastic restarts ----------------------------------------------------------------------------------------
    def trainer_state(self, tag: str) -> dict:
        """Checkpoint `tag`'s trainer_state.json (step, world size, ZeRO stage, counters)."""
        return json.loads((self.root / tag / TRAINER_STATE).read_text())

    def saved_world_size(self, tag: str) -> int:
        """How many ranks wrote checkpoint `tag` (its trainer state, else its rank files)."""
        return int(self.trainer_state(tag).get("world_size") or len(list((self.root / tag).glob("rank_*.pt"))))

    def to_universal(self, tag: str, zero_stage: int) -> Path:
        """Convert ZeRO checkpoint `tag` into DeepSpeed's universal format (per-parameter fp32 weights and Adam
        moments, independent of the world size) under `<dir>/universal/<tag>`; rank 0 converts, all wait."""
        out = self.root / "universal" / tag
        if zero_stage == 0:
            raise ConfigError(
                f"checkpoint {self.root / tag} was written by {self.saved_world_size(tag)} ranks with ZeRO stage 0; "
                "changing the number of ranks needs ZeRO stage 1-3 (stage 0 keeps no partitioned state to "
                "re-shard): resume with the same number of processes"
            )
        error = None
        if self.env.is_main and not (out / "zero").is_dir():
            shutil.rmtree(out, ignore_errors=True)
            error = deepspeed_engine.convert_to_universal(self.root / tag, out)
        error = distributed.broadcast_object(error)
        if error:
            raise InputError(f"cannot convert {self.root / tag} to a universal checkpoint for a new number of "
                             f"ranks: {error}; resume with {self.saved_world_size(tag)} processes instead")
        return out

    def load_universal(self, engine: Any, tag: str, universal_dir: Path) -> tuple[dict, dict]:
        """Load a universal checkpoint into an engine built with `checkpoint.load_universal`; returns
        (trainer_state, rank 0's saved rank state without its RNGs) for the caller to re-shard."""
        path, _ = engine.load_checkpoint(str(universal_dir.parent), tag=universal_dir.name,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise InputError(f"DeepSpeed could not load universal checkpoint {universal_dir}")
        rank0 = torch.load(self.root / tag / "rank_0.pt", weights_only=False)
        rank0.pop("rng", None)
        return self.trainer_state(tag), rank0


# ----------------------------------------------------------------------------------------------------------------
# Integrity and failed saves
# ----------------------------------------------------------------------------------------------------------------
def write_atomic(path: Path, text: str) -> None:
    """Write a small file so readers see the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_share(tag_dir: Path, env: DistEnv) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file in `tag_dir`, each rank hashing every world_size-th file,
    gathered on all ranks (checkpoints of large models hash in parallel)."""
    names = distributed.broadcast_object(
        sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST
               and not p.name.startswith(".")) if env.is_main else None)
    mine = {n: {"size": (tag_dir / n).stat().st_size, "sha256": sha256_file(tag_dir / n)}
            for n in names[env.rank :: env.world_size]}  # type: ignore[index]
    merged: dict[str, dict] = {}
    for part in distributed.all_gather_object(mine):
        merged.update(part)  # type: ignore[arg-type]
    return merged


def write_manifest(tag_dir: Path, step: int, files: dict[str, dict], world_size: int) -> None:
    manifest = {"step": step, "world_size": world_size, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": dict(sorted(files.items()))}
    write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))


def verify_file(path: Path, expected: dict) -> str | None:
    """None if `path` matches its manifest entry, else what is wrong with it."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{path.name} has {size} bytes, the manifest says {expected['size']} (truncated or overwritten)"
    try:
        digest = sha256_file(path)
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror})"
    if digest != expected["sha256"]:
        return f"{path.name} fails its sha256 check (corrupted)"
    return None


@contextlib.contextmanager
def record_os_errors(failures: list[OSError], where: Path) -> Iterator[None]:
    """Record an OS error (disk full, read-only, permissions) under directory `where` instead of raising it, so
    the rank goes on to the collective where all ranks agree on the outcome."""
    try:
        yield
    except OSError as e:
        failures.append(e)
    except RuntimeError as e:  # torch.save's C++ writer reports a failed write as a RuntimeError, errno lost
        text = str(e)
        if not any(m in text for m in ("file write failed", "PytorchStreamWriter", "unexpected pos")):
            raise
        failures.append(diagnose_write_failure(where, text.splitlines()[0][:200]))


def diagnose_write_failure(where: Path, message: str) -> OSError:
    """The likely OS error behind a write that failed without an errno: read-only mount, or a full disk."""
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError as e:
        return e
    if st.f_flag & os.ST_RDONLY:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(where))
    if st.f_bavail * st.f_frsize < (1 << 20) or st.f_favail == 0:  # under 1 MiB or no inodes left
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
    return OSError(errno.EIO, f"write failed ({message})", str(where))


@contextlib.contextmanager
def deepspeed_writes_recorded(engine: Any, failures: list[OSError], where: Path) -> Iterator[None]:
    """Run DeepSpeed's `save_checkpoint` with its file writes recording OS errors instead of raising: a rank that
    raised mid-save would skip DeepSpeed's closing barrier and leave the other ranks waiting there."""
    ckpt_engine = engine.checkpoint_engine
    real_save, real_makedirs = ckpt_engine.save, ckpt_engine.makedirs
    real_copy = getattr(engine, "_copy_recovery_script", None)

    def save(*args: Any, **kwargs: Any) -> None:
        if not failures:  # after a failed write, skip the rest of this rank's files
            with record_os_errors(failures, where):
                real_save(*args, **kwargs)

    def makedirs(*args: Any, **kwargs: Any) -> None:
        with record_os_errors(failures, where):
            real_makedirs(*args, **kwargs)

    def copy_script(*args: Any, **kwargs: Any) -> None:
        with record_os_errors(failures, where):
            real_copy(*args, **kwargs)  # type: ignore[misc]

    ckpt_engine.save, ckpt_engine.makedirs = save, makedirs
    if real_copy is not None:
        engine._copy_recovery_script = copy_script
    try:
        yield
    finally:
        ckpt_engine.save, ckpt_engine.makedirs = real_save, real_makedirs
        if real_copy is not None:
            del engine._copy_recovery_script


def save_error_message(errors: list[tuple[int, int, str, str]], tag_dir: Path, previous: str | None) -> str:
    """`checkpoint save failed: no space left on /path (...); the previous checkpoint step N is intact`."""
    _, code, filename, strerror = errors[0]
    where = tag_dir.parent  # the checkpoint directory the operator configured
    what = {errno.ENOSPC: f"no space left on {where}", errno.EDQUOT: f"disk quota exceeded on {where}",
            errno.EROFS: f"{where} is on a read-only file system",
            errno.EACCES: f"permission denied writing to {where}"}.get(code, f"cannot write to {where}")
    ranks = sorted({e[0] for e in errors})
    detail = f"rank(s) {', '.join(map(str, ranks))}: {strerror}: {filename}"
    match = TAG_RE.match(previous or "")
    kept = (f"the previous checkpoint step {int(match.group(1))} is intact ({tag_dir.parent / previous})"
            if match and previous else "no earlier checkpoint exists")
    return f"checkpoint save failed: {what} ({detail}); {kept}"
