"""`qtune run` end to end on local Ray (torch backend), then `qtune triage` on its cache."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qtune.pipeline.cli import app


@pytest.mark.ray
def test_run_publishes_then_triage_reuses_the_cache(tmp_path, llama_dir):
    from qtune.demo.corpus import write_demo_corpus

    write_demo_corpus(tmp_path / "corpus", n_samples=64, seed=4)
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(
        f"input: {{path: {tmp_path / 'corpus'}}}\n"
        f"model: {{path: {llama_dir}, max_length: 256}}\n"
        "scoring: {backend: torch}\n"
        "qtuning: {sample_ratio: 0.25, token_ratio: 0.5}\n"
        f"output: {{dir: {out}, num_shards: 2}}\n"
        "ray: {num_cpus: 2}\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    assert "qtune score" in result.output and "EU plane" in result.output
    assert f'load_dataset("{out}")' in result.output
    # The report is written by default; its path is the last line.
    report = out / "data/epoch_000/report/index.html"
    assert report.is_file() and result.output.strip().splitlines()[-1] == f"report: {report}"

    from datasets import load_dataset

    assert len(load_dataset(str(out))["train"]) == 16
    scored = json.loads((out / "scores/epoch_000/_summary.json").read_text())

    result = runner.invoke(app, ["triage", str(config), "--set", "qtuning.sample_ratio=0.5"])
    assert result.exit_code == 0, result.output
    assert "no re-scoring" in result.output
    manifest = json.loads((out / "data/epoch_000/manifest.json").read_text())
    assert manifest["counts"]["kept"] == 32
    assert manifest["scores"]["summary"] == scored  # the same scored cache, not a new one
    assert manifest["timings"]["total_s"] < scored["seconds"]


@pytest.mark.ray
def test_limit_runs_a_partial_trial_that_a_full_run_replaces(tmp_path, llama_dir):
    from qtune.demo.corpus import write_demo_corpus

    write_demo_corpus(tmp_path / "corpus", n_samples=64, seed=4)
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(
        f"input: {{path: {tmp_path / 'corpus'}, partition_rows: 8}}\n"
        f"model: {{path: {llama_dir}, max_length: 256}}\n"
        "scoring: {backend: torch}\n"
        f"output: {{dir: {out}, num_shards: 2, report: false}}\n"
        "ray: {num_cpus: 2}\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(config), "--limit", "20"])
    assert result.exit_code == 0, result.output
    assert "PARTIAL RUN: only the first 20 input rows" in result.output
    assert "scoring: 20/20 samples (100%)" in result.output  # line-based progress off a tty
    assert "stage timings" in result.output and "prune tokens, write shards" in result.output
    manifest = json.loads((out / "data/epoch_000/manifest.json").read_text())
    assert manifest["partial"] == {"limit": 20} and manifest["counts"]["input_rows"] == 20
    assert [s["stage"] for s in manifest["stages"]["scoring"]] == [
        "plan input",
        "score",
        "finish scores",
    ]

    result = runner.invoke(app, ["run", str(config)])  # the full run replaces the trial
    assert result.exit_code == 0, result.output
    assert "replacing the partial results of a --limit 20 run" in result.output
    manifest = json.loads((out / "data/epoch_000/manifest.json").read_text())
    assert manifest["partial"] is None and manifest["counts"]["input_rows"] == 64

    result = runner.invoke(app, ["run", str(config), "--limit", "5"])  # never over full results
    assert result.exit_code == 1 and "--set output.dir=" in result.output
