"""The one place that knows the file layout of an output directory (DESIGN section 6)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from qtune import storage
from qtune.pipeline.config import ConfigError

logger = logging.getLogger(__name__)

CARD = "README.md"  # the dataset card with the YAML `configs:` that datasets.load_dataset reads
LATEST = "LATEST"  # one line: the newest version's name
MANIFEST = "manifest.json"  # written into a version last; lists its files
SCORE_SUMMARY = "_summary.json"  # written into a scored cache last; marks it complete
SCORE_CONFIG = "_config.json"
VERSION_TRAIN = "train"  # a version's shard folder: data/epoch_NNN/train/part-*.parquet
DROPPED_INDEX = "dropped.parquet"  # a version's index of every dropped sample
DUPLICATES = "duplicates.parquet"  # a rejects folder's rows that repeat an earlier sample_id
STAGING = ".staging"
WATCH = ".watch"
#: The dataset card's first line after its front matter: how qtune knows a card is its own (and
#: may replace it). Cards written before the marker are known by their title.
CARD_MARKER = "<!-- qtune dataset card: rewritten on every publication, edits are lost -->"
_CARD_TITLE = "# qtune curated SFT data"
AREAS = ("data", "scores", "rejects")  # one folder per epoch in each

_EPOCH = re.compile(r"^epoch_(\d{3,})$")
_ASIDE = re.compile(r"^\.epoch_\d{3,}\.old-[0-9a-f]+$")  # publish_dir's old copy, if it crashed
_PART = re.compile(r"^part-\d+\.parquet$")  # a scored-cache or rejects part


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}"


def parse_epoch(name: str) -> int | None:
    """``epoch_007`` -> 7; None for any other name."""
    match = _EPOCH.match(name.strip())
    return int(match.group(1)) if match else None


def is_qtune_card(text: str) -> bool:
    """Whether a README.md is a dataset card qtune wrote (and may replace)."""
    return CARD_MARKER in text or any(line == _CARD_TITLE for line in text.splitlines())


# What a remote output holds (the rest of a working copy — lock, staging, resume state,
# merged-adapter cache, watch state — is this machine's own).
SYNCED = ("data", "scores", "rejects", CARD, LATEST)


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

    @property
    def card(self) -> Path:
        return self.root / CARD

    @property
    def latest(self) -> Path:
        return self.root / LATEST

    # --- what qtune wrote here, and what it did not ---------------------------------------------

    def qtune_files(self) -> set[Path]:
        """Every file here that qtune's own records say it wrote (what ``--restart`` removes).

        A version's manifest lists its files (its report lists its figures); a complete scored
        cache holds its summary, config and parts; a rejects folder its parts; staging, watch
        state, ``LATEST`` naming a version, and a dataset card carrying qtune's marker are
        qtune's. Inside those folders, hidden names are qtune's temporaries. Anything else —
        including the folders' other files — was not written by qtune.
        """
        owned: set[Path] = set()
        if self.card.is_file() and is_qtune_card(_read_text(self.card)):
            owned.add(self.card)
        if self.latest.is_file() and parse_epoch(_read_text(self.latest)) is not None:
            owned.add(self.latest)
        for name in (CARD, LATEST):  # write_atomic's temporaries of a killed run
            owned.update(p for p in self.root.glob(f".{name}.tmp-*") if p.is_file())
        for name in (STAGING, WATCH):
            owned.update(_files_under(self.root / name))
        for folder in self._epoch_folders("data"):
            owned.update(_version_files(folder))
        for folder in self._epoch_folders("scores"):
            if (folder / SCORE_SUMMARY).is_file() or _ASIDE.match(folder.name):
                owned.update(_named_files(folder, {SCORE_SUMMARY, SCORE_CONFIG}))
        for folder in self._epoch_folders("rejects"):
            owned.update(_named_files(folder, {DUPLICATES}))
        return owned

    def foreign_files(self, under: Path | None = None) -> list[Path]:
        """Files under ``under`` (default: the whole output) that qtune did not write.

        At the top level, hidden names are this machine's qtune state (lock, sync record,
        merged-adapter cache) and not listed. A symlink ``under`` is foreign itself.
        """
        return self._foreign(self.qtune_files(), self.root if under is None else under)

    def _foreign(self, owned: set[Path], top: Path) -> list[Path]:
        if top != self.root and (top.is_symlink() or (top.exists() and not top.is_dir())):
            return [top]
        if top == self.root:
            children = top.iterdir() if top.is_dir() else []
            tops = [child for child in children if not child.name.startswith(".")]
        else:
            tops = [top]
        return sorted(path for t in tops for path in _files_under(t) if path not in owned)

    def check_publishable(self, *replaced: Path) -> None:
        """Refuse (``ConfigError``) to publish here when that would replace a file qtune did
        not write: someone else's README.md or LATEST, a file where qtune's folders go, or any
        such file inside the folders in ``replaced`` (a version, scored cache or rejects folder,
        which publication replaces whole). Call before any work, with the lock held."""
        owned = self.qtune_files()
        for path, what in ((self.card, "dataset card"), (self.latest, "version pointer")):
            if (path.exists() or path.is_symlink()) and path not in owned:
                raise ConfigError(
                    f"output directory {self.name} holds a {path.name} that qtune did not write "
                    f"({path}); qtune writes its {what} there and never replaces another file: "
                    "move it away or choose another output directory"
                )
        for area in AREAS:
            path = self.root / area
            if path.exists() and not path.is_dir():
                raise ConfigError(
                    f"{path} is a file where qtune keeps its {area} folder: move it away or "
                    "choose another output directory"
                )
        for path in replaced:
            foreign = self._foreign(owned, path) if path.exists() or path.is_symlink() else []
            if foreign:
                shown = ", ".join(str(p) for p in foreign[:3])
                more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
                raise ConfigError(
                    f"{path} holds file(s) qtune did not write: {shown}{more}; qtune replaces "
                    "that folder as a whole and never deletes another file: move them away or "
                    "choose another output directory"
                )

    def _epoch_folders(self, area: str) -> list[Path]:
        """``<area>/epoch_NNN`` folders (and old copies a crashed replacement left); never a
        symlink, whose files are somewhere else."""
        root = self.root / area
        if not root.is_dir() or root.is_symlink():
            return []
        return [
            child
            for child in sorted(root.iterdir())
            if (_EPOCH.match(child.name) or _ASIDE.match(child.name))
            and child.is_dir()
            and not child.is_symlink()
        ]

    def remove_empty_folders(self) -> None:
        """Remove the folders qtune made (epoch folders and what is in them, ``data/``,
        ``scores/``, ``rejects/``, staging, watch state) once nothing is left in them."""
        folders = [self.root / name for name in (STAGING, WATCH)]
        for area in AREAS:
            folders += self._epoch_folders(area)
        for top in folders:
            if top.is_dir() and not top.is_symlink():
                for folder, _, _ in sorted(os.walk(top), reverse=True):  # deepest first
                    _remove_if_empty(Path(folder))
        for area in AREAS:
            if (self.root / area).is_dir() and not (self.root / area).is_symlink():
                _remove_if_empty(self.root / area)

    @property
    def staging_root(self) -> Path:
        # Outside data/ and scores/ so no glob over published files ever sees partial output.
        return self.root / STAGING

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
        return self.rejects / DUPLICATES

    def part_name(self, partition: int) -> str:
        return f"part-{partition:06d}.parquet"

    def marker(self, partition: int) -> Path:
        return self.done / f"part-{partition:06d}.json"


def partition_of_part(path: Path) -> int | None:
    """``part-000012.parquet`` -> 12 (scored-cache and rejects parts are named by partition)."""
    stem = path.name.removesuffix(".parquet").removeprefix("part-")
    return int(stem) if stem.isdigit() else None


def publish_dir(staged: Path, target: Path, owner: OutputLayout | None = None) -> None:
    """Move a fully written directory into place, replacing any previous one.

    The new directory appears under ``target`` with a single rename; an old one is first renamed
    aside (still complete), put back if the new one cannot be moved in, and deleted only after
    the new one is in place. ``owner``: the output directory ``target`` is in; a ``target``
    holding files qtune did not write is then refused (``ConfigError``), not replaced.
    """
    if owner is not None:
        owner.check_publishable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: something qtune did not write is left there


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _files_under(top: Path) -> list[Path]:
    """Every file (and symlink) under ``top``, without following symlinked folders."""
    if top.is_symlink() or top.is_file():
        return [top]
    if not top.is_dir():
        return []
    found = []
    for folder, dirs, files in os.walk(top):
        base = Path(folder)
        found += [base / name for name in files]
        found += [base / name for name in dirs if (base / name).is_symlink()]
    return found


def _inside(folder: Path, relative: str) -> Path | None:
    """``folder / relative`` when that stays inside ``folder`` (a record naming ``../x`` or an
    absolute path names no file of qtune's)."""
    path = folder / relative
    if os.path.isabs(relative) or ".." in Path(relative).parts:
        return None
    return path


def _hidden_files(folder: Path) -> set[Path]:
    """Files under a hidden name inside ``folder`` (qtune's temporaries)."""
    return {
        path
        for path in _files_under(folder)
        if any(part.startswith(".") for part in path.relative_to(folder).parts)
    }


def _named_files(folder: Path, names: set[str]) -> set[Path]:
    """A scored-cache or rejects folder's files: its parts, the given names, temporaries."""
    owned = _hidden_files(folder)
    owned.update(
        child
        for child in folder.iterdir()
        if child.is_file() and (child.name in names or _PART.match(child.name))
    )
    return owned


def _version_files(folder: Path) -> set[Path]:
    """A version's files as its manifest lists them (and its report's, as that lists them)."""
    manifest = folder / MANIFEST
    try:
        record = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return set()  # no manifest: not a version qtune published (or not one it can name)
    if not isinstance(record, dict):
        return set()
    listed = [entry.get("path") for entry in record.get("files") or [] if isinstance(entry, dict)]
    listed.append((record.get("dropped_index") or {}).get("path"))
    owned = {manifest} | _hidden_files(folder) | _report_files(folder)
    for relative in listed:
        path = _inside(folder, relative) if isinstance(relative, str) else None
        if path is not None and path.is_file():
            owned.add(path)
    return owned


def _report_files(version: Path) -> set[Path]:
    """The report of a version: its page, its stats and the figures its stats list."""
    from qtune.pipeline.report_job import INDEX, STATS, report_dir

    folder = report_dir(version)
    if not folder.is_dir() or folder.is_symlink():
        return set()
    names = {INDEX, STATS}
    try:
        figures = json.loads((folder / STATS).read_text()).get("figures") or {}
        names.update(str(name) for name in figures.values())
    except (OSError, ValueError, AttributeError):
        pass  # no stats: only the page and its stats file are known names
    owned = {folder / name for name in names if _inside(folder, name) is not None}
    return {path for path in owned if path.is_file()} | _hidden_files(folder)
