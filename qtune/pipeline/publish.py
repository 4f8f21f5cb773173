"""Publication of a version: manifest, dataset card with `configs:`, LATEST; and fingerprints.

A version is staged outside ``data/`` (``<out>/.staging``), its ``manifest.json`` written last,
then the directory is moved into ``data/epoch_NNN`` in one rename. ``README.md`` (the YAML
``configs:`` that ``datasets.load_dataset`` reads, one config per epoch, newest ``default``) and
``LATEST`` are then each replaced atomically (write a temporary file, ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from qtune import storage
from qtune.faults import fault_point
from qtune.pipeline.layout import VERSION_TRAIN, OutputLayout, epoch_name, publish_dir

MANIFEST = "manifest.json"
_EPOCH_DIR = re.compile(r"^epoch_(\d{3,})$")


def write_atomic(path: Path, text: str) -> None:
    """Write a temporary file, fsync it, ``os.replace`` it over ``path``, fsync the directory.

    Readers see the old or the new file, never a partial one; the fsyncs make the change
    survive a machine crash too (manifests, LATEST and the watcher's state depend on it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
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
        match = _EPOCH_DIR.match(child.name)
        if match and (child / MANIFEST).is_file():
            epochs.append(int(match.group(1)))
    return sorted(epochs)


def latest_epoch(layout: OutputLayout) -> int | None:
    latest = layout.root / "LATEST"
    if latest.is_file():
        match = _EPOCH_DIR.match(latest.read_text().strip())
        if match:
            return int(match.group(1))
    epochs = published_epochs(layout)
    return epochs[-1] if epochs else None


def read_manifest(layout: OutputLayout, epoch: int) -> dict[str, Any]:
    return json.loads((layout.data_dir(epoch) / MANIFEST).read_text())


def dataset_card(layout: OutputLayout) -> str:
    """README.md with the YAML ``configs:`` that datasets.load_dataset(<out>) reads."""
    epochs = published_epochs(layout)
    configs = []
    for epoch in epochs:
        # The publication stamp in the pattern keys datasets' cache to this exact publication.
        stamp = read_manifest(layout, epoch).get("publication", "")
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
    lines = ["---", front.rstrip(), "---", "", "# qtune curated SFT data", ""]
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
        counts = read_manifest(layout, epoch)["counts"]
        lines.append(
            f"| {epoch_name(epoch)} | {counts['kept']:,} | {counts['dropped']:,} | "
            f"{counts['rejected']:,} | {counts['kept_loss_tokens']:,} |"
        )
    return "\n".join(lines) + "\n"


def publish_version(layout: OutputLayout, epoch: int, staged: Path, manifest: dict) -> Path:
    """Write the manifest last, move the version into place, then card and LATEST."""
    write_atomic(staged / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    target = layout.data_dir(epoch)
    publish_dir(staged, target)
    fault_point("triage.moved")
    write_atomic(layout.root / "README.md", dataset_card(layout))
    newest = published_epochs(layout)[-1]
    write_atomic(layout.root / "LATEST", epoch_name(newest) + "\n")
    return target
