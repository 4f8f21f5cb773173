"""Score stage: add per-token log-prob/entropy and the sample's PPL/entropy to tokenized rows.

Input columns: ``input_ids``, ``loss_mask``, ``reject_reason`` (TOKENIZED_SCHEMA).
Output columns (added): ``token_logprob``, ``token_entropy`` (list<float32>, aligned with
``input_ids``), ``nll``, ``ppl``, ``entropy`` (float64; DESIGN section 2). Rejected rows pass
through with null scores. The backend (engine or model) starts when the stage is built, once per
actor (see ``Score``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from qtune import schema, storage
from qtune.faults import fault_point
from qtune.stages.eu_plane import sample_error_uncertainty
from qtune.stages.score import (
    ScoringBackend,
    ScoringOptions,
    ScoringSetupError,
    create_backend,
)

logger = logging.getLogger(__name__)


class Score:
    """Scores rows in fixed windows: the rows of one partition whose ``row_index // window_rows``
    agree go to the backend together, whatever batches Ray hands over. The engine's arithmetic
    depends on which sequences share a forward pass, so fixed windows make scores bit-identical
    across runs, resumes and worker counts (as long as Ray keeps a window in one batch).

    Unlike other stages, building a Score starts its backend: Ray Data builds it once per actor
    when the actor starts, so the engine's imports and start-up overlap the upstream reading and
    tokenisation instead of following them (1.12-1.21x end to end on the demo,
    benchmarks/pipeline_overhead.py). Only scoring actors build one. A backend that cannot start
    does not fail the constructor: its ScoringSetupError is raised by the first batch, where it
    reaches the driver as itself (an actor's constructor error arrives as ActorDiedError text).
    The backend is closed when the Score is dropped (``__del__``, which Ray Data triggers as
    the actor exits) or by ``close()``.
    """

    def __init__(self, backend: str, options: ScoringOptions, window_rows: int = 256):
        self.backend_name = backend
        self.options = options
        self.window_rows = window_rows
        self._backend: ScoringBackend | None = None
        self._setup_error: ScoringSetupError | None = None
        try:
            self._backend = self._start()
        except ScoringSetupError as e:
            self._setup_error = e

    def _start(self) -> ScoringBackend:
        fault_point("score.backend_start")
        try:
            return create_backend(self.backend_name, self.options)
        except ScoringSetupError:
            raise
        except Exception as e:  # a broken checkpoint, out of memory: keep the reason
            raise ScoringSetupError(
                f"the {self.backend_name} scoring backend could not start for "
                f"{self.options.model_path}: {type(e).__name__}: {e}"
            ) from e

    @property
    def backend(self) -> ScoringBackend:
        if self._setup_error is not None:
            # Raised once; a later batch tries to start the backend again, as on the first.
            error, self._setup_error = self._setup_error, None
            raise error
        if self._backend is None:  # closed, or a failed start being retried
            self._backend = self._start()
        return self._backend

    def __call__(self, batch: pa.Table) -> pa.Table:
        schema.require_columns(
            batch, [schema.INPUT_IDS, schema.LOSS_MASK, schema.REJECT_REASON], "score"
        )
        usable = batch.column(schema.REJECT_REASON).is_null().to_numpy(zero_copy_only=False)
        offsets, ids = schema.list_offsets_and_values(batch.column(schema.INPUT_IDS))
        _, mask = schema.list_offsets_and_values(batch.column(schema.LOSS_MASK))
        rows = np.flatnonzero(usable)
        fault_point("score.batch")
        scored = self._score_windows(batch, rows, offsets, ids)

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

    def _score_windows(
        self, batch: pa.Table, rows: np.ndarray, offsets: np.ndarray, ids: np.ndarray
    ) -> list[np.ndarray]:
        if not len(rows):
            return []
        if schema.PARTITION in batch.column_names:
            partition = batch.column(schema.PARTITION).to_numpy(zero_copy_only=False)[rows]
        else:
            partition = np.zeros(len(rows), dtype=np.int64)
        if schema.ROW_INDEX in batch.column_names:
            row_index = batch.column(schema.ROW_INDEX).to_numpy(zero_copy_only=False)[rows]
        else:
            row_index = rows
        window = partition.astype(np.int64) << 40 | row_index // self.window_rows
        _, first, which = np.unique(window, return_index=True, return_inverse=True)
        results: list[np.ndarray] = [None] * len(rows)  # type: ignore[list-item]
        for w in np.argsort(first, kind="stable"):  # windows in order of appearance
            members = np.flatnonzero(which == w)
            out = self.backend.score(
                [ids[offsets[rows[j]] : offsets[rows[j] + 1]] for j in members]
            )
            for j, result in zip(members, out, strict=True):
                results[j] = result
        return results

    def close(self) -> None:
        """Shut the backend (engine) down; a later batch would start it again."""
        backend, self._backend = getattr(self, "_backend", None), None
        if backend is not None:
            fault_point("score.backend_closing")
            backend.close()
            fault_point("score.backend_closed")

    def __del__(self) -> None:
        # Ray Data's only teardown hook for an actor's UDF: when the dataset is done, the actor
        # exits gracefully and drops its UDF (MapWorker.__ray_shutdown__) before Ray's core
        # worker in it is torn down. Closing the engine here shuts it down in order, instead of
        # leaving it to interpreter exit (vLLM's finalizer then runs after the core worker is
        # gone, beside the engine's own threads). The driver waits for this before it shuts
        # embedded Ray down. Not called when the actor is killed: the process just ends.
        try:
            self.close()
        except Exception as e:  # noqa: BLE001 - a destructor cannot raise; say what failed
            name = getattr(self, "backend_name", "?")
            logger.warning("closing the %s scoring backend failed: %s", name, e)


# Scored-cache columns a re-score needs: the token ids and loss positions, fixed since epoch 0.
RESCORE_INPUT_COLUMNS = [
    schema.SAMPLE_ID,
    schema.SOURCE,
    schema.ROW_INDEX,
    schema.FORMAT,
    schema.METADATA,
    schema.INPUT_IDS,
    schema.LOSS_MASK,
    schema.N_TOKENS,
    schema.N_RESPONSE_TOKENS,
    schema.TRUNCATED,
]


def tokenized_from_cache(batch: pa.Table, partition: int = 0) -> pa.Table:
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
            schema.PARTITION: pa.array(np.full(n, partition, dtype=np.int32)),
            schema.MESSAGES: pa.nulls(n, pa.list_(schema.MESSAGE_TYPE)),
            schema.TOOLS: pa.nulls(n, pa.string()),
            schema.RAW: pa.nulls(n, pa.string()),
            schema.REJECT_REASON: pa.nulls(n, pa.string()),
            schema.REJECT_DETAIL: pa.nulls(n, pa.string()),
        },
    )


class ReadScoredCache:
    """Stage: scored-cache parts (columns ``path``, ``index``: the partition) -> TOKENIZED rows.

    One output table per part, whole and in order (the re-score job's reader).
    """

    def __call__(self, parts: pa.Table) -> Iterator[pa.Table]:
        for item in parts.to_pylist():
            table = storage.read_table(item["path"], columns=RESCORE_INPUT_COLUMNS)
            yield tokenized_from_cache(table, item["index"])
