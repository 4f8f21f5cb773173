"""Watch a training run and re-score the corpus with each new complete checkpoint, once each.

``qtune watch`` polls a trainer's output directory for ``checkpoint-<step>`` folders and calls a
``rescore(checkpoint) -> epoch`` callback (score, triage, publish ``data/epoch_N``) for each new
complete one, in step order. The loop, its state on disk and its signal handling live here; the
engine-facing work is injected, so this module imports nothing heavier than the standard library.

Exactly once, across restarts and ``kill -9``:

- the state file (JSON, replaced atomically) records ``in_progress`` before a rescore starts and
  moves the checkpoint to ``done`` after it returns; a checkpoint in ``done`` never runs again;
- a watcher killed during a rescore leaves ``in_progress`` set, and the next start re-runs it
  (a rescore publishes its epoch atomically, so a half-done run left nothing published);
- a watcher killed after the rescore published but before the state was written is covered by
  ``already_published(checkpoint) -> epoch | None``, asked before every rescore: a checkpoint
  already published is marked done without running again;
- an :class:`~qtune.pipeline.lock.OutputLock` on ``<state file>.lock`` keeps two watcher
  processes off one state file; a lock left by a watcher that died is taken over.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from qtune.pipeline.layout import OutputLayout
from qtune.pipeline.lock import OutputLock, OutputLockedError
from qtune.pipeline.publish import write_atomic

logger = logging.getLogger(__name__)

STATE_VERSION = 1
HEARTBEAT_POLLS = 10  # an INFO line every this many polls, so a quiet watcher is visibly alive
_SLEEP_SLICE = 0.2  # seconds; the poll sleep wakes this often to notice a stop request
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

Rescore = Callable[[Path], int]


class WatchError(RuntimeError):
    """The watcher cannot start or continue: a held lock, an unreadable or foreign state file."""


class WatchLockError(WatchError):
    """Another watcher holds the state file's lock (chained from ``OutputLockedError``)."""


class StopRequested(KeyboardInterrupt):
    """Raised in the main thread by the signal handler to interrupt a running rescore.

    A ``KeyboardInterrupt`` so that code written to clean up on Ctrl-C (staging directories,
    Ray Data executors, engines) does so, and ``except Exception`` in a rescore does not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def default_state_file(layout: OutputLayout) -> Path:
    """Where ``qtune watch`` keeps its state for an output directory: ``<out>/.watch/state.json``
    (in the working copy of a remote output).

    One state per output directory: the epochs it publishes follow one training run.
    """
    return layout.root / ".watch" / "state.json"


def checkpoint_step(name: str) -> int | None:
    """The step of a ``checkpoint-<step>`` name, None for any other name."""
    match = _CHECKPOINT.match(name)
    return int(match.group(1)) if match else None


def discover_checkpoints(directory: Path) -> list[Path]:
    """``checkpoint-<step>`` directories under ``directory``, by step (numeric: 9 before 10).

    Anything else is ignored: files, ``runs/``, a Trainer's ``tmp-checkpoint-<step>`` staging
    folders. A directory that does not exist yet (training has not started) has no checkpoints.
    """
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        step = checkpoint_step(path.name)
        if step is not None and path.is_dir():
            found.append((step, path.name, path))
    return [path for _, _, path in sorted(found)]


@dataclass
class WatchState:
    """What the watcher has done, persisted as JSON and replaced atomically on every change.

    ``done``: checkpoint name -> ``{"epoch", "fingerprint", "finished"}``; ``in_progress``: the
    checkpoint whose rescore started and has not been recorded as finished (re-run on restart).
    """

    checkpoints_dir: str
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    in_progress: str | None = None

    @classmethod
    def load(cls, path: Path, checkpoints_dir: Path) -> WatchState:
        """The state in ``path``, or an empty one; a state for other checkpoints is refused."""
        expected = str(checkpoints_dir)
        if not path.exists():
            return cls(checkpoints_dir=expected)
        try:
            raw = json.loads(path.read_text())
            version = raw["version"]
            state = cls(
                checkpoints_dir=raw["checkpoints_dir"],
                done=dict(raw["done"]),
                in_progress=raw["in_progress"],
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise WatchError(
                f"watch state {path} is unreadable ({type(e).__name__}: {e}); expected the JSON "
                f"a watcher writes. Restore or delete it (deleting forgets which checkpoints were "
                f"re-scored)"
            ) from e
        if version != STATE_VERSION:
            raise WatchError(
                f"watch state {path} has version {version!r}; expected {STATE_VERSION}"
            )
        if state.checkpoints_dir != expected:
            raise WatchError(
                f"watch state {path} follows checkpoints in {state.checkpoints_dir}, not "
                f"{expected}; one output directory follows one training run (use another output "
                f"directory or state file)"
            )
        return state

    def save(self, path: Path) -> None:
        payload = {
            "version": STATE_VERSION,
            "checkpoints_dir": self.checkpoints_dir,
            "in_progress": self.in_progress,
            "done": self.done,
            "updated": _now(),
        }
        write_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")

    def newest_done_step(self) -> int:
        return max((checkpoint_step(name) or 0 for name in self.done), default=-1)


class Watcher:
    """Poll ``checkpoints_dir`` and call ``rescore`` for each new complete checkpoint, once each.

    ``rescore(checkpoint) -> epoch`` scores, triages and publishes one epoch, replacing that epoch
    atomically. ``is_complete(checkpoint)`` says a trainer has finished writing it (default:
    ``qtune.pipeline.checkpoints.is_complete``). ``already_published(checkpoint)`` returns the
    epoch a previous rescore published for it, if any. ``fingerprint(checkpoint)`` is recorded
    with the epoch in the state. The state file's lock (``lock_file``) is held while ``run_once``
    or ``run`` runs; like every :class:`OutputLock` it is re-entrant per process, so it keeps
    other processes out, not a second ``Watcher`` on the same state in this process.
    """

    def __init__(
        self,
        checkpoints_dir: Path,
        state_file: Path,
        rescore: Rescore,
        *,
        is_complete: Callable[[Path], bool] | None = None,
        already_published: Callable[[Path], int | None] | None = None,
        fingerprint: Callable[[Path], str | None] | None = None,
        poll_seconds: float = 30.0,
    ) -> None:
        if is_complete is None:
            # Imported here: the watcher's own tests and callers that inject a check do not need it.
            from qtune.pipeline.checkpoints import is_complete as trainer_is_complete

            is_complete = trainer_is_complete
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        self.checkpoints_dir = Path(checkpoints_dir).absolute()
        self.state_file = Path(state_file).absolute()
        self.rescore = rescore
        self.is_complete = is_complete
        self.already_published = already_published
        self.fingerprint = fingerprint
        self.poll_seconds = poll_seconds
        self.state = WatchState(checkpoints_dir=str(self.checkpoints_dir))
        self.lock_file = self.state_file.with_name(self.state_file.name + ".lock")
        self._depth = 0  # nesting of _held(): run() holds the lock around each run_once()
        self._stop_signal: int | None = None
        self._stop_requested = False
        self._current: str | None = None
        self._seen: set[str] = set()  # checkpoints logged as found (log once, not every poll)
        self._waiting_for: str | None = None  # the incomplete checkpoint that blocks the queue
        self._ignored: set[str] = set()  # warned once: older than the newest done checkpoint
        self._incomplete_logged: set[str] = set()  # INFO once per incomplete checkpoint, then DEBUG

    @property
    def current(self) -> str | None:
        """The checkpoint being re-scored right now, None between rescores."""
        return self._current

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @property
    def stop_signal(self) -> int | None:
        return self._stop_signal

    def stop(self, signum: int | None = None) -> None:
        """Stop polling; a running rescore finishes unless a signal handler interrupts it.

        Only sets flags, so it is safe from a signal handler and from another thread.
        """
        self._stop_signal = signum
        self._stop_requested = True

    def run_once(self) -> list[str]:
        """Re-score every new complete checkpoint in step order; return the names processed.

        An incomplete checkpoint stops the round: a later checkpoint, even complete, waits for it.
        Epoch N is the data for training epoch N, so epochs must follow training order; scoring a
        later checkpoint first would publish an older model's view as the newest epoch. For the
        same reason a checkpoint older than the newest one done (a rewound run) is ignored.
        """
        processed: list[str] = []
        with self._held():
            newest_done = self.state.newest_done_step()
            checkpoints = discover_checkpoints(self.checkpoints_dir)
            self._note_vanished({path.name for path in checkpoints})
            self._waiting_for = None
            for path in checkpoints:
                name, step = path.name, checkpoint_step(path.name)
                assert step is not None  # discover_checkpoints keeps checkpoint-<step> only
                if name in self.state.done:
                    continue
                if step <= newest_done:
                    if name not in self._ignored:
                        self._ignored.add(name)
                        logger.warning(
                            "ignoring %s: older than %s, already re-scored (epochs follow "
                            "training order)",
                            name,
                            self._newest_done_name(),
                        )
                    continue
                if name not in self._seen:
                    self._seen.add(name)
                    logger.info("found %s", name)
                if self._stop_requested:
                    break
                if not self.is_complete(path):
                    self._waiting_for = name
                    log = logger.info if name not in self._incomplete_logged else logger.debug
                    self._incomplete_logged.add(name)
                    log("skipping %s for now: incomplete (the trainer is still writing it)", name)
                    break
                if not self._process(path):
                    break
                processed.append(name)
                newest_done = step
        return processed

    def run(self, *, stop_after: float | None = None) -> None:
        """Poll until ``stop()`` (a signal) or ``stop_after`` seconds; then return.

        The lock is held throughout. A rescore error propagates, with ``in_progress`` kept in the
        state so that the next start retries that checkpoint.
        """
        deadline = None if stop_after is None else time.monotonic() + stop_after
        with self._held():
            logger.info(
                "watching %s every %g s (state %s): %d checkpoint(s) done%s",
                self.checkpoints_dir,
                self.poll_seconds,
                self.state_file,
                len(self.state.done),
                f", last {self._newest_done_name()}" if self.state.done else "",
            )
            polls = 0
            while not self._stop_requested:
                self.run_once()
                polls += 1
                if polls % HEARTBEAT_POLLS == 0:
                    self._heartbeat(polls)
                if not self._sleep(self.poll_seconds, deadline):
                    break
        if self._stop_requested:
            name = signal.Signals(self._stop_signal).name if self._stop_signal else "stop()"
            logger.info("%s: stopped between checkpoints", name)
        else:
            logger.info("stopped after %g s (stop_after)", stop_after)

    # -- internals --------------------------------------------------------------------------

    @contextmanager
    def _held(self) -> Iterator[None]:
        """Hold the lock; on first entry read the state from disk and settle ``in_progress``."""
        with ExitStack() as stack:
            if self._depth == 0:
                try:
                    stack.enter_context(OutputLock(self.lock_file, "qtune watch"))
                except OutputLockedError as e:  # only taking it: the rescore's own lock errors pass
                    raise WatchLockError(f"cannot watch with state {self.state_file}: {e}") from e
                self.state = WatchState.load(self.state_file, self.checkpoints_dir)
                self._settle_in_progress()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1

    def _settle_in_progress(self) -> None:
        name = self.state.in_progress
        if name is None:
            return
        if name in self.state.done:
            self.state.in_progress = None
            self._save()
        elif not (self.checkpoints_dir / name).is_dir():
            logger.warning(
                "%s was being re-scored when the last watcher stopped, but is gone (deleted by "
                "the trainer's save_total_limit?); nothing of it was published unless a manifest "
                "says so. Dropping it",
                name,
            )
            self.state.in_progress = None
            self._save()
        else:
            logger.info("%s was interrupted in an earlier run; it is resumed first", name)

    def _process(self, path: Path) -> bool:
        """Re-score one complete checkpoint and record it; False if a stop came first."""
        name = path.name
        fingerprint = self.fingerprint(path) if self.fingerprint else None
        published = self.already_published(path) if self.already_published else None
        if published is not None:
            self._record_done(name, published, fingerprint)
            logger.info(
                "%s was already published as epoch %d (a watcher stopped before recording it); "
                "marked done without re-scoring",
                name,
                published,
            )
            return True
        if self._stop_requested:
            return False
        resumed = self.state.in_progress == name
        self.state.in_progress = name
        self._save()
        logger.info("%s %s", "re-running interrupted" if resumed else "re-scoring with", name)
        started = time.perf_counter()
        self._current = name
        try:
            epoch = self.rescore(path)
        except Exception:
            logger.error(
                "re-scoring %s failed after %.1f s; it stays in progress and is retried at the "
                "next start",
                name,
                time.perf_counter() - started,
            )
            raise
        except BaseException as e:  # a stop signal or SystemExit: not a failure of the rescore
            logger.warning(
                "re-scoring %s interrupted after %.1f s (%s: %s); it stays in progress and "
                "re-runs at the next start",
                name,
                time.perf_counter() - started,
                type(e).__name__,
                e,
            )
            raise
        finally:
            self._current = None
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(
                f"rescore({name}) returned {epoch!r} ({type(epoch).__name__}); expected the "
                f"epoch it published (int)"
            )
        self._record_done(name, epoch, fingerprint)
        logger.info("%s -> epoch %d in %.1f s", name, epoch, time.perf_counter() - started)
        return True

    def _record_done(self, name: str, epoch: int, fingerprint: str | None) -> None:
        self.state.done[name] = {"epoch": epoch, "fingerprint": fingerprint, "finished": _now()}
        self.state.in_progress = None
        self._save()

    def _save(self) -> None:
        self.state.save(self.state_file)

    def _newest_done_name(self) -> str | None:
        if not self.state.done:
            return None
        return max(self.state.done, key=lambda name: checkpoint_step(name) or 0)

    def _note_vanished(self, present: set[str]) -> None:
        for name in sorted(self._seen - present - set(self.state.done)):
            logger.warning(
                "%s disappeared before it was re-scored (deleted by the trainer's "
                "save_total_limit?)",
                name,
            )
            self._seen.discard(name)

    def _heartbeat(self, polls: int) -> None:
        newest = self._newest_done_name()
        if not self.checkpoints_dir.is_dir():
            waiting = f"{self.checkpoints_dir} does not exist yet"
        elif self._waiting_for:
            waiting = f"waiting for {self._waiting_for} to complete"
        else:
            waiting = "no new checkpoint"
        logger.info(
            "watching %s: %d polls, %d checkpoint(s) done%s; %s",
            self.checkpoints_dir,
            polls,
            len(self.state.done),
            f" (last {newest} -> epoch {self.state.done[newest]['epoch']})" if newest else "",
            waiting,
        )

    def _sleep(self, seconds: float, deadline: float | None) -> bool:
        """Sleep in short slices; False once stopped or past the deadline.

        Slices, not ``threading.Event.wait``: the signal handler runs in this (main) thread, and
        setting an Event there can deadlock on the Event's own lock.
        """
        end = time.monotonic() + seconds
        if deadline is not None:
            end = min(end, deadline)
        while not self._stop_requested:
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, _SLEEP_SLICE))
        return not self._stop_requested and (deadline is None or time.monotonic() < deadline)


class SignalHandlers:
    """SIGINT/SIGTERM handlers for a watcher, installed in the main thread.

    First signal: ``watcher.stop(signum)``; if a rescore is running, also raise
    ``StopRequested`` in the main thread so the process exits promptly (the checkpoint stays in
    progress). Second signal: the default action, so the process dies at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.watcher.stop_requested:
            # No logging here: a handler that writes through a buffered stream the main thread
            # is writing to raises "reentrant call"; one raw write is safe.
            name = signal.Signals(signum).name
            os.write(2, f"qtune watch: second signal ({name}); aborting now\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.watcher.stop(signum)
        if self.watcher.current is not None:
            raise StopRequested(signum)

    def install(self) -> None:
        """Install (or re-install, if something replaced them) these handlers."""
        for signum in self.SIGNALS:
            current = signal.signal(signum, self)
            if current is self:
                continue
            if signum in self._previous:
                logger.debug("re-installed the %s handler (replaced by %r)", signum, current)
            else:
                # None: a handler not installed from Python; the closest is the default action.
                self._previous[signum] = signal.SIG_DFL if current is None else current

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def install_signal_handlers(watcher: Watcher) -> SignalHandlers:
    """SIGINT/SIGTERM -> ``watcher.stop()``; a second signal aborts at once. Main thread only."""
    handlers = SignalHandlers(watcher)
    handlers.install()
    return handlers


def watch_main(
    checkpoints_dir: Path,
    state_file: Path,
    rescore: Rescore,
    *,
    is_complete: Callable[[Path], bool] | None = None,
    already_published: Callable[[Path], int | None] | None = None,
    fingerprint: Callable[[Path], str | None] | None = None,
    poll_seconds: float = 30.0,
    stop_after: float | None = None,
) -> int:
    """Run a watcher with signal handling; return the process exit code.

    0: stopped between checkpoints (a signal while idle, or ``stop_after``); 130 / 143: SIGINT /
    SIGTERM interrupted a rescore, which re-runs at the next start. A rescore error propagates.

    A rescore may install its own handlers (``ray.init`` installs one for SIGTERM); ours are
    re-installed after every rescore, so a stop while idle stays clean. A signal that arrives
    while such a foreign handler is in place is handled by it. Anything that installs handlers
    for the whole process (connecting to Ray) is best done before calling this.
    """
    handlers: SignalHandlers | None = None

    def rescore_keeping_handlers(checkpoint: Path) -> int:
        try:
            return rescore(checkpoint)
        finally:
            if handlers is not None:
                handlers.install()

    watcher = Watcher(
        checkpoints_dir,
        state_file,
        rescore_keeping_handlers,
        is_complete=is_complete,
        already_published=already_published,
        fingerprint=fingerprint,
        poll_seconds=poll_seconds,
    )
    handlers = install_signal_handlers(watcher)
    try:
        watcher.run(stop_after=stop_after)
    except StopRequested as e:
        logger.warning(
            "%s: stopped during a rescore; exit %d", signal.Signals(e.signum).name, 128 + e.signum
        )
        return 128 + e.signum
    finally:
        handlers.restore()
    return 0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
