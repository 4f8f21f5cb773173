"""Per-token target log-prob and full-vocabulary entropy from hidden states, in row chunks.

Shared by every backend so that all of them compute the same quantity the same way: logits are
materialised for at most ``chunk_rows`` positions at a time, in float32 whatever the model dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Bound on logits elements materialised at once (float32: 4 bytes each): 2**26 = 256 MiB.
LOGITS_CHUNK_ELEMENTS = 1 << 26


def chunk_rows_for(vocab_size: int) -> int:
    return max(16, LOGITS_CHUNK_ELEMENTS // max(vocab_size, 1))


def token_logprob_entropy(
    hidden: torch.Tensor,
    target_ids: torch.Tensor,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    chunk_rows: int,
) -> torch.Tensor:
    """``[n, 2]`` float32: log p(target_ids[j] | hidden[j]) and the entropy of that distribution.

    Entropy is in nats over the whole vocabulary: H = -sum_v p(v) log p(v).
    """
    out = torch.empty((hidden.shape[0], 2), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        stop = min(start + chunk_rows, hidden.shape[0])
        logits = compute_logits(hidden[start:stop]).float()
        logp = torch.log_softmax(logits, dim=-1)
        out[start:stop, 0] = logp.gather(1, target_ids[start:stop, None].long()).squeeze(1)
        out[start:stop, 1] = -(logp.exp() * logp).sum(dim=-1)
    return out
