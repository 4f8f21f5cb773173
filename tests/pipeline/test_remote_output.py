"""Input and output on object storage: a real S3 endpoint on loopback (moto's server).

The output is worked on in a local working copy and pushed in commit order (data, markers,
card, LATEST, then stale files); another machine's working copy pulls it back.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from qtune import schema, storage
from qtune.pipeline import remote_sync
from qtune.pipeline.cli import app
from qtune.pipeline.errors import PipelineError
from qtune.pipeline.remote_sync import output_layout, pull_remote, push
from tests.pipeline.mixed_corpus import download_all, write_config


def _write(root: Path, relative: str, data: bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _prefix(bucket: str) -> str:
    return storage.join(bucket, f"t-{uuid.uuid4().hex[:8]}")


def test_push_orders_commits_and_pull_follows_replacements(s3_bucket, tmp_path, monkeypatch):
    uri = _prefix(s3_bucket)
    first = output_layout(uri, tmp_path / "a")
    files = {
        "scores/epoch_000/part-000000.parquet": b"cache",
        "scores/epoch_000/_summary.json": b"{}",
        "rejects/epoch_000/part-000000.parquet": b"rejects",
        "data/epoch_000/train/part-00000-aaaa.parquet": b"shard-a",
        "data/epoch_000/dropped.parquet": b"dropped",
        "data/epoch_000/manifest.json": b'{"v": 1}',
        "README.md": b"card",
        "LATEST": b"epoch_000\n",
    }
    for relative, data in files.items():
        _write(first.root, relative, data)
    _write(first.root, ".staging/score-epoch_000/plan.json", b"{}")  # this machine's only
    _write(first.root, "data/.epoch_001.old-1234/x", b"x")  # a temporary: never pushed

    order: list[str] = []
    upload = storage.upload

    def recording_upload(source: Path, location: str) -> None:
        order.append(source.relative_to(first.root).as_posix())
        upload(source, location)

    monkeypatch.setattr(storage, "upload", recording_upload)
    assert push(first) == len(files)
    assert set(storage.list_files(uri)) == set(files)
    ranks = [remote_sync._commit_rank(r) for r in order]
    assert ranks == sorted(ranks) and order[-1] == "LATEST" and order[-2] == "README.md"
    assert push(first) == 0  # nothing changed: nothing uploaded

    second = output_layout(uri, tmp_path / "b")
    for relative, data in files.items():
        assert (second.root / relative).read_bytes() == data

    # Epoch 0 re-published (new shard name) and LATEST moved on at the same size.
    (first.root / "data/epoch_000/train/part-00000-aaaa.parquet").unlink()
    _write(first.root, "data/epoch_000/train/part-00000-bbbb.parquet", b"shard-b")
    _write(first.root, "data/epoch_000/manifest.json", b'{"v": 2}')
    _write(first.root, "data/epoch_001/manifest.json", b'{"v": 3}')
    _write(first.root, "LATEST", b"epoch_001\n")
    push(first)
    remote = storage.list_files(uri)
    assert "data/epoch_000/train/part-00000-aaaa.parquet" not in remote
    assert "data/epoch_001/manifest.json" in remote

    assert pull_remote(second, ("LATEST",)) == 1  # a partial pull leaves the rest alone
    assert (second.root / "data/epoch_000/train/part-00000-aaaa.parquet").exists()
    assert (second.root / "scores/epoch_000/part-000000.parquet").exists()
    assert pull_remote(second) == 3
    assert (second.root / "LATEST").read_text() == "epoch_001\n"
    assert (second.root / "data/epoch_000/manifest.json").read_bytes() == b'{"v": 2}'
    assert not (second.root / "data/epoch_000/train/part-00000-aaaa.parquet").exists()
    assert (second.root / "data/epoch_000/train/part-00000-bbbb.parquet").exists()

    # This machine's unpushed work survives a pull: a changed LATEST, a deleted file.
    _write(second.root, "LATEST", b"epoch_009\n")
    (second.root / "data/epoch_001/manifest.json").unlink()
    pull_remote(second)
    assert (second.root / "LATEST").read_text() == "epoch_009\n"
    assert not (second.root / "data/epoch_001/manifest.json").exists()

    # A push that fails half-way is finished by the next one; the pull between them does not
    # bring back the file it had yet to delete.
    (first.root / "data/epoch_000/train/part-00000-bbbb.parquet").unlink()
    _write(first.root, "data/epoch_000/train/part-00000-cccc.parquet", b"shard-c")

    def failing_remove(location: str) -> None:
        raise OSError("connection reset")

    monkeypatch.setattr(storage, "remove", failing_remove)
    with pytest.raises(PipelineError, match="re-running the same command pushes it"):
        push(first)
    monkeypatch.undo()
    pull_remote(first)
    assert not (first.root / "data/epoch_000/train/part-00000-bbbb.parquet").exists()
    push(first)
    train = {r for r in storage.list_files(uri) if r.startswith("data/epoch_000/train/")}
    assert train == {"data/epoch_000/train/part-00000-cccc.parquet"}


def test_remote_outputs_fail_clearly(s3_bucket, llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QTUNE_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["verify", "nosuchproto://bucket/run"])
    assert result.exit_code == 1 and "no filesystem for this URI" in result.output
    assert "Traceback" not in result.output
    config = write_config(tmp_path / "c.yaml", tmp_path, llama_dir, tmp_path / "out")
    result = CliRunner().invoke(
        app, ["run", str(config), "--set", "output.dir=s3://no-such-bucket-qtune/run"]
    )
    assert result.exit_code == 1 and "cannot be written" in result.output, result.output


def _shards_without_location(root: Path, corpus_prefix: str, local_corpus: Path) -> pa.Table:
    """The version's shards and dropped index, with the input location made comparable."""
    manifest = json.loads((root / "data/epoch_000/manifest.json").read_text())
    version = root / "data/epoch_000"
    tables = [pq.read_table(version / f["path"]) for f in manifest["files"]]
    tables.append(pq.read_table(version / "dropped.parquet"))
    out = []
    for table in tables:
        for column in (schema.SOURCE, schema.GROUP):
            if column in table.column_names:
                values = [
                    None if v is None else v.replace(corpus_prefix, str(local_corpus))
                    for v in table.column(column).to_pylist()
                ]
                index = table.column_names.index(column)
                table = table.set_column(index, column, pa.array(values, pa.string()))
        out.append(table)
    return out


@pytest.mark.ray
def test_a_run_reads_and_publishes_on_s3(mixed, llama_dir, s3_bucket, tmp_path, monkeypatch):
    from qtune.pipeline.consume import load_version

    prefix = _prefix(s3_bucket)
    # The input's endpoint rides in its query (the output's comes from the environment).
    endpoint = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://")
    corpus = storage.join(prefix, "corpus") + f"?endpoint_override={endpoint}&scheme=http"
    for path in sorted(p for p in mixed["corpus"].rglob("*") if p.is_file()):
        storage.upload(path, storage.join(corpus, *path.relative_to(mixed["corpus"]).parts))
    out = storage.join(prefix, "out")
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], llama_dir, tmp_path / "unused")
    sets = ["--set", f"input.path={corpus}", "--set", f"output.dir={out}"]
    monkeypatch.setenv("QTUNE_CACHE_DIR", str(tmp_path / "machine-a"))
    result = CliRunner().invoke(app, ["run", str(config), *sets])
    assert result.exit_code == 0, result.output
    assert f'load_version("{out}")' in result.output

    # Everything a trainer needs is on S3; the same data as the local run, row for row.
    remote = download_all(out, tmp_path / "downloaded")
    sources = pq.read_table(remote / "data/epoch_000/dropped.parquet").column(schema.SOURCE)
    assert not [s for s in sources.to_pylist() if "endpoint_override" in s]  # shown bare
    ours = _shards_without_location(remote, storage.join(prefix, "corpus"), mixed["corpus"])
    reference = _shards_without_location(mixed["out"], str(mixed["corpus"]), mixed["corpus"])
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.equals(theirs)
    assert not [r for r in storage.list_files(out) if r.startswith(".")]  # no staging left

    # Another machine: a fresh working copy pulls, verifies, loads, re-triages and publishes.
    monkeypatch.setenv("QTUNE_CACHE_DIR", str(tmp_path / "machine-b"))
    result = CliRunner().invoke(app, ["verify", out])
    assert result.exit_code == 0, result.output
    assert f"ok {out}/data/epoch_000" in " ".join(result.output.split())
    manifest = json.loads((remote / "data/epoch_000/manifest.json").read_text())
    assert load_version(out).num_rows == manifest["counts"]["kept"]
    result = CliRunner().invoke(
        app, ["triage", str(config), *sets, "--set", "qtuning.sample_ratio=0.2"]
    )
    assert result.exit_code == 0, result.output
    retriaged = json.loads(storage.read_bytes(storage.join(out, "data/epoch_000/manifest.json")))
    assert retriaged["counts"]["kept"] < manifest["counts"]["kept"]
    shards = {r for r in storage.list_files(out) if r.startswith("data/epoch_000/train/")}
    assert shards == {f"data/epoch_000/{f['path']}" for f in retriaged["files"]}

    # Re-scoring with a checkpoint publishes the next epoch there, and moves LATEST.
    result = CliRunner().invoke(app, ["rescore", str(config), *sets, "--model", str(llama_dir)])
    assert result.exit_code == 0, result.output
    assert storage.read_bytes(storage.join(out, "LATEST")).decode().strip() == "epoch_001"
    assert "data/epoch_001/manifest.json" in storage.list_files(out)


def test_a_missing_remote_input_is_a_clear_error(s3_bucket, llama_dir, tmp_path):
    config = write_config(tmp_path / "c.yaml", tmp_path, llama_dir, tmp_path / "out")
    missing = storage.join(_prefix(s3_bucket), "nothing.jsonl")
    result = CliRunner().invoke(app, ["run", str(config), "--set", f"input.path={missing}"])
    assert result.exit_code == 1
    assert "does not exist" in result.output and "Traceback" not in result.output
