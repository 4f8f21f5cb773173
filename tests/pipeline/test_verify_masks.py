"""verify re-derives loss masks from the input: a mask moved onto the prompt is caught even when
every checksum, count and budget of the version has been made to agree with it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qtune import schema
from qtune.pipeline.layout import OutputLayout
from qtune.pipeline.publish import MANIFEST
from qtune.pipeline.verify import verify_version
from qtune.stages.shards import file_sha256


@pytest.fixture
def out(mixed, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(mixed["out"], copy)
    return copy


def _shift_loss_onto_the_prompt(out: Path) -> str:
    """Move one kept row's loss to the same number of prompt tokens, keeping labels, counts,
    budget and sha256 consistent: only a re-derivation can tell."""
    version = OutputLayout(out).data_dir(0)
    manifest = json.loads((version / MANIFEST).read_text())
    entry = manifest["files"][0]
    path = version / entry["path"]
    rows = pq.read_table(path).to_pylist()
    row = rows[0]
    ids = np.asarray(row[schema.INPUT_IDS])
    mask = np.asarray(row[schema.LOSS_MASK], dtype=bool)
    n = int(mask.sum())
    prompt = np.flatnonzero(~mask)[1 : n + 1]  # never token 0
    assert len(prompt) == n
    shifted = np.zeros_like(mask)
    shifted[prompt] = True
    row[schema.LOSS_MASK] = shifted.astype(np.int8).tolist()
    row[schema.LABELS] = np.where(shifted, ids, schema.IGNORE_INDEX).tolist()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.SHARD_SCHEMA), path, compression="zstd")
    entry["sha256"], entry["bytes"] = file_sha256(path), path.stat().st_size
    (version / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return row[schema.SAMPLE_ID]


def test_a_clean_run_rederives_every_mask(out, mixed):
    report = verify_version(out, full=True)
    assert report.ok, report.problems
    assert report.checks["masks_rederived"] == report.checks["rows"]
    assert not report.notes, report.notes
    sampled = verify_version(out)  # default: a sample (here every row: fewer than the sample)
    assert sampled.checks["masks_rederived"] == min(report.checks["rows"], 256)


def test_verify_does_not_log_the_inputs_the_run_already_skipped(out, caplog):
    """The corpus holds files that are not inputs (notes.txt, _SUCCESS, a dangling link): the run
    reported them; verify re-reading the corpus must not print them again above its "ok" line."""
    caplog.set_level(logging.DEBUG)
    assert verify_version(out).ok
    assert not [r for r in caplog.records if "skipped" in r.getMessage()], caplog.text


def test_a_mask_moved_onto_the_prompt_fails_verify(out):
    sample_id = _shift_loss_onto_the_prompt(out)
    report = verify_version(out, full=True)
    assert not report.ok
    assert [p for p in report.problems if "not the assistant's" in p and sample_id in p], (
        report.problems
    )
    # Nothing else noticed: the version agrees with itself.
    assert len(report.problems) == 1, report.problems


def test_masks_are_not_rederived_without_the_input(out, tmp_path):
    manifest_path = OutputLayout(out).data_dir(0) / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["config"]["input"]["path"] = str(tmp_path / "gone")
    manifest_path.write_text(json.dumps(manifest))
    report = verify_version(out)
    assert any("loss masks not re-derived" in n for n in report.notes), report.notes
