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
5. only then, remote files the working copy no longer has (replaced versions, ``--restart``).

Before a job (or ``report`` / ``verify`` / ``inspect`` / ``load_version``) the working copy is
**pulled**: files the remote has and the copy lacks, or holds in another size, are downloaded;
files a push or pull recorded that have since gone from the remote are removed here too.
A record of what was last synced (size and mtime per file) lets a push skip unchanged files.

One writer per output at a time: the output lock lives in the working copy, so it keeps two
processes on one machine apart, not two machines sharing one remote output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qtune import storage
from qtune.pipeline.layout import SCORE_SUMMARY, SYNCED, OutputLayout

logger = logging.getLogger(__name__)

SYNC_RECORD = ".qtune-sync.json"
CONSUMED = ("data", "README.md", "LATEST")  # what a trainer reading versions needs
_SMALL_MUTABLE = {"README.md", "LATEST", "manifest.json", SCORE_SUMMARY, "_config.json"}
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

    ``only``: the top-level names to pull (a trainer needs ``data``, not the scored cache).
    An ``OutputLayout`` is returned as it is (pulled when asked).
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
    if relative == "LATEST":
        return 3
    if relative == "README.md":
        return 2
    if relative.rsplit("/", 1)[-1] in ("manifest.json", SCORE_SUMMARY):
        return 1
    return 0


def _synced(relative: str, only: tuple[str, ...] = SYNCED) -> bool:
    parts = relative.split("/")
    # Hidden names are temporaries and staging (".x.tmp-…", ".epoch_001.old-…").
    return parts[0] in only and not any(p.startswith(".") for p in parts)


def _local_files(
    layout: OutputLayout, only: tuple[str, ...] = SYNCED
) -> dict[str, tuple[int, int]]:
    files = {}
    for name in only:
        top = layout.root / name
        candidates = [top] if top.is_file() else (top.rglob("*") if top.is_dir() else [])
        for path in candidates:
            relative = path.relative_to(layout.root).as_posix()
            if path.is_file() and _synced(relative):
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


def push(layout: OutputLayout) -> int:
    """Publish the working copy's finished files to the remote output, in commit order.

    Returns how many files were uploaded. A no-op for a local output.
    """
    if layout.remote is None:
        return 0
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
    stale = sorted(set(remote) - set(local))
    for relative in stale:
        storage.remove(_remote(layout, relative))
        record.pop(relative, None)
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
    """Bring the working copy up to date with the remote output (the top-level names in
    ``only``). Returns how many files were downloaded."""
    if layout.remote is None:
        return 0
    remote = _remote_files(layout, only)
    local = _local_files(layout, only)
    record = _read_record(layout)
    wanted = [r for r, size in remote.items() if r not in local or local[r][0] != size]
    # Pointers and markers can change content at the same size (LATEST: epoch_001 -> _002).
    for relative in sorted(set(remote) - set(wanted)):
        if relative.rsplit("/", 1)[-1] in _SMALL_MUTABLE:
            text = storage.read_bytes(_remote(layout, relative))
            if text != (layout.root / relative).read_bytes():
                wanted.append(relative)
    with ThreadPoolExecutor(_THREADS) as pool:
        list(pool.map(lambda r: storage.download(_remote(layout, r), layout.root / r), wanted))
    # Synced earlier, gone from the remote since: another run replaced or discarded it.
    gone = [r for r in record if _synced(r, only) and r not in remote and r in local]
    for relative in gone:
        (layout.root / relative).unlink(missing_ok=True)
        record.pop(relative)
    local = _local_files(layout, only)
    record.update({r: list(local[r]) for r in remote if r in local})
    _write_record(layout, record)
    if wanted or gone:
        logger.info("pulled %d file(s) from %s into %s", len(wanted), layout.name, layout.root)
    return len(wanted)


def _remote(layout: OutputLayout, relative: str) -> str:
    assert layout.remote is not None
    return storage.join(layout.remote, *relative.split("/"))
