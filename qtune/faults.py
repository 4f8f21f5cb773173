"""Fault injection for crash tests: make a qtune process die, as `kill -9` would, at a point.

``QTUNE_FAULT=<point>[:<n>]`` kills the process (SIGKILL: no cleanup, no ``finally``) the n-th
time (default: first) it reaches ``fault_point("<point>")``. With ``QTUNE_FAULT_ONCE=<file>`` the
fault fires only while that file does not exist (it is created first), so a restarted worker
survives. ``QTUNE_FAULT_SIGNAL=STOP`` freezes the process there instead (SIGSTOP), for a
test that kills it from outside at a known point; ``QTUNE_FAULT_DELAY=<seconds>`` makes that
step slow instead (the process sleeps there, then goes on), for a test that whatever comes next
waits for the step. ``QTUNE_FAULT_TRACE=<file>`` appends one line ``<point> <pid>`` to that
file each time any process reaches any point (before a fault fires there), so a test can tell
what happened, and in how many processes, without timing anything. Points:
``score.partition_done``, ``score.before_finalize``, ``score.dedup_written``,
``score.rejects_published``, ``score.published``, ``triage.staged``, ``triage.moved`` (driver),
``score.backend_start``, ``score.batch``, ``score.backend_closing``, ``score.backend_closed``
(inside a scoring actor).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

FAULT_ENV = "QTUNE_FAULT"
FAULT_ONCE_ENV = "QTUNE_FAULT_ONCE"
FAULT_SIGNAL_ENV = "QTUNE_FAULT_SIGNAL"
FAULT_DELAY_ENV = "QTUNE_FAULT_DELAY"
FAULT_TRACE_ENV = "QTUNE_FAULT_TRACE"
_reached: Counter[str] = Counter()


def fault_point(name: str) -> None:
    trace = os.environ.get(FAULT_TRACE_ENV)
    if trace:
        _trace(trace, name)
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] != int(nth or 1):
        return
    once = os.environ.get(FAULT_ONCE_ENV)
    if once:
        try:
            Path(once).touch(exist_ok=False)
        except FileExistsError:
            return
    delay = os.environ.get(FAULT_DELAY_ENV)
    if delay:
        time.sleep(float(delay))
        return
    stop = os.environ.get(FAULT_SIGNAL_ENV, "").upper() == "STOP"
    os.kill(os.getpid(), signal.SIGSTOP if stop else signal.SIGKILL)


def _trace(path: str, name: str) -> None:
    # One write of one short line to a file opened with O_APPEND: lines from several processes
    # never interleave, and the line is in the file before a fault kills the process.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{name} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def read_trace(path: str | Path) -> list[tuple[str, int]]:
    """The (point, pid) pairs a ``QTUNE_FAULT_TRACE`` file holds, in the order reached."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [(point, int(pid)) for point, pid in (line.split() for line in lines)]
