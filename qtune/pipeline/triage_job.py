"""The triage job: scored cache -> decisions -> token masks -> a published version.

Reads only the sample-level columns of the scored cache to triage (two floats per sample), then
streams the cache once, batch by batch, to prune tokens of the kept samples and write shards.
Runs in one process without Ray: the work is vectorised and I/O-bound, and changing ratios or
policy never re-scores, so a sweep over ratios reuses one scored cache.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qtune import schema
from qtune.faults import fault_point
from qtune.pipeline.config import (
    MIN_PRUNABLE_TOKENS,
    QTuneConfig,
    QTuningConfig,
    check_output_location,
)
from qtune.pipeline.errors import PipelineError, one_line
from qtune.pipeline.layout import DROPPED_INDEX, VERSION_TRAIN, OutputLayout, epoch_name
from qtune.pipeline.lock import OutputLock
from qtune.pipeline.progress import StageTimings, StepProgress
from qtune.pipeline.publish import MANIFEST, publish_version, sha256_text
from qtune.pipeline.remote_sync import check_writable, output_layout, pull_remote, push
from qtune.schema import DropReason
from qtune.stages.shards import ShardWriter, build_shard_rows, file_sha256, stamp_files
from qtune.stages.token_prune import (
    end_of_turn_positions,
    prune_loss_mask,
    pruned_after_guards,
)
from qtune.stages.triage import (
    QUADRANT_NAMES,
    QUADRANTS,
    THIN_LOSS_WARN_SHARE,
    Decisions,
    coverage,
    selection_signals,
    triage,
)

logger = logging.getLogger(__name__)

STAT_COLUMNS = [
    schema.SAMPLE_ID,
    schema.SOURCE,
    schema.ROW_INDEX,
    schema.PPL,
    schema.ENTROPY,
    schema.N_TOKENS,
    schema.N_RESPONSE_TOKENS,
]
SHARD_INPUT_COLUMNS = [
    schema.SAMPLE_ID,
    schema.SOURCE,
    schema.INPUT_IDS,
    schema.LOSS_MASK,
    schema.TOKEN_LOGPROB,
    schema.TRUNCATED,
    schema.PPL,
    schema.ENTROPY,
]
READ_BATCH_ROWS = 4096


@dataclass
class TriageSummary:
    version_dir: str
    output_dir: str
    epoch: int
    policy: str
    input_rows: int
    scored: int
    kept: int
    dropped: int
    rejected: int
    response_tokens: int
    kept_loss_tokens: int
    quadrants: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    migration: dict | None = None
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)
    unreadable_sources: list[dict[str, str]] = field(default_factory=list)
    skipped_inputs: list[dict[str, str]] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)  # scoring's stages, then triage's
    coverage: dict = field(default_factory=dict)  # per group: input vs kept share
    signals: dict = field(default_factory=dict)  # thin loss masks, extreme-PPL tail share
    warnings: list[str] = field(default_factory=list)  # what a user must look at before training
    limit: int | None = None  # a partial (--limit) run
    files: int = 0
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _present(path: Path, columns: list[str]) -> list[str]:
    names = set(pq.read_schema(path).names)
    return [c for c in columns if c in names]


def _rejects_by_source(directory: Path) -> dict[str, int]:
    if not directory.is_dir():
        return {}
    parts = sorted(directory.glob("*.parquet"))
    if not parts:
        return {}
    sources = pa.concat_tables([pq.read_table(p, columns=[schema.SOURCE]) for p in parts])
    return {
        row["values"]: row["counts"]
        for row in pc.value_counts(sources.column(schema.SOURCE)).to_pylist()
    }


def source_accounting(
    source_rows: dict[str, int], stats: pa.Table, kept: np.ndarray, rejected: dict[str, int]
) -> dict[str, dict[str, int]]:
    """Per input file: input rows (from the plan) against kept + dropped + rejected."""
    frame = (
        pl.from_arrow(stats.select([schema.SOURCE]))
        .rename({schema.SOURCE: "source"})
        .with_columns(kept=pl.Series(kept))
        .group_by("source")
        .agg(pl.col("kept").sum().alias("kept"), pl.len().alias("scored"))
    )
    scored = {row["source"]: row for row in frame.iter_rows(named=True)}
    table = {}
    for source in sorted(source_rows.keys() | scored.keys() | rejected.keys()):
        n_kept = int(scored.get(source, {}).get("kept", 0))
        n_scored = int(scored.get(source, {}).get("scored", 0))
        table[source] = {
            "input_rows": int(source_rows.get(source, 0)),
            "kept": n_kept,
            "dropped": n_scored - n_kept,
            "rejected": int(rejected.get(source, 0)),
        }
    return table


def accounting_problems(counts: dict, per_source: dict[str, dict[str, int]] | None) -> list[str]:
    """Every way the row accounting fails to add up (empty when it does)."""
    problems = []
    if counts["kept"] + counts["dropped"] + counts["rejected"] != counts["input_rows"]:
        problems.append(
            f"kept {counts['kept']} + dropped {counts['dropped']} + rejected "
            f"{counts['rejected']} != input rows {counts['input_rows']}"
        )
    for source, c in (per_source or {}).items():
        if c["kept"] + c["dropped"] + c["rejected"] != c["input_rows"]:
            problems.append(
                f"{source}: kept {c['kept']} + dropped {c['dropped']} + rejected "
                f"{c['rejected']} != input rows {c['input_rows']}"
            )
    return problems


def _quadrant_table(
    stats: pa.Table, decisions: Decisions, token_pruned: np.ndarray, kept_loss: np.ndarray
) -> dict:
    ppl = stats.column(schema.PPL).to_numpy()
    entropy = stats.column(schema.ENTROPY).to_numpy()
    response = stats.column(schema.N_RESPONSE_TOKENS).to_numpy().astype(np.int64)
    table = {}
    for quadrant in QUADRANTS:
        rows = decisions.quadrant == quadrant
        n = int(rows.sum())
        table[str(quadrant)] = {
            "name": QUADRANT_NAMES[str(quadrant)],
            "samples": n,
            "share": n / len(ppl),
            "kept": int((rows & decisions.kept).sum()),
            "filled": int((rows & decisions.filled).sum()),
            "token_pruned": int((rows & token_pruned).sum()),
            "mean_ppl": float(ppl[rows].mean()) if n else None,
            "mean_entropy": float(entropy[rows].mean()) if n else None,
            "response_tokens": int(response[rows].sum()),
            "kept_loss_tokens": int(kept_loss[rows].sum()),
        }
    return table


def selection_warnings(group_coverage: dict, signals: dict, q: QTuningConfig) -> list[str]:
    """The selection's problems a user must see before training on it (summary, manifest,
    report): groups starved of kept samples, and kept samples that barely carry a loss."""
    warnings = []
    if group_coverage["under_covered"]:
        hint = ""
        if q.scope != "group":
            hint = (
                "; triage within each group keeps every part: use --set qtuning.scope=group "
                f"--set qtuning.group_by={q.group_by or 'file'}"
            )
        warnings.append(
            f"under-represented in the kept samples: {', '.join(group_coverage['under_covered'])} "
            f"(kept share below {100 * q.coverage_min_fraction:.0f}% of input share){hint}"
        )
    share = signals["at_most_one_loss_token_share"]
    if signals["kept_samples"] and share > THIN_LOSS_WARN_SHARE:
        guards = []
        if not q.keep_end_of_turn:
            guards.append("qtuning.keep_end_of_turn=true")
        if q.min_prunable_tokens < 2:
            guards.append(f"qtuning.min_prunable_tokens={MIN_PRUNABLE_TOKENS}")
        hint = f"; turn the pruning guards on: {', '.join(guards)}" if guards else ""
        warnings.append(
            f"{signals['at_most_one_loss_token']:,} of {signals['kept_samples']:,} kept samples "
            f"({100 * share:.0f}%) carry at most one loss token: training would learn little "
            f"beyond where turns end{hint}"
        )
    return warnings


def _dropped_index(
    stats: pa.Table, decisions: Decisions, policy: str, groups: np.ndarray
) -> pa.Table:
    dropped = np.flatnonzero(~decisions.kept)
    reason = DropReason.OUTSIDE_CORNERS if policy == "qtuning" else DropReason.BELOW_BUDGET
    rows = stats.take(dropped)
    return pa.table(
        {
            schema.SAMPLE_ID: rows.column(schema.SAMPLE_ID),
            schema.QUADRANT: pa.array(decisions.quadrant[dropped], pa.string()),
            schema.PPL: rows.column(schema.PPL),
            schema.ENTROPY: rows.column(schema.ENTROPY),
            schema.REASON: pa.array([reason.value] * len(dropped), pa.string()),
            schema.SOURCE: rows.column(schema.SOURCE),
            schema.ROW_INDEX: rows.column(schema.ROW_INDEX),
            schema.GROUP: pa.array(groups[dropped], pa.string()),
        },
        schema=schema.DROPPED_SCHEMA,
    )


def sample_groups(stats: pa.Table, group_by: str | None) -> np.ndarray:
    """Each sample's group: its source file (``group_by`` unset or ``file``) or the value of
    an input field kept in the cache's ``metadata`` (``(no <field>)`` where a row lacks it)."""
    if group_by in (None, "file"):
        return np.asarray(stats.column(schema.SOURCE).to_numpy(zero_copy_only=False), dtype=object)
    if schema.METADATA not in stats.column_names:
        raise PipelineError(
            f"qtuning.group_by {group_by!r}: this scored cache has no input fields (it was "
            "scored by an older qtune); re-score it or use group_by: file"
        )
    # Decoded into a struct holding that one field (as text), never pasted into a JSON path:
    # a field name may hold any character ("$..*", "a.b", quotes).
    values = (
        pl.from_arrow(stats.select([schema.METADATA]))
        .get_column(schema.METADATA)
        .str.json_decode(dtype=pl.Struct({group_by: pl.String}))
        .struct.field(group_by)
        .fill_null(f"(no {group_by})")
    )
    if (values == f"(no {group_by})").all():
        raise PipelineError(
            f"qtuning.group_by {group_by!r}: no input row has that field; set it to `file` or "
            "to a field the rows carry"
        )
    return values.to_numpy().astype(object)


def _prune_and_write(
    files: list[Path],
    decisions: Decisions,
    token_pruned: np.ndarray,
    q: QTuningConfig,
    writer: ShardWriter,
    progress: StepProgress,
    groups: np.ndarray,
) -> tuple[np.ndarray, int]:
    """Stream the scored cache once: prune the kept samples' tokens and write their shard rows.

    ``token_pruned`` is narrowed in place by the guards (a response too short to prune keeps its
    tokens and is not recorded as token-pruned). Returns kept loss tokens per sample (0 for
    dropped ones) and the number of rows read.
    """
    kept_loss = np.zeros(len(decisions.kept), dtype=np.int64)
    offset = 0
    for path in files:
        for record_batch in pq.ParquetFile(path).iter_batches(
            batch_size=READ_BATCH_ROWS, columns=SHARD_INPUT_COLUMNS
        ):
            start = offset
            offset += record_batch.num_rows
            progress.advance(record_batch.num_rows)
            local = np.flatnonzero(decisions.kept[start:offset])
            if not len(local):
                continue
            index = start + local
            batch = pa.Table.from_batches([record_batch]).take(local)
            token_offsets, loss_mask = schema.list_offsets_and_values(
                batch.column(schema.LOSS_MASK)
            )
            _, logprob = schema.list_offsets_and_values(batch.column(schema.TOKEN_LOGPROB))
            if q.keep_end_of_turn:
                truncated = batch.column(schema.TRUNCATED).to_numpy(zero_copy_only=False)
                end_of_turn = end_of_turn_positions(token_offsets, loss_mask, truncated)
            else:
                end_of_turn = np.zeros(len(loss_mask), dtype=bool)
            token_pruned[index] = pruned_after_guards(
                token_offsets, loss_mask, end_of_turn, token_pruned[index], q.min_prunable_tokens
            )
            new_mask = prune_loss_mask(
                token_offsets,
                loss_mask,
                logprob,
                token_pruned[index],
                q.token_ratio,
                q.lam,
                q.token_policy,
                decisions.keys[index],
                end_of_turn,
            )
            rows = build_shard_rows(
                batch,
                decisions.quadrant[index],
                decisions.filled[index],
                token_pruned[index],
                new_mask,
                groups[index],
            )
            kept_loss[index] = rows.column(schema.NUM_LOSS_TOKENS).to_numpy()
            writer.add(rows, decisions.keys[index])
    return kept_loss, offset


def migration_from_parent(
    layout: OutputLayout, parent: int, stats: pa.Table, decisions: Decisions
) -> dict | None:
    """How samples moved since the parent version: quadrant matrix and keep-decision changes."""
    parent_dir = layout.data_dir(parent)
    if not (parent_dir / MANIFEST).is_file():
        return None
    columns = [schema.SAMPLE_ID, schema.QUADRANT]
    before = pl.concat(
        [
            pl.from_arrow(
                pq.ParquetDataset(parent_dir / VERSION_TRAIN).read(columns=columns)
            ).with_columns(kept=pl.lit(True)),
            pl.from_arrow(pq.read_table(parent_dir / DROPPED_INDEX, columns=columns)).with_columns(
                kept=pl.lit(False)
            ),
        ]
    )
    now = pl.DataFrame(
        {
            schema.SAMPLE_ID: stats.column(schema.SAMPLE_ID).to_pylist(),
            schema.QUADRANT: decisions.quadrant.astype(str),
            "kept": decisions.kept,
        }
    )
    joined = now.join(before, on=schema.SAMPLE_ID, how="inner", suffix="_parent")
    counts = joined.group_by(["quadrant_parent", schema.QUADRANT]).len()
    matrix = {str(q): {str(r): 0 for r in QUADRANTS} for q in QUADRANTS}
    for row in counts.iter_rows(named=True):
        matrix[row["quadrant_parent"]][row[schema.QUADRANT]] = int(row["len"])
    return {
        "parent": epoch_name(parent),
        "matched": joined.height,
        "quadrant_changed": int((joined[schema.QUADRANT] != joined["quadrant_parent"]).sum()),
        "kept_to_dropped": int((joined["kept_parent"] & ~joined["kept"]).sum()),
        "dropped_to_kept": int((~joined["kept_parent"] & joined["kept"]).sum()),
        "matrix": matrix,
    }


def run_triage(
    cfg: QTuneConfig, epoch: int | None = None, out_dir: str | Path | None = None
) -> TriageSummary:
    """Triage the scored cache of ``epoch`` (default: the newest) and publish ``data/epoch_NNN``
    into ``out_dir`` (default: ``output.dir``)."""
    check_output_location(cfg, str(out_dir) if out_dir is not None else None)
    source = output_layout(cfg.output.dir, cfg.output.work_dir, pull=False)
    target = output_layout(out_dir, pull=False) if out_dir else source
    with OutputLock(target.lock_file, "qtune triage"):
        pull_remote(source)
        if target is not source:
            pull_remote(target)
        check_writable(target)
        target.remove_stale_staging("triage-")
        return _triage(cfg, epoch, source, target)


def _triage(
    cfg: QTuneConfig, epoch: int | None, source: OutputLayout, target: OutputLayout
) -> TriageSummary:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    if epoch is None:
        scored = source.scored_epochs()
        epoch = scored[-1] if scored else 0
    scores_dir = source.scores_dir(epoch)
    files = sorted(scores_dir.glob("*.parquet")) if scores_dir.is_dir() else []
    if not files:
        raise PipelineError(
            f"no scored cache in {scores_dir}; run `qtune score` or `qtune run` first"
        )
    score_summary = json.loads(source.score_summary(epoch).read_text())
    target.check_publishable(target.data_dir(epoch))
    q = cfg.qtuning

    stages = StageTimings()
    columns = STAT_COLUMNS + ([schema.METADATA] if q.group_by not in (None, "file") else [])
    with stages.stage("read sample scores"):
        stats = pa.concat_tables([pq.read_table(f, columns=_present(f, columns)) for f in files])
        groups = sample_groups(stats, q.group_by)
    stages.stages[-1].rows = stats.num_rows
    timings["read_stats_s"] = time.perf_counter() - started
    tick = time.perf_counter()
    decisions = triage(
        q.policy,
        stats.column(schema.PPL).to_numpy(),
        stats.column(schema.ENTROPY).to_numpy(),
        stats.column(schema.N_TOKENS).to_numpy(),
        stats.column(schema.SAMPLE_ID),
        sample_ratio=q.sample_ratio,
        scope=q.scope,
        batch_size=q.batch_size,
        seed=q.seed,
        normalize=q.normalize,
        groups=groups if q.scope == "group" else None,
        group_ratios=q.group_ratios,
        min_group_size=q.min_group_size,
    )
    timings["triage_s"] = time.perf_counter() - tick
    stages.add("triage", timings["triage_s"], stats.num_rows)
    n_filled = int(decisions.filled.sum())
    if n_filled > decisions.kept.sum() / 2:
        logger.warning(
            "the EU-plane corners held only %d of the %d samples to keep; %d were filled by the "
            "support score |P - E| (PPL and entropy are strongly correlated here: a lower "
            "qtuning.sample_ratio or normalize=rank keeps more corner samples)",
            int(decisions.kept.sum()) - n_filled,
            int(decisions.kept.sum()),
            n_filled,
        )
    token_pruned = decisions.token_pruned & (q.token_policy != "none")
    logger.info(
        "triage (%s, %s scope): kept %d of %d samples; %d to token-prune",
        q.policy,
        q.scope,
        decisions.kept.sum(),
        len(decisions.kept),
        token_pruned.sum(),
    )

    tick = time.perf_counter()
    try:
        staging = target.new_staging_dir(f"triage-{epoch:03d}")
    except OSError as e:
        raise PipelineError(
            f"could not publish {epoch_name(epoch)} into {target.name}: {one_line(e)}"
        ) from e
    try:
        n_kept = int(decisions.kept.sum())
        if n_kept == 0:
            raise PipelineError(
                f"triage kept no sample of {len(decisions.kept):,}: every group is smaller "
                f"than qtuning.min_group_size ({q.min_group_size}) with r * n < 1; raise "
                "qtuning.sample_ratio or lower qtuning.min_group_size"
            )
        writer = ShardWriter(
            staging / VERSION_TRAIN, min(cfg.output.num_shards, n_kept), cfg.output.row_group_rows
        )
        to_prune = int(token_pruned.sum())
        with StepProgress("pruning and writing", len(decisions.kept)) as progress:
            kept_loss, offset = _prune_and_write(
                files, decisions, token_pruned, q, writer, progress, groups
            )
        if to_prune > token_pruned.sum():
            logger.info(
                "%d of the %d samples to token-prune kept every token: fewer than "
                "qtuning.min_prunable_tokens (%d) prunable response tokens",
                to_prune - int(token_pruned.sum()),
                to_prune,
                q.min_prunable_tokens,
            )
        if offset != len(decisions.kept):
            raise PipelineError(f"{scores_dir} changed while it was being triaged")
        shard_files = writer.close()
        shard_hashes = [file_sha256(f.path) for f in shard_files]
        publication = sha256_text(cfg.to_json() + "".join(shard_hashes))[:12]
        shard_files = stamp_files(shard_files, publication)
        dropped = _dropped_index(stats, decisions, q.policy, groups)
        pq.write_table(dropped, staging / DROPPED_INDEX, compression="zstd")
        timings["prune_write_s"] = time.perf_counter() - tick
        stages.add("prune tokens, write shards", timings["prune_write_s"], stats.num_rows)

        rejected_by_source = _rejects_by_source(source.rejects_dir(epoch))
        rejected = sum(rejected_by_source.values())
        counts = {
            "input_rows": int(score_summary["rows"]),
            "scored": len(decisions.kept),
            "kept": n_kept,
            "dropped": int(dropped.num_rows),
            "rejected": rejected,
            "response_tokens": int(stats.column(schema.N_RESPONSE_TOKENS).to_numpy().sum()),
            "kept_loss_tokens": int(kept_loss.sum()),
        }
        source_rows = score_summary.get("source_rows")
        if source_rows:
            per_source = source_accounting(source_rows, stats, decisions.kept, rejected_by_source)
            counts["per_source"] = per_source
        problems = accounting_problems(counts, counts.get("per_source"))
        if problems:
            raise PipelineError("row accounting does not add up: " + "; ".join(problems))
        quadrants = _quadrant_table(stats, decisions, token_pruned, kept_loss)
        group_coverage = {
            "group_by": q.group_by or "file",
            **coverage(groups, decisions.kept, kept_loss, q.coverage_min_fraction),
        }
        signals = selection_signals(stats.column(schema.PPL).to_numpy(), decisions.kept, kept_loss)
        warnings = selection_warnings(group_coverage, signals, q)
        for warning in warnings:
            logger.warning("%s", warning)
        migration = migration_from_parent(target, epoch - 1, stats, decisions) if epoch else None
        timings["total_s"] = time.perf_counter() - started
        manifest = {
            "version": epoch_name(epoch),
            "epoch": epoch,
            "parent": epoch_name(epoch - 1) if epoch > 0 else None,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "publication": publication,
            "files": [
                {
                    "path": str(f.path.relative_to(staging)),
                    "rows": f.rows,
                    "loss_tokens": f.loss_tokens,
                    "bytes": f.path.stat().st_size,
                    "sha256": digest,
                }
                for f, digest in zip(shard_files, shard_hashes, strict=True)
            ],
            "dropped_index": {
                "path": DROPPED_INDEX,
                "rows": int(dropped.num_rows),
                "sha256": file_sha256(staging / DROPPED_INDEX),
            },
            "counts": counts,
            "unreadable_sources": score_summary.get("unreadable_sources", []),
            "skipped_inputs": score_summary.get("skipped_inputs", []),
            "quadrants": quadrants,
            "thresholds": decisions.thresholds,
            "qtuning": q.model_dump(mode="json"),
            "config": json.loads(cfg.to_json()),
            "config_fingerprint": sha256_text(cfg.to_json()),
            "model": {
                "path": score_summary.get("model_path") or str(Path(cfg.model.path).absolute()),
                "fingerprint": score_summary.get("model_fingerprint"),
                **score_summary.get("extra", {}),
            },
            "migration": migration,
            "coverage": group_coverage,
            "signals": signals,
            "warnings": warnings,
            "scores": {"dir": str(scores_dir), "summary": score_summary},
            "timings": timings,
            "stages": {"scoring": score_summary.get("stages", []), "triage": stages.to_list()},
            "partial": {"limit": score_summary["limit"]} if score_summary.get("limit") else None,
        }
        fault_point("triage.staged")
        tick = time.perf_counter()
        version_dir = publish_version(target, epoch, staging, manifest)
        push(target)
        stages.add("publish", time.perf_counter() - tick)
    except OSError as e:
        raise PipelineError(
            f"could not publish {epoch_name(epoch)} into {target.name}: {one_line(e)}; nothing "
            "was published (the previous version, if any, is unchanged) and the partial files "
            "are removed"
        ) from e
    finally:
        target.remove_staging_dir(staging)
    return TriageSummary(
        version_dir=target.remote_location(version_dir) if target.remote else str(version_dir),
        output_dir=target.location,
        epoch=epoch,
        policy=q.policy,
        input_rows=counts["input_rows"],
        scored=counts["scored"],
        kept=counts["kept"],
        dropped=counts["dropped"],
        rejected=rejected,
        response_tokens=counts["response_tokens"],
        kept_loss_tokens=counts["kept_loss_tokens"],
        quadrants=quadrants,
        thresholds=decisions.thresholds,
        migration=migration,
        per_source=counts.get("per_source", {}),
        unreadable_sources=score_summary.get("unreadable_sources", []),
        skipped_inputs=score_summary.get("skipped_inputs", []),
        files=len(shard_files),
        stages=score_summary.get("stages", []) + stages.to_list(),
        coverage=group_coverage,
        signals=signals,
        warnings=warnings,
        limit=score_summary.get("limit"),
        seconds=time.perf_counter() - started,
        timings=timings,
    )
