"""verify_version: a clean version passes; each kind of damage is reported by name."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qtune import schema
from qtune.demo.synthetic_cache import write_synthetic_cache
from qtune.pipeline.config import QTuneConfig
from qtune.pipeline.layout import OutputLayout
from qtune.pipeline.publish import MANIFEST
from qtune.pipeline.triage_job import run_triage
from qtune.pipeline.verify import VerifyError, verify_version
from qtune.stages.shards import file_sha256

N = 400
REJECTED = 7
KEPT = 100  # sample_ratio 0.25


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """One version published from a synthetic scored cache (no model); tests copy it."""
    out = tmp_path_factory.mktemp("verify") / "out"
    write_synthetic_cache(
        out, N, response_tokens=30, prompt_tokens=10, rows_per_file=128, rejected=REJECTED
    )
    cfg = QTuneConfig.model_validate(
        {
            "input": {"path": "unused.jsonl"},
            "model": {"path": "unused"},
            "output": {"dir": str(out), "num_shards": 4},
            "qtuning": {"sample_ratio": 0.25, "token_ratio": 0.5},
        }
    )
    run_triage(cfg)
    return out


@pytest.fixture
def out(published, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(published, copy)
    return copy


def _version(out: Path) -> Path:
    return OutputLayout(out).data_dir(0)


def _manifest(out: Path) -> dict:
    return json.loads((_version(out) / MANIFEST).read_text())


def _write_manifest(out: Path, manifest: dict) -> None:
    (_version(out) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _rewrite_row(
    out: Path, pick: Callable[[pa.Table], int], edit: Callable[[dict], None]
) -> tuple[str, str, dict]:
    """Edit one row of one shard (same schema), then re-seal the file's sha256 and bytes in the
    manifest so only the content checks can see it. Returns (shard path, sample_id, row before)."""
    manifest = _manifest(out)
    for entry in manifest["files"]:
        path = _version(out) / entry["path"]
        table = pq.read_table(path)
        row = pick(table)
        if row >= 0:
            break
    else:
        raise AssertionError("no shard has a row to edit")
    rows = table.to_pylist()
    before = json.loads(json.dumps(rows[row]))
    edit(rows[row])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.SHARD_SCHEMA), path, compression="zstd")
    entry["sha256"] = file_sha256(path)
    entry["bytes"] = path.stat().st_size
    _write_manifest(out, manifest)
    return entry["path"], before[schema.SAMPLE_ID], before


def _first(table: pa.Table, column: str, value: object) -> int:
    hits = np.flatnonzero(np.asarray(table.column(column).to_pylist()) == value)
    return int(hits[0]) if len(hits) else -1


def test_a_clean_version_verifies_with_everything_counted(out):
    report = verify_version(out)
    assert report.ok, report.problems
    assert report.epoch == 0 and report.version_dir == str(_version(out))
    manifest = _manifest(out)
    checks = report.checks
    assert checks["shards"] == len(manifest["files"]) == 4
    assert checks["files_hashed"] == 5  # four shards and the dropped index
    assert checks["rows"] == KEPT and checks["dropped_rows"] == N - KEPT
    assert checks["rejected_rows"] == REJECTED
    assert checks["loss_tokens"] == manifest["counts"]["kept_loss_tokens"]
    assert checks["budget_rows"] == KEPT and checks["sample_ids"] == N
    assert checks["card_configs"] == 1
    # A synthetic cache has no model or input to re-derive masks from (test_verify_masks does).
    assert report.notes == [
        "loss masks not re-derived: the model directory is not here (unused, "
        f"{Path('unused').absolute()})"
    ]
    assert verify_version(out, epoch=0).checks == checks
    assert report.summary().startswith("epoch_000: ok (")


def test_a_truncated_shard_is_reported_by_name(out):
    rel = _manifest(out)["files"][1]["path"]
    path = _version(out) / rel
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    problems = verify_version(out).problems
    assert any(p.startswith(f"{rel}: sha256 ") for p in problems), problems
    assert f"{rel}: {len(data) // 2:,} bytes, the manifest lists {len(data):,}" in problems
    assert any(p.startswith(f"{rel}: unreadable Parquet (") for p in problems), problems
    assert any(
        p.startswith(f"{MANIFEST}: counts.kept is {KEPT} but the shards hold ")
        and p.endswith(" (without 1 missing or unreadable shard(s))")
        for p in problems
    ), problems


def test_a_flipped_loss_mask_value_is_caught_by_the_row_check(out):
    def pick(table: pa.Table) -> int:
        return 0

    def flip(row: dict) -> None:
        i = row[schema.LOSS_MASK].index(1)
        row[schema.LOSS_MASK][i] = 0  # labels still carry the token

    rel, sample_id, _ = _rewrite_row(out, pick, flip)
    problems = verify_version(out).problems
    assert not any("sha256" in p or "bytes" in p for p in problems), problems
    assert f"{rel}: 1 row(s) with loss_mask != (labels != -100): {sample_id}" in problems
    assert f"{rel}: 1 row(s) with num_loss_tokens != sum(loss_mask): {sample_id}" in problems


def test_an_edited_manifest_count_is_reported(out):
    manifest = _manifest(out)
    manifest["counts"]["kept"] += 1
    _write_manifest(out, manifest)
    problems = verify_version(out).problems
    assert f"{MANIFEST}: counts.kept is {KEPT + 1} but the shards hold {KEPT}" in problems
    counts = manifest["counts"]
    assert (
        f"{MANIFEST}: counts.kept {KEPT + 1} + dropped {counts['dropped']} + rejected "
        f"{REJECTED} != input_rows {N + REJECTED}"
    ) in problems
    assert len(problems) == 2, problems


def test_a_row_without_loss_tokens_is_reported(out):
    def zero(row: dict) -> None:
        row[schema.LOSS_MASK] = [0] * len(row[schema.LOSS_MASK])
        row[schema.LABELS] = [schema.IGNORE_INDEX] * len(row[schema.LABELS])
        row[schema.NUM_LOSS_TOKENS] = 0

    rel, sample_id, _ = _rewrite_row(out, lambda t: 2, zero)
    problems = verify_version(out).problems
    assert (
        f"{rel}: 1 row(s) with kept sample with no loss token (num_loss_tokens < 1): {sample_id}"
    ) in problems
    assert not any("loss_mask != (labels" in p for p in problems), problems


def test_a_token_budget_violation_is_the_only_problem(out):
    """One more label in a token-pruned row, every total re-sealed: only the budget sees it."""

    def add_label(row: dict) -> None:
        i = row[schema.LOSS_MASK].index(0)
        row[schema.LOSS_MASK][i] = 1
        row[schema.LABELS][i] = row[schema.INPUT_IDS][i]
        row[schema.NUM_LOSS_TOKENS] += 1

    rel, sample_id, before = _rewrite_row(
        out, lambda t: _first(t, schema.TOKEN_PRUNED, True), add_label
    )
    manifest = _manifest(out)
    next(f for f in manifest["files"] if f["path"] == rel)["loss_tokens"] += 1
    manifest["counts"]["kept_loss_tokens"] += 1
    manifest["quadrants"][before[schema.QUADRANT]]["kept_loss_tokens"] += 1
    _write_manifest(out, manifest)

    cache = pq.ParquetDataset(OutputLayout(out).scores_dir(0)).read(
        columns=[schema.SAMPLE_ID, schema.N_RESPONSE_TOKENS]
    )
    n = dict(zip(*(c.to_pylist() for c in cache.columns), strict=True))[sample_id]
    # The end-of-turn guard: one end-of-turn token per turn, out of the budget and kept.
    budget = max(1, int(np.floor(0.5 * (n - 1)))) + 1
    assert before[schema.NUM_LOSS_TOKENS] == budget
    problems = verify_version(out).problems
    assert problems == [
        f"1 token-pruned sample(s) over the token budget max(1, floor(0.5 * prunable)) + "
        f"end-of-turn tokens: {sample_id} ({budget + 1} > {budget} of {n})"
    ]


def test_a_missing_cache_skips_the_budget_with_a_note(out):
    shutil.rmtree(OutputLayout(out).scores_dir(0))
    report = verify_version(out)
    assert report.ok, report.problems
    assert "budget_rows" not in report.checks
    assert report.notes[0] == "token budget not checked: no scored cache in scores/epoch_000"


def test_an_extra_shard_and_a_foreign_column_are_reported(out):
    manifest = _manifest(out)
    first = manifest["files"][0]["path"]
    # A stray file under the card's pattern: datasets would load it as part of the version.
    stray = f"part-00009-of-00004-{manifest['publication']}.parquet"
    extra = Path(first).with_name(stray).as_posix()
    table = pq.read_table(_version(out) / first)
    noted = table.append_column("note", pa.array(["x"] * table.num_rows))
    pq.write_table(noted, _version(out) / extra)
    problems = verify_version(out).problems
    assert f"{extra}: Parquet file in train/ not listed in the manifest" in problems
    assert any(
        p.startswith("README.md: config 'epoch_000' pattern(s)")
        and p.endswith(f"also match file(s) not in the manifest: data/epoch_000/{extra}")
        for p in problems
    ), problems

    # A listed shard with an extra column: schema named, rows still checked.
    pq.write_table(noted, _version(out) / first)
    assert f"{first}: schema is not SHARD_SCHEMA: unexpected note" in verify_version(out).problems


def test_per_source_counts_are_checked_when_present(out):
    manifest = _manifest(out)
    counts = manifest["counts"]
    counts["per_source"] = {
        "synthetic.jsonl": {
            "input_rows": N + REJECTED,
            "kept": KEPT,
            "dropped": counts["dropped"],
            "rejected": REJECTED,
        }
    }
    _write_manifest(out, manifest)
    report = verify_version(out)
    assert report.ok, report.problems
    assert report.checks["sources"] == 1

    counts["per_source"]["synthetic.jsonl"]["kept"] -= 1
    _write_manifest(out, manifest)
    problems = verify_version(out).problems
    label = "counts.per_source['synthetic.jsonl']"
    assert f"{MANIFEST}: {label}.kept is {KEPT - 1} but the shards hold {KEPT}" in problems
    assert (
        f"{MANIFEST}: {label} kept {KEPT - 1} + dropped {counts['dropped']} + rejected "
        f"{REJECTED} != input_rows {N + REJECTED}"
    ) in problems


def test_nothing_to_verify_raises_verify_error(tmp_path):
    with pytest.raises(VerifyError, match=f"{tmp_path}: no published version"):
        verify_version(tmp_path)
    with pytest.raises(VerifyError, match="no such output directory"):
        verify_version(tmp_path / "absent")
    with pytest.raises(VerifyError, match="epoch_003 is not published"):
        verify_version(tmp_path, epoch=3)
