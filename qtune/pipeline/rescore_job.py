"""Dynamic pruning, offline: re-score the corpus with a checkpoint and publish the next epoch.

Epoch e is scored with the checkpoint that finished epoch e-1 (DESIGN section 2). The token ids
come from the previous scored cache — never re-tokenised, so they cannot drift between epochs —
and the checkpoint's tokenizer must equal the corpus tokenizer. Rows rejected at ingest stay
rejected: their records are carried into the new epoch so every version accounts for every row.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq

from qtune.pipeline.config import QTuneConfig, check_output_location
from qtune.pipeline.errors import PipelineError
from qtune.pipeline.layout import OutputLayout, epoch_name, partition_of_part
from qtune.pipeline.lock import OutputLock
from qtune.pipeline.publish import model_fingerprint, published_epochs, read_manifest
from qtune.pipeline.remote_sync import check_writable, output_layout, pull_remote
from qtune.pipeline.score_job import ScoreSummary, build_rescore_dataset, execute_scoring
from qtune.pipeline.scoring_state import ScoringPlan, fingerprint_key
from qtune.pipeline.triage_job import TriageSummary, run_triage

logger = logging.getLogger(__name__)


def next_epoch(layout: OutputLayout) -> int:
    """The epoch a re-score publishes by default.

    One past the newest published version — or a scored epoch that never got published (a run
    killed between scoring and publication), which is re-done rather than skipped.
    """
    published = published_epochs(layout)
    newest = published[-1] if published else -1
    unpublished = [e for e in layout.scored_epochs() if e > max(newest, 0)]
    return unpublished[0] if unpublished else max(newest, 0) + 1


def checkpoint_fingerprint(cfg: QTuneConfig, checkpoint: str | Path) -> str:
    """Content fingerprint of a checkpoint as given (what manifests record)."""
    from qtune.pipeline.checkpoints import resolve_checkpoint

    layout = output_layout(cfg.output.dir, cfg.output.work_dir, pull=False)
    return resolve_checkpoint(
        checkpoint, base_model=cfg.model.path, cache_dir=layout.root / ".cache" / "merged"
    ).fingerprint


def published_epoch_of(cfg: QTuneConfig, fingerprint: str) -> int | None:
    """The published epoch whose manifest records this checkpoint fingerprint, if any."""
    layout = output_layout(cfg.output.dir, cfg.output.work_dir)
    for epoch in published_epochs(layout):
        checkpoint = read_manifest(layout, epoch).get("model", {}).get("checkpoint") or {}
        if checkpoint.get("fingerprint") == fingerprint:
            return epoch
    return None


def rescore_plan(
    cfg: QTuneConfig, layout: OutputLayout, source_epoch: int, model_dir: Path, checkpoint_fp: str
) -> ScoringPlan:
    """One partition per scored-cache part of ``source_epoch`` (same numbering)."""
    parent = ScoreSummary.from_json(layout.score_summary(source_epoch).read_text())
    parts = sorted(layout.scores_dir(source_epoch).glob("*.parquet"))
    partitions = []
    for i, part in enumerate(parts):
        index = partition_of_part(part)
        # On a cluster the readers run on other machines: they read a remote output's pushed
        # copy of the part, not this machine's.
        shared = layout.remote is not None and cfg.ray.address
        partitions.append(
            {
                "index": i if index is None else index,
                "source": str(part),
                "path": layout.remote_location(part) if shared else str(part),
                "row_count": pq.ParquetFile(part).metadata.num_rows,
            }
        )
    settings = {
        "backend": cfg.scoring.backend,
        "dtype": cfg.scoring.dtype,
        "token_ids_from": epoch_name(source_epoch),
    }
    return ScoringPlan(
        partitions=partitions,
        fingerprint={
            "input": parent.fingerprint.get("input", ""),
            "token ids": fingerprint_key(parent.fingerprint) if parent.fingerprint else "",
            "model": model_fingerprint(model_dir),
            "checkpoint": checkpoint_fp,
            "settings": json.dumps(settings, sort_keys=True),
        },
        source_rows=parent.source_rows,
        unreadable=parent.unreadable_sources,
        skipped=parent.skipped_inputs,
    )


def run_rescore(
    cfg: QTuneConfig, checkpoint: str | Path, epoch: int | None = None, restart: bool = False
) -> tuple[ScoreSummary, TriageSummary]:
    """Score with ``checkpoint`` into ``scores/epoch_N``, triage, publish ``data/epoch_N``.

    Resumes an interrupted re-score of the same epoch and checkpoint; ``restart`` discards one
    made with another checkpoint or settings.
    """
    check_output_location(cfg)
    layout = output_layout(cfg.output.dir, cfg.output.work_dir, pull=False)
    with OutputLock(layout.lock_file, "qtune rescore"):
        pull_remote(layout)
        check_writable(layout)
        return _rescore(cfg, layout, checkpoint, epoch, restart)


def _rescore(
    cfg: QTuneConfig,
    layout: OutputLayout,
    checkpoint: str | Path,
    epoch: int | None,
    restart: bool,
) -> tuple[ScoreSummary, TriageSummary]:
    from qtune.pipeline.checkpoints import check_same_tokenizer, resolve_checkpoint

    epoch = next_epoch(layout) if epoch is None else epoch
    if epoch < 1:
        raise PipelineError("re-scoring publishes epoch 1 or later; epoch 0 comes from `qtune run`")
    earlier = [e for e in layout.scored_epochs() if e < epoch]
    if not earlier:
        raise PipelineError(
            f"no scored cache before epoch {epoch} in {layout.name}; run `qtune run` first"
        )
    source_epoch = earlier[-1]
    layout.check_publishable(
        layout.scores_dir(epoch), layout.rejects_dir(epoch), layout.data_dir(epoch)
    )
    resolved = resolve_checkpoint(
        checkpoint, base_model=cfg.model.path, cache_dir=layout.root / ".cache" / "merged"
    )
    check_same_tokenizer(cfg.model.path, resolved.model_dir)
    plan = rescore_plan(cfg, layout, source_epoch, Path(resolved.model_dir), resolved.fingerprint)
    logger.info(
        "re-scoring epoch %d with %s checkpoint %s (token ids from epoch %d)",
        epoch,
        resolved.kind,
        resolved.path,
        source_epoch,
    )
    score_summary = execute_scoring(
        cfg,
        epoch,
        str(resolved.model_dir),
        plan,
        lambda pending, fragments: build_rescore_dataset(
            cfg, pending, str(resolved.model_dir), fragments
        ),
        n_sources=len(plan.source_rows) or len(plan.partitions),
        carried_rejects=layout.rejects_dir(source_epoch),
        extra={
            "checkpoint": {
                "path": str(resolved.path),
                "kind": resolved.kind,
                "fingerprint": resolved.fingerprint,
                "model_dir": str(resolved.model_dir),
                "base": str(resolved.base) if resolved.base else None,
                "warnings": list(resolved.warnings),
            },
            "token_ids_from": epoch_name(source_epoch),
        },
        restart=restart,
    )
    triage_summary = run_triage(cfg, epoch=epoch)
    logger.info("published epoch %d: %s", epoch, asdict(triage_summary)["version_dir"])
    return score_summary, triage_summary
