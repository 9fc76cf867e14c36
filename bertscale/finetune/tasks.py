"""Fine-tuning tasks: the GLUE registry, its loaders, and users' own tasks of every kind.

Sentence(-pair) tasks (GLUE; users' CSV/TSV/JSONL) load as a `datasets.Dataset` with the columns `idx` (str: the
row's id for submissions), `text_a`, `text_b` (None for single-sentence tasks) and, for labelled splits, `label`
(class id, or float for regression). Token classification (CoNLL or JSONL, `bertscale.finetune.conll`) loads as a
`datasets.Dataset` of `idx`, `tokens` and, labelled, `tags` (tag strings, checked against the task's scheme).
Question answering loads SQuAD v1.1/v2.0 JSON as a `bertscale.finetune.squad.SquadSet`.

GLUE's TSV files are read the way GLUE's reference processors read them: tab-separated, no quote handling, a
header skipped where the file has one. Rows a processor would choke on are errors naming the file and line,
except for MRPC and QQP, whose official loaders skip rows with missing fields; those are skipped and counted.
"""

from __future__ import annotations

import csv
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bertscale.errors import ConfigError, InputError
from bertscale.finetune.conll import TaggedSentence, check_scheme, read_conll, read_token_jsonl
from bertscale.finetune.squad import SquadSet, load_squad
from bertscale.finetune.tagging import OUTSIDE, check_tag
from bertscale.jsonl import json_objects

if TYPE_CHECKING:
    import datasets

    from bertscale.config import CustomTaskConfig, FinetuneConfig

log = logging.getLogger(__name__)

# GLUE's sentences are short, but some user files carry long documents in a field.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

Kind = Literal["classification", "regression", "token_classification", "question_answering"]


@dataclass(frozen=True)
class Hparams:
    """Fine-tuning hyper-parameters; the registry holds per-task defaults from the BERT paper."""

    lr: float = 2e-5
    batch_size: int = 32
    epochs: float = 3.0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 128


@dataclass(frozen=True)
class Columns:
    """Where a split's fields are: 0-based column indices (negative counts from the end), or names."""

    text_a: int | str
    text_b: int | str | None = None
    label: int | str | None = None
    index: int | str | None = None
    header: bool = True


@dataclass(frozen=True)
class TaggingOptions:
    """How a token classification task's files are laid out and tagged."""

    scheme: str = "iob2"  # iob1, iob2 or bioes
    token_column: int = 0  # CoNLL columns
    tag_column: int = -1
    tokens_key: str = "tokens"  # JSONL keys
    tags_key: str = "tags"
    id_key: str | None = None
    doc_stride: int | None = None  # sub-words shared by consecutive windows; None = half the window


@dataclass(frozen=True)
class QaOptions:
    """Windows over long contexts and answer decoding of a question answering task."""

    version: str = "auto"  # 1.1, 2.0, or auto (the file's `version` field)
    doc_stride: int | None = None  # tokens shared by consecutive windows; None = 128, at most half the room
    max_query_length: int = 64
    max_answer_length: int = 30
    n_best_size: int = 20


@dataclass(frozen=True)
class TaskSpec:
    """One task: its label set, metrics, files and defaults."""

    name: str
    kind: Kind
    labels: tuple[str, ...]  # class (or tag) names in id order; () for regression and question answering
    metrics: tuple[str, ...]
    train: str | None  # file name (GLUE) or path (custom)
    dev: dict[str, str]  # evaluation name -> file, e.g. {"MNLI-m": "dev_matched.tsv", ...}
    test: dict[str, str]  # submission name -> file
    labelled: Columns | None = None  # layout of train/dev files
    unlabelled: Columns | None = None  # layout of test files
    folder: str | None = None  # GLUE sub-folder
    defaults: Hparams = field(default_factory=Hparams)
    fmt: Literal["glue", "csv", "tsv", "jsonl", "conll", "squad"] = "glue"
    skip_incomplete: bool = False  # MRPC/QQP: GLUE's loaders skip rows with missing fields
    predict_with: str | None = None  # AX: predicted by the MNLI model, never trained
    hub: tuple[str, str] | None = None  # (dataset, config) on the Hugging Face hub
    alt_folders: tuple[str, ...] = ()  # other names GLUE copies use for the sub-folder
    tagging: TaggingOptions | None = None  # token classification only
    qa: QaOptions | None = None  # question answering only
    max_length: int | None = None  # this task's max tokens per example; None = finetune.max_length

    @property
    def num_labels(self) -> int:
        return {"regression": 1, "question_answering": 2}.get(self.kind, len(self.labels))

    @property
    def main_metric(self) -> str:
        """Best-epoch selection uses the task score (mean of its GLUE metrics)."""
        return "score"


_NLI = Columns(text_a=1, text_b=2, label=-1)
_NLI_TEST = Columns(text_a=1, text_b=2, index=0)
_SMALL = Hparams(batch_size=16)

GLUE_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("CoLA", "classification", ("0", "1"), ("matthews",), "train.tsv", {"CoLA": "dev.tsv"},
                 {"CoLA": "test.tsv"}, Columns(text_a=3, label=1, header=False), Columns(text_a=1, index=0),
                 "CoLA", _SMALL, hub=("nyu-mll/glue", "cola")),
        TaskSpec("SST-2", "classification", ("0", "1"), ("accuracy",), "train.tsv", {"SST-2": "dev.tsv"},
                 {"SST-2": "test.tsv"}, Columns(text_a=0, label=1), Columns(text_a=1, index=0), "SST-2",
                 hub=("nyu-mll/glue", "sst2")),
        TaskSpec("MRPC", "classification", ("0", "1"), ("f1", "accuracy"), "train.tsv", {"MRPC": "dev.tsv"},
                 {"MRPC": "test.tsv"}, Columns(text_a=3, text_b=4, label=0), Columns(text_a=3, text_b=4, index=0),
                 "MRPC", _SMALL, skip_incomplete=True, hub=("nyu-mll/glue", "mrpc")),
        TaskSpec("STS-B", "regression", (), ("pearson", "spearman"), "train.tsv", {"STS-B": "dev.tsv"},
                 {"STS-B": "test.tsv"}, Columns(text_a=7, text_b=8, label=-1), Columns(text_a=7, text_b=8, index=0),
                 "STS-B", _SMALL, hub=("nyu-mll/glue", "stsb")),
        TaskSpec("QQP", "classification", ("0", "1"), ("f1", "accuracy"), "train.tsv", {"QQP": "dev.tsv"},
                 {"QQP": "test.tsv"}, Columns(text_a=3, text_b=4, label=5), Columns(text_a=1, text_b=2, index=0),
                 "QQP", skip_incomplete=True, hub=("nyu-mll/glue", "qqp")),
        TaskSpec("MNLI", "classification", ("contradiction", "entailment", "neutral"), ("accuracy",), "train.tsv",
                 {"MNLI-m": "dev_matched.tsv", "MNLI-mm": "dev_mismatched.tsv"},
                 {"MNLI-m": "test_matched.tsv", "MNLI-mm": "test_mismatched.tsv"},
                 Columns(text_a=8, text_b=9, label=-1), Columns(text_a=8, text_b=9, index=0), "MNLI",
                 hub=("nyu-mll/glue", "mnli")),
        TaskSpec("QNLI", "classification", ("entailment", "not_entailment"), ("accuracy",), "train.tsv",
                 {"QNLI": "dev.tsv"}, {"QNLI": "test.tsv"}, _NLI, _NLI_TEST, "QNLI", hub=("nyu-mll/glue", "qnli")),
        TaskSpec("RTE", "classification", ("entailment", "not_entailment"), ("accuracy",), "train.tsv",
                 {"RTE": "dev.tsv"}, {"RTE": "test.tsv"}, _NLI, _NLI_TEST, "RTE", _SMALL,
                 hub=("nyu-mll/glue", "rte")),
        TaskSpec("WNLI", "classification", ("0", "1"), ("accuracy",), "train.tsv", {"WNLI": "dev.tsv"},
                 {"WNLI": "test.tsv"}, _NLI, _NLI_TEST, "WNLI", _SMALL, hub=("nyu-mll/glue", "wnli")),
        # The diagnostic set has no training data: the MNLI model predicts it for the submission. GLUE's download
        # script puts it in diagnostic/diagnostic.tsv; some copies use AX/.
        TaskSpec("AX", "classification", ("contradiction", "entailment", "neutral"), ("accuracy",), None, {},
                 {"AX": "diagnostic.tsv"}, None, _NLI_TEST, "diagnostic", alt_folders=("AX",),
                 predict_with="MNLI", hub=("nyu-mll/glue", "ax")),
    ]
}
# Grid of the BERT paper's fine-tuning search, restricted to what fits a small budget.
DEFAULT_GRID = {"lr": [2e-5, 3e-5, 5e-5], "batch_size": [16, 32]}


@dataclass
class LoadedSplit:
    """A loaded split with where it came from and how many records were skipped (rows GLUE's rules skip; SQuAD
    questions training leaves out)."""

    name: str
    dataset: "datasets.Dataset | SquadSet"
    source: str
    skipped: int = 0


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------
def get_task(name: str, custom: list["CustomTaskConfig"] | None = None) -> TaskSpec:
    """A GLUE task by name (case-insensitive, 'sst2' == 'SST-2') or a custom task from the config."""
    for c in custom or []:
        if c.name == name:
            return custom_task(c)
    key = name.upper().replace("-", "").replace("_", "")
    for task_name, spec in GLUE_TASKS.items():
        if task_name.upper().replace("-", "") == key or (key == "MNLIM" and task_name == "MNLI"):
            return spec
    known = list(GLUE_TASKS) + [c.name for c in custom or []]
    raise ConfigError(f"unknown task {name!r}: choose one of {', '.join(known)} or define it in "
                      "finetune.custom_tasks")


def hparams_for(task: TaskSpec, ft: "FinetuneConfig | None" = None, **overrides: Any) -> Hparams:
    """The task's defaults, then the config's explicit values, then keyword overrides (grid points)."""
    values: dict[str, Any] = {}
    if ft is not None:
        values = {k: getattr(ft, k) for k in ("lr", "batch_size", "epochs") if getattr(ft, k) is not None}
        values.update(warmup_ratio=ft.warmup_ratio, weight_decay=ft.weight_decay,
                      max_length=task.max_length or ft.max_length)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return replace(task.defaults, **values)


def custom_task(c: "CustomTaskConfig") -> TaskSpec:
    """A TaskSpec from a `finetune.custom_tasks` entry; the label set defaults to the training labels, sorted."""
    return replace(_custom_task(c), max_length=c.max_length)


def _custom_task(c: "CustomTaskConfig") -> TaskSpec:
    if c.kind == "token_classification":
        return _tagging_task(c)
    if c.kind == "question_answering":
        options = QaOptions(c.squad_version, c.doc_stride, c.max_query_length, c.max_answer_length, c.n_best_size)
        return TaskSpec(c.name, "question_answering", (), ("exact", "f1"), c.train, {c.name: c.dev} if c.dev else {},
                        {c.name: c.test} if c.test else {}, fmt="squad", qa=options)
    fmt = c.format if c.format != "auto" else _format_from_suffix(c.train)
    labels: tuple[str, ...] = ()
    if c.kind == "classification":
        labels = tuple(c.labels) if c.labels else _infer_labels(c, fmt)
        if len(labels) < 2:
            raise InputError(f"custom task {c.name}: {c.train} has {len(labels)} distinct label(s) in column "
                             f"{c.label!r}; classification needs at least 2")
    metrics = tuple(c.metrics) if c.metrics else (("accuracy",) if c.kind == "classification"
                                                   else ("pearson", "spearman"))
    cols = Columns(text_a=c.text_a, text_b=c.text_b, label=c.label, index=c.index)
    test_cols = replace(cols, label=None)
    return TaskSpec(c.name, c.kind, labels, metrics, c.train, {c.name: c.dev} if c.dev else {},
                    {c.name: c.test} if c.test else {}, cols, test_cols, None, fmt=fmt)


def _tagging_task(c: "CustomTaskConfig") -> TaskSpec:
    """A token classification task: CoNLL unless the file is .jsonl/.json; tags from the config or the training
    file ('O' first, then sorted)."""
    fmt = c.format if c.format != "auto" else ("jsonl" if Path(c.train).suffix.lower() in _JSONL_SUFFIXES
                                               else "conll")
    options = TaggingOptions(c.tag_scheme, c.token_column, c.tag_column, c.tokens, c.tags, c.index, c.doc_stride)
    spec = TaskSpec(c.name, "token_classification", (), ("precision", "recall", "f1", "accuracy"), c.train,
                    {c.name: c.dev} if c.dev else {}, {c.name: c.test} if c.test else {}, fmt=fmt, tagging=options)
    if c.labels:
        for tag in c.labels:
            if check_tag(tag, c.tag_scheme):
                raise ConfigError(f"custom task {c.name}: labels: {check_tag(tag, c.tag_scheme)}")
        labels = tuple(c.labels)
    else:
        seen = {t for s in _read_tagged(spec, Path(c.train), labelled=True) for t in s.tags or []}
        labels = (OUTSIDE,) + tuple(sorted(seen - {OUTSIDE}))
    if len(labels) < 2:
        raise InputError(f"custom task {c.name}: {c.train} has only the tag(s) {list(labels)}; token "
                         "classification needs at least one entity tag besides 'O'")
    return replace(spec, labels=labels)


_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _format_from_suffix(path: str) -> Literal["csv", "tsv", "jsonl"]:
    suffix = Path(path).suffix.lower()
    fmt = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
    if suffix not in fmt:
        raise ConfigError(f"cannot tell the format of {path} from its suffix; set format: csv, tsv or jsonl")
    return fmt[suffix]  # type: ignore[return-value]


def _infer_labels(c: "CustomTaskConfig", fmt: str) -> tuple[str, ...]:
    seen = {str(r.get(c.label)) for _, r in _custom_records(Path(c.train), fmt) if r.get(c.label) not in (None, "")}
    # Numeric labels sort numerically so that "2" < "10".
    try:
        return tuple(sorted(seen, key=float))
    except ValueError:
        return tuple(sorted(seen))


def subset(ds: "datasets.Dataset", n: int | None, seed: int = 0) -> "datasets.Dataset":
    """A fixed random subset of `n` rows (debug runs, benchmarks); the whole set when n is None or larger."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n)).flatten_indices()


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
_HUB_SPLITS = {"train.tsv": "train", "dev.tsv": "validation", "test.tsv": "test", "diagnostic.tsv": "test",
               "dev_matched.tsv": "validation_matched", "dev_mismatched.tsv": "validation_mismatched",
               "test_matched.tsv": "test_matched", "test_mismatched.tsv": "test_mismatched"}


def load_train(task: TaskSpec, data_dir: str | Path | None) -> LoadedSplit:
    if task.train is None:
        raise ConfigError(f"task {task.name} has no training data (it is predicted with the "
                          f"{task.predict_with} model)")
    return _load(task, "train", task.train, data_dir, labelled=True)


def load_eval(task: TaskSpec, data_dir: str | Path | None) -> list[LoadedSplit]:
    """One labelled split per evaluation (two for MNLI: matched and mismatched)."""
    return [_load(task, name, f, data_dir, labelled=True) for name, f in task.dev.items()]


def load_test(task: TaskSpec, data_dir: str | Path | None) -> list[LoadedSplit]:
    """One unlabelled split per submission file; files that are absent locally are left out (with a warning:
    the GLUE server rejects a submission that lacks a task's file)."""
    out = []
    for name, f in task.test.items():
        path = _local_path(task, f, data_dir)
        if path is not None and not path.is_file():
            log.warning("%s: no test file %s; %s.tsv is left out of the submission", name, path, name)
            continue
        out.append(_load(task, name, f, data_dir, labelled=False))
    return out


def _local_path(task: TaskSpec, file: str, data_dir: str | Path | None) -> Path | None:
    """The file in the task's GLUE folder (the first of its folder names that has it), or a custom task's path."""
    if task.fmt != "glue":
        return Path(file)
    if data_dir is None:
        return None
    candidates = [Path(data_dir) / folder / file for folder in (task.folder or task.name, *task.alt_folders)]
    return next((p for p in candidates if p.is_file()), candidates[0])


def _load(task: TaskSpec, name: str, file: str, data_dir: str | Path | None, labelled: bool) -> LoadedSplit:
    path = _local_path(task, file, data_dir)
    if path is None:
        return LoadedSplit(name, _hub_split(task, file, labelled), f"hub:{task.hub}")
    if not path.is_file():
        where = "finetune.glue_dir" if task.fmt == "glue" else f"finetune.custom_tasks[{task.name}]"
        raise InputError(f"{task.name}: {path} does not exist; check {where}")
    if task.kind == "token_classification":
        return _load_tagged(task, name, path, labelled)
    if task.kind == "question_answering":
        return LoadedSplit(name, load_squad(path), str(path))
    cols = task.labelled if labelled else task.unlabelled
    assert cols is not None, f"{task.name} has no column layout for {'labelled' if labelled else 'test'} files"
    records = _glue_records(path, cols.header) if task.fmt == "glue" else _custom_records(path, task.fmt)
    rows, skipped = _to_rows(task, cols, records, path, labelled)
    if not rows["idx"]:
        raise InputError(f"{task.name}: {path} has no data rows{f' ({skipped} skipped)' if skipped else ''}; "
                         "an empty split cannot be trained or evaluated")
    if skipped:
        log.warning("%s: skipped %d row(s) of %s with missing fields (as GLUE's loader does)", task.name,
                    skipped, path)
    import datasets

    return LoadedSplit(name, datasets.Dataset.from_dict(rows, features=_features(task, labelled)), str(path), skipped)


def _read_tagged(task: TaskSpec, path: Path, labelled: bool) -> list[TaggedSentence]:
    """A token classification file's sentences, tags checked against the task's scheme."""
    opt = task.tagging or TaggingOptions()
    if not path.is_file():
        raise InputError(f"{task.name}: {path} does not exist; check finetune.custom_tasks[{task.name}]")
    if task.fmt == "jsonl":
        sentences = read_token_jsonl(path, opt.tokens_key, opt.tags_key, opt.id_key, labelled)
    else:
        sentences = read_conll(path, opt.token_column, opt.tag_column, labelled)
    seen: dict[str, int] = {}
    for s in sentences:
        if s.idx in seen:
            raise InputError(f"{path}:{s.lineno}: id {s.idx!r} is used again (first at line {seen[s.idx]}); "
                             "sentence ids must be unique")
        seen[s.idx] = s.lineno
    if labelled:
        check_scheme(sentences, opt.scheme, path)
    return sentences


def _load_tagged(task: TaskSpec, name: str, path: Path, labelled: bool) -> LoadedSplit:
    import datasets

    sentences = _read_tagged(task, path, labelled)
    if not sentences:
        raise InputError(f"{task.name}: {path} has no sentences; an empty split cannot be trained or evaluated")
    rows: dict[str, list] = {"idx": [s.idx for s in sentences], "tokens": [s.tokens for s in sentences]}
    if labelled:
        rows["tags"] = [s.tags for s in sentences]
        unknown = sorted({t for s in sentences for t in s.tags or []} - set(task.labels)) if task.labels else []
        if unknown:
            log.warning("%s: %s has tags the task's label set lacks (%s); the model cannot predict them",
                        task.name, path, ", ".join(unknown))
    return LoadedSplit(name, datasets.Dataset.from_dict(rows), str(path))


def _features(task: TaskSpec, labelled: bool) -> "datasets.Features":
    import datasets

    feats = {"idx": datasets.Value("string"), "text_a": datasets.Value("string"),
             "text_b": datasets.Value("string")}
    if labelled:
        feats["label"] = datasets.Value("float32" if task.kind == "regression" else "int64")
    return datasets.Features(feats)


def _glue_records(path: Path, header: bool):
    """(line number, fields) of a GLUE TSV: tabs only, quotes are plain characters, the BOM is dropped."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for lineno, row in enumerate(reader, 1):
            if header and lineno == 1:
                continue
            yield lineno, row


def _custom_records(path: Path, fmt: str):
    """(line number, {column: value}) of a user's CSV (quoted fields allowed), TSV or JSONL file.

    TSV is read as GLUE's processors read it, with no quote handling: a field that starts with `"` is text, not
    the start of a quoted field that would swallow the following lines."""
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    with open(path, encoding="utf-8-sig", newline="") as f:
        if fmt == "jsonl":
            yield from json_objects(f, path)
            return
        if fmt == "csv":
            reader = csv.DictReader(f, delimiter=",")
        else:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            if None in row:  # more fields than the header: a stray delimiter would shift the columns after it
                raise InputError(f"{path}:{reader.line_num}: {len(reader.fieldnames or []) + len(row[None])} fields "
                                 f"but the header has {len(reader.fieldnames or [])}; "
                                 + ("quote fields that contain commas" if fmt == "csv"
                                    else "a text field contains a tab"))
            yield reader.line_num, row


def _field(row: list[str] | dict[str, Any], key: int | str, path: Path, lineno: int) -> Any:
    """A field by index (GLUE) or name (custom); KeyError with the file and line when it is not there."""
    try:
        value = row[key]  # type: ignore[index]
    except (IndexError, KeyError):
        value = None
    if value is None:
        have = f"{len(row)} field(s)" if isinstance(row, list) else f"columns {sorted(map(str, row))}"
        hint = ("; GLUE files are tab-separated with no quoting (is it a CSV file?)"
                if isinstance(row, list) and len(row) <= 1 else "; check the delimiter and the column mapping")
        raise KeyError(f"{path}:{lineno}: no field {key!r} (the row has {have}){hint}")
    return value


def _label(task: TaskSpec, raw: Any, path: Path, lineno: int) -> int | float:
    if task.kind == "regression":
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise InputError(f"{path}:{lineno}: label {raw!r} is not a number; {task.name} is a regression task")
    text = str(raw).strip()
    # JSON numbers arrive as ints/floats: 1.0 and 1 both name the class "1".
    if isinstance(raw, float) and raw.is_integer():
        text = str(int(raw))
    if text not in task.labels:
        raise InputError(f"{path}:{lineno}: label {text!r} is not one of {task.name}'s labels "
                         f"{list(task.labels)}; fix the row or the task's label set")
    return task.labels.index(text)


def _to_rows(task: TaskSpec, cols: Columns, records, path: Path, labelled: bool) -> tuple[dict[str, list], int]:
    rows: dict[str, list] = {"idx": [], "text_a": [], "text_b": []}
    if labelled:
        rows["label"] = []
    skipped = 0
    for n, (lineno, row) in enumerate(records):
        try:
            a = _field(row, cols.text_a, path, lineno)
            b = _field(row, cols.text_b, path, lineno) if cols.text_b is not None else None
            raw = _field(row, cols.label, path, lineno) if labelled and cols.label is not None else None
            if labelled and cols.label is not None and str(raw).strip() == "":
                raise KeyError(f"{path}:{lineno}: empty label")
            idx = _field(row, cols.index, path, lineno) if cols.index is not None else str(n)
            # A negative label index can alias a text column on a short row; GLUE rows are at least this wide.
            if isinstance(row, list) and len(row) < _min_fields(cols, labelled):
                raise KeyError(f"{path}:{lineno}: the row has {len(row)} field(s), {task.name} needs at least "
                               f"{_min_fields(cols, labelled)}")
        except KeyError as e:
            if task.skip_incomplete:
                skipped += 1
                continue
            raise InputError(str(e.args[0])) from None
        rows["idx"].append(str(idx))
        rows["text_a"].append(str(a))
        rows["text_b"].append(None if b is None else str(b))
        if labelled:
            rows["label"].append(_label(task, raw, path, lineno) if cols.label is not None else -1)
    return rows, skipped


def _min_fields(cols: Columns, labelled: bool) -> int:
    keys = [cols.text_a, cols.text_b, cols.index] + ([cols.label] if labelled else [])
    ints = [k for k in keys if isinstance(k, int)]
    if not ints:
        return 0
    non_negative = [k for k in ints if k >= 0]
    return (max(non_negative) + 1 if non_negative else 0) + (1 if any(k < 0 for k in ints) else 0)


def _hub_split(task: TaskSpec, file: str, labelled: bool) -> "datasets.Dataset":
    """The same split from the Hugging Face hub (needs network), mapped to our columns and label ids."""
    if task.hub is None:
        raise ConfigError(f"task {task.name} has no hub dataset; set finetune.glue_dir to a local GLUE copy")
    import datasets

    try:
        ds = datasets.load_dataset(*task.hub, split=_HUB_SPLITS[file])
    except Exception as e:  # noqa: BLE001 - offline, unknown dataset: all mean "use local files"
        raise InputError(f"cannot load {task.hub} from the hub ({type(e).__name__}: {e}); set "
                         "finetune.glue_dir to a local GLUE copy") from None
    names = ds.column_names
    a = next(c for c in ("question1", "question", "premise", "sentence1", "sentence") if c in names)
    b = next((c for c in ("question2", "hypothesis", "sentence2", "sentence") if c in names and c != a), None)
    hub_names = getattr(ds.features.get("label"), "names", None)

    def convert(ex: dict) -> dict:
        label = ex.get("label", -1)
        if task.kind == "classification" and hub_names and label >= 0 and hub_names[label] in task.labels:
            label = task.labels.index(hub_names[label])
        out = {"idx": str(ex.get("idx", "")), "text_a": ex[a], "text_b": ex[b] if b else None}
        return {**out, "label": label} if labelled else out

    return ds.map(convert, remove_columns=names, features=_features(task, labelled))
