"""One writer per output directory: an exclusive lock file owned by one qtune process.

Two ``qtune run`` on one output directory would interleave shards, markers and the manifest, so a
command that writes there holds an :class:`OutputLock` for as long as it runs. The lock file is
JSON::

    {"pid": 4242, "host": "node-3", "started": "2025-01-01T12:00:00+00:00",
     "command": "qtune run ...", "token": "<random hex>", "start_time": 123456}

``start_time`` is field 22 of ``/proc/<pid>/stat`` (clock ticks after boot; absent without
``/proc``): a pid can be reused after its owner died, and the pair (pid, start time) cannot.

Taking a lock, in order:

- ``os.open(O_CREAT | O_EXCL)``, write, ``fsync``: the first process wins.
- Otherwise the existing lock is read, and refuses with :class:`OutputLockedError` when its owner
  is alive on this host or lives on another host (whose processes cannot be seen from here).
- A lock whose owner is gone (dead pid, zombie, or a pid now carrying another start time), or a
  file that is still unreadable a few seconds after it was written (its writer crashed mid-write),
  is stale: it is taken over with a warning. The takeover holds ``flock`` on the stale file, checks
  that the path still names that file, and renames it aside, so of several processes taking over
  one stale lock exactly one removes it, and none removes a lock taken in between.

Nested locks on one path in one process (``run`` calls ``score`` then ``triage``, each of which
locks) only count; the outermost exit removes the file, and only if it still holds our token.
The count is keyed on ``os.getpid()``, so a child forked by the owner (a Ray worker) is not an
owner: its own ``OutputLock`` refuses, and its exit removes nothing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qtune.pipeline.errors import PipelineError, one_line

logger = logging.getLogger(__name__)

#: An unreadable lock file younger than this may be mid-write by its creator: wait this long
#: (measured on its mtime, and on our own clock against skew) before treating it as stale.
CORRUPT_GRACE_S = 3.0
_POLL_S = 0.05
# Each retry follows a lock that vanished or a stale one removed; only a storm of stale locks
# written by others exhausts this.
_MAX_ATTEMPTS = 50


class OutputLockedError(RuntimeError):
    """Another process holds the output directory's lock (or it could not be taken)."""

    def __init__(self, message: str, lock_path: Path, holder: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.lock_path = lock_path
        self.holder = holder


@dataclass
class _Held:
    pid: int
    token: str
    depth: int


# Locks held by this process, keyed on the resolved lock path. Entries carry the pid that took
# them: after a fork, the child's copy of this dict names the parent and is ignored.
_HELD: dict[Path, _Held] = {}
_HELD_GUARD = threading.Lock()


def _reset_guard_in_child() -> None:
    # A fork while another thread held the guard would leave the child's copy locked forever.
    global _HELD_GUARD
    _HELD_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_reset_guard_in_child)


class OutputLock:
    """Context manager: exclusive ownership of an output directory for one qtune process.

    ``command`` is recorded in the lock file so that a refused user sees what holds it. The parent
    directory of ``lock_path`` is created if missing. Raises :class:`OutputLockedError` on entry
    when another live process (or another host) holds the lock.
    """

    def __init__(self, lock_path: Path, command: str) -> None:
        self.lock_path = Path(lock_path)
        self.command = command
        self._key: Path | None = None

    def __enter__(self) -> OutputLock:
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            key = self.lock_path.parent.resolve() / self.lock_path.name
            with _HELD_GUARD:
                held = _HELD.get(key)
                if held is not None and held.pid == os.getpid():
                    held.depth += 1
                else:
                    token = _acquire(key, self.command)
                    _HELD[key] = _Held(pid=os.getpid(), token=token, depth=1)
        except OSError as e:  # read-only, a file in the way, a full disk: not "locked"
            raise PipelineError(
                f"output directory {self.lock_path.parent} cannot be written: {one_line(e)}"
            ) from e
        self._key = key
        return self

    def __exit__(self, *exc: object) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is None or held.pid != os.getpid():
                return  # a forked child leaving the parent's block: the lock is not its own
            held.depth -= 1
            if held.depth > 0:
                return
            del _HELD[key]
            _release(key, held.token)


def _acquire(path: Path, command: str) -> str:
    """Create the lock file at ``path`` and return its token; take over a stale one."""
    token = uuid.uuid4().hex
    record: dict[str, Any] = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "token": token,
    }
    start_time = _process_start_time(os.getpid())
    if start_time is not None:
        record["start_time"] = start_time
    payload = (json.dumps(record, sort_keys=True) + "\n").encode()

    first_unreadable: float | None = None  # monotonic time an unreadable lock was first seen
    attempts = 0
    # Waiting out the grace of an unreadable lock is not an attempt: only contention counts.
    while attempts < _MAX_ATTEMPTS:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            _write_lock(fd, path, payload)
            return token
        outcome = _take_over_if_stale(path, first_unreadable)
        if outcome == "unreadable":
            if first_unreadable is None:
                first_unreadable = time.monotonic()
            time.sleep(_POLL_S)
            continue
        attempts += 1  # "gone": the lock vanished or was moved aside; retry the exclusive create
    raise OutputLockedError(
        f"could not take the output lock {path} in {_MAX_ATTEMPTS} attempts: other processes keep "
        f"creating it. Check which qtune processes write to {path.parent}",
        path,
        None,
    )


def _write_lock(fd: int, path: Path, payload: bytes) -> None:
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)  # ours: created O_EXCL just now
        raise
    os.close(fd)


def _take_over_if_stale(path: Path, first_unreadable: float | None) -> str:
    """Judge the lock at ``path``; remove it when stale.

    Returns ``"gone"`` when the path no longer holds the judged file (it vanished, or a stale lock
    was moved aside), ``"unreadable"`` when it is too fresh to judge yet. Raises
    :class:`OutputLockedError` when the lock is held.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "gone"
    try:
        # Serialise judges of this one file: a takeover renames it while holding the flock, and
        # a judge that waited then sees the path name another file (or none) and starts over.
        # A dead holder's flock is released by the kernel, so this cannot wedge.
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # e.g. an NFS mount without lock support: the inode checks remain
            logger.debug("flock on %s failed (%s); taking over without it", path, e)
        st = os.fstat(fd)
        if not _same_file(path, st):
            return "gone"
        text = _read_all(fd)
        record = _parse(text)
        if record is None:
            age = time.time() - st.st_mtime
            waited = 0.0 if first_unreadable is None else time.monotonic() - first_unreadable
            if age < CORRUPT_GRACE_S and waited < CORRUPT_GRACE_S:
                return "unreadable"
            reason = f"the lock file is unreadable ({text[:80]!r}) {age:.0f}s after it was written"
        else:
            reason = _stale_reason(path, record)
        _move_aside(path, st, reason, record)
        return "gone"
    finally:
        os.close(fd)


def _stale_reason(path: Path, record: dict[str, Any]) -> str:
    """Why the owner in ``record`` is gone; raise :class:`OutputLockedError` if it may be alive."""
    pid, host = record["pid"], record["host"]
    owner = (
        f"pid {pid} on host {host}, since {record.get('started')}, "
        f"running {record.get('command')!r}"
    )
    here = socket.gethostname()
    if host != here:
        raise OutputLockedError(
            f"output directory {path.parent} is locked by another qtune process: {owner} "
            f"(lock file {path}). This host ({here}) cannot see that host's processes: wait for "
            f"it to finish, or, if that process is known to be gone, delete {path} and rerun",
            path,
            record,
        )
    alive, state = _pid_state(pid)
    if not alive:
        return f"its owner ({owner}) is no longer running"
    if state == "Z":
        return f"its owner ({owner}) has exited (zombie)"
    recorded = record.get("start_time")
    current = _process_start_time(pid)
    if recorded is not None and current is not None and recorded != current:
        return (
            f"pid {pid} now belongs to another process (start time {current}, the owner's was "
            f"{recorded}); its owner ({owner}) is gone"
        )
    raise OutputLockedError(
        f"output directory {path.parent} is locked by another qtune process: {owner} "
        f"(lock file {path}). Wait for it to finish or stop it (kill {pid}); a lock left by a "
        f"process that died is taken over automatically",
        path,
        record,
    )


def _move_aside(path: Path, st: os.stat_result, reason: str, record: dict[str, Any] | None) -> None:
    """Remove the stale lock ``st`` at ``path``; put back anything else moved by mistake."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # removed by someone not serialised by our flock (an owner's release): retry
    moved = os.stat(aside)
    if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
        # A fresh lock replaced the stale one between our check and the rename: restore it
        # unless yet another lock already took the path.
        try:
            os.link(aside, path)
        except FileExistsError:
            logger.warning("lock %s was replaced while being taken over; retrying", path)
        aside.unlink(missing_ok=True)
        return
    aside.unlink(missing_ok=True)
    logger.warning(
        "taking over stale output lock %s: %s (lock content: %s)",
        path,
        reason,
        json.dumps(record, sort_keys=True) if record is not None else "unreadable",
    )


def _release(path: Path, token: str) -> None:
    """Remove the lock file at ``path`` only if it still holds ``token``."""
    try:
        record = _parse(path.read_text())
    except FileNotFoundError:
        logger.warning("output lock %s vanished before release (removed by hand?)", path)
        return
    if record is None or record.get("token") != token:
        logger.warning(
            "output lock %s no longer holds this process's token (now: %s); left in place",
            path,
            record,
        )
        return
    path.unlink(missing_ok=True)


def _same_file(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _parse(text: str) -> dict[str, Any] | None:
    """The lock record, or None when it is not one (empty, truncated, foreign)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    pid, host = record.get("pid"), record.get("host")
    # pid 0 or negative would make os.kill signal a process group, not test one process.
    if type(pid) is not int or pid <= 0 or not isinstance(host, str):
        return None
    start_time = record.get("start_time")
    if start_time is not None and type(start_time) is not int:
        return None
    return record


def _pid_state(pid: int) -> tuple[bool, str | None]:
    """(alive, /proc state letter or None). PermissionError means alive under another user."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:
        pass
    fields = _proc_stat_fields(pid)
    return True, fields[0] if fields else None


def _process_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks after boot), if readable."""
    fields = _proc_stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat``; None without ``/proc`` or once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 is "(comm)", which may itself contain spaces and parentheses: split after the last.
    return text[text.rfind(")") + 2 :].split()
