"""Report rendering: token segments, their HTML and terminal forms, figures, and the HTML page.

Pure functions over NumPy arrays and plain dicts; nothing here knows the output layout (the
``pipeline.report_job`` reads a version and calls these). Figures are drawn with matplotlib's Agg
canvas (no pyplot, no display) and returned as PNG bytes. The page is self-contained: inline CSS,
no scripts, images referenced by relative file name (or a ``data:`` URI) as the caller chooses.

Token roles (``Segment.role``), for one sample's token positions:

- ``prompt``: not a response position (no label in the unpruned sample); consecutive prompt
  tokens are merged into one segment.
- ``kept``: a response position that keeps its label in the published shard.
- ``pruned``: a response position of a kept sample whose label token pruning removed.
- ``dropped``: a response position of a sample triage dropped (the whole sample is out of the
  version, so no position carries loss; shown shaded but marked as not trained on).
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Group
from rich.panel import Panel
from rich.style import Style
from rich.text import Text

QUADRANT_ORDER = ("Q1", "Q2", "Q3", "Q4")
QUADRANT_LABELS = {
    "Q1": "harmful noise",
    "Q2": "valuable misconception",
    "Q3": "redundant knowledge",
    "Q4": "calibration",
}
QUADRANT_COLORS = {"Q1": "#d62728", "Q2": "#ff7f0e", "Q3": "#9467bd", "Q4": "#1f77b4"}
QUADRANT_SHORT = {"Q1": "noise", "Q2": "misconception", "Q3": "redundant", "Q4": "calibration"}
SECTION_IDS = (
    "eu-plane",
    "quadrants",
    "token-pruning",
    "lengths",
    "sources",
    "migration",
    "examples",
)
ROLES = ("prompt", "kept", "pruned", "dropped")
MAX_SOURCE_BARS = 30  # sources drawn in the per-source figure; the rest are summed in one bar
DPI = 100


# --- token segments ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A run of text of one sample with one role.

    ``start``/``end``: token positions covered (``end`` exclusive); prompt runs cover several
    tokens, every response token is its own segment. ``score``: the response token's score (what
    it means is the caller's: token PPL in the report, token entropy in ``inspect``); None for
    prompt runs.
    """

    text: str
    role: str
    score: float | None
    start: int
    end: int


@dataclass(frozen=True)
class ScoreScale:
    """How a token score maps to a shade: ``low`` -> lightest, ``high`` (and above) -> darkest."""

    name: str  # what the score is, in words (legends, titles)
    low: float
    high: float
    log: bool = False  # interpolate on log(score) (perplexities)
    description: str = ""  # the definition, for legends

    def fraction(self, score: float | None) -> float:
        if score is None or not math.isfinite(score):
            return 1.0 if score is not None and score > 0 else 0.0
        low, high, value = self.low, self.high, score
        if self.log:
            low, high, value = (
                math.log(max(low, 1e-12)),
                math.log(high),
                math.log(max(score, 1e-12)),
            )
        if high <= low:
            return 0.0
        return min(1.0, max(0.0, (value - low) / (high - low)))


#: Token perplexity PPL_i = exp(-log p(token_i | context)), log scale 1 .. 100.
PPL_SCALE = ScoreScale(
    "token perplexity",
    1.0,
    100.0,
    log=True,
    description="PPL_i = exp(−log p(token_i | tokens before it)), the model's surprise",
)
#: Full-vocabulary predictive entropy at the position, nats, linear 0 .. 4.
ENTROPY_SCALE = ScoreScale(
    "token entropy (nats)",
    0.0,
    4.0,
    description="entropy of the model's full-vocabulary distribution at the position",
)

# Light yellow-green -> yellow -> orange-red: dark enough to see, light enough for black text.
_GRADIENT = np.array([[240, 249, 232], [254, 217, 118], [244, 109, 67]], dtype=np.float64)


def shade(fraction: float) -> tuple[int, int, int]:
    """RGB of a position in [0, 1] along the shading gradient."""
    position = min(1.0, max(0.0, fraction)) * (len(_GRADIENT) - 1)
    lower = min(int(position), len(_GRADIENT) - 2)
    rgb = _GRADIENT[lower] + (position - lower) * (_GRADIENT[lower + 1] - _GRADIENT[lower])
    return int(round(rgb[0])), int(round(rgb[1])), int(round(rgb[2]))


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def token_roles(loss_mask: np.ndarray, kept_mask: np.ndarray | None) -> np.ndarray:
    """Role of every token position (array of ``ROLES`` strings), vectorised.

    ``loss_mask``: 1 on response positions of the unpruned sample (the scored cache's mask).
    ``kept_mask``: the published shard's loss mask after pruning, or None for a dropped sample.
    An all-zero ``kept_mask`` is also read as dropped (a kept sample keeps at least one token).
    """
    response = np.asarray(loss_mask).astype(bool)
    roles = np.full(len(response), "prompt", dtype="<U7")
    if kept_mask is None or not np.asarray(kept_mask).any():
        roles[response] = "dropped"
        return roles
    kept = np.asarray(kept_mask).astype(bool)
    if len(kept) != len(response):
        raise ValueError(
            f"kept_mask has {len(kept)} positions, loss_mask {len(response)}: not the same sample"
        )
    if (kept & ~response).any():
        raise ValueError("kept_mask marks positions outside the response (loss_mask is 0 there)")
    roles[response & kept] = "kept"
    roles[response & ~kept] = "pruned"
    return roles


def token_segments(
    tokens: Sequence[str],
    loss_mask: np.ndarray,
    kept_mask: np.ndarray | None,
    token_score: np.ndarray,
) -> list[Segment]:
    """Split one sample into segments: merged prompt runs and one segment per response token.

    ``tokens``: the text of each token position (decoded one by one, or ids as text);
    ``loss_mask``/``kept_mask``: see :func:`token_roles`; ``token_score``: one float per position
    (carried on response segments). All four have one entry per token position.
    """
    n = len(tokens)
    if len(loss_mask) != n or len(token_score) != n:
        raise ValueError(
            f"{n} tokens but loss_mask has {len(loss_mask)} and token_score {len(token_score)}"
        )
    roles = token_roles(loss_mask, kept_mask)
    scores = np.asarray(token_score, dtype=np.float64)
    segments: list[Segment] = []
    i = 0
    while i < n:
        if roles[i] == "prompt":
            j = i
            while j < n and roles[j] == "prompt":
                j += 1
            segments.append(Segment("".join(tokens[i:j]), "prompt", None, i, j))
            i = j
        else:
            segments.append(Segment(tokens[i], str(roles[i]), float(scores[i]), i, i + 1))
            i += 1
    return segments


def segments_html(segments: Sequence[Segment], scale: ScoreScale = PPL_SCALE) -> str:
    """One sample's text as HTML (a ``<div class="tokens">``), escaped.

    Pruned tokens are ``<del class="pruned">``; kept tokens ``<span class="kept">`` with a
    background shaded by ``scale``; response tokens of a dropped sample ``<span
    class="dropped">`` (shaded the same way); prompt runs ``<span class="prompt">``. Every
    response token has a ``title`` with its score.
    """
    parts = ['<div class="tokens">']
    for seg in segments:
        text = html.escape(seg.text, quote=False)
        if seg.role == "prompt":
            parts.append(f'<span class="prompt">{text}</span>')
            continue
        score = "n/a" if seg.score is None else f"{seg.score:.4g}"
        if seg.role == "pruned":
            title = html.escape(f"pruned (no loss); {scale.name} {score}")
            parts.append(f'<del class="pruned" title="{title}">{text}</del>')
        else:
            color = _hex(shade(scale.fraction(seg.score)))
            what = "kept" if seg.role == "kept" else "sample dropped"
            title = html.escape(f"{what}; {scale.name} {score}")
            parts.append(
                f'<span class="{seg.role}" style="background: {color}" title="{title}">'
                f"{text}</span>"
            )
    parts.append("</div>")
    return "".join(parts)


PRUNED_OPEN, PRUNED_CLOSE = "[-", "-]"  # wdiff's deletion markers, visible without colour


def segments_rich(segments: Sequence[Segment], scale: ScoreScale = ENTROPY_SCALE) -> Text:
    """One sample's text for the terminal.

    Kept tokens: black on a background shaded by ``scale`` (entropy by default). Pruned tokens:
    red, struck through, and each run of them wrapped in ``[-`` … ``-]`` so the marking survives
    plain-text output. Dropped samples' response tokens: coloured text, no background. Prompt: dim.
    """
    text = Text()
    in_pruned = False
    marker = Style(color="red", bold=True)
    for seg in segments:
        if seg.role != "pruned" and in_pruned:
            text.append(PRUNED_CLOSE, marker)
            in_pruned = False
        if seg.role == "prompt":
            text.append(seg.text, Style(dim=True))
        elif seg.role == "pruned":
            if not in_pruned:
                text.append(PRUNED_OPEN, marker)
                in_pruned = True
            text.append(seg.text, Style(color="red", strike=True))
        else:
            rgb = shade(scale.fraction(seg.score))
            if seg.role == "kept":
                text.append(seg.text, Style(color="black", bgcolor=f"rgb{rgb}"))
            else:
                text.append(seg.text, Style(color=f"rgb{rgb}", italic=True))
    if in_pruned:
        text.append(PRUNED_CLOSE, marker)
    return text


# --- one sample, for the report and the terminal -------------------------------------------------


@dataclass
class SampleView:
    """Everything shown about one scored sample of a version.

    ``kept`` False means dropped by triage (no shard row: ``num_loss_tokens`` is 0 and every
    response token has role ``dropped``). ``segments`` are empty when the scored cache is gone
    (``note`` says so). ``score_name`` says what ``Segment.score`` holds.
    """

    sample_id: str
    source: str | None
    row_index: int | None
    quadrant: str
    kept: bool
    filled: bool
    token_pruned: bool
    ppl: float
    entropy: float
    n_response_tokens: int | None
    num_loss_tokens: int  # loss tokens in the published shard (after pruning); 0 when dropped
    reason: str | None = None  # why it was dropped (DropReason value), None when kept
    segments: list[Segment] = field(default_factory=list)
    score_name: str = ENTROPY_SCALE.name
    note: str | None = None

    @property
    def pruned_tokens(self) -> int:
        return sum(1 for s in self.segments if s.role == "pruned")

    @property
    def decision(self) -> str:
        """Keep decision in words: ``kept``, ``kept (filled)``, ``dropped (reason)``."""
        if not self.kept:
            return f"dropped ({self.reason})" if self.reason else "dropped"
        how = "kept (filled)" if self.filled else "kept"
        if self.token_pruned:
            total = "?" if self.n_response_tokens is None else f"{self.n_response_tokens:,}"
            how += f", token-pruned: {self.num_loss_tokens:,} of {total} response tokens keep loss"
        return how


def sample_header(view: SampleView) -> str:
    """One line: quadrant, decision, sample scores, origin."""
    origin = view.source or "?"
    if view.row_index is not None:
        origin += f":{view.row_index}"
    name = QUADRANT_LABELS.get(view.quadrant, "")
    length = "?" if view.n_response_tokens is None else f"{view.n_response_tokens:,}"
    return (
        f"{view.quadrant} {name} | {view.decision} | PPL {view.ppl:.4g} | entropy "
        f"{view.entropy:.4g} | {length} response tokens | {origin}"
    )


def render_sample_rich(view: SampleView, scale: ScoreScale = ENTROPY_SCALE) -> Panel:
    """A panel: the sample id as title, the header line, then the coloured text."""
    header = Text(sample_header(view), Style(bold=True))
    legend = Text(
        f"shading: {scale.name} ({scale.low:g} light .. {scale.high:g} dark); "
        f"{PRUNED_OPEN}struck{PRUNED_CLOSE} = pruned (no loss); dim = prompt",
        Style(dim=True, italic=True),
    )
    body: list[Any] = [header, legend, Text("")]
    if view.segments:
        body.append(segments_rich(view.segments, scale))
    if view.note:
        body.append(Text(view.note, Style(color="yellow")))
    color = QUADRANT_COLORS.get(view.quadrant, "white")
    return Panel(Group(*body), title=view.sample_id, title_align="left", border_style=color)


# --- figures -------------------------------------------------------------------------------------


def subsample_indices(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded uniform subsample of ``n`` rows (all rows when n <= max)."""
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_points, replace=False))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _message_png(title: str, message: str) -> bytes:
    fig = _figure(6, 2)
    fig.text(0.5, 0.6, title, ha="center", fontsize=12, weight="bold")
    fig.text(0.5, 0.35, message, ha="center", fontsize=10)
    return _png(fig)


def eu_plane_png(
    log_ppl: np.ndarray,
    entropy: np.ndarray,
    quadrant: np.ndarray,
    kept: np.ndarray,
    filled: np.ndarray,
    thresholds: dict[str, Any],
    *,
    max_points: int = 20000,
    seed: int = 0,
) -> bytes:
    """The EU plane: log PPL (x) against entropy (y), one point per sample, as PNG bytes.

    Points are coloured by quadrant label; dropped samples are small dots, kept ones circles
    with a black edge (triangles when kept by the fill-up). Above ``max_points`` samples a seeded
    uniform subsample (:func:`subsample_indices`) is drawn; the marginal histograms (all samples
    filled, kept samples as an outline) always use every sample. Threshold lines come from the
    manifest's ``thresholds``: corner thresholds (``ppl_low``/``ppl_high``, ``entropy_low``/
    ``entropy_high``, dashed, with the corner regions shaded) when present, and the medians
    (``ppl_median``/``entropy_median``, solid); without them (``batch`` scope, baselines) the
    medians of all samples are drawn and the legend says that labels were set per scope.
    """
    log_ppl = np.asarray(log_ppl, dtype=np.float64)
    entropy = np.asarray(entropy, dtype=np.float64)
    quadrant = np.asarray(quadrant).astype(str)
    kept = np.asarray(kept, dtype=bool)
    filled = np.asarray(filled, dtype=bool)
    if not len(log_ppl):
        return _message_png("EU plane", "no samples")
    pick = subsample_indices(len(log_ppl), max_points, seed)

    fig = _figure(9.5, 8.5)
    grid = fig.add_gridspec(
        2, 2, width_ratios=(4, 1), height_ratios=(1, 4), wspace=0.04, hspace=0.04
    )
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    right = fig.add_subplot(grid[1, 1], sharey=ax)

    x, y, q, k, f = log_ppl[pick], entropy[pick], quadrant[pick], kept[pick], filled[pick]
    for name in QUADRANT_ORDER:
        rows = q == name
        n_all = int((quadrant == name).sum())
        n_kept = int((kept & (quadrant == name)).sum())
        label = f"{name} {QUADRANT_LABELS[name]}: {n_all:,} ({n_kept:,} kept)"
        drop = rows & ~k
        ax.scatter(x[drop], y[drop], s=5, c=QUADRANT_COLORS[name], alpha=0.35, linewidths=0)
        ax.scatter([], [], s=30, c=QUADRANT_COLORS[name], label=label)  # legend entry
    for name in QUADRANT_ORDER:
        rows = q == name
        corner, fill = rows & k & ~f, rows & k & f
        for sel, marker in ((corner, "o"), (fill, "^")):
            if sel.any():
                ax.scatter(
                    x[sel],
                    y[sel],
                    s=22,
                    c=QUADRANT_COLORS[name],
                    marker=marker,
                    edgecolors="black",
                    linewidths=0.6,
                )
    # Legend proxies for the keep markers.
    ax.scatter([], [], s=22, c="white", edgecolors="black", marker="o", label="kept (corner)")
    if filled.any():
        ax.scatter([], [], s=22, c="white", edgecolors="black", marker="^", label="kept (fill-up)")
    ax.scatter([], [], s=5, c="grey", alpha=0.5, label="dropped")

    lines = threshold_lines(thresholds, log_ppl, entropy)
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    if lines["corner"]:
        x_low, x_high, y_low, y_high = lines["corner"]
        ax.fill_between(
            [x_high, xlim[1]], ylim[0], y_low, color=QUADRANT_COLORS["Q2"], alpha=0.08, lw=0
        )
        ax.fill_between(
            [xlim[0], x_low], y_high, ylim[1], color=QUADRANT_COLORS["Q4"], alpha=0.08, lw=0
        )
        a = thresholds.get("a")
        what = f"corner thresholds (a = {a:.3f})" if isinstance(a, float) else "corner thresholds"
        for value in (x_low, x_high):
            ax.axvline(value, color="black", ls="--", lw=0.9)
        for value in (y_low, y_high):
            ax.axhline(value, color="black", ls="--", lw=0.9)
        ax.plot([], [], color="black", ls="--", lw=0.9, label=what)
    x_med, y_med = lines["median"]
    ax.axvline(x_med, color="dimgrey", lw=0.9)
    ax.axhline(y_med, color="dimgrey", lw=0.9)
    ax.plot([], [], color="dimgrey", lw=0.9, label=lines["median_label"])
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
    ax.set_xlabel("log PPL (mean token NLL over the response, nats)")
    ax.set_ylabel("entropy (mean token entropy over the response, nats)")
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.09),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    ax.grid(alpha=0.2)

    bins_x = np.histogram_bin_edges(log_ppl, bins=60)
    bins_y = np.histogram_bin_edges(entropy, bins=60)
    top.hist(log_ppl, bins=bins_x, color="lightgrey", label="all")
    top.hist(log_ppl[kept], bins=bins_x, histtype="step", color="black", label="kept")
    top.axvline(x_med, color="dimgrey", lw=0.9)
    right.hist(entropy, bins=bins_y, orientation="horizontal", color="lightgrey")
    right.hist(entropy[kept], bins=bins_y, orientation="horizontal", histtype="step", color="k")
    right.axhline(y_med, color="dimgrey", lw=0.9)
    top.legend(fontsize=8, loc="upper right")
    top.tick_params(labelbottom=False)
    right.tick_params(labelleft=False)
    top.set_ylabel("samples")
    right.set_xlabel("samples")
    subsampled = "" if len(pick) == len(log_ppl) else f", {len(pick):,} drawn (uniform subsample)"
    top.set_title(f"Error-Uncertainty plane: {len(log_ppl):,} samples{subsampled}")
    return _png(fig)


def threshold_lines(
    thresholds: dict[str, Any], log_ppl: np.ndarray, entropy: np.ndarray
) -> dict[str, Any]:
    """Where the EU-plane figure draws its lines, in plot coordinates (x = log PPL).

    ``corner``: (x_low, x_high, y_low, y_high) from the manifest's corner thresholds, or None;
    ``median``: (x, y) from the manifest's medians, else the medians of all samples;
    ``median_label``: what the median lines are, in words.
    """
    keys = ("ppl_low", "ppl_high", "entropy_low", "entropy_high")
    corner = None
    if all(isinstance(thresholds.get(k), int | float) for k in keys):
        corner = (
            _safe_log(thresholds["ppl_low"]),
            _safe_log(thresholds["ppl_high"]),
            float(thresholds["entropy_low"]),
            float(thresholds["entropy_high"]),
        )
    if isinstance(thresholds.get("ppl_median"), int | float) and isinstance(
        thresholds.get("entropy_median"), int | float
    ):
        median = (_safe_log(thresholds["ppl_median"]), float(thresholds["entropy_median"]))
        label = "medians (quadrant labels)"
    else:
        median = (float(np.median(log_ppl)), float(np.median(entropy)))
        scope = thresholds.get("scope")
        label = (
            f"medians of all samples (labels were split per {scope} scope)"
            if scope and scope != "global"
            else "medians of all samples"
        )
    return {"corner": corner, "median": median, "median_label": label}


def _safe_log(value: float) -> float:
    return float(np.log(max(float(value), 1e-12)))


def kept_fraction_png(fractions: np.ndarray, token_ratio: float | None = None) -> bytes:
    """Histogram of the share of response tokens that keep loss, over token-pruned samples."""
    fractions = np.asarray(fractions, dtype=np.float64)
    if not len(fractions):
        return _message_png("Token pruning", "no token-pruned samples in this version")
    fig = _figure(7, 3.6)
    ax = fig.add_subplot()
    ax.hist(fractions, bins=np.linspace(0, 1, 41), color=QUADRANT_COLORS["Q2"], alpha=0.85)
    if token_ratio is not None:
        ax.axvline(token_ratio, color="black", ls="--", lw=1, label=f"token_ratio {token_ratio:g}")
        ax.legend(fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("kept loss tokens / response tokens")
    ax.set_ylabel("samples")
    ax.set_title(f"Kept-token fraction in {len(fractions):,} token-pruned samples")
    ax.grid(alpha=0.2)
    return _png(fig)


def lengths_png(lengths: np.ndarray, quadrant: np.ndarray, kept: np.ndarray) -> bytes:
    """Box plots of response length (tokens) per quadrant: all samples beside kept samples."""
    lengths = np.asarray(lengths, dtype=np.float64)
    quadrant = np.asarray(quadrant).astype(str)
    kept = np.asarray(kept, dtype=bool)
    if not len(lengths):
        return _message_png("Response length", "no samples")
    fig = _figure(8, 4)
    ax = fig.add_subplot()
    ticks, labels = [], []
    for i, name in enumerate(QUADRANT_ORDER):
        for offset, subset, face in ((-0.2, "all", "white"), (0.2, "kept", QUADRANT_COLORS[name])):
            rows = quadrant == name
            if subset == "kept":
                rows &= kept
            values = lengths[rows]
            if not len(values):
                continue
            box = ax.boxplot(
                [values],
                positions=[i + offset],
                widths=0.35,
                patch_artist=True,
                showfliers=False,
                medianprops={"color": "black"},
            )
            for patch in box["boxes"]:
                patch.set_facecolor(face)
                patch.set_edgecolor(QUADRANT_COLORS[name])
        ticks.append(i)
        labels.append(f"{name}\n{QUADRANT_LABELS[name]}")
    ax.set_xticks(ticks, labels, fontsize=8)
    positive = lengths[lengths > 0]
    if len(positive) and positive.max() / max(positive.min(), 1) > 50:
        ax.set_yscale("log")
    ax.set_ylabel("response tokens")
    ax.set_title("Response length by quadrant (white: all samples, filled: kept)")
    ax.grid(alpha=0.2, axis="y")
    return _png(fig)


def sources_png(
    sources: dict[str, dict[str, Any]], title: str = "Rows per source: kept, dropped, rejected"
) -> bytes:
    """Horizontal stacked bars per source (or group): kept, dropped, rejected rows.

    The ``MAX_SOURCE_BARS - 1`` largest sources get their own bar; the rest are summed in one.
    """
    if not sources:
        return _message_png("Sources", "no per-source counts")
    names = sorted(sources, key=lambda s: -sum(sources[s].get(k, 0) for k in _SOURCE_KEYS))
    if len(names) > MAX_SOURCE_BARS:
        head, tail = names[: MAX_SOURCE_BARS - 1], names[MAX_SOURCE_BARS - 1 :]
        rows = [(_short(s), sources[s]) for s in head]
        rows.append(
            (
                f"({len(tail):,} other sources)",
                {k: sum(sources[s].get(k, 0) for s in tail) for k in _SOURCE_KEYS},
            )
        )
    else:
        rows = [(_short(s), sources[s]) for s in names]
    rows.reverse()  # largest on top
    fig = _figure(9, 1.2 + 0.35 * len(rows))
    ax = fig.add_subplot()
    left = np.zeros(len(rows))
    colors = {"kept": "#2ca02c", "dropped": "#bbbbbb", "rejected": "#d62728"}
    for key in _SOURCE_KEYS:
        values = np.array([r[1].get(key, 0) for r in rows], dtype=np.float64)
        ax.barh(range(len(rows)), values, left=left, color=colors[key], label=key)
        left += values
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_xlabel("input rows")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.2, axis="x")
    return _png(fig)


_SOURCE_KEYS = ("kept", "dropped", "rejected")


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def migration_png(matrix: dict[str, dict[str, int]], parent: str, current: str) -> bytes:
    """Heatmap of quadrant moves: rows = the parent version's label, columns = this version's.

    Cells show the count and the share of the parent quadrant's samples (colour = that share).
    """
    counts = np.array(
        [[int(matrix.get(a, {}).get(b, 0)) for b in QUADRANT_ORDER] for a in QUADRANT_ORDER],
        dtype=np.float64,
    )
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(4):
        for j in range(4):
            ax.text(
                j,
                i,
                f"{int(counts[i, j]):,}\n{shares[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if shares[i, j] > 0.6 else "black",
            )
    ax.set_xticks(range(4), [f"{q}\n{QUADRANT_SHORT[q]}" for q in QUADRANT_ORDER], fontsize=8)
    ax.set_yticks(range(4), [f"{q}\n{QUADRANT_SHORT[q]}" for q in QUADRANT_ORDER], fontsize=8)
    ax.set_xlabel(f"quadrant in {current}")
    ax.set_ylabel(f"quadrant in {parent}")
    ax.set_title(f"Quadrant migration {parent} -> {current}")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the row")
    return _png(fig)


# --- the page ------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif;
  margin: 0 auto; max-width: 1150px; padding: 1em 2em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em;
  margin-top: 2em; }
nav a { margin-right: 1em; } .meta { color: #555; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f5f5f5; }
table.kv td { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #8a6d3b; background: #fcf8e3; padding: 0.4em 0.8em; border-radius: 4px; }
.example { border: 1px solid #ddd; border-left: 6px solid #999; border-radius: 4px;
  margin: 0.8em 0; padding: 0.5em 0.8em; }
.example h4 { margin: 0.2em 0 0.4em 0; font-family: monospace; }
.tokens { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  white-space: pre-wrap; word-break: break-word; font-size: 0.85em; line-height: 1.6; }
.prompt { color: #888; }
.kept { border-radius: 2px; }
.dropped { font-style: italic; opacity: 0.75; border-bottom: 1px dotted #999; }
del.pruned, del.pruned-legend { color: #c00; background: #fde0e0; text-decoration: line-through;
  text-decoration-thickness: 2px; }
.swatch { display: inline-block; width: 12em; height: 0.9em; vertical-align: middle;
  border: 1px solid #ccc; }
.legend { font-size: 0.9em; }
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.{digits}g}" if abs(value) < 1e6 else f"{value:.3e}"
    return html.escape(str(value))


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], css: str = "") -> str:
    """Rows are already-escaped HTML cell contents; ``css``: the table's class."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cls = f' class="{css}"' if css else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(src: str | None, alt: str) -> str:
    if not src:
        return ""
    return f'<p><img src="{html.escape(src)}" alt="{html.escape(alt)}"></p>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{html.escape(title)}</h2>{body}</section>'


def _overview(stats: dict[str, Any]) -> str:
    counts = stats.get("counts", {})
    q = stats.get("qtuning") or {}
    rows = [
        ("version", _fmt(stats.get("version"))),
        ("parent", _fmt(stats.get("parent"))),
        ("published", _fmt(stats.get("created"))),
        ("model", _fmt(stats.get("model"))),
        (
            "policy",
            _fmt(
                f"{q.get('policy', '?')}, scope {q.get('scope', '?')}, sample_ratio "
                f"{q.get('sample_ratio', '?')}, token_ratio {q.get('token_ratio', '?')}, "
                f"lam {q.get('lam', '?')}"
            ),
        ),
        (
            "pruning guards",
            _fmt(
                f"keep_end_of_turn {q.get('keep_end_of_turn', 'off (older version)')}, "
                f"min_prunable_tokens {q.get('min_prunable_tokens', 'off (older version)')}"
            ),
        ),
        ("input rows", _fmt(counts.get("input_rows"))),
        ("scored", _fmt(counts.get("scored"))),
        ("kept", _fmt(counts.get("kept"))),
        ("dropped", _fmt(counts.get("dropped"))),
        ("rejected", _fmt(counts.get("rejected"))),
        ("response tokens (all scored samples)", _fmt(counts.get("response_tokens"))),
        ("loss tokens kept", _fmt(counts.get("kept_loss_tokens"))),
    ]
    scored, kept = counts.get("scored"), counts.get("kept")
    if isinstance(scored, int) and isinstance(kept, int) and scored:
        rows.append(("samples kept", _pct(kept / scored)))
    resp, loss = counts.get("response_tokens"), counts.get("kept_loss_tokens")
    if isinstance(resp, int) and isinstance(loss, int) and resp:
        rows.append(("loss tokens kept, of all response tokens", _pct(loss / resp)))
    signals = stats.get("signals") or {}
    if signals:
        tail = signals["ppl_tail"]
        rows.append(
            (
                "kept samples with at most one loss token",
                f"{_fmt(signals['at_most_one_loss_token'])} "
                f"({_pct(signals['at_most_one_loss_token_share'])})",
            )
        )
        rows.append(
            (
                f"kept samples from the top {_pct(1 - tail['quantile'])} of PPL",
                f"{_pct(tail['kept_share'])} (input: {_pct(tail['input_share'])}; confidently "
                "wrong labels sit in this tail)",
            )
        )
    return _table(["", "value"], rows, "kv")


def _eu_plane_body(stats: dict[str, Any], figures: dict[str, str]) -> str:
    plane = stats.get("eu_plane") or {}
    text = (
        "<p>Every sample at (log PPL, entropy) over its response tokens. Colour: quadrant label "
        "(each axis split at its median within the triage scope). Circles with a black edge "
        "were kept by the Q2/Q4 corner sets, triangles by the fill-up; small dots were dropped. "
        "Dashed lines: the corner thresholds triage found (shaded: the Q2 and Q4 corners); solid "
        "grey: the medians. Side histograms: all samples (grey) and kept samples (outline). "
        "Noisy labels the model is unsure about land in Q1; wrong labels the model is "
        "confidently right about land in Q2, where token pruning masks their worst tokens (see "
        "the examples).</p>"
    )
    if plane.get("subsampled"):
        text += _note(
            f"{plane['plotted']:,} of {plane['samples']:,} samples drawn (seeded uniform "
            "subsample); histograms and tables use every sample."
        )
    thresholds = stats.get("thresholds") or {}
    rows = [(html.escape(k), _fmt(v)) for k, v in sorted(thresholds.items())]
    return (
        text
        + _img(figures.get("eu-plane"), "EU plane")
        + "<h3>Thresholds</h3>"
        + _table(["threshold", "value"], rows, "kv")
    )


def _quadrants_body(stats: dict[str, Any]) -> str:
    quadrants = stats.get("quadrants") or {}
    headers = [
        "quadrant",
        "samples",
        "share",
        "kept",
        "filled",
        "token-pruned",
        "mean PPL",
        "median PPL",
        "mean entropy",
        "loss tokens before (all)",
        "before (kept samples)",
        "after (kept)",
    ]
    rows = []
    for name in QUADRANT_ORDER:
        q = quadrants.get(name)
        if q is None:
            continue
        rows.append(
            [
                f"{name} {html.escape(q.get('name', ''))}",
                _fmt(q.get("samples")),
                _pct(q.get("share")),
                _fmt(q.get("kept")),
                _fmt(q.get("filled")),
                _fmt(q.get("token_pruned")),
                _fmt(q.get("mean_ppl")),
                _fmt(q.get("median_ppl")),
                _fmt(q.get("mean_entropy")),
                _fmt(q.get("response_tokens")),
                _fmt(q.get("kept_response_tokens")),
                _fmt(q.get("kept_loss_tokens")),
            ]
        )
    return (
        "<p>Loss tokens before: response tokens of the unpruned samples (all samples in the "
        "quadrant, then only those kept); after: the loss tokens the published shards carry.</p>"
        + _table(headers, rows)
    )


def _summary_row(summary: dict[str, Any] | None) -> list[str]:
    summary = summary or {}
    return [_fmt(summary.get(k)) for k in ("n", "mean", "min", "p10", "median", "p90", "max")]


def _token_pruning_body(stats: dict[str, Any], figures: dict[str, str]) -> str:
    tp = stats.get("token_pruning") or {}
    if tp.get("note"):
        return _note(tp["note"])
    text = (
        f"<p>{_fmt(tp.get('samples'))} kept samples were token-pruned (Q2 and Q2-like fills): "
        f"their {_fmt(tp.get('response_tokens'))} response tokens keep "
        f"{_fmt(tp.get('kept_loss_tokens'))} loss tokens "
        f"({_pct(tp.get('kept_token_share'))}). Target token_ratio: "
        f"{_fmt(tp.get('token_ratio'))}. The tokens with the highest local perplexity "
        "s_i = (1 − λ)·PPL_i + λ·(PPL_{i−1} + PPL_{i+1}) are the ones masked.</p>"
    )
    headers = ["kept-token fraction", "n", "mean", "min", "p10", "median", "p90", "max"]
    table = _table(headers, [["token-pruned samples", *_summary_row(tp.get("kept_fraction"))]])
    return text + table + _img(figures.get("token-pruning"), "kept-token fraction")


def _lengths_body(stats: dict[str, Any], figures: dict[str, str]) -> str:
    lengths = stats.get("lengths") or {}
    if lengths.get("note"):
        return _note(lengths["note"])
    headers = ["quadrant", "subset", "n", "mean", "min", "p10", "median", "p90", "max"]
    rows = []
    for name in QUADRANT_ORDER:
        for subset in ("all", "kept"):
            summary = (lengths.get("quadrants") or {}).get(name, {}).get(subset)
            if summary:
                rows.append([name, subset, *_summary_row(summary)])
    return (
        "<p>Response tokens per sample (the positions that carry a label before pruning).</p>"
        + _table(headers, rows)
        + _img(figures.get("lengths"), "response length by quadrant")
    )


def _sources_body(stats: dict[str, Any], figures: dict[str, str]) -> str:
    sources = stats.get("sources") or {}
    if not sources:
        return _note("no per-source information in this version")
    headers = ["source", "input rows", "kept", "dropped", "rejected", "kept %"]
    headers += [f"{q} (kept)" for q in QUADRANT_ORDER]
    rows = []
    for name, s in sorted(sources.items()):
        scored = s.get("kept", 0) + s.get("dropped", 0)
        quads = s.get("quadrants") or {}
        rows.append(
            [
                html.escape(name),
                _fmt(s.get("input_rows")),
                _fmt(s.get("kept")),
                _fmt(s.get("dropped")),
                _fmt(s.get("rejected")),
                _pct(s.get("kept", 0) / scored if scored else None),
                *(
                    f"{_fmt(quads.get(q, {}).get('samples', 0))} "
                    f"({_fmt(quads.get(q, {}).get('kept', 0))})"
                    for q in QUADRANT_ORDER
                ),
            ]
        )
    origin = stats.get("sources_from")
    text = "<p>Rows per input file (or dataset directory); quadrant columns: samples (kept).</p>"
    if origin == "computed":
        text += _note(
            "the manifest has no per-source accounting (its scored cache did not record input "
            "rows per source); input rows here are kept + dropped + rejected."
        )
    text += _table(headers, rows) + _img(figures.get("sources"), "rows per source")
    return text + _groups_html(stats.get("groups"), figures)


def _groups_html(groups: dict[str, Any] | None, figures: dict[str, str]) -> str:
    if not groups or not groups.get("groups"):
        return ""
    by = html.escape(str(groups.get("group_by")))
    text = (
        f"<h3>Groups (qtuning.group_by: {by})</h3><p>Each group's share of the input against "
        "its share of the kept samples; a group is under-covered when its kept share is below "
        f"{_fmt(groups.get('min_share_fraction'))} times its input share.</p>"
    )
    if groups.get("under_covered"):
        text += _note("under-covered: " + ", ".join(str(g) for g in groups["under_covered"]))
    headers = ["group", "samples", "kept", "input share", "kept share", "under-covered"]
    headers += [f"{q} (kept)" for q in QUADRANT_ORDER]
    rows = []
    for name, g in groups["groups"].items():
        quads = g.get("quadrants") or {}
        rows.append(
            [
                html.escape(str(name)),
                _fmt(g.get("samples")),
                _fmt(g.get("kept")),
                _pct(g.get("input_share")),
                _pct(g.get("kept_share")),
                _fmt(g.get("under_covered")),
                *(
                    f"{_fmt(quads.get(q, {}).get('samples', 0))} "
                    f"({_fmt(quads.get(q, {}).get('kept', 0))})"
                    for q in QUADRANT_ORDER
                ),
            ]
        )
    return text + _table(headers, rows) + _img(figures.get("groups"), "samples per group")


def _migration_body(stats: dict[str, Any], figures: dict[str, str]) -> str:
    migration = stats.get("migration")
    if not migration:
        return _note(
            (stats.get("migration_note") or "")
            or "this version has no parent: there is no earlier epoch to compare with."
        )
    parent = migration.get("parent", "parent")
    text = (
        f"<p>{_fmt(migration.get('matched'))} samples are in both {html.escape(str(parent))} and "
        f"{html.escape(str(stats.get('version')))}: {_fmt(migration.get('quadrant_changed'))} "
        f"changed quadrant, {_fmt(migration.get('kept_to_dropped'))} went from kept to dropped "
        f"and {_fmt(migration.get('dropped_to_kept'))} from dropped to kept.</p>"
    )
    text += _img(figures.get("migration"), "quadrant migration")
    moves = migration.get("thresholds") or {}
    if moves:
        rows = [
            [html.escape(k), _fmt(v.get("parent")), _fmt(v.get("current")), _fmt(v.get("change"))]
            for k, v in sorted(moves.items())
        ]
        text += "<h3>How the thresholds moved</h3>" + _table(
            ["threshold", str(parent), str(stats.get("version")), "change"], rows
        )
    quads = migration.get("parent_quadrants") or {}
    if quads:
        current = stats.get("quadrants") or {}
        rows = [
            [
                q,
                _fmt(quads.get(q, {}).get("samples")),
                _fmt(current.get(q, {}).get("samples")),
                _fmt(quads.get(q, {}).get("kept")),
                _fmt(current.get(q, {}).get("kept")),
            ]
            for q in QUADRANT_ORDER
        ]
        text += "<h3>Quadrant sizes</h3>" + _table(
            ["quadrant", f"samples {parent}", "samples now", f"kept {parent}", "kept now"], rows
        )
    return text


def _example_html(view: SampleView, scale: ScoreScale) -> str:
    color = QUADRANT_COLORS.get(view.quadrant, "#999")
    body = f"<p>{html.escape(sample_header(view))}</p>"
    if view.segments:
        body += segments_html(view.segments, scale)
    if view.note:
        body += _note(view.note)
    return (
        f'<div class="example" style="border-left-color: {color}">'
        f"<h4>{html.escape(view.sample_id)}</h4>{body}</div>"
    )


def _examples_body(examples: Sequence[SampleView], scale: ScoreScale, note: str | None) -> str:
    low, high = _hex(shade(0.0)), _hex(shade(1.0))
    mid = _hex(shade(0.5))
    definition = f": {html.escape(scale.description)}" if scale.description else ""
    legend = (
        '<p class="legend">Grey: prompt (no label). '
        f'<span class="kept" style="background: {mid}">Shaded</span>: response token that keeps '
        f"its loss, background = {html.escape(scale.name)}{definition} "
        f'<span class="swatch" style="background: linear-gradient(to right, {low}, {mid}, '
        f'{high})"></span> {scale.low:g} (light) … ≥{scale.high:g} (dark, '
        f"{'log' if scale.log else 'linear'} scale). "
        '<del class="pruned-legend">Struck</del>: pruned token (label −100, no loss). '
        '<span class="dropped" style="background: #eee">Italic</span>: response of a dropped '
        "sample (not in the version). Hover a token for its score.</p>"
    )
    if note:
        legend += _note(note)
    if not examples:
        return legend + _note("no examples to show")
    parts = [legend]
    for name in QUADRANT_ORDER:
        views = [v for v in examples if v.quadrant == name]
        if views:
            parts.append(f"<h3>{name} {QUADRANT_LABELS[name]}</h3>")
            parts += [_example_html(v, scale) for v in views]
    return "".join(parts)


def report_html(
    stats: dict[str, Any],
    figures: dict[str, str],
    examples: Sequence[SampleView],
    *,
    scale: ScoreScale = PPL_SCALE,
    examples_note: str | None = None,
) -> str:
    """The report page: a header with the version's overview, then one ``<section>`` per id in
    ``SECTION_IDS``.

    ``stats``: the content of ``stats.json`` (``pipeline.report_job`` builds it); ``figures``:
    section id -> image ``src`` (a file name beside the page or a ``data:`` URI), missing ids
    get no image; ``examples``: samples rendered with :func:`segments_html` under ``scale``. The
    ``migration`` section holds a note when ``stats['migration']`` is empty.
    """
    version = str(stats.get("version", "?"))
    nav = "".join(f'<a href="#{s}">{s.replace("-", " ")}</a>' for s in SECTION_IDS)
    sections = [
        _section("eu-plane", "Error–Uncertainty plane", _eu_plane_body(stats, figures)),
        _section("quadrants", "Quadrants", _quadrants_body(stats)),
        _section("token-pruning", "Token pruning", _token_pruning_body(stats, figures)),
        _section("lengths", "Response length by quadrant", _lengths_body(stats, figures)),
        _section("sources", "Sources", _sources_body(stats, figures)),
        _section("migration", "Migration from the parent version", _migration_body(stats, figures)),
        _section("examples", "Examples", _examples_body(examples, scale, examples_note)),
    ]
    notes = "".join(_note(n) for n in stats.get("notes") or [])
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>qtune report: {html.escape(version)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>qtune report: {html.escape(version)}</h1>"
        f'<p class="meta">generated {_fmt(stats.get("generated"))} from the published version '
        f"and its scored cache</p><nav>{nav}</nav></header>"
        f'<section id="overview"><h2>Overview</h2>{notes}{_overview(stats)}</section>'
        + "".join(sections)
        + "</body></html>\n"
    )


__all__ = [
    "ENTROPY_SCALE",
    "PPL_SCALE",
    "QUADRANT_COLORS",
    "QUADRANT_LABELS",
    "QUADRANT_ORDER",
    "SECTION_IDS",
    "SampleView",
    "ScoreScale",
    "Segment",
    "eu_plane_png",
    "kept_fraction_png",
    "lengths_png",
    "migration_png",
    "render_sample_rich",
    "report_html",
    "sample_header",
    "segments_html",
    "segments_rich",
    "sources_png",
    "subsample_indices",
    "threshold_lines",
    "token_roles",
    "token_segments",
]
