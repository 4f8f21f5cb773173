"""Score stage: add per-token log-prob/entropy and the sample's PPL/entropy to tokenized rows.

Input columns: ``input_ids``, ``loss_mask``, ``reject_reason`` (TOKENIZED_SCHEMA).
Output columns (added): ``token_logprob``, ``token_entropy`` (list<float32>, aligned with
``input_ids``), ``nll``, ``ppl``, ``entropy`` (float64; DESIGN section 2). Rejected rows pass
through with null scores. The backend (engine or model) loads on the first call, once per actor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qtune import schema
from qtune.stages.eu_plane import sample_error_uncertainty
from qtune.stages.score import ScoringBackend, ScoringOptions, create_backend

logger = logging.getLogger(__name__)


class Score:
    def __init__(self, backend: str, options: ScoringOptions):
        self.backend_name = backend
        self.options = options
        self._backend: ScoringBackend | None = None

    @property
    def backend(self) -> ScoringBackend:
        if self._backend is None:
            self._backend = create_backend(self.backend_name, self.options)
        return self._backend

    def __call__(self, batch: pa.Table) -> pa.Table:
        schema.require_columns(
            batch, [schema.INPUT_IDS, schema.LOSS_MASK, schema.REJECT_REASON], "score"
        )
        usable = batch.column(schema.REJECT_REASON).is_null().to_numpy(zero_copy_only=False)
        offsets, ids = schema.list_offsets_and_values(batch.column(schema.INPUT_IDS))
        _, mask = schema.list_offsets_and_values(batch.column(schema.LOSS_MASK))
        rows = np.flatnonzero(usable)
        scored = (
            self.backend.score([ids[offsets[i] : offsets[i + 1]] for i in rows])
            if len(rows)
            else []
        )

        # Rejected rows have no tokens, so the usable rows' results laid end to end are exactly
        # the flat per-token arrays of the batch.
        for i, result in zip(rows, scored, strict=True):
            if result.shape != (offsets[i + 1] - offsets[i], 2):
                raise RuntimeError(
                    f"{self.backend_name} backend returned shape {result.shape} for a sequence "
                    f"of {offsets[i + 1] - offsets[i]} tokens"
                )
        flat = np.concatenate(scored).astype(np.float32) if len(rows) else np.zeros((0, 2))
        if len(flat) != len(ids):
            raise RuntimeError("score: rejected rows must carry no token ids")
        logprob = np.ascontiguousarray(flat[:, 0], dtype=np.float32)
        entropy = np.ascontiguousarray(flat[:, 1], dtype=np.float32)
        nll, ppl, sample_entropy = sample_error_uncertainty(offsets, mask, logprob, entropy)

        nulls = pa.array(~usable)
        arrow_offsets = pa.array(offsets.astype(np.int32))
        return schema.with_columns(
            batch,
            schema.SCORED_SCHEMA,
            {
                schema.TOKEN_LOGPROB: pa.ListArray.from_arrays(
                    arrow_offsets, pa.array(logprob), mask=nulls
                ),
                schema.TOKEN_ENTROPY: pa.ListArray.from_arrays(
                    arrow_offsets, pa.array(entropy), mask=nulls
                ),
                schema.NLL: pa.array(nll, mask=~usable),
                schema.PPL: pa.array(ppl, mask=~usable),
                schema.ENTROPY: pa.array(sample_entropy, mask=~usable),
            },
        )

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


# Scored-cache columns a re-score needs: the token ids and loss positions, fixed since epoch 0.
RESCORE_INPUT_COLUMNS = [
    schema.SAMPLE_ID,
    schema.SOURCE,
    schema.ROW_INDEX,
    schema.FORMAT,
    schema.INPUT_IDS,
    schema.LOSS_MASK,
    schema.N_TOKENS,
    schema.N_RESPONSE_TOKENS,
    schema.TRUNCATED,
]


def tokenized_from_cache(batch: pa.Table) -> pa.Table:
    """Stage: scored-cache rows (RESCORE_INPUT_COLUMNS) -> TOKENIZED_SCHEMA rows for re-scoring.

    The token ids are reused as they are, so every epoch scores exactly the same tokens; the
    columns only ingest fills (messages, raw row, reject flags) are null: these rows were usable.
    """
    schema.require_columns(batch, RESCORE_INPUT_COLUMNS, "tokenized_from_cache")
    n = batch.num_rows
    return schema.with_columns(
        batch,
        schema.TOKENIZED_SCHEMA,
        {
            schema.MESSAGES: pa.nulls(n, pa.list_(schema.MESSAGE_TYPE)),
            schema.RAW: pa.nulls(n, pa.string()),
            schema.REJECT_REASON: pa.nulls(n, pa.string()),
            schema.REJECT_DETAIL: pa.nulls(n, pa.string()),
        },
    )


class ReadScoredCache:
    """Stage: a batch of scored-cache file paths (column ``path``) -> TOKENIZED_SCHEMA rows.

    Many output rows per input row, streamed file by file (the re-score job's reader).
    """

    def __init__(self, batch_rows: int = 4096):
        self.batch_rows = batch_rows

    def __call__(self, files: pa.Table) -> Iterator[pa.Table]:
        for path in files.column("path").to_pylist():
            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(self.batch_rows, columns=RESCORE_INPUT_COLUMNS):
                yield tokenized_from_cache(pa.Table.from_batches([batch]))
