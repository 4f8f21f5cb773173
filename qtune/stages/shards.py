"""Shard writer: kept samples -> trainer-ready Parquet shards (DESIGN section 6).

``build_shard_rows`` is the stage: input is a batch of scored-cache rows (SCORED_CACHE_SCHEMA)
already filtered to kept samples, plus their triage flags and new flat loss mask; output is a
SHARD_SCHEMA table (``labels`` = input_ids where the loss mask is 1, else -100). ``ShardWriter``
routes rows to a fixed number of files by sample-id hash, buffers them into row groups of a set
size, and never writes an empty row group or an empty file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qtune import schema


def build_shard_rows(
    batch: pa.Table,
    quadrant: np.ndarray,
    filled: np.ndarray,
    token_pruned: np.ndarray,
    new_loss_mask: np.ndarray,
    groups: np.ndarray | None = None,
) -> pa.Table:
    """Kept cache rows + their flags, new flat loss mask and groups -> SHARD_SCHEMA rows."""
    schema.require_columns(batch, [schema.SAMPLE_ID, schema.INPUT_IDS, schema.SOURCE], "shards")
    offsets, ids = schema.list_offsets_and_values(batch.column(schema.INPUT_IDS))
    arrow_offsets = pa.array(offsets.astype(np.int32))
    mask = new_loss_mask.astype(np.int8)
    labels = np.where(mask.astype(bool), ids.astype(np.int32), schema.IGNORE_INDEX)
    lengths = np.diff(offsets).astype(np.int32)
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    num_loss = np.bincount(row_of, weights=mask, minlength=len(lengths)).astype(np.int32)
    if len(num_loss) and num_loss.min() <= 0:
        raise ValueError("a kept sample has no loss token; token pruning must keep at least one")
    return pa.table(
        {
            schema.SAMPLE_ID: batch.column(schema.SAMPLE_ID),
            schema.INPUT_IDS: pa.ListArray.from_arrays(arrow_offsets, pa.array(ids, pa.int32())),
            schema.ATTENTION_MASK: pa.ListArray.from_arrays(
                arrow_offsets, pa.array(np.ones(len(ids), np.int8))
            ),
            schema.LABELS: pa.ListArray.from_arrays(arrow_offsets, pa.array(labels, pa.int32())),
            schema.LOSS_MASK: pa.ListArray.from_arrays(arrow_offsets, pa.array(mask)),
            schema.QUADRANT: pa.array(quadrant, pa.string()),
            schema.FILLED: pa.array(filled, pa.bool_()),
            schema.TOKEN_PRUNED: pa.array(token_pruned, pa.bool_()),
            schema.PPL: pc.cast(batch.column(schema.PPL), pa.float32()),
            schema.ENTROPY: pc.cast(batch.column(schema.ENTROPY), pa.float32()),
            schema.NUM_LOSS_TOKENS: pa.array(num_loss),
            schema.LENGTH: pa.array(lengths),
            schema.SOURCE: batch.column(schema.SOURCE),
            schema.GROUP: pa.array(groups, pa.string())
            if groups is not None
            else pa.nulls(batch.num_rows, pa.string()),
        },
        schema=schema.SHARD_SCHEMA,
    )


@dataclass
class ShardFile:
    path: Path
    rows: int
    loss_tokens: int


def stamp_files(files: list[ShardFile], stamp: str) -> list[ShardFile]:
    """Rename ``part-00000-of-00004.parquet`` to ``part-00000-of-00004-<stamp>.parquet``.

    ``datasets`` caches a local dataset under a key derived from its config's file *patterns*,
    not the files' contents or times: a re-published version under unchanged names would load
    stale. A content-derived stamp in the names (and in the card's pattern) changes the key.
    """
    stamped = []
    for f in files:
        target = f.path.with_name(f"{f.path.stem}-{stamp}{f.path.suffix}")
        f.path.rename(target)
        stamped.append(ShardFile(target, f.rows, f.loss_tokens))
    return stamped


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Writes SHARD_SCHEMA rows into ``num_shards`` files: ``part-00003-of-00008.parquet``."""

    def __init__(self, directory: Path, num_shards: int, row_group_rows: int = 1024):
        self.directory = Path(directory)
        self.num_shards = num_shards
        self.row_group_rows = row_group_rows
        self._buffers: list[list[pa.Table]] = [[] for _ in range(num_shards)]
        self._buffered = np.zeros(num_shards, dtype=np.int64)
        self._writers: dict[int, pq.ParquetWriter] = {}
        self._rows = np.zeros(num_shards, dtype=np.int64)
        self._loss_tokens = np.zeros(num_shards, dtype=np.int64)

    def path(self, shard: int) -> Path:
        return self.directory / f"part-{shard:05d}-of-{self.num_shards:05d}.parquet"

    def add(self, rows: pa.Table, shard_keys: np.ndarray) -> None:
        """Route rows to shards by ``shard_keys % num_shards`` (a stable hash of the sample id)."""
        shard_of = (shard_keys % np.uint64(self.num_shards)).astype(np.int64)
        for shard in np.unique(shard_of):
            part = rows.filter(pa.array(shard_of == shard))
            self._buffers[shard].append(part)
            self._buffered[shard] += part.num_rows
            if self._buffered[shard] >= self.row_group_rows:
                self._flush(shard, final=False)

    def _flush(self, shard: int, final: bool) -> None:
        if not self._buffered[shard]:
            return
        table = pa.concat_tables(self._buffers[shard]).combine_chunks()
        cut = (
            table.num_rows
            if final
            else (table.num_rows // self.row_group_rows) * self.row_group_rows
        )
        if shard not in self._writers:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._writers[shard] = pq.ParquetWriter(
                self.path(shard), schema.SHARD_SCHEMA, compression="zstd"
            )
        for start in range(0, cut, self.row_group_rows):
            group = table.slice(start, min(self.row_group_rows, cut - start))
            self._writers[shard].write_table(group, row_group_size=self.row_group_rows)
            self._rows[shard] += group.num_rows
            self._loss_tokens[shard] += pc.sum(group.column(schema.NUM_LOSS_TOKENS)).as_py()
        rest = table.slice(cut)
        self._buffers[shard] = [rest] if rest.num_rows else []
        self._buffered[shard] = rest.num_rows

    def close(self) -> list[ShardFile]:
        """Flush everything; return the files written (shards that got no row have no file)."""
        for shard in range(self.num_shards):
            self._flush(shard, final=True)
        for writer in self._writers.values():
            writer.close()
        return [
            ShardFile(self.path(s), int(self._rows[s]), int(self._loss_tokens[s]))
            for s in sorted(self._writers)
        ]
