"""Write stage for scoring: route each scored batch to the scored cache or to rejects.

Input: SCORED_SCHEMA rows. Output (one row per fragment written, not per input row): the counts
the pipeline totals for its summary (``FRAGMENT_STATS_SCHEMA``). Fragments are named from the
identity of their rows, so a retried task rewrites the same files.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qtune import schema, storage

STATS_SCHEMA = pa.schema(
    [
        ("rows", pa.int64()),
        ("scored", pa.int64()),
        ("rejected", pa.int64()),
        ("truncated", pa.int64()),
        ("tokens", pa.int64()),
        ("response_tokens", pa.int64()),
        ("sum_nll", pa.float64()),
        ("sum_entropy", pa.float64()),
        ("token_sum_entropy", pa.float64()),
        ("reasons", pa.string()),  # JSON {reason: count}
    ]
)


FRAGMENT_STATS_SCHEMA = pa.schema(
    [
        ("partition", pa.int32()),
        ("fragment", pa.string()),
        ("first_row", pa.int64()),
        *STATS_SCHEMA,
    ]
)


def fragment_name(partition: int, row_index: np.ndarray) -> str:
    """Named by the rows it holds: a retried task rewrites the same file, never a second one."""
    return f"p{partition:06d}-{int(row_index[0]):012d}-{int(row_index[-1]):012d}-{len(row_index)}"


def fragment_files(fragments_dir: str | Path, name: str) -> tuple[str, str]:
    """The scored-cache and rejects files of one fragment (local paths or URIs, as the dir)."""
    return (
        storage.join(fragments_dir, f"{name}.scores.parquet"),
        storage.join(fragments_dir, f"{name}.rejects.parquet"),
    )


def write_parquet(table: pa.Table, path: str | Path) -> None:
    """zstd Parquet, written aside and renamed into place (readers never see a partial file);
    on an object store, one upload that becomes visible only once complete.

    Never writes an empty file: a single empty row group breaks loaders.
    """
    if not table.num_rows:
        return
    if storage.is_remote(path):
        filesystem, key = storage.resolve(path)
        pq.write_table(table, key, compression="zstd", filesystem=filesystem)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def rejects_table(rejected: pa.Table) -> pa.Table:
    """SCORED_SCHEMA rows flagged with a reject reason -> REJECTS_SCHEMA rows."""
    return pa.table(
        {
            schema.SAMPLE_ID: rejected.column(schema.SAMPLE_ID),
            schema.SOURCE: rejected.column(schema.SOURCE),
            schema.ROW_INDEX: rejected.column(schema.ROW_INDEX),
            schema.REASON: rejected.column(schema.REJECT_REASON),
            schema.DETAIL: rejected.column(schema.REJECT_DETAIL),
            schema.RAW: rejected.column(schema.RAW),
        },
        schema=schema.REJECTS_SCHEMA,
    )


def partition_stats(scored: pa.Table, reasons: pa.ChunkedArray | pa.Array) -> dict:
    """The summary counts of scored-cache rows and reject reasons (one ``STATS_SCHEMA`` row)."""
    _, entropy_values = schema.list_offsets_and_values(scored.column(schema.TOKEN_ENTROPY))
    _, mask_values = schema.list_offsets_and_values(scored.column(schema.LOSS_MASK))
    return {
        "rows": scored.num_rows + len(reasons),
        "scored": scored.num_rows,
        "rejected": len(reasons),
        "truncated": int(pc.sum(scored.column(schema.TRUNCATED)).as_py() or 0),
        "tokens": int(pc.sum(scored.column(schema.N_TOKENS)).as_py() or 0),
        "response_tokens": int(pc.sum(scored.column(schema.N_RESPONSE_TOKENS)).as_py() or 0),
        "sum_nll": float(pc.sum(scored.column(schema.NLL)).as_py() or 0.0),
        "sum_entropy": float(pc.sum(scored.column(schema.ENTROPY)).as_py() or 0.0),
        "token_sum_entropy": float(
            np.sum(entropy_values.astype(np.float64) * mask_values.astype(bool))
        ),
        "reasons": json.dumps(dict(Counter(reasons.to_pylist())), sort_keys=True),
    }


class WriteScores:
    """Stage: scored rows -> fragment files of the scored cache and of rejects, per partition.

    Input: SCORED_SCHEMA rows (any mix of partitions). Writes, for each partition in the batch,
    ``<fragments>/<name>.scores.parquet`` (SCORED_CACHE_SCHEMA, rows in source order) and
    ``<name>.rejects.parquet`` (REJECTS_SCHEMA). Output: one ``FRAGMENT_STATS_SCHEMA`` row per
    fragment, from which the driver tells when a partition is complete.
    """

    def __init__(self, fragments_dir: str):
        self.fragments_dir = str(fragments_dir)  # a local path, or a URI on a cluster

    def __call__(self, batch: pa.Table) -> pa.Table:
        schema.require_columns(batch, schema.SCORED_CACHE_SCHEMA.names, "write_scores")
        schema.require_columns(batch, [schema.PARTITION, schema.REJECT_REASON], "write_scores")
        rows = []
        partitions = batch.column(schema.PARTITION).to_numpy(zero_copy_only=False)
        for partition in np.unique(partitions):
            group = batch.filter(pa.array(partitions == partition)).sort_by(schema.ROW_INDEX)
            name = fragment_name(int(partition), group.column(schema.ROW_INDEX).to_numpy())
            rejected_mask = group.column(schema.REJECT_REASON).is_valid()
            scored = group.filter(pc.invert(rejected_mask))
            scored = scored.select(schema.SCORED_CACHE_SCHEMA.names).cast(
                schema.SCORED_CACHE_SCHEMA
            )
            rejected = group.filter(rejected_mask)
            scores_file, rejects_file = fragment_files(self.fragments_dir, name)
            write_parquet(scored, scores_file)
            write_parquet(rejects_table(rejected), rejects_file)
            rows.append(
                {
                    "partition": int(partition),
                    "fragment": name,
                    "first_row": int(group.column(schema.ROW_INDEX)[0].as_py()),
                    **partition_stats(scored, rejected.column(schema.REJECT_REASON)),
                }
            )
        return pa.Table.from_pylist(rows, schema=FRAGMENT_STATS_SCHEMA)
