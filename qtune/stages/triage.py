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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from qtune.stages.eu_plane import keep_count

A_MAX = 0.49
BISECTION_STEPS = 24
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

    # Fill-up: the strongest remaining samples by support |P - E|, ties by sample-id hash.
    p = _normalise(ppl, tiebreak, normalize)
    e = _normalise(entropy, tiebreak, normalize)
    support = np.where(corner, -np.inf, np.abs(p - e))
    order = np.lexsort((tiebreak, -support), axis=-1)
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(n)[None, :], axis=-1)
    need = k - corner.sum(axis=1)
    filled = ~corner & (position < need[:, None])
    kept = corner | filled
    token_pruned = q2 | (filled & (p >= e))
    return kept, filled, token_pruned, lo


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
) -> Decisions:
    """Q-Tuning over a scope (``global``: one scope; ``batch``: seeded pseudo mini-batches)."""
    n = len(ppl)
    if scope == "global":
        groups = [np.arange(n)[None, :]]
    elif scope == "batch":
        groups = _batches(tiebreak, batch_size, seed)
    else:
        raise ValueError(f"unknown scope {scope!r}; valid: global, batch")
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
    if scope == "global":
        a = float(a_all[0])
        thresholds.update(
            a=a,
            ppl_high=float(np.quantile(ppl, 1 - a)),
            ppl_low=float(np.quantile(ppl, a)),
            entropy_high=float(np.quantile(entropy, 1 - a)),
            entropy_low=float(np.quantile(entropy, a)),
            ppl_median=float(np.median(ppl)),
            entropy_median=float(np.median(entropy)),
        )
    else:
        thresholds.update(batches=int(sum(len(g) for g in groups)), batch_size=batch_size)
    return Decisions(quadrant, kept, filled, pruned & kept, thresholds)


# --- baselines (ablations) ------------------------------------------------------------------------


def _top_k(score: np.ndarray, tiebreak: np.ndarray, sample_ratio: float) -> np.ndarray:
    k = int(keep_count(sample_ratio, len(score)))
    order = np.lexsort((tiebreak, -score))
    kept = np.zeros(len(score), dtype=bool)
    kept[order[:k]] = True
    return kept


def _baseline(score_of: Callable[..., np.ndarray]) -> Callable[..., Decisions]:
    def policy(ppl, entropy, n_tokens, tiebreak, *, sample_ratio, seed=0, **_) -> Decisions:
        kept = _top_k(score_of(ppl, entropy, n_tokens, tiebreak, seed), tiebreak, sample_ratio)
        quadrant = quadrant_labels(ppl[None, :], entropy[None, :])[0]
        # Baselines have no corners: every kept sample is token-pruned when token pruning is on.
        return Decisions(quadrant, kept, np.zeros_like(kept), kept.copy(), {"policy": "baseline"})

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
    """Run a policy by name over one epoch's samples."""
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


__all__ = ["POLICIES", "QUADRANT_NAMES", "Decisions", "stable_hash64", "triage"]
