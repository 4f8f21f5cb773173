"""The one place that knows the file layout of an output directory (DESIGN section 6)."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

SCORE_SUMMARY = "_summary.json"  # written into a scored cache last; marks it complete
SCORE_CONFIG = "_config.json"


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}"


@dataclass(frozen=True)
class OutputLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).absolute())

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

    def new_staging_dir(self, label: str) -> Path:
        path = self.staging_root / f"{label}-{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        return path


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
