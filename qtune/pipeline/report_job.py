"""The report job: what a published version kept, pruned and dropped, and why.

``write_report(out, epoch)`` writes ``<out>/data/epoch_NNN/report/``:

- ``index.html``: self-contained (inline CSS, no scripts, no network), with the sections
  ``eu-plane``, ``quadrants``, ``token-pruning``, ``lengths``, ``sources``, ``migration`` and
  ``examples`` (``qtune.stages.report.SECTION_IDS``);
- ``stats.json``: every number the page shows (quadrant table, EU-plane counts, kept-token
  fractions, lengths, per-source table, thresholds, migration, examples, which sections have
  content);
- the figures as PNG files beside the page (``FIGURES``).

Reads the manifest, the scalar columns of the shards and of ``dropped.parquet``, the per-sample
columns of the scored cache, and per-token arrays only for the handful of example samples
(``qtune.pipeline.inspect``). Plots draw a seeded uniform subsample above ``max_points``; tables
and histograms use every sample. The report is built in ``<version>/.report-tmp-<id>`` and moved
over ``report/`` in one rename (the previous report is removed after).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from qtune import schema
from qtune.pipeline.inspect import (
    CACHE_FILE,
    GROUP,
    KEPT,
    InspectError,
    PublishedVersion,
    load_tokenizer,
    open_version,
    sample_views,
)
from qtune.pipeline.layout import OutputLayout, epoch_name, publish_dir
from qtune.pipeline.publish import MANIFEST
from qtune.pipeline.remote_sync import push
from qtune.stages import report as render
from qtune.stages.report import QUADRANT_LABELS, QUADRANT_ORDER, SECTION_IDS

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
INDEX = "index.html"
STATS = "stats.json"
#: Section id -> PNG file name in the report directory.
FIGURES = {
    "eu-plane": "eu_plane.png",
    "token-pruning": "kept_token_fraction.png",
    "lengths": "response_length.png",
    "sources": "sources.png",
    "groups": "groups.png",  # in the sources section, when qtuning.group_by is a field
    "migration": "migration.png",
}
MAX_EXAMPLE_RESPONSE_TOKENS = 1024  # per example; keeps the page small for long samples


class ReportError(ValueError):
    """No report can be written: no published version, a missing file, or the version changed."""


def report_dir(version_dir: Path) -> Path:
    return version_dir / REPORT_DIR


def write_report(
    output_dir: str | Path | OutputLayout,
    epoch: int | None = None,
    *,
    max_points: int = 20000,
    examples_per_quadrant: int = 3,
    seed: int = 0,
) -> Path:
    """Write the report of ``epoch``'s version (default: LATEST's) and return its index.html.

    ``max_points``: most samples drawn on the EU plane (seeded uniform subsample above it);
    ``examples_per_quadrant``: samples rendered as text per quadrant (kept and dropped ones
    when both exist; token-pruned ones first among kept Q2); ``seed``: the subsample's and the
    examples' seed. Raises :class:`ReportError` when there is nothing to report on. The
    tokenizer for the examples is loaded from the model path in the manifest when it loads
    from local files; otherwise tokens are shown as ``[id]``.
    """
    if max_points < 1 or examples_per_quadrant < 0:
        raise ReportError(
            f"max_points must be >= 1 and examples_per_quadrant >= 0, got {max_points} and "
            f"{examples_per_quadrant}"
        )
    started = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        version = open_version(output_dir, epoch)
    except InspectError as e:
        raise ReportError(str(e)) from e
    samples = version.samples
    if not samples.height:
        raise ReportError(f"{version.version_dir}: the version has no samples")
    timings["read_s"] = time.perf_counter() - started

    tick = time.perf_counter()
    stats = build_stats(version, max_points=max_points, seed=seed)
    timings["stats_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    pngs = build_figures(version, stats, max_points=max_points, seed=seed)
    timings["figures_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    chosen = choose_examples(version, examples_per_quadrant, seed)
    tokenizer, tokenizer_note = (None, None)
    if chosen.height and version.has_cache:
        tokenizer, tokenizer_note = load_tokenizer(version.manifest)
    views = sample_views(
        version,
        chosen,
        tokenizer=tokenizer,
        score="ppl",
        max_response_tokens=MAX_EXAMPLE_RESPONSE_TOKENS,
    )
    stats["examples"] = [
        {
            "sample_id": v.sample_id,
            "quadrant": v.quadrant,
            "kept": v.kept,
            "filled": v.filled,
            "token_pruned": v.token_pruned,
            "ppl": v.ppl,
            "entropy": v.entropy,
            "response_tokens": v.n_response_tokens,
            "loss_tokens": v.num_loss_tokens,
            "pruned_tokens_shown": v.pruned_tokens,
            "rendered": bool(v.segments),
        }
        for v in views
    ]
    examples_note = tokenizer_note
    if not version.has_cache:
        examples_note = "no scored cache: examples show scores and decisions without tokens"
    timings["examples_s"] = time.perf_counter() - tick

    stats["sections"] = _sections(stats)
    stats["figures"] = {k: FIGURES[k] for k in pngs}
    stats["timings"] = timings
    page = render.report_html(
        stats,
        {k: FIGURES[k] for k in pngs},
        views,
        scale=render.PPL_SCALE,
        examples_note=examples_note,
    )
    target = _publish(version, stats, pngs, page, started)
    logger.info("report of %s written to %s", epoch_name(version.epoch), target)
    return target / INDEX


def _publish(
    version: PublishedVersion,
    stats: dict[str, Any],
    pngs: dict[str, bytes],
    page: str,
    started: float,
) -> Path:
    """Stage the files beside ``report/`` and move them over it in one rename."""
    version_dir = version.version_dir
    staging = version_dir / f".report-tmp-{uuid.uuid4().hex[:12]}"
    try:
        staging.mkdir()
        for key, data in pngs.items():
            (staging / FIGURES[key]).write_bytes(data)
        stats["timings"]["total_s"] = time.perf_counter() - started
        (staging / STATS).write_text(json.dumps(_jsonable(stats), indent=2, sort_keys=True))
        (staging / INDEX).write_text(page, encoding="utf-8")
        _check_unchanged(version)
        publish_dir(staging, report_dir(version_dir))
        push(version.layout)
    except OSError as e:
        raise ReportError(
            f"{version_dir}: could not write the report ({e}); was the version re-published "
            "meanwhile? Run the report again"
        ) from e
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return report_dir(version_dir)


def _check_unchanged(version: PublishedVersion) -> None:
    path = version.version_dir / MANIFEST
    try:
        now = json.loads(path.read_text()).get("publication")
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: unreadable after the report was built ({e})") from e
    if now != version.manifest.get("publication"):
        raise ReportError(
            f"{epoch_name(version.epoch)} was re-published while its report was built; run the "
            "report again"
        )


# --- numbers -------------------------------------------------------------------------------------


def _summary(values: np.ndarray) -> dict[str, Any] | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    p10, median, p90 = np.quantile(values, [0.1, 0.5, 0.9])
    return {
        "n": len(values),
        "mean": float(values.mean()),
        "min": float(values.min()),
        "p10": float(p10),
        "median": float(median),
        "p90": float(p90),
        "max": float(values.max()),
    }


def quadrant_table(version: PublishedVersion) -> dict[str, dict[str, Any]]:
    """Per quadrant label: samples, share, kept, filled, token_pruned, mean/median PPL, mean
    entropy, response tokens (all samples; kept samples before pruning) and kept loss tokens.

    Same keys and values as the manifest's ``quadrants`` (plus ``median_ppl`` and
    ``kept_response_tokens``); without a scored cache the response-token sums are the manifest's.
    """
    samples = version.samples
    kept = pl.col(KEPT)
    agg = (
        samples.group_by(schema.QUADRANT)
        .agg(
            pl.len().alias("samples"),
            kept.sum().alias("kept"),
            (kept & pl.col(schema.FILLED)).sum().alias("filled"),
            (kept & pl.col(schema.TOKEN_PRUNED)).sum().alias("token_pruned"),
            pl.col(schema.PPL).mean().alias("mean_ppl"),
            pl.col(schema.PPL).median().alias("median_ppl"),
            pl.col(schema.ENTROPY).mean().alias("mean_entropy"),
            pl.col(schema.N_RESPONSE_TOKENS).sum().alias("response_tokens"),
            pl.col(schema.N_RESPONSE_TOKENS).filter(kept).sum().alias("kept_response_tokens"),
            pl.col(schema.NUM_LOSS_TOKENS).filter(kept).sum().alias("kept_loss_tokens"),
        )
        .to_dicts()
    )
    by_quadrant = {row[schema.QUADRANT]: row for row in agg}
    manifest_table = version.manifest.get("quadrants") or {}
    table = {}
    for name in QUADRANT_ORDER:
        row = by_quadrant.get(name) or {}
        n = int(row.get("samples") or 0)
        entry = {
            "name": QUADRANT_LABELS[name],
            "samples": n,
            "share": n / samples.height,
            "kept": int(row.get("kept") or 0),
            "filled": int(row.get("filled") or 0),
            "token_pruned": int(row.get("token_pruned") or 0),
            "mean_ppl": row.get("mean_ppl") if n else None,
            "median_ppl": row.get("median_ppl") if n else None,
            "mean_entropy": row.get("mean_entropy") if n else None,
            "response_tokens": int(row.get("response_tokens") or 0),
            "kept_response_tokens": int(row.get("kept_response_tokens") or 0),
            "kept_loss_tokens": int(row.get("kept_loss_tokens") or 0),
        }
        if not version.has_cache:
            entry["response_tokens"] = (manifest_table.get(name) or {}).get("response_tokens")
            entry["kept_response_tokens"] = None
        table[name] = entry
    return table


def _per_source(version: PublishedVersion) -> tuple[dict[str, dict[str, Any]], str]:
    """Rows per source (input rows, kept, dropped, rejected) and samples/kept per quadrant.

    Input rows and rejects come from the manifest's ``counts.per_source`` when it has one
    (``"manifest"``); otherwise they are counted here (``"computed"``): kept and dropped from
    the version, rejected from the epoch's rejects folder.
    """
    samples = version.samples.with_columns(pl.col(schema.SOURCE).fill_null("(unknown)"))
    grouped = samples.group_by([schema.SOURCE, schema.QUADRANT]).agg(
        pl.len().alias("samples"), pl.col(KEPT).sum().alias("kept")
    )
    quadrants: dict[str, dict[str, dict[str, int]]] = {}
    for row in grouped.iter_rows(named=True):
        quadrants.setdefault(row[schema.SOURCE], {})[row[schema.QUADRANT]] = {
            "samples": int(row["samples"]),
            "kept": int(row["kept"]),
        }
    means = {
        row[schema.SOURCE]: row
        for row in samples.group_by(schema.SOURCE)
        .agg(
            pl.col(KEPT).sum().alias("kept"),
            (~pl.col(KEPT)).sum().alias("dropped"),
            pl.col(schema.PPL).mean().alias("mean_ppl"),
            pl.col(schema.ENTROPY).mean().alias("mean_entropy"),
        )
        .iter_rows(named=True)
    }
    recorded = (version.manifest.get("counts") or {}).get("per_source")
    if isinstance(recorded, dict) and recorded:
        origin = "manifest"
        base = {s: {k: int(v.get(k, 0)) for k in _SOURCE_KEYS} for s, v in recorded.items()}
    else:
        origin = "computed"
        rejected = _rejects_by_source(version)
        base = {}
        for source in sorted(means.keys() | rejected.keys()):
            kept = int((means.get(source) or {}).get("kept") or 0)
            dropped = int((means.get(source) or {}).get("dropped") or 0)
            n_rejected = rejected.get(source, 0)
            base[source] = {
                "input_rows": kept + dropped + n_rejected,
                "kept": kept,
                "dropped": dropped,
                "rejected": n_rejected,
            }
    table = {}
    for source, entry in base.items():
        row = means.get(source) or {}
        table[source] = {
            **entry,
            "mean_ppl": row.get("mean_ppl"),
            "mean_entropy": row.get("mean_entropy"),
            "quadrants": {
                q: quadrants.get(source, {}).get(q, {"samples": 0, "kept": 0})
                for q in QUADRANT_ORDER
            },
        }
    return table, origin


_SOURCE_KEYS = ("input_rows", "kept", "dropped", "rejected")


def _per_group(version: PublishedVersion) -> dict[str, Any] | None:
    """Samples, kept and dropped per triage group (``qtuning.group_by``) with the manifest's
    coverage (input share vs kept share, under-covered groups); None when the version records
    neither groups nor coverage."""
    coverage = version.manifest.get("coverage") or {}
    samples = version.samples
    if GROUP not in samples.columns and not coverage.get("groups"):
        return None
    table: dict[str, dict[str, Any]] = {}
    if GROUP in samples.columns:
        frame = samples.with_columns(pl.col(GROUP).fill_null("(none)"))
        n_kept = max(int(frame[KEPT].sum()), 1)
        for row in (
            frame.group_by(GROUP)
            .agg(pl.len().alias("samples"), pl.col(KEPT).sum().alias("kept"))
            .iter_rows(named=True)
        ):
            table[row[GROUP]] = {
                "samples": int(row["samples"]),
                "kept": int(row["kept"]),
                "dropped": int(row["samples"] - row["kept"]),
                "input_share": row["samples"] / frame.height,
                "kept_share": row["kept"] / n_kept,
                "quadrants": {q: {"samples": 0, "kept": 0} for q in QUADRANT_ORDER},
            }
        for row in (
            frame.group_by([GROUP, schema.QUADRANT])
            .agg(pl.len().alias("samples"), pl.col(KEPT).sum().alias("kept"))
            .iter_rows(named=True)
        ):
            table[row[GROUP]]["quadrants"][row[schema.QUADRANT]] = {
                "samples": int(row["samples"]),
                "kept": int(row["kept"]),
            }
    for name, recorded in (coverage.get("groups") or {}).items():
        entry = table.setdefault(name, {})
        for key in ("input_share", "kept_share", "kept_loss_tokens", "under_covered"):
            if key in recorded:
                entry[key] = recorded[key]
    return {
        "group_by": coverage.get("group_by")
        or (version.manifest.get("qtuning") or {}).get("group_by")
        or "file",
        "min_share_fraction": coverage.get("min_share_fraction"),
        "under_covered": list(coverage.get("under_covered") or []),
        "groups": dict(sorted(table.items())),
    }


def _rejects_by_source(version: PublishedVersion) -> dict[str, int]:
    directory = version.layout.rejects_dir(version.epoch)
    counts: dict[str, int] = {}
    for path in sorted(directory.glob("*.parquet")) if directory.is_dir() else []:
        frame = pl.from_arrow(pq.read_table(path, columns=[schema.SOURCE]))
        for source, n in frame.group_by(schema.SOURCE).len().iter_rows():
            key = source if source is not None else "(unknown)"
            counts[key] = counts.get(key, 0) + int(n)
    return counts


def _migration(version: PublishedVersion, thresholds: dict[str, Any]) -> tuple[dict | None, str]:
    """The manifest's migration, with the parent's thresholds and quadrant sizes beside ours."""
    manifest = version.manifest
    parent = manifest.get("parent")
    migration = manifest.get("migration")
    if not parent:
        return None, "this version has no parent: there is no earlier epoch to compare with."
    if not migration:
        return None, (
            f"the parent {parent} was not published when this version was triaged, so no "
            "migration was recorded."
        )
    migration = dict(migration)
    parent_path = version.layout.root / "data" / str(parent) / MANIFEST
    try:
        parent_manifest = json.loads(parent_path.read_text())
    except (OSError, ValueError):
        return migration, f"the parent's manifest ({parent_path}) is gone: thresholds not compared"
    before = parent_manifest.get("thresholds") or {}
    moves = {}
    for key in sorted(before.keys() & thresholds.keys()):
        a, b = before[key], thresholds[key]
        if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
            moves[key] = {"parent": a, "current": b, "change": b - a}
        elif a != b:
            moves[key] = {"parent": a, "current": b, "change": None}
    migration["thresholds"] = moves
    migration["parent_quadrants"] = {
        q: {"samples": v.get("samples"), "kept": v.get("kept")}
        for q, v in (parent_manifest.get("quadrants") or {}).items()
    }
    return migration, ""


def build_stats(version: PublishedVersion, *, max_points: int, seed: int) -> dict[str, Any]:
    """Everything ``stats.json`` holds except the examples, sections, figures and timings."""
    manifest = version.manifest
    samples = version.samples
    thresholds = manifest.get("thresholds") or {}
    counts = {k: v for k, v in (manifest.get("counts") or {}).items() if k != "per_source"}
    quadrant = samples[schema.QUADRANT].to_numpy()
    kept = samples[KEPT].to_numpy()
    plotted = render.subsample_indices(samples.height, max_points, seed)
    plane = {
        "samples": samples.height,
        "plotted": len(plotted),
        "subsampled": len(plotted) < samples.height,
        "max_points": max_points,
        "seed": seed,
        "quadrants": {
            q: {
                "samples": int((quadrant == q).sum()),
                "kept": int(((quadrant == q) & kept).sum()),
                "plotted": int((quadrant[plotted] == q).sum()),
            }
            for q in QUADRANT_ORDER
        },
    }
    plane["populated"] = [q for q in QUADRANT_ORDER if plane["quadrants"][q]["plotted"]]
    plane["lines"] = render.threshold_lines(
        thresholds,
        np.log(samples[schema.PPL].to_numpy()),
        samples[schema.ENTROPY].to_numpy(),
    )

    q = manifest.get("qtuning") or {}
    token_pruning: dict[str, Any] = {"token_ratio": q.get("token_ratio")}
    pruned = samples.filter(pl.col(KEPT) & pl.col(schema.TOKEN_PRUNED))
    if not version.has_cache:
        token_pruning["note"] = "no scored cache: response lengths before pruning are unknown"
    elif not pruned.height:
        token_pruning["note"] = "no kept sample was token-pruned in this version" + (
            " (token_policy is none)" if q.get("token_policy") == "none" else ""
        )
    else:
        response = pruned[schema.N_RESPONSE_TOKENS].to_numpy().astype(np.float64)
        loss = pruned[schema.NUM_LOSS_TOKENS].to_numpy().astype(np.float64)
        token_pruning.update(
            samples=pruned.height,
            response_tokens=int(response.sum()),
            kept_loss_tokens=int(loss.sum()),
            kept_token_share=float(loss.sum() / response.sum()) if response.sum() else None,
            kept_fraction=_summary(np.divide(loss, response, where=response > 0)),
            token_policy=q.get("token_policy"),
        )

    lengths: dict[str, Any] = {}
    if not version.has_cache:
        lengths["note"] = "no scored cache: response lengths are unknown"
    else:
        response = samples[schema.N_RESPONSE_TOKENS].to_numpy()
        valid = ~np.isnan(response.astype(np.float64))
        lengths["quadrants"] = {
            name: {
                "all": _summary(response[valid & (quadrant == name)]),
                "kept": _summary(response[valid & (quadrant == name) & kept]),
            }
            for name in QUADRANT_ORDER
        }

    sources, origin = _per_source(version)
    migration, migration_note = _migration(version, thresholds)
    return {
        "version": epoch_name(version.epoch),
        "epoch": version.epoch,
        "parent": manifest.get("parent"),
        "created": manifest.get("created"),
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "publication": manifest.get("publication"),
        "model": (manifest.get("model") or {}).get("path"),
        "qtuning": q,
        "counts": counts,
        "thresholds": thresholds,
        "quadrants": quadrant_table(version),
        "eu_plane": plane,
        "token_pruning": token_pruning,
        "lengths": lengths,
        "sources": sources,
        "sources_from": origin,
        "groups": _per_group(version),
        "migration": migration,
        "migration_note": migration_note,
        "signals": manifest.get("signals") or {},
        "notes": [*(manifest.get("warnings") or []), *version.notes],
    }


def _sections(stats: dict[str, Any]) -> dict[str, bool]:
    """Which sections hold content (all are on the page; the others hold a note)."""
    return {
        "eu-plane": bool(stats["eu_plane"]["samples"]),
        "quadrants": True,
        "token-pruning": "note" not in stats["token_pruning"],
        "lengths": "note" not in stats["lengths"],
        "sources": bool(stats["sources"]),
        "migration": bool(stats["migration"]),
        "examples": any(e["rendered"] for e in stats.get("examples", [])),
    }


# --- figures and examples ------------------------------------------------------------------------


def build_figures(
    version: PublishedVersion, stats: dict[str, Any], *, max_points: int, seed: int
) -> dict[str, bytes]:
    """Section id -> PNG bytes, for the sections that have a figure."""
    samples = version.samples
    quadrant = samples[schema.QUADRANT].to_numpy()
    kept = samples[KEPT].to_numpy()
    pngs = {
        "eu-plane": render.eu_plane_png(
            np.log(samples[schema.PPL].to_numpy()),
            samples[schema.ENTROPY].to_numpy(),
            quadrant,
            kept,
            samples[schema.FILLED].to_numpy(),
            stats["thresholds"],
            max_points=max_points,
            seed=seed,
        ),
        "sources": render.sources_png(stats["sources"]),
    }
    groups = stats.get("groups")
    if groups and groups["group_by"] != "file" and groups["groups"]:
        pngs["groups"] = render.sources_png(
            groups["groups"], title=f"Samples per group ({groups['group_by']}): kept, dropped"
        )
    if "note" not in stats["token_pruning"]:
        pruned = samples.filter(pl.col(KEPT) & pl.col(schema.TOKEN_PRUNED))
        response = pruned[schema.N_RESPONSE_TOKENS].to_numpy().astype(np.float64)
        loss = pruned[schema.NUM_LOSS_TOKENS].to_numpy().astype(np.float64)
        ratio = stats["token_pruning"].get("token_ratio")
        pngs["token-pruning"] = render.kept_fraction_png(
            np.divide(loss, response, out=np.zeros_like(loss), where=response > 0),
            ratio if isinstance(ratio, int | float) else None,
        )
    if "note" not in stats["lengths"]:
        response = samples[schema.N_RESPONSE_TOKENS].to_numpy().astype(np.float64)
        valid = ~np.isnan(response)
        pngs["lengths"] = render.lengths_png(response[valid], quadrant[valid], kept[valid])
    if stats["migration"]:
        migration = stats["migration"]
        pngs["migration"] = render.migration_png(
            migration.get("matrix") or {}, str(migration.get("parent")), stats["version"]
        )
    return pngs


def choose_examples(version: PublishedVersion, per_quadrant: int, seed: int) -> pl.DataFrame:
    """Up to ``per_quadrant`` rows of ``version.samples`` per quadrant, seeded.

    Kept and dropped samples share the places when the quadrant has both (kept first, half
    rounded up); among kept samples token-pruned ones come first (their pruned tokens are the
    point). Only samples present in the scored cache are chosen when there is one.
    """
    if per_quadrant <= 0:
        return version.samples.head(0)
    pool = version.samples
    if version.has_cache:
        pool = pool.filter(pl.col(CACHE_FILE).is_not_null())
    parts = []
    for i, name in enumerate(QUADRANT_ORDER):
        rows = pool.filter(pl.col(schema.QUADRANT) == name)
        kept = rows.filter(pl.col(KEPT))
        dropped = rows.filter(~pl.col(KEPT))
        n_kept = min(
            kept.height, per_quadrant if not dropped.height else math.ceil(per_quadrant / 2)
        )
        n_dropped = min(dropped.height, per_quadrant - n_kept)
        n_kept = min(kept.height, per_quadrant - n_dropped)
        if n_kept:
            parts.append(
                kept.sample(fraction=1.0, shuffle=True, seed=seed + i)
                .sort(schema.TOKEN_PRUNED, descending=True, maintain_order=True)
                .head(n_kept)
            )
        if n_dropped:
            parts.append(dropped.sample(n_dropped, shuffle=True, seed=seed + 10 + i))
    return pl.concat(parts) if parts else version.samples.head(0)


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NumPy scalars to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = [
    "FIGURES",
    "INDEX",
    "REPORT_DIR",
    "STATS",
    "ReportError",
    "SECTION_IDS",
    "build_stats",
    "choose_examples",
    "quadrant_table",
    "write_report",
]
