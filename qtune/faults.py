"""Fault injection for crash tests: make a qtune process die, as `kill -9` would, at a point.

``QTUNE_FAULT=<point>[:<n>]`` kills the process (SIGKILL: no cleanup, no ``finally``) the n-th
time (default: first) it reaches ``fault_point("<point>")``. With ``QTUNE_FAULT_ONCE=<file>`` the
fault fires only while that file does not exist (it is created first), so a restarted worker
survives. ``QTUNE_FAULT_SIGNAL=STOP`` freezes the process there instead (SIGSTOP), for a
test that kills it from outside at a known point. Points: ``score.partition_done``,
``score.before_finalize``, ``score.dedup_written``, ``score.rejects_published``,
``score.published``, ``triage.staged``, ``triage.moved`` (driver), ``score.batch`` (inside a
scoring actor).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

FAULT_ENV = "QTUNE_FAULT"
FAULT_ONCE_ENV = "QTUNE_FAULT_ONCE"
FAULT_SIGNAL_ENV = "QTUNE_FAULT_SIGNAL"
_reached: Counter[str] = Counter()


def fault_point(name: str) -> None:
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
    stop = os.environ.get(FAULT_SIGNAL_ENV, "").upper() == "STOP"
    os.kill(os.getpid(), signal.SIGSTOP if stop else signal.SIGKILL)
