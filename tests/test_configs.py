"""The shipped configs: each one validates, and the real-work examples say what they claim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qtune.pipeline.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Example config -> (the model's vocabulary size, the max lengths its comments allow).
EXAMPLES = {"smollm2-1.7b.yaml": (49152, {2048}), "qwen3-8b.yaml": (151936, {4096, 8192})}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_config_loads(name):
    load_config(CONFIGS / name)  # raises ConfigError on unknown keys or invalid values


def test_the_examples_and_the_demo_are_there():
    assert {"demo.yaml", *EXAMPLES} <= {p.name for p in CONFIGS.glob("*.yaml")}


def test_unknown_keys_are_rejected(tmp_path):
    # The guarantee test_config_loads relies on: a misspelt key fails instead of being ignored.
    text = (CONFIGS / "smollm2-1.7b.yaml").read_text().replace("batch_size:", "batchsize:", 1)
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match="batchsize: unknown key"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_uses_the_papers_method_and_ratios(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.qtuning.policy == "qtuning"
    assert cfg.qtuning.token_policy == "qtuning"
    assert cfg.qtuning.sample_ratio == 0.25
    assert cfg.qtuning.token_ratio == 0.5


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_fits_the_images_mounts(name):
    """Placeholders under the mount points the README's `docker run` commands use."""
    cfg = load_config(CONFIGS / name)
    assert cfg.model.path.startswith("/models/")
    assert isinstance(cfg.input.path, str) and cfg.input.path.startswith("/data/")
    assert cfg.output.dir.startswith("/out/")
    assert cfg.model.max_length in EXAMPLES[name][1]
    assert cfg.scoring.backend == "vllm"
    assert cfg.scoring.max_num_batched_tokens >= cfg.model.max_length


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_memory_comment_matches_the_pooler(name):
    """The comment's logits chunk is the one the scorer really materialises."""
    from qtune.stages.score.logits import chunk_rows_for

    text = (CONFIGS / name).read_text()
    found = re.search(r"logits for (\d+) rows x (\d+) vocab in float32 = (\d+) MiB", text)
    assert found, "the memory comment names the pooler's logits chunk"
    rows, vocab, mib = map(int, found.groups())
    assert vocab == EXAMPLES[name][0]
    assert rows == chunk_rows_for(vocab)
    assert abs(rows * vocab * 4 / 2**20 - mib) < 1
