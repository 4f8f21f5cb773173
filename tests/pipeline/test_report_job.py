"""write_report on versions published from synthetic scored caches (no model, no Ray)."""

from __future__ import annotations

import json
import re
import shutil
from html import unescape
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from qtune import schema
from qtune.demo.synthetic_cache import write_synthetic_cache
from qtune.pipeline.config import MIN_PRUNABLE_TOKENS, QTuneConfig
from qtune.pipeline.layout import OutputLayout
from qtune.pipeline.report_job import FIGURES, ReportError, write_report
from qtune.pipeline.triage_job import run_triage
from qtune.pipeline.verify import verify_version
from qtune.stages.report import QUADRANT_ORDER, SECTION_IDS
from tests.stages.test_report import TagChecker

N = 400
REJECTED = 5


def publish_versions(out: Path, epochs: int = 2) -> Path:
    """Publish ``epochs`` versions of one synthetic corpus (same sample ids, new scores each
    epoch) into ``out``, as ``qtune rescore`` would: epoch e > 0 has epoch e - 1 as parent."""
    cfg = QTuneConfig.model_validate(
        {
            "input": {"path": "unused.jsonl"},
            "model": {"path": "unused"},
            "output": {"dir": str(out), "num_shards": 3},
            "qtuning": {"sample_ratio": 0.25, "token_ratio": 0.5},
        }
    )
    for epoch in range(epochs):
        write_synthetic_cache(
            out,
            N,
            response_tokens=20,
            prompt_tokens=8,
            rows_per_file=150,
            rejected=REJECTED,
            epoch=epoch,
            seed=epoch,
        )
        run_triage(cfg, epoch=epoch)
    return out


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    return publish_versions(tmp_path_factory.mktemp("report") / "out")


@pytest.fixture(scope="module")
def reports(published) -> dict[int, Path]:
    """The report of each epoch (written once; the tests only read them)."""
    paths = {}
    for epoch in (0, 1):
        paths[epoch] = write_report(published, epoch)
    return paths


@pytest.fixture
def out(published, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(published, copy)
    return copy


def _manifest(out: Path, epoch: int) -> dict:
    return json.loads((OutputLayout(out).data_dir(epoch) / "manifest.json").read_text())


def _stats(index: Path) -> dict:
    return json.loads((index.parent / "stats.json").read_text())


def _example_blocks(page: str) -> dict[str, str]:
    """sample_id -> the HTML of its example block."""
    blocks = {}
    for block in page.split('<div class="example"')[1:]:
        sample_id = unescape(re.search(r"<h4>(.*?)</h4>", block).group(1))
        blocks[sample_id] = block
    return blocks


def _cache_rows(out: Path, epoch: int, columns: list[str]) -> dict[str, dict]:
    table = pq.ParquetDataset(OutputLayout(out).scores_dir(epoch)).read(
        columns=[schema.SAMPLE_ID, *columns]
    )
    return {row[schema.SAMPLE_ID]: row for row in table.to_pylist()}


def _shard_rows(out: Path, epoch: int) -> dict[str, dict]:
    table = pq.ParquetDataset(OutputLayout(out).data_dir(epoch) / "train").read(
        columns=[schema.SAMPLE_ID, schema.LOSS_MASK, schema.NUM_LOSS_TOKENS]
    )
    return {row[schema.SAMPLE_ID]: row for row in table.to_pylist()}


def test_report_has_every_section_and_valid_figures(published, reports):
    for epoch, index in reports.items():
        assert index == OutputLayout(published).data_dir(epoch) / "report" / "index.html"
        page = index.read_text()
        checker = TagChecker().check(page)
        assert not checker.errors, checker.errors
        assert set(SECTION_IDS) <= set(checker.ids)
        assert "http://" not in page and "https://" not in page and "<script" not in page
        assert checker.images, "no figure referenced"
        for src in checker.images:
            path = index.parent / src
            assert path.is_file(), src
            with Image.open(path) as image:
                assert image.format == "PNG" and image.width > 100 and image.height > 50
                image.load()
        stats = _stats(index)
        assert sorted(checker.images) == sorted(stats["figures"].values())
        assert set(stats["sections"]) == set(SECTION_IDS)
        expected = {"eu-plane", "token-pruning", "lengths", "sources"}
        assert expected <= set(stats["figures"])
        assert {f for f in index.parent.iterdir()} == {
            index.parent / name for name in ["index.html", "stats.json", *stats["figures"].values()]
        }


def test_stats_match_the_manifest(published, reports):
    for epoch, index in reports.items():
        stats, manifest = _stats(index), _manifest(published, epoch)
        assert stats["version"] == f"epoch_{epoch:03d}" and stats["epoch"] == epoch
        assert stats["thresholds"] == manifest["thresholds"]
        assert {k: v for k, v in manifest["counts"].items() if k != "per_source"} == stats["counts"]
        for q, expected in manifest["quadrants"].items():
            found = stats["quadrants"][q]
            for key in ("samples", "kept", "filled", "token_pruned", "response_tokens"):
                assert found[key] == expected[key], (q, key)
            assert found["kept_loss_tokens"] == expected["kept_loss_tokens"]
            for key in ("share", "mean_ppl", "mean_entropy"):
                assert found[key] == pytest.approx(expected[key], rel=1e-9), (q, key)
        # Four populated quadrants on the plane, every sample drawn (N < max_points).
        plane = stats["eu_plane"]
        assert plane["populated"] == list(QUADRANT_ORDER)
        assert plane["samples"] == plane["plotted"] == N and not plane["subsampled"]
        assert sum(q["samples"] for q in plane["quadrants"].values()) == N
        # Token pruning: every token-pruned sample keeps floor(0.5 * (n - 1)) of its response
        # tokens and its end-of-turn token; it has at least m = min_prunable_tokens + 1 tokens,
        # so it keeps at most (m / 2 + 1) / (m + 1) = 0.5 + 0.5 / (m + 1) of them.
        tp = stats["token_pruning"]
        assert tp["samples"] == sum(q["token_pruned"] for q in manifest["quadrants"].values())
        bound = 0.5 + 0.5 / (MIN_PRUNABLE_TOKENS + 1)
        assert 0.3 < tp["kept_fraction"]["median"] <= bound
        assert tp["kept_fraction"]["max"] <= bound
        # Sources: no per-source accounting in a synthetic cache, so counted here.
        assert stats["sources_from"] == "computed"
        assert stats["sources"]["synthetic.jsonl"]["kept"] == manifest["counts"]["kept"]
        assert stats["sources"]["synthetic.jsonl"]["rejected"] == REJECTED
        assert stats["sources"]["synthetic.jsonl"]["input_rows"] == N + REJECTED


def test_examples_mark_exactly_the_masked_tokens(published, reports):
    for epoch, index in reports.items():
        stats = _stats(index)
        blocks = _example_blocks(index.read_text())
        cache = _cache_rows(published, epoch, [schema.LOSS_MASK])
        shards = _shard_rows(published, epoch)
        examples = stats["examples"]
        assert {e["quadrant"] for e in examples} == set(QUADRANT_ORDER)
        assert len(examples) == 12 and set(blocks) == {e["sample_id"] for e in examples}
        assert any(e["token_pruned"] for e in examples) and any(not e["kept"] for e in examples)
        for example in examples:
            sample_id, block = example["sample_id"], blocks[example["sample_id"]]
            before = np.array(cache[sample_id][schema.LOSS_MASK], dtype=bool)
            if example["kept"]:
                after = np.array(shards[sample_id][schema.LOSS_MASK], dtype=bool)
                pruned = int((before & ~after).sum())
                assert (
                    block.count('<del class="pruned"') == pruned == example["pruned_tokens_shown"]
                )
                assert block.count('<span class="kept"') == int(after.sum())
                assert (pruned > 0) == example["token_pruned"]
            else:
                assert "<del" not in block and '<span class="kept"' not in block
                assert block.count('<span class="dropped"') == int(before.sum())


def test_tokens_show_as_ids_without_a_tokenizer(published, reports):
    page = reports[0].read_text()
    assert "no tokenizer could be loaded" in page
    ids = re.findall(r'<del class="pruned"[^>]*>\[(\d+)\]</del>', page)
    assert ids and all(5 <= int(i) < 32000 for i in ids)


def test_migration_only_with_a_parent(published, reports):
    first, second = _stats(reports[0]), _stats(reports[1])
    assert first["parent"] is None and first["migration"] is None
    assert not first["sections"]["migration"] and "migration" not in first["figures"]
    assert "no parent" in reports[0].read_text()

    manifest = _manifest(published, 1)
    migration = second["migration"]
    assert second["sections"]["migration"] and second["figures"]["migration"] == "migration.png"
    assert migration["matrix"] == manifest["migration"]["matrix"]
    assert migration["matched"] == N
    parent_thresholds = _manifest(published, 0)["thresholds"]
    move = migration["thresholds"]["ppl_high"]
    assert move["parent"] == parent_thresholds["ppl_high"]
    assert move["current"] == manifest["thresholds"]["ppl_high"]
    assert move["change"] == pytest.approx(move["current"] - move["parent"])
    assert (
        migration["parent_quadrants"]["Q2"]["kept"]
        == _manifest(published, 0)["quadrants"]["Q2"]["kept"]
    )
    page = reports[1].read_text()
    assert "How the thresholds moved" in page and 'src="migration.png"' in page


def test_rewrite_replaces_the_report_and_subsamples(out):
    first = write_report(out, max_points=50, examples_per_quadrant=1, seed=3)
    assert first.parent.name == "report" and first.is_file()
    stats = _stats(first)
    assert stats["eu_plane"]["plotted"] == 50 and stats["eu_plane"]["subsampled"]
    assert sum(q["plotted"] for q in stats["eu_plane"]["quadrants"].values()) == 50
    assert "50 of 400 samples drawn" in first.read_text()
    assert len(stats["examples"]) == 4
    again = write_report(out)
    assert again == first and _stats(again)["eu_plane"]["plotted"] == N
    version = again.parent.parent
    assert not [p.name for p in version.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in version.iterdir()) == [
        "dropped.parquet",
        "manifest.json",
        "report",
        "train",
    ]
    # The report lives beside the data without disturbing it.
    assert verify_version(out).ok, verify_version(out).problems


def test_report_without_the_scored_cache(out):
    shutil.rmtree(out / "scores" / "epoch_001")
    manifest = _manifest(out, 1)
    manifest["scores"]["dir"] = str(out / "nowhere")
    (OutputLayout(out).data_dir(1) / "manifest.json").write_text(json.dumps(manifest))
    index = write_report(out, 1)
    stats = _stats(index)
    assert not stats["sections"]["token-pruning"] and not stats["sections"]["lengths"]
    assert not stats["sections"]["examples"]
    assert stats["sections"]["eu-plane"] and stats["sections"]["migration"]
    assert (
        stats["quadrants"]["Q1"]["response_tokens"]
        == manifest["quadrants"]["Q1"]["response_tokens"]
    )
    assert any("no scored cache" in n for n in stats["notes"])
    page = index.read_text()
    assert not TagChecker().check(page).errors
    assert "tokens unavailable" in page


def test_report_decodes_tokens_with_the_models_tokenizer(out, tokenizer, tmp_path):
    """A model directory with a tokenizer: example tokens are text, not ids."""
    model_dir = tmp_path / "model"
    tokenizer.save_pretrained(model_dir)
    manifest = _manifest(out, 0)
    manifest["model"]["path"] = str(model_dir)
    (OutputLayout(out).data_dir(0) / "manifest.json").write_text(json.dumps(manifest))
    # Ids inside the test tokenizer's vocabulary (the synthetic cache draws up to 32000).
    size = len(tokenizer)
    for part in sorted(OutputLayout(out).scores_dir(0).glob("*.parquet")):
        table = pq.read_table(part)
        ids = table.column(schema.INPUT_IDS).combine_chunks()
        small = pc.add(pc.cast(pc.remainder(pc.list_flatten(ids), size - 10), pa.int32()), 5)
        wrapped = pa.ListArray.from_arrays(ids.offsets, small.cast(pa.int32()))
        table = table.set_column(table.column_names.index(schema.INPUT_IDS), "input_ids", wrapped)
        pq.write_table(table.cast(pq.read_schema(part)), part)
    index = write_report(out, 0, examples_per_quadrant=2)
    page = index.read_bytes().decode()  # not read_text: that turns a decoded "\r" into "\n"
    assert "no tokenizer could be loaded" not in page
    assert not re.search(r'class="(kept|pruned|dropped)"[^>]*>\[\d+\]<', page)
    cache = _cache_rows(out, 0, [schema.INPUT_IDS])
    for sample_id, block in _example_blocks(page).items():
        tokens = re.search(r'<div class="tokens">(.*)</div>', block, re.S).group(1)
        text = unescape(re.sub(r"<[^>]+>", "", tokens))
        ids = cache[sample_id][schema.INPUT_IDS]
        assert text == "".join(tokenizer.decode([i]) for i in ids)


def test_clear_errors(tmp_path, out):
    with pytest.raises(ReportError, match="no such output directory"):
        write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no published version"):
        write_report(tmp_path / "empty")
    with pytest.raises(ReportError, match="epoch_007 is not published"):
        write_report(out, 7)
    (OutputLayout(out).data_dir(1) / "dropped.parquet").unlink()
    with pytest.raises(ReportError, match="dropped.parquet: listed in .* but missing"):
        write_report(out, 1)
    assert not list(OutputLayout(out).data_dir(1).glob(".report*"))
    with pytest.raises(ReportError, match="max_points"):
        write_report(out, 0, max_points=0)


def test_figure_names_are_stable():
    assert FIGURES["eu-plane"] == "eu_plane.png" and FIGURES["migration"] == "migration.png"
