"""Outputs on object storage (``output.dir: s3://bucket/run``): a working copy, pushed in order.

Object stores have no rename, so a version cannot appear in one atomic step the way it does on a
local disk. qtune therefore works in a local *working copy* of a remote output (the same layout:
lock, resume state, scored cache, versions) and, after each job, **pushes** what changed, in an
order that keeps every reader consistent:

1. data files (shards, dropped index, scored-cache and rejects parts, report), new names only
   ever (a version's shards carry their publication stamp);
2. completion markers: a scored cache's ``_summary.json``, a version's ``manifest.json``;
3. the dataset card ``README.md``;
4. ``LATEST`` (one PUT: a reader sees the old or the new name, never half);
5. only then, remote files this working copy synced before and no longer has (replaced
   versions, ``--restart``); a remote file it has no record of is never deleted.

Before a job (or ``report`` / ``verify`` / ``inspect`` / ``load_version``) the working copy is
**pulled**. A record of what was last synced (size and mtime per file) is the common base of a
three-way comparison: a file changed or deleted here since the last sync is this machine's
unpushed work and is never overwritten or brought back; otherwise the remote's version wins
(downloaded when it differs, removed here when it is gone there).

One writer per output at a time: the output lock lives in the working copy, so it keeps two
processes on one machine apart, not two machines sharing one remote output.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qtune import storage
from qtune.pipeline.errors import PipelineError
from qtune.pipeline.layout import (
    CARD,
    LATEST,
    MANIFEST,
    SCORE_CONFIG,
    SCORE_SUMMARY,
    SYNCED,
    OutputLayout,
)

logger = logging.getLogger(__name__)

SYNC_RECORD = ".qtune-sync.json"
# What a trainer choosing a version needs (then only that version's folder).
CONSUMED = (LATEST, CARD, f"data/*/{MANIFEST}")
_SMALL_MUTABLE = {CARD, LATEST, MANIFEST, SCORE_SUMMARY, SCORE_CONFIG}
_THREADS = 8


def default_work_dir(uri: str) -> Path:
    """``$QTUNE_CACHE_DIR`` (default ``~/.cache/qtune``) ``/outputs/<name>-<hash>``."""
    base = Path(os.environ.get("QTUNE_CACHE_DIR") or Path.home() / ".cache" / "qtune")
    shown = storage.without_query(uri)
    digest = hashlib.sha256(shown.encode()).hexdigest()[:12]
    return base / "outputs" / f"{storage.name(shown) or 'output'}-{digest}"


def output_layout(
    location: str | os.PathLike | OutputLayout,
    work_dir: str | os.PathLike | None = None,
    pull: bool = True,
    only: tuple[str, ...] = SYNCED,
) -> OutputLayout:
    """The layout of an output directory or URI (for a URI: its working copy, pulled first).

    ``only``: what to pull, as paths or patterns (``data/*/manifest.json``); a folder includes
    everything under it. An ``OutputLayout`` is returned as it is (pulled when asked).
    """
    if isinstance(location, OutputLayout):
        if pull:
            pull_remote(location, only)
        return location
    if not storage.is_remote(location):
        return OutputLayout(Path(str(location).removeprefix("file://")))
    uri = str(location)
    layout = OutputLayout(Path(work_dir) if work_dir else default_work_dir(uri), remote=uri)
    layout.root.mkdir(parents=True, exist_ok=True)
    if pull:
        pull_remote(layout, only)
    return layout


def _commit_rank(relative: str) -> int:
    """Upload order: data, then completion markers, then the card, then LATEST."""
    if relative == LATEST:
        return 3
    if relative == CARD:
        return 2
    if relative.rsplit("/", 1)[-1] in (MANIFEST, SCORE_SUMMARY):
        return 1
    return 0


def _synced(relative: str, only: tuple[str, ...] = SYNCED) -> bool:
    parts = relative.split("/")
    # Hidden names are temporaries and staging (".x.tmp-…", ".epoch_001.old-…").
    if parts[0] not in SYNCED or any(p.startswith(".") for p in parts):
        return False
    return any(
        relative == pattern
        or relative.startswith(pattern + "/")
        or fnmatch.fnmatch(relative, pattern)
        for pattern in only
    )


def _local_files(
    layout: OutputLayout, only: tuple[str, ...] = SYNCED
) -> dict[str, tuple[int, int]]:
    files = {}
    for name in SYNCED:
        top = layout.root / name
        candidates = [top] if top.is_file() else (top.rglob("*") if top.is_dir() else [])
        for path in candidates:
            relative = path.relative_to(layout.root).as_posix()
            if _synced(relative, only) and path.is_file():
                stat = path.stat()
                files[relative] = (stat.st_size, stat.st_mtime_ns)
    return files


def _remote_files(layout: OutputLayout, only: tuple[str, ...] = SYNCED) -> dict[str, int]:
    assert layout.remote is not None
    return {k: v for k, v in storage.list_files(layout.remote).items() if _synced(k, only)}


def _read_record(layout: OutputLayout) -> dict[str, list[int]]:
    path = layout.root / SYNC_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_record(layout: OutputLayout, record: dict[str, list[int]]) -> None:
    from qtune.pipeline.publish import write_atomic

    write_atomic(layout.root / SYNC_RECORD, json.dumps(record, sort_keys=True))


def check_writable(layout: OutputLayout) -> None:
    """Fail before any work when the remote output cannot be written (bucket, credentials)."""
    if layout.remote is None:
        return
    probe = storage.join(layout.remote, ".staging", f".write-check-{os.getpid()}")
    try:
        storage.write_bytes(probe, b"qtune")
        storage.remove(probe)
    except OSError as e:
        raise PipelineError(f"output.dir {layout.name} cannot be written: {e}") from e


def push(layout: OutputLayout) -> int:
    """Publish the working copy's finished files to the remote output, in commit order.

    Returns how many files were uploaded. A no-op for a local output.
    """
    if layout.remote is None:
        return 0
    try:
        return _push(layout)
    except OSError as e:
        raise PipelineError(
            f"publishing to {layout.name} failed: {e}. The work is complete in {layout.root}; "
            "re-running the same command pushes it"
        ) from e


def _push(layout: OutputLayout) -> int:
    local = _local_files(layout)
    remote = _remote_files(layout)
    record = _read_record(layout)
    changed = [
        relative
        for relative, (size, mtime) in local.items()
        if remote.get(relative) != size or record.get(relative) != [size, mtime]
    ]
    by_rank: dict[int, list[str]] = {}
    for relative in changed:
        by_rank.setdefault(_commit_rank(relative), []).append(relative)
    uploaded = 0
    with ThreadPoolExecutor(_THREADS) as pool:
        for rank in sorted(by_rank):
            names = sorted(by_rank[rank])
            # Each rank completes before the next starts: a marker never precedes its data.
            list(pool.map(lambda r: storage.upload(layout.root / r, _remote(layout, r)), names))
            uploaded += len(names)
            for relative in names:
                record[relative] = list(local[relative])
            _write_record(layout, record)
    # Only what this working copy synced before and has removed since (a replaced version,
    # --restart): a remote file qtune has no record of is someone else's and stays.
    gone = set(remote) - set(local)
    stale = sorted(r for r in gone if r in record)
    for relative in stale:
        storage.remove(_remote(layout, relative))
        record.pop(relative, None)
    unknown = sorted(gone - set(stale))
    if unknown:
        logger.warning(
            "left %d file(s) in %s that this working copy has no record of (first: %s)",
            len(unknown),
            layout.name,
            unknown[0],
        )
    _write_record(layout, {k: v for k, v in record.items() if k in local})
    if uploaded or stale:
        logger.info(
            "pushed %d file(s) to %s%s",
            uploaded,
            layout.name,
            f", removed {len(stale)} replaced file(s)" if stale else "",
        )
    return uploaded


def pull_remote(layout: OutputLayout, only: tuple[str, ...] = SYNCED) -> int:
    """Bring the working copy up to date with the remote output (the paths or patterns in
    ``only``), keeping this machine's unpushed work. Returns how many files were downloaded."""
    if layout.remote is None:
        return 0
    try:
        return _pull(layout, only)
    except OSError as e:
        raise PipelineError(f"reading {layout.name} failed: {e}") from e


def _pull(layout: OutputLayout, only: tuple[str, ...]) -> int:
    remote = _remote_files(layout, only)
    local = _local_files(layout, only)
    record = _read_record(layout)

    def unpushed(relative: str) -> bool:
        """Changed or deleted here since the last sync (or never synced, but present)."""
        base = record.get(relative)
        here = local.get(relative)
        return (
            here is not None
            and (base is None or list(here) != base)
            or (here is None and base is not None)
        )

    wanted = []
    for relative, size in sorted(remote.items()):
        if unpushed(relative):
            continue
        if relative not in local or local[relative][0] != size:
            wanted.append(relative)
        elif relative.rsplit("/", 1)[-1] in _SMALL_MUTABLE:
            # Pointers and markers can change content at the same size (LATEST: 001 -> 002).
            if (
                storage.read_bytes(_remote(layout, relative))
                != (layout.root / relative).read_bytes()
            ):
                wanted.append(relative)
    with ThreadPoolExecutor(_THREADS) as pool:
        list(pool.map(lambda r: storage.download(_remote(layout, r), layout.root / r), wanted))
    # Synced earlier, unchanged here, gone from the remote since: replaced or discarded there.
    gone = [r for r in local if r not in remote and not unpushed(r)]
    for relative in gone:
        (layout.root / relative).unlink(missing_ok=True)
        record.pop(relative, None)
    # A remote deletion of a file deleted here too: nothing left to carry out.
    for relative in [r for r in record if _synced(r, only) and r not in remote and r not in local]:
        record.pop(relative)
    fresh = _local_files(layout, only)
    record.update({r: list(fresh[r]) for r in wanted if r in fresh})
    _write_record(layout, record)
    if wanted or gone:
        logger.info("pulled %d file(s) from %s into %s", len(wanted), layout.name, layout.root)
    return len(wanted)


def read_latest(layout: OutputLayout) -> str | None:
    """The remote's LATEST as it is now (read directly: polling never touches the copy)."""
    if layout.remote is None:
        path = layout.latest
        return path.read_text().strip() if path.is_file() else None
    try:
        return storage.read_bytes(_remote(layout, LATEST)).decode().strip()
    except FileNotFoundError:
        return None


def _remote(layout: OutputLayout, relative: str) -> str:
    assert layout.remote is not None
    return storage.join(layout.remote, *relative.split("/"))
