"""The scoring job end to end: local Ray, real vLLM in the actor pool, corpus with bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from typer.testing import CliRunner

from qtune import schema
from qtune.pipeline.cli import app
from qtune.pipeline.config import load_config
from qtune.pipeline.score_job import run_score
from tests.conftest import reference_scores

GOOD = {
    "messages": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."},
    ]
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from qtune.demo.corpus import write_demo_corpus

    root = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(root, n_samples=48, seed=3)
    long_answer = " ".join(str(i) for i in range(300))
    bad_lines = [
        json.dumps(GOOD),
        '{"messages": [{"role": "user", "content": "broken',
        json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
        ),
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Count."},
                    {"role": "assistant", "content": long_answer},
                ]
            }
        ),
        json.dumps({"id": "kept-1", **GOOD}),
    ]
    (root / "bad.jsonl").write_text("\n".join(bad_lines) + "\n")
    return root


def _config(corpus: Path, model: Path, out: Path, *extra: str):
    return load_config(
        None,
        [
            f"input.path={corpus}",
            f"model.path={model}",
            "model.max_length=256",
            "model.overlength=reject",
            f"output.dir={out}",
            "ray.num_cpus=2",
            "scoring.batch_size=16",
            *extra,
        ],
    )


@pytest.mark.vllm
@pytest.mark.ray
def test_vllm_pipeline_scores_good_rows_and_lists_every_bad_one(corpus, llama_dir, tmp_path):
    summary = run_score(_config(corpus, llama_dir, tmp_path / "out"))
    assert summary.rows == 48 + 5
    assert summary.scored + summary.rejected == summary.rows
    assert summary.reasons == {"invalid_json": 1, "empty_assistant": 1, "too_long": 1}

    scores = pads.dataset(summary.scores_dir, format="parquet").to_table()
    rejects = pads.dataset(summary.rejects_dir, format="parquet").to_table()
    assert scores.schema == schema.SCORED_CACHE_SCHEMA
    assert scores.num_rows == summary.scored and rejects.num_rows == 3
    assert sorted(rejects.column(schema.REASON).to_pylist()) == [
        "empty_assistant",
        "invalid_json",
        "too_long",
    ]
    assert all(rejects.column(schema.RAW).to_pylist())
    assert set(rejects.column(schema.ROW_INDEX).to_pylist()) == {1, 2, 3}
    # Every input row is accounted for exactly once.
    keys = {
        (s, i)
        for s, i in zip(
            scores.column(schema.SOURCE).to_pylist(),
            scores.column(schema.ROW_INDEX).to_pylist(),
            strict=True,
        )
    }
    keys |= {
        (s, i)
        for s, i in zip(
            rejects.column(schema.SOURCE).to_pylist(),
            rejects.column(schema.ROW_INDEX).to_pylist(),
            strict=True,
        )
    }
    assert len(keys) == summary.rows
    assert "kept-1" in scores.column(schema.SAMPLE_ID).to_pylist()

    # Per-token values from vLLM inside the Ray actor match an independent computation.
    for row in scores.slice(0, 5).to_pylist():
        ids = np.array(row[schema.INPUT_IDS])
        ref = reference_scores(llama_dir, ids)
        mask = np.array(row[schema.LOSS_MASK], dtype=bool)
        assert len(row[schema.TOKEN_LOGPROB]) == len(ids) == len(mask)
        np.testing.assert_allclose(row[schema.TOKEN_LOGPROB], ref[:, 0], atol=1e-4)
        np.testing.assert_allclose(row[schema.TOKEN_ENTROPY], ref[:, 1], atol=1e-4)
        assert row[schema.NLL] == pytest.approx(-ref[mask, 0].mean(), abs=1e-4)
        assert row[schema.N_RESPONSE_TOKENS] == mask.sum()
    # Published atomically: nothing left in staging; the summary travels with the cache.
    assert not (tmp_path / "out" / ".staging").exists()
    assert json.loads((Path(summary.scores_dir) / "_summary.json").read_text())["rows"] == 53


@pytest.mark.ray
def test_cli_score_with_torch_backend_and_config_errors(corpus, llama_dir, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"input: {{path: {corpus}/chat.jsonl}}\nmodel: {{path: {llama_dir}, max_length: 256}}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\nscoring: {{backend: torch}}\nray: {{num_cpus: 2}}\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["score", str(config)])
    assert result.exit_code == 0, result.output
    assert "scored samples" in result.output and "tokens/s" in result.output
    cache = pads.dataset(str(tmp_path / "out/scores/epoch_000"), format="parquet").to_table()
    assert cache.num_rows > 0 and cache.column(schema.PPL).null_count == 0

    result = runner.invoke(app, ["score", str(config), "--set", "scoring.backnd=torch"])
    assert result.exit_code == 2 and "scoring.backnd: unknown key" in result.output
    result = runner.invoke(
        app, ["score", str(config), "--set", f"input.path={tmp_path}/none*.jsonl"]
    )
    assert result.exit_code == 1 and "matches no file" in result.output
    (tmp_path / "empty.jsonl").write_text("")
    result = runner.invoke(
        app, ["score", str(config), "--set", f"input.path={tmp_path}/empty.jsonl"]
    )
    assert result.exit_code == 1 and "holds no rows" in result.output
    assert not (tmp_path / "out" / ".staging").exists()  # a failed run leaves no staging
