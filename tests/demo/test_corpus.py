"""Tests for the synthetic demo corpus."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from qtune.demo.corpus import (
    ALPACA_FILE,
    CHAT_FILE,
    COMPLETIONS_FILE,
    COUNTRIES,
    FILE_NAMES,
    SHAREGPT_FILE,
    TASKS,
    assign_files,
    generate_samples,
    training_conversations,
    write_demo_corpus,
)

N = 3000
CAPITALS = dict(COUNTRIES)
_ADD = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)\.$")
_CAPITAL = re.compile(r"^The capital of (\w+) is ([\w ]+)\.$")
_REVERSE = re.compile(r'^The reverse of "(\w+)" is "(\w+)"\.$')
_SORT = re.compile(r"^The sorted list is ([\d, ]+)\.$")
_COUNT = re.compile(r'^The letter "(\w)" appears (\d+) times? in "(\w+)"\.$')


def _answer_is_correct(task: str, question: str, answer: str) -> bool:
    """Check an assistant answer of a checkable task; ``chat`` answers are never judged."""
    if task == "add":
        m = _ADD.match(answer)
        if not m:
            return False
        a, op, b, result = int(m[1]), m[2], int(m[3]), int(m[4])
        return result == (a + b if op == "+" else a - b)
    if task == "capital":
        m = _CAPITAL.match(answer)
        return bool(m) and CAPITALS.get(m[1]) == m[2]
    if task == "reverse":
        m = _REVERSE.match(answer)
        return bool(m) and m[1][::-1] == m[2]
    if task == "sort":
        m = _SORT.match(answer)
        if not m:
            return False
        numbers = [int(x) for x in m[1].split(", ")]
        return numbers == sorted(int(x) for x in re.findall(r"\d+", question))
    if task == "count":
        m = _COUNT.match(answer)
        return bool(m) and m[3].count(m[1]) == int(m[2])
    return True


def _assistant_answers(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


def _turns(messages: list[dict]) -> list[tuple[str, str]]:
    """(user, assistant) pairs of a conversation."""
    turns = [m["content"] for m in messages if m["role"] != "system"]
    return list(zip(turns[::2], turns[1::2], strict=True))


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return generate_samples(N, seed=0)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(out, n_samples=N, seed=0)
    return out


def _read_files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in FILE_NAMES}


def test_write_is_deterministic(tmp_path: Path, corpus_dir: Path) -> None:
    paths = write_demo_corpus(tmp_path / "again" / "nested", n_samples=N, seed=0)
    assert [p.name for p in paths] == list(FILE_NAMES)
    assert all(p.parent == tmp_path / "again" / "nested" for p in paths)
    assert _read_files(paths[0].parent) == _read_files(corpus_dir)


def test_different_seeds_differ(tmp_path: Path, corpus_dir: Path) -> None:
    write_demo_corpus(tmp_path, n_samples=N, seed=1)
    other = _read_files(tmp_path)
    same = _read_files(corpus_dir)
    for name in FILE_NAMES:
        assert other[name] != same[name], name
    assert generate_samples(50, seed=0) != generate_samples(50, seed=1)


def test_generate_samples_is_deterministic(samples: list[dict]) -> None:
    assert generate_samples(N, seed=0) == samples


def test_sample_structure(samples: list[dict]) -> None:
    assert len(samples) == N
    ids = [s["id"] for s in samples]
    assert len(set(ids)) == N
    for s in samples:
        assert set(s) == {"id", "task", "messages", "noisy", "duplicate_of"}
        assert s["task"] in TASKS
        roles = [m["role"] for m in s["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert 1 <= len(roles) // 2 <= 3
        assert all(m["content"] for m in s["messages"])
        assert sum(len(m["content"]) for m in s["messages"]) < 600
    assert Counter(s["task"] for s in samples).keys() == set(TASKS)
    # Some multi-turn samples and some with a system message.
    assert sum(len(s["messages"]) > 3 for s in samples) > N // 20
    assert sum(s["messages"][0]["role"] == "system" for s in samples) > N // 20


def test_all_tasks_present_in_every_file(corpus_dir: Path) -> None:
    chat = [json.loads(line) for line in (corpus_dir / CHAT_FILE).read_text().splitlines()]
    share = json.loads((corpus_dir / SHAREGPT_FILE).read_text())
    alpaca = pq.read_table(corpus_dir / ALPACA_FILE).column("task").to_pylist()
    completions = (corpus_dir / COMPLETIONS_FILE).read_text().splitlines()
    for tasks in (
        [r["task"] for r in chat],
        [r["task"] for r in share],
        alpaca,
        [json.loads(line)["task"] for line in completions],
    ):
        assert set(tasks) == set(TASKS)


@pytest.mark.parametrize(("noise_rate", "duplicate_rate"), [(0.08, 0.15), (0.3, 0.05)])
def test_rates_are_honoured(noise_rate: float, duplicate_rate: float) -> None:
    samples = generate_samples(N, seed=3, noise_rate=noise_rate, duplicate_rate=duplicate_rate)
    by_id = {s["id"]: s for s in samples}
    duplicates = [s for s in samples if s["duplicate_of"] is not None]
    assert len(duplicates) == round(N * duplicate_rate)
    assert abs(sum(s["noisy"] for s in samples) / N - noise_rate) < 0.02
    for dup in duplicates:
        original = by_id[dup["duplicate_of"]]
        assert original["duplicate_of"] is None
        assert original["id"] < dup["id"]  # an earlier sample
        assert original["task"] == dup["task"] and original["noisy"] == dup["noisy"]
        # Near, not exact: only the first user question changed, and only a little.
        assert dup["messages"] != original["messages"]
        assert _assistant_answers(dup["messages"]) == _assistant_answers(original["messages"])
        changed = [
            (a["content"], b["content"])
            for a, b in zip(dup["messages"], original["messages"], strict=True)
            if a != b
        ]
        assert len(changed) == 1
        a, b = changed[0]
        assert abs(len(a) - len(b)) <= 12


def test_noise_flags_match_answers(samples: list[dict]) -> None:
    checkable = [s for s in samples if s["task"] != "chat"]
    for s in checkable:
        correct = [_answer_is_correct(s["task"], q, a) for q, a in _turns(s["messages"])]
        # A noisy sample has exactly one wrong answer; a clean one has none.
        assert correct.count(False) == (1 if s["noisy"] else 0), s
    # Noise is planted in every task, including the open-ended one.
    assert {s["task"] for s in samples if s["noisy"]} == set(TASKS)


def test_zero_rates_give_clean_unique_corpus() -> None:
    samples = generate_samples(200, seed=5, noise_rate=0.0, duplicate_rate=0.0)
    assert not any(s["noisy"] or s["duplicate_of"] for s in samples)


@pytest.mark.parametrize("kwargs", [{"noise_rate": 1.0}, {"duplicate_rate": -0.1}, {"n": -1}])
def test_invalid_arguments(kwargs: dict) -> None:
    args = {"n": 10, **kwargs}
    with pytest.raises(ValueError):
        generate_samples(**args)


def test_training_conversations_are_clean(samples: list[dict]) -> None:
    convs = training_conversations(2000)
    assert len(convs) == 2000
    assert convs == training_conversations(2000)
    assert convs != training_conversations(2000, seed=2)
    n_checked = 0
    tasks = Counter()
    for messages in convs:
        for question, answer in _turns(messages):
            task = _task_of_question(question)
            assert _answer_is_correct(task, question, answer), messages
            tasks[task] += 1
            n_checked += 1
    assert n_checked > 2000
    assert set(tasks) == set(TASKS)
    # Arithmetic answers specifically were seen and are right.
    assert tasks["add"] > 200
    # Not the corpus itself, even for the same seed.
    assert training_conversations(100, seed=0) != [s["messages"] for s in samples[:100]]


def _task_of_question(user: str) -> str:
    lowered = user.lower()
    for task, needle in (
        ("capital", "capital"),
        ("count", 'the letter "'),
        ("sort", "numbers"),
        ("reverse", "backwards"),
        ("reverse", "reverse"),
    ):
        if needle in lowered:
            return task
    return "add" if re.search(r"\d+ [+-] \d+", user) else "chat"


def test_files_parse_in_their_formats(corpus_dir: Path, samples: list[dict]) -> None:
    counts = Counter(assign_files(samples))
    by_id = {s["id"]: s for s in samples}

    chat_lines = (corpus_dir / CHAT_FILE).read_text(encoding="utf-8").split("\n")
    assert chat_lines[-1] == ""  # newline-terminated
    chat = [json.loads(line) for line in chat_lines[:-1]]
    assert len(chat) == counts[CHAT_FILE]
    for row in chat:
        assert list(row) == ["id", "task", "messages"]
        assert row["messages"] == by_id[row["id"]]["messages"]

    share = json.loads((corpus_dir / SHAREGPT_FILE).read_text(encoding="utf-8"))
    assert isinstance(share, list) and len(share) == counts[SHAREGPT_FILE]
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    for row in share:
        assert list(row) == ["id", "task", "conversations"]
        expected = [
            {"from": roles[m["role"]], "value": m["content"]} for m in by_id[row["id"]]["messages"]
        ]
        assert row["conversations"] == expected
    # Multi-turn and system-message samples only go to the two conversation formats.
    assert any(len(r["messages"]) > 3 for r in chat)
    assert any(len(r["conversations"]) > 3 for r in share)

    table = pq.read_table(corpus_dir / ALPACA_FILE)
    assert table.column_names == ["instruction", "input", "output", "task"]
    assert table.num_rows == counts[ALPACA_FILE]
    rows = table.to_pylist()
    assert any(r["input"] for r in rows) and any(not r["input"] for r in rows)

    completions = [
        json.loads(line)
        for line in (corpus_dir / COMPLETIONS_FILE).read_text(encoding="utf-8").splitlines()
    ]
    assert len(completions) == counts[COMPLETIONS_FILE]
    for row in completions:
        assert list(row) == ["prompt", "completion", "task"]
        assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:")
        assert row["completion"].startswith(" ") and not row["completion"].startswith("  ")

    # Rows are the single-turn samples assigned to each file, in order, with the same text.
    single = {ALPACA_FILE: [], COMPLETIONS_FILE: []}
    for s, name in zip(samples, assign_files(samples), strict=True):
        if name in single:
            assert [m["role"] for m in s["messages"]] == ["user", "assistant"]
            single[name].append(s)
    for r, s in zip(rows, single[ALPACA_FILE], strict=True):
        user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        assert [user, r["output"]] == [m["content"] for m in s["messages"]]
        assert r["task"] == s["task"]
    for r, s in zip(completions, single[COMPLETIONS_FILE], strict=True):
        assert r["prompt"] == f"Question: {s['messages'][0]['content']}\nAnswer:"
        assert r["completion"] == " " + s["messages"][1]["content"]

    total = sum(counts.values())
    assert total == N
    assert len(chat) + len(share) + len(rows) + len(completions) == N


def test_small_corpus_writes_loadable_files(tmp_path: Path) -> None:
    # One sample goes to chat.jsonl; the other three files are empty but still parse.
    paths = write_demo_corpus(tmp_path, n_samples=1, seed=0)
    assert [p.name for p in paths] == list(FILE_NAMES)
    assert len((tmp_path / CHAT_FILE).read_text().splitlines()) == 1
    assert json.loads((tmp_path / SHAREGPT_FILE).read_text()) == []
    assert (tmp_path / COMPLETIONS_FILE).read_text() == ""
    metadata = pq.ParquetFile(tmp_path / ALPACA_FILE).metadata
    # No rows must mean no row group: one empty row group fails to load downstream.
    assert (metadata.num_rows, metadata.num_row_groups) == (0, 0)
    table = pq.read_table(tmp_path / ALPACA_FILE)
    assert table.column_names == ["instruction", "input", "output", "task"]
