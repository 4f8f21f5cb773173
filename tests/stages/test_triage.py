"""Triage against a brute-force reference on random and adversarial inputs; baselines."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from qtune.stages.triage import POLICIES, quadrant_labels, stable_hash64, triage


def _ids(n: int) -> pa.Array:
    return pa.array([f"sample-{i}" for i in range(n)])


def _reference(ppl, ent, ids, ratio, normalize="minmax"):
    """Straight from DESIGN section 2, with np.quantile and Python sorting."""
    n = len(ppl)
    k = max(1, int(np.floor(ratio * n + 1e-9)))

    def corners(a):
        q2 = (ppl > np.quantile(ppl, 1 - a)) & (ent <= np.quantile(ent, a))
        q4 = (ppl <= np.quantile(ppl, a)) & (ent > np.quantile(ent, 1 - a))
        return q2, q4

    return k, corners


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("ratio", [0.05, 0.25, 0.5, 0.9, 1.0])
def test_qtuning_matches_reference(seed, ratio):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    ppl = np.exp(rng.normal(1, 1, n))
    ent = rng.gamma(2, 0.5, n) + 0.3 * np.log(ppl)
    if seed % 3 == 0:  # heavy ties
        ppl, ent = np.round(ppl), np.round(ent)
    ids = _ids(n)
    d = triage("qtuning", ppl, ent, np.ones(n), ids, sample_ratio=ratio)
    k, corners = _reference(ppl, ent, ids, ratio)
    assert d.kept.sum() == k
    a = d.thresholds["a"]
    q2, q4 = corners(a)
    corner = q2 | q4
    assert corner.sum() <= k
    # Maximal: a little more a would exceed K (unless a is already at its 0.49 cap).
    if a < 0.49:
        q2b, q4b = corners(min(a + 1e-6, 0.49))
        assert (q2b | q4b).sum() > k
    assert np.array_equal(d.kept & ~d.filled, corner)
    # Fill-up: the best |P - E| among the rest, ties by the sample-id hash.
    p = (ppl - ppl.min()) / (np.ptp(ppl) or 1) if np.ptp(ppl) else np.zeros(n)
    e = (ent - ent.min()) / (np.ptp(ent) or 1) if np.ptp(ent) else np.zeros(n)
    keys = stable_hash64(ids)
    rest = sorted(np.flatnonzero(~corner), key=lambda i: (-abs(p[i] - e[i]), keys[i]))
    expected_fill = np.zeros(n, dtype=bool)
    expected_fill[rest[: k - corner.sum()]] = True
    assert np.array_equal(d.filled, expected_fill)
    assert np.array_equal(d.token_pruned, q2 | (expected_fill & (p >= e)))
    # Labels: median split, independent of the keep decision.
    assert np.array_equal(d.quadrant, quadrant_labels(ppl[None], ent[None])[0])


def test_all_equal_values_keep_exactly_k_by_hash():
    n = 20
    ids = _ids(n)
    d = triage("qtuning", np.ones(n), np.ones(n), np.ones(n), ids, sample_ratio=0.3)
    assert d.kept.sum() == 6 and d.filled.sum() == 6
    assert set(np.flatnonzero(d.kept)) == set(np.argsort(stable_hash64(ids))[:6])
    again = triage("qtuning", np.ones(n), np.ones(n), np.ones(n), ids, sample_ratio=0.3)
    assert np.array_equal(d.kept, again.kept)


def test_one_sample_and_tiny_ratio_keep_one():
    d = triage(
        "qtuning", np.array([3.0]), np.array([1.0]), np.array([5]), _ids(1), sample_ratio=0.01
    )
    assert d.kept.tolist() == [True] and d.quadrant.tolist() == ["Q3"]
    d = triage(
        "qtuning", np.arange(1.0, 11), np.arange(10.0), np.ones(10), _ids(10), sample_ratio=0.01
    )
    assert d.kept.sum() == 1


def test_k_larger_than_corners_fills_up():
    rng = np.random.default_rng(1)
    ppl = np.exp(rng.normal(size=500))
    ent = np.log(ppl) + rng.normal(scale=0.05, size=500)  # almost no off-diagonal mass
    d = triage("qtuning", ppl, ent, np.ones(500), _ids(500), sample_ratio=0.8)
    assert d.kept.sum() == 400 and d.filled.sum() > 300
    assert d.thresholds["a"] == pytest.approx(0.49)


def test_batch_scope_keeps_k_per_pseudo_batch():
    rng = np.random.default_rng(2)
    n = 83  # 10 full batches of 8 and one of 3
    ppl, ent = np.exp(rng.normal(size=n)), rng.gamma(2, 1, n)
    d = triage(
        "qtuning",
        ppl,
        ent,
        np.ones(n),
        _ids(n),
        sample_ratio=0.25,
        scope="batch",
        batch_size=8,
        seed=5,
    )
    perm = np.argsort(stable_hash64(_ids(n)), kind="stable")[
        np.random.default_rng(5).permutation(n)
    ]
    for start in range(0, n, 8):
        members = perm[start : start + 8]
        assert d.kept[members].sum() == max(1, int(np.floor(0.25 * len(members))))
        np.testing.assert_array_equal(
            d.quadrant[members], quadrant_labels(ppl[members][None], ent[members][None])[0]
        )
    other = triage(
        "qtuning",
        ppl,
        ent,
        np.ones(n),
        _ids(n),
        sample_ratio=0.25,
        scope="batch",
        batch_size=8,
        seed=6,
    )
    assert not np.array_equal(d.kept, other.kept)
    assert d.thresholds["batches"] == 11


def test_rank_normalisation_is_deterministic_and_exact_k():
    rng = np.random.default_rng(3)
    ppl, ent = rng.gamma(1, 1, 101), rng.gamma(1, 1, 101)
    d = triage("qtuning", ppl, ent, np.ones(101), _ids(101), sample_ratio=0.6, normalize="rank")
    assert d.kept.sum() == 60


def test_baselines():
    n = 50
    rng = np.random.default_rng(4)
    ppl, ent = rng.gamma(2, 1, n), rng.gamma(2, 1, n)
    length = rng.integers(5, 500, n)
    ids = _ids(n)
    top = lambda x: set(np.argsort(-x)[:10])  # noqa: E731
    assert set(np.flatnonzero(triage("ppl", ppl, ent, length, ids, sample_ratio=0.2).kept)) == top(
        ppl
    )
    assert set(
        np.flatnonzero(triage("entropy", ppl, ent, length, ids, sample_ratio=0.2).kept)
    ) == top(ent)
    assert set(
        np.flatnonzero(triage("longest", ppl, ent, length, ids, sample_ratio=0.2).kept)
    ) == top(length.astype(float))
    assert set(
        np.flatnonzero(triage("shortest", ppl, ent, length, ids, sample_ratio=0.2).kept)
    ) == top(-length.astype(float))
    r1 = triage("random", ppl, ent, length, ids, sample_ratio=0.2, seed=1)
    r2 = triage("random", ppl, ent, length, ids, sample_ratio=0.2, seed=2)
    assert r1.kept.sum() == 10 and not np.array_equal(r1.kept, r2.kept)
    assert np.array_equal(
        r1.kept, triage("random", ppl, ent, length, ids, sample_ratio=0.2, seed=1).kept
    )
    # Random selection follows sample ids, not row order.
    order = rng.permutation(n)
    shuffled = triage(
        "random", ppl[order], ent[order], length[order], ids.take(order), sample_ratio=0.2, seed=1
    )
    assert np.array_equal(shuffled.kept, r1.kept[order])
    assert set(POLICIES) == {"qtuning", "random", "ppl", "entropy", "longest", "shortest"}
    with pytest.raises(ValueError, match="unknown policy 'best'"):
        triage("best", ppl, ent, length, ids, sample_ratio=0.2)


def test_stable_hash64_is_fnv1a():
    hashes = stable_hash64(pa.array(["", "a", "foobar"]))
    assert hashes.tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]
    sliced = stable_hash64(pa.chunked_array([pa.array(["x", "a"]).slice(1)]))
    assert sliced.tolist() == [0xAF63DC4C8601EC8C]


@pytest.mark.parametrize("scope", ["global", "batch"])
def test_decisions_do_not_depend_on_row_order(scope):
    rng = np.random.default_rng(11)
    n = 101
    ppl, ent = np.round(rng.gamma(2, 1, n), 1), np.round(rng.gamma(2, 1, n), 1)  # with ties
    ids = _ids(n)
    order = rng.permutation(n)
    a = triage("qtuning", ppl, ent, np.ones(n), ids, sample_ratio=0.3, scope=scope)
    b = triage(
        "qtuning",
        ppl[order],
        ent[order],
        np.ones(n),
        ids.take(order),
        sample_ratio=0.3,
        scope=scope,
    )
    for field in ("kept", "filled", "token_pruned", "quadrant"):
        assert np.array_equal(getattr(b, field), getattr(a, field)[order]), field
