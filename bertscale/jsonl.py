"""JSON Lines input, read the same way everywhere: one object per non-blank line, and a line that is not valid
JSON or not an object is an InputError naming the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from bertscale.errors import InputError


def json_objects(lines: Iterable[str], path: str | Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of `lines`, read from `path` (named in errors)."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg}); JSONL needs one object per line") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record
