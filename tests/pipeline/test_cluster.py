"""Scale-out: a real two-node Ray cluster on loopback (output on S3) publishes the embedded result;
the scoring actor pool is sized per GPU (or tensor-parallel group)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtune import storage
from qtune.pipeline.cli import app
from qtune.pipeline.config import load_config
from qtune.pipeline.errors import PipelineError
from qtune.pipeline.score_job import scoring_resources
from tests.pipeline.mixed_corpus import download_all, published, write_config


@pytest.mark.ray
def test_a_two_node_cluster_publishes_what_embedded_ray_does(
    mixed, llama_dir, s3_bucket, tmp_path, monkeypatch
):
    """Output on S3, as on a real cluster: writer tasks on both nodes leave their fragments
    there, the driver completes partitions from them and pushes the version."""
    import ray
    from ray.cluster_utils import Cluster

    from qtune.pipeline import scoring_state

    moved_from: list[str] = []
    move_into = scoring_state._move_into

    def recording_move_into(source: str, target: Path) -> None:
        moved_from.append(source)
        move_into(source, target)

    monkeypatch.setattr(scoring_state, "_move_into", recording_move_into)
    monkeypatch.setenv("QTUNE_CACHE_DIR", str(tmp_path / "cache"))

    # Head and worker each too small for the whole job: reading/tokenising tasks and the scoring
    # actor (1 CPU each) have to spread over both nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        out = storage.join(s3_bucket, f"cluster-{uuid.uuid4().hex[:8]}")
        config = write_config(tmp_path / "c.yaml", mixed["corpus"], llama_dir, tmp_path / "x")
        result = CliRunner().invoke(
            app,
            ["run", str(config), "--set", f"ray.address={cluster.address}"]
            + ["--set", f"output.dir={out}"],
        )
        assert result.exit_code == 0, result.output
        assert published(download_all(out, tmp_path / "out")) == published(mixed["out"])
        assert moved_from and all(storage.is_remote(source) for source in moved_from)
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        ray.shutdown()
    finally:
        cluster.shutdown()


def _cfg(*extra: str):
    return load_config(None, ["input.path=x", "model.path=y", "output.dir=z", *extra])


@pytest.mark.ray
def test_one_scoring_actor_per_gpu_or_tensor_parallel_group():
    resources = scoring_resources(_cfg(), cluster_gpus=8)
    assert resources["num_gpus"] == 1 and resources["compute"].max_size == 8
    resources = scoring_resources(_cfg("scoring.tensor_parallel_size=2"), cluster_gpus=8)
    assert resources["num_gpus"] == 2 and resources["compute"].max_size == 4
    resources = scoring_resources(_cfg("scoring.num_workers=3"), cluster_gpus=8)
    assert resources["compute"].max_size == 3
    cpu = scoring_resources(_cfg("scoring.cpus_per_worker=4"), cluster_gpus=0)
    assert cpu["num_cpus"] == 4 and "num_gpus" not in cpu and cpu["max_restarts"] == 2
    with pytest.raises(PipelineError, match="exceeds the cluster's 4 GPU"):
        scoring_resources(_cfg("scoring.tensor_parallel_size=8"), cluster_gpus=4)
    with pytest.raises(PipelineError, match="needs GPUs"):
        scoring_resources(_cfg("scoring.tensor_parallel_size=2"), cluster_gpus=0)
