"""find_samples / render_sample on versions published from synthetic scored caches."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from qtune import schema
from qtune.pipeline.inspect import (
    InspectError,
    decode_tokens,
    find_samples,
    load_tokenizer,
    open_version,
    read_rows,
    render_sample,
    terminal_safe,
)
from qtune.pipeline.layout import OutputLayout
from qtune.stages.report import (
    ENTROPY_SCALE,
    PRUNED_CLOSE,
    PRUNED_OPEN,
    SampleView,
    token_segments,
)
from tests.pipeline.test_report_job import N, publish_versions


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    return publish_versions(tmp_path_factory.mktemp("inspect") / "out")


def _text(renderable) -> str:
    console = Console(record=True, width=100)
    console.print(renderable)
    return console.export_text()


def _pruned_sample(out: Path, epoch: int) -> dict:
    shards = pq.ParquetDataset(OutputLayout(out).data_dir(epoch) / "train").read(
        columns=[schema.SAMPLE_ID, schema.TOKEN_PRUNED, schema.LOSS_MASK, schema.QUADRANT]
    )
    return next(r for r in shards.to_pylist() if r[schema.TOKEN_PRUNED])


def _cache_row(out: Path, epoch: int, sample_id: str) -> dict:
    cache = pq.ParquetDataset(OutputLayout(out).scores_dir(epoch)).read(
        columns=[schema.SAMPLE_ID, schema.LOSS_MASK, schema.TOKEN_ENTROPY, schema.PPL]
    )
    return next(r for r in cache.to_pylist() if r[schema.SAMPLE_ID] == sample_id)


def test_a_known_sample_shows_its_scores_and_pruned_tokens(published):
    row = _pruned_sample(published, 1)
    (view,) = find_samples(published, sample_ids=[row[schema.SAMPLE_ID]])
    cached = _cache_row(published, 1, view.sample_id)
    assert view.quadrant == row[schema.QUADRANT] and view.kept and view.token_pruned
    assert view.ppl == cached[schema.PPL] and view.score_name == ENTROPY_SCALE.name
    before = np.array(cached[schema.LOSS_MASK], dtype=bool)
    after = np.array(row[schema.LOSS_MASK], dtype=bool)
    pruned = [s.start for s in view.segments if s.role == "pruned"]
    assert pruned == np.flatnonzero(before & ~after).tolist() and pruned
    assert view.num_loss_tokens == int(after.sum()) and view.n_response_tokens == int(before.sum())
    entropy = np.array(cached[schema.TOKEN_ENTROPY])
    assert [s.score for s in view.segments if s.role != "prompt"] == pytest.approx(
        entropy[before].tolist()
    )

    out = _text(render_sample(view))
    assert view.sample_id in out and f"{view.quadrant} " in out
    assert f"PPL {view.ppl:.4g}" in out and f"entropy {view.entropy:.4g}" in out
    assert "token-pruned" in out and "synthetic.jsonl" in out
    assert PRUNED_OPEN in out and PRUNED_CLOSE in out
    assert "tokens are shown as [id]" in out  # no tokenizer for the synthetic model


def test_quadrant_and_keep_filters(published):
    views = find_samples(published, quadrant="Q2", limit=2)
    assert len(views) == 2 and {v.quadrant for v in views} == {"Q2"}
    kept = find_samples(published, quadrant="q4", kept=True, limit=3)
    assert len(kept) == 3 and all(v.kept and v.quadrant == "Q4" for v in kept)
    assert all(v.num_loss_tokens == v.n_response_tokens for v in kept)  # Q4 keeps every token
    dropped = find_samples(published, kept=False, limit=4)
    assert len(dropped) == 4 and not any(v.kept for v in dropped)
    for view in dropped:
        assert view.num_loss_tokens == 0 and view.reason == "outside_corners"
        assert {s.role for s in view.segments} == {"prompt", "dropped"}
        assert "dropped (outside_corners)" in _text(render_sample(view))
    assert len(find_samples(published, limit=N + 10)) == N


def test_epochs_and_order(published):
    latest = open_version(published)
    first = open_version(published, 0)
    assert latest.epoch == 1 and first.epoch == 0 and latest.samples.height == N
    # Cache order: the first Q1 samples by sample id.
    ids = [v.sample_id for v in find_samples(published, 0, quadrant="Q1", limit=3)]
    assert ids == sorted(ids)
    assert find_samples(published, 0, sample_ids=[ids[1], ids[0]])[0].sample_id == ids[1]


def test_unknown_ids_and_bad_arguments_are_clear_errors(published, tmp_path):
    with pytest.raises(InspectError, match="unknown sample id.*'nope'"):
        find_samples(published, sample_ids=["syn-000000001", "nope"])
    with pytest.raises(InspectError, match=r"'bad-0' \(rejected: invalid_json\)"):
        find_samples(published, sample_ids=["bad-0"])
    with pytest.raises(InspectError, match="unknown quadrant 'Q5'"):
        find_samples(published, quadrant="Q5")
    with pytest.raises(InspectError, match="limit"):
        find_samples(published, limit=0)
    with pytest.raises(InspectError, match="no such output directory"):
        find_samples(tmp_path / "none")


def test_decoding_with_the_session_tokenizer(tokenizer, tmp_path):
    text = "Reverse the word candle."
    ids = np.array(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert "".join(decode_tokens(tokenizer, ids)) == text
    assert decode_tokens(tokenizer, np.array([ids[0], 10**6])) == [
        tokenizer.decode([int(ids[0])]),
        "[1000000]",
    ]
    assert decode_tokens(None, np.array([3, 17])) == ["[3]", "[17]"]

    model_dir = tmp_path / "model"
    tokenizer.save_pretrained(model_dir)
    loaded, note = load_tokenizer({"model": {"path": str(model_dir)}})
    assert note is None and loaded.decode(ids.tolist()) == text
    missing, note = load_tokenizer(
        {"model": {"path": str(tmp_path / "gone")}, "config": {"model": {"path": "unused"}}}
    )
    assert missing is None and "no tokenizer could be loaded" in note and "gone" in note


def test_read_rows_reads_only_wanted_rows_in_order(tmp_path):
    table = pa.table({"a": list(range(100)), "b": [[i] * 3 for i in range(100)]})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=7)
    rows = read_rows(path, [55, 3, 99, 4, 55], ["a", "b"])
    assert rows.column("a").to_pylist() == [55, 3, 99, 4, 55]
    assert rows.column("b").to_pylist()[2] == [99, 99, 99]
    with pytest.raises(InspectError, match="outside"):
        read_rows(path, [100], ["a"])


def _terminal_output(renderable) -> str:
    """What `qtune inspect` writes to a colour terminal."""
    stream = io.StringIO()
    Console(file=stream, force_terminal=True, color_system="truecolor", width=100).print(renderable)
    return stream.getvalue()


def test_text_from_the_data_is_shown_never_acted_on_by_the_terminal():
    hostile = [
        "Say \x1b[2J\x1b]0;pwned\x07",  # clear screen, set the window title
        "\x1b]52;c;ZXZpbA==\x1b\\",  # write to the clipboard (OSC 52)
        " hi\x9b31m",  # a one-character CSI (C1)
        "\u202eevil\u202c\u2066x\u2069",  # bidi override and isolate
        " [bold red]no markup[/]\x7f\x00",
        "\tend\r\n",
    ]
    ids = ["[red]id\x1b[5m", "ok"]
    view = SampleView(
        sample_id=ids[0],
        source="src\x1b[8m.jsonl",
        row_index=3,
        quadrant="Q2",
        kept=True,
        filled=False,
        token_pruned=True,
        ppl=2.0,
        entropy=0.5,
        n_response_tokens=5,
        num_loss_tokens=3,
        segments=token_segments(
            hostile,
            np.array([0, 1, 1, 1, 1, 1]),
            np.array([0, 1, 0, 1, 1, 0]),
            np.linspace(0.1, 1.0, 6),
        ),
        note="a note \x1b[1m",
    )
    out = _terminal_output(render_sample(view))
    # Rich's own styling is the only escape sequence: every ESC starts an SGR ("ESC [ … m").
    sgr = re.compile(r"\x1b\[[0-9;]*m")
    rest = sgr.sub("", out)
    for char in ["\x1b", "\x9b", "\x07", "\x7f", "\x00", "\r", "\u202e", "\u202c", "\u2066"]:
        assert char not in rest, f"{char!r} reached the terminal"
    for shown in [r"\x1b[2J", r"\x1b]0;pwned\x07", r"\x9b31m", r"\u202eevil", r"\x7f\x00", r"\r"]:
        assert shown in rest
    assert "[bold red]no markup[/]" in rest
    assert r"[red]id\x1b[5m" in rest  # the title: markup and escapes both shown as written
    assert r"src\x1b[8m.jsonl:3" in rest and r"a note \x1b[1m" in rest
    assert terminal_safe("line\nnext\ttab é 中 \u200f") == "line\nnext\ttab é 中 \u200f"
