"""Look at single samples of a published version: scores, decision, and which tokens were pruned.

``find_samples(out, epoch, sample_ids=… | quadrant=…, limit=…)`` returns :class:`SampleView`s
(``qtune.stages.report``) and ``render_sample(view)`` a rich renderable for the terminal.

The reader here is shared with the report (``report_job``): :func:`open_version` builds one
per-sample index of a version — every scored sample, kept (a shard row) or dropped (a row of
``dropped.parquet``), joined with the per-sample columns of the epoch's scored cache — from
scalar column reads only. :func:`sample_views` then reads the per-token arrays of just the
requested samples (the row groups that hold them): the scored cache's ``input_ids``,
``loss_mask`` (response positions before pruning), ``token_logprob`` and ``token_entropy``, and the
shard's ``loss_mask`` (after pruning).

The scored cache is looked for in ``<out>/scores/epoch_NNN`` and then at the manifest's
``scores.dir`` (a version published with ``triage --out`` has no cache of its own). Without it
(removed, or re-scored with another model since) samples still list with their scores and
decision, but without tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import RenderableType
from rich.text import Text

from qtune import schema
from qtune.pipeline.layout import DROPPED_INDEX, SCORE_SUMMARY, OutputLayout, epoch_name
from qtune.pipeline.publish import MANIFEST, latest_epoch
from qtune.pipeline.remote_sync import output_layout
from qtune.stages.eu_plane import MAX_TOKEN_NLL
from qtune.stages.report import (
    ENTROPY_SCALE,
    PPL_SCALE,
    QUADRANT_ORDER,
    SampleView,
    ScoreScale,
    render_sample_rich,
    token_segments,
)

logger = logging.getLogger(__name__)

SHARD_COLUMNS = [
    schema.SAMPLE_ID,
    schema.QUADRANT,
    schema.FILLED,
    schema.TOKEN_PRUNED,
    schema.PPL,
    schema.ENTROPY,
    schema.NUM_LOSS_TOKENS,
    schema.SOURCE,
]
DROPPED_COLUMNS = [
    schema.SAMPLE_ID,
    schema.QUADRANT,
    schema.PPL,
    schema.ENTROPY,
    schema.REASON,
    schema.SOURCE,
    schema.ROW_INDEX,
]
CACHE_SAMPLE_COLUMNS = [
    schema.SAMPLE_ID,
    schema.SOURCE,
    schema.ROW_INDEX,
    schema.N_TOKENS,
    schema.N_RESPONSE_TOKENS,
    schema.PPL,  # float64 as triage saw it (the shards hold float32)
    schema.ENTROPY,
]
CACHE_TOKEN_COLUMNS = [
    schema.INPUT_IDS,
    schema.LOSS_MASK,
    schema.TOKEN_LOGPROB,
    schema.TOKEN_ENTROPY,
]
GROUP = "group"  # the sample's triage group (qtuning.group_by); read only where written
KEPT = "kept"  # index column: the sample has a shard row
SHARD_FILE, SHARD_ROW = "shard_file", "shard_row"  # where its shard row is (file index, row)
CACHE_FILE, CACHE_ROW = "cache_file", "cache_row"  # where its scored-cache row is

__all__ = [
    "InspectError",
    "PublishedVersion",
    "SampleView",
    "decode_tokens",
    "find_samples",
    "load_tokenizer",
    "open_version",
    "render_sample",
    "sample_views",
    "terminal_safe",
]


class InspectError(ValueError):
    """The version or the samples asked for cannot be found (no such version, unknown id, …)."""


@dataclass
class PublishedVersion:
    """One published version, indexed per sample (see the module docstring).

    ``samples`` has one row per scored sample: ``sample_id``, ``source``, ``row_index``,
    ``quadrant``, ``kept``, ``filled``, ``token_pruned``, ``ppl``, ``entropy`` (Float64),
    ``num_loss_tokens`` (0 when dropped; ``ppl``/``entropy`` from the scored cache when present,
    as triage saw them), ``reason`` (null when kept), ``shard_file``/
    ``shard_row`` (null when dropped), ``cache_file``/``cache_row``, ``n_tokens`` and
    ``n_response_tokens`` (null without a usable scored cache), and ``group`` when the version
    records one (``qtuning.group_by``). Ordered as in the scored cache
    (kept rows, then dropped ones, without it).
    """

    layout: OutputLayout
    epoch: int
    manifest: dict[str, Any]
    shard_files: list[Path]
    cache_files: list[Path]
    samples: pl.DataFrame
    notes: list[str] = field(default_factory=list)  # what could not be used, and why

    @property
    def version_dir(self) -> Path:
        return self.layout.data_dir(self.epoch)

    @property
    def has_cache(self) -> bool:
        return bool(self.cache_files)


def open_version(
    output_dir: str | Path | OutputLayout, epoch: int | None = None
) -> PublishedVersion:
    """Index the samples of ``epoch``'s version (default: LATEST's) of ``output_dir``.

    Reads the manifest, the shards' and the dropped index's scalar columns and the scored
    cache's per-sample columns. Raises :class:`InspectError` when there is no such directory,
    no published version, or a file the manifest lists is missing.
    """
    layout = output_layout(output_dir)
    if not layout.root.is_dir():
        raise InspectError(f"{layout.name}: no such output directory")
    if epoch is None:
        epoch = latest_epoch(layout)
        if epoch is None:
            raise InspectError(
                f"{layout.name}: no published version (no LATEST, no data/epoch_*/{MANIFEST}); "
                "run `qtune run` or `qtune triage` first"
            )
    version = layout.data_dir(epoch)
    manifest_path = version / MANIFEST
    if not manifest_path.is_file():
        raise InspectError(f"{manifest_path}: missing; {epoch_name(epoch)} is not published")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise InspectError(f"{manifest_path}: unreadable manifest ({e})") from e

    shard_files = [version / entry["path"] for entry in manifest.get("files", [])]
    dropped_path = version / (manifest.get("dropped_index") or {}).get("path", DROPPED_INDEX)
    for path in [*shard_files, dropped_path]:
        if not path.is_file():
            raise InspectError(f"{path}: listed in {manifest_path} but missing")

    kept = _read_kept(shard_files)
    dropped = _read_dropped(dropped_path)
    samples = pl.concat([kept, dropped], how="diagonal_relaxed")
    notes: list[str] = []
    cache_files = _cache_files(layout, epoch, manifest, notes)
    if cache_files:
        cache = _read_cache_index(cache_files)
        samples = samples.join(cache, on=schema.SAMPLE_ID, how="left", suffix="_cache")
        samples = samples.with_columns(
            pl.coalesce(schema.SOURCE, f"{schema.SOURCE}_cache").alias(schema.SOURCE),
            pl.coalesce(schema.ROW_INDEX, f"{schema.ROW_INDEX}_cache").alias(schema.ROW_INDEX),
            pl.coalesce(f"{schema.PPL}_cache", schema.PPL).alias(schema.PPL),
            pl.coalesce(f"{schema.ENTROPY}_cache", schema.ENTROPY).alias(schema.ENTROPY),
        ).drop(
            [f"{c}_cache" for c in (schema.SOURCE, schema.ROW_INDEX, schema.PPL, schema.ENTROPY)]
        )
        samples = samples.sort([CACHE_FILE, CACHE_ROW], nulls_last=True, maintain_order=True)
        missing = samples.filter(pl.col(CACHE_FILE).is_null()).height
        if missing:
            notes.append(f"{missing:,} samples of the version are not in the scored cache")
    else:
        samples = samples.with_columns(
            pl.lit(None, pl.Int64).alias(CACHE_FILE),
            pl.lit(None, pl.Int64).alias(CACHE_ROW),
            pl.lit(None, pl.Int64).alias(schema.N_TOKENS),
            pl.lit(None, pl.Int64).alias(schema.N_RESPONSE_TOKENS),
        )
    return PublishedVersion(layout, epoch, manifest, shard_files, cache_files, samples, notes)


def _read_kept(shard_files: Sequence[Path]) -> pl.DataFrame:
    frames = []
    for i, path in enumerate(shard_files):
        table = pq.ParquetFile(path).read(columns=_with_group(path, SHARD_COLUMNS))
        frames.append(
            pl.from_arrow(table).with_columns(
                pl.lit(True).alias(KEPT),
                pl.lit(i, pl.Int64).alias(SHARD_FILE),
                pl.int_range(table.num_rows, dtype=pl.Int64).alias(SHARD_ROW),
            )
        )
    if not frames:
        return pl.DataFrame(
            schema={
                schema.SAMPLE_ID: pl.String,
                schema.QUADRANT: pl.String,
                KEPT: pl.Boolean,
            }
        )
    return pl.concat(frames).with_columns(
        pl.col(schema.PPL).cast(pl.Float64),
        pl.col(schema.ENTROPY).cast(pl.Float64),
        pl.col(schema.NUM_LOSS_TOKENS).cast(pl.Int64),
    )


def _with_group(path: Path, columns: list[str]) -> list[str]:
    """``columns`` plus the group column when the file has one (versions from before it lack it)."""
    return columns + [GROUP] if GROUP in pq.read_schema(path).names else columns


def _read_dropped(path: Path) -> pl.DataFrame:
    table = pq.read_table(path, columns=_with_group(path, DROPPED_COLUMNS))
    return pl.from_arrow(table).with_columns(
        pl.lit(False).alias(KEPT),
        pl.lit(False).alias(schema.FILLED),
        pl.lit(False).alias(schema.TOKEN_PRUNED),
        pl.lit(0, pl.Int64).alias(schema.NUM_LOSS_TOKENS),
    )


def _cache_files(
    layout: OutputLayout, epoch: int, manifest: dict[str, Any], notes: list[str]
) -> list[Path]:
    """The scored cache's part files for this version, or [] (with a note saying why)."""
    recorded = (manifest.get("scores") or {}).get("dir")
    candidates = [layout.scores_dir(epoch)] + ([Path(recorded)] if recorded else [])
    for directory in candidates:
        files = sorted(directory.glob("*.parquet")) if directory.is_dir() else []
        if not files:
            continue
        published = ((manifest.get("scores") or {}).get("summary") or {}).get("fingerprint")
        try:
            found = json.loads((directory / SCORE_SUMMARY).read_text()).get("fingerprint")
        except (OSError, ValueError):
            found = None
        if published and found and published != found:
            notes.append(
                f"the scored cache in {directory} was re-scored since this version was published "
                "(its fingerprint differs); per-token views are left out"
            )
            return []
        return files
    where = " or ".join(str(c) for c in candidates)
    notes.append(f"no scored cache found ({where}): response lengths and tokens are unavailable")
    return []


def _read_cache_index(files: Sequence[Path]) -> pl.DataFrame:
    frames = []
    for i, path in enumerate(files):
        table = pq.ParquetFile(path).read(columns=CACHE_SAMPLE_COLUMNS)
        frames.append(
            pl.from_arrow(table).with_columns(
                pl.lit(i, pl.Int64).alias(CACHE_FILE),
                pl.int_range(table.num_rows, dtype=pl.Int64).alias(CACHE_ROW),
            )
        )
    return pl.concat(frames).with_columns(
        pl.col(schema.N_TOKENS).cast(pl.Int64),
        pl.col(schema.N_RESPONSE_TOKENS).cast(pl.Int64),
        pl.col(schema.PPL).cast(pl.Float64),
        pl.col(schema.ENTROPY).cast(pl.Float64),
    )


# --- per-token reads -----------------------------------------------------------------------------


def read_rows(path: Path, rows: Sequence[int], columns: list[str]) -> pa.Table:
    """Rows ``rows`` (0-based within the file) of ``columns``, in that order.

    Reads only the row groups that hold them, one at a time, keeping just the wanted rows: a
    few samples of a large cache cost a few row groups of memory at most one at a time.
    """
    parquet = pq.ParquetFile(path)
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    wanted = np.asarray(rows, dtype=np.int64)
    if len(wanted) and (wanted.min() < 0 or wanted.max() >= starts[-1]):
        raise InspectError(f"{path}: rows {wanted.tolist()} outside its {starts[-1]} rows")
    groups = np.searchsorted(starts, wanted, side="right") - 1
    parts, order = [], []
    for group in np.unique(groups):
        here = np.flatnonzero(groups == group)
        table = parquet.read_row_group(int(group), columns=columns)
        parts.append(table.take(pa.array(wanted[here] - starts[group], pa.int64())))
        order.append(here)
    if not parts:
        return parquet.schema_arrow.empty_table().select(columns)
    combined = pa.concat_tables(parts)
    position = np.empty(len(wanted), dtype=np.int64)
    position[np.concatenate(order)] = np.arange(len(wanted))
    return combined.take(pa.array(position, pa.int64()))


def _fetch(
    files: Sequence[Path], locations: list[tuple[int, int]], columns: list[str]
) -> list[dict[str, Any]]:
    """Per (file index, row) pair: a dict of the row's columns (list columns as NumPy arrays)."""
    out: list[dict[str, Any] | None] = [None] * len(locations)
    by_file: dict[int, list[int]] = {}
    for position, (file_index, _) in enumerate(locations):
        by_file.setdefault(file_index, []).append(position)
    for file_index, positions in by_file.items():
        table = read_rows(files[file_index], [locations[p][1] for p in positions], columns)
        arrays = {c: schema.list_offsets_and_values(table.column(c)) for c in columns}
        for i, position in enumerate(positions):
            out[position] = {
                c: values[offsets[i] : offsets[i + 1]] for c, (offsets, values) in arrays.items()
            }
    return [row or {} for row in out]


# --- tokens as text ------------------------------------------------------------------------------


def load_tokenizer(manifest: dict[str, Any]) -> tuple[Any | None, str | None]:
    """The version's tokenizer from local files, or (None, why not).

    Tries the model path the scores recorded (``manifest['model']['path']``), then the config's
    ``model.path``. Never downloads (``local_files_only``).
    """
    candidates = [
        (manifest.get("model") or {}).get("path"),
        ((manifest.get("config") or {}).get("model") or {}).get("path"),
    ]
    tried = []
    for candidate in candidates:
        if not candidate or candidate in tried:
            continue
        tried.append(candidate)
        if not Path(candidate).is_dir():
            continue
        try:
            from qtune.stages.tokenize import load_tokenizer as load_model_tokenizer

            return load_model_tokenizer(candidate), None
        except Exception as e:  # noqa: BLE001 - any failure means "show ids"; never fail on it
            logger.warning("tokenizer of %s did not load (%s); showing token ids", candidate, e)
    where = ", ".join(str(t) for t in tried) or "no model path in the manifest"
    return None, f"no tokenizer could be loaded ({where}): tokens are shown as [id]"


def decode_tokens(tokenizer: Any | None, ids: np.ndarray) -> list[str]:
    """The text of each token id, decoded one by one; ``[id]`` without a tokenizer or for an id
    the tokenizer does not know. A byte of a multi-byte character decodes as U+FFFD."""
    ids = np.asarray(ids, dtype=np.int64)
    if tokenizer is None:
        return [f"[{i}]" for i in ids.tolist()]
    size = len(tokenizer)
    known = (ids >= 0) & (ids < size)
    texts = [f"[{i}]" for i in ids.tolist()]
    positions = np.flatnonzero(known)
    if len(positions):
        decoded = tokenizer.batch_decode(
            [[int(ids[p])] for p in positions],
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )
        for p, text in zip(positions.tolist(), decoded, strict=True):
            texts[p] = text
    return texts


# --- views ---------------------------------------------------------------------------------------


def _token_scores(row: dict[str, Any], score: str) -> np.ndarray:
    if score == "ppl":
        nll = np.minimum(-row[schema.TOKEN_LOGPROB].astype(np.float64), MAX_TOKEN_NLL)
        return np.exp(nll)
    if score == "entropy":
        return row[schema.TOKEN_ENTROPY].astype(np.float64)
    raise ValueError(f"unknown token score {score!r}; valid: ppl, entropy")


def _truncate(
    loss_mask: np.ndarray, kept_mask: np.ndarray | None, max_response: int | None
) -> tuple[int, str | None]:
    """How many positions to show so that at most ``max_response`` response tokens appear."""
    response = np.flatnonzero(loss_mask)
    if max_response is None or len(response) <= max_response:
        return len(loss_mask), None
    cut = int(response[max_response])
    hidden = len(response) - max_response
    pruned = ""
    if kept_mask is not None and kept_mask.any():
        n_pruned = int((loss_mask[cut:].astype(bool) & ~kept_mask[cut:].astype(bool)).sum())
        pruned = f" ({n_pruned:,} of them pruned)"
    return cut, f"… the last {hidden:,} response tokens{pruned} are not shown"


def sample_views(
    version: PublishedVersion,
    rows: pl.DataFrame,
    *,
    tokenizer: Any | None = None,
    score: str = "entropy",
    max_response_tokens: int | None = None,
) -> list[SampleView]:
    """A :class:`SampleView` per row of ``rows`` (rows of ``version.samples``), with segments.

    ``score``: what each response token's ``Segment.score`` holds — ``entropy`` (nats) or
    ``ppl`` (exp of the token NLL, clamped at 50). ``max_response_tokens``: show at most that
    many response tokens per sample (a note says how many more there were).
    """
    scale = PPL_SCALE if score == "ppl" else ENTROPY_SCALE
    records = rows.to_dicts()
    cache_rows: list[dict[str, Any]] = [{} for _ in records]
    shard_rows: list[dict[str, Any]] = [{} for _ in records]
    if version.has_cache:
        with_cache = [i for i, r in enumerate(records) if r.get(CACHE_FILE) is not None]
        fetched = _fetch(
            version.cache_files,
            [(records[i][CACHE_FILE], records[i][CACHE_ROW]) for i in with_cache],
            CACHE_TOKEN_COLUMNS,
        )
        for i, row in zip(with_cache, fetched, strict=True):
            cache_rows[i] = row
        kept = [i for i in with_cache if records[i][KEPT]]
        fetched = _fetch(
            version.shard_files,
            [(records[i][SHARD_FILE], records[i][SHARD_ROW]) for i in kept],
            [schema.LOSS_MASK],
        )
        for i, row in zip(kept, fetched, strict=True):
            shard_rows[i] = row

    views = []
    for record, cached, shard in zip(records, cache_rows, shard_rows, strict=True):
        view = SampleView(
            sample_id=record[schema.SAMPLE_ID],
            source=record.get(schema.SOURCE),
            row_index=record.get(schema.ROW_INDEX),
            quadrant=record[schema.QUADRANT],
            kept=bool(record[KEPT]),
            filled=bool(record.get(schema.FILLED)),
            token_pruned=bool(record.get(schema.TOKEN_PRUNED)),
            ppl=float(record[schema.PPL]),
            entropy=float(record[schema.ENTROPY]),
            n_response_tokens=record.get(schema.N_RESPONSE_TOKENS),
            num_loss_tokens=int(record.get(schema.NUM_LOSS_TOKENS) or 0),
            reason=record.get(schema.REASON),
            score_name=scale.name,
        )
        if not cached:
            view.note = (
                "not in the scored cache: tokens unavailable"
                if version.has_cache
                else "no scored cache: tokens unavailable"
            )
            views.append(view)
            continue
        ids, loss_mask = cached[schema.INPUT_IDS], cached[schema.LOSS_MASK]
        kept_mask = shard.get(schema.LOSS_MASK) if view.kept else None
        if kept_mask is not None and len(kept_mask) != len(ids):
            view.note = (
                f"the shard row has {len(kept_mask)} tokens, the scored cache {len(ids)}: "
                "the cache does not match this version"
            )
            views.append(view)
            continue
        cut, note = _truncate(loss_mask, kept_mask, max_response_tokens)
        view.segments = token_segments(
            decode_tokens(tokenizer, ids[:cut]),
            loss_mask[:cut],
            None if kept_mask is None else kept_mask[:cut],
            _token_scores(cached, score)[:cut],
        )
        view.note = note
        views.append(view)
    return views


# --- inspect -------------------------------------------------------------------------------------


def _rejected(version: PublishedVersion, ids: list[str]) -> dict[str, str]:
    """Reject reasons of ``ids`` found in the epoch's rejects folder."""
    directory = version.layout.rejects_dir(version.epoch)
    found: dict[str, str] = {}
    for path in sorted(directory.glob("*.parquet")) if directory.is_dir() else []:
        table = pq.read_table(path, columns=[schema.SAMPLE_ID, schema.REASON])
        frame = pl.from_arrow(table).filter(pl.col(schema.SAMPLE_ID).is_in(ids))
        for row in frame.iter_rows(named=True):
            found.setdefault(row[schema.SAMPLE_ID], row[schema.REASON])
    return found


def find_samples(
    output_dir: str | Path,
    epoch: int | None = None,
    *,
    sample_ids: list[str] | None = None,
    quadrant: str | None = None,
    limit: int = 5,
    kept: bool | None = None,
) -> list[SampleView]:
    """Samples of a version (default: LATEST's) with their token views (scored by entropy).

    With ``sample_ids``: exactly those, in that order (``quadrant``/``kept``/``limit`` do not
    apply); an id that is not a scored sample of the version raises :class:`InspectError`
    naming it (and its reject reason when the row was rejected). Otherwise the first ``limit``
    samples in scored-cache order with quadrant label ``quadrant`` (Q1..Q4) and keep decision
    ``kept``, when given.
    """
    if limit < 1:
        raise InspectError(f"limit must be at least 1, got {limit}")
    if quadrant is not None:
        quadrant = quadrant.upper()
        if quadrant not in QUADRANT_ORDER:
            raise InspectError(f"unknown quadrant {quadrant!r}; valid: {', '.join(QUADRANT_ORDER)}")
    version = open_version(output_dir, epoch)
    samples = version.samples
    if sample_ids:
        wanted = pl.DataFrame({schema.SAMPLE_ID: list(sample_ids)}).with_row_index("_order")
        rows = wanted.join(samples, on=schema.SAMPLE_ID, how="inner").sort("_order")
        missing = [s for s in sample_ids if s not in set(rows[schema.SAMPLE_ID].to_list())]
        if missing:
            rejected = _rejected(version, missing)
            named = ", ".join(
                f"{s!r} (rejected: {terminal_safe(rejected[s])})" if s in rejected else repr(s)
                for s in missing[:10]
            )
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise InspectError(
                f"unknown sample id(s) in {epoch_name(version.epoch)} of {version.layout.root}: "
                f"{named}{more}"
            )
        rows = rows.drop("_order")
    else:
        rows = samples
        if quadrant is not None:
            rows = rows.filter(pl.col(schema.QUADRANT) == quadrant)
        if kept is not None:
            rows = rows.filter(pl.col(KEPT) == kept)
        rows = rows.head(limit)
    tokenizer = None
    note = None
    if version.has_cache and rows.height:
        tokenizer, note = load_tokenizer(version.manifest)
    views = sample_views(version, rows, tokenizer=tokenizer, score="entropy")
    if note:
        for view in views:
            view.note = f"{view.note}; {note}" if view.note else note
    return views


# Characters a terminal acts on instead of showing: C0 controls but tab and newline (the text
# needs those; ESC starts colour, cursor, title and clipboard sequences), DEL, C1 controls (0x9b
# is a one-character CSI on some terminals), and the Unicode bidi embeddings, overrides and
# isolates, which reorder what is shown ("Trojan Source", CVE-2021-42574). Each is shown as its
# Python escape (``\x1b``, ``\u202e``). Rich strips only BEL, BS, VT, FF and CR by itself.
_TERMINAL_UNSAFE = [
    *range(0x00, 0x09),
    *range(0x0B, 0x20),
    *range(0x7F, 0xA0),
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
]
_TERMINAL_ESCAPES = {c: repr(chr(c))[1:-1] for c in _TERMINAL_UNSAFE}


def terminal_safe(text: str) -> str:
    r"""``text`` with every character a terminal would act on written as its escape (``\x1b``)."""
    return text.translate(_TERMINAL_ESCAPES)


def _safe_or_none(text: str | None) -> str | None:
    return None if text is None else terminal_safe(text)


def render_sample(view: SampleView) -> RenderableType:
    """A rich panel: sample id, a header (quadrant, decision, PPL, entropy, length, origin) and
    the text with response tokens shaded by their score and pruned tokens struck and marked.

    Everything that comes from the data (text, sample id, source, …) is shown, never acted on:
    control characters appear as escapes (:func:`terminal_safe`) and rich markup as written.
    """
    scale: ScoreScale = PPL_SCALE if view.score_name == PPL_SCALE.name else ENTROPY_SCALE
    safe = replace(
        view,
        sample_id=terminal_safe(view.sample_id),
        source=_safe_or_none(view.source),
        quadrant=terminal_safe(view.quadrant),
        reason=_safe_or_none(view.reason),
        note=_safe_or_none(view.note),
        segments=[replace(s, text=terminal_safe(s.text)) for s in view.segments],
    )
    panel = render_sample_rich(safe, scale)
    # A str title is parsed as rich markup ("[bold]", "[/]" in a sample id); a Text is not.
    panel.title = Text(safe.sample_id)
    return panel
