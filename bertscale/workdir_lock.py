"""One pipeline at a time per workdir: an exclusive lock on `<workdir>/.lock`.

The invariant: a pipeline run writes stage directories under a workdir only while it holds the workdir's lock,
so two runs (two firings of a schedule, a schedule and a manual run, the CLI and a deployment) never write the
same stage directory. The lock is `flock(2)` on an open file: the kernel releases it when the holder exits,
however it exits, so a killed run leaves no stale lock to clean up. While held, the file names its holder (pid,
host, since when, which run); that text is only for the message a waiting or skipped run logs, never for
deciding anything. flock works between processes of one host, and on NFS (Linux maps it onto NFS byte-range
locks); a shared filesystem without lock support gives no protection.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from bertscale.errors import BertscaleError

LOCK_FILE = ".lock"


class WorkdirBusy(BertscaleError):
    """Another run holds the workdir's lock."""


def holder(path: str | Path) -> str:
    """Who holds the lock file `path`, in words, from what the holder wrote into it."""
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return "another process"
    since = datetime.fromtimestamp(info.get("since", 0), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    by = f"{info['by']}, " if info.get("by") else ""
    return f"{by}pid {info.get('pid')} on {info.get('host')}, since {since}"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def hold(workdir: str | Path, wait_s: float | None = None, by: str = "",
         on_wait: Callable[[str], None] | None = None, poll_s: float = 1.0) -> Iterator[Path]:
    """Hold the lock of `workdir` for the duration of the block; yields the lock file's path.

    When another run holds it: `wait_s=None` waits until it is free, `wait_s=0` raises `WorkdirBusy` at once, a
    positive `wait_s` waits that long, then raises. `on_wait` gets one line naming the holder when waiting starts.
    `by` names this run in the file (e.g. a Prefect flow run), for the message others see.
    """
    path = Path(workdir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_RDWR without O_TRUNC: opening must not erase the holder's description before the lock is ours.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        if not _try_lock(fd):
            if wait_s is not None and wait_s <= 0:
                raise WorkdirBusy(f"workdir {Path(workdir).resolve()} is in use by {holder(path)}")
            if on_wait is not None:
                on_wait(f"workdir {Path(workdir).resolve()} is in use by {holder(path)}; waiting for it to finish")
            while not _try_lock(fd):
                if wait_s is not None and time.monotonic() - start >= wait_s:
                    raise WorkdirBusy(f"workdir {Path(workdir).resolve()} is still in use by {holder(path)} "
                                      f"after {wait_s:g} s")
                time.sleep(poll_s)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "by": by}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # a released lock names nobody
    finally:
        os.close(fd)  # closing the last descriptor releases the flock
