"""Triage job and publication: manifest, card, LATEST, datasets loading, re-triage, --out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from qtune import schema
from qtune.demo.synthetic_cache import write_synthetic_cache
from qtune.pipeline.cli import app
from qtune.pipeline.config import ConfigError, load_config
from qtune.pipeline.publish import model_fingerprint
from qtune.pipeline.triage_job import run_triage
from qtune.stages.shards import file_sha256

N = 400


@pytest.fixture
def scored_out(tmp_path) -> Path:
    out = tmp_path / "out"
    write_synthetic_cache(
        out, N, response_tokens=30, prompt_tokens=10, rows_per_file=128, rejected=7
    )
    return out


def _cfg(out: Path, *extra: str):
    return load_config(
        None,
        [
            "input.path=unused.jsonl",
            "model.path=unused",
            f"output.dir={out}",
            "output.num_shards=4",
            *extra,
        ],
    )


def test_publishes_a_loadable_version_with_a_complete_manifest(scored_out):
    summary = run_triage(_cfg(scored_out, "qtuning.sample_ratio=0.25"))
    version = scored_out / "data" / "epoch_000"
    manifest = json.loads((version / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["kept"] == summary.kept == 100
    assert counts["kept"] + counts["dropped"] + counts["rejected"] == counts["input_rows"] == N + 7
    assert sum(q["samples"] for q in manifest["quadrants"].values()) == N
    assert sum(q["kept"] for q in manifest["quadrants"].values()) == 100
    for entry in manifest["files"]:
        assert file_sha256(version / entry["path"]) == entry["sha256"]
    assert sum(f["rows"] for f in manifest["files"]) == 100
    assert manifest["thresholds"]["policy"] == "qtuning" and "a" in manifest["thresholds"]
    assert manifest["config_fingerprint"] and manifest["model"]["fingerprint"] == "synthetic"
    assert (scored_out / "LATEST").read_text().strip() == "epoch_000"
    assert not (scored_out / ".staging").exists()

    dropped = pq.read_table(version / "dropped.parquet")
    assert dropped.schema == schema.DROPPED_SCHEMA and dropped.num_rows == N - 100
    assert set(dropped.column("reason").to_pylist()) == {"outside_corners"}

    from datasets import load_dataset

    train = load_dataset(str(scored_out))["train"]
    assert len(train) == 100
    assert train.column_names == schema.SHARD_SCHEMA.names
    same = load_dataset(str(scored_out), name="epoch_000")["train"]
    assert sorted(same["sample_id"]) == sorted(train["sample_id"])
    for row in train.select(range(20)):
        assert [m == 1 for m in row["loss_mask"]] == [x != -100 for x in row["labels"]]
        assert row["num_loss_tokens"] == sum(row["loss_mask"]) > 0
    pruned = train.filter(lambda r: r["token_pruned"])
    assert len(pruned) and all(r["quadrant"] in {"Q1", "Q2", "Q3", "Q4"} for r in pruned)

    # A trainer-compatible batch.
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, "<pad>")), pad_token="<pad>"
    )
    features = [
        {k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in train.select(range(4))
    ]
    batch = DataCollatorForSeq2Seq(tok, padding=True, return_tensors="pt")(features)
    width = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, width)
    assert (batch["labels"] != -100).sum().item() == sum(
        r["num_loss_tokens"] for r in train.select(range(4))
    )


def test_token_pruning_keeps_the_configured_share(scored_out):
    run_triage(_cfg(scored_out, "qtuning.sample_ratio=0.5", "qtuning.token_ratio=0.3"))
    shards = pq.ParquetDataset(scored_out / "data/epoch_000/train").read()
    cache = pq.ParquetDataset(scored_out / "scores/epoch_000").read(
        columns=["sample_id", "n_response_tokens"]
    )
    before = dict(zip(cache.column(0).to_pylist(), cache.column(1).to_pylist(), strict=True))
    for row in shards.to_pylist():
        n = before[row["sample_id"]]
        # One end-of-turn token per synthetic response: out of the budget, always kept.
        expected = max(1, int(np.floor(0.3 * (n - 1) + 1e-9))) + 1 if row["token_pruned"] else n
        assert row["num_loss_tokens"] == expected


def test_retriage_replaces_the_version_and_out_publishes_elsewhere(scored_out, tmp_path):
    run_triage(_cfg(scored_out, "qtuning.sample_ratio=0.25"))
    scores_before = sorted(p.stat().st_mtime_ns for p in (scored_out / "scores").rglob("*"))
    run_triage(_cfg(scored_out, "qtuning.sample_ratio=0.1", "qtuning.policy=ppl"))
    manifest = json.loads((scored_out / "data/epoch_000/manifest.json").read_text())
    assert manifest["counts"]["kept"] == 40 and manifest["qtuning"]["policy"] == "ppl"
    assert sorted(p.stat().st_mtime_ns for p in (scored_out / "scores").rglob("*")) == scores_before
    sweep = tmp_path / "sweep-0.5"
    summary = run_triage(_cfg(scored_out, "qtuning.sample_ratio=0.5"), out_dir=sweep)
    assert summary.kept == 200 and (sweep / "LATEST").is_file() and not (sweep / "scores").exists()
    assert (
        json.loads((scored_out / "data/epoch_000/manifest.json").read_text())["counts"]["kept"]
        == 40
    )  # the original output is untouched


def test_cli_triage_and_clear_errors(scored_out, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"input: {{path: x.jsonl}}\nmodel: {{path: m}}\noutput: {{dir: {scored_out}}}\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["triage", str(config), "--set", "qtuning.sample_ratio=0.2"])
    assert result.exit_code == 0, result.output
    assert "kept samples" in result.output and "load_dataset(" in result.output
    assert "no re-scoring" in result.output
    result = runner.invoke(app, ["triage", str(config), "--set", f"output.dir={tmp_path / 'none'}"])
    assert result.exit_code == 1 and "no scored cache" in result.output


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("qtuning.sample_ratio=0", "qtuning.sample_ratio"),
        ("qtuning.sample_ratio=1.5", "qtuning.sample_ratio"),
        ("qtuning.token_ratio=-0.1", "qtuning.token_ratio"),
        ("qtuning.lam=2", "qtuning.lam"),
        ("qtuning.scope=everywhere", "qtuning.scope"),
        ("qtuning.policy=best", "unknown policy 'best'"),
        ("qtuning.normalize=zscore", "qtuning.normalize"),
    ],
)
def test_bad_qtuning_values_fail_before_work(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, override)


def test_model_fingerprint_tracks_content(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a" * 100)
    first = model_fingerprint(tmp_path)
    assert model_fingerprint(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"b" * 100)
    assert model_fingerprint(tmp_path) != first


def _shard_rows(out: Path) -> list[dict]:
    return pq.ParquetDataset(out / "data" / "epoch_000" / "train").read().to_pylist()


def test_guards_keep_end_of_turn_tokens_and_short_answers_whole(tmp_path):
    from qtune.pipeline.verify import verify_version

    out = tmp_path / "out"
    # Responses of ~1-40 tokens: the short ones must keep every token, the long ones their last.
    write_synthetic_cache(out, 600, response_tokens=12, prompt_tokens=8, rows_per_file=256)
    summary = run_triage(_cfg(out, "qtuning.sample_ratio=0.4", "qtuning.min_prunable_tokens=16"))
    manifest = json.loads((out / "data/epoch_000/manifest.json").read_text())
    assert manifest["qtuning"]["keep_end_of_turn"] is True  # the default
    assert manifest["qtuning"]["min_prunable_tokens"] == 16
    rows = _shard_rows(out)
    cache = {
        r["sample_id"]: r
        for r in pq.ParquetDataset(out / "scores" / "epoch_000").read().to_pylist()
    }
    pruned = short = 0
    for row in rows:
        original = np.asarray(cache[row["sample_id"]]["loss_mask"], bool)
        mask = np.asarray(row["loss_mask"], bool)
        end = np.flatnonzero(original)[-1]
        assert mask[end], row["sample_id"]  # the end-of-turn token always keeps its label
        if original.sum() - 1 < 16:
            short += 1
            assert not row["token_pruned"] and np.array_equal(mask, original)
        pruned += row["token_pruned"]
    assert pruned and short  # both kinds were kept
    assert summary.signals["at_most_one_loss_token"] == 0 and not summary.warnings
    assert verify_version(out).ok


def test_unguarded_pruning_of_short_answers_is_a_loud_warning(tmp_path):
    out = tmp_path / "out"
    write_synthetic_cache(out, 400, response_tokens=1, prompt_tokens=8, rows_per_file=256)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"input: {{path: x}}\nmodel: {{path: y}}\noutput: {{dir: {out}}}\n"
        "qtuning: {keep_end_of_turn: false, min_prunable_tokens: 0, sample_ratio: 0.5}\n"
    )
    result = CliRunner().invoke(app, ["triage", str(config)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "data/epoch_000/manifest.json").read_text())
    assert manifest["signals"]["at_most_one_loss_token_share"] > 0.5
    [warning] = manifest["warnings"]
    assert "carry at most one loss token" in warning and "keep_end_of_turn=true" in warning
    assert "carry at most one loss token" in " ".join(result.output.split())
    assert "kept from the top 5% PPL" in result.output
    assert CliRunner().invoke(app, ["report", str(out)]).exit_code == 0
    report = (out / "data/epoch_000/report/index.html").read_text()
    assert "carry at most one loss token" in report
    assert "kept samples from the top 5.0% of PPL" in report
