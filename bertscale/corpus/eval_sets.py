"""The texts of evaluation sets, read for decontamination: GLUE TSV, CSV/TSV/JSONL columns, CoNLL sentences and
SQuAD contexts and questions, from local paths or Beam URIs.

Only the text matters here, so the readers are lenient where a task loader is strict (labels are not read, a row
that lacks one of its text columns still gives the others) but never silent: rows with a missing column are
counted (`incomplete_rows`, in the manifest), and a file that gives no text at all, a malformed JSON line or SQuAD
record, or an unreadable file is an `InputError` naming the file (and line or record).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

from bertscale.config import EvalFileConfig
from bertscale.corpus.output import read_bytes
from bertscale.errors import InputError
from bertscale.jsonl import json_objects

log = logging.getLogger(__name__)
csv.field_size_limit(2**31 - 1)  # a CSV field may hold a whole document


@dataclass
class EvalFileStats:
    """What was read from one eval file (for the manifest)."""

    task: str
    split: str
    path: str
    format: str
    sha256: str = ""
    texts: int = 0
    incomplete_rows: int = 0
    short_texts: int = 0  # texts with fewer words than the n-gram: they cannot match (set by the index builder)
    ngrams: int = 0  # distinct n-grams indexed (set by the index builder)

    def as_dict(self) -> dict:
        return asdict(self)


def eval_texts(entries: Iterable[EvalFileConfig]) -> Iterator[tuple[str, str, str]]:
    """(task, split, text) of every text of the given eval files, file by file in order."""
    for entry in entries:
        for text in read_eval_file(entry):
            yield entry.task, entry.split, text


def read_eval_file(entry: EvalFileConfig, stats: EvalFileStats | None = None) -> Iterator[str]:
    """The non-empty texts of one eval file; `stats` (if given) gets its sha256 and counts."""
    stats = stats or EvalFileStats(entry.task, entry.split, entry.path, entry.format)
    try:
        data = read_bytes(entry.path)
    except Exception as err:  # Beam's filesystems raise their own types for a missing file, a bad bucket...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise InputError(f"decontamination eval file {entry.path} ({entry.task} {entry.split}) cannot be read: "
                         f"{first}") from None
    stats.sha256 = hashlib.sha256(data).hexdigest()
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{entry.path}: not UTF-8 (byte {err.start}); eval files must be UTF-8 text") from None
    reader = {"glue-tsv": _glue_tsv, "csv": _columns, "tsv": _columns, "jsonl": _jsonl, "conll": _conll,
              "squad": _squad}[entry.format]
    for text in reader(content, entry, stats):
        text = text.strip()
        if text:
            stats.texts += 1
            yield text
    if not stats.texts:
        raise InputError(f"{entry.path}: no text read as {entry.format}"
                         + (f" from columns {entry.text_columns}" if entry.text_columns else "")
                         + "; check the format and text_columns of this eval file")
    if stats.incomplete_rows:
        log.warning("decontamination: %d row(s) of %s lack a text column %s; their other columns were read",
                    stats.incomplete_rows, entry.path, entry.text_columns)


def _glue_tsv(content: str, entry: EvalFileConfig, stats: EvalFileStats) -> Iterator[str]:
    """GLUE's reading: tab-separated, quotes are plain characters, columns by index."""
    rows = csv.reader(io.StringIO(content, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    for lineno, row in enumerate(rows, 1):
        if (entry.header and lineno == 1) or not row:
            continue
        fields = [row[c] for c in entry.text_columns if -len(row) <= c < len(row)]  # type: ignore[operator]
        stats.incomplete_rows += len(fields) < len(entry.text_columns)
        yield from fields


def _columns(content: str, entry: EvalFileConfig, stats: EvalFileStats) -> Iterator[str]:
    """CSV (quoted fields allowed) or TSV (no quoting, as GLUE's processors read it) with a header row."""
    if entry.format == "csv":
        rows = csv.DictReader(io.StringIO(content, newline=""))
    else:
        rows = csv.DictReader(io.StringIO(content, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    missing = [c for c in entry.text_columns if c not in (rows.fieldnames or [])]
    if missing:
        raise InputError(f"{entry.path}: no column(s) {missing} in the header {rows.fieldnames or []}; fix "
                         "text_columns of this eval file")
    for row in rows:
        fields = [row[c] for c in entry.text_columns if row.get(c) is not None]
        stats.incomplete_rows += len(fields) < len(entry.text_columns)
        yield from fields


def _jsonl(content: str, entry: EvalFileConfig, stats: EvalFileStats) -> Iterator[str]:
    """One JSON object per line; a field may be a string or a list of tokens (joined with spaces)."""
    for _, record in json_objects(content.splitlines(), entry.path):
        fields = [record[c] for c in entry.text_columns if record.get(c) is not None]
        stats.incomplete_rows += len(fields) < len(entry.text_columns)
        for value in fields:
            yield " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _conll(content: str, entry: EvalFileConfig, stats: EvalFileStats) -> Iterator[str]:
    """Sentences of a CoNLL file: one token per line (whitespace-separated columns), blank lines between
    sentences, `-DOCSTART-` lines skipped."""
    column = entry.text_columns[0] if entry.text_columns else 0
    tokens: list[str] = []
    for lineno, line in enumerate(content.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if tokens:
                yield " ".join(tokens)
            tokens = []
            continue
        if not -len(fields) <= column < len(fields):  # type: ignore[operator]
            raise InputError(f"{entry.path}:{lineno}: {len(fields)} column(s), no token column {column}")
        tokens.append(fields[column])  # type: ignore[index]
    if tokens:
        yield " ".join(tokens)


def _squad(content: str, entry: EvalFileConfig, stats: EvalFileStats) -> Iterator[str]:
    """Every context and question of a SQuAD v1.1/v2.0 file (answers are spans of their context)."""
    try:
        data = json.loads(content)
    except json.JSONDecodeError as err:
        raise InputError(f"{entry.path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise InputError(f"{entry.path}: no `data` list; a SQuAD file is {{\"data\": [{{\"paragraphs\": ...}}]}}")
    for a, article in enumerate(articles):
        for p, paragraph in enumerate(_records(article, "paragraphs", entry.path, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = paragraph.get("context")
            if not isinstance(context, str):
                raise InputError(f"{entry.path}: {where} has no context")
            yield context
            for q, qa in enumerate(_records(paragraph, "qas", entry.path, where)):
                if not isinstance(qa.get("question"), str):
                    raise InputError(f"{entry.path}: {where}.qas[{q}] has no question")
                yield qa["question"]


def _records(parent: object, key: str, path: str, where: str) -> list[dict]:
    items = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise InputError(f"{path}: {where} has no `{key}` list of objects")
    return items
