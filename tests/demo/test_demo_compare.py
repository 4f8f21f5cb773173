"""`qtune compare` on the demo corpus and model, as a user runs it after `make demo`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtune.demo.assets import prepare_demo
from qtune.pipeline.cli import app

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.ray
def test_compare_on_the_demo(tmp_path):
    corpus, model = ROOT / ".cache/demo/corpus", ROOT / ".cache/demo/model"
    prepare_demo(corpus, model)
    out = tmp_path / "compare"
    result = CliRunner().invoke(
        app,
        [
            "compare",
            str(ROOT / "configs/demo.yaml"),
            "--out", str(out),
            "--limit", "400",
            "--holdout", "0.1",
            "--epochs", "1",
            "--arms", "random",
            "--learning-rate", "5e-4",
            "--set", f"input.path={corpus}",
            "--set", f"model.path={model}",
            "--set", "scoring.backend=torch",
            "--set", "ray.num_cpus=2",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    results = {r["arm"]: r["epochs"][0] for r in json.loads((out / "results.json").read_text())}
    assert set(results) == {"qtuning", "random"}
    assert results["random"]["kept_samples"] == results["qtuning"]["kept_samples"]
    assert results["random"]["kept_loss_tokens"] <= results["qtuning"]["kept_loss_tokens"]
    for record in results.values():
        assert 0 < record["heldout_loss"] < 10
    assert "after the last epoch" in result.output
