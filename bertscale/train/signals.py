"""Stop signals: SIGTERM/SIGINT become a flag the training loop polls between steps, so a stopped run checkpoints
and exits while the scheduler's grace period lasts (the loop agrees on the flag over all ranks)."""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop polls, so it can checkpoint and exit between steps.

    Launchers relay a stop, so one event often arrives twice (Ctrl-C reaches the ranks from the terminal and
    again as SIGTERM from the launcher): repeats are ignored, except a SIGINT at least `force_after_s` after
    the first signal, which restores the previous handler's behaviour (Ctrl-C pressed again kills).
    """

    def __init__(self, force_after_s: float = 2.0) -> None:
        self.received: int | None = None
        self.force_after_s = force_after_s
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self._first_at = signum, time.monotonic()
            log.warning("received %s: checkpointing after the current step, then stopping",
                        signal.Signals(signum).name)
        elif signum == signal.SIGINT and time.monotonic() - self._first_at >= self.force_after_s:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
