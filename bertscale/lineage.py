"""Content addressing of stage outputs: a stage's fingerprint covers its inputs, its config and its code.

The whole-pipeline flow writes each stage into `<workdir>/<stage>/<fingerprint[:16]>/` and marks it complete
only when the stage succeeded. A finished output with the same fingerprint is reused; a changed config changes
that stage's fingerprint and, through the upstream fingerprints, every later one; a partial output (no marker)
is never reused.

The train stage's fingerprint also covers what `train.init_from` points at: a registered version as is (its
content never changes), a local dir by its files. A registry alias (`models:/name@champion`) is pinned to the
version it names first (`pin_init_from`), and the stage then trains from that pinned version: the stage re-runs
when the alias moves and is reused while it does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import bertscale
from bertscale import tracking
from bertscale.config import CustomTaskConfig, EvalFileConfig, PipelineConfig, dump_config, is_uri
from bertscale.errors import ConfigError
from bertscale.finetune.tasks import GLUE_TASKS, TaskSpec, get_task

log = logging.getLogger(__name__)
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


def task_eval_files(cfg: PipelineConfig) -> list[EvalFileConfig]:
    """The dev and test files of the fine-tuning tasks (finetune.tasks) as corpus decontamination entries
    (`corpus.decontamination.eval_files`), so the corpus never holds the text the tasks are evaluated on: a GLUE
    task's dev/test TSVs under finetune.glue_dir (with MNLI, the diagnostic set's too), a custom task's dev and
    test files. A GLUE file absent from the local copy (test sets often are) is left out with a warning, and so is
    a task read from the hub (no glue_dir)."""
    custom = {c.name: c for c in cfg.finetune.custom_tasks}
    entries: list[EvalFileConfig] = []
    for name in cfg.finetune.tasks:
        if name in custom:
            entries += _custom_eval_files(custom[name])
            continue
        task = get_task(name)
        if cfg.finetune.glue_dir is None:
            log.warning("decontamination: %s is read from the hub (finetune.glue_dir is unset): its dev and test "
                        "text is not checked", task.name)
            continue
        for t in [task] + [t for t in GLUE_TASKS.values() if t.predict_with == task.name]:
            for files, columns in ((t.dev, t.labelled), (t.test, t.unlabelled)):
                for file in files.values():
                    path = _glue_file(cfg.finetune.glue_dir, t, file)
                    if path is None:
                        log.warning("decontamination: no %s file %s under %s; its text is not checked", t.name,
                                    file, cfg.finetune.glue_dir)
                        continue
                    entries.append(EvalFileConfig(
                        task=t.name, split=Path(file).stem, path=str(path), format="glue-tsv", header=columns.header,
                        text_columns=[c for c in (columns.text_a, columns.text_b) if c is not None]))
    return entries


def _glue_file(glue_dir: str, task: TaskSpec, file: str) -> Path | None:
    candidates = [Path(glue_dir) / folder / file for folder in (task.folder or task.name, *task.alt_folders)]
    return next((p for p in candidates if p.is_file()), None)


_SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
                   ".ndjson": "jsonl"}


def _custom_eval_files(c: CustomTaskConfig) -> list[EvalFileConfig]:
    """A custom task's dev and test files, read as the task reads them (format `auto` by kind and suffix)."""
    fmt: str | None = c.format
    if fmt == "auto":
        suffix = Path(c.train).suffix.lower()
        fmt = {"question_answering": "squad",
               "token_classification": "jsonl" if suffix in (".jsonl", ".json", ".ndjson") else "conll",
               }.get(c.kind, _SUFFIX_FORMATS.get(suffix))
    if fmt is None:
        raise ConfigError(f"custom task {c.name}: cannot tell the format of {c.train} from its suffix; set format")
    columns: list[int | str] = {"squad": [], "conll": [c.token_column]}.get(fmt, [])
    if fmt in ("csv", "tsv", "jsonl"):
        columns = [c.tokens] if c.kind == "token_classification" else [x for x in (c.text_a, c.text_b) if x]
    return [EvalFileConfig(task=c.name, split=split, path=path, format=fmt, text_columns=columns)
            for split, path in (("dev", c.dev), ("test", c.test)) if path]


def eval_files_fingerprint(cfg: PipelineConfig) -> list[dict] | None:
    """The sha256 of each decontamination eval file's content (None while decontamination is off): an edited dev
    or test file re-runs the corpus stage; a touched but unchanged one does not. An absent file is named (the
    stage itself stops on it)."""
    d = cfg.corpus.decontamination
    if not (d.enabled and d.eval_files):
        return None
    return [{"path": e.path, "sha256": _content_sha256(e.path)} for e in d.eval_files]


def _content_sha256(path: str) -> str | None:
    digest = hashlib.sha256()
    if not is_uri(path):
        if not Path(path).is_file():
            return None
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except Exception:  # noqa: BLE001 - an unreadable eval file is reported by the corpus stage itself
        return None
    return digest.hexdigest()


def is_registry_alias(ref: str | None) -> bool:
    """Whether `ref` is `models:/name@alias`, a name that may point at another version tomorrow."""
    return bool(ref) and ref.startswith("models:/") and "@" in ref


def pin_init_from(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with a registry alias in `train.init_from` replaced by the version it names now, read from the
    registry `cfg` points at (`models:/enc@champion` -> `models:/enc/7`). Fingerprint and train with the pinned
    config, so that the stage's key and its weights name the same version even if the alias moves meanwhile."""
    ref = cfg.train.init_from
    if not is_registry_alias(ref):
        return cfg
    tracking.configure(cfg)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": tracking.alias_version(ref)})})


def _init_from_fingerprint(ref: str) -> str:
    if is_registry_alias(ref):
        # Hashing the alias itself would keep reusing a model trained from whatever it named back then.
        raise ValueError(f"train.init_from={ref} is an alias: fingerprint a config pinned by pin_init_from")
    if ref.startswith("models:/"):
        return ref
    return input_fingerprint([ref])


def stage_fingerprint(cfg: PipelineConfig, stage: str, upstream: list[str], extra: Any = None) -> str:
    """Fingerprint of a stage's output: upstream fingerprints + its config sections + its code version (+ for
    training, the weights it starts from; for the corpus, the content of its decontamination eval files)."""
    data = dump_config(cfg)
    payload = {
        "stage": stage,
        "upstream": upstream,
        "config": {s: _strip(data[s]) for s in STAGE_SECTIONS[stage]},
        "seed": cfg.seed,
        "code": [code_version(pkg) for pkg in STAGE_CODE[stage]],
        "extra": extra,
    }
    if stage == "train" and cfg.train.init_from:
        payload["init_from"] = _init_from_fingerprint(cfg.train.init_from)
    if stage == "corpus" and (eval_files := eval_files_fingerprint(cfg)) is not None:
        payload["eval_files"] = eval_files
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
