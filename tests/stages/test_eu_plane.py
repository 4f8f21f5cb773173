"""Sample statistics: response positions only, NLL clamped at 50, float64."""

from __future__ import annotations

import numpy as np

from qtune.stages.eu_plane import sample_error_uncertainty


def test_matches_per_sample_definition():
    rng = np.random.default_rng(0)
    lengths = [5, 1, 9, 3]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    logprob = -rng.exponential(2.0, offsets[-1]).astype(np.float32)
    entropy = rng.uniform(0, 5, offsets[-1]).astype(np.float32)
    mask = (rng.uniform(size=offsets[-1]) < 0.6).astype(np.int8)
    mask[offsets[1]] = 0  # the 1-token row has no response position
    logprob[offsets[2] + 4] = -80.0  # clamped to 50 before averaging
    mask[offsets[2] + 4] = 1
    nll, ppl, ent = sample_error_uncertainty(offsets, mask, logprob, entropy)
    for row in range(len(lengths)):
        sl = slice(offsets[row], offsets[row + 1])
        m = mask[sl].astype(bool)
        if not m.any():
            assert np.isnan(nll[row]) and np.isnan(ent[row])
            continue
        expected = np.minimum(-logprob[sl][m].astype(np.float64), 50).mean()
        assert np.isclose(nll[row], expected)
        assert np.isclose(ppl[row], np.exp(expected))
        assert np.isclose(ent[row], entropy[sl][m].astype(np.float64).mean())
