"""Column names, Arrow schemas and reject reason codes: the one definition every stage uses.

Stages exchange ``pyarrow.Table`` batches. A row flows through

    ingest -> NORMALIZED columns
    tokenize -> + TOKENIZED columns
    score -> + SCORED columns

and ends in the scored cache (``SCORED_CACHE_SCHEMA``) or in rejects (``REJECTS_SCHEMA``). A row is
rejected by setting ``reject_reason`` (one of ``RejectReason``) and ``reject_detail``; later stages
pass such rows through untouched and the writer routes them (flag first, route later).
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class DropReason(StrEnum):
    """Why triage left a scored sample out of a version (listed in the dropped index)."""

    OUTSIDE_CORNERS = "outside_corners"  # qtuning: not in Q2(a) u Q4(a), not among the fills
    BELOW_BUDGET = "below_budget"  # baseline policies: not among the top K


class RejectReason(StrEnum):
    """Why an input row could not be used. Values are stable codes (reports, tests, manifests)."""

    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_FORMAT = "unknown_format"
    MISSING_FIELD = "missing_field"
    EMPTY_MESSAGES = "empty_messages"
    UNKNOWN_ROLE = "unknown_role"
    NON_STRING_CONTENT = "non_string_content"
    INVALID_TEXT = "invalid_text"
    NO_ASSISTANT_TURN = "no_assistant_turn"
    EMPTY_ASSISTANT = "empty_assistant"  # an assistant turn with no text and no tool calls
    TEMPLATE_ERROR = "template_error"
    # The chat template renders the conversation so that an assistant turn's tokens cannot be
    # located with certainty (never guessed: a wrong span trains on the prompt).
    SPAN_NOT_FOUND = "span_not_found"
    # Message text that spells a special token (``<|im_end|>``...): it would tokenise as the
    # control token and forge turn boundaries.
    SPECIAL_TOKEN_IN_CONTENT = "special_token_in_content"
    INVALID_TOOL_CALLS = "invalid_tool_calls"  # malformed ``tool_calls`` or ``tools``
    # Tool calls or tool messages that the chat template does not render (they would be lost).
    UNSUPPORTED_TOOL_CALLS = "unsupported_tool_calls"
    TOO_LONG = "too_long"
    NO_RESPONSE_TOKENS = "no_response_tokens"
    DUPLICATE_SAMPLE_ID = "duplicate_sample_id"  # a later row repeating an earlier row's id
    UNREADABLE_SOURCE = "unreadable_source"  # the file failed mid-read; its remaining rows


class RowRejected(Exception):
    """A row that cannot be used, with its reason code and a human-readable detail. Stages
    raise it per row and turn it into ``reject_reason`` / ``reject_detail``."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --- column names -------------------------------------------------------------------------------
SAMPLE_ID = "sample_id"
SOURCE = "source"  # input file (or dataset directory) the row came from
ROW_INDEX = "row_index"  # 0-based row/line number within SOURCE
PARTITION = "partition"  # input partition (unit of scoring, checkpointing and resume)
FORMAT = "format"  # detected or configured input format of the row
METADATA = "metadata"  # JSON of the row's short scalar top-level fields (task, category, ...)
MESSAGES = "messages"  # normalised conversation: list<MESSAGE_TYPE>
TOOLS = "tools"  # JSON list of the tool (function) schemas a conversation may call; null: none
RAW = "raw"  # original row as text; kept only for rejected rows
REJECT_REASON = "reject_reason"  # null for usable rows, else a RejectReason value
REJECT_DETAIL = "reject_detail"  # human-readable explanation for rejected rows

INPUT_IDS = "input_ids"
LOSS_MASK = "loss_mask"  # 1 on response positions (tokens that carry a label)
N_TOKENS = "n_tokens"
N_RESPONSE_TOKENS = "n_response_tokens"
TRUNCATED = "truncated"  # over model.max_length and cut under the `truncate` policy

TOKEN_LOGPROB = "token_logprob"  # entry i: log p(token i | tokens < i); 0 at i = 0
TOKEN_ENTROPY = "token_entropy"  # entry i: entropy of the distribution that predicts token i
NLL = "nll"  # mean token NLL over response positions (log of PPL)
PPL = "ppl"  # exp(NLL): sample error
ENTROPY = "entropy"  # mean token entropy over response positions: sample uncertainty

REASON = "reason"
DETAIL = "detail"

# Trainer-facing shard columns (DESIGN section 6).
ATTENTION_MASK = "attention_mask"
LABELS = "labels"  # -100 where no loss; same length as input_ids, not shifted
QUADRANT = "quadrant"  # plane label: Q1..Q4 (median split within the triage scope)
FILLED = "filled"  # kept by the fill-up rather than a corner set
TOKEN_PRUNED = "token_pruned"
NUM_LOSS_TOKENS = "num_loss_tokens"
GROUP = "group"  # the sample's group under qtuning.group_by (its source file when unset)
LENGTH = "length"
IGNORE_INDEX = -100

# One turn as the chat template receives it. ``tool_calls`` is the OpenAI-style list as JSON text
# (its arguments are free-form); null fields are left out of the dict handed to the template.
MESSAGE_TYPE = pa.struct(
    [
        ("role", pa.string()),
        ("content", pa.string()),
        ("reasoning_content", pa.string()),  # Qwen3 / DeepSeek style reasoning of the turn
        ("tool_calls", pa.string()),
        ("tool_call_id", pa.string()),  # a tool message: the call it answers
        ("name", pa.string()),  # a tool message: the tool's name
    ]
)
MESSAGE_FIELDS = tuple(field.name for field in MESSAGE_TYPE)

NORMALIZED_SCHEMA = pa.schema(
    [
        (SAMPLE_ID, pa.string()),
        (SOURCE, pa.string()),
        (ROW_INDEX, pa.int64()),
        (PARTITION, pa.int32()),
        (FORMAT, pa.string()),
        (METADATA, pa.string()),
        (MESSAGES, pa.list_(MESSAGE_TYPE)),
        (TOOLS, pa.string()),
        (RAW, pa.string()),
        (REJECT_REASON, pa.string()),
        (REJECT_DETAIL, pa.string()),
    ]
)

TOKENIZED_FIELDS = [
    pa.field(INPUT_IDS, pa.list_(pa.int32())),
    pa.field(LOSS_MASK, pa.list_(pa.int8())),
    pa.field(N_TOKENS, pa.int32()),
    pa.field(N_RESPONSE_TOKENS, pa.int32()),
    pa.field(TRUNCATED, pa.bool_()),
]

SCORED_FIELDS = [
    pa.field(TOKEN_LOGPROB, pa.list_(pa.float32())),
    pa.field(TOKEN_ENTROPY, pa.list_(pa.float32())),
    pa.field(NLL, pa.float64()),
    pa.field(PPL, pa.float64()),
    pa.field(ENTROPY, pa.float64()),
]

TOKENIZED_SCHEMA = pa.schema(list(NORMALIZED_SCHEMA) + TOKENIZED_FIELDS)
SCORED_SCHEMA = pa.schema(list(TOKENIZED_SCHEMA) + SCORED_FIELDS)

# What the scored cache stores per usable sample (<out>/scores/epoch_NNN/*.parquet).
SCORED_CACHE_SCHEMA = pa.schema(
    [
        pa.field(SAMPLE_ID, pa.string()),
        pa.field(SOURCE, pa.string()),
        pa.field(ROW_INDEX, pa.int64()),
        pa.field(FORMAT, pa.string()),
        pa.field(METADATA, pa.string()),
        *TOKENIZED_FIELDS,
        *SCORED_FIELDS,
    ]
)

# One row per rejected input row (<out>/rejects/epoch_NNN/*.parquet).
REJECTS_SCHEMA = pa.schema(
    [
        pa.field(SAMPLE_ID, pa.string()),
        pa.field(SOURCE, pa.string()),
        pa.field(ROW_INDEX, pa.int64()),
        pa.field(REASON, pa.string()),
        pa.field(DETAIL, pa.string()),
        pa.field(RAW, pa.string()),
    ]
)


# One row per kept sample: <out>/data/epoch_NNN/train/part-*.parquet.
SHARD_SCHEMA = pa.schema(
    [
        pa.field(SAMPLE_ID, pa.string()),
        pa.field(INPUT_IDS, pa.list_(pa.int32())),
        pa.field(ATTENTION_MASK, pa.list_(pa.int8())),
        pa.field(LABELS, pa.list_(pa.int32())),
        pa.field(LOSS_MASK, pa.list_(pa.int8())),
        pa.field(QUADRANT, pa.string()),
        pa.field(FILLED, pa.bool_()),
        pa.field(TOKEN_PRUNED, pa.bool_()),
        pa.field(PPL, pa.float32()),
        pa.field(ENTROPY, pa.float32()),
        pa.field(NUM_LOSS_TOKENS, pa.int32()),
        pa.field(LENGTH, pa.int32()),
        pa.field(SOURCE, pa.string()),
        pa.field(GROUP, pa.string()),
    ]
)

# One row per scored sample that triage left out: <out>/data/epoch_NNN/dropped.parquet.
DROPPED_SCHEMA = pa.schema(
    [
        pa.field(SAMPLE_ID, pa.string()),
        pa.field(QUADRANT, pa.string()),
        pa.field(PPL, pa.float64()),
        pa.field(ENTROPY, pa.float64()),
        pa.field(REASON, pa.string()),
        pa.field(SOURCE, pa.string()),
        pa.field(ROW_INDEX, pa.int64()),
        pa.field(GROUP, pa.string()),
    ]
)


def require_columns(table: pa.Table, columns: list[str], stage: str) -> None:
    """Fail with a precise message when a stage's input lacks columns it needs."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise KeyError(
            f"{stage}: missing column(s) {', '.join(missing)}; present: "
            f"{', '.join(table.column_names)}"
        )


def with_columns(table: pa.Table, schema: pa.Schema, values: dict[str, pa.Array]) -> pa.Table:
    """Append or replace ``values`` on ``table`` and return it cast to ``schema``'s column order."""
    for name, array in values.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    return table.select(schema.names).cast(schema)


def list_array(values: list[np.ndarray | None], value_type: pa.DataType) -> pa.ListArray:
    """Per-row NumPy arrays (None = null) -> an Arrow list array built from one flat buffer."""
    np_type = value_type.to_pandas_dtype()
    lengths = np.array([0 if v is None else len(v) for v in values], dtype=np.int64)
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present = [v for v in values if v is not None]
    flat = np.concatenate(present).astype(np_type) if present else np.zeros(0, dtype=np_type)
    nulls = pa.array(np.array([v is None for v in values], dtype=bool))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, value_type), mask=nulls)


def list_offsets_and_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy view of a list column: row i's values are ``values[offsets[i]:offsets[i+1]]``.

    Null rows read as empty.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(column) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return offsets, values
