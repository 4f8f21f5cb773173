"""Re-derive loss masks from the input, the tokenizer and the chat template (``qtune verify``).

The other checks of ``verify`` hold a version to its own manifest; this one holds it to what the
loss *should* cover. For a sample of kept rows (every kept row with ``--full``), each input row is
read again, normalised and tokenised with the version's tokenizer and chat template exactly as
scoring did, and compared with what was published:

- the scored cache's ``input_ids`` and ``loss_mask`` (the unpruned response positions triage
  started from) equal the re-derived ones;
- the shard's ``input_ids`` equal them, and its ``loss_mask`` lies inside the re-derived mask
  (token pruning only removes positions), equal to it for a sample that was not token-pruned.

A mask moved onto the prompt, a shifted span, or a row the current code would reject is a problem.
When the input, the tokenizer or the scored cache is not available, the check is skipped with a
note that says why.

Streaming: the scored cache is read one part (one input partition) at a time, the input only in
the partitions that hold sampled rows, and the shards batch by batch; between the two passes each
checked row keeps a digest of its ids and its mask as bits (about an eighth of a byte a token).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qtune import schema, storage
from qtune.pipeline.layout import OutputLayout
from qtune.stages import ingest
from qtune.stages.tokenize import Tokenize, TokenizerSetupError, resolve_chat_template

DEFAULT_SAMPLE = 256  # kept rows re-derived without --full
_CACHE_COLUMNS = [
    schema.SAMPLE_ID,
    schema.SOURCE,
    schema.ROW_INDEX,
    schema.FORMAT,
    schema.INPUT_IDS,
    schema.LOSS_MASK,
]
_SHARD_COLUMNS = [schema.SAMPLE_ID, schema.INPUT_IDS, schema.LOSS_MASK, schema.TOKEN_PRUNED]
_MAX_NAMED = 5
_READ_ROWS = 4096


def sample_ids(kept_ids: list[str], size: int | None) -> set[str]:
    """A deterministic sample of ``size`` ids (all with None): the smallest id hashes."""
    if size is None or size >= len(kept_ids):
        return set(kept_ids)
    ranked = sorted(kept_ids, key=lambda i: hashlib.blake2b(i.encode(), digest_size=8).digest())
    return set(ranked[:size])


@dataclass
class MaskCheck:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows: int = 0  # rows whose mask was re-derived


class _Problems:
    def __init__(self) -> None:
        self.ids: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, sample_id: str, detail: str = "") -> None:
        self.ids[kind].append(f"{sample_id}{f' ({detail})' if detail else ''}")

    def lines(self) -> list[str]:
        out = []
        for kind, named in self.ids.items():
            more = ", …" if len(named) > _MAX_NAMED else ""
            out.append(f"{len(named)} sample(s) {kind}: {', '.join(named[:_MAX_NAMED])}{more}")
        return out


def check_masks(
    layout: OutputLayout,
    epoch: int,
    manifest: dict[str, Any],
    shard_paths: list[Path],
    kept_ids: list[str],
    size: int | None = DEFAULT_SAMPLE,
) -> MaskCheck:
    """Re-derive the loss masks of ``size`` kept rows (all with None) and compare."""
    result = MaskCheck()
    config = manifest.get("config") or {}
    tokenize, why = _tokenizer(manifest, config.get("model") or {})
    if tokenize is None:
        result.notes.append(f"loss masks not re-derived: {why}")
        return result
    wanted = sample_ids(kept_ids, size)
    if not wanted:
        return result
    scores = layout.scores_dir(epoch)
    parts = sorted(scores.glob("*.parquet")) if scores.is_dir() else []
    if not parts:
        where = scores.relative_to(layout.root).as_posix()
        result.notes.append(f"loss masks not re-derived: no scored cache in {where}")
        return result
    problems = _Problems()
    reader = _InputReader(config.get("input") or {})
    expected: dict[str, tuple[bytes, np.ndarray, int]] = {}  # id -> (ids digest, mask bits, n)
    keys = pa.array(sorted(wanted), pa.string())
    try:
        for part in parts:
            table = pq.read_table(part, columns=_CACHE_COLUMNS)
            table = table.filter(pc.is_in(table.column(schema.SAMPLE_ID), keys))
            if table.num_rows:
                _check_part(table, tokenize, reader, problems, expected)
    except (ingest.InputError, pa.ArrowException, OSError) as e:
        result.notes.append(f"loss masks not re-derived: {type(e).__name__}: {e}")
        return result
    for source, n in sorted(reader.missing.items()):
        result.notes.append(
            f"loss masks not re-derived for {n} sample(s) of {source}: the input file is not here"
        )
    _check_shards(shard_paths, expected, problems)
    result.problems = problems.lines()
    result.rows = len(expected)
    return result


def _tokenizer(manifest: dict[str, Any], model: dict[str, Any]) -> tuple[Tokenize | None, str]:
    """The Tokenize stage scoring used: the config's model (the base model: a re-score keeps
    its tokenizer), template, max length and over-length policy."""
    candidates = [model.get("path"), (manifest.get("model") or {}).get("path")]
    path = next((c for c in candidates if c and Path(c).is_dir()), None)
    if path is None:
        shown = ", ".join(str(c) for c in candidates if c) or "none recorded"
        return None, f"the model directory is not here ({shown})"
    try:
        template = resolve_chat_template(model.get("chat_template"))
        tokenize = Tokenize(
            str(Path(path).absolute()),
            int(model.get("max_length", 2048)),
            template,
            model.get("overlength", "truncate"),
        )
        tokenize.tokenizer  # noqa: B018 - load now, so a broken tokenizer is a note, not a crash
    except (TokenizerSetupError, ValueError, OSError) as e:
        return None, f"the tokenizer does not load ({e})"
    return tokenize, ""


class _InputReader:
    """Raw input rows by (source, row index), reading only the partitions that hold them."""

    def __init__(self, input_config: dict[str, Any]):
        self.split = input_config.get("split", "train")
        self.partition_rows = int(input_config.get("partition_rows", 4096))
        self.sources = _source_locations(input_config.get("path"))
        self.plans: dict[str, list[ingest.Partition]] = {}
        self.missing: dict[str, int] = defaultdict(int)

    def normalized(self, shown: str, fmt: str | None, rows: set[int]) -> pa.Table | None:
        """NORMALIZED_SCHEMA rows ``rows`` of input file ``shown`` (None: the file is gone)."""
        source = self.sources.get(shown)
        if source is None:
            self.missing[shown] += len(rows)
            return None
        if shown not in self.plans:
            self.plans[shown] = ingest.plan_source(source, fmt, 0, self.partition_rows, self.split)
        tables = []
        for partition in self.plans[shown]:
            inside = {r for r in rows if 0 <= r - partition.row_start < partition.row_count}
            if not inside:
                continue
            picked = [
                row
                for batch in ingest.iter_raw_rows(partition, _READ_ROWS, self.split)
                for row in batch
                if row[0] in inside
            ]
            tables.append(ingest.normalize_batch(partition, picked))
        return pa.concat_tables(tables) if tables else None


def _source_locations(paths: Any) -> dict[str, ingest.Source]:
    """Input files by the name the scored cache records (a URI without its query)."""
    if not paths:
        return {}
    try:
        sources, _already_reported_by_the_run = ingest.discover_inputs(paths)
    except ingest.InputError:
        return {}
    return {storage.without_query(s.path): s for s in sources}


def _check_part(
    cache: pa.Table,
    tokenize: Tokenize,
    reader: _InputReader,
    problems: _Problems,
    expected: dict[str, tuple[bytes, np.ndarray, int]],
) -> None:
    """Re-derive one cache part's sampled rows and compare them with the cache."""
    by_source: dict[str, dict[int, int]] = defaultdict(dict)  # source -> row index -> cache row
    formats: dict[str, str | None] = {}
    columns = [cache.column(c).to_pylist() for c in (schema.SOURCE, schema.ROW_INDEX)]
    for i, (source, row) in enumerate(zip(*columns, strict=True)):
        by_source[source][row] = i
        formats.setdefault(source, cache.column(schema.FORMAT)[i].as_py())
    ids_off, ids = schema.list_offsets_and_values(cache.column(schema.INPUT_IDS))
    mask_off, mask = schema.list_offsets_and_values(cache.column(schema.LOSS_MASK))
    sample_ids = cache.column(schema.SAMPLE_ID).to_pylist()
    for source, rows in by_source.items():
        normalized = reader.normalized(source, formats[source], set(rows))
        if normalized is None:
            continue
        tokenized = tokenize(normalized)
        reasons = tokenized.column(schema.REJECT_REASON).to_pylist()
        details = tokenized.column(schema.REJECT_DETAIL).to_pylist()
        new_off, new_ids = schema.list_offsets_and_values(tokenized.column(schema.INPUT_IDS))
        new_mask_off, new_mask = schema.list_offsets_and_values(tokenized.column(schema.LOSS_MASK))
        for j, row_index in enumerate(tokenized.column(schema.ROW_INDEX).to_pylist()):
            i = rows[row_index]
            sample_id = sample_ids[i]
            if reasons[j] is not None:
                problems.add(
                    "that tokenisation now rejects", sample_id, f"{reasons[j]}: {details[j]}"
                )
                continue
            derived_ids = new_ids[new_off[j] : new_off[j + 1]]
            derived_mask = new_mask[new_mask_off[j] : new_mask_off[j + 1]].astype(bool)
            cached_ids = ids[ids_off[i] : ids_off[i + 1]]
            cached_mask = mask[mask_off[i] : mask_off[i + 1]].astype(bool)
            if not np.array_equal(cached_ids, derived_ids):
                problems.add("whose scored token ids differ from the re-derived ones", sample_id)
            elif not np.array_equal(cached_mask, derived_mask):
                problems.add(
                    "whose scored response positions differ from the re-derived loss mask",
                    sample_id,
                    _positions(cached_mask != derived_mask),
                )
            expected[sample_id] = (
                _digest(derived_ids),
                np.packbits(derived_mask),
                len(derived_mask),
            )


def _check_shards(
    paths: list[Path],
    expected: dict[str, tuple[bytes, np.ndarray, int]],
    problems: _Problems,
) -> None:
    """Stream the shards: each checked row against its re-derived ids and mask."""
    keys = pa.array(sorted(expected), pa.string())
    for path in paths:
        try:
            shard = pq.ParquetFile(path)
            batches = shard.iter_batches(batch_size=_READ_ROWS, columns=_SHARD_COLUMNS)
            for batch in batches:
                table = pa.Table.from_batches([batch])
                table = table.filter(pc.is_in(table.column(schema.SAMPLE_ID), keys))
                _check_shard_rows(table, expected, problems)
        except (pa.ArrowException, OSError):
            continue  # an unreadable shard is reported by the shard checks


def _check_shard_rows(
    table: pa.Table, expected: dict[str, tuple[bytes, np.ndarray, int]], problems: _Problems
) -> None:
    ids_off, ids = schema.list_offsets_and_values(table.column(schema.INPUT_IDS))
    mask_off, mask = schema.list_offsets_and_values(table.column(schema.LOSS_MASK))
    pruned = table.column(schema.TOKEN_PRUNED).to_pylist()
    for i, sample_id in enumerate(table.column(schema.SAMPLE_ID).to_pylist()):
        digest, bits, n = expected[sample_id]
        if _digest(ids[ids_off[i] : ids_off[i + 1]]) != digest:
            problems.add("whose shard input_ids differ from the re-derived ones", sample_id)
            continue
        shard_mask = mask[mask_off[i] : mask_off[i + 1]].astype(bool)
        derived = np.unpackbits(bits, count=n).astype(bool)
        outside = shard_mask & ~derived
        if outside.any():
            problems.add(
                "with loss on tokens that are not the assistant's", sample_id, _positions(outside)
            )
        elif not pruned[i] and not np.array_equal(shard_mask, derived):
            problems.add(
                "not token-pruned whose loss mask misses assistant tokens",
                sample_id,
                _positions(shard_mask != derived),
            )


def _digest(ids: np.ndarray) -> bytes:
    return hashlib.blake2b(
        np.ascontiguousarray(ids, dtype=np.int64).tobytes(), digest_size=16
    ).digest()


def _positions(bad: np.ndarray) -> str:
    where = np.flatnonzero(bad)
    shown = ", ".join(map(str, where[:8])) + (", …" if len(where) > 8 else "")
    return f"positions {shown}"
