"""Report rendering: token roles and segments, their HTML and terminal forms, figures, the page."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from qtune.stages.report import (
    ENTROPY_SCALE,
    PPL_SCALE,
    PRUNED_CLOSE,
    PRUNED_OPEN,
    SECTION_IDS,
    SampleView,
    Segment,
    eu_plane_png,
    kept_fraction_png,
    lengths_png,
    migration_png,
    render_sample_rich,
    report_html,
    segments_html,
    segments_rich,
    sources_png,
    subsample_indices,
    threshold_lines,
    token_roles,
    token_segments,
)

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


class TagChecker(HTMLParser):
    """Parses a page and records every tag that is closed out of order or left open."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}
        self.ids: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            if tag in self.stack:
                while self.stack.pop() != tag:
                    pass
            return
        self.stack.pop()

    def check(self, page: str) -> TagChecker:
        self.feed(page)
        self.close()
        if self.stack:
            self.errors.append(f"left open: {self.stack}")
        return self


def _png_ok(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 50
        return image.size


# A sample: 4 prompt tokens, 6 response tokens, 1 trailing prompt-side token.
TOKENS = ["<s>", "Q", ":", " 2+2?", " It", " is", " <b>4</b>", " &", " done", ".", "\n"]
LOSS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0], dtype=np.int8)
KEPT = np.array([0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 0], dtype=np.int8)
SCORE = np.array([0, 0, 0, 0, 1.5, 80.0, 2.0, 300.0, 1.0, 1.2, 0], dtype=np.float64)


def test_token_roles_and_segments_mark_exactly_the_masked_tokens():
    roles = token_roles(LOSS, KEPT)
    assert roles.tolist() == ["prompt"] * 4 + [
        "kept",
        "pruned",
        "kept",
        "pruned",
        "kept",
        "kept",
        "prompt",
    ]
    segments = token_segments(TOKENS, LOSS, KEPT, SCORE)
    # Prompt runs are merged; every response token is its own segment.
    assert segments[0] == Segment("<s>Q: 2+2?", "prompt", None, 0, 4)
    assert segments[-1] == Segment("\n", "prompt", None, 10, 11)
    assert "".join(s.text for s in segments) == "".join(TOKENS)
    pruned = [s.start for s in segments if s.role == "pruned"]
    assert pruned == np.flatnonzero(LOSS.astype(bool) & ~KEPT.astype(bool)).tolist() == [5, 7]
    assert [s.score for s in segments if s.role == "pruned"] == [80.0, 300.0]

    dropped = token_roles(LOSS, None)
    assert set(dropped[LOSS == 1]) == {"dropped"} and set(dropped[LOSS == 0]) == {"prompt"}
    assert (token_roles(LOSS, np.zeros_like(KEPT)) == dropped).all()  # all-zero = dropped
    with pytest.raises(ValueError, match="outside the response"):
        token_roles(LOSS, np.ones_like(KEPT))
    with pytest.raises(ValueError, match="tokens but"):
        token_segments(TOKENS[:-1], LOSS, KEPT, SCORE)


def test_segments_html_strikes_pruned_tokens_shades_kept_and_escapes():
    page = segments_html(token_segments(TOKENS, LOSS, KEPT, SCORE), PPL_SCALE)
    checker = TagChecker().check(page)
    assert not checker.errors
    assert page.count('<del class="pruned"') == 2 == checker.counts["del"]
    assert page.count('<span class="kept"') == 4
    assert "&lt;b&gt;4&lt;/b&gt;" in page and " &amp;</del>" in page and "<b>" not in page
    assert 'title="pruned (no loss); token perplexity 80"' in page
    # Shading follows the score: a low-PPL token is lighter than a high-PPL one.
    shades = re.findall(r'class="kept" style="background: #([0-9a-f]{6})"', page)
    assert len(set(shades)) > 1
    dropped = segments_html(token_segments(TOKENS, LOSS, None, SCORE))
    assert dropped.count('<span class="dropped"') == 6 and "<del" not in dropped


def test_segments_with_a_real_tokenizer(tokenizer):
    text = "The reverse of candle is eldnac."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = [tokenizer.decode([i]) for i in ids]
    assert "".join(tokens) == text
    n = len(ids)
    loss = np.zeros(n, dtype=np.int8)
    loss[2:] = 1
    kept = loss.copy()
    kept[[3, n - 2]] = 0
    segments = token_segments(tokens, loss, kept, np.linspace(1, 50, n))
    assert "".join(s.text for s in segments) == text
    page = segments_html(segments)
    assert page.count('<del class="pruned"') == 2
    assert '<del class="pruned" title="pruned (no loss); token perplexity' in page
    struck = re.findall(r'<del class="pruned"[^>]*>(.*?)</del>', page)
    assert struck == [tokens[3], tokens[n - 2]]


def test_segments_rich_marks_pruned_runs_in_plain_text():
    text = segments_rich(token_segments(TOKENS, LOSS, KEPT, SCORE), ENTROPY_SCALE)
    plain = text.plain
    assert plain.count(PRUNED_OPEN) == 2 and plain.count(PRUNED_CLOSE) == 2
    assert f"{PRUNED_OPEN} is{PRUNED_CLOSE}" in plain and f"{PRUNED_OPEN} &{PRUNED_CLOSE}" in plain
    struck = [plain[s.start : s.end] for s in text.spans if "strike" in str(s.style)]
    assert struck == [" is", " &"]
    # Adjacent pruned tokens share one marker.
    kept = KEPT.copy()
    kept[6] = 0
    merged = segments_rich(token_segments(TOKENS, LOSS, kept, SCORE)).plain
    assert f"{PRUNED_OPEN} is <b>4</b> &{PRUNED_CLOSE}" in merged


def test_render_sample_rich_has_header_and_legend():
    view = SampleView(
        sample_id="s-1",
        source="a.jsonl",
        row_index=7,
        quadrant="Q2",
        kept=True,
        filled=False,
        token_pruned=True,
        ppl=12.5,
        entropy=0.25,
        n_response_tokens=6,
        num_loss_tokens=4,
        segments=token_segments(TOKENS, LOSS, KEPT, SCORE),
    )
    console = Console(record=True, width=100)
    console.print(render_sample_rich(view))
    out = console.export_text()
    assert "s-1" in out and "Q2 valuable misconception" in out and "PPL 12.5" in out
    assert "4 of 6 response tokens keep loss" in out and "a.jsonl:7" in out
    assert out.count(PRUNED_OPEN) >= 3  # two runs + the legend


def test_subsample_is_seeded_uniform_and_sorted():
    assert subsample_indices(10, 20).tolist() == list(range(10))
    a, b = subsample_indices(1000, 100, seed=3), subsample_indices(1000, 100, seed=3)
    assert (a == b).all() and len(np.unique(a)) == 100 and (np.diff(a) > 0).all()
    assert not (a == subsample_indices(1000, 100, seed=4)).all()


def _plane(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    log_ppl, entropy = rng.gamma(2, 0.5, n), rng.gamma(2, 0.3, n)
    high_p, high_e = log_ppl > np.median(log_ppl), entropy > np.median(entropy)
    quadrant = np.where(high_p, np.where(high_e, "Q1", "Q2"), np.where(high_e, "Q4", "Q3"))
    kept = rng.random(n) < 0.25
    filled = kept & (rng.random(n) < 0.3)
    return log_ppl, entropy, quadrant, kept, filled


def test_figures_are_valid_pngs():
    log_ppl, entropy, quadrant, kept, filled = _plane(3000)
    global_thresholds = {
        "scope": "global",
        "a": 0.3,
        "ppl_low": float(np.exp(np.quantile(log_ppl, 0.3))),
        "ppl_high": float(np.exp(np.quantile(log_ppl, 0.7))),
        "entropy_low": float(np.quantile(entropy, 0.3)),
        "entropy_high": float(np.quantile(entropy, 0.7)),
        "ppl_median": float(np.exp(np.median(log_ppl))),
        "entropy_median": float(np.median(entropy)),
    }
    _png_ok(eu_plane_png(log_ppl, entropy, quadrant, kept, filled, global_thresholds))
    batch = {"scope": "batch", "a_mean": 0.3, "a_min": 0.1}
    _png_ok(eu_plane_png(log_ppl, entropy, quadrant, kept, filled, batch, max_points=200))
    _png_ok(kept_fraction_png(np.random.default_rng(0).uniform(0.3, 0.6, 50), 0.5))
    _png_ok(kept_fraction_png(np.array([])))  # a message, not an error
    _png_ok(lengths_png(np.random.default_rng(0).integers(1, 500, 3000), quadrant, kept))
    many = {
        f"data/part-{i:03d}.jsonl": {"kept": i, "dropped": 2 * i, "rejected": 1} for i in range(45)
    }
    _png_ok(sources_png(many))
    _png_ok(sources_png({}))
    matrix = {
        q: {r: (10 if q == r else 1) for r in ("Q1", "Q2", "Q3", "Q4")}
        for q in "Q1 Q2 Q3 Q4".split()
    }
    _png_ok(migration_png(matrix, "epoch_000", "epoch_001"))
    _png_ok(eu_plane_png(np.array([]), np.array([]), np.array([]), np.array([]), np.array([]), {}))


def test_threshold_lines_follow_the_manifest_or_fall_back_to_medians():
    lines = threshold_lines(
        {
            "ppl_low": 2.0,
            "ppl_high": 8.0,
            "entropy_low": 0.2,
            "entropy_high": 0.9,
            "ppl_median": 4.0,
            "entropy_median": 0.5,
        },
        np.zeros(3),
        np.zeros(3),
    )
    assert lines["corner"] == pytest.approx((np.log(2), np.log(8), 0.2, 0.9))
    assert lines["median"] == pytest.approx((np.log(4), 0.5))
    batch = threshold_lines(
        {"scope": "batch", "a_mean": 0.2}, np.array([0.0, 1, 2]), np.array([3.0, 4, 5])
    )
    assert batch["corner"] is None and batch["median"] == (1.0, 4.0)
    assert "per batch scope" in batch["median_label"]


def test_report_html_has_every_section_and_parses():
    view = SampleView(
        sample_id="ex<1>",
        source=None,
        row_index=None,
        quadrant="Q2",
        kept=True,
        filled=False,
        token_pruned=True,
        ppl=3.0,
        entropy=0.1,
        n_response_tokens=6,
        num_loss_tokens=4,
        segments=token_segments(TOKENS, LOSS, KEPT, SCORE),
        score_name=PPL_SCALE.name,
    )
    stats = {
        "version": "epoch_000",
        "counts": {"input_rows": 10, "scored": 10, "kept": 3, "dropped": 7, "rejected": 0},
        "thresholds": {"scope": "global", "a": 0.2},
        "quadrants": {"Q2": {"name": "valuable misconception", "samples": 3, "share": 0.3}},
        "eu_plane": {"samples": 10, "plotted": 10},
        "token_pruning": {"note": "none"},
        "lengths": {"note": "none"},
        "sources": {"a & b.jsonl": {"input_rows": 10, "kept": 3, "dropped": 7, "rejected": 0}},
        "migration": None,
    }
    page = report_html(stats, {"eu-plane": "eu_plane.png"}, [view])
    checker = TagChecker().check(page)
    assert not checker.errors
    assert set(SECTION_IDS) <= set(checker.ids)
    assert checker.images == ["eu_plane.png"]
    assert "ex&lt;1&gt;" in page and "a &amp; b.jsonl" in page
    assert "no parent" in page  # the migration section holds a note
    assert page.count('<del class="pruned"') == 2
