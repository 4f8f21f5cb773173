"""Re-scoring with a checkpoint publishes the next epoch; the tokenizer must not change."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from qtune.pipeline.cli import app
from qtune.pipeline.config import load_config
from qtune.pipeline.rescore_job import run_rescore
from qtune.pipeline.score_job import run_score
from qtune.pipeline.triage_job import run_triage


def _perturbed_checkpoint(base: Path, target: Path, scale: float = 0.05) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(base).save_pretrained(target)
    return target


@pytest.mark.ray
def test_rescore_publishes_next_epoch_and_loaders_follow(tmp_path, llama_dir, tokenizer):
    from datasets import load_dataset

    from qtune.demo.corpus import write_demo_corpus

    write_demo_corpus(tmp_path / "corpus", n_samples=60, seed=8)
    out = tmp_path / "out"
    cfg = load_config(
        None,
        [
            f"input.path={tmp_path / 'corpus'}",
            f"model.path={llama_dir}",
            "model.max_length=256",
            "scoring.backend=torch",
            f"output.dir={out}",
            "output.num_shards=2",
            "qtuning.sample_ratio=0.5",
            "ray.num_cpus=2",
        ],
    )
    run_score(cfg)
    first = run_triage(cfg)
    epoch0_ids = sorted(load_dataset(str(out), name="epoch_000")["train"]["sample_id"])

    checkpoint = _perturbed_checkpoint(llama_dir, tmp_path / "ckpt")
    score_summary, summary = run_rescore(cfg, checkpoint)
    assert summary.epoch == 1 and (out / "LATEST").read_text().strip() == "epoch_001"
    manifest = json.loads((out / "data/epoch_001/manifest.json").read_text())
    assert manifest["parent"] == "epoch_000"
    assert manifest["model"]["checkpoint"]["path"] == str(checkpoint.absolute())
    assert (
        manifest["model"]["fingerprint"]
        and manifest["model"]["fingerprint"]
        != (json.loads((out / "data/epoch_000/manifest.json").read_text())["model"]["fingerprint"])
    )
    migration = manifest["migration"]
    assert migration["matched"] == first.scored
    assert sum(sum(row.values()) for row in migration["matrix"].values()) == first.scored
    assert manifest["counts"]["input_rows"] == first.input_rows  # rejects carried over
    # The same token ids, new scores.
    old = load_dataset(str(out), name="epoch_000")["train"]
    new = load_dataset(str(out))["train"]  # the default config follows LATEST
    assert len(new) == summary.kept and sorted(old["sample_id"]) == epoch0_ids
    cache0 = {
        r["sample_id"]: r for r in pq.ParquetDataset(out / "scores/epoch_000").read().to_pylist()
    }
    cache1 = {
        r["sample_id"]: r for r in pq.ParquetDataset(out / "scores/epoch_001").read().to_pylist()
    }
    assert cache0.keys() == cache1.keys()
    some = next(iter(cache0))
    assert cache0[some]["input_ids"] == cache1[some]["input_ids"]
    assert cache0[some]["ppl"] != cache1[some]["ppl"]
    assert score_summary.extra["checkpoint"]["kind"] == "model"


@pytest.mark.ray
def test_rescore_refuses_a_different_tokenizer(tmp_path, llama_dir):
    from qtune.demo.model import build_bpe_tokenizer, save_tiny_model
    from qtune.demo.synthetic_cache import write_synthetic_cache

    out = tmp_path / "out"
    write_synthetic_cache(out, 20, response_tokens=5, prompt_tokens=3)
    other = build_bpe_tokenizer(["completely different text"] * 40, vocab_size=300)
    checkpoint = save_tiny_model(tmp_path / "other", "llama", other)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"input: {{path: x.jsonl}}\nmodel: {{path: {llama_dir}}}\noutput: {{dir: {out}}}\n"
        "scoring: {backend: torch}\n"
    )
    result = CliRunner().invoke(app, ["rescore", str(config), "--model", str(checkpoint)])
    assert result.exit_code == 1, result.output
    assert "tokenizer" in result.output.lower()
    assert not (out / "scores/epoch_001").exists()
