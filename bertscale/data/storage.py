"""Directories that are either complete or absent: staged in a temporary sibling, renamed into place.

A complete directory holds a JSON record (its completion marker) with a build key and the sha256 of every file
it lists. A reader of a previous run's output reuses a directory only when the record is there, its key equals
the key of the inputs now, and every file still hashes to what the record says; anything else is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bertscale.errors import InputError

TMP_PREFIX = ".tmp-"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_arrays(directory: Path, arrays: dict[str, np.ndarray], root: Path) -> dict[str, str]:
    """Write `<name>.npy` files into `directory`; returns {path relative to `root`: sha256}."""
    directory.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name, arr in arrays.items():
        path = directory / f"{name}.npy"
        np.save(path, arr)
        hashes[str(path.relative_to(root))] = file_sha256(path)
    return hashes


def write_json(path: Path, obj: Any) -> None:
    """JSON written to a temporary file and renamed: a reader sees the old file, the new one, or none."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def read_verified(directory: Path, marker: str, key: str) -> dict | None:
    """The record of a complete, intact directory built from the inputs named by `key`, else None."""
    try:
        record = json.loads((directory / marker).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    for rel, sha in record.get("files", {}).items():
        path = directory / rel
        if not path.is_file() or file_sha256(path) != sha:
            return None
    return record


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A temporary directory that becomes `final` when the block succeeds, and vanishes when it fails.

    An OSError (disk full, no permission) becomes one InputError naming the path; completed siblings stay
    complete, so the re-run the message asks for resumes from them.
    """
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        if final.exists():  # an incomplete directory of a killed run: never part of the output
            shutil.rmtree(final)
        tmp.rename(final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = e.filename or final
        raise InputError(f"cannot write {where}: {e.strerror or e}; free disk space (or set data.output to "
                         "another disk) and re-run: completed shards are kept") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale(parent: Path, keep: set[str]) -> None:
    """Delete temporary directories of killed runs, and entries of `parent` a new plan no longer names."""
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if entry.name.startswith(TMP_PREFIX) or entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
