"""`qtune watch` for real: killed while it scores a checkpoint, restarted, it finishes it once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qtune.faults import FAULT_ENV, FAULT_ONCE_ENV, FAULT_SIGNAL_ENV
from qtune.pipeline.config import load_config
from qtune.pipeline.score_job import run_score
from qtune.pipeline.triage_job import run_triage
from tests.pipeline.test_rescore import _perturbed_checkpoint

# Every wait below is for an event (the watcher freezing at a fault point, the state file
# recording a checkpoint, a process exiting). This bound only keeps a hang from blocking the
# session: far above any plausible duration of a Ray run on a loaded 2-core machine. Reaching it
# fails the test, saying what hung, with the watcher's log.
HANG_GUARD = 1800


def _start(
    config: Path, run_dir: Path, log: Path, *, freeze_at: str | None = None
) -> subprocess.Popen:
    """`qtune watch` in its own session (process group): killing the group takes Ray with it.

    ``freeze_at``: the fault point where the watcher stops itself (SIGSTOP), see qtune.faults.
    """
    faults = (FAULT_ENV, FAULT_ONCE_ENV, FAULT_SIGNAL_ENV)
    env = {name: value for name, value in os.environ.items() if name not in faults}
    if freeze_at:
        env[FAULT_ENV], env[FAULT_SIGNAL_ENV] = freeze_at, "STOP"
    with log.open("a") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qtune.pipeline.cli",
                "watch",
                str(config),
                "--checkpoints",
                str(run_dir),
                "--poll",
                "0.5",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _wait_until_frozen(proc: subprocess.Popen, log: Path) -> None:
    """Block until the watcher stops itself at its fault point; waitpid, no polling."""
    timer = threading.Timer(HANG_GUARD, _kill_group, (proc,))
    timer.daemon = True
    timer.start()
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
    finally:
        hung = not timer.is_alive()
        timer.cancel()
    if os.WIFSTOPPED(status):
        return
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if hung:
        pytest.fail(f"hang guard: no fault point after {HANG_GUARD} s:\n{log.read_text()[-3000:]}")
    pytest.fail(f"watcher exited ({proc.returncode}) before its fault point:\n{log.read_text()}")


def _wait_for(predicate, what: str, proc: subprocess.Popen, log: Path) -> None:
    """Poll for an event; fail at once if the watcher exits first."""
    deadline = time.monotonic() + HANG_GUARD
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"watcher exited ({proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"hang guard: no {what} after {HANG_GUARD} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _exit_code(proc: subprocess.Popen, what: str, log: Path) -> int:
    try:
        return proc.wait(timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"hang guard: watcher running {HANG_GUARD} s {what}:\n{log.read_text()[-3000:]}"
        )


@pytest.mark.ray
def test_watch_killed_while_scoring_finishes_the_checkpoint_exactly_once(tmp_path, llama_dir):
    from qtune.demo.corpus import write_demo_corpus

    write_demo_corpus(tmp_path / "corpus", n_samples=40, seed=9)
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(
        f"input: {{path: {tmp_path / 'corpus'}}}\n"
        f"model: {{path: {llama_dir}, max_length: 256}}\n"
        "scoring: {backend: torch}\n"
        f"output: {{dir: {out}, num_shards: 2}}\n"
        "ray: {num_cpus: 2}\n"
    )
    cfg = load_config(config)
    run_score(cfg)
    run_triage(cfg)

    run_dir = tmp_path / "run1"
    checkpoint = _perturbed_checkpoint(llama_dir, run_dir / "checkpoint-10")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    log = tmp_path / "watch.log"
    state = out / ".watch" / "state.json"

    # The first watcher freezes once its first partition is scored, before it could finish the
    # rest or publish: the kill then lands mid-scoring however fast or slow the machine is.
    first = _start(config, run_dir, log, freeze_at="score.partition_done:1")
    second = None
    try:
        _wait_until_frozen(first, log)
        assert any((out / ".staging").glob("score-epoch_001*"))  # scoring had started
        _kill_group(first)  # the watcher and every Ray process it started
        assert _exit_code(first, "after SIGKILL", log) == -signal.SIGKILL
        assert json.loads(state.read_text())["in_progress"] == "checkpoint-10"
        assert not (out / "data" / "epoch_001").exists()

        second = _start(config, run_dir, log)
        _wait_for(
            lambda: state.is_file() and "checkpoint-10" in json.loads(state.read_text())["done"],
            "checkpoint-10 done by the restarted watcher",
            second,
            log,
        )
        _kill_group(second, signal.SIGTERM)  # idle now: a clean stop
        assert _exit_code(second, "after SIGTERM", log) == 0, log.read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None:
                _kill_group(proc)  # what is left: Ray's processes, or a watcher that hung

    done = json.loads(state.read_text())["done"]
    assert (
        done["checkpoint-10"]["epoch"] == 1 and json.loads(state.read_text())["in_progress"] is None
    )
    manifest = json.loads((out / "data/epoch_001/manifest.json").read_text())
    assert manifest["model"]["checkpoint"]["path"] == str(checkpoint.absolute())
    assert (out / "LATEST").read_text().strip() == "epoch_001"
    assert not (out / "data" / "epoch_002").exists()  # finished once, not twice
