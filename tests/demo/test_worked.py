"""The long worked-solution task: correct arithmetic, exactly the planted noise, deterministic."""

from __future__ import annotations

import json
import re

import pytest

from qtune.demo.worked import (
    CORRUPTED_STEP,
    WRONG_ANSWER,
    final_answer,
    generate_worked,
    worked_conversations,
    write_worked,
)

_STEP = re.compile(r"^Step (\d+): (\d+) \+ (\d) = (\d+)\.$")


def _wrong_steps(solution: str) -> list[int]:
    lines = solution.split("\n")
    assert lines[0].startswith("Start with ") and lines[-1].startswith("Answer: ")
    wrong = []
    for line in lines[1:-1]:
        step, total, x, shown = (int(g) for g in _STEP.match(line).groups())
        if total + x != shown:
            wrong.append(step)
    return wrong


def test_noise_is_exactly_what_was_planted():
    samples = generate_worked(500, seed=0, noise_rate=0.1)
    kinds = [s["noise"] for s in samples]
    assert kinds.count(WRONG_ANSWER) == kinds.count(CORRUPTED_STEP) == 50
    for s in samples:
        question, solution = (m["content"] for m in s["messages"])
        numbers = [int(x) for x in question.split(": ")[1].rstrip(".").split(", ")]
        assert 12 <= len(numbers) <= 24 and s["answer"] == str(sum(numbers))
        wrong = _wrong_steps(solution)
        answer_right = final_answer(solution) == s["answer"]
        if s["noise"] is None:
            assert not wrong and answer_right
        elif s["noise"] == WRONG_ANSWER:
            assert not wrong and not answer_right
        else:
            assert len(wrong) == 1 and answer_right


def test_deterministic_and_apart_from_the_training_stream(tmp_path):
    assert generate_worked(30, seed=2) == generate_worked(30, seed=2)
    assert generate_worked(30, seed=2) != generate_worked(30, seed=3)
    train = worked_conversations(30, seed=2)
    assert all(not _wrong_steps(c[1]["content"]) for c in train)
    assert train != [s["messages"] for s in generate_worked(30, seed=2)]
    path = write_worked(tmp_path, 20, seed=1)
    (tmp_path / "again").mkdir()
    again = write_worked(tmp_path / "again", 20, seed=1)
    assert path.read_bytes() == again.read_bytes()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == [s["id"] for s in generate_worked(20, seed=1)]
    assert all("noise" not in r for r in rows)


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"n": 3, "noise_rate": 0.5}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        generate_worked(**kwargs)
