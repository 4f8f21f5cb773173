"""Ingest: every input format and container, and a named reason for every malformed row."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qtune import schema
from qtune.stages.ingest import (
    InputError,
    Source,
    content_hash,
    detect_source_format,
    discover_sources,
    read_source,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def _read(path: Path, kind: str, fmt: str = "auto") -> pa.Table:
    tables = list(read_source(Source(str(path), kind), fmt, batch_rows=2))
    table = pa.concat_tables(tables)
    assert table.schema == schema.NORMALIZED_SCHEMA
    return table


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_messages_jsonl_multi_turn(tmp_path):
    table = _read(_write_jsonl(tmp_path / "a.jsonl", [{"id": 7, "messages": CHAT}] * 3), "jsonl")
    assert table.num_rows == 3
    assert table.column(schema.MESSAGES)[0].as_py() == CHAT
    assert table.column(schema.SAMPLE_ID).to_pylist() == ["7"] * 3
    assert table.column(schema.FORMAT).to_pylist() == ["messages"] * 3
    assert table.column(schema.ROW_INDEX).to_pylist() == [0, 1, 2]
    assert table.column(schema.REJECT_REASON).null_count == 3


def test_sharegpt_json_array(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "user", "value": "Q"},
                {"from": "assistant", "value": "A"},
            ]
        },
    ]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(rows))
    table = _read(path, "json")
    assert table.column(schema.FORMAT).to_pylist() == ["sharegpt"] * 2
    assert table.column(schema.MESSAGES)[0].as_py() == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]
    assert [m["role"] for m in table.column(schema.MESSAGES)[1].as_py()] == [
        "system",
        "user",
        "assistant",
    ]
    # No id column: a stable content hash.
    assert table.column(schema.SAMPLE_ID)[0].as_py() == content_hash(
        table.column(schema.MESSAGES)[0].as_py()
    )


def test_alpaca_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(
        pa.table(
            {"instruction": ["Reverse", "Say hi"], "input": ["abc", ""], "output": ["cba", "hi"]}
        ),
        path,
    )
    table = _read(path, "parquet")
    assert table.column(schema.MESSAGES).to_pylist() == [
        [{"role": "user", "content": "Reverse\n\nabc"}, {"role": "assistant", "content": "cba"}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    ]


def test_prompt_completion_strings_and_conversational(tmp_path):
    rows = [
        {"prompt": "Q: 1+1\nA:", "completion": " 2"},
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Yo"}],
        },
    ]
    table = _read(_write_jsonl(tmp_path / "pc.jsonl", rows), "jsonl")
    assert table.column(schema.FORMAT).to_pylist() == ["prompt_completion"] * 2
    assert table.column(schema.MESSAGES)[0].as_py() == [
        {"role": "user", "content": "Q: 1+1\nA:"},
        {"role": "assistant", "content": " 2"},
    ]
    assert table.column(schema.MESSAGES)[1].as_py()[1] == {"role": "assistant", "content": "Yo"}


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    data = datasets.Dataset.from_list([{"messages": CHAT}, {"messages": CHAT[1:3]}])
    data.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(
        str(tmp_path / "dd")
    )
    sources = discover_sources(str(tmp_path / "ds"))
    assert sources == [Source(str(tmp_path / "ds"), "hf_dataset")]
    assert _read(tmp_path / "ds", "hf_dataset").num_rows == 2
    test_split = list(read_source(Source(str(tmp_path / "dd"), "hf_dataset"), split="test"))
    assert sum(t.num_rows for t in test_split) == 1
    with pytest.raises(InputError, match="no split 'dev'"):
        list(read_source(Source(str(tmp_path / "dd"), "hf_dataset"), split="dev"))


def test_discovery_folders_globs_and_errors(tmp_path):
    (tmp_path / "x").mkdir()
    _write_jsonl(tmp_path / "x" / "a.jsonl", [])
    (tmp_path / "x" / "b.parquet").write_bytes(b"")
    (tmp_path / "x" / "notes.txt").write_text("ignored inside folders")
    (tmp_path / "x" / "_meta.json").write_text("{}")  # "_" and "." names are metadata
    (tmp_path / "x" / ".hidden").mkdir()
    (tmp_path / "x" / ".hidden" / "c.jsonl").write_text("{}")
    assert [s.kind for s in discover_sources(str(tmp_path / "x"))] == ["jsonl", "parquet"]
    assert len(discover_sources(str(tmp_path / "x" / "*.jsonl"))) == 1
    with pytest.raises(InputError, match="matches no file"):
        discover_sources(str(tmp_path / "nothing-*.jsonl"))
    with pytest.raises(InputError, match="does not exist"):
        discover_sources(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="unsupported file type"):
        discover_sources(str(tmp_path / "x" / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no readable input files"):
        discover_sources(str(tmp_path / "empty"))


def test_corrupt_parquet_is_reported_with_its_path(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="bad.parquet: unreadable Parquet"):
        list(read_source(Source(str(path), "parquet"), "messages"))


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"messages": [', "invalid_json"),
        (b"\xff\xfe{}", "invalid_utf8"),
        (b"[1, 2]", "not_an_object"),
        (b'{"text": "hello"}', "missing_field"),
        (b'{"messages": []}', "empty_messages"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', "unknown_role"),
        (
            b'{"messages": [{"role": "user", "content": "q"}, '
            b'{"role": "assistant", "content": 5}]}',
            "non_string_content",
        ),
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
            b'"content": "a\\u0000b"}]}',
            "invalid_text",
        ),
        (
            b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", '
            b'"content": "a"}]}',
            "invalid_text",
        ),
        (b'{"messages": [{"role": "user", "content": "q"}]}', "no_assistant_turn"),
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
            b'"content": "  "}]}',
            "empty_assistant",
        ),
    ],
)
def test_malformed_rows_are_flagged_not_dropped(tmp_path, line, reason):
    good = json.dumps({"messages": CHAT}).encode()
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(good + b"\n" + line + b"\n\n" + good + b"\n")
    table = _read(path, "jsonl", "messages")
    assert table.num_rows == 3  # blank lines are not rows; bad rows are kept, flagged
    assert table.column(schema.REJECT_REASON).to_pylist() == [None, reason, None]
    assert table.column(schema.REJECT_DETAIL)[1].as_py()
    assert table.column(schema.RAW)[1].as_py()  # the original row travels to rejects
    assert table.column(schema.RAW)[0].as_py() is None
    assert table.column(schema.ROW_INDEX).to_pylist() == [0, 1, 2]


def test_auto_detect_per_source_and_explicit_override(tmp_path):
    path = _write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}, {"messages": CHAT}]
    )
    assert detect_source_format(Source(str(path), "jsonl")) == "alpaca"
    table = _read(path, "jsonl")
    # The source is alpaca; a row of another shape is rejected rather than guessed.
    assert table.column(schema.REJECT_REASON).to_pylist() == [None, "missing_field"]
    forced = _read(path, "jsonl", "messages")
    assert forced.column(schema.REJECT_REASON).to_pylist() == ["missing_field", None]
