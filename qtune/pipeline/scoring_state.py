"""Resumable scoring: a plan of partitions, completion markers, and the finishing steps.

A scoring run keeps its state in ``ScoringStateLayout`` (a fixed directory per epoch under the
output's staging root). The plan (partitions and a fingerprint of input, model and settings) is
written first. Writer tasks leave fragments; when every row of a partition has arrived, the
driver turns its fragments into ``part-NNNNNN.parquet`` (rows in source order) and writes the
partition's marker. Re-running the same command after a crash reads the plan, checks the
fingerprint, discards whatever has no marker, and scores only the remaining partitions. The
finishing steps (moving duplicate sample ids to rejects, the summary, publication) are each
idempotent, so a crash between any two of them is resumed too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from qtune import schema, storage
from qtune.faults import fault_point
from qtune.pipeline.errors import PipelineError
from qtune.pipeline.layout import (
    SCORE_CONFIG,
    SCORE_SUMMARY,
    OutputLayout,
    ScoringStateLayout,
    partition_of_part,
    publish_dir,
)
from qtune.pipeline.publish import write_atomic
from qtune.schema import RejectReason
from qtune.stages.write import STATS_SCHEMA, fragment_files, partition_stats, write_parquet

logger = logging.getLogger(__name__)

PLAN_FORMAT = 1
# Reads the original text of some rows of a partition: (partition, row indices) -> {row: text}.
RawTextReader = Callable[[dict[str, Any], list[int]], dict[int, str]]


@dataclass
class ScoringPlan:
    """What a scoring run will produce: partitions (each with ``index``, ``source`` and
    ``row_count``, plus what its reader needs) and the fingerprint it is valid for."""

    partitions: list[dict[str, Any]]
    fingerprint: dict[str, str]  # named parts, so a mismatch can say what changed
    source_rows: dict[str, int] = field(default_factory=dict)
    unreadable: list[dict[str, str]] = field(default_factory=list)  # [{path, error}]
    skipped: list[dict[str, str]] = field(default_factory=list)  # [{path, reason}]: not inputs
    limit: int | None = None  # --limit: only the first N input rows (a partial run)

    @property
    def rows(self) -> int:
        return sum(p["row_count"] for p in self.partitions)

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, **asdict(self)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ScoringPlan:
        data = json.loads(text)
        data.pop("format", None)
        return cls(**data)


def fingerprint_key(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def changed_parts(old: dict[str, str], new: dict[str, str]) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _empty_totals() -> dict[str, Any]:
    totals: dict[str, Any] = {name: 0 for name in STATS_SCHEMA.names if name != "reasons"}
    totals["reasons"] = Counter()
    return totals


def _add_stats(totals: dict[str, Any], stats: dict[str, Any], sign: int = 1) -> None:
    for name in STATS_SCHEMA.names:
        if name == "reasons":
            reasons = stats["reasons"]
            totals["reasons"].update(json.loads(reasons) if isinstance(reasons, str) else reasons)
        else:
            totals[name] += sign * stats[name]


class ScoringState:
    """The on-disk state of one epoch's scoring. Not thread-safe: the driver owns it."""

    def __init__(self, layout: ScoringStateLayout, plan: ScoringPlan):
        self.layout = layout
        self.plan = plan
        self._by_index = {p["index"]: p for p in plan.partitions}
        self._received: dict[int, dict[str, dict[str, Any]]] = {}
        self.resumed = 0  # partitions found complete when the state was opened

    # --- opening and resuming -------------------------------------------------------------

    def open(self, restart: bool = False) -> None:
        """Resume the state that matches the plan, or start afresh. Raises PipelineError when a
        state for another plan is there (unless ``restart``: then it is discarded)."""
        root = self.layout.root
        if self.layout.plan.is_file():
            old = ScoringPlan.from_json(self.layout.plan.read_text())
            if old.fingerprint != self.plan.fingerprint:
                if not restart:
                    changed = ", ".join(changed_parts(old.fingerprint, self.plan.fingerprint))
                    raise PipelineError(
                        f"{root} holds an unfinished scoring run made with a different "
                        f"{changed}; it is not reused. Re-run with --restart to discard it."
                    )
                logger.warning("discarding the unfinished scoring run in %s (--restart)", root)
                shutil.rmtree(root)
            elif restart:
                logger.warning("discarding the unfinished scoring run in %s (--restart)", root)
                shutil.rmtree(root)
        elif root.exists():
            shutil.rmtree(root)  # died before its plan was written: nothing to keep
        self.layout.done.mkdir(parents=True, exist_ok=True)
        if not self.layout.plan.is_file():
            write_atomic(self.layout.plan, self.plan.to_json())
        # Nothing is in flight now: fragments and parts without a marker are leftovers.
        storage.remove_tree(self.layout.fragments)
        if not storage.is_remote(self.layout.fragments):
            Path(self.layout.fragments).mkdir(parents=True)
        done = self.done_partitions()
        if not self.finalized:
            for directory in (self.layout.scores, self.layout.rejects):
                for path in directory.glob("*.parquet") if directory.is_dir() else []:
                    if partition_of_part(path) is not None and partition_of_part(path) not in done:
                        path.unlink()
        for stray in root.rglob(".*.tmp-*"):
            stray.unlink()
        self.resumed = len(done)
        if done:
            logger.info(
                "resuming: %d of %d partitions were scored by an earlier run (%s)",
                len(done),
                len(self.plan.partitions),
                root,
            )

    def done_partitions(self) -> set[int]:
        if not self.layout.done.is_dir():
            return set()
        return {
            int(p.stem.removeprefix("part-"))
            for p in self.layout.done.glob("part-*.json")
            if p.stem.removeprefix("part-").isdigit()
        }

    def pending(self) -> list[dict[str, Any]]:
        done = self.done_partitions()
        return [p for p in self.plan.partitions if p["index"] not in done]

    @property
    def finalized(self) -> bool:
        return (self.layout.scores / SCORE_SUMMARY).is_file()

    # --- partitions arriving ---------------------------------------------------------------

    def record(self, fragments: pa.Table) -> list[int]:
        """Take the writer's ``FRAGMENT_STATS_SCHEMA`` rows; complete partitions now whole.

        Returns the partitions completed by this call.
        """
        completed = []
        for row in fragments.to_pylist():
            partition = row["partition"]
            received = self._received.setdefault(partition, {})
            received[row["fragment"]] = row  # a retried task reports the same fragment again
            if sum(r["rows"] for r in received.values()) >= self._by_index[partition]["row_count"]:
                self._complete(partition)
                completed.append(partition)
        return completed

    def _complete(self, partition: int) -> None:
        expected = self._by_index[partition]["row_count"]
        received = sorted(self._received.pop(partition).values(), key=lambda r: r["first_row"])
        name = self.layout.part_name(partition)
        scores_part, rejects_part = self.layout.scores / name, self.layout.rejects / name
        fragment_paths = [fragment_files(self.layout.fragments, r["fragment"]) for r in received]
        if len(received) == 1 and received[0]["rows"] == expected:
            stats = {k: received[0][k] for k in STATS_SCHEMA.names}
            for source, target in zip(fragment_paths[0], (scores_part, rejects_part), strict=True):
                if storage.is_file(source):
                    _move_into(source, target)
        else:
            # Several fragments (Ray split the partition), maybe overlapping (a retried task
            # re-batched): merge, order by row, keep each row once.
            scored = _merge_by_row([f for f, _ in fragment_paths], schema.SCORED_CACHE_SCHEMA)
            rejected = _merge_by_row([f for _, f in fragment_paths], schema.REJECTS_SCHEMA)
            if scored.num_rows + rejected.num_rows != expected:
                raise PipelineError(
                    f"partition {partition} ({self._by_index[partition]['source']}): "
                    f"{scored.num_rows + rejected.num_rows} rows came back, the plan has {expected}"
                )
            write_parquet(scored, scores_part)
            write_parquet(rejected, rejects_part)
            stats = partition_stats(scored, rejected.column(schema.REASON))
            for pair in fragment_paths:
                for path in pair:
                    storage.remove(path)
        marker = {"partition": partition, "source": self._by_index[partition]["source"], **stats}
        write_atomic(self.layout.marker(partition), json.dumps(marker, sort_keys=True))
        fault_point("score.partition_done")

    def check_complete(self) -> None:
        missing = self.pending()
        if missing:
            raise PipelineError(
                f"scoring ended with {len(missing)} partition(s) incomplete (first: "
                f"{missing[0]['source']} rows {missing[0].get('row_start', 0)}+); re-run the "
                "same command to finish them"
            )

    # --- finishing -------------------------------------------------------------------------

    def totals(self) -> dict[str, Any]:
        """Summed counts of every partition, after duplicates moved to rejects."""
        totals = _empty_totals()
        for marker in sorted(self.layout.done.glob("part-*.json")):
            _add_stats(totals, json.loads(marker.read_text()))
        if self.layout.dedup.is_file():
            dedup = json.loads(self.layout.dedup.read_text())
            if dedup["rows"]:
                _add_stats(totals, dedup["stats"], sign=-1)
                totals["rows"] += dedup["rows"]
                totals["rejected"] += dedup["rows"]
                totals["reasons"][RejectReason.DUPLICATE_SAMPLE_ID.value] += dedup["rows"]
        return totals

    def deduplicate(self, raw_text: RawTextReader) -> int:
        """Move every repeat of a sample_id (all but its first row in source order) to rejects.

        Returns how many rows moved. Written in an order that a crash can resume: the rejects
        file, then ``dedup.json``, then the rewritten parts (re-applied on resume).
        """
        if self.layout.dedup.is_file():
            dedup = json.loads(self.layout.dedup.read_text())
            self._drop_rows({int(p): rows for p, rows in dedup["partitions"].items()})
            return dedup["rows"]
        parts = sorted(self.layout.scores.glob("part-*.parquet"))
        frames = [
            pl.from_arrow(
                pq.read_table(part, columns=[schema.SAMPLE_ID, schema.SOURCE, schema.ROW_INDEX])
            ).with_columns(partition=pl.lit(partition_of_part(part), dtype=pl.Int64))
            for part in parts
        ]
        ids = pl.concat(frames) if frames else pl.DataFrame()
        repeats = ids.filter(~pl.col(schema.SAMPLE_ID).is_first_distinct()) if frames else ids
        if repeats.is_empty():
            write_atomic(self.layout.dedup, json.dumps({"rows": 0, "partitions": {}}))
            return 0
        firsts = ids.filter(pl.col(schema.SAMPLE_ID).is_first_distinct())
        repeats = repeats.join(firsts, on=schema.SAMPLE_ID, suffix="_first", how="left")
        by_partition: dict[int, list[int]] = {}
        for partition, row in repeats.select("partition", schema.ROW_INDEX).iter_rows():
            by_partition.setdefault(partition, []).append(row)
        scored_rows, raw = [], {}
        for partition, rows in sorted(by_partition.items()):
            table = pq.read_table(self.layout.scores / self.layout.part_name(partition))
            keep = np.isin(table.column(schema.ROW_INDEX).to_numpy(), rows)
            scored_rows.append(table.filter(pa.array(keep)))
            texts = raw_text(self._by_index[partition], rows)
            raw.update({(partition, r): t for r, t in texts.items()})
        rejects = pa.table(
            {
                schema.SAMPLE_ID: repeats[schema.SAMPLE_ID].to_list(),
                schema.SOURCE: repeats[schema.SOURCE].to_list(),
                schema.ROW_INDEX: repeats[schema.ROW_INDEX].to_list(),
                schema.REASON: [RejectReason.DUPLICATE_SAMPLE_ID.value] * repeats.height,
                schema.DETAIL: [
                    f"sample_id {sid!r} first seen at {src}:{row}"
                    for sid, src, row in repeats.select(
                        schema.SAMPLE_ID, f"{schema.SOURCE}_first", f"{schema.ROW_INDEX}_first"
                    ).iter_rows()
                ],
                schema.RAW: [
                    raw.get((p, r))
                    for p, r in repeats.select("partition", schema.ROW_INDEX).iter_rows()
                ],
            },
            schema=schema.REJECTS_SCHEMA,
        )
        write_parquet(rejects, self.layout.duplicates)
        dedup = {
            "rows": repeats.height,
            "partitions": {str(p): rows for p, rows in by_partition.items()},
            "stats": partition_stats(pa.concat_tables(scored_rows), pa.array([], pa.string())),
        }
        write_atomic(self.layout.dedup, json.dumps(dedup, sort_keys=True))
        fault_point("score.dedup_written")
        self._drop_rows(by_partition)
        logger.warning(
            "%d row(s) repeat an earlier row's sample_id; rejected as %s (first: %s)",
            repeats.height,
            RejectReason.DUPLICATE_SAMPLE_ID.value,
            rejects.column(schema.DETAIL)[0].as_py(),
        )
        return repeats.height

    def _drop_rows(self, by_partition: dict[int, list[int]]) -> None:
        for partition, rows in by_partition.items():
            part = self.layout.scores / self.layout.part_name(partition)
            if not part.is_file():
                continue  # every row of the part was a repeat; already removed
            table = pq.read_table(part)
            keep = ~np.isin(table.column(schema.ROW_INDEX).to_numpy(), rows)
            if keep.all():
                continue  # rewritten by an earlier, interrupted run
            if keep.any():
                write_parquet(table.filter(pa.array(keep)), part)
            else:
                part.unlink()

    def finalize(self, summary_json: str, config_json: str, carried_rejects: list[Path]) -> None:
        """Write config and summary (last: it marks the cache complete) into the state."""
        self.layout.scores.mkdir(parents=True, exist_ok=True)
        self.layout.rejects.mkdir(parents=True, exist_ok=True)
        for part in carried_rejects:
            shutil.copy2(part, self.layout.rejects / part.name)
        write_atomic(self.layout.scores / SCORE_CONFIG, config_json)
        write_atomic(self.layout.scores / SCORE_SUMMARY, summary_json)

    def publish(
        self, rejects_dir: Path, scores_dir: Path, owner: OutputLayout | None = None
    ) -> None:
        """Move rejects, then the scored cache (whose summary marks completion) into place.

        ``owner``: the output directory; a folder there holding files qtune did not write is
        refused, not replaced (``publish_dir``).
        """
        if self.layout.rejects.is_dir():
            publish_dir(self.layout.rejects, rejects_dir, owner)
        fault_point("score.rejects_published")
        if self.layout.scores.is_dir():
            publish_dir(self.layout.scores, scores_dir, owner)


def _move_into(source: str, target: Path) -> None:
    """A fragment into the state: renamed when local, downloaded when on shared storage."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if storage.is_remote(source):
        storage.download(source, target)
        storage.remove(source)
    else:
        os.replace(source, target)


def _merge_by_row(paths: list[str], table_schema: pa.Schema) -> pa.Table:
    tables = [storage.read_table(p) for p in paths if storage.is_file(p)]
    if not tables:
        return table_schema.empty_table()
    merged = pa.concat_tables(tables).sort_by(schema.ROW_INDEX)
    _, first = np.unique(merged.column(schema.ROW_INDEX).to_numpy(), return_index=True)
    return merged.take(pa.array(first)).cast(table_schema)
