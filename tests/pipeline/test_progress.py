"""Progress: plain periodic log lines off a terminal; the per-stage timing table."""

from __future__ import annotations

import logging

from qtune.pipeline.progress import StageTimings, StepProgress


def test_progress_off_a_terminal_is_plain_lines_with_rates_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="qtune.progress")
    with StepProgress("scoring", 300, interval=0, live=False) as progress:
        for _ in range(3):
            progress.advance(100, tokens=5000)
    lines = [r.getMessage() for r in caplog.records if r.name == "qtune.progress"]
    assert len(lines) == 4  # one per advance (interval 0) and one at the end
    assert lines[0].startswith("scoring: 100/300 samples (33%), ")
    assert "samples/s" in lines[0] and "tokens/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("scoring: 300/300 samples (100%)") and "ETA" not in lines[-1]
    assert not any("\r" in line or "\x1b" in line for line in lines)  # no redrawn bars


def test_progress_logs_at_most_once_per_interval(caplog):
    caplog.set_level(logging.INFO, logger="qtune.progress")
    with StepProgress("writing", 1000, interval=3600, live=False) as progress:
        for _ in range(10):
            progress.advance(100)
    lines = [r.getMessage() for r in caplog.records if r.name == "qtune.progress"]
    assert lines == [lines[-1]] and lines[-1].startswith("writing: 1,000/1,000 samples")


def test_stage_timings_rows_per_second_and_round_trip():
    timings = StageTimings()
    timings.add("score", 2.0, 100)
    timings.add("publish", 0.5)
    with timings.stage("triage", rows=10):
        pass
    items = timings.to_list()
    assert [i["stage"] for i in items] == ["score", "publish", "triage"]
    assert items[0]["rows_per_second"] == 50 and items[1]["rows_per_second"] is None
    assert StageTimings.from_list(items).to_list() == items
