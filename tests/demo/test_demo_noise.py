"""The demo end to end: its planted label noise lands mostly in dropped Q1.

Builds (or reuses) the demo assets exactly as `make demo` does — the corpus and the tiny Llama
trained for a fixed number of steps — scores with the torch backend on local Ray (the vllm
backend's agreement is tested elsewhere) and triages with configs/demo.yaml.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow.dataset as pads
import pytest

from qtune.demo.assets import DEMO_RECIPE, prepare_demo
from qtune.demo.corpus import generate_samples
from qtune.pipeline.config import load_config
from qtune.pipeline.score_job import run_score
from qtune.pipeline.triage_job import run_triage

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.ray
def test_planted_noise_lands_mostly_in_dropped_q1(tmp_path):
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        [
            f"input.path={ROOT / '.cache/demo/corpus'}",
            f"model.path={ROOT / '.cache/demo/model'}",
            f"output.dir={tmp_path / 'out'}",
            "scoring.backend=torch",
            "ray.num_cpus=2",
        ],
    )
    prepare_demo(Path(cfg.input.path), Path(cfg.model.path))
    run_score(cfg)
    summary = run_triage(cfg)
    assert all(q["samples"] > 0 for q in summary.quadrants.values())  # every quadrant populated

    truth = generate_samples(DEMO_RECIPE["n_samples"], seed=DEMO_RECIPE["corpus_seed"])
    noisy = pl.DataFrame(
        {"sample_id": [s["id"] for s in truth], "noisy": [s["noisy"] for s in truth]}
    ).filter(pl.col("noisy"))
    version = Path(summary.version_dir)
    kept = pl.from_arrow(pads.dataset(version / "train").to_table(columns=["sample_id"]))
    dropped = pl.from_arrow(
        pads.dataset(version / "dropped.parquet").to_table(columns=["sample_id", "quadrant"])
    )
    # Samples from files with an id column (chat.jsonl, sharegpt.json) are matched to the truth.
    noisy_dropped = noisy.join(dropped, on="sample_id")
    noisy_kept = noisy.join(kept, on="sample_id")
    total = noisy_dropped.height + noisy_kept.height
    assert total > 100
    in_dropped_q1 = noisy_dropped.filter(pl.col("quadrant") == "Q1").height / total
    assert in_dropped_q1 > 0.5, f"only {in_dropped_q1:.1%} of planted noise in dropped Q1"
