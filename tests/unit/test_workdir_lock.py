"""The workdir lock between two processes: a second run waits or is refused with the holder named, the holds
never overlap, and a killed holder leaves no stale lock."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time

import pytest

from bertscale.workdir_lock import LOCK_FILE, WorkdirBusy, hold

# spawn, not fork: a test process that has run the suite holds threads (loggers, progress, servers' clients), and
# a forked child of it can fail on their state.
_mp = multiprocessing.get_context("spawn")


def _hold_until_told(workdir: str, held, release) -> None:
    with hold(workdir, by="flow run 'first'"):
        held.set()
        release.wait(30)


def _record(log: str, name: str, seconds: float) -> None:
    with open(log, "a") as f:
        f.write(f"start {name}\n")
    time.sleep(seconds)
    with open(log, "a") as f:
        f.write(f"end {name}\n")


def _hold_and_record(workdir: str, log: str, name: str, seconds: float) -> None:
    with hold(workdir, by=name):
        _record(log, name, seconds)


def _holder(tmp_path):
    held, release = _mp.Event(), _mp.Event()
    proc = _mp.Process(target=_hold_until_told, args=(str(tmp_path), held, release))
    proc.start()
    assert held.wait(30)
    return proc, release


def test_a_second_run_that_does_not_wait_is_refused_with_the_holder_named(tmp_path):
    proc, release = _holder(tmp_path)
    try:
        with pytest.raises(WorkdirBusy, match=rf"in use by flow run 'first', pid {proc.pid} on .*since"):
            with hold(tmp_path, wait_s=0):
                pass
        with pytest.raises(WorkdirBusy, match=r"still in use by flow run 'first'.* after 0.3 s"):
            with hold(tmp_path, wait_s=0.3, poll_s=0.1):
                pass
    finally:
        release.set()
        proc.join(30)
    # Free again: taken at once, and it names its new holder while held, nobody after.
    with hold(tmp_path, wait_s=0, by="second") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_a_waiting_run_starts_after_the_holder_ends_and_holds_never_overlap(tmp_path):
    log = tmp_path / "holds.log"
    first = _mp.Process(target=_hold_and_record, args=(str(tmp_path), str(log), "first", 1.0))
    first.start()
    deadline = time.monotonic() + 30
    while not (log.exists() and "start first" in log.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    second = _mp.Process(target=_hold_and_record, args=(str(tmp_path), str(log), "second", 0.1))
    second.start()
    waited: list[str] = []
    # This process waits too, while `second` is also waiting: three contenders, one holder at a time.
    with hold(tmp_path, on_wait=waited.append, poll_s=0.05):
        _record(str(log), "third", 0.1)
    first.join(30)
    second.join(30)
    assert first.exitcode == second.exitcode == 0
    assert len(waited) == 1 and "in use by first" in waited[0] and "waiting" in waited[0]
    events = [line.split() for line in log.read_text().splitlines()]
    # Every start is followed by the end of the same holder: no interleaving.
    assert len(events) == 6
    for start, end in zip(events[::2], events[1::2]):
        assert start[0] == "start" and end[0] == "end" and start[1] == end[1]
    assert events[0][1] == "first"


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    proc, _ = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    with hold(tmp_path, wait_s=0) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_pipeline_run_that_finds_the_workdir_busy_is_skipped_with_one_line(tmp_path):
    from pipelines.pipeline import pipeline_flow

    lines: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = lines.append
    logger = logging.getLogger("pipelines.pipeline")  # Prefect's logging setup replaces the root's handlers
    logger.addHandler(handler)
    proc, release = _holder(tmp_path)
    try:
        # The flow's own body (no Prefect engine): it must stop before touching any stage directory.
        state = pipeline_flow.fn(overrides=[f"workdir={tmp_path}"], if_busy="skip")
    finally:
        release.set()
        proc.join(30)
        logger.removeHandler(handler)
    assert state.is_cancelled()
    assert state.message.startswith(f"skipped: workdir {tmp_path.resolve()} is in use by flow run 'first', "
                                    f"pid {proc.pid}")
    assert [(r.levelname, r.getMessage()) for r in lines] == [("WARNING", state.message)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
