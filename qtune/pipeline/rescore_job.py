"""Dynamic pruning, offline: re-score the corpus with a checkpoint and publish the next epoch.

Epoch e is scored with the checkpoint that finished epoch e-1 (DESIGN section 2). The token ids
come from the previous scored cache — never re-tokenised, so they cannot drift between epochs —
and the checkpoint's tokenizer must equal the corpus tokenizer. Rows rejected at ingest stay
rejected: their records are carried into the new epoch so every version accounts for every row.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from qtune.pipeline.config import QTuneConfig
from qtune.pipeline.layout import OutputLayout
from qtune.pipeline.publish import published_epochs, read_manifest
from qtune.pipeline.score_job import (
    PipelineError,
    ScoreSummary,
    build_rescore_dataset,
    execute_scoring,
)
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

    layout = OutputLayout(Path(cfg.output.dir))
    return resolve_checkpoint(
        checkpoint, base_model=cfg.model.path, cache_dir=layout.root / ".cache" / "merged"
    ).fingerprint


def published_epoch_of(cfg: QTuneConfig, fingerprint: str) -> int | None:
    """The published epoch whose manifest records this checkpoint fingerprint, if any."""
    layout = OutputLayout(Path(cfg.output.dir))
    for epoch in published_epochs(layout):
        checkpoint = read_manifest(layout, epoch).get("model", {}).get("checkpoint") or {}
        if checkpoint.get("fingerprint") == fingerprint:
            return epoch
    return None


def run_rescore(
    cfg: QTuneConfig, checkpoint: str | Path, epoch: int | None = None
) -> tuple[ScoreSummary, TriageSummary]:
    """Score with ``checkpoint`` into ``scores/epoch_N``, triage, publish ``data/epoch_N``."""
    from qtune.pipeline.checkpoints import check_same_tokenizer, resolve_checkpoint

    layout = OutputLayout(Path(cfg.output.dir))
    epoch = next_epoch(layout) if epoch is None else epoch
    if epoch < 1:
        raise PipelineError("re-scoring publishes epoch 1 or later; epoch 0 comes from `qtune run`")
    earlier = [e for e in layout.scored_epochs() if e < epoch]
    if not earlier:
        raise PipelineError(
            f"no scored cache before epoch {epoch} in {layout.root}; run `qtune run` first"
        )
    source_epoch = earlier[-1]
    resolved = resolve_checkpoint(
        checkpoint, base_model=cfg.model.path, cache_dir=layout.root / ".cache" / "merged"
    )
    check_same_tokenizer(cfg.model.path, resolved.model_dir)
    cache_files = sorted(layout.scores_dir(source_epoch).glob("*.parquet"))
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
        lambda scores, rejects: build_rescore_dataset(
            cfg, cache_files, str(resolved.model_dir), scores, rejects
        ),
        n_sources=len(cache_files),
        carried_rejects=layout.rejects_dir(source_epoch),
        extra={
            "checkpoint": {
                "path": str(resolved.path),
                "kind": resolved.kind,
                "fingerprint": resolved.fingerprint,
                "model_dir": str(resolved.model_dir),
            },
            "token_ids_from": f"epoch_{source_epoch:03d}",
        },
    )
    triage_summary = run_triage(cfg, epoch=epoch)
    logger.info("published epoch %d: %s", epoch, asdict(triage_summary)["version_dir"])
    return score_summary, triage_summary
