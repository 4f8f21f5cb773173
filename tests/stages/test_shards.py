"""Shard rows follow the output contract; the writer never writes empty groups or files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qtune import schema
from qtune.demo.synthetic_cache import synthetic_scored_batch
from qtune.stages.shards import ShardWriter, build_shard_rows
from qtune.stages.triage import stable_hash64


def _rows(n: int, seed: int = 0) -> pa.Table:
    batch = synthetic_scored_batch(0, n, 20, 5, np.random.default_rng(seed))
    _, mask = schema.list_offsets_and_values(batch.column(schema.LOSS_MASK))
    return build_shard_rows(
        batch, np.array(["Q2"] * n), np.zeros(n, bool), np.ones(n, bool), mask.astype(np.int8)
    )


def test_rows_follow_the_contract():
    rows = _rows(3)
    assert rows.schema == schema.SHARD_SCHEMA
    for row in rows.to_pylist():
        ids, labels, mask = row["input_ids"], row["labels"], row["loss_mask"]
        assert len(ids) == len(labels) == len(mask) == len(row["attention_mask"]) == row["length"]
        assert [m == 1 for m in mask] == [label != -100 for label in labels]
        assert all(label == i for label, i in zip(labels, ids, strict=True) if label != -100)
        assert row["num_loss_tokens"] == sum(mask) > 0
        assert set(row["attention_mask"]) == {1}


def test_writer_row_groups_and_no_empty_files(tmp_path):
    rows = _rows(50)
    writer = ShardWriter(tmp_path / "train", num_shards=8, row_group_rows=4)
    keys = stable_hash64(rows.column(schema.SAMPLE_ID))
    writer.add(rows.slice(0, 20), keys[:20])
    writer.add(rows.slice(20), keys[20:])
    files = writer.close()
    assert sum(f.rows for f in files) == 50
    assert sum(f.loss_tokens for f in files) == sum(rows.column("num_loss_tokens").to_pylist())
    for f in files:
        meta = pq.ParquetFile(f.path).metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert all(0 < s <= 4 for s in sizes) and sum(sizes) == f.rows
        assert pq.read_schema(f.path) == schema.SHARD_SCHEMA
    # Fewer rows than shards: only shards that got rows have a file, none of them empty.
    small = _rows(2, seed=1)
    small_keys = stable_hash64(small.column(schema.SAMPLE_ID))
    few = ShardWriter(tmp_path / "few", num_shards=8)
    few.add(small, small_keys)
    written = few.close()
    assert len(written) == len(set((small_keys % np.uint64(8)).tolist()))
    assert sorted(p.name for p in (tmp_path / "few").glob("*.parquet")) == sorted(
        f.path.name for f in written
    )
    assert all(f.rows > 0 for f in written)
