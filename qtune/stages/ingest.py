"""Ingest: find input sources, read them in batches, normalise every row to chat messages.

Sources are JSONL files, JSON-array files, Parquet files and ``datasets`` directories written by
``save_to_disk``, given as files, folders or globs. Row formats (detected per source, or forced):

- ``messages``: OpenAI style ``{"messages": [{"role", "content"}, ...]}``
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...]}``
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?}``
- ``prompt_completion``: ``{"prompt", "completion"}`` (strings, or lists of messages)

Output columns (``schema.NORMALIZED_SCHEMA``): ``sample_id``, ``source``, ``row_index``,
``format``, ``messages`` (list<struct<role, content>>), ``raw`` (original row text, rejected rows
only), ``reject_reason`` / ``reject_detail`` (null for usable rows). One output row per input row:
a row that cannot be used is flagged, never dropped.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qtune import schema
from qtune.schema import RejectReason

logger = logging.getLogger(__name__)

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "tool": "tool",
}
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_DETECT_ROWS = 100


class InputError(ValueError):
    """The input as a whole cannot be read (no files, unreadable source, undetectable format)."""


@dataclass(frozen=True)
class Source:
    """One unit of input: a file or a saved dataset directory, read by one task."""

    path: str
    kind: str  # "jsonl" | "json" | "parquet" | "hf_dataset"


class RowError(Exception):
    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --- discovery ----------------------------------------------------------------------------------


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _kind_of_file(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".json") and name not in {"dataset_info.json", "state.json"}:
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def discover_sources(paths: str | list[str]) -> list[Source]:
    """Expand files, folders and globs into sorted, de-duplicated sources. Raises InputError."""
    specs = [paths] if isinstance(paths, str) else list(paths)
    found: dict[str, Source] = {}
    for spec in specs:
        matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
        if not matches:
            raise InputError(f"input.path {spec!r} matches no file")
        for match in matches:
            path = Path(match)
            if not path.exists():
                raise InputError(f"input.path {spec!r}: {path} does not exist")
            if path.is_dir() and _is_saved_dataset(path):
                found[str(path)] = Source(str(path), "hf_dataset")
            elif path.is_dir():
                for child in sorted(path.rglob("*")):
                    if _hidden(child, path):
                        continue
                    if child.is_dir() and _is_saved_dataset(child):
                        found[str(child)] = Source(str(child), "hf_dataset")
                    elif child.is_file() and not _inside_saved_dataset(child, path):
                        kind = _kind_of_file(child)
                        if kind:
                            found[str(child)] = Source(str(child), kind)
            else:
                kind = _kind_of_file(path)
                if kind is None:
                    raise InputError(
                        f"{path}: unsupported file type (expected .jsonl, .json, .parquet or a "
                        "datasets save_to_disk directory)"
                    )
                found[str(path)] = Source(str(path), kind)
    if not found:
        raise InputError(f"input.path {paths!r} contains no readable input files")
    return [found[k] for k in sorted(found)]


def _hidden(child: Path, root: Path) -> bool:
    # As Spark and Hadoop do: names starting with "." or "_" are metadata, not data.
    return any(part.startswith((".", "_")) for part in child.relative_to(root).parts)


def _inside_saved_dataset(child: Path, root: Path) -> bool:
    return any(_is_saved_dataset(parent) for parent in child.parents if parent != root.parent)


# --- reading raw rows -----------------------------------------------------------------------------
# Each reader yields lists of (row_index, value, raw_text_or_None, error_or_None).

RawRow = tuple[int, Any, str | None, RowError | None]


def _iter_jsonl(path: str, batch_rows: int) -> Iterator[list[RawRow]]:
    batch: list[RawRow] = []
    with open(path, "rb") as f:
        index = 0
        for line in f:
            stripped = line.strip()
            if not stripped:
                continue  # blank lines are not rows
            try:
                text = stripped.decode("utf-8")
            except UnicodeDecodeError as e:
                raw = stripped.decode("utf-8", errors="replace")
                batch.append((index, None, raw, RowError(RejectReason.INVALID_UTF8, str(e))))
            else:
                try:
                    batch.append((index, json.loads(text), text, None))
                except json.JSONDecodeError as e:
                    batch.append((index, None, text, RowError(RejectReason.INVALID_JSON, str(e))))
            index += 1
            if len(batch) >= batch_rows:
                yield batch
                batch = []
    if batch:
        yield batch


def _iter_json(path: str, batch_rows: int) -> Iterator[list[RawRow]]:
    # A JSON array is parsed whole (json has no streaming parser); use JSONL for large corpora.
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 ({e})") from e
    stripped = text.lstrip()
    if not stripped.startswith("["):
        # A .json file holding JSON lines is common; read it as such.
        yield from _iter_jsonl(path, batch_rows)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON array ({e})") from e
    for start in range(0, len(rows), batch_rows):
        yield [
            (start + i, row, None, None) for i, row in enumerate(rows[start : start + batch_rows])
        ]


def _iter_parquet(path: str, batch_rows: int) -> Iterator[list[RawRow]]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: unreadable Parquet file ({e})") from e
    index = 0
    for record_batch in parquet.iter_batches(batch_size=batch_rows):
        rows = record_batch.to_pylist()
        yield [(index + i, row, None, None) for i, row in enumerate(rows)]
        index += len(rows)


def _iter_hf_dataset(path: str, batch_rows: int, split: str) -> Iterator[list[RawRow]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises several unrelated types for a bad directory
        raise InputError(f"{path}: cannot load saved dataset ({e})") from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InputError(f"{path}: no split {split!r} (has: {', '.join(loaded)})")
        loaded = loaded[split]
    index = 0
    for table in loaded.with_format("arrow").iter(batch_size=batch_rows):
        rows = table.to_pylist()
        yield [(index + i, row, None, None) for i, row in enumerate(rows)]
        index += len(rows)


def iter_raw_rows(source: Source, batch_rows: int, split: str = "train") -> Iterator[list[RawRow]]:
    if source.kind == "jsonl":
        return _iter_jsonl(source.path, batch_rows)
    if source.kind == "json":
        return _iter_json(source.path, batch_rows)
    if source.kind == "parquet":
        return _iter_parquet(source.path, batch_rows)
    if source.kind == "hf_dataset":
        return _iter_hf_dataset(source.path, batch_rows, split)
    raise InputError(f"unknown source kind {source.kind!r}")


# --- format detection and normalisation ----------------------------------------------------------


def detect_format(row: Any) -> str | None:
    """The format a row looks like, or None."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


def detect_source_format(source: Source, split: str = "train") -> str | None:
    """Format of the first rows of a source that have a recognisable one (None if none do)."""
    seen = 0
    for batch in iter_raw_rows(source, _DETECT_ROWS, split):
        for _, value, _, error in batch:
            if error is None:
                detected = detect_format(value)
                if detected:
                    return detected
            seen += 1
            if seen >= _DETECT_ROWS:
                return None
    return None


def _check_text(text: Any, where: str) -> str:
    if text is None:
        return ""
    if isinstance(text, list):
        # OpenAI content parts: text parts are joined; anything else cannot be scored as text.
        parts = []
        for part in text:
            if (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                parts.append(part["text"])
            else:
                raise RowError(RejectReason.NON_STRING_CONTENT, f"{where}: non-text content part")
        text = "".join(parts)
    if not isinstance(text, str):
        raise RowError(
            RejectReason.NON_STRING_CONTENT,
            f"{where}: expected a string, got {type(text).__name__}",
        )
    if "\x00" in text:
        raise RowError(RejectReason.INVALID_TEXT, f"{where}: contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError(RejectReason.INVALID_TEXT, f"{where}: lone surrogate ({e.reason})") from e
    return text


def _turns(entries: Any, field: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    if not isinstance(entries, list):
        raise RowError(
            RejectReason.MISSING_FIELD, f"{field}: expected a list, got {type(entries).__name__}"
        )
    if not entries:
        raise RowError(RejectReason.EMPTY_MESSAGES, f"{field} is empty")
    turns = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise RowError(RejectReason.MISSING_FIELD, f"{field}[{i}] is not an object")
        role = entry.get(role_key, entry.get("role", entry.get("from")))
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise RowError(
                RejectReason.UNKNOWN_ROLE,
                f"{field}[{i}]: unknown role {role!r} (known: {', '.join(sorted(ROLE_ALIASES))})",
            )
        content = entry.get(content_key, entry.get("content", entry.get("value")))
        turns.append(
            {"role": ROLE_ALIASES[role.lower()], "content": _check_text(content, f"{field}[{i}]")}
        )
    return turns


def _require(row: dict, key: str, fmt: str) -> Any:
    if key not in row:
        raise RowError(
            RejectReason.MISSING_FIELD,
            f"{fmt} row has no {key!r} field (fields: {', '.join(map(str, row)) or 'none'})",
        )
    return row[key]


def normalize_row(row: Any, fmt: str) -> list[dict[str, str]]:
    """One raw row in format ``fmt`` -> validated messages. Raises RowError."""
    if not isinstance(row, dict):
        raise RowError(
            RejectReason.NOT_AN_OBJECT, f"expected a JSON object, got {type(row).__name__}"
        )
    if fmt == "messages":
        turns = _turns(_require(row, "messages", fmt), "messages", "role", "content")
    elif fmt == "sharegpt":
        turns = _turns(_require(row, "conversations", fmt), "conversations", "from", "value")
    elif fmt == "alpaca":
        instruction = _check_text(_require(row, "instruction", fmt), "instruction")
        extra = _check_text(row.get("input"), "input")
        output = _check_text(_require(row, "output", fmt), "output")
        turns = []
        if row.get("system"):
            turns.append({"role": "system", "content": _check_text(row["system"], "system")})
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif fmt == "prompt_completion":
        prompt, completion = _require(row, "prompt", fmt), _require(row, "completion", fmt)
        if isinstance(prompt, list) or isinstance(completion, list):
            turns = _turns(prompt, "prompt", "role", "content") + _turns(
                completion, "completion", "role", "content"
            )
        else:
            turns = [
                {"role": "user", "content": _check_text(prompt, "prompt")},
                {"role": "assistant", "content": _check_text(completion, "completion")},
            ]
    else:
        raise RowError(RejectReason.UNKNOWN_FORMAT, f"unknown format {fmt!r}")
    assistant = [t for t in turns if t["role"] == "assistant"]
    if not assistant:
        raise RowError(RejectReason.NO_ASSISTANT_TURN, "conversation has no assistant turn")
    if all(not t["content"].strip() for t in assistant):
        raise RowError(RejectReason.EMPTY_ASSISTANT, "every assistant turn is empty")
    return turns


def content_hash(messages: list[dict[str, str]]) -> str:
    """Stable id for rows without an ``id``: a hash of the normalised conversation."""
    payload = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=12).hexdigest()


def _raw_text(value: Any, raw: str | None) -> str:
    if raw is not None:
        return raw
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def normalize_batch(source: Source, rows: list[RawRow], fmt: str | None) -> pa.Table:
    """Raw rows of one source -> a NORMALIZED_SCHEMA table, one row per input row.

    ``fmt`` is the source's format (configured or detected); None means undetectable, so every row
    is rejected as ``unknown_format``.
    """
    columns: dict[str, list] = {name: [] for name in schema.NORMALIZED_SCHEMA.names}
    for index, value, raw, error in rows:
        messages = None
        row_fmt = fmt
        try:
            if error is not None:
                raise error
            if row_fmt is None:
                row_fmt = detect_format(value)
                if row_fmt is None:
                    raise RowError(
                        RejectReason.UNKNOWN_FORMAT,
                        "cannot tell the row format (expected messages, conversations, "
                        "instruction/output or prompt/completion fields)",
                    )
            messages = normalize_row(value, row_fmt)
        except RowError as e:
            reason, detail = e.reason.value, e.detail
        else:
            reason = detail = None
        row_id = value.get("id") if isinstance(value, dict) else None
        if row_id is not None and not isinstance(row_id, str | int):
            row_id = None
        if row_id is not None:
            sample_id = str(row_id)
        elif messages is not None:
            sample_id = content_hash(messages)
        else:
            sample_id = hashlib.blake2b(
                _raw_text(value, raw).encode("utf-8", "replace"), digest_size=12
            ).hexdigest()
        columns[schema.SAMPLE_ID].append(sample_id)
        columns[schema.SOURCE].append(source.path)
        columns[schema.ROW_INDEX].append(index)
        columns[schema.FORMAT].append(row_fmt)
        columns[schema.MESSAGES].append(messages)
        columns[schema.RAW].append(_raw_text(value, raw) if reason else None)
        columns[schema.REJECT_REASON].append(reason)
        columns[schema.REJECT_DETAIL].append(detail)
    return pa.Table.from_pydict(columns, schema=schema.NORMALIZED_SCHEMA)


def read_source(
    source: Source, fmt: str = "auto", batch_rows: int = 512, split: str = "train"
) -> Iterator[pa.Table]:
    """Stream one source as normalised batches (NORMALIZED_SCHEMA)."""
    resolved = detect_source_format(source, split) if fmt == "auto" else fmt
    if resolved is None:
        logger.warning("%s: no row in a known format among the first rows", source.path)
    for rows in iter_raw_rows(source, batch_rows, split):
        yield normalize_batch(source, rows, resolved)


class ReadSources:
    """Stage: a batch of source descriptors -> their normalised rows (many rows per input row).

    Input columns: ``path``, ``kind``, ``format`` (see ``Source``; ``format`` may be ``auto``).
    Output: NORMALIZED_SCHEMA batches, streamed as they are read.
    """

    def __init__(self, batch_rows: int = 512, split: str = "train"):
        self.batch_rows = batch_rows
        self.split = split

    def __call__(self, sources: pa.Table) -> Iterator[pa.Table]:
        for item in sources.to_pylist():
            source = Source(item["path"], item["kind"])
            yield from read_source(source, item["format"], self.batch_rows, self.split)
