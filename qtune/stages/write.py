"""Write stage for scoring: route each scored batch to the scored cache or to rejects.

Input: SCORED_SCHEMA rows. Output (one row per input batch, not per input row): the counts the
pipeline totals for its summary (``STATS_SCHEMA``). Parquet parts are named from the identity of
the batch's rows, so re-running on the same input writes the same names.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qtune import schema

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


def part_name(batch: pa.Table) -> str:
    sources = batch.column(schema.SOURCE)
    indices = batch.column(schema.ROW_INDEX)
    key = f"{sources[0]}|{indices[0]}|{sources[-1]}|{indices[-1]}|{batch.num_rows}"
    return f"part-{hashlib.blake2b(key.encode(), digest_size=10).hexdigest()}.parquet"


def write_parquet(table: pa.Table, path: Path) -> None:
    """zstd Parquet; never writes an empty file (a single empty row group breaks loaders)."""
    if table.num_rows:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="zstd")


class WriteScores:
    def __init__(self, scores_dir: str, rejects_dir: str):
        self.scores_dir = Path(scores_dir)
        self.rejects_dir = Path(rejects_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        schema.require_columns(batch, schema.SCORED_CACHE_SCHEMA.names, "write_scores")
        if batch.num_rows == 0:
            return STATS_SCHEMA.empty_table()
        rejected_mask = batch.column(schema.REJECT_REASON).is_valid()
        scored = batch.filter(pc.invert(rejected_mask))
        rejected = batch.filter(rejected_mask)
        name = part_name(batch)
        write_parquet(
            scored.select(schema.SCORED_CACHE_SCHEMA.names).cast(schema.SCORED_CACHE_SCHEMA),
            self.scores_dir / name,
        )
        rejects = pa.table(
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
        write_parquet(rejects, self.rejects_dir / name)
        _, entropy_values = schema.list_offsets_and_values(scored.column(schema.TOKEN_ENTROPY))
        _, mask_values = schema.list_offsets_and_values(scored.column(schema.LOSS_MASK))
        reasons = Counter(rejected.column(schema.REJECT_REASON).to_pylist())
        stats = {
            "rows": batch.num_rows,
            "scored": scored.num_rows,
            "rejected": rejected.num_rows,
            "truncated": int(pc.sum(scored.column(schema.TRUNCATED)).as_py() or 0),
            "tokens": int(pc.sum(scored.column(schema.N_TOKENS)).as_py() or 0),
            "response_tokens": int(pc.sum(scored.column(schema.N_RESPONSE_TOKENS)).as_py() or 0),
            "sum_nll": float(pc.sum(scored.column(schema.NLL)).as_py() or 0.0),
            "sum_entropy": float(pc.sum(scored.column(schema.ENTROPY)).as_py() or 0.0),
            "token_sum_entropy": float(
                np.sum(entropy_values.astype(np.float64) * mask_values.astype(bool))
            ),
            "reasons": json.dumps(dict(reasons), sort_keys=True),
        }
        return pa.Table.from_pylist([stats], schema=STATS_SCHEMA)
