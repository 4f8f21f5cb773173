"""Pipeline fixtures: one clean run of the mixed corpus, the reference other runs are held to."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from qtune.pipeline.cli import app
from tests.pipeline.mixed_corpus import write_config, write_mixed_corpus


@pytest.fixture(scope="session")
def mixed(tmp_path_factory, llama_dir) -> dict:
    """One clean `qtune run` of the mixed corpus: the reference every other run is held to."""
    root = tmp_path_factory.mktemp("mixed")
    corpus = write_mixed_corpus(root / "corpus")
    out = root / "clean"
    config = write_config(root / "clean.yaml", corpus, llama_dir, out)
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    return {"root": root, "corpus": corpus, "out": out, "output": result.output}
