"""OutputLock: one writer per output directory; live holders refuse, stale locks are taken over.

These tests run beside a loaded machine (the full suite in parallel), so none waits for a duration:
a child process says when it is ready on a pipe and blocks on a pipe until released, and the lock's
own waiting (its poll loop, its grace period for a half-written file) runs on :class:`FakeClock`.
The only timeouts left are hang guards, far above any plausible run, that fail with a message.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from qtune.pipeline import lock as lock_module
from qtune.pipeline.lock import OutputLock, OutputLockedError

LOGGER = "qtune.pipeline.lock"
HAS_PROC = Path("/proc/self/stat").exists()

#: Bound on every wait for another process, so that a hung test fails instead of stalling the suite.
#: Not a duration anything is expected to take: children report readiness, and exit, in well under
#: a second on an idle machine.
HANG_GUARD_S = 600.0
#: What a child writes on its stdout once it is where the test needs it.
READY = b"ready\n"


def write_lock(path: Path, **fields: object) -> dict[str, object]:
    """A lock file as another process would have left it; ``fields`` override the defaults."""
    record: dict[str, object] = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": "2025-01-01T00:00:00+00:00",
        "command": "qtune run other",
        "token": uuid.uuid4().hex,
    }
    record.update(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record


def proc_start_time(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rfind(")") + 2 :].split()[19])


class FakeClock:
    """Stands in for the lock module's ``time``: no call waits, and both clocks move only by sleeps.

    ``sleep`` records its argument, runs ``on_sleep`` (the test's hook into "while the lock waits",
    given the number of sleeps so far), then moves the wall and monotonic clocks on together, so a
    grace period elapses exactly when the lock's own arithmetic says, whatever the machine's load.
    """

    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.mono = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[int], None] | None = None

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))
        self.wall += seconds
        self.mono += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The lock module's clock and sleep, replaced by a :class:`FakeClock` starting at now."""
    fake = FakeClock(wall=time.time())
    monkeypatch.setattr(lock_module, "time", fake)
    return fake


def reap(proc: subprocess.Popen[bytes], what: str) -> str:
    """Wait for ``proc`` to exit (closing its stdin first, if piped); return its stderr."""
    try:
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(
            f"{what} (pid {proc.pid}) was still running after {HANG_GUARD_S:.0f}s (hang guard): "
            f"it should have exited on its own in well under a second"
        )
    return (err or b"").decode(errors="replace")


def kill_and_reap(proc: subprocess.Popen[bytes], what: str) -> str:
    """SIGKILL ``proc`` (no cleanup runs in it) and reap it; return its stderr."""
    proc.kill()
    return reap(proc, what)


@contextmanager
def child(script: str, what: str, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A Python child running ``script``, with piped stdin/stdout/stderr unless ``popen`` says
    otherwise; killed and reaped on exit, whatever happened in the block.

    A child that blocks on ``sys.stdin.read()`` lives until then, however slow the test, and also
    exits if the test process dies (its stdin reaches EOF).
    """
    pipes: dict[str, Any] = dict.fromkeys(("stdin", "stdout", "stderr"), subprocess.PIPE)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], **{**pipes, **popen})
    try:
        yield proc
    finally:
        if proc.returncode is None:
            kill_and_reap(proc, what)


def await_ready(proc: subprocess.Popen[bytes], what: str) -> None:
    """Block until ``proc`` writes :data:`READY` on its stdout; fail with its stderr otherwise."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()  # raw reads: nothing is left in the Popen's buffer for communicate
    readable, _, _ = select.select([fd], [], [], HANG_GUARD_S)
    got = os.read(fd, len(READY)) if readable else None
    if got == READY:
        return
    if got is None:
        why = f"nothing in {HANG_GUARD_S:.0f}s (hang guard)"
    elif not got:
        why = "it exited first"
    else:
        why = f"it wrote {got!r} instead of {READY!r}"
    err = kill_and_reap(proc, what)
    pytest.fail(
        f"{what} (pid {proc.pid}) did not report ready: {why}; exit status {proc.returncode}; "
        f"stderr:\n{err}"
    )


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.DEVNULL)
    reap(proc, "short-lived child")  # reaped: the pid names no process (not even a zombie)
    return proc.pid


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process on this host that is not a lock owner: it blocks on stdin until teardown."""
    with child("import sys; sys.stdin.read()", "idle child") as proc:
        yield proc


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "out" / ".qtune.lock"


def test_acquire_writes_owner_and_release_removes(lock_path: Path) -> None:
    assert not lock_path.parent.exists()  # created on entry
    with OutputLock(lock_path, "qtune run cfg.yaml") as held:
        assert isinstance(held, OutputLock)
        record = json.loads(lock_path.read_text())
        assert record["pid"] == os.getpid()
        assert record["host"] == socket.gethostname()
        assert record["command"] == "qtune run cfg.yaml"
        assert len(record["token"]) == 32
        assert record["started"].endswith("+00:00")
        if HAS_PROC:
            assert record["start_time"] == proc_start_time(os.getpid())
    assert not lock_path.exists()
    assert list(lock_path.parent.iterdir()) == []  # nothing left aside


def test_live_holder_in_another_process_refuses_then_dead_one_is_taken_over(
    lock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder_script = f"""
        import sys
        from pathlib import Path
        from qtune.pipeline.lock import OutputLock
        with OutputLock(Path({str(lock_path)!r}), "qtune run holder"):
            sys.stdout.buffer.write({READY!r})
            sys.stdout.flush()
            sys.stdin.read()  # hold the lock until the test kills us (or goes away)
        """
    with child(holder_script, "lock holder") as holder:
        await_ready(holder, "lock holder")
        with pytest.raises(OutputLockedError) as info:
            with OutputLock(lock_path, "qtune run second"):
                pytest.fail("entered a lock held by a live process")
        message = str(info.value)
        assert f"pid {holder.pid}" in message
        assert socket.gethostname() in message
        assert "qtune run holder" in message
        assert str(lock_path) in message
        assert f"kill {holder.pid}" in message
        assert info.value.holder is not None and info.value.holder["pid"] == holder.pid
        assert info.value.lock_path == lock_path.parent.resolve() / lock_path.name
        kill_and_reap(holder, "lock holder")  # SIGKILL: no release runs, the lock file stays
    assert json.loads(lock_path.read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with OutputLock(lock_path, "qtune run second"):
            assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text


def test_lock_of_dead_pid_is_taken_over_with_warning(
    lock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid = dead_pid()
    write_lock(lock_path, pid=pid, command="qtune run crashed")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with OutputLock(lock_path, "qtune run"):
            assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert not lock_path.exists()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"pid {pid}" in warnings[0].getMessage()
    assert "qtune run crashed" in warnings[0].getMessage()
    assert sorted(p.name for p in lock_path.parent.iterdir()) == []


@pytest.mark.skipif(not HAS_PROC, reason="start times come from /proc")
def test_live_pid_with_other_start_time_is_stale(
    lock_path: Path, sleeper: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    # The pid was reused: a live process holds it, but not the one that wrote the lock.
    real = proc_start_time(sleeper.pid)
    write_lock(lock_path, pid=sleeper.pid, start_time=real - 1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with OutputLock(lock_path, "qtune run"):
            assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert "another process" in caplog.text and f"pid {sleeper.pid}" in caplog.text


def test_live_pid_with_matching_start_time_refuses(
    lock_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    fields: dict[str, object] = {"pid": sleeper.pid}
    if HAS_PROC:
        fields["start_time"] = proc_start_time(sleeper.pid)
    written = write_lock(lock_path, **fields)
    with pytest.raises(OutputLockedError, match=f"pid {sleeper.pid}"):
        OutputLock(lock_path, "qtune run").__enter__()
    assert json.loads(lock_path.read_text()) == written  # untouched


def test_lock_from_other_host_refuses_with_removal_hint(lock_path: Path) -> None:
    written = write_lock(lock_path, pid=dead_pid(), host="gpu-node-17")
    with pytest.raises(OutputLockedError) as info:
        with OutputLock(lock_path, "qtune run"):
            pass
    message = str(info.value)
    assert "gpu-node-17" in message and f"pid {written['pid']}" in message
    assert f"delete {lock_path.parent.resolve() / lock_path.name}" in message
    assert json.loads(lock_path.read_text()) == written


def test_reentrant_in_one_process_keyed_on_resolved_path(lock_path: Path) -> None:
    lock_path.parent.mkdir(parents=True)
    alias = lock_path.parent / ".." / lock_path.parent.name / lock_path.name
    with OutputLock(lock_path, "qtune run"):
        token = json.loads(lock_path.read_text())["token"]
        with OutputLock(alias, "qtune score"):
            with OutputLock(lock_path, "qtune triage"):
                pass
            assert json.loads(lock_path.read_text())["token"] == token
        assert lock_path.exists()
    assert not lock_path.exists()
    with OutputLock(lock_path, "qtune run"):  # fully released: can be taken again
        assert json.loads(lock_path.read_text())["token"] != token


def test_release_leaves_a_lock_whose_token_was_replaced(
    lock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with OutputLock(lock_path, "qtune run"):
            other = write_lock(lock_path, command="qtune run other")
    assert json.loads(lock_path.read_text()) == other
    assert "no longer holds" in caplog.text


def test_release_of_a_lock_removed_by_hand_warns(
    lock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with OutputLock(lock_path, "qtune run"):
            lock_path.unlink()
    assert "vanished" in caplog.text


@pytest.mark.parametrize("content", ["", '{"pid": 12', '{"pid": 0, "host": "x"}', "[]"])
def test_old_unreadable_lock_is_taken_over(
    lock_path: Path, content: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    lock_path.parent.mkdir(parents=True)
    lock_path.write_text(content)
    an_hour_ago = clock.wall - 3600
    os.utime(lock_path, (an_hour_ago, an_hour_ago))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with OutputLock(lock_path, "qtune run"):
            assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert clock.sleeps == []  # old enough: taken over at first sight, no waiting
    assert "unreadable" in caplog.text


@pytest.mark.parametrize(
    "mtime_offset",
    [0.0, 3600.0],
    ids=["just-written", "writer-clock-an-hour-ahead"],
)
def test_fresh_unreadable_lock_is_waited_on_then_taken_over(
    lock_path: Path,
    mtime_offset: float,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A writer's clock ahead of ours makes the file look ever younger: our own clock ends the wait.
    monkeypatch.setattr(lock_module, "CORRUPT_GRACE_S", 0.3)
    lock_path.parent.mkdir(parents=True)
    lock_path.write_text("")
    mtime = clock.wall + mtime_offset
    os.utime(lock_path, (mtime, mtime))
    seen_while_waiting: list[str] = []
    clock.on_sleep = lambda _: seen_while_waiting.append(lock_path.read_text())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with OutputLock(lock_path, "qtune run"):
            assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    grace, poll = lock_module.CORRUPT_GRACE_S, lock_module._POLL_S
    waited = sum(clock.sleeps)
    assert waited >= grace - 1e-6, f"taken over after {waited}s, before the {grace}s grace"
    assert waited < grace + 2 * poll, f"waited {waited}s, past the first look after the grace"
    assert seen_while_waiting == [""] * len(clock.sleeps)  # left in place throughout the wait
    assert "unreadable" in caplog.text


def test_default_grace_is_waited_out_within_the_attempt_limit(
    lock_path: Path, clock: FakeClock
) -> None:
    lock_path.parent.mkdir(parents=True)
    # A writer that crashed between create and write. (Waiting out the grace used to count as
    # attempts: the lock gave up after 2.5 s, before the 3 s grace, blaming contention.)
    lock_path.write_text("")
    os.utime(lock_path, (clock.wall, clock.wall))
    with OutputLock(lock_path, "qtune run"):
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert sum(clock.sleeps) >= lock_module.CORRUPT_GRACE_S - 1e-6


def test_fresh_unreadable_lock_that_its_writer_completes_refuses(
    lock_path: Path, sleeper: subprocess.Popen[bytes], clock: FakeClock
) -> None:
    # A process between O_EXCL create and write: once written, its live owner holds the lock.
    lock_path.parent.mkdir(parents=True)
    lock_path.write_text("")
    os.utime(lock_path, (clock.wall, clock.wall))
    fields: dict[str, object] = {"pid": sleeper.pid}
    if HAS_PROC:
        fields["start_time"] = proc_start_time(sleeper.pid)
    written: list[dict[str, object]] = []

    def complete_the_write(sleeps: int) -> None:
        if sleeps == 1:  # the writer finishes while the lock waits for the first time
            written.append(write_lock(lock_path, **fields))

    clock.on_sleep = complete_the_write
    with pytest.raises(OutputLockedError, match=f"pid {sleeper.pid}"):
        with OutputLock(lock_path, "qtune run"):
            pytest.fail("entered a lock whose live owner finished writing it")
    assert len(clock.sleeps) == 1  # judged at the next look, long before the grace ran out
    assert json.loads(lock_path.read_text()) == written[0]  # untouched


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_is_not_an_owner(lock_path: Path) -> None:
    with OutputLock(lock_path, "qtune run") as outer:
        pid = os.fork()
        if pid == 0:  # child: must never return into pytest
            code = 1
            try:
                try:
                    with OutputLock(lock_path, "ray worker"):
                        code = 2  # took the parent's lock as its own
                except OutputLockedError:
                    outer.__exit__(None, None, None)  # leaving the inherited block
                    code = 0 if lock_path.exists() else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert not lock_path.exists()


def test_racing_takeovers_of_one_stale_lock_admit_one_holder_at_a_time(
    lock_path: Path, tmp_path: Path
) -> None:
    write_lock(lock_path, pid=dead_pid())
    log = tmp_path / "log"
    # The start gun: every racer blocks reading this pipe, and closing its only write end wakes
    # them all at once (EOF), however long each took to start.
    go_read, go_write = os.pipe()
    racer = f"""
        import os, sys, time
        from pathlib import Path
        from qtune.pipeline.lock import OutputLock, OutputLockedError
        log = Path({str(log)!r})
        def note(event):
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.write(fd, f"{{event}} {{os.getpid()}} {{time.monotonic()}}\\n".encode())
            os.close(fd)
        sys.stdout.buffer.write({READY!r})
        sys.stdout.flush()
        os.read({go_read}, 1)
        try:
            with OutputLock(Path({str(lock_path)!r}), "racer"):
                note("enter")
                time.sleep(0.3)  # hold a while, so that a second holder would overlap this one
                note("exit")
        except OutputLockedError:
            note("refused")
        """
    with ExitStack() as stack:
        go_r = stack.enter_context(os.fdopen(go_read, "rb"))
        gun = stack.enter_context(os.fdopen(go_write, "wb"))  # closed on failure too: no orphans
        racers = [
            stack.enter_context(
                child(racer, f"racer {i}", stdin=subprocess.DEVNULL, pass_fds=(go_read,))
            )
            for i in range(6)
        ]
        go_r.close()  # only the racers read it
        for i, proc in enumerate(racers):
            await_ready(proc, f"racer {i}")
        gun.close()  # all of them imported and waiting: release them together
        stderr = [reap(proc, f"racer {i}") for i, proc in enumerate(racers)]
    assert all(proc.returncode == 0 for proc in racers), stderr
    events = [line.split() for line in log.read_text().splitlines()]
    kinds = [e[0] for e in events]
    assert kinds.count("enter") + kinds.count("refused") == len(racers)  # each racer, one outcome
    assert kinds.count("exit") == kinds.count("enter") >= 1
    # Holders never overlap: in time order, every enter is followed by its own exit.
    inside = None
    for event, pid, _ in sorted(events, key=lambda e: float(e[2])):
        if event == "enter":
            assert inside is None, f"{pid} entered while {inside} held the lock"
            inside = pid
        elif event == "exit":
            assert inside == pid
            inside = None
    assert sum("taking over stale output lock" in s for s in stderr) == 1
    assert not lock_path.exists()
    assert sorted(p.name for p in lock_path.parent.iterdir()) == []
