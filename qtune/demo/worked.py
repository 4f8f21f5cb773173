"""Long worked solutions for the demo: the paper's regime beside the short-answer tasks.

Q-Tuning was measured on long chain-of-thought responses, where masking the most surprising half of
the tokens leaves the reasoning in place. The demo's other tasks have answers of a few tokens. This
task gives responses of a few hundred tokens whose last line is the answer: add a list of 12 to 24
single-digit numbers step by step, one running total per line, then ``Answer: <total>``.

Two kinds of planted noise (each in ``noise_rate`` of the samples, never both in one):

- ``wrong_answer``: every step is right, the final answer is not (off by 1 to 9);
- ``corrupted_step``: one step's result is wrong (off by 1 to 9) and the next step goes on from
  the correct total, so the final answer is right: noise confined to a few tokens, the case token
  pruning is meant for.

Deterministic: everything is drawn from one ``random.Random`` per call, seeded by a string that
keeps this stream apart from the short tasks' streams.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

WORKED_FILE = "worked.jsonl"
TASK = "worked"
WRONG_ANSWER, CORRUPTED_STEP = "wrong_answer", "corrupted_step"
NOISE_KINDS = (WRONG_ANSWER, CORRUPTED_STEP)
DEFAULT_NOISE_RATE = 0.08  # of each kind
_MIN_TERMS, _MAX_TERMS = 12, 24
_ANSWER = re.compile(r"Answer: (-?\d+)\s*$")


def _offset(rng: random.Random) -> int:
    return rng.choice([d for d in range(-9, 10) if d])


def _solution(numbers: list[int], corrupt_step: int | None, wrong_by: int, answer_by: int) -> str:
    lines = [f"Start with {numbers[0]}."]
    total = numbers[0]
    for step, x in enumerate(numbers[1:], start=1):
        shown = total + x + (wrong_by if step == corrupt_step else 0)
        lines.append(f"Step {step}: {total} + {x} = {shown}.")
        total += x
    lines.append(f"Answer: {total + answer_by}")
    return "\n".join(lines)


def _sample(rng: random.Random, sample_id: str, noise: str | None) -> dict:
    numbers = [rng.randint(1, 9) for _ in range(rng.randint(_MIN_TERMS, _MAX_TERMS))]
    question = f"Add these numbers step by step: {', '.join(str(x) for x in numbers)}."
    corrupt_step = rng.randrange(1, len(numbers)) if noise == CORRUPTED_STEP else None
    wrong_by = _offset(rng) if noise == CORRUPTED_STEP else 0
    answer_by = _offset(rng) if noise == WRONG_ANSWER else 0
    return {
        "id": sample_id,
        "task": TASK,
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": _solution(numbers, corrupt_step, wrong_by, answer_by)},
        ],
        "noise": noise,
        "answer": str(sum(numbers)),
    }


def generate_worked(
    n: int, seed: int = 0, *, noise_rate: float = DEFAULT_NOISE_RATE, id_prefix: str = "worked"
) -> list[dict]:
    """``n`` samples ``{"id", "task": "worked", "messages", "noise", "answer"}``.

    ``noise`` is None, ``"wrong_answer"`` or ``"corrupted_step"``; exactly
    ``round(n * noise_rate)`` samples carry each kind. ``answer`` is the correct total (the
    reference for exact-match accuracy). Ids are ``"<id_prefix><seed>-<index:06d>"``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    if not 0.0 <= noise_rate < 0.5:
        raise ValueError(f"noise_rate must be in [0, 0.5); got {noise_rate!r}")
    rng = random.Random(f"qtune-demo-worked:{id_prefix}:{seed}")
    per_kind = round(n * noise_rate)
    planted = rng.sample(range(n), 2 * per_kind) if per_kind else []
    noise = dict.fromkeys(planted[:per_kind], WRONG_ANSWER) | dict.fromkeys(
        planted[per_kind:], CORRUPTED_STEP
    )
    return [_sample(rng, f"{id_prefix}{seed}-{i:06d}", noise.get(i)) for i in range(n)]


def worked_conversations(n: int, seed: int = 1) -> list[list[dict]]:
    """``n`` clean worked conversations (``messages`` lists), a stream apart from the corpus."""
    return [s["messages"] for s in generate_worked(n, seed, noise_rate=0.0, id_prefix="train")]


def final_answer(text: str) -> str | None:
    """The number on a solution's ``Answer:`` line (its last line), or None."""
    match = _ANSWER.search(text)
    return match[1] if match else None


def write_worked(out_dir: Path, n: int, seed: int = 0) -> Path:
    """Write ``generate_worked(n, seed)`` as chat JSONL (``id``, ``task``, ``messages``); the
    planted noise is not in the file (the demo joins it back by id)."""
    path = Path(out_dir) / WORKED_FILE
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for sample in generate_worked(n, seed):
            row = {"id": sample["id"], "task": TASK, "messages": sample["messages"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
