"""Content addressing of stage outputs: a stage's fingerprint covers its inputs, its config and its code.

The whole-pipeline flow writes each stage into `<workdir>/<stage>/<fingerprint[:16]>/` and marks it complete
only when the stage succeeded. A finished output with the same fingerprint is reused; a changed config changes
that stage's fingerprint and, through the upstream fingerprints, every later one; a partial output (no marker)
is never reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import bertscale
from bertscale.config import PipelineConfig, dump_config, is_uri
from bertscale.finetune.tasks import GLUE_TASKS, get_task

MARKER = "_COMPLETE.json"
PACKAGE_DIR = Path(bertscale.__file__).resolve().parent

# Which config sections and which library packages decide each stage's output.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "corpus": ("corpus",),
    "tokenizer": ("tokenizer",),
    "data": ("data",),
    "train": ("model", "train"),
    # `name` and the registry decide what the stage registers and promotes, so they are part of its output.
    "finetune": ("finetune", "registry", "name"),
}
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "corpus": ("corpus",),
    "tokenizer": ("tokenizer",),
    "data": ("data", "tokenizer"),
    "train": ("train", "model", "data"),
    "finetune": ("finetune", "model", "tokenizer"),
}
# Fields that say where or how fast a stage runs, not what it produces.
# register_encoder acts after the train stage, outside any stage's cache.
_IGNORED_FIELDS = {"output", "num_workers", "num_proc", "runner", "pipeline_options", "register_encoder"}


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@cache
def code_version(package: str) -> str:
    """Hash of a library package's source files (plus config.py, whose defaults shape every stage)."""
    h = hashlib.sha256(bertscale.__version__.encode())
    files = sorted((PACKAGE_DIR / package).rglob("*.py")) + [PACKAGE_DIR / "config.py"]
    for f in files:
        h.update(f.relative_to(PACKAGE_DIR).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _strip(section: Any) -> Any:
    if isinstance(section, dict):
        return {k: _strip(v) for k, v in section.items() if k not in _IGNORED_FIELDS}
    return section


def input_fingerprint(paths: list[str]) -> str:
    """Cheap fingerprint of raw inputs: (path, size, mtime) of every file, through Beam's FileSystems for URIs."""
    entries: list[tuple[str, int, float]] = []
    for p in paths:
        local = Path(p)
        if "://" not in p and local.exists():
            files = [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.is_file())
            entries += [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime) for f in files]
            continue
        from apache_beam.io.filesystems import FileSystems

        try:
            for m in FileSystems.match([p])[0].metadata_list:
                entries.append((m.path, m.size_in_bytes, m.last_updated_in_seconds))
        except Exception:  # noqa: BLE001 - an unreadable input is reported by the corpus stage itself
            entries.append((p, -1, -1))
    return _sha256(sorted(entries))


def task_inputs(cfg: PipelineConfig) -> list[str]:
    """The files the fine-tuning tasks read: a custom task's train/dev/test paths, a GLUE task's folder under
    finetune.glue_dir (and the AX folders with MNLI). Hub datasets have no local files."""
    custom = {c.name: c for c in cfg.finetune.custom_tasks}
    paths: list[str] = []
    for name in cfg.finetune.tasks:
        if name in custom:  # from the config alone: reading the files (label inference) is the stage's job
            paths += [p for p in (custom[name].train, custom[name].dev, custom[name].test) if p]
            continue
        task = get_task(name)
        if cfg.finetune.glue_dir is not None:
            for t in [task] + [t for t in GLUE_TASKS.values() if t.predict_with == task.name]:
                paths += [str(Path(cfg.finetune.glue_dir) / f) for f in (t.folder or t.name, *t.alt_folders)]
    return sorted(set(paths))


def task_inputs_fingerprint(cfg: PipelineConfig) -> str:
    """`input_fingerprint` of the fine-tuning task files (sizes and times, as for the raw corpus), with absent
    paths named, so that adding, editing or removing a task file re-runs the fine-tuning stage."""
    paths = task_inputs(cfg)
    present = [p for p in paths if is_uri(p) or Path(p).exists()]
    return _sha256({"files": input_fingerprint(present) if present else None,
                    "absent": [p for p in paths if p not in present]})


def stage_fingerprint(cfg: PipelineConfig, stage: str, upstream: list[str], extra: Any = None) -> str:
    """Fingerprint of a stage's output: upstream fingerprints + its config sections + its code version."""
    data = dump_config(cfg)
    payload = {
        "stage": stage,
        "upstream": upstream,
        "config": {s: _strip(data[s]) for s in STAGE_SECTIONS[stage]},
        "seed": cfg.seed,
        "code": [code_version(pkg) for pkg in STAGE_CODE[stage]],
        "extra": extra,
    }
    return _sha256(payload)


@dataclass
class StageOutput:
    """A content-addressed stage output directory and its completion marker."""

    stage: str
    fingerprint: str
    path: Path

    @classmethod
    def for_stage(cls, workdir: str | Path, stage: str, fingerprint: str) -> "StageOutput":
        return cls(stage, fingerprint, Path(workdir) / stage / fingerprint[:16])

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def completed(self) -> dict | None:
        """The recorded result if this output finished with this fingerprint, else None."""
        try:
            data = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return None
        return data.get("result") if data.get("fingerprint") == self.fingerprint else None

    def prepare(self) -> None:
        """Before a (re-)run: a partial output of an earlier failed attempt is moved aside, never reused."""
        if self.path.exists() and self.completed() is None:
            aside = self.path.with_name(f"{self.path.name}.incomplete-{int(time.time())}")
            shutil.move(str(self.path), aside)
        self.path.mkdir(parents=True, exist_ok=True)

    def complete(self, result: dict) -> None:
        """Mark the output complete; written last and atomically, so a crash leaves no marker."""
        tmp = self.marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "stage": self.stage, "result": result,
                                   "completed_at": time.time()}, indent=2, default=str))
        tmp.replace(self.marker)
