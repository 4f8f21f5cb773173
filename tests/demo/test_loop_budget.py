"""The demo loop's random arm matches qtuning's budget; noise routing counts what was planted.

Pure logic on a synthetic scored cache (no model): the loop itself trains for minutes and is run
by `make demo-loop`, not by the tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq

from qtune.demo.loop import noise_routing
from qtune.demo.synthetic_cache import write_synthetic_cache
from qtune.pipeline.compare import triage_at_budget
from qtune.pipeline.config import load_config
from qtune.pipeline.triage_job import run_triage


def _config(tmp_path: Path, out: Path) -> Path:
    config = tmp_path / "c.yaml"
    config.write_text(
        f"input: {{path: x}}\nmodel: {{path: y}}\noutput: {{dir: {out}}}\n"
        "qtuning: {sample_ratio: 0.2}\n"
    )
    return config


def test_random_arm_keeps_the_same_samples_and_at_most_the_same_loss_tokens(tmp_path):
    out = tmp_path / "out"
    write_synthetic_cache(out, 500, response_tokens=60, prompt_tokens=10, rows_per_file=200)
    config = _config(tmp_path, out)
    qtuning = run_triage(load_config(config), epoch=0)
    random_out = tmp_path / "random"
    write_synthetic_cache(random_out, 500, response_tokens=60, prompt_tokens=10, rows_per_file=200)
    token_ratio = triage_at_budget(
        config, [], random_out, 0, qtuning.kept, qtuning.kept_loss_tokens
    )
    manifest = json.loads((random_out / "data" / "epoch_000" / "manifest.json").read_text())
    summary = SimpleNamespace(**manifest["counts"])
    assert manifest["qtuning"]["policy"] == "random" and summary.kept == qtuning.kept
    assert summary.kept_loss_tokens <= qtuning.kept_loss_tokens
    # Within 2% of the target: the bisection found the budget.
    assert summary.kept_loss_tokens > qtuning.kept_loss_tokens - 0.02 * qtuning.kept_loss_tokens
    assert 0 < token_ratio < 1


def test_noise_routing_counts_kept_and_dropped_by_kind(tmp_path):
    out = tmp_path / "out"
    write_synthetic_cache(out, 300, response_tokens=30, prompt_tokens=10, rows_per_file=300)
    run_triage(load_config(_config(tmp_path, out)), epoch=0)
    version = out / "data" / "epoch_000"
    ids = pq.read_table(out / "scores" / "epoch_000", columns=["sample_id"]).column(0).to_pylist()
    truth = {i: ("short", "wrong" if n % 10 == 0 else None) for n, i in enumerate(ids)}
    routing = noise_routing(version, truth)
    kept = set(pq.read_table(version / "train", columns=["sample_id"]).column(0).to_pylist())
    wrong = [i for i, (_, kind) in truth.items() if kind]
    entry = routing["wrong"]
    assert entry["input"] == len(wrong) == 30 and entry["input_share"] == 0.1
    assert entry["kept"] == len(kept & set(wrong))
    assert entry["kept_share"] == entry["kept"] / len(kept)
    assert sum(entry["by_quadrant"].values()) == 30
