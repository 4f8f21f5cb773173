"""Nothing lost: bad input, bad configuration, crashes and restarts (torch backend, local Ray).

A mixed corpus carries every kind of bad row next to good ones. Crashes are real: the pipeline
runs in a subprocess that dies by SIGKILL at a named point (``qtune.faults``) or is killed from
outside, then the same command runs again and must publish the same shards as a clean run.

No test here waits for a duration or asserts one: each waits for an event (a process exiting or
stopping at a fault point, a line on a pipe, a trace of fault points reached), so a machine
busy with other work makes them slower, never wrong. The only time limit is HANG_GUARD, far
beyond any run, which turns a hung run into a failure instead of a hung test session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from qtune import schema
from qtune.faults import FAULT_DELAY_ENV, FAULT_TRACE_ENV, read_trace
from qtune.pipeline.cli import app
from qtune.pipeline.layout import OutputLayout
from qtune.pipeline.verify import verify_version
from tests.pipeline.mixed_corpus import (
    BAD_LINES,
    CHAT,
    chat_line,
    published,
    write_config,
)


def test_every_row_of_a_mixed_corpus_is_kept_dropped_or_rejected(mixed):
    out = mixed["out"]
    manifest = json.loads((out / "data/epoch_000/manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["kept"] + counts["dropped"] + counts["rejected"] == counts["input_rows"]
    per_source = counts["per_source"]
    assert {Path(s).name for s in per_source} == {
        "alpaca.parquet",
        "bad.jsonl",
        "chat.jsonl",
        "completions.jsonl",
        "sharegpt.json",
    }
    for c in per_source.values():
        assert c["kept"] + c["dropped"] + c["rejected"] == c["input_rows"]
    bad = next(c for s, c in per_source.items() if s.endswith("bad.jsonl"))
    assert bad["input_rows"] == 2 * len(BAD_LINES) + 3
    assert bad["rejected"] == len(BAD_LINES) + 2  # + the lone surrogate and the repeated id

    rejects = pa.concat_tables(
        [pq.read_table(p) for p in OutputLayout(out).rejects_dir(0).glob("*.parquet")]
    )
    reasons = rejects.column(schema.REASON).to_pylist()
    for reason in [*BAD_LINES, "duplicate_sample_id"]:
        assert reason in reasons, reason
    assert reasons.count("invalid_text") == 2
    duplicate = rejects.filter(
        pa.compute.equal(rejects.column(schema.REASON), "duplicate_sample_id")
    )
    assert duplicate.column(schema.SAMPLE_ID).to_pylist() == ["dup-1"]
    assert json.loads(duplicate.column(schema.RAW)[0].as_py())["id"] == "dup-1"  # original row
    assert duplicate.column(schema.ROW_INDEX).to_pylist() == [2 * len(BAD_LINES) + 2]
    assert all(rejects.column(schema.RAW).to_pylist())

    # The corrupt file is reported, in the output and the manifest, and the run went on.
    assert "corrupt.parquet" in mixed["output"] and "unreadable" in mixed["output"]
    assert [Path(u["path"]).name for u in manifest["unreadable_sources"]] == ["corrupt.parquet"]
    assert "row accounting per input file" in mixed["output"]
    report = verify_version(out)
    assert report.ok, report.problems

    from datasets import load_dataset

    assert len(load_dataset(str(out))["train"]) == counts["kept"]


def test_strict_input_fails_on_the_corrupt_file_before_any_work(mixed, llama_dir, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], llama_dir, out)
    result = CliRunner().invoke(app, ["run", str(config), "--set", "input.strict=true"])
    assert result.exit_code == 1
    assert "corrupt.parquet: unreadable Parquet" in result.output
    assert not (out / "scores").exists() and not (out / ".staging").exists()


def test_all_bad_rows_exit_non_zero_naming_the_top_reasons(llama_dir, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/bad.jsonl").write_bytes(
        b"\n".join([BAD_LINES["invalid_json"]] * 3 + [BAD_LINES["empty_messages"]]) + b"\n"
    )
    config = write_config(tmp_path / "c.yaml", tmp_path / "in", llama_dir, tmp_path / "out")
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 1
    assert "every one of the 4 input rows was rejected" in result.output
    assert "invalid_json (3), empty_messages (1)" in result.output


def test_bad_configuration_names_the_key_and_the_fix(mixed, llama_dir, tmp_path):
    runner = CliRunner()
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], llama_dir, tmp_path / "out")
    result = runner.invoke(app, ["run", str(config), "--set", f"model.path={tmp_path}/nope"])
    assert result.exit_code == 1 and "model.path" in result.output
    assert "is not a directory" in result.output
    result = runner.invoke(app, ["run", str(config), "--set", "qtuning.sample_ratio=1.5"])
    assert result.exit_code == 2 and "qtuning.sample_ratio" in result.output
    result = runner.invoke(app, ["run", str(config), "--set", "qtuning.token_ratio=0"])
    assert result.exit_code == 2 and "qtuning.token_ratio" in result.output
    result = runner.invoke(app, ["run", str(config), "--set", "output.shards=3"])
    assert result.exit_code == 2 and "output.shards: unknown key" in result.output
    assert "num_shards" in result.output  # the valid keys are listed

    # A model the vLLM backend cannot serve on this machine: the fix is the torch backend.
    import shutil

    odd = tmp_path / "head16"
    shutil.copytree(llama_dir, odd)
    model_config = json.loads((odd / "config.json").read_text())
    model_config["head_dim"] = 16
    (odd / "config.json").write_text(json.dumps(model_config))
    result = runner.invoke(
        app, ["run", str(config), "--set", f"model.path={odd}", "--set", "scoring.backend=vllm"]
    )
    assert result.exit_code == 1 and "head size 16" in result.output
    assert "--set scoring.backend=torch" in result.output
    assert not list((tmp_path / "out").rglob("*"))  # nothing was started


def test_output_dir_of_another_corpus_or_model_is_refused_until_restart(
    mixed, llama_dir, model_dirs, tmp_path
):
    runner = CliRunner()
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.jsonl").write_bytes(chat_line(CHAT, id="x") + b"\n")
    config = write_config(tmp_path / "c.yaml", other, llama_dir, mixed["out"])
    before = published(mixed["out"])
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 1
    assert "holds the results of a different corpus" in result.output
    assert "output.dir" in result.output and "--restart" in result.output
    assert published(mixed["out"]) == before  # untouched

    # Same corpus, another model: named as such.
    config = write_config(tmp_path / "m.yaml", mixed["corpus"], model_dirs["qwen2"], mixed["out"])
    result = runner.invoke(app, ["score", str(config)])
    assert result.exit_code == 1 and "different model" in result.output

    # Same corpus, model and settings: the complete cache is re-used, nothing re-scored.
    config = write_config(tmp_path / "s.yaml", mixed["corpus"], llama_dir, mixed["out"])
    result = runner.invoke(app, ["score", str(config)])
    assert result.exit_code == 0 and "re-used the complete scored cache" in result.output

    # --restart on a copy: everything there is discarded and the other corpus is scored.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(mixed["out"], copy)
    config = write_config(tmp_path / "r.yaml", other, llama_dir, copy)
    result = runner.invoke(app, ["run", str(config), "--restart"])
    assert result.exit_code == 0, result.output
    assert (
        json.loads((copy / "data/epoch_000/manifest.json").read_text())["counts"]["input_rows"] == 1
    )


# Seconds after which a run that has not finished is taken for hung, killed and failed. Not a
# measure of speed: a qtune run here takes well under a minute alone, and several on a busy
# 2-core machine; this only keeps a hang from blocking the whole test session.
HANG_GUARD = 1800


def _qtune(*args: str, fault: str | None = None, freeze: bool = False) -> subprocess.Popen:
    """`qtune ARGS` in its own session (process group): killing the group takes Ray with it.

    Output goes to a temporary file, not a pipe: a child that is not being read (stopped at a
    fault point while the test waits for that) can never block on a full pipe.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("QTUNE_FAULT", "QTUNE_FAULT_SIGNAL", "QTUNE_FAULT_ONCE"):
        env.pop(name, None)
    if fault:
        env["QTUNE_FAULT"] = fault
    if freeze:
        env["QTUNE_FAULT_SIGNAL"] = "STOP"
    log = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
    process = subprocess.Popen(
        [sys.executable, "-m", "qtune.pipeline.cli", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    process.log = log  # type: ignore[attr-defined]
    return process


def _output(process: subprocess.Popen) -> str:
    log = process.log  # type: ignore[attr-defined]
    log.seek(0)
    return log.read()


def _kill_session(process: subprocess.Popen) -> None:
    """SIGKILL what is left of the run's process group (Ray's processes after a fault)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _guard(process: subprocess.Popen) -> threading.Timer:
    """A timer that kills the run's process group after HANG_GUARD seconds (cancel it)."""
    timer = threading.Timer(HANG_GUARD, _kill_session, (process,))
    timer.daemon = True
    timer.start()
    return timer


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    """Wait for the run to exit (an event, however long it takes up to HANG_GUARD)."""
    timer = _guard(process)
    try:
        process.wait()
    finally:
        hung = not timer.is_alive()
        timer.cancel()
        _kill_session(process)  # a run killed at a fault point leaves Ray's processes behind
    output = _output(process)
    if hung:
        pytest.fail(f"qtune {process.args[3:]} did not finish in {HANG_GUARD} s:\n{output}")
    return process.returncode, output


def _wait_until_stopped(process: subprocess.Popen) -> None:
    """Block until the run stops itself with SIGSTOP at its fault point (QTUNE_FAULT_SIGNAL).

    waitpid(WUNTRACED) returns when the child stops or exits: no polling, no deadline beyond
    HANG_GUARD. A run that exits instead fails the test with its output.
    """
    timer = _guard(process)
    try:
        _, status = os.waitpid(process.pid, os.WUNTRACED)
    finally:
        timer.cancel()
    if not os.WIFSTOPPED(status):
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        _kill_session(process)
        pytest.fail(
            f"qtune exited ({process.returncode}) before its fault point:\n{_output(process)}"
        )


@pytest.mark.ray
@pytest.mark.parametrize(
    "fault",
    [
        "score.partition_done:3",  # during scoring
        "score.dedup_written",  # between writing duplicate rejects and rewriting the parts
        "score.rejects_published",  # half-way through publishing the scored cache
        "triage.staged",  # between scoring and publication of the version
        "triage.moved",  # version in place, dataset card and LATEST not yet
    ],
)
def test_resume_after_sigkill_publishes_what_a_clean_run_does(mixed, llama_dir, tmp_path, fault):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], llama_dir, out)
    code, output = _finish(_qtune("run", str(config), fault=fault))
    assert code == -signal.SIGKILL, output
    assert not (out / "data/epoch_000/manifest.json").exists() or fault == "triage.moved"

    code, output = _finish(_qtune("run", str(config)))
    assert code == 0, output
    _assert_clean_log(output)
    assert published(out) == published(mixed["out"])
    if fault.startswith("score.partition_done"):
        assert "resuming: 3 of" in output
    assert not (out / ".staging").exists()
    assert verify_version(out).ok


@pytest.mark.ray
def test_kill_minus_nine_from_outside_then_resume(mixed, llama_dir, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], llama_dir, out)
    # The driver freezes after its first partition's marker is written (before it could finish
    # the rest): the kill then always lands mid-scoring, however fast or slow the scoring is.
    process = _qtune("run", str(config), fault="score.partition_done:1", freeze=True)
    _wait_until_stopped(process)
    done = OutputLayout(out).scoring_state(0).done
    # A marker, not its temporary file (write_atomic's ".part-….json.tmp-…" comes first).
    assert len(list(done.glob("part-*.json"))) == 1
    os.killpg(process.pid, signal.SIGKILL)  # the driver and every Ray process it started
    process.wait()
    assert (out / ".qtune.lock").exists()  # left behind by the dead run

    code, output = _finish(_qtune("run", str(config)))
    assert code == 0, output
    _assert_clean_log(output)
    assert "resuming:" in output
    assert published(out) == published(mixed["out"])


@pytest.mark.ray
def test_scoring_workers_shut_their_engines_down_before_the_run_returns(
    mixed, llama_dir, tmp_path, monkeypatch
):
    """When the dataset is done, Ray Data lets each scoring actor exit; Score closes its engine
    then. The run must wait for that before it shuts embedded Ray down: stopping the raylet under
    an exiting worker cut the engine's shutdown short, or made the worker abort ("Mutex corrupt",
    SIGABRT, "Fatal Python error: Aborted" in the log of a run that had succeeded)."""
    trace = tmp_path / "trace"
    monkeypatch.setenv(FAULT_TRACE_ENV, str(trace))
    # An engine takes its time to shut down (vLLM: seconds); a torch model would not. Without
    # the wait, Ray is shut down while the worker is in there and the "closed" event is lost.
    monkeypatch.setenv("QTUNE_FAULT", "score.backend_closing")
    monkeypatch.setenv(FAULT_DELAY_ENV, "5")
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], llama_dir, tmp_path / "out")
    result = CliRunner().invoke(app, ["score", str(config)])
    assert result.exit_code == 0, result.output
    events = read_trace(trace)
    started = {pid for point, pid in events if point == "score.backend_start"}
    closed = {pid for point, pid in events if point == "score.backend_closed"}
    assert started and closed == started, events


def _assert_clean_log(output: str) -> None:
    """Nothing a user would take for a crash in the log of a run that succeeded."""
    for sign in ("Fatal Python error", "Mutex corrupt", "SIGABRT", "core dumped"):
        assert sign not in output, output


@pytest.mark.ray
def test_changed_config_is_not_resumed_without_restart(mixed, llama_dir, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], llama_dir, out)
    code, output = _finish(_qtune("run", str(config), fault="score.partition_done:2"))
    assert code == -signal.SIGKILL, output

    changed = write_config(tmp_path / "d.yaml", mixed["corpus"], llama_dir, out, max_length=200)
    result = CliRunner().invoke(app, ["run", str(changed)])
    assert result.exit_code == 1
    assert "unfinished scoring run made with a different settings" in result.output
    assert "--restart" in result.output
    result = CliRunner().invoke(app, ["run", str(changed), "--restart"])
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.output


@pytest.mark.ray
def test_same_shards_with_two_scoring_workers(mixed, llama_dir, tmp_path):
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "c.yaml", mixed["corpus"], llama_dir, out, workers=2, num_cpus=4
    )
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    assert published(out) == published(mixed["out"])


def test_a_second_writer_is_refused_while_the_first_runs(mixed, llama_dir, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], llama_dir, out)
    # The holder holds the lock until its stdin closes (not for a while: however slow this
    # test is, it is still held), and says so on stdout.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from qtune.pipeline.lock import "
            "OutputLock; lock = OutputLock(Path(sys.argv[1]), 'qtune run other.yaml'); "
            "lock.__enter__(); print('held', flush=True); sys.stdin.read()",
            str(OutputLayout(out).lock_file),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(app, ["run", str(config)])
        assert result.exit_code == 1
        assert str(holder.pid) in result.output and "qtune run other.yaml" in result.output
        assert holder.poll() is None  # it held the lock throughout
    finally:
        holder.kill()
        holder.communicate()
    result = CliRunner().invoke(app, ["triage", str(config)])  # the dead holder's lock is stale
    assert "no scored cache" in result.output


@pytest.mark.ray
def test_a_scoring_worker_killed_once_is_restarted_and_nothing_is_lost(
    mixed, llama_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("QTUNE_FAULT", "score.batch:2")  # inside the actor, mid-run
    monkeypatch.setenv("QTUNE_FAULT_ONCE", str(tmp_path / "fired"))
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], llama_dir, out)
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fired").exists()  # the worker really died
    assert published(out) == published(mixed["out"])


@pytest.mark.ray
def test_a_scoring_worker_that_keeps_dying_fails_after_its_restarts(
    mixed, llama_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("QTUNE_FAULT", "score.batch")  # every worker dies on its first batch
    monkeypatch.setenv(FAULT_TRACE_ENV, str(tmp_path / "trace"))
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], llama_dir, tmp_path / "out")
    result = CliRunner().invoke(app, ["run", str(config), "--set", "scoring.max_restarts=1"])
    assert result.exit_code == 1
    assert "a scoring worker died 2 times (scoring.max_restarts = 1)" in result.output
    assert "re-running the same command resumes" in result.output
    # It gave up after its restart budget, not later: two worker processes, each killed at its
    # first batch (what the message says happened, happened; no third start was tried).
    batches = [pid for point, pid in read_trace(tmp_path / "trace") if point == "score.batch"]
    assert len(batches) == len(set(batches)) == 2


@pytest.mark.ray
def test_an_engine_that_cannot_start_fails_fast_with_its_reason(
    mixed, llama_dir, tmp_path, monkeypatch
):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], broken, tmp_path / "out")
    monkeypatch.setenv(FAULT_TRACE_ENV, str(tmp_path / "trace"))
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 1
    # One line with the engine's own reason (Ray also logs the remote traceback above it).
    assert "error: the torch scoring backend could not start for" in result.output
    assert "SafetensorError: Error while deserializing header" in result.output
    # Fast because nothing is retried in new processes: the worker that could not start its
    # engine stayed alive to report why (no actor restarts, which would each load the model).
    starts = [
        pid for point, pid in read_trace(tmp_path / "trace") if point == "score.backend_start"
    ]
    assert starts and len(set(starts)) == 1


def test_qtune_verify_passes_a_clean_version_and_names_a_truncated_shard(mixed, tmp_path):
    import shutil

    runner = CliRunner()
    result = runner.invoke(app, ["verify", str(mixed["out"])])
    assert result.exit_code == 0 and result.output.startswith("ok ")
    copy = tmp_path / "copy"
    shutil.copytree(mixed["out"], copy)
    shard = sorted((copy / "data/epoch_000/train").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = runner.invoke(app, ["verify", str(copy), "--epoch", "0"])
    assert result.exit_code == 1
    assert f"problem: train/{shard.name}: unreadable Parquet" in result.output
    assert "problem(s) in" in result.output
