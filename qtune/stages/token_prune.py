"""Token pruning: a new loss mask for token-pruned samples (DESIGN section 2).

Input: flattened per-token arrays of a batch of scored samples (row ``offsets``, ``loss_mask``,
``token_logprob``), which rows are token-pruned, each row's tie-break key and (guard) which
positions are end-of-turn tokens. Output: the new loss mask (flat int8, same length). Rows that
are not pruned keep their mask unchanged.

For a response position i: PPL_i = exp(min(l_i, 50)) and
    s_i = (1 - lam) * PPL_i + lam * (PPL_{i-1} + PPL_{i+1})
(neighbours summed, not averaged, as in the paper); a neighbour outside the response span —
a prompt token, the other side of a turn boundary, or past either end — counts as PPL_i itself.
The floor(r_t * |T(x)|) positions (at least 1) with the LOWEST s_i keep their label; ties go to
the earlier position (our choice). Pruning only ever masks labels: input_ids stay whole.

Guards (our departures from the paper, DESIGN section 2): end-of-turn tokens are not candidates —
they keep their label and are left out of |T(x)| — and a response with fewer than
``min_prunable_tokens`` candidates is not pruned at all (:func:`pruned_after_guards`).
"""

from __future__ import annotations

import numpy as np

from qtune.stages.eu_plane import MAX_TOKEN_NLL, keep_count
from qtune.stages.triage import splitmix64


def neighbour_scores(
    offsets: np.ndarray, loss_mask: np.ndarray, token_logprob: np.ndarray, lam: float
) -> np.ndarray:
    """s_i for every flat position (meaningful on response positions)."""
    ppl = np.exp(np.minimum(-token_logprob.astype(np.float64), MAX_TOKEN_NLL))
    response = loss_mask.astype(bool)
    n = len(ppl)
    starts = np.zeros(n, dtype=bool)
    starts[offsets[:-1][offsets[:-1] < n]] = True
    ends = np.zeros(n, dtype=bool)
    ends[offsets[1:][offsets[1:] > 0] - 1] = True
    left = np.empty_like(ppl)
    left[0] = ppl[0] if n else 0.0
    left[1:] = ppl[:-1]
    left_inside = np.zeros(n, dtype=bool)
    left_inside[1:] = response[:-1]
    left = np.where(left_inside & ~starts, left, ppl)
    right = np.empty_like(ppl)
    right[-1:] = ppl[-1:]
    right[:-1] = ppl[1:]
    right_inside = np.zeros(n, dtype=bool)
    right_inside[:-1] = response[1:]
    right = np.where(right_inside & ~ends, right, ppl)
    return (1.0 - lam) * ppl + lam * (left + right)


def end_of_turn_positions(
    offsets: np.ndarray, loss_mask: np.ndarray, truncated: np.ndarray
) -> np.ndarray:
    """Flat bool: the end-of-turn token of every assistant turn.

    A turn's loss span runs through its end-of-turn token (DESIGN section 2), so that token is
    the last position of each run of ``loss_mask``. The exception is a truncated row whose last
    run reaches the row's end: the cut fell inside that turn, before its end-of-turn token.
    """
    n = len(loss_mask)
    mask = loss_mask.astype(bool)
    lengths = np.diff(offsets)
    row_end = np.zeros(n, dtype=bool)
    row_end[offsets[1:][lengths > 0] - 1] = True
    next_in_span = np.zeros(n, dtype=bool)
    next_in_span[:-1] = mask[1:]
    run_end = mask & (~next_in_span | row_end)
    cut = np.repeat(np.asarray(truncated, dtype=bool), lengths) & row_end
    return run_end & ~cut


def pruned_after_guards(
    offsets: np.ndarray,
    loss_mask: np.ndarray,
    end_of_turn: np.ndarray,
    pruned_rows: np.ndarray,
    min_prunable_tokens: int,
) -> np.ndarray:
    """Which of ``pruned_rows`` stay token-pruned: those whose response has at least
    ``min_prunable_tokens`` pruning candidates (response tokens other than end-of-turn tokens).
    Shorter responses keep every token: on a 1-3 token answer the budget would keep the
    end-of-turn token or a single answer token and mask the rest."""
    lengths = np.diff(offsets)
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    candidates = loss_mask.astype(bool) & ~end_of_turn
    n_candidates = np.bincount(row_of[candidates], minlength=len(lengths))
    return np.asarray(pruned_rows, dtype=bool) & (n_candidates >= max(1, min_prunable_tokens))


def _position_noise(row_keys: np.ndarray, row_of: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Deterministic noise per (sample, position); independent of batching and row order."""
    mixed = row_keys[row_of] ^ (position.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return splitmix64(mixed).astype(np.float64)


def prune_loss_mask(
    offsets: np.ndarray,
    loss_mask: np.ndarray,
    token_logprob: np.ndarray,
    pruned_rows: np.ndarray,
    token_ratio: float,
    lam: float = 0.5,
    policy: str = "qtuning",
    row_keys: np.ndarray | None = None,
    end_of_turn: np.ndarray | None = None,
) -> np.ndarray:
    """New flat loss mask: pruned rows keep their lowest-score response tokens only.

    Positions flagged in ``end_of_turn`` (guard ``keep_end_of_turn``) are never candidates: they
    keep their label and do not count towards the budget floor(r_t * candidates).
    """
    mask = loss_mask.astype(bool).copy()
    if policy == "none" or not pruned_rows.any():
        return mask.astype(np.int8)
    lengths = np.diff(offsets)
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(len(mask)) - np.repeat(offsets[:-1], lengths)
    if policy == "qtuning":
        score = neighbour_scores(offsets, loss_mask, token_logprob, lam)
    elif policy == "random":
        keys = row_keys if row_keys is not None else np.arange(len(lengths), dtype=np.uint64)
        score = _position_noise(keys.astype(np.uint64), row_of, position)
    else:
        raise ValueError(f"unknown token policy {policy!r}; valid: qtuning, random, none")
    eligible = mask & pruned_rows[row_of]
    if end_of_turn is not None:
        eligible &= ~end_of_turn
    candidates = np.flatnonzero(eligible)
    cand_rows = row_of[candidates]
    order = np.lexsort((position[candidates], score[candidates], cand_rows))
    sorted_rows = cand_rows[order]
    n_response = np.bincount(cand_rows, minlength=len(lengths))
    first = np.concatenate([[0], np.cumsum(n_response)[:-1]])
    rank = np.arange(len(order)) - first[sorted_rows]
    keep = rank < keep_count(token_ratio, n_response)[sorted_rows]
    mask[candidates] = False
    mask[candidates[order[keep]]] = True
    return mask.astype(np.int8)
