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
    Partition,
    Source,
    content_hash,
    detect_source_format,
    discover_inputs,
    discover_sources,
    plan_source,
    raw_texts,
    read_partition,
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


def _compact(messages: list[dict] | None) -> list[dict] | None:
    """A MESSAGES value without the struct fields its turns do not have (Arrow fills nulls)."""
    if messages is None:
        return None
    return [{k: v for k, v in m.items() if v is not None or k == "content"} for m in messages]


def _messages(table: pa.Table, row: int) -> list[dict] | None:
    return _compact(table.column(schema.MESSAGES)[row].as_py())


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_messages_jsonl_multi_turn(tmp_path):
    table = _read(_write_jsonl(tmp_path / "a.jsonl", [{"id": 7, "messages": CHAT}] * 3), "jsonl")
    assert table.num_rows == 3
    assert _messages(table, 0) == CHAT
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
    assert _messages(table, 0) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]
    assert [m["role"] for m in _messages(table, 1)] == [
        "system",
        "user",
        "assistant",
    ]
    # No id column: a stable content hash.
    assert table.column(schema.SAMPLE_ID)[0].as_py() == content_hash(_messages(table, 0))


def test_alpaca_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(
        pa.table(
            {"instruction": ["Reverse", "Say hi"], "input": ["abc", ""], "output": ["cba", "hi"]}
        ),
        path,
    )
    table = _read(path, "parquet")
    assert [_compact(m) for m in table.column(schema.MESSAGES).to_pylist()] == [
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
    assert _messages(table, 0) == [
        {"role": "user", "content": "Q: 1+1\nA:"},
        {"role": "assistant", "content": " 2"},
    ]
    assert _messages(table, 1)[1] == {"role": "assistant", "content": "Yo"}


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
        # An empty turn anywhere, not only when every turn is empty: it would train on a bare
        # end-of-turn token.
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
            b'"content": ""}, {"role": "user", "content": "q"}, {"role": "assistant", '
            b'"content": "x"}]}',
            "empty_assistant",
        ),
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
            b'"content": null, "tool_calls": "call it"}]}',
            "invalid_tool_calls",
        ),
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
            b'"content": null, "tool_calls": [{"type": "function", "function": {}}]}]}',
            "invalid_tool_calls",
        ),
        (
            b'{"messages": [{"role": "user", "content": "q", "tool_calls": [{"name": "f"}]}, '
            b'{"role": "assistant", "content": "a"}]}',
            "invalid_tool_calls",
        ),
        (
            b'{"tools": "not json", "messages": [{"role": "user", "content": "q"}, '
            b'{"role": "assistant", "content": "a"}]}',
            "invalid_tool_calls",
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


# --- partitions: the unit of scoring and resume ---------------------------------------------


def _rows_of(partitions, split: str = "train") -> list[int]:
    tables = [
        pa.concat_tables(list(read_partition(p, batch_rows=3, split=split))) for p in partitions
    ]
    for partition, table in zip(partitions, tables, strict=True):
        assert table.num_rows == partition.row_count
        assert set(table.column(schema.PARTITION).to_pylist()) == {partition.index}
    return [i for t in tables for i in t.column(schema.ROW_INDEX).to_pylist()]


def test_jsonl_partitions_cover_every_row_once_and_skip_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"id": i, "messages": CHAT}) for i in range(11)]
    path.write_text("\n\n".join(lines[:4]) + "\n\n" + "\n".join(lines[4:]) + "\n")
    partitions = plan_source(Source(str(path), "jsonl"), "messages", 5, rows_per_partition=4)
    assert [(p.index, p.row_start, p.row_count) for p in partitions] == [
        (5, 0, 4),
        (6, 4, 4),
        (7, 8, 3),
    ]
    assert _rows_of(partitions) == list(range(11))
    ids = pa.concat_tables(list(read_partition(partitions[1]))).column(schema.SAMPLE_ID)
    assert ids.to_pylist() == ["4", "5", "6", "7"]


def test_json_array_partitions_are_byte_ranges_decoded_alone(tmp_path):
    path = tmp_path / "a.json"
    rows = [
        {"id": i, "messages": [{"role": "user", "content": f"q{i} é 漢"}, *CHAT[1:]]}
        for i in range(11)
    ]
    path.write_text("  [\n" + ",\n ".join(json.dumps(r, ensure_ascii=False) for r in rows) + "]")
    partitions = plan_source(Source(str(path), "json"), "messages", 0, rows_per_partition=4)
    assert [(p.row_start, p.row_count) for p in partitions] == [(0, 4), (4, 4), (8, 3)]
    data = path.read_bytes()
    for partition in partitions:  # each range holds exactly its own rows (multi-byte text too)
        text = data[partition.byte_offset : partition.byte_end].decode("utf-8").rstrip(", \n")
        assert [r["id"] for r in json.loads(f"[{text}]")] == list(
            range(partition.row_start, partition.row_start + partition.row_count)
        )
    assert _rows_of(partitions) == list(range(11))
    ids = pa.concat_tables(list(read_partition(partitions[1]))).column(schema.SAMPLE_ID)
    assert ids.to_pylist() == ["4", "5", "6", "7"]
    limited = plan_source(Source(str(path), "json"), "messages", 0, 4, max_rows=6)
    assert [(p.row_start, p.row_count) for p in limited] == [(0, 4), (4, 2)]


def test_parquet_partitions_are_bounded_row_ranges(tmp_path):
    path = tmp_path / "a.parquet"
    table = pa.table({"messages": [CHAT] * 10, "id": [str(i) for i in range(10)]})
    pq.write_table(table, path, row_group_size=3)
    partitions = plan_source(Source(str(path), "parquet"), "messages", 0, rows_per_partition=5)
    # Row ranges of partition_rows; each reads only the row groups its range overlaps.
    assert [(p.row_start, p.row_count, p.row_groups) for p in partitions] == [
        (0, 5, (0, 1)),
        (5, 5, (1, 2, 3)),
    ]
    assert _rows_of(partitions) == list(range(10))
    one_group = tmp_path / "one.parquet"
    pq.write_table(table, one_group)  # a single row group: still bounded partitions
    partitions = plan_source(Source(str(one_group), "parquet"), "messages", 0, 4)
    assert [(p.row_start, p.row_count) for p in partitions] == [(0, 4), (4, 4), (8, 2)]
    assert _rows_of(partitions) == list(range(10))


def test_saved_dataset_partitions(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"messages": CHAT, "id": str(i)} for i in range(7)]).save_to_disk(
        str(tmp_path / "ds")
    )
    partitions = plan_source(Source(str(tmp_path / "ds"), "hf_dataset"), "messages", 0, 3)
    assert [p.row_count for p in partitions] == [3, 3, 1]
    assert _rows_of(partitions) == list(range(7))


def test_partition_descriptor_round_trips_through_json(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT}] * 3)
    (partition,) = plan_source(Source(str(path), "jsonl"), None, 2, 10)
    assert Partition.from_dict(json.loads(json.dumps(partition.to_dict()))) == partition


def test_a_parquet_file_corrupt_mid_way_rejects_its_remaining_rows(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"messages": [CHAT] * 6}), path, row_group_size=3)
    partitions = plan_source(Source(str(path), "parquet"), "messages", 0, 100)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 40 : middle + 40] = b"\x00" * 80  # damage the second row group's pages
    path.write_bytes(bytes(data))
    table = pa.concat_tables(list(read_partition(partitions[0])))
    assert table.num_rows == 6  # every planned row is accounted for
    reasons = table.column(schema.REJECT_REASON).to_pylist()
    assert "unreadable_source" in reasons
    assert reasons.index("unreadable_source") >= 1 or reasons == ["unreadable_source"] * 6
    assert table.column(schema.ROW_INDEX).to_pylist() == list(range(6))


def test_unreadable_files_fail_planning_with_their_path(tmp_path):
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="bad.parquet: unreadable Parquet"):
        plan_source(Source(str(bad_parquet), "parquet"), "messages", 0, 10)
    bad_array = tmp_path / "bad.json"
    bad_array.write_text('[{"messages": []}, {')
    with pytest.raises(InputError, match="bad.json: invalid JSON array"):
        plan_source(Source(str(bad_array), "json"), "messages", 0, 10)


def test_raw_texts_reads_original_rows_back(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"id": i, "messages": CHAT} for i in range(5)])
    (partition,) = plan_source(Source(str(path), "jsonl"), "messages", 0, 10)
    texts = raw_texts(partition, [1, 3])
    assert set(texts) == {1, 3} and json.loads(texts[3])["id"] == 3


def test_tool_calls_reasoning_and_tools_are_kept_for_the_template(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    row = {
        "tools": tools,
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "42"},
            {"role": "assistant", "content": "It is 42.", "reasoning_content": "f said 42"},
        ],
    }
    table = _read(_write_jsonl(tmp_path / "t.jsonl", [row]), "jsonl")
    assert table.column(schema.REJECT_REASON)[0].as_py() is None
    messages = _messages(table, 0)
    assert json.loads(messages[1].pop("tool_calls")) == [call]
    assert messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"},
        {"role": "assistant", "content": "It is 42.", "reasoning_content": "f said 42"},
    ]
    assert json.loads(table.column(schema.TOOLS)[0].as_py()) == tools


def test_a_utf8_bom_does_not_cost_the_first_row(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + b"".join(json.dumps({"messages": CHAT}).encode() + b"\n" for _ in range(2))
    )
    table = _read(path, "jsonl")
    assert table.column(schema.REJECT_REASON).to_pylist() == [None, None]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".json.gz", ".jsonl.bz2"])
def test_compressed_inputs_are_read_in_partitions(tmp_path, suffix):
    import pyarrow as pa

    rows = [{"id": i, "messages": CHAT} for i in range(10)]
    if ".jsonl" in suffix:
        data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    else:
        data = json.dumps(rows).encode()
    codec = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}[Path(suffix).suffix]
    path = tmp_path / f"rows{suffix}"
    with pa.output_stream(str(path), compression=codec) as stream:
        stream.write(data)
    [source] = discover_sources(str(tmp_path))
    assert source.path == str(path)
    partitions = plan_source(source, detect_source_format(source), 0, rows_per_partition=4)
    assert [p.row_count for p in partitions] == [4, 4, 2]
    table = pa.concat_tables([t for p in partitions for t in read_partition(p)])
    assert table.column(schema.SAMPLE_ID).to_pylist() == [str(i) for i in range(10)]
    assert table.column(schema.REJECT_REASON).null_count == 10


def test_everything_skipped_in_an_input_folder_is_listed_with_why(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT}])
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")
    (tmp_path / ".git").mkdir()
    for i in range(3):
        (tmp_path / ".git" / f"object{i}").write_text("x")
    (tmp_path / "_SUCCESS").write_text("")
    sources, skipped = discover_inputs(str(tmp_path))
    assert [s.path for s in sources] == [str(tmp_path / "a.jsonl")]
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert set(reasons) == {"notes.txt", "gone.jsonl", ".git", "_SUCCESS"}  # .git listed once
    assert reasons["gone.jsonl"].startswith("dangling symlink")
    assert reasons["notes.txt"].startswith("unsupported file type")
    assert reasons[".git"].startswith("hidden name")
    # A glob that matches a dangling link skips it rather than failing the whole input.
    sources, skipped = discover_inputs(str(tmp_path / "*.jsonl"))
    assert [Path(s.path).name for s in skipped] == ["gone.jsonl"] and len(sources) == 1
