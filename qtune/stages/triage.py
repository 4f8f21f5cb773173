"""Triage: decide which samples to keep from their place on the Error-Uncertainty plane.

Input: per-sample arrays (one row per scored sample) — ``ppl``, ``entropy``, ``n_tokens``, and a
64-bit tie-break key derived from ``sample_id`` (``stable_hash64``). Output: a ``Decisions`` of
aligned arrays: ``quadrant`` (plane label, median split within the scope), ``kept``, ``filled``
and ``token_pruned``. Nothing here touches per-token data; everything is vectorised, including
the paper-faithful ``batch`` scope (hundreds of thousands of pseudo mini-batches at once).

Q-Tuning (DESIGN section 2). For a in [0, 0.49]:
    Q2(a) = {PPL > quantile(PPL, 1-a) and Ent <= quantile(Ent, a)}   valuable misconceptions
    Q4(a) = {PPL <= quantile(PPL, a) and Ent > quantile(Ent, 1-a)}   calibration data
a is bisected for the largest |Q2(a) u Q4(a)| <= K = max(1, floor(r_s * |S|)); the remainder up to K
is filled by the support score |P - E| (P, E normalised within S), ties broken by the hash of the
sample_id. Our choices where the paper is silent: quantiles interpolate linearly (NumPy's
default); 24 bisection steps; a fill with P >= E is treated as Q2 (token-pruned), else as Q4.

Scopes: ``global`` (the whole epoch is one S), ``batch`` (seeded pseudo mini-batches of
``batch_size``, paper faithful) and ``group`` (one S per label in ``groups``, e.g. the source or
task of each sample, so that a mixed corpus keeps every part: globally, an easy task sits in Q3
and is starved). In ``group`` scope, group g keeps K_g = max(1, floor(r_g * |g|)) with
r_g = ``group_ratios.get(g, sample_ratio)``; a group under ``min_group_size`` samples is too small
for quantiles and keeps floor(r_g * |g|) (possibly 0) by the support score alone, its keeps
counting as ``filled``. Baselines in ``group`` scope pick their top K_g within each group.
``coverage`` compares each group's share of the kept samples with its share of the input, for
any scope, to warn when a group is starved.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qtune.stages.eu_plane import _FLOOR_EPS, keep_count

logger = logging.getLogger(__name__)

A_MAX = 0.49
BISECTION_STEPS = 24
SCOPES = ("global", "batch", "group")
MIN_GROUP_SIZE = 8  # below this a group is too small for quantiles: support score only
QUADRANTS = np.array(["Q1", "Q2", "Q3", "Q4"])
QUADRANT_NAMES = {
    "Q1": "harmful noise",
    "Q2": "valuable misconception",
    "Q3": "redundant knowledge",
    "Q4": "calibration",
}


@dataclass
class Decisions:
    """Per-sample triage result, aligned with the input arrays."""

    quadrant: np.ndarray  # "Q1".."Q4": the plane label (median split within the scope)
    kept: np.ndarray  # bool
    filled: np.ndarray  # bool: kept by the fill-up rather than by a corner set
    token_pruned: np.ndarray  # bool: its response tokens are pruned (Q2 and Q2-like fills)
    thresholds: dict  # what the scope(s) found, for the manifest
    keys: np.ndarray | None = None  # uint64 sample-id hashes (tie-breaks, shard routing)


# --- tie-break keys -------------------------------------------------------------------------------

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def stable_hash64(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """FNV-1a 64-bit hash of each UTF-8 string, computed over Arrow buffers (no per-row Python).

    Stable across runs, machines and library versions, unlike Python's or polars' hashes.
    """
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    strings = strings.cast(pa.large_string())
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int64)[
        strings.offset : strings.offset + len(strings) + 1
    ]
    data = np.frombuffer(strings.buffers()[2], dtype=np.uint8) if len(strings) else np.zeros(0)
    starts, lengths = offsets[:-1], np.diff(offsets)
    hashes = np.full(len(strings), _FNV_OFFSET, dtype=np.uint64)
    active = np.arange(len(strings))
    for j in range(int(lengths.max()) if len(lengths) else 0):
        active = active[lengths[active] > j]
        byte = data[starts[active] + j].astype(np.uint64)
        hashes[active] = (hashes[active] ^ byte) * _FNV_PRIME
    return hashes


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Well-mixed 64-bit values from 64-bit inputs (seeded noise independent of row order)."""
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# --- quadrant labels ------------------------------------------------------------------------------


def quadrant_labels(ppl: np.ndarray, entropy: np.ndarray) -> np.ndarray:
    """Rows of a 2-D ``[scopes, n]`` array -> "Q1".."Q4" by the median split within each row."""
    high_ppl = ppl > np.median(ppl, axis=-1, keepdims=True)
    high_ent = entropy > np.median(entropy, axis=-1, keepdims=True)
    index = np.where(high_ppl, np.where(high_ent, 0, 1), np.where(high_ent, 3, 2))
    return QUADRANTS[index]


# --- Q-Tuning on rows of equal size ---------------------------------------------------------------


def _row_quantile(sorted_rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Linear-interpolation quantile ``q[r]`` of each sorted row r (NumPy's default method)."""
    n = sorted_rows.shape[1]
    position = q * (n - 1)
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, n - 1)
    frac = position - lower
    rows = np.arange(sorted_rows.shape[0])
    low_values = sorted_rows[rows, lower]
    return low_values + frac * (sorted_rows[rows, upper] - low_values)


def _corners(ppl, ent, ppl_sorted, ent_sorted, a):
    ppl_hi = _row_quantile(ppl_sorted, 1 - a)[:, None]
    ppl_lo = _row_quantile(ppl_sorted, a)[:, None]
    ent_hi = _row_quantile(ent_sorted, 1 - a)[:, None]
    ent_lo = _row_quantile(ent_sorted, a)[:, None]
    q2 = (ppl > ppl_hi) & (ent <= ent_lo)
    q4 = (ppl <= ppl_lo) & (ent > ent_hi)
    return q2, q4


def _normalise(values: np.ndarray, tiebreak: np.ndarray, method: str) -> np.ndarray:
    if method == "rank":
        # Ordinal ranks, ties ordered by the sample-id hash (deterministic), scaled to [0, 1].
        order = np.lexsort((tiebreak, values), axis=-1)
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(values.shape[1])[None, :], axis=-1)
        return ranks / max(values.shape[1] - 1, 1)
    low = values.min(axis=-1, keepdims=True)
    span = values.max(axis=-1, keepdims=True) - low
    return np.divide(values - low, span, out=np.zeros_like(values), where=span > 0)


def qtuning_rows(
    ppl: np.ndarray,
    entropy: np.ndarray,
    tiebreak: np.ndarray,
    sample_ratio: float,
    normalize: str = "minmax",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q-Tuning triage of each row of ``[m, n]`` arrays (each row one scope of n samples).

    Returns (kept, filled, token_pruned, a) with exactly K = max(1, floor(r_s * n)) kept per row.
    """
    m, n = ppl.shape
    k = int(keep_count(sample_ratio, n))
    ppl_sorted, ent_sorted = np.sort(ppl, axis=1), np.sort(entropy, axis=1)

    def count(a: np.ndarray) -> np.ndarray:
        q2, q4 = _corners(ppl, entropy, ppl_sorted, ent_sorted, a)
        return (q2 | q4).sum(axis=1)

    # |Q2(a) u Q4(a)| grows monotonically with a (both thresholds move outwards), and is 0 at
    # a = 0, so bisection finds the largest a whose corner sets still fit in K.
    lo, hi = np.zeros(m), np.full(m, A_MAX)
    fits_at_max = count(hi) <= k
    lo[fits_at_max] = A_MAX
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        fits = count(mid) <= k
        lo = np.where(fits_at_max, lo, np.where(fits, mid, lo))
        hi = np.where(fits_at_max, hi, np.where(fits, hi, mid))
    q2, q4 = _corners(ppl, entropy, ppl_sorted, ent_sorted, lo)
    corner = q2 | q4

    filled, q2_like = _fill_up(ppl, entropy, tiebreak, corner, k - corner.sum(axis=1), normalize)
    kept = corner | filled
    token_pruned = q2 | (filled & q2_like)
    return kept, filled, token_pruned, lo


def _fill_up(
    ppl: np.ndarray,
    entropy: np.ndarray,
    tiebreak: np.ndarray,
    taken: np.ndarray,
    need: np.ndarray,
    normalize: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``need[r]`` strongest samples of row r outside ``taken``, by support |P - E|.

    Ties by the sample-id hash. Returns (filled, q2_like): q2_like (P >= E) marks the samples a
    fill treats as Q2 (token-pruned) rather than Q4.
    """
    p = _normalise(ppl, tiebreak, normalize)
    e = _normalise(entropy, tiebreak, normalize)
    support = np.where(taken, -np.inf, np.abs(p - e))
    order = np.lexsort((tiebreak, -support), axis=-1)
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(ppl.shape[1])[None, :], axis=-1)
    filled = ~taken & (position < need[:, None])
    return filled, p >= e


def _batches(keys: np.ndarray, batch_size: int, seed: int) -> list[np.ndarray]:
    """Seeded pseudo mini-batches; full batches first, then the rest.

    Samples are put in sample-id-hash order before the seeded shuffle, so the batches do not
    depend on the order rows happen to have in the scored cache.
    """
    n = len(keys)
    permutation = np.argsort(keys, kind="stable")[np.random.default_rng(seed).permutation(n)]
    full = (n // batch_size) * batch_size
    groups = [permutation[:full].reshape(-1, batch_size)] if full else []
    if full < n:
        groups.append(permutation[full:][None, :])
    return groups


@dataclass(frozen=True)
class GroupPlan:
    """One group of the ``group`` scope: its members and its keep target."""

    name: str  # the group label as a string (the key in thresholds and coverage)
    index: np.ndarray  # member rows, in input order
    ratio: float  # r_g
    k: int  # K_g: max(1, floor(r_g * n)), or floor(r_g * n) for a small group
    small: bool  # fewer than min_group_size members: kept by the support score alone

    def report(self) -> dict:
        return {"n": len(self.index), "k": self.k, "ratio": self.ratio, "small": self.small}


def group_index(groups, n: int | None = None) -> tuple[list[str], np.ndarray]:
    """Group labels (strings or ints; NumPy or Arrow) -> (sorted names, int64 code per sample).

    Hash-based (Arrow dictionary encoding), so millions of labels cost no Python loop. Names are
    the labels as strings, sorted as strings, so the codes do not depend on row order. Missing
    labels are an error.
    """
    if isinstance(groups, pa.ChunkedArray):
        groups = groups.combine_chunks()
    try:
        labels = groups if isinstance(groups, pa.Array) else pa.array(np.asarray(groups))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"group labels must be all strings or all integers: {e}") from e
    if n is not None and len(labels) != n:
        raise ValueError(f"groups has {len(labels)} labels; expected one per sample ({n})")
    if labels.null_count:
        raise ValueError(
            f"groups has {labels.null_count} missing labels; give every sample a group "
            "(e.g. its source name)"
        )
    if pa.types.is_dictionary(labels.type):
        labels = labels.cast(labels.type.value_type)
    encoded = pc.dictionary_encode(labels.cast(pa.large_string()))
    names = encoded.dictionary.to_pylist()
    order = np.argsort(np.array(names, dtype=object), kind="stable")
    code_of = np.empty(len(names), dtype=np.int64)
    code_of[order] = np.arange(len(names))
    codes = code_of[encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)]
    return [names[i] for i in order], codes


def group_plans(
    groups,
    n: int,
    sample_ratio: float,
    group_ratios: Mapping[str, float] | None = None,
    min_group_size: int = MIN_GROUP_SIZE,
) -> list[GroupPlan]:
    """Split n samples by group label and give each group its ratio and keep count.

    ``group_ratios`` is keyed by the label as a string (``"3"`` for the integer label 3); groups
    without an entry use ``sample_ratio``. An entry that matches no group is logged, not an error:
    one configuration may serve corpora with different groups.
    """
    if groups is None:
        raise ValueError("scope 'group' needs groups: one group label per sample")
    group_ratios = {str(name): ratio for name, ratio in (group_ratios or {}).items()}
    for name, ratio in group_ratios.items():
        if not 0 < ratio <= 1:
            raise ValueError(f"group_ratios[{name!r}] = {ratio}; expected a ratio in (0, 1]")
    names, codes = group_index(groups, n)
    unused = sorted(set(group_ratios) - set(names))
    if unused:
        logger.warning("group_ratios name groups absent from this corpus: %s", ", ".join(unused))
    if not names:
        return []
    counts = np.bincount(codes, minlength=len(names))
    members = np.split(np.argsort(codes, kind="stable"), np.cumsum(counts)[:-1])
    plans = []
    for name, index in zip(names, members, strict=True):
        ratio = float(group_ratios.get(name, sample_ratio))
        small = len(index) < min_group_size
        if small:
            k = int(np.floor(ratio * len(index) + _FLOOR_EPS))
        else:
            k = int(keep_count(ratio, len(index)))
        plans.append(GroupPlan(name, index, ratio, k, small))
    return plans


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")


def _scope_thresholds(ppl: np.ndarray, entropy: np.ndarray, a: float) -> dict:
    """The corner thresholds at a and the label medians of one scope, for the manifest."""
    return {
        "a": a,
        "ppl_high": float(np.quantile(ppl, 1 - a)),
        "ppl_low": float(np.quantile(ppl, a)),
        "entropy_high": float(np.quantile(entropy, 1 - a)),
        "entropy_low": float(np.quantile(entropy, a)),
        "ppl_median": float(np.median(ppl)),
        "entropy_median": float(np.median(entropy)),
    }


def qtuning_policy(
    ppl: np.ndarray,
    entropy: np.ndarray,
    n_tokens: np.ndarray,
    tiebreak: np.ndarray,
    *,
    sample_ratio: float,
    scope: str = "global",
    batch_size: int = 8,
    seed: int = 0,
    normalize: str = "minmax",
    groups=None,
    group_ratios: Mapping[str, float] | None = None,
    min_group_size: int = MIN_GROUP_SIZE,
) -> Decisions:
    """Q-Tuning over a scope (``global``: one scope; ``batch``: seeded pseudo mini-batches;
    ``group``: one scope per label in ``groups``). ``groups`` is ignored by the other scopes."""
    _check_scope(scope)
    n = len(ppl)
    one_group = None
    if scope == "group":
        plans = group_plans(groups, n, sample_ratio, group_ratios, min_group_size)
        whole = len(plans) == 1 and not plans[0].small and plans[0].ratio == sample_ratio
        if not whole:
            return _qtuning_groups(ppl, entropy, tiebreak, plans, normalize)
        one_group = plans[0].name  # a single group is the whole epoch: global triage
    if scope == "global" or one_group is not None:
        groups = [np.arange(n)[None, :]]
    else:
        groups = _batches(tiebreak, batch_size, seed)
    quadrant = np.empty(n, dtype=QUADRANTS.dtype)
    kept, filled, pruned = (np.zeros(n, dtype=bool) for _ in range(3))
    a_values = []
    for index in groups:
        g_ppl, g_ent = ppl[index], entropy[index]
        g_kept, g_filled, g_pruned, a = qtuning_rows(
            g_ppl, g_ent, tiebreak[index], sample_ratio, normalize
        )
        quadrant[index] = quadrant_labels(g_ppl, g_ent)
        kept[index], filled[index], pruned[index] = g_kept, g_filled, g_pruned
        a_values.append(a)
    a_all = np.concatenate(a_values)
    thresholds = {"scope": scope, "a_mean": float(a_all.mean()), "a_min": float(a_all.min())}
    if scope == "global" or one_group is not None:
        thresholds.update(_scope_thresholds(ppl, entropy, float(a_all[0])))
        if one_group is not None:
            thresholds["single_group"] = one_group
    else:
        thresholds.update(batches=int(sum(len(g) for g in groups)), batch_size=batch_size)
    return Decisions(quadrant, kept, filled, pruned & kept, thresholds)


def _qtuning_groups(
    ppl: np.ndarray,
    entropy: np.ndarray,
    tiebreak: np.ndarray,
    plans: list[GroupPlan],
    normalize: str,
) -> Decisions:
    """Q-Tuning within each group; a small group keeps its K_g by the support score alone."""
    n = len(ppl)
    quadrant = np.empty(n, dtype=QUADRANTS.dtype)
    kept, filled, pruned = (np.zeros(n, dtype=bool) for _ in range(3))
    report = {}
    for plan in plans:
        index = plan.index
        g_ppl, g_ent, g_key = ppl[index][None, :], entropy[index][None, :], tiebreak[index][None, :]
        quadrant[index] = quadrant_labels(g_ppl, g_ent)[0]
        report[plan.name] = plan.report()
        if plan.small:
            # Too few samples for corner quantiles: the fill-up alone, from nothing taken.
            g_filled, q2_like = _fill_up(
                g_ppl, g_ent, g_key, np.zeros_like(g_ppl, dtype=bool), np.array([plan.k]), normalize
            )
            kept[index] = filled[index] = g_filled[0]
            pruned[index] = g_filled[0] & q2_like[0]
            continue
        g_kept, g_filled, g_pruned, a = qtuning_rows(g_ppl, g_ent, g_key, plan.ratio, normalize)
        kept[index], filled[index], pruned[index] = g_kept[0], g_filled[0], g_pruned[0]
        report[plan.name].update(_scope_thresholds(g_ppl[0], g_ent[0], float(a[0])))
    thresholds = {
        "scope": "group",
        "groups": report,
        "small_groups": [plan.name for plan in plans if plan.small],
    }
    return Decisions(quadrant, kept, filled, pruned & kept, thresholds)


# --- baselines (ablations) ------------------------------------------------------------------------


def _top_k(score: np.ndarray, tiebreak: np.ndarray, k: int) -> np.ndarray:
    order = np.lexsort((tiebreak, -score))
    kept = np.zeros(len(score), dtype=bool)
    kept[order[:k]] = True
    return kept


def _baseline(score_of: Callable[..., np.ndarray]) -> Callable[..., Decisions]:
    def policy(
        ppl,
        entropy,
        n_tokens,
        tiebreak,
        *,
        sample_ratio,
        seed=0,
        scope="global",
        groups=None,
        group_ratios=None,
        min_group_size=MIN_GROUP_SIZE,
        **_,
    ) -> Decisions:
        _check_scope(scope)
        score = score_of(ppl, entropy, n_tokens, tiebreak, seed)
        if scope != "group":  # a baseline ranks the whole epoch; batches mean nothing to it
            kept = _top_k(score, tiebreak, int(keep_count(sample_ratio, len(score))))
            quadrant = quadrant_labels(ppl[None, :], entropy[None, :])[0]
            # Baselines have no corners: every kept sample is token-pruned when token pruning is on.
            return Decisions(
                quadrant, kept, np.zeros_like(kept), kept.copy(), {"policy": "baseline"}
            )
        plans = group_plans(groups, len(ppl), sample_ratio, group_ratios, min_group_size)
        quadrant = np.empty(len(ppl), dtype=QUADRANTS.dtype)
        kept = np.zeros(len(ppl), dtype=bool)
        for plan in plans:  # a small group keeps floor(r_g * n), as under qtuning
            index = plan.index
            kept[index] = _top_k(score[index], tiebreak[index], plan.k)
            quadrant[index] = quadrant_labels(ppl[index][None, :], entropy[index][None, :])[0]
        thresholds = {
            "policy": "baseline",
            "scope": "group",
            "groups": {plan.name: plan.report() for plan in plans},
            "small_groups": [plan.name for plan in plans if plan.small],
        }
        return Decisions(quadrant, kept, np.zeros_like(kept), kept.copy(), thresholds)

    return policy


POLICIES: dict[str, Callable[..., Decisions]] = {
    "qtuning": qtuning_policy,
    # Seeded by sample id, so the choice does not depend on row order in the cache.
    "random": _baseline(
        lambda p, e, t, keys, seed: splitmix64(keys ^ np.uint64(seed)).astype(np.float64)
    ),
    "ppl": _baseline(lambda p, e, t, keys, seed: p),
    "entropy": _baseline(lambda p, e, t, keys, seed: e),
    "longest": _baseline(lambda p, e, t, keys, seed: t.astype(np.float64)),
    "shortest": _baseline(lambda p, e, t, keys, seed: -t.astype(np.float64)),
}


def triage(
    policy: str,
    ppl: np.ndarray,
    entropy: np.ndarray,
    n_tokens: np.ndarray,
    sample_ids: pa.Array | pa.ChunkedArray,
    **options,
) -> Decisions:
    """Run a policy by name over one epoch's samples.

    ``options`` go to the policy: ``sample_ratio`` (required), ``scope`` (one of ``SCOPES``),
    ``batch_size`` and ``seed`` (``batch`` scope; ``seed`` also seeds ``random``), ``normalize``
    (``minmax`` or ``rank``), and for ``scope="group"``: ``groups`` (one label per sample, strings
    or ints, NumPy or Arrow), ``group_ratios`` (``{label: r_g}``, default ``sample_ratio``) and
    ``min_group_size`` (default ``MIN_GROUP_SIZE``). The other scopes ignore the group options.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; valid: {', '.join(sorted(POLICIES))}")
    if len(ppl) == 0:
        raise ValueError("nothing to triage: the scored cache has no samples")
    tiebreak = stable_hash64(sample_ids)
    decisions = POLICIES[policy](
        np.asarray(ppl, np.float64),
        np.asarray(entropy, np.float64),
        np.asarray(n_tokens),
        tiebreak,
        **options,
    )
    decisions.thresholds["policy"] = policy
    decisions.keys = tiebreak
    return decisions


# --- coverage -------------------------------------------------------------------------------------


def coverage(
    groups,
    kept: np.ndarray,
    kept_loss_tokens: np.ndarray,
    min_share_fraction: float = 0.5,
) -> dict:
    """Each group's share of the kept samples against its share of the input (any scope).

    ``kept_loss_tokens`` is per sample: the response tokens that still carry a label after token
    pruning; only kept samples count. A group is ``under_covered`` when its kept share is below
    ``min_share_fraction`` times its input share (with nothing kept at all, every group is).
    Returns plain ints, floats, bools and strings (JSON-ready)::

        {"min_share_fraction": f, "input_samples": n, "kept_samples": k, "kept_loss_tokens": t,
         "groups": {name: {"input_samples", "input_share", "kept_samples", "kept_share",
                           "kept_loss_tokens", "under_covered"}},
         "under_covered": [names]}
    """
    if min_share_fraction < 0:
        raise ValueError(f"min_share_fraction = {min_share_fraction}; expected >= 0")
    kept = np.asarray(kept, dtype=bool)
    tokens = np.asarray(kept_loss_tokens)
    if len(tokens) != len(kept):
        raise ValueError(
            f"kept_loss_tokens has {len(tokens)} values; expected one per sample ({len(kept)})"
        )
    names, codes = group_index(groups, len(kept))
    m = len(names)
    n_in = np.bincount(codes, minlength=m)
    n_kept = np.bincount(codes[kept], minlength=m)
    kept_tokens = np.bincount(codes[kept], weights=tokens[kept].astype(np.float64), minlength=m)
    total_in, total_kept = int(n_in.sum()), int(n_kept.sum())
    in_share = n_in / max(total_in, 1)
    kept_share = n_kept / max(total_kept, 1)
    under = kept_share < min_share_fraction * in_share
    report = {
        name: {
            "input_samples": int(n_in[g]),
            "input_share": float(in_share[g]),
            "kept_samples": int(n_kept[g]),
            "kept_share": float(kept_share[g]),
            "kept_loss_tokens": int(round(kept_tokens[g])),
            "under_covered": bool(under[g]),
        }
        for g, name in enumerate(names)
    }
    return {
        "min_share_fraction": float(min_share_fraction),
        "input_samples": total_in,
        "kept_samples": total_kept,
        "kept_loss_tokens": int(round(kept_tokens.sum())),
        "groups": report,
        "under_covered": [name for g, name in enumerate(names) if under[g]],
    }


#: Samples above this PPL quantile (of the whole epoch) form the "extreme PPL tail".
PPL_TAIL_QUANTILE = 0.95
#: Warn when more than this share of the kept samples carry at most one loss token.
THIN_LOSS_WARN_SHARE = 0.5


def selection_signals(ppl: np.ndarray, kept: np.ndarray, kept_loss_tokens: np.ndarray) -> dict:
    """What a selection trains on, beyond counts (JSON-ready)::

        {"kept_samples": k, "at_most_one_loss_token": n, "at_most_one_loss_token_share": f,
         "ppl_tail": {"quantile": q, "ppl_above": v, "input_share": f, "kept_share": f}}

    ``at_most_one_loss_token``: kept samples whose loss mask holds 0 or 1 token (on short
    answers, unguarded pruning leaves only the end-of-turn token). ``ppl_tail``: the share of the
    kept samples from the top ``1 - q`` of PPL, against the input's share: labels the model is
    confidently sure are wrong sit there (high PPL, low entropy: the Q2 corner taken first).
    """
    kept = np.asarray(kept, dtype=bool)
    ppl = np.asarray(ppl, dtype=np.float64)
    tokens = np.asarray(kept_loss_tokens)[kept]
    n_kept = int(kept.sum())
    thin = int((tokens <= 1).sum())
    finite = np.isfinite(ppl)
    above = float(np.quantile(ppl[finite], PPL_TAIL_QUANTILE)) if finite.any() else float("nan")
    tail = finite & (ppl > above)
    return {
        "kept_samples": n_kept,
        "at_most_one_loss_token": thin,
        "at_most_one_loss_token_share": thin / n_kept if n_kept else 0.0,
        "ppl_tail": {
            "quantile": PPL_TAIL_QUANTILE,
            "ppl_above": above,
            "input_share": float(tail.mean()) if len(ppl) else 0.0,
            "kept_share": float(tail[kept].mean()) if n_kept else 0.0,
        },
    }


__all__ = [
    "MIN_GROUP_SIZE",
    "PPL_TAIL_QUANTILE",
    "THIN_LOSS_WARN_SHARE",
    "POLICIES",
    "QUADRANT_NAMES",
    "SCOPES",
    "Decisions",
    "GroupPlan",
    "coverage",
    "group_index",
    "group_plans",
    "selection_signals",
    "stable_hash64",
    "triage",
]
