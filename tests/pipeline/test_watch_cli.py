"""`qtune watch` for real: killed while it scores a checkpoint, restarted, it finishes it once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qtune.pipeline.config import load_config
from qtune.pipeline.score_job import run_score
from qtune.pipeline.triage_job import run_triage
from tests.pipeline.test_rescore import _perturbed_checkpoint


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _start(config: Path, run_dir: Path, log: Path) -> subprocess.Popen:
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
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill takes Ray's processes too
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

    first = _start(config, run_dir, log)
    staging = out / ".staging"
    _wait(
        lambda: staging.is_dir() and any(staging.glob("score-epoch_001*")), 120, "scoring to start"
    )
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert json.loads(state.read_text())["in_progress"] == "checkpoint-10"
    assert not (out / "data" / "epoch_001").exists()

    second = _start(config, run_dir, log)
    try:
        _wait(
            lambda: state.is_file() and "checkpoint-10" in json.loads(state.read_text())["done"],
            180,
            "the restarted watcher to finish checkpoint-10",
        )
        os.killpg(second.pid, signal.SIGTERM)  # idle now: a clean stop
        assert second.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)

    done = json.loads(state.read_text())["done"]
    assert (
        done["checkpoint-10"]["epoch"] == 1 and json.loads(state.read_text())["in_progress"] is None
    )
    manifest = json.loads((out / "data/epoch_001/manifest.json").read_text())
    assert manifest["model"]["checkpoint"]["path"] == str(checkpoint.absolute())
    assert (out / "LATEST").read_text().strip() == "epoch_001"
    assert not (out / "data" / "epoch_002").exists()  # finished once, not twice
