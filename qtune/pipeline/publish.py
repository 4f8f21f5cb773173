"""Publication of a version: manifest, dataset card with `configs:`, LATEST; and fingerprints.

A version is staged outside ``data/`` (``<out>/.staging``), its ``manifest.json`` written last,
then the directory is moved into ``data/epoch_NNN`` in one rename. ``README.md`` (the YAML
``configs:`` that ``datasets.load_dataset`` reads, one config per epoch, newest ``default``) and
``LATEST`` are then each replaced atomically: both are written to temporary files *before* the
version moves, so that after the move only renames are left (a full disk cannot stop a
publication half-way). The card carries ``CARD_MARKER``: qtune replaces only its own card.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from qtune import storage
from qtune.faults import fault_point
from qtune.pipeline.errors import PipelineError, one_line
from qtune.pipeline.layout import (
    CARD_MARKER,
    MANIFEST,
    VERSION_TRAIN,
    OutputLayout,
    epoch_name,
    parse_epoch,
    publish_dir,
)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a temporary file, fsync it, ``os.replace`` it over ``path``, fsync the directory.

    Readers see the old or the new file, never a partial one; the fsyncs make the change
    survive a machine crash too (manifests, LATEST and the watcher's state depend on it). A
    failed write (a full disk) leaves ``path`` as it was and no temporary file behind.
    """
    _commit(_write_temporary(path, text), path)


def _write_temporary(path: Path, text: str | bytes) -> Path:
    """``text`` (UTF-8) or bytes in a synced temporary file beside ``path`` (removed again if
    writing fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if isinstance(text, str):
                text = text.encode("utf-8")
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _commit(tmp: Path, path: Path) -> None:
    """Rename a written temporary file over ``path`` and sync the directory."""
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open directories; the rename itself is atomic
    try:
        os.fsync(fd)
    except OSError:
        pass  # directory fsync unsupported here (some network filesystems)
    finally:
        os.close(fd)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _digest_size_and_ends(digest: Any, location: str | Path) -> None:
    """Size and the first and last MiB: a rewritten file changes its bytes at one end or both.

    Local or remote (``s3://…``) alike: only the ends are read, never the whole file.
    """
    filesystem, path = storage.resolve(location)
    with filesystem.open_input_file(path) as f:
        size = f.size()
        digest.update(str(size).encode())
        digest.update(f.read_at(min(size, 1 << 20), 0))
        digest.update(f.read_at(min(size, 1 << 20), max(0, size - (1 << 20))))


def model_fingerprint(model_path: str | Path) -> str:
    """Content fingerprint of a model directory, cheap enough for multi-GB checkpoints.

    sha256 over config and tokenizer files in full, and for each weight file its name, size and
    the first and last MiB (a changed checkpoint changes its tensors' bytes at both ends).
    """
    root = Path(model_path)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        if path.name.startswith((".", "_")):
            continue
        digest.update(path.name.encode())
        if path.suffix in {".safetensors", ".bin", ".pt", ".gguf"}:
            _digest_size_and_ends(digest, path)
        elif path.suffix in {".json", ".jinja", ".model", ".txt"}:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def input_fingerprint(paths: list[str | Path]) -> str:
    """Fingerprint of input files (or saved-dataset directories): path, size and end bytes.

    Remote files (``s3://…``) count by location without its query, size and end bytes.
    """
    digest = hashlib.sha256()
    local = sorted(Path(p).absolute() for p in paths if not storage.is_remote(p))
    for root in local:
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for path in files:
            digest.update(str(path).encode())
            _digest_size_and_ends(digest, path)
    for location in sorted(str(p) for p in paths if storage.is_remote(p)):
        digest.update(storage.without_query(location).encode())
        _digest_size_and_ends(digest, location)
    return digest.hexdigest()


def published_epochs(layout: OutputLayout) -> list[int]:
    """Epochs under data/ that have a manifest (complete versions), ascending."""
    data = layout.root / "data"
    if not data.is_dir():
        return []
    epochs = []
    for child in data.iterdir():
        epoch = parse_epoch(child.name)
        if epoch is not None and (child / MANIFEST).is_file():
            epochs.append(epoch)
    return sorted(epochs)


def latest_epoch(layout: OutputLayout) -> int | None:
    if layout.latest.is_file():
        epoch = parse_epoch(layout.latest.read_text())
        if epoch is not None:
            return epoch
    epochs = published_epochs(layout)
    return epochs[-1] if epochs else None


def read_manifest(layout: OutputLayout, epoch: int) -> dict[str, Any]:
    return json.loads((layout.data_dir(epoch) / MANIFEST).read_text())


def dataset_card(layout: OutputLayout, pending: dict[int, dict[str, Any]] | None = None) -> str:
    """README.md with the YAML ``configs:`` that datasets.load_dataset(<out>) reads.

    ``pending``: manifests of versions about to be published (by epoch), counted as published.
    """
    pending = pending or {}
    manifests = {epoch: read_manifest(layout, epoch) for epoch in published_epochs(layout)}
    manifests.update(pending)
    epochs = sorted(manifests)
    configs = []
    for epoch in epochs:
        # The publication stamp in the pattern keys datasets' cache to this exact publication.
        stamp = manifests[epoch].get("publication", "")
        pattern = (
            f"data/{epoch_name(epoch)}/{VERSION_TRAIN}/part-*{'-' + stamp if stamp else ''}.parquet"
        )
        config: dict[str, Any] = {
            "config_name": epoch_name(epoch),
            "data_files": [{"split": "train", "path": pattern}],
        }
        if epoch == epochs[-1]:
            config["default"] = True
        configs.append(config)
    front = yaml.safe_dump({"configs": configs}, sort_keys=False)
    lines = ["---", front.rstrip(), "---", CARD_MARKER, "", "# qtune curated SFT data", ""]
    lines.append("Curated with qtune (Q-Tuning). Each config is one epoch's version; the newest is")
    lines.append("the default. Load with:")
    lines += ["", "```python", "from datasets import load_dataset", ""]
    lines.append(f'train = load_dataset("{layout.name}")["train"]  # newest epoch')
    if epochs:
        lines.append(
            f'train = load_dataset("{layout.name}", name="{epoch_name(epochs[-1])}")["train"]'
        )
    lines += ["```", "", "| version | kept | dropped | rejected | kept loss tokens |"]
    lines.append("|---|---|---|---|---|")
    for epoch in epochs:
        counts = manifests[epoch]["counts"]
        lines.append(
            f"| {epoch_name(epoch)} | {counts['kept']:,} | {counts['dropped']:,} | "
            f"{counts['rejected']:,} | {counts['kept_loss_tokens']:,} |"
        )
    return "\n".join(lines) + "\n"


def publish_version(layout: OutputLayout, epoch: int, staged: Path, manifest: dict) -> Path:
    """Write the manifest last, move the version into place, then card and LATEST.

    Card and LATEST are written to temporary files before the move and renamed after it.
    Refuses (``ConfigError``) a version folder or card holding files qtune did not write.
    """
    for name in (layout.card.name, layout.latest.name):  # left by a killed publication
        for stale in layout.root.glob(f".{name}.tmp-*"):
            stale.unlink(missing_ok=True)
    write_atomic(staged / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    target = layout.data_dir(epoch)
    newest = max([*published_epochs(layout), epoch])
    prepared: list[tuple[Path, Path]] = []
    try:
        for path, text in (
            (layout.card, dataset_card(layout, {epoch: manifest})),
            (layout.latest, epoch_name(newest) + "\n"),
        ):
            prepared.append((_write_temporary(path, text), path))
        publish_dir(staged, target, layout)
    except BaseException:
        for tmp, _ in prepared:
            tmp.unlink(missing_ok=True)
        raise
    fault_point("triage.moved")
    try:
        for tmp, path in prepared:
            _commit(tmp, path)
    except OSError as e:
        raise PipelineError(
            f"{target} is published but {layout.card.name} / {layout.latest.name} could not be "
            f"updated: {one_line(e)}; re-run the same command to finish"
        ) from e
    return target
