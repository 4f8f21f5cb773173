"""OutputLock: one writer per output directory; live holders refuse, stale locks are taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qtune.pipeline import lock as lock_module
from qtune.pipeline.lock import OutputLock, OutputLockedError

LOGGER = "qtune.pipeline.lock"
HAS_PROC = Path("/proc/self/stat").exists()


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


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process (not even a zombie)
    return proc.pid


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """A live process on this host that is not a lock owner."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


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
    holder_script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from qtune.pipeline.lock import OutputLock
        with OutputLock(Path({str(lock_path)!r}), "qtune run holder"):
            time.sleep(60)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_script])
    try:
        wait_for(lambda: lock_path.exists() and lock_path.read_text().endswith("\n"))
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
    finally:
        holder.kill()  # SIGKILL: no release runs, the lock file stays behind
        holder.wait()
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
    lock_path: Path, sleeper: subprocess.Popen, caplog: pytest.LogCaptureFixture
) -> None:
    # The pid was reused: a live process holds it, but not the one that wrote the lock.
    real = proc_start_time(sleeper.pid)
    write_lock(lock_path, pid=sleeper.pid, start_time=real - 1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with OutputLock(lock_path, "qtune run"):
            assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert "another process" in caplog.text and f"pid {sleeper.pid}" in caplog.text


def test_live_pid_with_matching_start_time_refuses(
    lock_path: Path, sleeper: subprocess.Popen
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
    lock_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    lock_path.parent.mkdir(parents=True)
    lock_path.write_text(content)
    an_hour_ago = time.time() - 3600
    os.utime(lock_path, (an_hour_ago, an_hour_ago))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with OutputLock(lock_path, "qtune run"):
            assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert time.monotonic() - started < 1.0  # old enough: no waiting
    assert "unreadable" in caplog.text


def test_fresh_unreadable_lock_is_waited_on_then_taken_over(
    lock_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(lock_module, "CORRUPT_GRACE_S", 0.3)
    lock_path.parent.mkdir(parents=True)
    lock_path.write_text("")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with OutputLock(lock_path, "qtune run"):
            pass
    assert time.monotonic() - started >= 0.25
    assert "unreadable" in caplog.text


def test_fresh_unreadable_lock_that_its_writer_completes_refuses(
    lock_path: Path, sleeper: subprocess.Popen
) -> None:
    # A process between O_EXCL create and write: once written, its live owner holds the lock.
    lock_path.parent.mkdir(parents=True)
    lock_path.write_text("")
    fields: dict[str, object] = {"pid": sleeper.pid}
    if HAS_PROC:
        fields["start_time"] = proc_start_time(sleeper.pid)
    writer = threading.Timer(0.2, write_lock, args=(lock_path,), kwargs=fields)
    writer.start()
    try:
        with pytest.raises(OutputLockedError, match=f"pid {sleeper.pid}"):
            with OutputLock(lock_path, "qtune run"):
                pass
    finally:
        writer.cancel()
        writer.join()


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
    go, log = tmp_path / "go", tmp_path / "log"
    racer = textwrap.dedent(
        f"""
        import os, time
        from pathlib import Path
        from qtune.pipeline.lock import OutputLock, OutputLockedError
        go, log = Path({str(go)!r}), Path({str(log)!r})
        def note(event):
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.write(fd, f"{{event}} {{os.getpid()}} {{time.monotonic()}}\\n".encode())
            os.close(fd)
        while not go.exists():
            time.sleep(0.001)
        try:
            with OutputLock(Path({str(lock_path)!r}), "racer"):
                note("enter")
                time.sleep(0.3)
                note("exit")
        except OutputLockedError:
            note("refused")
        """
    )
    racers = [
        subprocess.Popen([sys.executable, "-c", racer], stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    time.sleep(1.0)  # let them import and spin on the start flag
    go.touch()
    stderr = [r.communicate(timeout=60)[1] for r in racers]
    assert all(r.returncode == 0 for r in racers), stderr
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
