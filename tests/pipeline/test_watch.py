"""The checkpoint watcher: discovery, completeness, order, exactly-once state, lock, signals.

These test orchestration logic only, so ``rescore`` is a stand-in that records its calls (and, in
the process tests, writes a marker file per call) instead of scoring with a model; completeness
is "trainer_state.json exists", the file a Trainer writes last into ``checkpoint-<step>``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qtune.pipeline import watch as watch_module
from qtune.pipeline.lock import OutputLockedError
from qtune.pipeline.watch import (
    HEARTBEAT_POLLS,
    Watcher,
    WatchError,
    WatchLockError,
    discover_checkpoints,
)

REPO = Path(__file__).resolve().parents[2]
# Every wait below is for an event (a marker file, a state change, a process exit). This bound
# only keeps a hang from blocking the session: far above any plausible duration, even for a child
# that imports under load on a busy 2-core machine. Reaching it fails the test, saying what hung.
HANG_GUARD = 600


def trainer_done(path: Path) -> bool:
    return (path / "trainer_state.json").is_file()


def make_checkpoint(root: Path, step: int, *, complete: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(b"w")
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


class StubRescore:
    """Stand-in for the real rescore: records each call, returns the next epoch."""

    def __init__(self, fail_first: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_first = fail_first

    def __call__(self, checkpoint: Path) -> int:
        self.calls.append(checkpoint.name)
        if self.fail_first and len(self.calls) == 1:
            raise RuntimeError("engine died")
        return len(self.calls)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def state_file(tmp_path) -> Path:
    return tmp_path / "out" / ".watch" / "state.json"


def watcher(run_dir: Path, state_file: Path, rescore, **kwargs) -> Watcher:
    return Watcher(run_dir, state_file, rescore, is_complete=trainer_done, **kwargs)


def read_state(state_file: Path) -> dict:
    return json.loads(state_file.read_text())


def test_discovery_orders_by_step_number_and_ignores_other_entries(run_dir):
    assert discover_checkpoints(run_dir) == []  # training has not created it yet
    for step in (10, 9, 100, 2):
        make_checkpoint(run_dir, step)
    (run_dir / "runs").mkdir()
    (run_dir / "tmp-checkpoint-11").mkdir()  # a Trainer's staging folder
    (run_dir / "checkpoint-abc").mkdir()
    (run_dir / "checkpoint-7").write_text("a file, not a checkpoint")
    (run_dir / "config.json").write_text("{}")
    names = [p.name for p in discover_checkpoints(run_dir)]
    assert names == ["checkpoint-2", "checkpoint-9", "checkpoint-10", "checkpoint-100"]


def test_a_checkpoint_is_processed_only_once_complete(run_dir, state_file):
    rescore = StubRescore()
    w = watcher(run_dir, state_file, rescore)
    ckpt = make_checkpoint(run_dir, 500, complete=False)
    assert w.run_once() == []
    assert rescore.calls == []
    (ckpt / "trainer_state.json").write_text("{}")
    assert w.run_once() == ["checkpoint-500"]
    assert w.run_once() == []
    assert rescore.calls == ["checkpoint-500"]
    state = read_state(state_file)
    assert state["in_progress"] is None
    assert state["done"]["checkpoint-500"]["epoch"] == 1
    assert state["checkpoints_dir"] == str(run_dir.absolute())
    assert not state_file.with_name("state.json.lock").exists()  # released after the round


def test_an_earlier_incomplete_checkpoint_blocks_later_ones(run_dir, state_file):
    rescore = StubRescore()
    w = watcher(run_dir, state_file, rescore)
    first = make_checkpoint(run_dir, 9, complete=False)
    make_checkpoint(run_dir, 10)
    assert w.run_once() == []
    assert rescore.calls == []
    (first / "trainer_state.json").write_text("{}")
    assert w.run_once() == ["checkpoint-9", "checkpoint-10"]
    done = read_state(state_file)["done"]
    assert (done["checkpoint-9"]["epoch"], done["checkpoint-10"]["epoch"]) == (1, 2)


def test_a_checkpoint_older_than_the_newest_done_one_is_ignored(run_dir, state_file):
    rescore = StubRescore()
    make_checkpoint(run_dir, 500)
    assert watcher(run_dir, state_file, rescore).run_once() == ["checkpoint-500"]
    make_checkpoint(run_dir, 300)  # a rewound run; its epoch would break training order
    make_checkpoint(run_dir, 600)
    assert watcher(run_dir, state_file, rescore).run_once() == ["checkpoint-600"]
    assert rescore.calls == ["checkpoint-500", "checkpoint-600"]


def test_a_crashed_rescore_is_rerun_once_by_the_next_watcher(run_dir, state_file):
    make_checkpoint(run_dir, 1)
    make_checkpoint(run_dir, 2)
    crashing = StubRescore(fail_first=True)
    with pytest.raises(RuntimeError, match="engine died"):
        watcher(run_dir, state_file, crashing).run_once()
    state = read_state(state_file)
    assert state["in_progress"] == "checkpoint-1" and state["done"] == {}
    assert not state_file.with_name("state.json.lock").exists()

    restarted = StubRescore()
    assert watcher(run_dir, state_file, restarted).run_once() == ["checkpoint-1", "checkpoint-2"]
    assert restarted.calls == ["checkpoint-1", "checkpoint-2"]
    # Done checkpoints are never re-run, by this watcher or the next one.
    again = StubRescore()
    assert watcher(run_dir, state_file, again).run_once() == []
    assert again.calls == []
    assert read_state(state_file)["in_progress"] is None


class Killed(BaseException):
    """Simulates the process dying right after the rescore published (before the state write)."""


def test_already_published_marks_done_without_rescoring(run_dir, state_file):
    make_checkpoint(run_dir, 1)
    published: dict[str, int] = {}

    def publish_then_die(checkpoint: Path) -> int:
        published[checkpoint.name] = 7
        raise Killed

    with pytest.raises(Killed):
        watcher(run_dir, state_file, publish_then_die).run_once()
    assert read_state(state_file)["in_progress"] == "checkpoint-1"

    rescore = StubRescore()
    w = watcher(
        run_dir,
        state_file,
        rescore,
        already_published=lambda p: published.get(p.name),
        fingerprint=lambda p: f"fp-{p.name}",
    )
    assert w.run_once() == ["checkpoint-1"]
    assert rescore.calls == []
    state = read_state(state_file)
    assert state["in_progress"] is None
    assert state["done"]["checkpoint-1"]["epoch"] == 7
    assert state["done"]["checkpoint-1"]["fingerprint"] == "fp-checkpoint-1"


def test_an_in_progress_checkpoint_that_vanished_is_dropped(run_dir, state_file):
    ckpt = make_checkpoint(run_dir, 1)
    with pytest.raises(RuntimeError):
        watcher(run_dir, state_file, StubRescore(fail_first=True)).run_once()
    for child in ckpt.iterdir():
        child.unlink()
    ckpt.rmdir()  # rotated away by save_total_limit while no watcher ran
    make_checkpoint(run_dir, 2)
    rescore = StubRescore()
    assert watcher(run_dir, state_file, rescore).run_once() == ["checkpoint-2"]
    assert rescore.calls == ["checkpoint-2"]
    assert read_state(state_file)["in_progress"] is None


def test_a_state_file_of_another_run_is_refused(run_dir, state_file, tmp_path):
    make_checkpoint(run_dir, 1)
    watcher(run_dir, state_file, StubRescore()).run_once()
    with pytest.raises(WatchError, match="follows checkpoints in"):
        watcher(tmp_path / "other-run", state_file, StubRescore()).run_once()
    state_file.write_text("{not json")
    with pytest.raises(WatchError, match="unreadable"):
        watcher(run_dir, state_file, StubRescore()).run_once()


# The lock itself (stale takeover, races, reentrancy rules) is tested in test_lock.py; these test
# how the watcher uses it. A live watcher refusing another is in the SIGKILL process test below.


def test_run_holds_one_lock_across_polls_and_releases_it(run_dir, state_file):
    make_checkpoint(run_dir, 1)
    owners: list[dict] = []

    def rescore(checkpoint: Path) -> int:
        owners.append(json.loads(w.lock_file.read_text()))
        if checkpoint.name == "checkpoint-1":
            make_checkpoint(run_dir, 2)  # found at the next poll
        else:
            w.stop()
        return len(owners)

    w = watcher(run_dir, state_file, rescore, poll_seconds=0.005)
    assert w.lock_file == state_file.with_name("state.json.lock")
    w.run(stop_after=HANG_GUARD)  # returns at the second rescore's stop(); the bound is a guard
    assert w.stop_requested, f"run() stopped at its {HANG_GUARD} s hang guard, not at stop()"
    assert list(read_state(state_file)["done"]) == ["checkpoint-1", "checkpoint-2"]
    # run() took the lock once; each poll's run_once() re-entered it instead of taking another.
    assert len(owners) == 2 and owners[0] == owners[1]
    assert (owners[0]["pid"], owners[0]["command"]) == (os.getpid(), "qtune watch")
    assert not w.lock_file.exists()


def test_a_lock_held_on_another_host_refuses_with_its_owner_and_is_left(run_dir, state_file):
    make_checkpoint(run_dir, 1)
    rescore = StubRescore()
    w = watcher(run_dir, state_file, rescore)
    w.lock_file.parent.mkdir(parents=True)
    held = {"pid": 4242, "host": "gpu-node-7", "command": "qtune watch", "token": "y"}
    w.lock_file.write_text(json.dumps(held))
    with pytest.raises(WatchLockError) as info:
        w.run_once()
    message = str(info.value)
    assert f"cannot watch with state {state_file}" in message
    assert "pid 4242 on host gpu-node-7" in message and "'qtune watch'" in message
    assert isinstance(info.value.__cause__, OutputLockedError)
    assert json.loads(w.lock_file.read_text()) == held  # left for its owner
    assert rescore.calls == [] and not state_file.exists()


def test_a_lock_error_raised_by_the_rescore_is_not_the_watchers(run_dir, state_file):
    # The real rescore locks the output directory; a `qtune run` holding it fails that rescore,
    # which must surface as itself, not as "another watcher holds the state".
    make_checkpoint(run_dir, 1)

    def rescore(checkpoint: Path) -> int:
        raise OutputLockedError("output directory out is locked by pid 7", state_file, None)

    with pytest.raises(OutputLockedError, match="locked by pid 7"):
        watcher(run_dir, state_file, rescore).run_once()
    assert read_state(state_file)["in_progress"] == "checkpoint-1"
    assert not state_file.with_name("state.json.lock").exists()


class FakeClock:
    """The watch module's ``time``: ``sleep`` advances a virtual clock at once.

    Polls then happen at known virtual times, however slow or loaded the machine is.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        assert self.sleeps < 100_000, "hang guard: the watcher kept sleeping past its deadline"
        self.now += seconds


def test_run_polls_until_stopped_and_logs_a_heartbeat(run_dir, state_file, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="qtune.pipeline.watch")
    clock = FakeClock()
    monkeypatch.setattr(watch_module, "time", clock)
    polls: list[float] = []  # virtual time of each poll: the blocking checkpoint is asked once

    def is_complete(path: Path) -> bool:
        polls.append(clock.now)
        return trainer_done(path)

    w = Watcher(run_dir, state_file, StubRescore(), is_complete=is_complete, poll_seconds=1.0)
    make_checkpoint(run_dir, 3, complete=False)
    w.run(stop_after=2 * HEARTBEAT_POLLS + 5.5)
    # One poll per second from t=0 while t < stop_after, and run() returns at the deadline.
    assert polls == [float(t) for t in range(2 * HEARTBEAT_POLLS + 6)]
    assert clock.now == 2 * HEARTBEAT_POLLS + 5.5
    messages = [r.getMessage() for r in caplog.records]
    heartbeats = [m for m in messages if "polls," in m]
    assert len(heartbeats) == 2, heartbeats  # one every HEARTBEAT_POLLS polls
    assert f"{HEARTBEAT_POLLS} polls" in heartbeats[0]
    assert f"{2 * HEARTBEAT_POLLS} polls" in heartbeats[1]
    assert all("waiting for checkpoint-3 to complete" in m for m in heartbeats)
    # The incomplete checkpoint is reported once at INFO, not on every poll.
    assert sum("skipping checkpoint-3" in m for m in messages) == 1
    assert messages[-1] == f"stopped after {2 * HEARTBEAT_POLLS + 5.5:g} s (stop_after)"

    w.stop()
    w.run()  # already stopped: returns at once without polling
    assert len(polls) == 2 * HEARTBEAT_POLLS + 6 and clock.now == 2 * HEARTBEAT_POLLS + 5.5
    assert "stop(): stopped between checkpoints" in caplog.records[-1].getMessage()


# -- real processes: SIGTERM, SIGINT, SIGKILL ------------------------------------------------

WATCH_SCRIPT = textwrap.dedent(
    """
    import logging, os, signal, sys
    from pathlib import Path
    from qtune.pipeline.watch import watch_main

    run_dir, state, markers, slow, mode, stop_after = sys.argv[1:7]
    markers = Path(markers)

    def block_until_signalled(tag):
        # A rescore that never finishes by itself: it reads stdin, which the test never writes,
        # so only a signal ends it. The start marker is inside the try: a signal that comes
        # right after it is swallowed too. EOF means the test is gone: exit, leave no orphan.
        while True:
            try:
                (markers / f"start-{tag}").touch()
                if not os.read(0, 1):
                    sys.exit(f"stdin closed while {tag} was blocked: the test is gone")
            except KeyboardInterrupt:
                if mode != "swallow":
                    raise
                (markers / f"swallowed-{tag}").touch()

    def rescore(checkpoint):  # stand-in for the real rescore: markers instead of a model
        tag = f"{checkpoint.name}-{os.getpid()}"
        if mode == "foreign-handler":  # what ray.init() does to SIGTERM
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(99))
        if checkpoint.name in slow.split(","):
            block_until_signalled(tag)
        else:
            (markers / f"start-{tag}").touch()
        (markers / f"done-{tag}").touch()
        return int(checkpoint.name.split("-")[1])

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(watch_main(
        Path(run_dir), Path(state), rescore,
        is_complete=lambda p: (p / "trainer_state.json").is_file(),
        poll_seconds=0.05, stop_after=None if stop_after == "none" else float(stop_after),
    ))
    """
)


class WatchProcess:
    """Watcher processes running WATCH_SCRIPT; the fixture kills any left when the test ends."""

    def __init__(self, tmp_path: Path, run_dir: Path, state_file: Path) -> None:
        self.tmp_path, self.run_dir, self.state_file = tmp_path, run_dir, state_file
        self.markers = tmp_path / "markers"
        self.markers.mkdir(exist_ok=True)
        self.script = tmp_path / "watch_script.py"
        self.script.write_text(WATCH_SCRIPT)
        self.procs: list[subprocess.Popen] = []

    def start(self, *, slow: str = "", mode: str = "plain", stop_after: float | None = None):
        """Start a watcher; without ``stop_after`` it runs until a signal stops it.

        Its stdin is a pipe the test never writes: a ``slow`` checkpoint's rescore blocks on it.
        """
        self.log = self.tmp_path / f"watch-{len(self.procs) + 1}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        args = [str(self.run_dir), str(self.state_file), str(self.markers), slow, mode]
        with open(self.log, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, str(self.script), *args, str(stop_after).lower()],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.procs.append(proc)
        return proc

    def markers_named(self, prefix: str) -> list[str]:
        return sorted(p.name for p in self.markers.glob(f"{prefix}-*"))

    def wait_for(self, predicate, what: str, proc: subprocess.Popen) -> None:
        """Poll for an event; fail at once if the watcher exits first."""
        end = time.monotonic() + HANG_GUARD
        while not predicate():
            if proc.poll() is not None:
                pytest.fail(f"watcher exited ({proc.returncode}) before {what}: {self.output()}")
            if time.monotonic() > end:
                pytest.fail(f"hang guard: no {what} after {HANG_GUARD} s: {self.output()}")
            time.sleep(0.02)

    def exit_code(self, proc: subprocess.Popen, what: str) -> int:
        """Wait for the watcher to exit, however long that takes short of the hang guard."""
        try:
            return proc.wait(timeout=HANG_GUARD)
        except subprocess.TimeoutExpired:
            pytest.fail(f"hang guard: watcher still running {HANG_GUARD} s {what}: {self.output()}")

    def output(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdin.close()


@pytest.fixture
def proc_env(tmp_path, run_dir, state_file):
    env = WatchProcess(tmp_path, run_dir, state_file)
    yield env
    env.close()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_rescore_exits_promptly_and_a_restart_finishes_once(
    proc_env, run_dir, state_file, sig, code
):
    make_checkpoint(run_dir, 1)
    make_checkpoint(run_dir, 2)
    proc = proc_env.start(slow="checkpoint-2")
    proc_env.wait_for(lambda: proc_env.markers_named("start-checkpoint-2"), "rescore", proc)
    proc.send_signal(sig)
    # Prompt: checkpoint-2's rescore never ends by itself, so exiting at all means the signal
    # interrupted it rather than waiting for it to finish.
    assert proc_env.exit_code(proc, f"after {sig.name}") == code, proc_env.output()
    assert proc_env.markers_named("done-checkpoint-2") == []
    assert "re-scoring checkpoint-2 interrupted after" in proc_env.output()
    state = read_state(state_file)
    assert state["in_progress"] == "checkpoint-2"
    assert list(state["done"]) == ["checkpoint-1"]
    assert not state_file.with_name("state.json.lock").exists()

    proc = proc_env.start(stop_after=0)
    assert proc_env.exit_code(proc, "with stop_after=0") == 0, proc_env.output()
    assert "re-running interrupted checkpoint-2" in proc_env.output()
    assert len(proc_env.markers_named("done-checkpoint-1")) == 1
    assert len(proc_env.markers_named("done-checkpoint-2")) == 1
    state = read_state(state_file)
    assert state["in_progress"] is None and state["done"]["checkpoint-2"]["epoch"] == 2


def test_a_live_watcher_refuses_another_and_after_sigkill_a_restart_takes_its_lock(
    proc_env, run_dir, state_file
):
    make_checkpoint(run_dir, 1)
    proc = proc_env.start(slow="checkpoint-1")
    proc_env.wait_for(lambda: proc_env.markers_named("start-checkpoint-1"), "rescore", proc)
    second = StubRescore()
    with pytest.raises(WatchLockError) as info:
        watcher(run_dir, state_file, second).run_once()
    message = str(info.value)
    assert f"pid {proc.pid} on host {socket.gethostname()}" in message
    assert "'qtune watch'" in message and f"kill {proc.pid}" in message
    assert second.calls == []

    proc.kill()
    assert proc_env.exit_code(proc, "after SIGKILL") == -signal.SIGKILL
    lock = state_file.with_name("state.json.lock")
    assert json.loads(lock.read_text())["pid"] == proc.pid  # left behind by kill -9
    assert read_state(state_file)["in_progress"] == "checkpoint-1"

    killed = proc.pid
    proc = proc_env.start(stop_after=0)
    assert proc_env.exit_code(proc, "with stop_after=0") == 0, proc_env.output()
    assert "taking over stale output lock" in proc_env.output()
    assert f"owner (pid {killed} on host" in proc_env.output()
    assert len(proc_env.markers_named("start-checkpoint-1")) == 2
    assert len(proc_env.markers_named("done-checkpoint-1")) == 1
    assert read_state(state_file)["done"]["checkpoint-1"]["epoch"] == 1
    assert not lock.exists()


def test_a_second_signal_aborts_a_rescore_that_ignores_the_first(proc_env, run_dir, state_file):
    make_checkpoint(run_dir, 1)
    proc = proc_env.start(slow="checkpoint-1", mode="swallow")
    proc_env.wait_for(lambda: proc_env.markers_named("start-checkpoint-1"), "rescore", proc)
    proc.terminate()
    proc_env.wait_for(lambda: proc_env.markers_named("swallowed"), "first signal", proc)
    proc.terminate()
    assert proc_env.exit_code(proc, "after a second SIGTERM") == -signal.SIGTERM, proc_env.output()
    assert "second signal (SIGTERM); aborting now" in proc_env.output()
    assert read_state(state_file)["in_progress"] == "checkpoint-1"
    assert proc_env.markers_named("done") == []


def test_sigterm_while_idle_exits_0_even_after_a_rescore_replaced_the_handler(
    proc_env, run_dir, state_file
):
    make_checkpoint(run_dir, 1)
    proc = proc_env.start(mode="foreign-handler")
    proc_env.wait_for(
        lambda: state_file.exists() and "checkpoint-1" in read_state(state_file)["done"],
        "checkpoint-1 done",
        proc,
    )
    proc.terminate()
    assert proc_env.exit_code(proc, "after SIGTERM") == 0, proc_env.output()  # not the 99
    assert "SIGTERM: stopped between checkpoints" in proc_env.output()
