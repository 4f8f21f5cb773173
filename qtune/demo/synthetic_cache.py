"""A synthetic scored cache (no model needed): for triage tests and the triage benchmark.

Writes ``<out>/scores/epoch_NNN/part-*.parquet`` in SCORED_CACHE_SCHEMA plus ``_summary.json``,
exactly as the scoring job would, with random but plausible per-token values: each sample draws
a difficulty and an uncertainty, and its tokens' NLL and entropy scatter around them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qtune import schema
from qtune.pipeline.layout import SCORE_SUMMARY, OutputLayout
from qtune.stages.eu_plane import sample_error_uncertainty

TASKS = ("arithmetic", "spelling", "trivia")  # the ``task`` field of each synthetic row


def synthetic_scored_batch(
    start: int, n: int, response_tokens: int, prompt_tokens: int, rng: np.random.Generator
) -> pa.Table:
    resp = np.maximum(1, rng.poisson(response_tokens, n))
    prompt = np.maximum(1, rng.poisson(prompt_tokens, n))
    lengths = prompt + resp
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    row_of = np.repeat(np.arange(n), lengths)
    position = np.arange(total) - offsets[:-1][row_of]
    loss_mask = (position >= prompt[row_of]).astype(np.int8)
    difficulty = rng.gamma(2.0, 0.5, n)
    uncertainty = np.clip(0.6 * difficulty + rng.gamma(1.5, 0.4, n), 0, None)
    nll = rng.exponential(difficulty[row_of]).astype(np.float32)
    entropy = np.abs(rng.normal(uncertainty[row_of], 0.3)).astype(np.float32)
    nll[position == 0] = 0
    entropy[position == 0] = 0
    logprob = -nll
    s_nll, s_ppl, s_ent = sample_error_uncertainty(offsets, loss_mask, logprob, entropy)
    ids = rng.integers(5, 32000, total).astype(np.int32)
    arrow_offsets = pa.array(offsets.astype(np.int32))
    return pa.table(
        {
            schema.SAMPLE_ID: pa.array([f"syn-{i:09d}" for i in range(start, start + n)]),
            schema.SOURCE: pa.array(["synthetic.jsonl"] * n),
            schema.ROW_INDEX: pa.array(np.arange(start, start + n)),
            schema.FORMAT: pa.array(["messages"] * n),
            schema.METADATA: pa.array(
                [json.dumps({"task": TASKS[i % len(TASKS)]}) for i in range(start, start + n)]
            ),
            schema.INPUT_IDS: pa.ListArray.from_arrays(arrow_offsets, pa.array(ids)),
            schema.LOSS_MASK: pa.ListArray.from_arrays(arrow_offsets, pa.array(loss_mask)),
            schema.N_TOKENS: pa.array(lengths.astype(np.int32)),
            schema.N_RESPONSE_TOKENS: pa.array(resp.astype(np.int32)),
            schema.TRUNCATED: pa.array(np.zeros(n, dtype=bool)),
            schema.TOKEN_LOGPROB: pa.ListArray.from_arrays(arrow_offsets, pa.array(logprob)),
            schema.TOKEN_ENTROPY: pa.ListArray.from_arrays(arrow_offsets, pa.array(entropy)),
            schema.NLL: pa.array(s_nll),
            schema.PPL: pa.array(s_ppl),
            schema.ENTROPY: pa.array(s_ent),
        },
        schema=schema.SCORED_CACHE_SCHEMA,
    )


def write_synthetic_cache(
    out_dir: Path,
    n_samples: int,
    *,
    response_tokens: int = 200,
    prompt_tokens: int = 40,
    rows_per_file: int = 4096,
    rejected: int = 0,
    epoch: int = 0,
    seed: int = 0,
) -> Path:
    """Write a scored cache of ``n_samples`` (and ``rejected`` reject rows); return scores dir."""
    layout = OutputLayout(Path(out_dir))
    scores, rejects = layout.scores_dir(epoch), layout.rejects_dir(epoch)
    scores.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens = response = 0
    for part, start in enumerate(range(0, n_samples, rows_per_file)):
        batch = synthetic_scored_batch(
            start, min(rows_per_file, n_samples - start), response_tokens, prompt_tokens, rng
        )
        tokens += int(np.sum(batch.column(schema.N_TOKENS).to_numpy()))
        response += int(np.sum(batch.column(schema.N_RESPONSE_TOKENS).to_numpy()))
        pq.write_table(batch, scores / f"part-{part:06d}.parquet", compression="zstd")
    if rejected:
        rejects.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table(
                {
                    schema.SAMPLE_ID: [f"bad-{i}" for i in range(rejected)],
                    schema.SOURCE: ["synthetic.jsonl"] * rejected,
                    schema.ROW_INDEX: list(range(n_samples, n_samples + rejected)),
                    schema.REASON: ["invalid_json"] * rejected,
                    schema.DETAIL: ["synthetic"] * rejected,
                    schema.RAW: ["{"] * rejected,
                },
                schema=schema.REJECTS_SCHEMA,
            ),
            rejects / "part-0.parquet",
        )
    summary = {
        "rows": n_samples + rejected,
        "scored": n_samples,
        "rejected": rejected,
        "tokens": tokens,
        "response_tokens": response,
        "backend": "synthetic",
        "model_fingerprint": "synthetic",
    }
    (scores / SCORE_SUMMARY).write_text(json.dumps(summary))
    return scores
