"""Locations: local paths and filesystem URIs behind one API (S3 through a real S3 endpoint)."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pytest

from qtune import storage


def test_locations_join_and_keep_their_query():
    assert not storage.is_remote("/data/x") and not storage.is_remote("file:///data/x")
    assert not storage.is_remote("C://odd")  # a drive letter is not a scheme
    assert storage.is_remote("s3://b/k") and storage.is_remote("gs://b/k")
    uri = "s3://bucket/run?endpoint_override=h:9000&scheme=http"
    joined = storage.join(uri, "data", "epoch_000")
    assert joined == "s3://bucket/run/data/epoch_000?endpoint_override=h:9000&scheme=http"
    assert storage.name(joined) == "epoch_000"
    assert storage.without_query(joined) == "s3://bucket/run/data/epoch_000"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.join("file:///tmp/a", "b") == "/tmp/a/b"


def test_s3_files_round_trip(s3_bucket, tmp_path):
    root = storage.join(s3_bucket, f"t-{uuid.uuid4().hex[:8]}")
    assert not storage.exists(root) and storage.list_files(root) == {}
    storage.write_bytes(storage.join(root, "a", "x.jsonl"), b'{"a": 1}\n')
    storage.write_bytes(storage.join(root, "a", "b", "y.jsonl"), b"{}\n{}\n")
    storage.write_bytes(storage.join(root, "z.parquet"), b"PAR1")
    assert storage.is_dir(storage.join(root, "a")) and storage.is_file(
        storage.join(root, "z.parquet")
    )
    assert storage.size(storage.join(root, "a", "b", "y.jsonl")) == 6
    assert storage.list_files(root) == {"a/x.jsonl": 9, "a/b/y.jsonl": 6, "z.parquet": 4}
    assert storage.glob(storage.join(root, "a", "*.jsonl")) == [storage.join(root, "a", "x.jsonl")]
    assert storage.glob(storage.join(root, "**", "*.jsonl")) == [
        storage.join(root, "a", "b", "y.jsonl"),
        storage.join(root, "a", "x.jsonl"),
    ]
    with storage.open_input(storage.join(root, "a", "b", "y.jsonl")) as f:
        f.seek(3)
        assert list(f) == [b"{}\n"]
    local = tmp_path / "copy.jsonl"
    storage.download(storage.join(root, "a", "x.jsonl"), local)
    storage.upload(local, storage.join(root, "up.jsonl"))
    assert storage.read_bytes(storage.join(root, "up.jsonl")) == b'{"a": 1}\n'
    storage.remove(storage.join(root, "up.jsonl"))
    storage.remove(storage.join(root, "up.jsonl"))  # already gone: fine
    storage.remove_tree(storage.join(root, "a"))
    assert storage.list_files(root) == {"z.parquet": 4}


def test_parquet_through_s3(s3_bucket):
    from qtune.stages.write import write_parquet

    location = storage.join(s3_bucket, f"t-{uuid.uuid4().hex[:8]}", "t.parquet")
    table = pa.table({"x": list(range(10))})
    write_parquet(table, location)
    assert storage.read_table(location).equals(table)
    assert storage.parquet_file(location).metadata.num_rows == 10
    write_parquet(table.slice(0, 0), location + "-empty")  # never an empty file
    assert not storage.exists(location + "-empty")


def test_fsspec_protocols_pyarrow_lacks_go_through_fsspec():
    location = f"memory://qtune-{uuid.uuid4().hex[:8]}/d/f.txt"
    storage.write_bytes(location, b"hello")
    assert storage.read_bytes(location) == b"hello"
    assert storage.is_file(location) and storage.size(location) == 5


def test_an_unknown_protocol_is_a_clear_error():
    with pytest.raises(storage.StorageError, match="no filesystem for this URI"):
        storage.exists("nosuchproto://bucket/x")
