"""Nothing lost: bad input, bad configuration, crashes and restarts (torch backend, local Ray).

A mixed corpus carries every kind of bad row next to good ones. Crashes are real: the pipeline
runs in a subprocess that dies by SIGKILL at a named point (``qtune.faults``) or is killed from
outside, then the same command runs again and must publish the same shards as a clean run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from qtune import schema
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


def _qtune(*args: str, fault: str | None = None, freeze: bool = False, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("QTUNE_FAULT", None)
    if fault:
        env["QTUNE_FAULT"] = fault
    if freeze:
        env["QTUNE_FAULT_SIGNAL"] = "STOP"
    return subprocess.Popen(
        [sys.executable, "-m", "qtune.pipeline.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **popen,
    )


def _finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


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
    assert published(out) == published(mixed["out"])
    if fault.startswith("score.partition_done"):
        assert "resuming: 3 of" in output
    assert not (out / ".staging").exists()
    assert verify_version(out).ok


@pytest.mark.ray
def test_kill_minus_nine_from_outside_then_resume(mixed, llama_dir, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], llama_dir, out)
    # The driver freezes after its first partition (before it could finish the rest): the kill
    # then always lands mid-scoring, however fast the scoring is.
    process = _qtune("run", str(config), fault="score.partition_done:1", freeze=True)
    done = OutputLayout(out).scoring_state(0).done
    deadline = time.monotonic() + 240
    # A marker, not its temporary file (write_atomic's ".part-….json.tmp-…" comes first).
    while not (done.is_dir() and any(done.glob("part-*.json"))):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and every Ray process it started
    process.communicate()
    assert (out / ".qtune.lock").exists()  # left behind by the dead run

    code, output = _finish(_qtune("run", str(config)))
    assert code == 0, output
    assert "resuming:" in output
    assert published(out) == published(mixed["out"])


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
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from qtune.pipeline.lock import "
            "OutputLock; lock = OutputLock(Path(sys.argv[1]), 'qtune run other.yaml'); "
            "lock.__enter__(); print('held', flush=True); time.sleep(60)",
            str(OutputLayout(out).lock_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(app, ["run", str(config)])
        assert result.exit_code == 1
        assert str(holder.pid) in result.output and "qtune run other.yaml" in result.output
    finally:
        holder.kill()
        holder.wait()
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
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], llama_dir, tmp_path / "out")
    started = time.monotonic()
    result = CliRunner().invoke(app, ["run", str(config), "--set", "scoring.max_restarts=1"])
    assert result.exit_code == 1
    assert "a scoring worker died 2 times (scoring.max_restarts = 1)" in result.output
    assert "re-running the same command resumes" in result.output
    assert time.monotonic() - started < 120


@pytest.mark.ray
def test_an_engine_that_cannot_start_fails_fast_with_its_reason(mixed, llama_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], broken, tmp_path / "out")
    started = time.monotonic()
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 1
    # One line with the engine's own reason (Ray also logs the remote traceback above it).
    assert "error: the torch scoring backend could not start for" in result.output
    assert "SafetensorError: Error while deserializing header" in result.output
    assert time.monotonic() - started < 120


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
