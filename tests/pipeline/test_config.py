"""Config: YAML + --set overrides, unknown keys and bad values rejected with the key named."""

from __future__ import annotations

import pytest

from qtune.pipeline.config import ConfigError, load_config

BASE = """
input: {path: data/*.jsonl}
model: {path: models/tiny, max_length: 256}
output: {dir: out}
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    return path


def test_defaults_and_overrides(config_file):
    cfg = load_config(
        config_file,
        [
            "scoring.backend=torch",
            "model.max_length=1024",
            "ray.address=auto",
            "input.path=[a.jsonl, b.parquet]",
        ],
    )
    assert cfg.scoring.backend == "torch"
    assert cfg.model.max_length == 1024
    assert cfg.ray.address == "auto"
    assert cfg.input.path == ["a.jsonl", "b.parquet"]
    assert cfg.input.format == "auto" and cfg.model.overlength == "truncate"
    assert '"backend": "torch"' in cfg.to_json()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["scoring.backnd=torch"], r"scoring.backnd: unknown key \(valid keys here: backend"),
        (["colour=red"], "colour: unknown key"),
        (["scoring.backend=tensorrt"], "unknown backend 'tensorrt'; valid: torch, vllm"),
        (["input.format=csv"], "input.format"),
        (["model.max_length=many"], "model.max_length"),
        (["scoring.max_num_batched_tokens=128"], "must be >= model.max_length"),
        (["model"], "expects section.key=value"),
    ],
)
def test_bad_values_name_the_key(config_file, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_file, overrides)


def test_missing_required_and_missing_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: {path: x}\noutput: {dir: o}\n")
    with pytest.raises(ConfigError, match="model: required but not set"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_cpu_threads_default_to_the_reserved_cores():
    from qtune.pipeline.score_job import scoring_options

    def threads(*extra: str) -> int | None:
        cfg = load_config(None, ["input.path=x", "model.path=y", "output.dir=z", *extra])
        return scoring_options(cfg).num_threads

    assert threads() == 1
    assert threads("scoring.cpus_per_worker=2") == 2
    assert threads("scoring.cpus_per_worker=2", "scoring.cpu_threads=3") == 3
