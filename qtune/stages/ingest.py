"""Ingest: find input sources, read them in batches, normalise every row to chat messages.

Sources are JSONL files, JSON-array files, Parquet files and ``datasets`` directories written by
``save_to_disk``, given as files, folders or globs. Row formats (detected per source, or forced):

- ``messages``: OpenAI style ``{"messages": [{"role", "content"}, ...]}``
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...]}``
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?}``
- ``prompt_completion``: ``{"prompt", "completion"}`` (strings, or lists of messages)

Output columns (``schema.NORMALIZED_SCHEMA``): ``sample_id``, ``source``, ``row_index``,
``partition``, ``format``, ``metadata`` (the row's short scalar fields as JSON), ``messages``
(list<struct<role, content>>), ``raw`` (original row text, rejected rows only),
``reject_reason`` / ``reject_detail`` (null for usable rows). One output row per input row: a
row that cannot be used is flagged, never dropped.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from qtune import schema, storage
from qtune.schema import RejectReason, RowRejected

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


# --- discovery ----------------------------------------------------------------------------------


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


# Compressed files are read through a decompressing stream (pyarrow's codecs).
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}


def compression_of(location: str) -> str | None:
    """The codec of a compressed input file, by its name (None: not compressed)."""
    name = storage.name(location).lower()
    return next((c for s, c in COMPRESSION_SUFFIXES.items() if name.endswith(s)), None)


def _kind_of_file(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name.removesuffix(suffix)
            if name.endswith(".parquet"):
                return None  # Parquet compresses inside the file; a compressed one is not read
            break
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".json") and name not in {"dataset_info.json", "state.json"}:
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    return None


_SUPPORTED = (
    "expected .jsonl, .ndjson, .json or .parquet (JSON may be .gz, .zst or .bz2 compressed) or "
    "a datasets save_to_disk directory"
)


@dataclass(frozen=True)
class SkippedInput:
    """A file inside an input folder that is not read, and why (listed in the manifest)."""

    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


def discover_sources(paths: str | list[str]) -> list[Source]:
    """Expand files, folders and globs into sorted, de-duplicated sources. Raises InputError.

    Each may be a local path or a filesystem URI (``s3://bucket/corpus/*.jsonl``). Files in
    folders that are not read are logged; ``discover_inputs`` also returns them.
    """
    sources, skipped = discover_inputs(paths)
    log_skipped(skipped)
    return sources


def log_skipped(skipped: list[SkippedInput]) -> None:
    """A warning per skipped file; hidden metadata names (``_SUCCESS``, ``.git``) only at info."""
    for entry in skipped:
        level = logging.INFO if entry.reason == HIDDEN_REASON else logging.WARNING
        logger.log(level, "input %s skipped: %s", storage.without_query(entry.path), entry.reason)


def discover_inputs(paths: str | list[str]) -> tuple[list[Source], list[SkippedInput]]:
    """``discover_sources``, and every file of the input folders and globs that is skipped,
    with why (an unsupported type, a dangling symlink, a hidden metadata name)."""
    specs = [paths] if isinstance(paths, str) else list(paths)
    found: dict[str, Source] = {}
    skipped: dict[str, SkippedInput] = {}
    for spec in specs:
        if storage.is_remote(spec):
            remote_found, remote_skipped = _discover_remote(spec)
            found.update(remote_found)
            skipped.update((s.path, s) for s in remote_skipped)
            continue
        globbed = glob.has_magic(spec)
        matches = sorted(glob.glob(spec, recursive=True)) if globbed else [spec]
        if not matches:
            raise InputError(f"input.path {spec!r} matches no file")
        for match in matches:
            path = Path(match)
            if not path.exists():
                if globbed and path.is_symlink():
                    skipped[match] = SkippedInput(match, "dangling symlink (its target is gone)")
                    continue
                raise InputError(f"input.path {spec!r}: {path} does not exist")
            if path.is_dir() and _is_saved_dataset(path):
                found[str(path)] = Source(str(path), "hf_dataset")
            elif path.is_dir():
                _walk_folder(path, found, skipped)
            else:
                kind = _kind_of_file(path)
                if kind is None and globbed:
                    skipped[match] = SkippedInput(match, f"unsupported file type ({_SUPPORTED})")
                    continue
                if kind is None:
                    raise InputError(f"{path}: unsupported file type ({_SUPPORTED})")
                found[str(path)] = Source(str(path), kind)
    if not found:
        listed = "; ".join(f"{s.path}: {s.reason}" for s in list(skipped.values())[:3])
        raise InputError(
            f"input.path {paths!r} contains no readable input files"
            + (f" (skipped {len(skipped)}: {listed})" if skipped else "")
        )
    return [found[k] for k in sorted(found)], [skipped[k] for k in sorted(skipped)]


def _walk_folder(root: Path, found: dict[str, Source], skipped: dict[str, SkippedInput]) -> None:
    for child in sorted(root.rglob("*")):
        hidden = _hidden_part(child.relative_to(root).parts)
        if hidden is not None:
            # Reported once per hidden entry (not every file of a .git folder).
            first_hidden = str(root.joinpath(*hidden))
            skipped.setdefault(first_hidden, SkippedInput(first_hidden, HIDDEN_REASON))
            continue
        if child.is_dir() and _is_saved_dataset(child):
            found[str(child)] = Source(str(child), "hf_dataset")
        elif child.is_dir() or _inside_saved_dataset(child, root):
            continue
        elif child.is_symlink() and not child.exists():
            skipped[str(child)] = SkippedInput(str(child), "dangling symlink (its target is gone)")
        elif not child.is_file():
            skipped[str(child)] = SkippedInput(str(child), "not a regular file")
        else:
            kind = _kind_of_file(child)
            if kind:
                found[str(child)] = Source(str(child), kind)
            else:
                skipped[str(child)] = SkippedInput(
                    str(child), f"unsupported file type ({_SUPPORTED})"
                )


def _discover_remote(spec: str) -> tuple[dict[str, Source], list[SkippedInput]]:
    try:
        matches = storage.glob(spec) if storage.has_magic(spec) else [spec]
        if not matches:
            raise InputError(f"input.path {storage.without_query(spec)!r} matches no file")
        found: dict[str, Source] = {}
        skipped: dict[str, SkippedInput] = {}
        for match in matches:
            shown = storage.without_query(match)
            if storage.is_dir(match):
                files = storage.list_files(match)
                if "state.json" in files or "dataset_dict.json" in files:
                    raise InputError(
                        f"{shown}: a saved `datasets` directory on remote storage; copy it "
                        "locally, or give its data as Parquet/JSONL files"
                    )
                for relative in sorted(files):
                    parts = relative.split("/")
                    hidden = _hidden_part(parts)
                    if hidden is not None:
                        where = storage.join(shown, *hidden)
                        skipped.setdefault(where, SkippedInput(where, HIDDEN_REASON))
                        continue
                    kind = _kind_of_file(Path(relative))
                    location = storage.join(match, relative)
                    if kind:
                        found[location] = Source(location, kind)
                    else:
                        where = storage.without_query(location)
                        skipped[where] = SkippedInput(
                            where, f"unsupported file type ({_SUPPORTED})"
                        )
            elif storage.is_file(match):
                kind = _kind_of_file(Path(storage.name(match)))
                if kind is None:
                    raise InputError(f"{shown}: unsupported file type ({_SUPPORTED})")
                found[match] = Source(match, kind)
            elif not storage.has_magic(spec):
                raise InputError(f"input.path {shown!r} does not exist")
        return found, list(skipped.values())
    except OSError as e:
        raise InputError(f"input.path {storage.without_query(spec)!r}: {e}") from e


HIDDEN_REASON = "hidden name (starts with '.' or '_': metadata, not data, as Spark reads it)"


def _hidden_part(parts: tuple[str, ...] | list[str]) -> tuple[str, ...] | None:
    """The path parts up to the first hidden one (``.git``, ``_SUCCESS``), or None."""
    for i, part in enumerate(parts):
        if part.startswith((".", "_")):
            return tuple(parts[: i + 1])
    return None


def _inside_saved_dataset(child: Path, root: Path) -> bool:
    return any(_is_saved_dataset(parent) for parent in child.parents if parent != root.parent)


class _Decompressed(io.BufferedReader):
    """A decompressing reader. Compressed streams cannot seek: the readers' one seek, made
    before reading, skips by decompressing (a partition of a compressed file costs
    decompressing everything before it)."""

    _started = False

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or self._started:
            raise io.UnsupportedOperation("a compressed input seeks once, forward, before reading")
        self._started = True
        left = offset
        while left > 0:
            chunk = self.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
        return offset - left

    def seekable(self) -> bool:
        return False


def _open_input(location: str) -> BinaryIO:
    """A binary reader of an input file, decompressed when its name says it is compressed."""
    codec = compression_of(location)
    if codec is None:
        return storage.open_input(location)
    filesystem, path = storage.resolve(location)
    return _Decompressed(filesystem.open_input_stream(path, compression=codec), 1 << 20)


# --- partitions ---------------------------------------------------------------------------------
# A partition is a run of consecutive rows of one source: the unit that is read, scored,
# checkpointed and resumed. Planning reads no row content: JSONL is scanned for line offsets,
# Parquet and saved datasets give row counts from metadata; a JSON array is decoded once by the
# planner, which records each partition's byte range (a reader decodes only its own).


@dataclass(frozen=True)
class Partition:
    index: int  # position in the plan: partitions are numbered across sources in source order
    source: str
    kind: str
    format: str | None  # resolved row format; None: undetectable, every row is rejected
    row_start: int
    row_count: int
    byte_offset: int = 0  # JSONL / JSON array: where row ``row_start`` begins
    byte_end: int = 0  # JSON array: where the partition's last row ends (0: end of file)
    row_groups: tuple[int, ...] = ()  # Parquet: the row groups holding these rows

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "row_groups": list(self.row_groups)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Partition:
        return cls(**{**data, "row_groups": tuple(data.get("row_groups", ()))})


@dataclass(frozen=True)
class UnreadableSource:
    """A source that could not be opened at all: reported, and skipped unless strict."""

    path: str
    error: str


def _jsonl_partitions(
    path: str, rows_per_partition: int, max_rows: int | None = None
) -> list[tuple[int, int, int]]:
    """(row_start, row_count, byte_offset) per partition; blank lines are not rows."""
    spans: list[tuple[int, int, int]] = []
    rows = 0
    offset = 0
    start_offset = 0
    with _open_input(path) as f:
        for line in f:
            if max_rows is not None and rows >= max_rows:
                break
            if line.strip():
                if rows % rows_per_partition == 0:
                    if rows:
                        spans.append((rows - rows_per_partition, rows_per_partition, start_offset))
                    start_offset = offset
                rows += 1
            offset += len(line)
    if rows:
        last = (rows - 1) // rows_per_partition * rows_per_partition
        spans.append((last, rows - last, start_offset))
    return spans


_ARRAY_SEPARATOR = re.compile(r"\s*([,\]])\s*")
_DECODER = json.JSONDecoder()
_JSON_SPACE = " \t\r\n"


def _decode_text(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 ({e})") from e


def _array_elements(text: str, pos: int, path: str, whole: bool) -> Iterator[tuple[int, int, Any]]:
    """(start, end, value) of each element of a JSON array from ``pos`` (an element's start, or
    the first character after ``[``). Decoded one element at a time (C speed).

    ``whole``: ``text`` is the whole file, which must close the array and hold nothing after it
    (the planner's check); otherwise it is one partition's byte range, ending after an element.
    """
    while True:
        while pos < len(text) and text[pos] in _JSON_SPACE:
            pos += 1
        if pos >= len(text):
            if whole:
                raise InputError(f"{path}: invalid JSON array (the file ends before its ']')")
            return
        if text[pos] == "]":
            break
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON array ({e})") from e
        yield pos, end, value
        if end >= len(text) and not whole:
            return  # a partition's byte range ends with its last element
        separator = _ARRAY_SEPARATOR.match(text, end)
        if separator is None:
            raise InputError(f"{path}: invalid JSON array (expected ',' or ']' at {end})")
        if separator.group(1) == "]":
            pos = separator.start(1)
            break
        pos = separator.end()
    if whole and text[pos + 1 :].strip(_JSON_SPACE):
        raise InputError(f"{path}: invalid JSON array (data after its closing ']')")


def _array_start(text: str) -> int | None:
    """Where a JSON array's ``[`` is (after a BOM and whitespace), or None: not an array."""
    start = len(text) - len(text.lstrip("\ufeff" + _JSON_SPACE))
    return start if text.startswith("[", start) else None


def _json_array_partitions(
    path: str, rows_per_partition: int, max_rows: int | None = None
) -> list[tuple[int, int, int, int]] | None:
    """(row_start, row_count, byte_offset, byte_end) per partition of a JSON-array file, or
    None when the file holds JSON lines instead.

    The planner reads the file once; each reader then decodes only its own byte range, so a
    huge array is scored in bounded partitions like JSONL.
    """
    with _open_input(path) as f:
        text = _decode_text(f.read(), path)
    start = _array_start(text)
    if start is None:
        return None
    bounds: list[int] = []  # character offsets: partition starts, then the end
    rows = 0
    end = start + 1
    for position, element_end, _ in _array_elements(text, start + 1, path, whole=True):
        if max_rows is not None and rows >= max_rows:
            break
        if rows % rows_per_partition == 0:
            bounds.append(position)
        rows += 1
        end = element_end
    if not rows:
        return []
    bounds.append(end)
    byte_bounds = [len(text[: bounds[0]].encode("utf-8"))]
    for a, b in zip(bounds, bounds[1:], strict=False):
        byte_bounds.append(byte_bounds[-1] + len(text[a:b].encode("utf-8")))
    return [
        (i * rows_per_partition, min(rows_per_partition, rows - i * rows_per_partition), a, b)
        for i, (a, b) in enumerate(zip(byte_bounds, byte_bounds[1:], strict=False))
    ]


def _load_saved_dataset(path: str, split: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises several unrelated types for a bad directory
        raise InputError(f"{path}: cannot load saved dataset ({e})") from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InputError(f"{path}: no split {split!r} (has: {', '.join(loaded)})")
        loaded = loaded[split]
    return loaded


def plan_source(
    source: Source,
    fmt: str | None,
    first_index: int,
    rows_per_partition: int,
    split: str = "train",
    max_rows: int | None = None,
) -> list[Partition]:
    """Split one source into partitions numbered from ``first_index``. Raises InputError.

    ``max_rows``: plan only the source's first rows (a ``--limit`` run).
    """
    partitions = _plan_source(source, fmt, first_index, rows_per_partition, split, max_rows)
    if max_rows is None:
        return partitions
    limited, left = [], max_rows
    for partition in partitions:
        if left <= 0:
            break
        if partition.row_count > left:
            partition = replace(partition, row_count=left)
        limited.append(partition)
        left -= partition.row_count
    return limited


def _plan_source(
    source: Source,
    fmt: str | None,
    first_index: int,
    rows_per_partition: int,
    split: str,
    max_rows: int | None,
) -> list[Partition]:

    def make(i: int, row_start: int, row_count: int, **extra: Any) -> Partition:
        return Partition(
            first_index + i, source.path, source.kind, fmt, row_start, row_count, **extra
        )

    try:
        if source.kind == "json":
            arrays = _json_array_partitions(source.path, rows_per_partition, max_rows)
            if arrays is not None:
                return [
                    make(i, a, n, byte_offset=o, byte_end=e)
                    for i, (a, n, o, e) in enumerate(arrays)
                ]
        if source.kind in ("jsonl", "json"):
            spans = _jsonl_partitions(source.path, rows_per_partition, max_rows)
            return [make(i, a, n, byte_offset=o) for i, (a, n, o) in enumerate(spans)]
        if source.kind == "parquet":
            try:
                with storage.parquet_file(source.path) as parquet:
                    metadata = parquet.metadata
            except (pa.ArrowInvalid, OSError) as e:
                raise InputError(f"{source.path}: unreadable Parquet file ({e})") from e
            # Row ranges, not whole row groups: a file written as one huge row group still
            # splits into bounded partitions (each reads only the groups its range overlaps).
            sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
            total = int(starts[-1]) if max_rows is None else min(int(starts[-1]), max_rows)
            partitions: list[Partition] = []
            for i, start in enumerate(range(0, total, rows_per_partition)):
                stop = min(start + rows_per_partition, total)
                groups = tuple(
                    g for g in range(len(sizes)) if starts[g] < stop and starts[g + 1] > start
                )
                partitions.append(make(i, start, stop - start, row_groups=groups))
            return partitions
        if source.kind == "hf_dataset":
            total = len(_load_saved_dataset(source.path, split))
            return [
                make(i, start, min(rows_per_partition, total - start))
                for i, start in enumerate(range(0, total, rows_per_partition))
            ]
    except OSError as e:
        raise InputError(f"{source.path}: cannot read ({e})") from e
    raise InputError(f"unknown source kind {source.kind!r}")


# --- reading raw rows -----------------------------------------------------------------------------
# Each reader yields lists of (row_index, value, raw_text_or_None, error_or_None) for the rows of
# one partition, in order.

RawRow = tuple[int, Any, str | None, RowRejected | None]
_UTF8_BOM = b"\xef\xbb\xbf"


def _jsonl_row(index: int, line: bytes) -> RawRow:
    if line.startswith(_UTF8_BOM):  # editors write one at the start of a file
        line = line[len(_UTF8_BOM) :]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raw = line.decode("utf-8", errors="replace")
        return (index, None, raw, RowRejected(RejectReason.INVALID_UTF8, str(e)))
    try:
        return (index, json.loads(text), text, None)
    except json.JSONDecodeError as e:
        return (index, None, text, RowRejected(RejectReason.INVALID_JSON, str(e)))


def _iter_jsonl(partition: Partition, batch_rows: int) -> Iterator[list[RawRow]]:
    batch: list[RawRow] = []
    index = partition.row_start
    end = partition.row_start + partition.row_count
    with _open_input(partition.source) as f:
        f.seek(partition.byte_offset)
        for line in f:
            if index >= end:
                break
            stripped = line.strip()
            if not stripped:
                continue  # blank lines are not rows
            batch.append(_jsonl_row(index, stripped))
            index += 1
            if len(batch) >= batch_rows:
                yield batch
                batch = []
    if batch:
        yield batch


def _iter_json_array(partition: Partition, batch_rows: int) -> Iterator[list[RawRow]]:
    """The partition's elements, decoding only its byte range (the whole file when it has
    none: format detection reads the first rows of an unplanned array)."""
    with _open_input(partition.source) as f:
        f.seek(partition.byte_offset)
        data = (
            f.read(partition.byte_end - partition.byte_offset) if partition.byte_end else f.read()
        )
    text = _decode_text(data, partition.source)
    if partition.byte_end:
        pos = 0  # a planned range starts at its first element
    else:
        start = _array_start(text)
        pos = 0 if start is None else start + 1
    batch: list[RawRow] = []
    index = partition.row_start
    for _, _, value in _array_elements(text, pos, partition.source, whole=False):
        if index >= partition.row_start + partition.row_count:
            break
        batch.append((index, value, None, None))
        index += 1
        if len(batch) >= batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


def _is_json_array(partition: Partition) -> bool:
    if partition.byte_end:
        return True  # planned as an array
    with _open_input(partition.source) as f:
        head = f.read(4096)
    return _array_start(head.decode("utf-8", errors="ignore")) is not None


def _iter_rows(rows: list[Any], first_index: int, batch_rows: int) -> Iterator[list[RawRow]]:
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start : start + batch_rows]
        yield [(first_index + start + i, row, None, None) for i, row in enumerate(chunk)]


def _iter_parquet(partition: Partition, batch_rows: int) -> Iterator[list[RawRow]]:
    with storage.parquet_file(partition.source) as parquet:
        groups = list(partition.row_groups) or None
        # Row index of the first row read: the start of the partition's first row group.
        index = (
            sum(parquet.metadata.row_group(g).num_rows for g in range(groups[0])) if groups else 0
        )
        for record_batch in parquet.iter_batches(batch_size=batch_rows, row_groups=groups):
            skip = min(max(0, partition.row_start - index), record_batch.num_rows)
            if skip < record_batch.num_rows:
                rows = record_batch.slice(skip).to_pylist()
                yield from _iter_rows(rows, index + skip, batch_rows)
            index += record_batch.num_rows


def _iter_hf_dataset(partition: Partition, batch_rows: int, split: str) -> Iterator[list[RawRow]]:
    loaded = _load_saved_dataset(partition.source, split)
    end = partition.row_start + partition.row_count
    for start in range(partition.row_start, end, batch_rows):
        table = loaded.with_format("arrow")[start : min(start + batch_rows, end)]
        yield from _iter_rows(table.to_pylist(), start, batch_rows)


def iter_raw_rows(
    partition: Partition, batch_rows: int, split: str = "train"
) -> Iterator[list[RawRow]]:
    if partition.kind == "json" and _is_json_array(partition):
        return _iter_json_array(partition, batch_rows)
    if partition.kind in ("jsonl", "json"):
        return _iter_jsonl(partition, batch_rows)
    if partition.kind == "parquet":
        return _iter_parquet(partition, batch_rows)
    if partition.kind == "hf_dataset":
        return _iter_hf_dataset(partition, batch_rows, split)
    raise InputError(f"unknown source kind {partition.kind!r}")


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
    head = Partition(0, source.path, source.kind, None, 0, _DETECT_ROWS)
    for batch in iter_raw_rows(head, _DETECT_ROWS, split):
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
                raise RowRejected(
                    RejectReason.NON_STRING_CONTENT, f"{where}: non-text content part"
                )
        text = "".join(parts)
    if not isinstance(text, str):
        raise RowRejected(
            RejectReason.NON_STRING_CONTENT,
            f"{where}: expected a string, got {type(text).__name__}",
        )
    if "\x00" in text:
        raise RowRejected(RejectReason.INVALID_TEXT, f"{where}: contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowRejected(RejectReason.INVALID_TEXT, f"{where}: lone surrogate ({e.reason})") from e
    return text


def _tool_calls(value: Any, where: str) -> str:
    """OpenAI-style tool calls -> their JSON text (what MESSAGE_TYPE stores). Raises RowRejected.

    Each call is ``{"type": "function", "function": {"name", "arguments"}, "id"?}`` or the bare
    ``{"name", "arguments"}``; ``arguments`` is a JSON string or an object, as templates accept.
    """
    if not isinstance(value, list) or not value:
        raise RowRejected(
            RejectReason.INVALID_TOOL_CALLS, f"{where}.tool_calls: expected a non-empty list"
        )
    for j, call in enumerate(value):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowRejected(
                RejectReason.INVALID_TOOL_CALLS,
                f"{where}.tool_calls[{j}]: expected a function call with a string name",
            )
        arguments = function.get("arguments", {})
        if not isinstance(arguments, str | dict):
            raise RowRejected(
                RejectReason.INVALID_TOOL_CALLS,
                f"{where}.tool_calls[{j}].arguments: expected a JSON string or an object",
            )
        for text in (function["name"], arguments if isinstance(arguments, str) else ""):
            _check_text(text, f"{where}.tool_calls[{j}]")
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise RowRejected(RejectReason.INVALID_TOOL_CALLS, f"{where}.tool_calls: {e}") from e


def _turns(entries: Any, field: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    """Validated turns: ``role`` and ``content`` always, and where given ``reasoning_content``,
    ``tool_calls`` (JSON text; assistant turns), ``tool_call_id`` and ``name`` (tool turns)."""
    if not isinstance(entries, list):
        raise RowRejected(
            RejectReason.MISSING_FIELD, f"{field}: expected a list, got {type(entries).__name__}"
        )
    if not entries:
        raise RowRejected(RejectReason.EMPTY_MESSAGES, f"{field} is empty")
    turns = []
    for i, entry in enumerate(entries):
        where = f"{field}[{i}]"
        if not isinstance(entry, dict):
            raise RowRejected(RejectReason.MISSING_FIELD, f"{where} is not an object")
        role = entry.get(role_key, entry.get("role", entry.get("from")))
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise RowRejected(
                RejectReason.UNKNOWN_ROLE,
                f"{where}: unknown role {role!r} (known: {', '.join(sorted(ROLE_ALIASES))})",
            )
        role = ROLE_ALIASES[role.lower()]
        content = entry.get(content_key, entry.get("content", entry.get("value")))
        calls = entry.get("tool_calls")
        if calls is None and isinstance(entry.get("function_call"), dict):
            calls = [{"type": "function", "function": entry["function_call"]}]  # legacy OpenAI
        # A bare tool call keeps content None, as OpenAI sends it (templates test for it).
        bare_call = role == "assistant" and calls is not None and content is None
        turn = {"role": role, "content": None if bare_call else _check_text(content, where)}
        if calls is not None:
            if role != "assistant":
                raise RowRejected(
                    RejectReason.INVALID_TOOL_CALLS,
                    f"{where}: tool_calls on a {role} turn (only assistant turns make calls)",
                )
            turn["tool_calls"] = _tool_calls(calls, where)
        reasoning = entry.get("reasoning_content", entry.get("thinking"))  # gpt-oss: thinking
        if reasoning is not None:
            turn["reasoning_content"] = _check_text(reasoning, f"{where}.reasoning_content")
        for key in ("tool_call_id", "name"):
            if role == "tool" and isinstance(entry.get(key), str):
                turn[key] = _check_text(entry[key], f"{where}.{key}")
        turns.append(turn)
    return turns


def _tools(row: dict) -> str | None:
    """A row's tool schemas (``tools``: a list of objects, or that list as JSON text) as JSON."""
    value = row.get("tools")
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowRejected(RejectReason.INVALID_TOOL_CALLS, f"tools: invalid JSON ({e})") from e
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise RowRejected(RejectReason.INVALID_TOOL_CALLS, "tools: expected a list of objects")
    return json.dumps(value, ensure_ascii=False)


def _require(row: dict, key: str, fmt: str) -> Any:
    if key not in row:
        raise RowRejected(
            RejectReason.MISSING_FIELD,
            f"{fmt} row has no {key!r} field (fields: {', '.join(map(str, row)) or 'none'})",
        )
    return row[key]


def normalize_row(row: Any, fmt: str) -> list[dict[str, str]]:
    """One raw row in format ``fmt`` -> validated messages (see ``_turns``). Raises RowRejected."""
    if not isinstance(row, dict):
        raise RowRejected(
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
        raise RowRejected(RejectReason.UNKNOWN_FORMAT, f"unknown format {fmt!r}")
    assistant = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    if not assistant:
        raise RowRejected(RejectReason.NO_ASSISTANT_TURN, "conversation has no assistant turn")
    # An empty turn would train on a bare end-of-turn token: the model learns to say nothing.
    empty = [
        i
        for i in assistant
        if not (turns[i]["content"] or "").strip() and "tool_calls" not in turns[i]
    ]
    if empty:
        raise RowRejected(
            RejectReason.EMPTY_ASSISTANT,
            f"assistant turn(s) {', '.join(map(str, empty))} have no text and no tool calls",
        )
    return turns


# Fields that hold the conversation itself, never metadata.
_CONTENT_FIELDS = {
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "system",
    "prompt",
    "completion",
}
_METADATA_MAX_CHARS = 256


def row_metadata(row: Any) -> str | None:
    """JSON of a row's short scalar top-level fields (``task``, ``category``, ``source``...):
    what triage can group by later without re-reading the input. None when there are none."""
    if not isinstance(row, dict):
        return None
    fields = {
        str(k): v
        for k, v in row.items()
        if k not in _CONTENT_FIELDS
        and (
            isinstance(v, bool | int | float)
            or (isinstance(v, str) and len(v) <= _METADATA_MAX_CHARS)
        )
    }
    return json.dumps(fields, ensure_ascii=False, sort_keys=True) if fields else None


def content_hash(messages: list[dict[str, str]], tools: str | None = None) -> str:
    """Stable id for rows without an ``id``: a hash of the normalised conversation (and of its
    tool schemas, when it has some)."""
    payload = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
    if tools is not None:
        payload += tools
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=12).hexdigest()


def _message_struct(turn: dict[str, str]) -> dict[str, str | None]:
    return {name: turn.get(name) for name in schema.MESSAGE_FIELDS}


def _raw_text(value: Any, raw: str | None) -> str:
    if raw is not None:
        return raw
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def normalize_batch(partition: Partition, rows: list[RawRow]) -> pa.Table:
    """Raw rows of one partition -> a NORMALIZED_SCHEMA table, one row per input row.

    The partition's ``format`` is the source's (configured or detected); None means
    undetectable, so every row is rejected as ``unknown_format``.
    """
    columns: dict[str, list] = {name: [] for name in schema.NORMALIZED_SCHEMA.names}
    source = storage.without_query(partition.source)  # never a URI's endpoint options
    for index, value, raw, error in rows:
        messages = tools = None
        row_fmt = partition.format
        try:
            if error is not None:
                raise error
            if row_fmt is None:
                row_fmt = detect_format(value)
                if row_fmt is None:
                    raise RowRejected(
                        RejectReason.UNKNOWN_FORMAT,
                        "cannot tell the row format (expected messages, conversations, "
                        "instruction/output or prompt/completion fields)",
                    )
            tools = _tools(value) if isinstance(value, dict) else None
            messages = normalize_row(value, row_fmt)
        except RowRejected as e:
            reason, detail = e.reason.value, e.detail
            messages = tools = None
        else:
            reason = detail = None
        row_id = value.get("id") if isinstance(value, dict) else None
        if row_id is not None and not isinstance(row_id, str | int):
            row_id = None
        if row_id is not None:
            sample_id = str(row_id)
        elif messages is not None:
            sample_id = content_hash(messages, tools)
        else:
            sample_id = hashlib.blake2b(
                _raw_text(value, raw).encode("utf-8", "replace"), digest_size=12
            ).hexdigest()
        columns[schema.SAMPLE_ID].append(sample_id)
        columns[schema.SOURCE].append(source)
        columns[schema.ROW_INDEX].append(index)
        columns[schema.PARTITION].append(partition.index)
        columns[schema.FORMAT].append(row_fmt)
        columns[schema.METADATA].append(row_metadata(value))
        columns[schema.MESSAGES].append(
            None if messages is None else [_message_struct(turn) for turn in messages]
        )
        columns[schema.TOOLS].append(tools)
        columns[schema.RAW].append(_raw_text(value, raw) if reason else None)
        columns[schema.REJECT_REASON].append(reason)
        columns[schema.REJECT_DETAIL].append(detail)
    return pa.Table.from_pydict(columns, schema=schema.NORMALIZED_SCHEMA)


def unreadable_rows(partition: Partition, first_index: int, error: str) -> pa.Table:
    """Reject rows for the part of a partition that could not be read (the file broke mid-way)."""
    indices = list(range(first_index, partition.row_start + partition.row_count))
    n = len(indices)
    source = storage.without_query(partition.source)
    return pa.Table.from_pydict(
        {
            schema.SAMPLE_ID: [
                hashlib.blake2b(f"{source}:{i}".encode(), digest_size=12).hexdigest()
                for i in indices
            ],
            schema.SOURCE: [source] * n,
            schema.ROW_INDEX: indices,
            schema.PARTITION: [partition.index] * n,
            schema.FORMAT: [partition.format] * n,
            schema.METADATA: [None] * n,
            schema.MESSAGES: [None] * n,
            schema.TOOLS: [None] * n,
            schema.RAW: [None] * n,
            schema.REJECT_REASON: [RejectReason.UNREADABLE_SOURCE.value] * n,
            schema.REJECT_DETAIL: [error] * n,
        },
        schema=schema.NORMALIZED_SCHEMA,
    )


def read_partition(
    partition: Partition, batch_rows: int = 512, split: str = "train"
) -> Iterator[pa.Table]:
    """Stream one partition as normalised batches (NORMALIZED_SCHEMA), exactly ``row_count`` rows.

    A file that breaks mid-read (a corrupt Parquet page, an I/O error) yields its remaining rows
    as ``unreadable_source`` rejects, so the partition still accounts for every planned row.
    """
    next_index = partition.row_start
    end = partition.row_start + partition.row_count
    try:
        for rows in iter_raw_rows(partition, batch_rows, split):
            rows = [row for row in rows if row[0] < end]
            if rows:
                yield normalize_batch(partition, rows)
                next_index = rows[-1][0] + 1
    except (OSError, pa.ArrowException, InputError, ValueError) as e:
        logger.warning(
            "%s: read failed at row %d (%s)", storage.without_query(partition.source), next_index, e
        )
        error = f"{type(e).__name__}: {e}"
    else:
        if next_index == end:
            return
        error = f"the source ended at row {next_index}, {end - next_index} rows short of its plan"
    yield unreadable_rows(partition, next_index, error)


def read_source(
    source: Source, fmt: str = "auto", batch_rows: int = 512, split: str = "train"
) -> Iterator[pa.Table]:
    """Stream one whole source as normalised batches (NORMALIZED_SCHEMA). Raises InputError."""
    resolved = detect_source_format(source, split) if fmt == "auto" else fmt
    if resolved is None:
        logger.warning("%s: no row in a known format among the first rows", source.path)
    for partition in plan_source(source, resolved, 0, 1 << 62, split):
        yield from read_partition(partition, batch_rows, split)


def raw_texts(partition: Partition, rows: list[int], split: str = "train") -> dict[int, str]:
    """The original text of some rows of a partition (for reject records made after scoring)."""
    wanted = set(rows)
    found: dict[int, str] = {}
    for batch in iter_raw_rows(partition, 512, split):
        for index, value, raw, _ in batch:
            if index in wanted:
                found[index] = _raw_text(value, raw)
        if len(found) == len(wanted) or batch[-1][0] >= partition.row_start + partition.row_count:
            break
    return found


class ReadPartitions:
    """Stage: a batch of partition descriptors -> their normalised rows (many rows per input row).

    Input column: ``partition``, a ``Partition`` as JSON. Output: NORMALIZED_SCHEMA tables, one per
    partition, rows in source order (the scoring stage relies on whole, ordered partitions).
    """

    def __init__(self, batch_rows: int = 512, split: str = "train"):
        self.batch_rows = batch_rows
        self.split = split

    def __call__(self, partitions: pa.Table) -> Iterator[pa.Table]:
        for item in partitions.to_pylist():
            partition = Partition.from_dict(json.loads(item["partition"]))
            yield pa.concat_tables(list(read_partition(partition, self.batch_rows, self.split)))
