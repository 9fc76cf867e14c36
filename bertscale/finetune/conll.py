"""Token-level task files: CoNLL columns and JSONL records in, the same layouts out with predicted tags.

CoNLL: one token per line, fields separated by tabs (or, on lines without a tab, by spaces), the token and its tag
in configurable columns (by default the first and the last, as CoNLL-2003's `word POS chunk NER`); a blank line
ends a sentence; `-DOCSTART-` lines mark documents and are not sentences. JSONL: one sentence per line, an object
with a list of tokens and a list of tags of the same length (keys configurable).

Predictions are written back in the input's layout: each CoNLL line with the predicted tag appended as a last
column (with a gold column already there, the `token ... gold predicted` layout `conlleval` reads), each JSONL
record with the predicted tags under their own key. Bad input is an InputError naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bertscale.errors import InputError
from bertscale.finetune.tagging import check_tag
from bertscale.jsonl import json_objects

DOCSTART = "-DOCSTART-"
PREDICTED_KEY = "predicted_tags"


@dataclass
class TaggedSentence:
    """One sentence: its id (sentence number in the file, or the record's id field), tokens, tags (None when the
    split is read unlabelled) and the line it starts on."""

    idx: str
    tokens: list[str]
    tags: list[str] | None
    lineno: int


def _fields(line: str) -> list[str]:
    return line.rstrip("\n").split("\t") if "\t" in line else line.split()


def _conll_blocks(path: Path) -> Iterator[tuple[bool, list[tuple[int, str]]]]:
    """(is_docstart, [(lineno, line), ...]) for each sentence and each -DOCSTART- line, in file order."""
    block: list[tuple[int, str]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                fields = _fields(line)
                if not fields or not "".join(fields).strip():
                    if block:
                        yield False, block
                    block = []
                elif fields[0] == DOCSTART:
                    if block:
                        yield False, block
                    block = []
                    yield True, [(lineno, line)]
                else:
                    block.append((lineno, line))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert the file to UTF-8")
    if block:
        yield False, block


def _column(fields: list[str], column: int, path: Path, lineno: int, what: str) -> str:
    try:
        value = fields[column]
    except IndexError:
        raise InputError(f"{path}:{lineno}: no {what} column {column} (the line has {len(fields)} field(s)); "
                         "CoNLL files have one token per line with its fields separated by spaces or tabs") from None
    return value


def read_conll(path: str | Path, token_column: int = 0, tag_column: int = -1,
               labelled: bool = True) -> list[TaggedSentence]:
    """The sentences of a CoNLL file; with `labelled`, every token line must have the tag column."""
    path = Path(path)
    out = []
    for is_docstart, block in _conll_blocks(path):
        if is_docstart:
            continue
        tokens, tags = [], []
        for lineno, line in block:
            fields = _fields(line)
            tokens.append(_column(fields, token_column, path, lineno, "token"))
            if labelled:
                if len(fields) < 2:
                    raise InputError(f"{path}:{lineno}: the line has only a token, no tag; a labelled CoNLL file "
                                     "needs a tag column")
                tags.append(_column(fields, tag_column, path, lineno, "tag"))
        out.append(TaggedSentence(str(len(out)), tokens, tags if labelled else None, block[0][0]))
    return out


def read_token_jsonl(path: str | Path, tokens_key: str = "tokens", tags_key: str = "tags", id_key: str | None = None,
                     labelled: bool = True) -> list[TaggedSentence]:
    """The sentences of a JSONL file: `tokens_key` a list of strings and, with `labelled`, `tags_key` a list of
    tag strings of the same length."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, record in json_objects(f, path):
            tokens = _string_list(record, tokens_key, path, lineno)
            tags = _string_list(record, tags_key, path, lineno) if labelled else None
            if tags is not None and len(tags) != len(tokens):
                raise InputError(f"{path}:{lineno}: {len(tags)} tags for {len(tokens)} tokens; give one tag per "
                                 "token")
            idx = str(record[id_key]) if id_key is not None and id_key in record else str(len(out))
            out.append(TaggedSentence(idx, tokens, tags, lineno))
    return out


def _string_list(record: dict, key: str, path: Path, lineno: int) -> list[str]:
    if key not in record:
        raise InputError(f"{path}:{lineno}: no {key!r} key (the record has {sorted(record)}); check the task's "
                         "tokens/tags keys")
    value = record[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{path}:{lineno}: {key!r} must be a list of strings, got {json.dumps(value)[:80]}")
    return value


def check_scheme(sentences: Sequence[TaggedSentence], scheme: str, path: str | Path) -> None:
    """InputError naming the file, sentence and line of the first tag that `scheme` does not allow."""
    for s in sentences:
        for i, tag in enumerate(s.tags or []):
            problem = check_tag(tag, scheme)
            if problem:
                raise InputError(f"{path}: sentence {s.idx} (line {s.lineno}), token {i + 1} {s.tokens[i]!r}: "
                                 f"{problem}; fix the tag or the task's tag_scheme")


def write_conll(source: str | Path, out: str | Path, predictions: Mapping[str, Sequence[str]]) -> Path:
    """`source`'s lines with each token's predicted tag appended (sentences without predictions left out,
    -DOCSTART- lines kept), a blank line after each sentence."""
    source, out = Path(source), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for is_docstart, block in _conll_blocks(source):
            if is_docstart:
                f.write(block[0][1].rstrip("\n") + "\n\n")
                continue
            tags = predictions.get(str(n))
            n += 1
            if tags is None:
                continue
            for (_, line), tag in zip(block, tags, strict=True):
                sep = "\t" if "\t" in line else " "
                f.write(f"{line.rstrip(chr(10))}{sep}{tag}\n")
            f.write("\n")
    return out


def write_token_jsonl(source: str | Path, out: str | Path, predictions: Mapping[str, Sequence[str]],
                      id_key: str | None = None) -> Path:
    """`source`'s records, each with its predicted tags under `predicted_tags` (records without predictions left
    out)."""
    source, out = Path(source), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(source, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as f:
        for line in src:
            if not line.strip():
                continue
            record = json.loads(line)
            idx = str(record[id_key]) if id_key is not None and id_key in record else str(n)
            n += 1
            if idx in predictions:
                f.write(json.dumps({**record, PREDICTED_KEY: list(predictions[idx])}, ensure_ascii=False) + "\n")
    return out
