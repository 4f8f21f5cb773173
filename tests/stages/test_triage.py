"""Triage against a brute-force reference on random and adversarial inputs; baselines; group
scope and coverage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from qtune.stages.triage import POLICIES, coverage, quadrant_labels, stable_hash64, triage


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


# --- group scope ----------------------------------------------------------------------------------


def _mixed_corpus(n_hard: int = 400, n_easy: int = 200, seed: int = 21):
    """A spread-out "hard" task and a uniformly easy one (low PPL and low entropy: Q3 globally)."""
    rng = np.random.default_rng(seed)
    ppl = np.concatenate(
        [np.exp(rng.normal(1.5, 0.6, n_hard)), np.exp(rng.normal(-1, 0.1, n_easy))]
    )
    ent = np.concatenate([rng.gamma(2, 1, n_hard) + 1.0, rng.uniform(0.05, 0.15, n_easy)])
    groups = np.array(["hard"] * n_hard + ["easy"] * n_easy)
    return ppl, ent, groups, _ids(n_hard + n_easy)


def test_group_scope_keeps_an_easy_group_that_global_scope_starves():
    ppl, ent, groups, ids = _mixed_corpus()
    n = len(ppl)
    easy = groups == "easy"
    glob = triage("qtuning", ppl, ent, np.ones(n), ids, sample_ratio=0.25)
    proportional = glob.kept.sum() * easy.mean()
    assert glob.kept[easy].sum() < 0.1 * proportional
    grouped = triage(
        "qtuning", ppl, ent, np.ones(n), ids, sample_ratio=0.25, scope="group", groups=groups
    )
    t = grouped.thresholds
    assert t["scope"] == "group" and t["policy"] == "qtuning" and t["small_groups"] == []
    for name, size in (("hard", 400), ("easy", 200)):
        members = np.flatnonzero(groups == name)
        assert grouped.kept[members].sum() == int(np.floor(0.25 * size))
        assert {k: t["groups"][name][k] for k in ("n", "k", "ratio", "small")} == {
            "n": size,
            "k": int(np.floor(0.25 * size)),
            "ratio": 0.25,
            "small": False,
        }
        # Within a group: exactly Q-Tuning on that group alone (same a, same decisions, labels).
        alone = triage(
            "qtuning",
            ppl[members],
            ent[members],
            np.ones(size),
            ids.take(members),
            sample_ratio=0.25,
        )
        for field in ("kept", "filled", "token_pruned", "quadrant"):
            assert np.array_equal(getattr(grouped, field)[members], getattr(alone, field)), field
        for key in ("a", "ppl_low", "ppl_high", "entropy_low", "entropy_high", "ppl_median"):
            assert t["groups"][name][key] == alone.thresholds[key], key
    json.dumps(t, allow_nan=False)


def test_one_group_is_global_triage_with_global_thresholds():
    """`scope: group` by file on a one-file corpus triages exactly as `global` and records
    plottable thresholds."""
    ppl, ent, _, ids = _mixed_corpus()
    n = len(ppl)
    glob = triage("qtuning", ppl, ent, np.ones(n), ids, sample_ratio=0.25)
    one = triage(
        "qtuning", ppl, ent, np.ones(n), ids, sample_ratio=0.25, scope="group",
        groups=np.array(["corpus.jsonl"] * n, dtype=object),
    )  # fmt: skip
    for field in ("kept", "filled", "token_pruned", "quadrant"):
        assert np.array_equal(getattr(one, field), getattr(glob, field)), field
    assert one.thresholds["scope"] == "group" and one.thresholds["single_group"] == "corpus.jsonl"
    for key in ("a", "ppl_high", "entropy_low"):
        assert one.thresholds[key] == glob.thresholds[key]


def test_group_scope_without_group_by_groups_by_file():
    from qtune.pipeline.config import load_config

    overrides = ["input.path=x", "model.path=y", "output.dir=z", "qtuning.scope=group"]
    q = load_config(None, overrides).qtuning
    assert q.scope == "group" and q.group_by is None  # sample_groups: unset groups by file


def test_group_ratios_override_sample_ratio():
    rng = np.random.default_rng(22)
    n = 120
    ppl, ent = np.exp(rng.normal(size=n)), rng.gamma(2, 1, n)
    groups = np.array(["a"] * 40 + ["b"] * 80)
    d = triage(
        "qtuning",
        ppl,
        ent,
        np.ones(n),
        _ids(n),
        sample_ratio=0.25,
        scope="group",
        groups=groups,
        group_ratios={"a": 0.5},
    )
    assert d.kept[groups == "a"].sum() == 20 and d.kept[groups == "b"].sum() == 20
    assert d.thresholds["groups"]["a"]["ratio"] == 0.5
    assert d.thresholds["groups"]["b"]["ratio"] == 0.25
    with pytest.raises(ValueError, match=r"group_ratios\['a'\] = 1.5"):
        triage(
            "qtuning",
            ppl,
            ent,
            np.ones(n),
            _ids(n),
            sample_ratio=0.25,
            scope="group",
            groups=groups,
            group_ratios={"a": 1.5},
        )


def test_small_group_keeps_floor_by_support_score():
    rng = np.random.default_rng(23)
    ppl = np.concatenate([np.exp(rng.normal(size=50)), [1.0, 2.0, 4.0, 8.0, 16.0], [3.0, 1.0, 2.0]])
    ent = np.concatenate([rng.gamma(2, 1, 50), [0.5, 3.0, 1.0, 1.0, 0.2], [1.0, 2.0, 1.5]])
    groups = np.array(["big"] * 50 + ["tiny"] * 5 + ["tinier"] * 3)
    n, ids = len(ppl), _ids(len(ppl))
    options = dict(sample_ratio=0.5, scope="group", groups=groups)
    d = triage("qtuning", ppl, ent, np.ones(n), ids, **options, group_ratios={"tinier": 0.25})
    tiny = np.flatnonzero(groups == "tiny")
    # floor(0.5 * 5) = 2 by the support |P - E| (min-max within the group), ties by hash.
    p = (ppl[tiny] - ppl[tiny].min()) / np.ptp(ppl[tiny])
    e = (ent[tiny] - ent[tiny].min()) / np.ptp(ent[tiny])
    keys = stable_hash64(ids)[tiny]
    best = sorted(range(5), key=lambda i: (-abs(p[i] - e[i]), keys[i]))[:2]
    assert set(np.flatnonzero(d.kept[tiny])) == set(best)
    assert np.array_equal(d.filled[tiny], d.kept[tiny])
    assert np.array_equal(d.token_pruned[tiny], d.kept[tiny] & (p >= e))
    assert np.array_equal(d.quadrant[tiny], quadrant_labels(ppl[tiny][None], ent[tiny][None])[0])
    # floor(0.25 * 3) = 0: a tiny group may keep nothing (no max(1, ...) below min_group_size).
    assert d.kept[groups == "tinier"].sum() == 0
    assert d.kept[groups == "big"].sum() == 25
    t = d.thresholds
    assert t["groups"]["tiny"] == {"n": 5, "k": 2, "ratio": 0.5, "small": True}
    assert t["groups"]["tinier"] == {"n": 3, "k": 0, "ratio": 0.25, "small": True}
    assert not t["groups"]["big"]["small"] and "a" in t["groups"]["big"]
    assert sorted(t["small_groups"]) == ["tinier", "tiny"]
    json.dumps(t, allow_nan=False)
    # With a lower min_group_size the tiny group is triaged by Q-Tuning, K = max(1, floor(...)).
    d = triage("qtuning", ppl, ent, np.ones(n), ids, **options, min_group_size=3)
    assert d.thresholds["small_groups"] == [] and d.kept[groups == "tinier"].sum() == 1


def test_group_scope_does_not_depend_on_row_order():
    rng = np.random.default_rng(24)
    n = 157
    ppl, ent = np.round(rng.gamma(2, 1, n), 1), np.round(rng.gamma(2, 1, n), 1)  # with ties
    groups = rng.choice([0, 1, 2, 3], n, p=[0.6, 0.3, 0.07, 0.03])  # integer labels, one tiny
    ids = _ids(n)
    order = rng.permutation(n)
    options = dict(sample_ratio=0.3, scope="group", group_ratios={"1": 0.5}, min_group_size=8)
    a = triage("qtuning", ppl, ent, np.ones(n), ids, groups=groups, **options)
    b = triage(
        "qtuning",
        ppl[order],
        ent[order],
        np.ones(n),
        ids.take(order),
        groups=groups[order],
        **options,
    )
    for field in ("kept", "filled", "token_pruned", "quadrant"):
        assert np.array_equal(getattr(b, field), getattr(a, field)[order]), field
    assert a.thresholds == b.thresholds
    assert a.thresholds["groups"]["1"]["ratio"] == 0.5 and a.thresholds["small_groups"] == ["3"]


@pytest.mark.parametrize("policy", ["random", "ppl", "entropy", "longest", "shortest"])
def test_baselines_with_group_scope_keep_top_k_per_group(policy):
    rng = np.random.default_rng(25)
    n = 90
    ppl, ent = rng.gamma(2, 1, n), rng.gamma(2, 1, n)
    length = rng.integers(5, 500, n)
    groups = np.array(["x"] * 60 + ["y"] * 25 + ["z"] * 5)
    ids = _ids(n)
    d = triage(
        policy,
        ppl,
        ent,
        length,
        ids,
        sample_ratio=0.2,
        seed=3,
        scope="group",
        groups=groups,
        group_ratios={"y": 0.4},
    )
    score = {"ppl": ppl, "entropy": ent, "longest": length, "shortest": -length}.get(policy)
    for name, k in (("x", 12), ("y", 10), ("z", 1)):  # z is small: floor(0.2 * 5) = 1
        members = np.flatnonzero(groups == name)
        assert d.kept[members].sum() == k
        if score is not None:
            keys = stable_hash64(ids)[members]
            top = np.lexsort((keys, -score[members]))[:k]  # ties by the sample-id hash
            assert set(np.flatnonzero(d.kept[members])) == set(top)
        np.testing.assert_array_equal(
            d.quadrant[members], quadrant_labels(ppl[members][None], ent[members][None])[0]
        )
    assert np.array_equal(d.token_pruned, d.kept) and not d.filled.any()
    assert d.thresholds["policy"] == policy and d.thresholds["small_groups"] == ["z"]
    json.dumps(d.thresholds, allow_nan=False)


def test_coverage_flags_the_group_that_global_scope_starves():
    ppl, ent, groups, ids = _mixed_corpus()
    n = len(ppl)
    loss_tokens = np.full(n, 10)
    glob = triage("qtuning", ppl, ent, np.ones(n), ids, sample_ratio=0.25)
    report = coverage(groups, glob.kept, loss_tokens)
    assert report["under_covered"] == ["easy"]
    easy = report["groups"]["easy"]
    assert easy["under_covered"] and easy["input_samples"] == 200
    assert easy["input_share"] == pytest.approx(1 / 3)
    assert easy["kept_samples"] == glob.kept[groups == "easy"].sum()
    assert report["kept_samples"] == 150 and report["kept_loss_tokens"] == 1500
    assert report["groups"]["hard"]["kept_share"] == pytest.approx(
        glob.kept[groups == "hard"].sum() / 150
    )
    json.dumps(report, allow_nan=False)

    grouped = triage(
        "qtuning", ppl, ent, np.ones(n), ids, sample_ratio=0.25, scope="group", groups=groups
    )
    # Only kept samples' loss tokens count; pruning shows up in what the caller passes.
    pruned_tokens = np.where(grouped.token_pruned, 5, 10)
    report = coverage(pa.array(groups), grouped.kept, pruned_tokens)
    assert report["under_covered"] == []
    assert report["groups"]["easy"]["kept_samples"] == 50
    assert report["groups"]["easy"]["kept_share"] == pytest.approx(50 / 150)
    assert report["kept_loss_tokens"] == int(pruned_tokens[grouped.kept].sum())


def test_scope_errors():
    ppl, ent, groups, ids = _mixed_corpus(20, 10)
    n = len(ppl)
    for policy in ("qtuning", "random"):
        with pytest.raises(ValueError, match="unknown scope 'task'; valid: global, batch, group"):
            triage(policy, ppl, ent, np.ones(n), ids, sample_ratio=0.25, scope="task")
        with pytest.raises(ValueError, match="scope 'group' needs groups"):
            triage(policy, ppl, ent, np.ones(n), ids, sample_ratio=0.25, scope="group")
        with pytest.raises(ValueError, match="groups has 29 labels; expected one per sample"):
            triage(
                policy,
                ppl,
                ent,
                np.ones(n),
                ids,
                sample_ratio=0.25,
                scope="group",
                groups=groups[1:],
            )
    with pytest.raises(ValueError, match="groups has 1 missing labels"):
        coverage(np.array(["a", None, "b"], dtype=object), np.ones(3, bool), np.ones(3))
