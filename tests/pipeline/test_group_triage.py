"""Source-aware triage through the pipeline: a mixed corpus whose easy part global scope starves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from qtune import schema
from qtune.demo.synthetic_cache import synthetic_scored_batch
from qtune.pipeline.cli import app
from qtune.pipeline.config import load_config
from qtune.pipeline.layout import SCORE_SUMMARY, OutputLayout
from qtune.pipeline.triage_job import run_triage

SIZES = {"hard.jsonl": 300, "easy.jsonl": 100, "tiny.jsonl": 5}


@pytest.fixture
def mixed_cache(tmp_path) -> Path:
    """Three sources; every sample of easy.jsonl has low PPL and low entropy (Q3 globally)."""
    out = tmp_path / "out"
    scores = OutputLayout(out).scores_dir(0)
    scores.mkdir(parents=True)
    rng = np.random.default_rng(7)
    start = 0
    for part, (source, n) in enumerate(SIZES.items()):
        batch = synthetic_scored_batch(start, n, 20, 8, rng)
        batch = batch.set_column(
            batch.schema.get_field_index(schema.SOURCE), schema.SOURCE, pa.array([source] * n)
        )
        if source == "easy.jsonl":
            for column, values in (
                (schema.PPL, rng.uniform(1.01, 1.05, n)),
                (schema.ENTROPY, rng.uniform(0.01, 0.05, n)),
            ):
                batch = batch.set_column(
                    batch.schema.get_field_index(column), column, pa.array(values)
                )
        pq.write_table(batch, scores / f"part-{part:06d}.parquet")
        start += n
    total = sum(SIZES.values())
    summary = {"rows": total, "scored": total, "rejected": 0, "source_rows": SIZES}
    (scores / SCORE_SUMMARY).write_text(json.dumps(summary))
    return out


def _cfg(out: Path, *extra: str):
    return load_config(
        None,
        [
            "input.path=unused.jsonl",
            "model.path=unused",
            f"output.dir={out}",
            "output.num_shards=2",
            "output.report=false",
            "qtuning.sample_ratio=0.25",
            *extra,
        ],
    )


def _kept_by_source(out: Path) -> dict[str, int]:
    train = pq.ParquetDataset(out / "data/epoch_000/train").read(columns=[schema.GROUP])
    values = train.column(schema.GROUP).to_pylist()
    return {source: values.count(source) for source in SIZES}


def test_global_scope_starves_the_easy_source_and_says_so(mixed_cache):
    summary = run_triage(_cfg(mixed_cache, "qtuning.scope=global"))
    kept = _kept_by_source(mixed_cache)
    proportional = 0.25 * SIZES["easy.jsonl"]
    assert kept["easy.jsonl"] < 0.1 * proportional  # starved
    manifest = json.loads((mixed_cache / "data/epoch_000/manifest.json").read_text())
    assert "easy.jsonl" in manifest["coverage"]["under_covered"]
    assert manifest["coverage"]["group_by"] == "file"
    assert summary.coverage["groups"]["easy.jsonl"]["under_covered"]

    config = mixed_cache.parent / "c.yaml"
    config.write_text(
        f"input: {{path: x}}\nmodel: {{path: y}}\noutput: {{dir: {mixed_cache}, report: false}}\n"
        "qtuning: {scope: global}\n"
    )
    result = CliRunner().invoke(app, ["triage", str(config)])
    assert result.exit_code == 0, result.output
    assert "coverage by file" in result.output
    assert "under-represented in the kept samples: easy.jsonl" in result.output
    assert "use --set qtuning.scope=group --set qtuning.group_by=file" in result.output


def test_group_scope_keeps_k_g_per_source_with_its_own_ratio_and_a_tiny_group(mixed_cache):
    summary = run_triage(
        _cfg(
            mixed_cache,
            "qtuning.scope=group",
            "qtuning.group_by=file",
            "qtuning.group_ratios={easy.jsonl: 0.5}",
        )
    )
    kept = _kept_by_source(mixed_cache)
    assert kept == {"hard.jsonl": 75, "easy.jsonl": 50, "tiny.jsonl": 1}
    groups = summary.thresholds["groups"]
    assert groups["easy.jsonl"]["k"] == 50 and groups["easy.jsonl"]["ratio"] == 0.5
    assert groups["tiny.jsonl"]["small"] and summary.thresholds["small_groups"] == ["tiny.jsonl"]
    manifest = json.loads((mixed_cache / "data/epoch_000/manifest.json").read_text())
    assert manifest["coverage"]["under_covered"] == []
    assert manifest["thresholds"]["groups"]["hard.jsonl"]["k"] == 75
    dropped = pq.read_table(mixed_cache / "data/epoch_000/dropped.parquet")
    assert set(dropped.column(schema.GROUP).to_pylist()) == set(SIZES)


def test_group_by_an_input_field_and_a_field_no_row_has(tmp_path):
    from qtune.demo.synthetic_cache import TASKS, write_synthetic_cache

    out = tmp_path / "out"
    write_synthetic_cache(out, 90, response_tokens=20, prompt_tokens=8, rows_per_file=32)
    summary = run_triage(_cfg(out, "qtuning.scope=group", "qtuning.group_by=task"))
    assert set(summary.thresholds["groups"]) == set(TASKS)
    assert all(g["k"] == 7 for g in summary.thresholds["groups"].values())  # floor(0.25 * 30)
    with pytest.raises(Exception, match="no input row has that field"):
        run_triage(_cfg(out, "qtuning.scope=group", "qtuning.group_by=category"))
