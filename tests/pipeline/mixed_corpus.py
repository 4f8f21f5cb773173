"""A mixed corpus for reliability tests: good rows, every bad-row case, a repeated id, a corrupt
file; its config; and what a published version holds, by content (for run-to-run comparisons)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qtune import schema
from qtune.pipeline.layout import OutputLayout

CHAT = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."}]


def chat_line(messages, **extra) -> bytes:
    return json.dumps({**extra, "messages": messages}).encode()


# One line per reason code that ingest and tokenisation can give a row.
BAD_LINES = {
    "invalid_json": b'{"messages": [{"role": "user"',
    "not_an_object": b'["a", "list"]',
    "missing_field": b'{"text": "no messages here"}',
    "empty_messages": b'{"messages": []}',
    "unknown_role": chat_line([{"role": "wizard", "content": "x"}, CHAT[1]]),
    "no_assistant_turn": chat_line(CHAT[:1]),
    "empty_assistant": chat_line([CHAT[0], {"role": "assistant", "content": " "}]),
    "non_string_content": chat_line([CHAT[0], {"role": "assistant", "content": {"x": 1}}]),
    "invalid_utf8": b'{"messages": "\xff\xfe"}',
    "invalid_text": chat_line([CHAT[0], {"role": "assistant", "content": "a\u0000b"}]),
    "too_long": chat_line([CHAT[0], {"role": "assistant", "content": " ".join(["7"] * 400)}]),
    # Text that spells a control token would forge a turn boundary.
    "special_token_in_content": chat_line(
        [{"role": "user", "content": "Say <|im_end|> then stop."}, CHAT[1]]
    ),
    # The demo's ChatML template renders no tool calls: the call would vanish.
    "unsupported_tool_calls": chat_line(
        [
            CHAT[0],
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {}}}],
            },
        ]
    ),
    "invalid_tool_calls": chat_line([CHAT[0], {"role": "assistant", "tool_calls": "add(2, 3)"}]),
}
SURROGATE = (
    b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}'
)


def write_mixed_corpus(root: Path) -> Path:
    """Good rows from the demo corpus, every bad-row case, a repeated id and a corrupt file."""
    from qtune.demo.corpus import write_demo_corpus

    write_demo_corpus(root, n_samples=60, seed=5)
    lines = [chat_line(CHAT, id="dup-1")]
    for reason, line in BAD_LINES.items():
        lines += [chat_line(CHAT, id=f"good-before-{reason}"), line]
    lines += [SURROGATE, chat_line(CHAT, id="dup-1")]  # the second dup-1 is rejected
    (root / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    (root / "notes.txt").write_text("not an input file type: skipped, listed with why")
    (root / "moved.jsonl").symlink_to(root / "gone.jsonl")  # a dangling symlink
    (root / "_SUCCESS").write_text("")  # a writer's marker: metadata, not data
    return root


def write_config(
    path: Path,
    corpus: Path,
    model: Path,
    out: Path,
    *,
    max_length: int = 256,
    workers: int = 1,
    num_cpus: int = 2,
) -> Path:
    lines = [
        f"input: {{path: {corpus}, partition_rows: 16}}",
        f"model: {{path: {model}, max_length: {max_length}, overlength: reject}}",
        f"scoring: {{backend: torch, batch_size: 8, num_workers: {workers}}}",
        "qtuning: {sample_ratio: 0.3}",
        f"output: {{dir: {out}, num_shards: 2}}",
        f"ray: {{num_cpus: {num_cpus}}}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def published(out: Path) -> dict:
    """What a trainer gets, by content: shard and dropped-index hashes, in order; counts."""
    manifest = json.loads((out / "data/epoch_000/manifest.json").read_text())
    rejects = pa.concat_tables(
        [pq.read_table(p) for p in sorted(OutputLayout(out).rejects_dir(0).glob("*.parquet"))]
    ).sort_by([(schema.SOURCE, "ascending"), (schema.ROW_INDEX, "ascending")])
    return {
        "shards": [f["sha256"] for f in manifest["files"]],
        "dropped": manifest["dropped_index"]["sha256"],
        "counts": manifest["counts"],
        "rejects": rejects.drop_columns([schema.DETAIL]).to_pylist(),
    }


def download_all(location: str, target: Path) -> Path:
    """Every file of a remote directory, copied under ``target`` (what a reader of it sees)."""
    from qtune import storage

    for relative in storage.list_files(location):
        storage.download(storage.join(location, *relative.split("/")), target / relative)
    return target
