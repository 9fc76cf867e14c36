"""Progress bars for the long loops of every stage, with one decision, made here, on whether and how often they draw.

- Only the main process draws: rank 0 of a distributed job, the launcher of a Beam or data job, never a worker of
  a process pool (a spawned worker's bar would fight the others' on the same terminal line).
  `BERTSCALE_PROGRESS=0` switches every bar off.
- On a terminal a bar redraws at most once a second. Into anything else (a log file, the pipe through which a
  launcher or a Prefect worker reads a job's output) it draws at most every 30 s, so a run of hours leaves a line
  per half minute, not one per step; `bertscale.train.launch.output_lines` then keeps only a bar's last state.
- Bars write to stderr, never through `logging`: a flow run's log gets the stages' log records (milestones such as
  "shard 3/8 built"), not the redraws. While a bar is drawn on a terminal, `logs_above` prints log records above
  it instead of through it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator
from typing import IO

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

SWITCH = "BERTSCALE_PROGRESS"  # 0 / false / off / no: no bars
TERMINAL_INTERVAL_S = 1.0
LOG_INTERVAL_S = 30.0
_OFF = {"0", "false", "off", "no"}

ProgressBar = tqdm


def progress_enabled(is_main: bool | None = None) -> bool:
    """Whether this process draws bars: the main one (by default: not a multiprocessing worker), unless switched
    off by BERTSCALE_PROGRESS."""
    if is_main is None:
        is_main = multiprocessing.parent_process() is None
    return is_main and os.environ.get(SWITCH, "1").strip().lower() not in _OFF


def is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def redraw_interval(stream: IO[str]) -> float:
    """Seconds between redraws: once a second on a terminal, every 30 s into a log or a pipe."""
    return TERMINAL_INTERVAL_S if is_terminal(stream) else LOG_INTERVAL_S


def progress_bar(total: float | None, desc: str, unit: str, *, initial: int = 0, is_main: bool | None = None,
                 enabled: bool = True, stream: IO[str] | None = None, **kwargs) -> ProgressBar:
    """A tqdm bar on stderr drawn as the module doc says; a disabled bar (every method a no-op) where this process
    does not draw or the caller passes `enabled=False`. Extra keyword arguments go to tqdm."""
    out = stream if stream is not None else sys.stderr
    interval = redraw_interval(out)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=out, dynamic_ncols=True,
                mininterval=interval, maxinterval=max(interval, 10.0),
                disable=not (enabled and progress_enabled(is_main)), **kwargs)


@contextlib.contextmanager
def logs_above(bar: ProgressBar) -> Iterator[None]:
    """While `bar` is drawn on a terminal, log records printed to the console go above it, not through it."""
    root = logging.getLogger()
    console = any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
                  for h in root.handlers)
    if bar.disable or not is_terminal(bar.fp) or not console:
        yield
        return
    with logging_redirect_tqdm(loggers=[root], tqdm_class=type(bar)):
        yield
