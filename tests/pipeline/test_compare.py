"""`qtune compare` end to end on a user-style corpus (tiny random Llama, torch backend): every arm
trains, random matches qtuning's budget, accuracy is judged where eval rows carry an answer, and
a later call resumes into more epochs without redoing the finished ones."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from qtune.pipeline.cli import app
from qtune.pipeline.compare import answer_matches


def test_answer_judge_takes_the_last_line_as_a_whole_word():
    assert answer_matches("42", "42")
    assert answer_matches("Step 1: 40 + 2 = 42.\nSo the answer is 42.", "42")
    assert not answer_matches("So the answer is 142.", "42")
    assert not answer_matches("42 is wrong; it is 41", "42")
    assert not answer_matches("anything", "")


def _user_corpus(root: Path) -> Path:
    """Two formats, an `answer` field on the chat rows, and bad rows that ingest rejects."""
    root.mkdir()
    lines = []
    for i in range(60):
        a, b = i % 7, i % 5
        messages = [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}.\nThe answer is {a + b}."},
        ]
        lines.append(json.dumps({"id": f"row-{i}", "messages": messages, "answer": str(a + b)}))
    lines += ['{"messages": [', '{"text": "no conversation"}']
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(
        pa.table(
            {
                "instruction": [f"Repeat the word {w}." for w in ("red", "blue", "green") * 10],
                "input": [""] * 30,
                "output": [w for w in ("red", "blue", "green") * 10],
            }
        ),
        root / "alpaca.parquet",
    )
    return root


@pytest.mark.ray
def test_compare_runs_every_arm_at_equal_budget_and_resumes(tmp_path, llama_dir):
    corpus = _user_corpus(tmp_path / "corpus")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"input: {{path: {corpus}}}\nmodel: {{path: {llama_dir}, max_length: 256}}\n"
        f"output: {{dir: {tmp_path / 'unused'}}}\nscoring: {{backend: torch}}\n"
        "ray: {num_cpus: 2}\nqtuning: {sample_ratio: 0.3}\n"
    )
    out = tmp_path / "compare"
    args = ["compare", str(config), "--out", str(out), "--holdout", "0.2", "--arms",
            "random,full", "--learning-rate", "1e-3", "--max-new-tokens", "12"]  # fmt: skip
    first = CliRunner().invoke(app, [*args, "--epochs", "1"])
    assert first.exit_code == 0, first.output
    assert "qtune compare: plan" in first.output and "scoring passes" in first.output
    results = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in results] == ["qtuning", "random", "full"]
    qtuning, random, full = ({e["epoch"]: e for e in r["epochs"]} for r in results)
    assert random[0]["kept_samples"] == qtuning[0]["kept_samples"]
    assert random[0]["kept_loss_tokens"] <= qtuning[0]["kept_loss_tokens"]
    assert full[0]["kept_samples"] > qtuning[0]["kept_samples"]
    assert qtuning[0]["accuracy"] is not None  # the chat rows carry answers
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    eval_ids = {json.loads(x)["id"] for x in (out / "corpus/eval.jsonl").read_text().splitlines()}
    train = (out / "corpus/train.jsonl").read_text()
    assert eval_ids and not any(f'"id": "{i}"' in train for i in eval_ids)

    second = CliRunner().invoke(app, [*args, "--epochs", "2"])
    assert second.exit_code == 0, second.output
    resumed = json.loads((out / "results.json").read_text())
    for before, after in zip(results, resumed, strict=True):
        assert after["epochs"][0] == before["epochs"][0]  # not redone
        assert [e["epoch"] for e in after["epochs"]] == [0, 1]
    # qtuning's epoch 1 trained on the version its own checkpoint re-scored.
    manifest = json.loads((out / "qtuning/data/epoch_001/manifest.json").read_text())
    assert "after-epoch-0" in json.dumps(manifest["model"])

    changed = CliRunner().invoke(app, [*args, "--epochs", "2", "--holdout", "0.3"])
    assert changed.exit_code == 1 and "--restart" in changed.output
