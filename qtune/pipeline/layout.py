"""The one place that knows the file layout of an output directory (DESIGN section 6)."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from qtune import storage

SCORE_SUMMARY = "_summary.json"  # written into a scored cache last; marks it complete
SCORE_CONFIG = "_config.json"
VERSION_TRAIN = "train"  # a version's shard folder: data/epoch_NNN/train/part-*.parquet
DROPPED_INDEX = "dropped.parquet"  # a version's index of every dropped sample


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}"


# What a remote output holds (the rest of a working copy — lock, staging, resume state,
# merged-adapter cache, watch state — is this machine's own).
SYNCED = ("data", "scores", "rejects", "README.md", "LATEST")


@dataclass(frozen=True)
class OutputLayout:
    """An output directory. With ``remote`` (a URI such as ``s3://bucket/run``), ``root`` is
    this machine's working copy of it: jobs work in ``root`` and ``remote_sync.push`` publishes
    what they finished (``remote_sync`` knows the order)."""

    root: Path
    remote: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).absolute())

    @property
    def location(self) -> str:
        """What to pass back to qtune to open this output again (the URI when remote)."""
        return self.remote or str(self.root)

    @property
    def name(self) -> str:
        """How people see this output (its URI when remote)."""
        return storage.without_query(self.remote) if self.remote else str(self.root)

    def remote_location(self, path: Path) -> str:
        """The remote counterpart of a file in the working copy."""
        if self.remote is None:
            raise ValueError(f"{self.root} is not the working copy of a remote output")
        return storage.join(self.remote, *path.relative_to(self.root).parts)

    def scores_dir(self, epoch: int) -> Path:
        return self.root / "scores" / epoch_name(epoch)

    def rejects_dir(self, epoch: int) -> Path:
        return self.root / "rejects" / epoch_name(epoch)

    def data_dir(self, epoch: int) -> Path:
        return self.root / "data" / epoch_name(epoch)

    def scored_epochs(self) -> list[int]:
        """Epochs with a complete scored cache (its summary is written before publication)."""
        root = self.root / "scores"
        if not root.is_dir():
            return []
        return sorted(
            int(p.name.removeprefix("epoch_"))
            for p in root.glob("epoch_*")
            if p.name.removeprefix("epoch_").isdigit() and (p / SCORE_SUMMARY).is_file()
        )

    def score_summary(self, epoch: int) -> Path:
        return self.scores_dir(epoch) / SCORE_SUMMARY

    @property
    def lock_file(self) -> Path:
        """Held by the one qtune process writing into this directory (``OutputLock``)."""
        return self.root / ".qtune.lock"

    def scoring_state(self, epoch: int, shared: bool = False) -> ScoringStateLayout:
        """Where an unfinished scoring of ``epoch`` keeps its plan and finished partitions.

        A fixed name (unlike other staging directories): re-running the same command finds it
        and resumes. ``shared``: writer tasks may run on other machines (a Ray cluster), so a
        remote output's fragments go to its storage rather than this machine's disk.
        """
        name = f"score-{epoch_name(epoch)}"
        if shared and self.remote is not None:
            return ScoringStateLayout(
                self.staging_root / name, storage.join(self.remote, ".staging", name, "fragments")
            )
        return ScoringStateLayout(self.staging_root / name)

    def derived_paths(self) -> list[Path]:
        """Everything qtune wrote here (what ``--restart`` removes); inputs are never here."""
        names = ["data", "scores", "rejects", ".staging", ".watch", "README.md", "LATEST"]
        return [self.root / name for name in names if (self.root / name).exists()]

    @property
    def staging_root(self) -> Path:
        # Outside data/ and scores/ so no glob over published files ever sees partial output.
        return self.root / ".staging"

    def remove_staging_dir(self, path: Path) -> None:
        """Remove a finished or failed staging directory (and the staging root once empty)."""
        shutil.rmtree(path, ignore_errors=True)
        try:
            self.staging_root.rmdir()
        except OSError:
            pass  # another run is staging, or already gone

    def remove_stale_staging(self, prefix: str) -> None:
        """Drop staging directories a killed run left behind (call with the output lock held)."""
        if self.staging_root.is_dir():
            for path in self.staging_root.glob(f"{prefix}*"):
                shutil.rmtree(path, ignore_errors=True)

    def new_staging_dir(self, label: str) -> Path:
        path = self.staging_root / f"{label}-{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        return path


@dataclass(frozen=True)
class ScoringStateLayout:
    """Files of a resumable scoring run (all under the output's staging root).

    ``plan.json`` (partitions + fingerprint) is written first; the writer tasks put fragments
    in ``fragments/``; a finished partition becomes ``scores/part-NNNNNN.parquet`` (+ rejects)
    and then gets its marker ``done/part-NNNNNN.json`` — a partition without a marker is redone.
    """

    root: Path
    shared_fragments: str | None = None  # a URI the writer tasks on every node can reach

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def fragments(self) -> str | Path:
        return self.shared_fragments or self.root / "fragments"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects"

    @property
    def done(self) -> Path:
        return self.root / "done"

    @property
    def dedup(self) -> Path:
        """Written once duplicate sample_ids are moved to rejects (makes that step idempotent)."""
        return self.root / "dedup.json"

    @property
    def duplicates(self) -> Path:
        return self.rejects / "duplicates.parquet"

    def part_name(self, partition: int) -> str:
        return f"part-{partition:06d}.parquet"

    def marker(self, partition: int) -> Path:
        return self.done / f"part-{partition:06d}.json"


def partition_of_part(path: Path) -> int | None:
    """``part-000012.parquet`` -> 12 (scored-cache and rejects parts are named by partition)."""
    stem = path.name.removesuffix(".parquet").removeprefix("part-")
    return int(stem) if stem.isdigit() else None


def publish_dir(staged: Path, target: Path) -> None:
    """Move a fully written directory into place, replacing any previous one.

    The new directory appears under ``target`` with a single rename; an old one is first renamed
    aside (still complete) and deleted only after the new one is in place.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(staged, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
