"""Token pruning on hand-made sequences: scores, boundaries, budgets, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from qtune.stages.eu_plane import keep_count
from qtune.stages.token_prune import (
    end_of_turn_positions,
    neighbour_scores,
    prune_loss_mask,
    pruned_after_guards,
)


def _logprob(ppl: list[float]) -> np.ndarray:
    return -np.log(np.asarray(ppl, dtype=np.float64)).astype(np.float32)


def test_scores_sum_neighbours_and_use_self_outside_the_span():
    offsets = np.array([0, 6])
    mask = np.array([0, 0, 1, 1, 1, 1], np.int8)
    ppl = [1, 1, 2, 10, 3, 4]
    s = neighbour_scores(offsets, mask, _logprob(ppl), lam=0.5)
    # i=2: left is a prompt token -> itself; i=5: right is past the end -> itself.
    np.testing.assert_allclose(
        s[2:],
        [
            0.5 * 2 + 0.5 * (2 + 10),
            0.5 * 10 + 0.5 * (2 + 3),
            0.5 * 3 + 0.5 * (10 + 4),
            0.5 * 4 + 0.5 * (3 + 4),
        ],
        rtol=1e-6,
    )
    new = prune_loss_mask(offsets, mask, _logprob(ppl), np.array([True]), token_ratio=0.5)
    assert new.tolist() == [0, 0, 1, 0, 0, 1]  # lowest s: positions 5 (5.5) and 2 (7)


def test_multi_turn_spans_do_not_borrow_across_turns_or_samples():
    # Two samples; the first has two assistant turns separated by a prompt token.
    offsets = np.array([0, 5, 8])
    mask = np.array([0, 1, 0, 1, 1, 0, 1, 1], np.int8)
    ppl = [9, 2, 50, 3, 5, 7, 4, 6]
    s = neighbour_scores(offsets, mask, _logprob(ppl), lam=1.0)
    assert s[1] == pytest.approx(2 + 2)  # both neighbours outside the span: itself twice
    assert s[3] == pytest.approx(3 + 5)  # left is the prompt token (50): not used
    assert s[4] == pytest.approx(3 + 5)  # right is the next sample: itself
    assert s[6] == pytest.approx(4 + 6)  # left is a prompt token
    assert s[7] == pytest.approx(4 + 6)


def test_budget_single_token_and_untouched_rows():
    offsets = np.array([0, 3, 7, 10])
    mask = np.array([0, 0, 1, 0, 1, 1, 1, 0, 1, 1], np.int8)
    lp = _logprob([1, 1, 5, 1, 2, 9, 3, 1, 4, 8])
    new = prune_loss_mask(offsets, mask, lp, np.array([True, True, False]), token_ratio=0.34)
    assert new[:3].tolist() == [0, 0, 1]  # a single-token response keeps its token
    assert new[3:7].sum() == 1  # floor(0.34 * 3) = 1
    assert new[7:].tolist() == mask[7:].tolist()  # not a pruned row
    full = prune_loss_mask(offsets, mask, lp, np.ones(3, bool), token_ratio=1.0)
    assert full.tolist() == mask.tolist()
    assert prune_loss_mask(offsets, mask, lp, np.ones(3, bool), 0.1, policy="none").tolist() == (
        mask.tolist()
    )


def test_random_token_policy_is_seeded_by_sample_and_exact():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 40, 30)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    mask = (rng.uniform(size=offsets[-1]) < 0.7).astype(np.int8)
    lp = -rng.exponential(size=offsets[-1]).astype(np.float32)
    keys = np.arange(30, dtype=np.uint64) * np.uint64(7919)
    pruned = np.ones(30, bool)
    a = prune_loss_mask(offsets, mask, lp, pruned, 0.5, policy="random", row_keys=keys)
    b = prune_loss_mask(offsets, mask, lp, pruned, 0.5, policy="random", row_keys=keys)
    assert np.array_equal(a, b)
    for r in range(30):
        sl = slice(offsets[r], offsets[r + 1])
        n = int(mask[sl].sum())
        if n:
            assert a[sl].sum() == keep_count(0.5, n)
            assert not (a[sl] & ~mask[sl].astype(bool)).any()  # never adds a label


def test_keep_count_absorbs_decimal_float_error():
    assert keep_count(0.29, 100) == 29 and keep_count(0.5, 7) == 3 and keep_count(0.01, 5) == 1


def test_end_of_turn_is_the_last_label_of_each_turn_unless_truncation_cut_it():
    offsets = np.array([0, 6, 12, 18])
    mask = np.array(
        [0, 1, 1, 0, 1, 1]  # two turns; the second ends the row
        + [0, 0, 1, 1, 1, 1]  # truncated inside its only turn: no end-of-turn token left
        + [0, 1, 0, 1, 1, 1],  # truncated inside its second turn; the first is whole
        np.int8,
    )
    truncated = np.array([False, True, True])
    eot = end_of_turn_positions(offsets, mask, truncated)
    assert np.flatnonzero(eot).tolist() == [2, 5, 13]


def test_end_of_turn_tokens_are_never_pruned_and_not_in_the_budget():
    # Answer of two tokens, then the end-of-turn token, which the model predicts best: the
    # unguarded method keeps floor(0.5 * 3) = 1 token, the end-of-turn one, and masks the answer.
    offsets = np.array([0, 5])
    mask = np.array([0, 0, 1, 1, 1], np.int8)
    lp = _logprob([1, 1, 30, 20, 1.01])
    pruned = np.array([True])
    unguarded = prune_loss_mask(offsets, mask, lp, pruned, token_ratio=0.5)
    assert unguarded.tolist() == [0, 0, 0, 0, 1]  # the failure the guard exists for
    eot = end_of_turn_positions(offsets, mask, np.array([False]))
    guarded = prune_loss_mask(offsets, mask, lp, pruned, token_ratio=0.5, end_of_turn=eot)
    assert guarded.tolist() == [0, 0, 0, 1, 1]  # floor(0.5 * 2) = 1 answer token + end of turn
    # The most surprising end-of-turn token still keeps its label.
    lp_high = _logprob([1, 1, 2, 3, 400])
    assert prune_loss_mask(offsets, mask, lp_high, pruned, 0.5, end_of_turn=eot)[4] == 1


def test_every_end_of_turn_token_survives_pruning_at_any_ratio():
    rng = np.random.default_rng(3)
    lengths = rng.integers(3, 60, 200)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    mask = (rng.uniform(size=offsets[-1]) < 0.6).astype(np.int8)
    truncated = rng.uniform(size=200) < 0.2
    lp = -rng.exponential(2.0, size=offsets[-1]).astype(np.float32)
    eot = end_of_turn_positions(offsets, mask, truncated)
    for ratio in (0.01, 0.3, 0.5, 0.9):
        for policy in ("qtuning", "random"):
            new = prune_loss_mask(
                offsets, mask, lp, np.ones(200, bool), ratio, policy=policy, end_of_turn=eot
            ).astype(bool)
            assert new[eot].all()
            assert not (new & ~mask.astype(bool)).any()
            for r in range(200):
                sl = slice(offsets[r], offsets[r + 1])
                prunable = int((mask[sl].astype(bool) & ~eot[sl]).sum())
                if prunable:
                    assert new[sl].sum() == keep_count(ratio, prunable) + eot[sl].sum()


def test_short_responses_keep_every_token():
    offsets = np.array([0, 4, 24, 28])
    mask = np.array([0, 1, 1, 1] + [0] * 4 + [1] * 16 + [0, 0, 0, 1], np.int8)
    eot = end_of_turn_positions(offsets, mask, np.zeros(3, bool))
    pruned = np.array([True, True, False])
    # Row 0: 2 prunable tokens; row 1: 15; row 2 is not a pruned row at all.
    assert pruned_after_guards(offsets, mask, eot, pruned, 16).tolist() == [False, False, False]
    assert pruned_after_guards(offsets, mask, eot, pruned, 15).tolist() == [False, True, False]
    assert pruned_after_guards(offsets, mask, eot, pruned, 0).tolist() == [True, True, False]
    # A response of only its end-of-turn token has nothing to prune.
    only_eot = np.array([0, 0, 0, 1], np.int8)
    assert not pruned_after_guards(np.array([0, 4]), only_eot, only_eot.astype(bool), [True], 0)[0]
