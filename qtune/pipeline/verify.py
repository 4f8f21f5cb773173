"""Verify a published version against its manifest and the output contract (DESIGN section 6).

``verify_version(out, epoch)`` re-reads ``<out>/data/epoch_NNN`` (default: the epoch in LATEST)
and reports every problem it finds, never only the first; a corrupt file becomes a problem, not a
traceback. It checks:

1. Files: every file the manifest lists (shards and the dropped index) exists with the listed
   byte size and sha256; no ``*.parquet`` in ``train/`` is missing from the manifest.
2. Schemas: each shard's Arrow schema is ``SHARD_SCHEMA``, the dropped index's ``DROPPED_SCHEMA``
   (the differing columns are named); no shard has an empty row group; the checked shard columns
   (all but source, ppl, entropy, filled) and the dropped sample ids hold no nulls.
3. Rows, vectorised over list offsets: input_ids, attention_mask, labels and loss_mask have equal
   lengths; ``length == len(input_ids)``; loss_mask is 0/1 and ``== (labels != -100)``;
   ``labels == input_ids`` where the mask is 1; ``num_loss_tokens == sum(loss_mask)``; every kept
   sample has a loss token. Each kind of problem gives its count of rows and up to 5 sample ids.
4. Loss masks (``mask_check``): re-derived from the input rows with the version's tokenizer and
   chat template for a sample of kept rows (all with ``full``); loss on a token that is not the
   assistant's, or response positions that differ, is a problem.
   Token budget, when the epoch's scored cache is present and is the one the version was triaged
   from: a token-pruned sample keeps at most ``max(1, floor(token_ratio * n_response))`` loss
   tokens, any other sample all ``n_response`` of them.
5. Counts: rows and loss tokens per file, kept, dropped, kept loss tokens, kept (and kept loss
   tokens) per quadrant, ``kept + dropped + rejected == input_rows``, rejected against the rejects
   folder when present, ``counts.per_source`` when present; no sample id twice across shards and
   the dropped index.
6. Dataset card: ``<out>/README.md`` has this epoch's config, whose train ``data_files`` pattern
   matches exactly the manifest's shards (and is the default when the epoch is LATEST).

Shards are streamed one batch at a time; only scalar per-row columns (sample id, quadrant,
source, token_pruned, num_loss_tokens) are kept for the cross-file checks.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from qtune import schema, storage
from qtune.pipeline.layout import VERSION_TRAIN, OutputLayout, epoch_name
from qtune.pipeline.mask_check import DEFAULT_SAMPLE, check_masks
from qtune.pipeline.publish import MANIFEST, latest_epoch, read_manifest
from qtune.pipeline.remote_sync import output_layout
from qtune.stages.eu_plane import keep_count
from qtune.stages.shards import file_sha256
from qtune.stages.token_prune import end_of_turn_positions

CARD = "README.md"
MAX_IDS = 5  # sample ids named per kind of problem
READ_BATCH_ROWS = 4096
_READ_ERRORS = (pa.ArrowException, OSError)

# Columns a shard row check reads (ppl, entropy, filled are only schema-checked).
_ROW_COLUMNS = [
    schema.SAMPLE_ID,
    schema.INPUT_IDS,
    schema.ATTENTION_MASK,
    schema.LABELS,
    schema.LOSS_MASK,
    schema.NUM_LOSS_TOKENS,
    schema.LENGTH,
    schema.QUADRANT,
    schema.TOKEN_PRUNED,
    schema.SOURCE,
]
# Scalar columns kept per kept row for the cross-file checks.
_INDEX_COLUMNS = [
    schema.SAMPLE_ID,
    schema.QUADRANT,
    schema.SOURCE,
    schema.TOKEN_PRUNED,
    schema.NUM_LOSS_TOKENS,
]
_NON_NULL = [c for c in schema.SHARD_SCHEMA.names if c != schema.SOURCE]

# Kinds of row problem, in report order.
LENGTHS_DIFFER = "input_ids, attention_mask, labels and loss_mask lengths differ"
LENGTH_COLUMN = "length != len(input_ids)"
MASK_VALUES = "loss_mask has values other than 0 and 1"
MASK_LABELS = "loss_mask != (labels != -100)"
LABELS_IDS = "labels != input_ids where loss_mask is 1"
NUM_LOSS = "num_loss_tokens != sum(loss_mask)"
NO_LOSS = "kept sample with no loss token (num_loss_tokens < 1)"
ROW_KINDS = [LENGTHS_DIFFER, LENGTH_COLUMN, MASK_VALUES, MASK_LABELS, LABELS_IDS, NUM_LOSS, NO_LOSS]


class VerifyError(ValueError):
    """Nothing to verify: no output directory, no published version, or no readable manifest."""


@dataclass
class VerifyReport:
    version_dir: str
    epoch: int
    problems: list[str] = field(default_factory=list)  # file / sample / count, what and how
    checks: dict[str, int] = field(default_factory=dict)  # what was checked, for a summary
    notes: list[str] = field(default_factory=list)  # checks skipped and why (not problems)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: verdict and what was checked."""
        checked = ", ".join(f"{k} {v:,}" for k, v in self.checks.items())
        verdict = "ok" if self.ok else f"{len(self.problems)} problem(s)"
        return f"{epoch_name(self.epoch)}: {verdict} ({checked})"

    def _count(self, key: str, n: int = 1) -> None:
        self.checks[key] = self.checks.get(key, 0) + int(n)


def verify_version(
    output_dir: str | Path, epoch: int | None = None, full: bool = False
) -> VerifyReport:
    """Check one published version (default: LATEST's) and return every problem found.

    Loss masks are re-derived from the input for a sample of kept rows (``full``: every one).

    Raises ``VerifyError`` when there is nothing to verify (no such directory, no published
    version, a missing or unreadable manifest); every other defect is a problem in the report.
    """
    layout = output_layout(output_dir)
    if not layout.root.is_dir():
        raise VerifyError(f"{layout.name}: no such output directory")
    if epoch is None:
        epoch = latest_epoch(layout)
        if epoch is None:
            raise VerifyError(
                f"{layout.name}: no published version (no LATEST, no data/epoch_*/{MANIFEST})"
            )
    version = layout.data_dir(epoch)
    if not (version / MANIFEST).is_file():
        raise VerifyError(f"{version / MANIFEST}: missing; {epoch_name(epoch)} is not published")
    try:
        manifest = read_manifest(layout, epoch)
    except (OSError, ValueError) as e:
        raise VerifyError(f"{version / MANIFEST}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise VerifyError(f"{version / MANIFEST}: not a JSON object")

    shown = storage.without_query(layout.remote_location(version)) if layout.remote else version
    report = VerifyReport(version_dir=str(shown), epoch=epoch)
    if manifest.get("epoch", epoch) != epoch:
        report.problems.append(
            f"{MANIFEST}: epoch is {manifest['epoch']!r}, the directory is {epoch_name(epoch)}"
        )
    files = _manifest_files(manifest, report)
    dropped_entry = manifest.get("dropped_index")
    if not isinstance(dropped_entry, dict) or not isinstance(dropped_entry.get("path"), str):
        report.problems.append(f"{MANIFEST}: no dropped_index entry with a path")
        dropped_entry = None

    _check_files(version, files, dropped_entry, report)
    kept_index, shard_totals = _check_shards(version, files, report)
    dropped = _check_dropped(version, dropped_entry, report)
    _check_token_budget(layout, epoch, manifest, kept_index, report)
    _check_masks(layout, epoch, manifest, files, kept_index, full, report)
    _check_counts(layout, epoch, manifest, kept_index, shard_totals, dropped, report)
    _check_card(layout, epoch, [version / f["path"] for f in files], report)
    return report


# --- 1. files ------------------------------------------------------------------------------------
def _manifest_files(manifest: dict[str, Any], report: VerifyReport) -> list[dict[str, Any]]:
    entries = manifest.get("files")
    if not isinstance(entries, list):
        report.problems.append(f"{MANIFEST}: no 'files' list")
        return []
    files = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            report.problems.append(f"{MANIFEST}: files[{i}] has no path")
            continue
        missing = [k for k in ("rows", "loss_tokens", "bytes", "sha256") if k not in entry]
        if missing:
            report.problems.append(f"{MANIFEST}: files[{i}] ({entry['path']}) lacks {missing}")
        files.append(entry)
    return files


def _check_file(version: Path, entry: dict[str, Any], report: VerifyReport) -> None:
    rel = entry["path"]
    path = version / rel
    if not path.is_file():
        report.problems.append(f"{rel}: listed in the manifest but missing")
        return
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        report.problems.append(f"{rel}: {size:,} bytes, the manifest lists {_n(entry['bytes'])}")
    if "sha256" in entry:
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            report.problems.append(
                f"{rel}: sha256 {digest[:16]}… differs from the manifest's "
                f"{str(entry['sha256'])[:16]}…"
            )
    report._count("files_hashed")
    report._count("bytes", size)


def _check_files(
    version: Path,
    files: list[dict[str, Any]],
    dropped_entry: dict[str, Any] | None,
    report: VerifyReport,
) -> None:
    for entry in files:
        _check_file(version, entry, report)
    if dropped_entry is not None:
        _check_file(version, dropped_entry, report)
    listed = {(version / f["path"]).resolve() for f in files}
    train = version / VERSION_TRAIN
    extra = sorted(
        p.relative_to(version).as_posix()
        for p in (train.rglob("*.parquet") if train.is_dir() else [])
        if p.resolve() not in listed
    )
    for rel in extra:
        report.problems.append(
            f"{rel}: Parquet file in {VERSION_TRAIN}/ not listed in the manifest"
        )


# --- 2 and 3. shard schemas and rows --------------------------------------------------------------
def _schema_diff(found: pa.Schema, expected: pa.Schema) -> str | None:
    """Differing columns of ``found`` against ``expected`` in words, or None when equal."""
    if found.equals(expected, check_metadata=False):
        return None
    parts = []
    missing = [n for n in expected.names if n not in found.names]
    extra = [n for n in found.names if n not in expected.names]
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    if extra:
        parts.append(f"unexpected {', '.join(extra)}")
    for f in expected:
        if f.name in found.names:
            got = found.field(f.name)
            if got.type != f.type:
                parts.append(f"{f.name} is {got.type}, expected {f.type}")
    common = [n for n in found.names if n in expected.names]
    if not parts and common != [n for n in expected.names if n in found.names]:
        parts.append(f"column order {found.names}, expected {expected.names}")
    return "; ".join(parts) or "differs (field nullability or metadata)"


class _RowProblems:
    """Count of bad rows and the first sample ids per kind of row problem, for one file."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.ids: dict[str, list[str]] = {}

    def add(self, kind: str, bad: np.ndarray, sample_ids: pa.Array) -> None:
        rows = np.flatnonzero(bad)
        if not len(rows):
            return
        self.count[kind] += len(rows)
        named = self.ids.setdefault(kind, [])
        if len(named) < MAX_IDS:
            named += sample_ids.take(pa.array(rows[: MAX_IDS - len(named)])).to_pylist()

    def report(self, rel: str, report: VerifyReport) -> None:
        for kind in ROW_KINDS:
            if self.count[kind]:
                ids = ", ".join(str(i) for i in self.ids[kind])
                more = ", …" if self.count[kind] > len(self.ids[kind]) else ""
                report.problems.append(f"{rel}: {self.count[kind]} row(s) with {kind}: {ids}{more}")


def _row_sums(offsets: np.ndarray, values: np.ndarray) -> np.ndarray:
    cumulative = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return cumulative[offsets[1:]] - cumulative[offsets[:-1]]


def _check_rows(batch: pa.Table, problems: _RowProblems) -> None:
    """Row invariants of one batch of shard rows, vectorised over the flat token arrays."""
    ids = batch.column(schema.SAMPLE_ID).combine_chunks()
    off_ids, input_ids = schema.list_offsets_and_values(batch.column(schema.INPUT_IDS))
    off_att, _ = schema.list_offsets_and_values(batch.column(schema.ATTENTION_MASK))
    off_lab, labels = schema.list_offsets_and_values(batch.column(schema.LABELS))
    off_msk, mask = schema.list_offsets_and_values(batch.column(schema.LOSS_MASK))
    n_ids, n_att, n_lab, n_msk = (np.diff(o) for o in (off_ids, off_att, off_lab, off_msk))
    problems.add(LENGTHS_DIFFER, (n_ids != n_att) | (n_ids != n_lab) | (n_ids != n_msk), ids)
    length = pc.fill_null(batch.column(schema.LENGTH), -1).to_numpy()
    problems.add(LENGTH_COLUMN, length != n_ids, ids)

    mask = mask.astype(np.int64)
    row_of_mask = np.repeat(np.arange(batch.num_rows), n_msk)
    odd = (mask != 0) & (mask != 1)
    problems.add(MASK_VALUES, np.bincount(row_of_mask[odd], minlength=batch.num_rows) > 0, ids)

    # Token-wise comparisons on the rows whose ids, labels and mask line up.
    aligned = (n_ids == n_lab) & (n_ids == n_msk)
    if not aligned.all():
        input_ids = input_ids[np.repeat(aligned, n_ids)]
        labels = labels[np.repeat(aligned, n_lab)]
        aligned_mask = mask[np.repeat(aligned, n_msk)]
    else:
        aligned_mask = mask
    row_of = np.repeat(np.flatnonzero(aligned), n_ids[aligned])
    has_label = labels != schema.IGNORE_INDEX
    mismatch = (aligned_mask != 0) != has_label
    problems.add(MASK_LABELS, np.bincount(row_of[mismatch], minlength=batch.num_rows) > 0, ids)
    wrong = (aligned_mask != 0) & has_label & (labels != input_ids)
    problems.add(LABELS_IDS, np.bincount(row_of[wrong], minlength=batch.num_rows) > 0, ids)

    mask_sum = _row_sums(off_msk, mask)
    num_loss = pc.fill_null(batch.column(schema.NUM_LOSS_TOKENS), -1).to_numpy()
    problems.add(NUM_LOSS, num_loss != mask_sum, ids)
    problems.add(NO_LOSS, (num_loss < 1) | (mask_sum < 1), ids)


def _check_shards(
    version: Path, files: list[dict[str, Any]], report: VerifyReport
) -> tuple[pa.Table, dict[str, int]]:
    """Stream every shard: schema and row checks, per-file counts against the manifest.

    Returns the scalar index of all readable kept rows and totals (``unreadable`` shards).
    """
    index_schema = pa.schema([schema.SHARD_SCHEMA.field(c) for c in _INDEX_COLUMNS])
    index_parts: list[pa.Table] = []
    totals = {"unreadable": 0}
    for entry in files:
        rel = entry["path"]
        path = version / rel
        if not path.is_file():
            totals["unreadable"] += 1
            continue  # already reported as missing
        try:
            shard = pq.ParquetFile(path)
            diff = _schema_diff(shard.schema_arrow, schema.SHARD_SCHEMA)
            if diff:
                report.problems.append(f"{rel}: schema is not SHARD_SCHEMA: {diff}")
            empty = [
                i for i in range(shard.num_row_groups) if not shard.metadata.row_group(i).num_rows
            ]
            if not shard.num_row_groups:
                report.problems.append(f"{rel}: no row group (an empty file; loaders fail on it)")
            elif empty:
                report.problems.append(f"{rel}: empty row group(s) {empty} (loaders fail on them)")
            present = shard.schema_arrow.names
            missing = [c for c in _ROW_COLUMNS if c != schema.SOURCE and c not in present]
            if missing:
                report.problems.append(f"{rel}: row checks skipped, missing {', '.join(missing)}")
                totals["unreadable"] += 1
                continue
            columns = [c for c in _ROW_COLUMNS if c in present]
            problems = _RowProblems()
            nulls: Counter[str] = Counter()
            rows = loss_tokens = tokens = 0
            parts: list[pa.Table] = []  # joins the index only once the whole file has been read
            for record_batch in shard.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
                batch = pa.Table.from_batches([record_batch])
                for c in columns:
                    if c in _NON_NULL:
                        nulls[c] += batch.column(c).null_count
                _check_rows(batch, problems)
                rows += batch.num_rows
                loss_tokens += int(pc.sum(batch.column(schema.NUM_LOSS_TOKENS)).as_py() or 0)
                lengths = pc.list_value_length(batch.column(schema.INPUT_IDS))
                tokens += int(pc.sum(lengths).as_py() or 0)
                if schema.SOURCE not in columns:
                    batch = batch.append_column(
                        schema.SOURCE, pa.nulls(batch.num_rows, pa.string())
                    )
                parts.append(batch.select(_INDEX_COLUMNS).cast(index_schema, safe=False))
        except _READ_ERRORS as e:
            report.problems.append(f"{rel}: unreadable Parquet ({type(e).__name__}: {e})")
            totals["unreadable"] += 1
            continue
        index_parts += parts
        for c, n in nulls.items():
            if n:
                report.problems.append(f"{rel}: {n} null value(s) in {c}")
        problems.report(rel, report)
        if "rows" in entry and rows != entry["rows"]:
            report.problems.append(f"{rel}: {rows:,} rows, the manifest lists {_n(entry['rows'])}")
        if "loss_tokens" in entry and loss_tokens != entry["loss_tokens"]:
            report.problems.append(
                f"{rel}: {loss_tokens:,} loss tokens, the manifest lists {_n(entry['loss_tokens'])}"
            )
        report._count("shards")
        report._count("rows", rows)
        report._count("tokens", tokens)
        report._count("loss_tokens", loss_tokens)
    kept = pa.concat_tables(index_parts) if index_parts else index_schema.empty_table()
    return kept, totals


def _check_dropped(
    version: Path, entry: dict[str, Any] | None, report: VerifyReport
) -> pa.Table | None:
    """Schema and rows of the dropped index; its sample_id and source columns (None: unread)."""
    if entry is None or not (version / entry["path"]).is_file():
        return None
    rel = entry["path"]
    try:
        index = pq.ParquetFile(version / rel)
        diff = _schema_diff(index.schema_arrow, schema.DROPPED_SCHEMA)
        if diff:
            report.problems.append(f"{rel}: schema is not DROPPED_SCHEMA: {diff}")
        columns = [c for c in (schema.SAMPLE_ID, schema.SOURCE) if c in index.schema_arrow.names]
        table = index.read(columns=columns)
    except _READ_ERRORS as e:
        report.problems.append(f"{rel}: unreadable Parquet ({type(e).__name__}: {e})")
        return None
    if schema.SAMPLE_ID not in columns:
        return None
    if table.column(schema.SAMPLE_ID).null_count:
        nulls = table.column(schema.SAMPLE_ID).null_count
        report.problems.append(f"{rel}: {nulls} null value(s) in sample_id")
    if "rows" in entry and table.num_rows != entry["rows"]:
        report.problems.append(
            f"{rel}: {table.num_rows:,} rows, the manifest lists {_n(entry['rows'])}"
        )
    report._count("dropped_rows", table.num_rows)
    if schema.SOURCE not in columns:
        table = table.append_column(schema.SOURCE, pa.nulls(table.num_rows, pa.string()))
    return table


# --- 4. token budget ------------------------------------------------------------------------------
_END_OF_TURN_TOKENS = "end_of_turn_tokens"
_COUNTS_SCHEMA = pa.schema(
    [
        pa.field(schema.SAMPLE_ID, pa.string()),
        pa.field(schema.N_RESPONSE_TOKENS, pa.int32()),
        pa.field(_END_OF_TURN_TOKENS, pa.int64()),
    ]
)


def _response_counts(path: Path, guarded: bool) -> pa.Table:
    """sample_id, n_response_tokens and, under the end-of-turn guard, each sample's end-of-turn
    token count (0 without it), read from one scored-cache file a batch at a time."""
    columns = [schema.SAMPLE_ID, schema.N_RESPONSE_TOKENS, schema.LOSS_MASK, schema.TRUNCATED]
    parts = []
    for batch in pq.ParquetFile(path).iter_batches(columns=columns):
        n_rows = batch.num_rows
        ends = np.zeros(n_rows, dtype=np.int64)
        if guarded:
            offsets, mask = schema.list_offsets_and_values(batch.column(schema.LOSS_MASK))
            truncated = batch.column(schema.TRUNCATED).to_numpy(zero_copy_only=False)
            flags = end_of_turn_positions(offsets, mask, truncated)
            row_of = np.repeat(np.arange(n_rows), np.diff(offsets))
            ends = np.bincount(row_of[flags], minlength=n_rows)
        parts.append(
            pa.table(
                [batch.column(schema.SAMPLE_ID), batch.column(schema.N_RESPONSE_TOKENS), ends],
                schema=_COUNTS_SCHEMA,
            )
        )
    return pa.concat_tables(parts) if parts else _COUNTS_SCHEMA.empty_table()


def _check_token_budget(
    layout: OutputLayout,
    epoch: int,
    manifest: dict[str, Any],
    kept: pa.Table,
    report: VerifyReport,
) -> None:
    scores = layout.scores_dir(epoch)
    cache_files = sorted(scores.glob("*.parquet")) if scores.is_dir() else []
    where = scores.relative_to(layout.root).as_posix()
    if not cache_files:
        report.notes.append(f"token budget not checked: no scored cache in {where}")
        return
    summary_path = layout.score_summary(epoch)
    recorded = (manifest.get("scores") or {}).get("summary")
    if recorded is not None and summary_path.is_file():
        try:
            current = json.loads(summary_path.read_text())
        except ValueError:
            current = None
        if current != recorded:
            report.notes.append(
                f"token budget not checked: the scored cache in {where} is not the one this "
                f"version was triaged from (its {summary_path.name} differs from the manifest's)"
            )
            return
    ratio = (manifest.get("qtuning") or {}).get("token_ratio")
    if not isinstance(ratio, int | float):
        report.problems.append(f"{MANIFEST}: no qtuning.token_ratio; token budget not checked")
        return
    qtuning = manifest.get("qtuning") or {}
    guarded = bool(qtuning.get("keep_end_of_turn"))  # absent: a version from before the guards
    parts = []
    for path in cache_files:
        try:
            parts.append(_response_counts(path, guarded))
        except _READ_ERRORS as e:
            rel = path.relative_to(layout.root).as_posix()
            report.problems.append(
                f"{rel}: unreadable scored cache ({type(e).__name__}: {e}); "
                "token budget not checked"
            )
            return
    cache = pa.concat_tables(parts)
    joined = kept.select([schema.SAMPLE_ID, schema.TOKEN_PRUNED, schema.NUM_LOSS_TOKENS]).join(
        cache, keys=schema.SAMPLE_ID, join_type="left outer"
    )
    ids = joined.column(schema.SAMPLE_ID).combine_chunks()
    n_response = joined.column(schema.N_RESPONSE_TOKENS)
    unknown = n_response.is_null().to_numpy(zero_copy_only=False)
    if unknown.any():
        names = ", ".join(ids.filter(pa.array(unknown)).to_pylist()[:MAX_IDS])
        report.problems.append(
            f"{int(unknown.sum())} kept sample(s) not in the scored cache {where}: {names}"
        )
    n_response = pc.fill_null(n_response, 0).to_numpy().astype(np.int64)
    n_end = pc.fill_null(joined.column(_END_OF_TURN_TOKENS), 0).to_numpy().astype(np.int64)
    num_loss = pc.fill_null(joined.column(schema.NUM_LOSS_TOKENS), 0).to_numpy()
    pruned = pc.fill_null(joined.column(schema.TOKEN_PRUNED), False).to_numpy(zero_copy_only=False)
    prunable = n_response - n_end
    budget = keep_count(float(ratio), prunable) + n_end
    over = ~unknown & pruned & (num_loss > budget)
    if over.any():
        rows = np.flatnonzero(over)[:MAX_IDS]
        named = ", ".join(
            f"{ids[int(i)].as_py()} ({num_loss[i]} > {budget[i]} of {n_response[i]})" for i in rows
        )
        rule = f"max(1, floor({ratio} * n_response))"
        if guarded:
            rule = f"max(1, floor({ratio} * prunable)) + end-of-turn tokens"
        report.problems.append(
            f"{int(over.sum())} token-pruned sample(s) over the token budget {rule}: {named}"
        )
    minimum = qtuning.get("min_prunable_tokens")
    if isinstance(minimum, int):
        too_short = ~unknown & pruned & (prunable < minimum)
        if too_short.any():
            rows = np.flatnonzero(too_short)[:MAX_IDS]
            named = ", ".join(f"{ids[int(i)].as_py()} ({prunable[i]})" for i in rows)
            report.problems.append(
                f"{int(too_short.sum())} token-pruned sample(s) with fewer prunable tokens than "
                f"qtuning.min_prunable_tokens ({minimum}): {named}"
            )
    short = ~unknown & ~pruned & (num_loss != n_response)
    if short.any():
        rows = np.flatnonzero(short)[:MAX_IDS]
        named = ", ".join(f"{ids[int(i)].as_py()} ({num_loss[i]} of {n_response[i]})" for i in rows)
        report.problems.append(
            f"{int(short.sum())} sample(s) not token-pruned whose num_loss_tokens != "
            f"n_response_tokens: {named}"
        )
    report._count("budget_rows", int((~unknown).sum()))


def _check_masks(
    layout: OutputLayout,
    epoch: int,
    manifest: dict[str, Any],
    files: list[dict[str, Any]],
    kept: pa.Table,
    full: bool,
    report: VerifyReport,
) -> None:
    version = layout.data_dir(epoch)
    result = check_masks(
        layout,
        epoch,
        manifest,
        [version / f["path"] for f in files],
        kept.column(schema.SAMPLE_ID).to_pylist(),
        None if full else DEFAULT_SAMPLE,
    )
    report.problems += result.problems
    report.notes += result.notes
    if result.rows:
        report._count("masks_rederived", result.rows)


# --- 5. counts ------------------------------------------------------------------------------------
def _value_counts(column: pa.ChunkedArray | pa.Array) -> dict[Any, int]:
    counts = pc.value_counts(column)
    return dict(
        zip(
            counts.field("values").to_pylist(),
            counts.field("counts").to_pylist(),
            strict=True,
        )
    )


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else repr(value)


def _compare(
    report: VerifyReport, what: str, recorded: Any, found: int, where: str, note: str = ""
) -> None:
    if recorded is None:
        report.problems.append(f"{MANIFEST}: no {what}")
    elif recorded != found:
        report.problems.append(f"{MANIFEST}: {what} is {_n(recorded)} but {where} {found:,}{note}")


def _rejects(
    layout: OutputLayout, epoch: int, report: VerifyReport
) -> tuple[int, dict[Any, int]] | None:
    """Rows and rows per source in the epoch's rejects folder; None when absent or unreadable."""
    folder = layout.rejects_dir(epoch)
    if not folder.is_dir():
        report.notes.append(
            f"rejected rows not counted: no {folder.relative_to(layout.root).as_posix()}"
        )
        return None
    rows, per_source = 0, Counter()
    for path in sorted(folder.glob("*.parquet")):
        try:
            table = pq.read_table(path, columns=[schema.SOURCE])
        except _READ_ERRORS as e:
            rel = path.relative_to(layout.root).as_posix()
            report.problems.append(f"{rel}: unreadable Parquet ({type(e).__name__}: {e})")
            return None
        rows += table.num_rows
        per_source.update(_value_counts(table.column(schema.SOURCE)))
    report._count("rejected_rows", rows)
    return rows, dict(per_source)


def _check_counts(
    layout: OutputLayout,
    epoch: int,
    manifest: dict[str, Any],
    kept: pa.Table,
    shard_totals: dict[str, int],
    dropped: pa.Table | None,
    report: VerifyReport,
) -> None:
    counts = manifest.get("counts")
    if not isinstance(counts, dict):
        report.problems.append(f"{MANIFEST}: no counts")
        counts = {}
    skipped = shard_totals["unreadable"]
    partial = f" (without {skipped} missing or unreadable shard(s))" if skipped else ""
    _compare(report, "counts.kept", counts.get("kept"), kept.num_rows, "the shards hold", partial)
    kept_loss = int(pc.sum(kept.column(schema.NUM_LOSS_TOKENS)).as_py() or 0)
    _compare(
        report,
        "counts.kept_loss_tokens",
        counts.get("kept_loss_tokens"),
        kept_loss,
        "the shards' num_loss_tokens sum to",
        partial,
    )
    if dropped is not None:
        _compare(
            report,
            "counts.dropped",
            counts.get("dropped"),
            dropped.num_rows,
            "the dropped index holds",
        )
    parts = [counts.get(k) for k in ("kept", "dropped", "rejected", "input_rows")]
    if all(isinstance(p, int) for p in parts) and parts[0] + parts[1] + parts[2] != parts[3]:
        report.problems.append(
            f"{MANIFEST}: counts.kept {parts[0]:,} + dropped {parts[1]:,} + rejected "
            f"{parts[2]:,} != input_rows {parts[3]:,}"
        )
    rejects = _rejects(layout, epoch, report)
    if rejects is not None:
        _compare(
            report,
            "counts.rejected",
            counts.get("rejected"),
            rejects[0],
            "the rejects folder holds",
        )

    quadrants = manifest.get("quadrants")
    if isinstance(quadrants, dict):
        by_quadrant = _value_counts(kept.column(schema.QUADRANT))
        loss_by_quadrant = dict(
            (r[schema.QUADRANT], r[f"{schema.NUM_LOSS_TOKENS}_sum"])
            for r in kept.group_by(schema.QUADRANT)
            .aggregate([(schema.NUM_LOSS_TOKENS, "sum")])
            .to_pylist()
        )
        for q in sorted(set(quadrants) | {q for q in by_quadrant if q is not None}):
            entry = quadrants.get(q) or {}
            _compare(
                report,
                f"quadrants.{q}.kept",
                entry.get("kept"),
                by_quadrant.get(q, 0),
                "the shards hold",
                partial,
            )
            if "kept_loss_tokens" in entry:
                _compare(
                    report,
                    f"quadrants.{q}.kept_loss_tokens",
                    entry["kept_loss_tokens"],
                    int(loss_by_quadrant.get(q) or 0),
                    f"the shards' {q} rows sum to",
                    partial,
                )
    else:
        report.problems.append(f"{MANIFEST}: no quadrants table")

    ids = [kept.column(schema.SAMPLE_ID)]
    if dropped is not None:
        ids.append(dropped.column(schema.SAMPLE_ID))
    all_ids = pa.chunked_array(
        [c.cast(pa.string()) for col in ids for c in col.chunks], pa.string()
    )
    counted = pc.value_counts(all_ids)
    twice = counted.filter(pc.greater(counted.field("counts"), 1))
    if len(twice):
        names = ", ".join(str(v) for v in twice.field("values").to_pylist()[:MAX_IDS])
        report.problems.append(
            f"{len(twice)} sample_id(s) appear more than once across shards and dropped index: "
            f"{names}"
        )
    report._count("sample_ids", len(all_ids))

    per_source = counts.get("per_source")
    if per_source is not None:
        _check_per_source(per_source, counts, kept, dropped, rejects, report)


def _check_per_source(
    per_source: Any,
    counts: dict[str, Any],
    kept: pa.Table,
    dropped: pa.Table | None,
    rejects: tuple[int, dict[Any, int]] | None,
    report: VerifyReport,
) -> None:
    if not isinstance(per_source, dict):
        report.problems.append(f"{MANIFEST}: counts.per_source is not a mapping")
        return
    found = {
        "kept": (_value_counts(kept.column(schema.SOURCE)), "the shards hold"),
        "dropped": (
            _value_counts(dropped.column(schema.SOURCE)) if dropped is not None else None,
            "the dropped index holds",
        ),
        "rejected": (rejects[1] if rejects is not None else None, "the rejects folder holds"),
    }
    keys = ("input_rows", "kept", "dropped", "rejected")
    totals = dict.fromkeys(keys, 0)
    for source, entry in sorted(per_source.items()):
        label = f"counts.per_source[{source!r}]"
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), int) for k in keys):
            report.problems.append(f"{MANIFEST}: {label} lacks integer {', '.join(keys)}")
            continue
        for k in keys:
            totals[k] += entry[k]
        if entry["kept"] + entry["dropped"] + entry["rejected"] != entry["input_rows"]:
            report.problems.append(
                f"{MANIFEST}: {label} kept {entry['kept']:,} + dropped {entry['dropped']:,} + "
                f"rejected {entry['rejected']:,} != input_rows {entry['input_rows']:,}"
            )
        for k, (by_source, where) in found.items():
            if by_source is not None:
                _compare(report, f"{label}.{k}", entry[k], by_source.get(source, 0), where)
    for k, (by_source, where) in found.items():
        for source in sorted(s for s in (by_source or {}) if s not in per_source):
            report.problems.append(
                f"{MANIFEST}: counts.per_source lacks source {source!r}, of which {where} "
                f"{by_source[source]:,} {k} row(s)"
            )
    for k in keys:
        if isinstance(counts.get(k), int) and totals[k] != counts[k]:
            report.problems.append(
                f"{MANIFEST}: counts.per_source {k} sum to {totals[k]:,}, counts.{k} is "
                f"{counts[k]:,}"
            )
    report._count("sources", len(per_source))


# --- 6. dataset card ------------------------------------------------------------------------------
def _train_patterns(data_files: Any) -> list[str]:
    """The train split's patterns from a card config's ``data_files`` (any of its YAML forms)."""
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        value = data_files.get("train")
        return [value] if isinstance(value, str) else list(value or [])
    patterns: list[str] = []
    for item in data_files if isinstance(data_files, list) else []:
        if isinstance(item, str):
            patterns.append(item)
        elif isinstance(item, dict) and item.get("split", "train") == "train":
            path = item.get("path")
            patterns += [path] if isinstance(path, str) else list(path or [])
    return patterns


def _matches(pattern: str, rel: str) -> bool:
    """Glob match as ``datasets`` resolves it: ``*`` never crosses a ``/``."""
    want, have = PurePosixPath(pattern).parts, PurePosixPath(rel).parts
    return len(want) == len(have) and all(
        fnmatchcase(h, w) for h, w in zip(have, want, strict=True)
    )


def _check_card(
    layout: OutputLayout, epoch: int, shard_paths: list[Path], report: VerifyReport
) -> None:
    card = layout.root / CARD
    name = epoch_name(epoch)
    if not card.is_file():
        report.problems.append(f"{CARD}: missing (datasets.load_dataset cannot find {name})")
        return
    text = card.read_text()
    lines = text.splitlines()
    try:
        end = lines.index("---", 1) if lines and lines[0] == "---" else -1
    except ValueError:
        end = -1
    if end < 0:
        report.problems.append(f"{CARD}: no YAML front matter between '---' lines")
        return
    try:
        front = yaml.safe_load("\n".join(lines[1:end])) or {}
    except yaml.YAMLError as e:
        report.problems.append(f"{CARD}: front matter is not valid YAML ({e})")
        return
    configs = front.get("configs") if isinstance(front, dict) else None
    config = next(
        (c for c in configs or [] if isinstance(c, dict) and c.get("config_name") == name), None
    )
    if config is None:
        report.problems.append(f"{CARD}: no config {name!r} in its configs")
        return
    patterns = _train_patterns(config.get("data_files"))
    if not patterns:
        report.problems.append(f"{CARD}: config {name!r} has no train data_files pattern")
        return
    listed = {p.relative_to(layout.root).as_posix() for p in shard_paths}
    unmatched = sorted(r for r in listed if not any(_matches(p, r) for p in patterns))
    if unmatched:
        report.problems.append(
            f"{CARD}: config {name!r} pattern(s) {patterns} do not match manifest shard(s) "
            f"{', '.join(unmatched)}"
        )
    on_disk = {
        m.relative_to(layout.root).as_posix()
        for p in patterns
        for m in layout.root.glob(p)
        if m.is_file()
    }
    extra = sorted(on_disk - listed)
    if extra:
        report.problems.append(
            f"{CARD}: config {name!r} pattern(s) {patterns} also match file(s) not in the "
            f"manifest: {', '.join(extra)}"
        )
    if latest_epoch(layout) == epoch and not config.get("default"):
        report.problems.append(f"{CARD}: {name} is LATEST but its config is not the default")
    report._count("card_configs")
