"""Sample statistics on the Error-Uncertainty plane (DESIGN section 2).

Per sample over its response positions T(x): NLL = mean of l_i = -log p(y_i) (each l_i clamped
to at most 50, float64), PPL = exp(NLL), Ent = mean token entropy. Vectorised over a whole batch
of flattened per-token arrays; no per-token Python.
"""

from __future__ import annotations

import numpy as np

MAX_TOKEN_NLL = 50.0
# floor(r * n) for ratios given in decimal (0.29 * 100 = 28.999...): absorb the float error.
_FLOOR_EPS = 1e-9


def keep_count(ratio: float, n: np.ndarray | int) -> np.ndarray:
    """max(1, floor(ratio * n)): the K of sample triage and the token budget of pruning."""
    return np.maximum(1, np.floor(ratio * np.asarray(n) + _FLOOR_EPS).astype(np.int64))


def sample_error_uncertainty(
    offsets: np.ndarray, loss_mask: np.ndarray, token_logprob: np.ndarray, token_entropy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened per-token arrays with row ``offsets`` -> per-row (nll, ppl, entropy), float64.

    Rows without response positions get NaN.
    """
    n_rows = len(offsets) - 1
    row_of_token = np.repeat(np.arange(n_rows), np.diff(offsets))
    mask = loss_mask.astype(bool)
    rows = row_of_token[mask]
    nll_tokens = np.minimum(-token_logprob[mask].astype(np.float64), MAX_TOKEN_NLL)
    counts = np.bincount(rows, minlength=n_rows).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        nll = np.bincount(rows, weights=nll_tokens, minlength=n_rows) / counts
        entropy = (
            np.bincount(rows, weights=token_entropy[mask].astype(np.float64), minlength=n_rows)
            / counts
        )
    return nll, np.exp(nll), entropy
