"""Progress of long steps and the per-stage timing table.

On a terminal a step shows a live bar with rates and ETA (rich); anywhere else (CI, a Ray job's
log, a file) it writes a plain log line every ``interval`` seconds and one at the end, never a
redrawn bar. ``StageTimings`` records wall time and rows per stage for the summary table and the
manifest.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from types import TracebackType

logger = logging.getLogger("qtune.progress")

LOG_INTERVAL_S = 10.0


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class StepProgress:
    """Progress of one step over ``total`` rows (samples), with a token count beside them."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        unit: str = "samples",
        interval: float = LOG_INTERVAL_S,
        live: bool | None = None,
    ):
        self.label = label
        self.total = total
        self.unit = unit
        self.interval = interval
        self.live = sys.stderr.isatty() if live is None else live
        self.done = 0
        self.tokens = 0
        self._started = time.perf_counter()
        self._last_log = self._started
        self._bar = None
        self._task = None

    def __enter__(self) -> StepProgress:
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rates]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, rates="")
        return self

    def advance(self, rows: int, tokens: int = 0) -> None:
        self.done += rows
        self.tokens += tokens
        now = time.perf_counter()
        if self._bar is not None:
            self._bar.update(self._task, advance=rows, rates=self.rates(now))
        elif now - self._last_log >= self.interval:
            self._last_log = now
            logger.info("%s", self.line(now))

    def rates(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self._started, 1e-9)
        text = f"{self.done / elapsed:,.1f} {self.unit}/s"
        if self.tokens:
            text += f", {self.tokens / elapsed:,.0f} tokens/s"
        return text

    def line(self, now: float | None = None) -> str:
        now = now or time.perf_counter()
        elapsed = now - self._started
        share = self.done / self.total if self.total else 1.0
        eta = elapsed / share - elapsed if share > 0 else float("nan")
        return (
            f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({share:.0%}), "
            f"{self.rates(now)}, elapsed {_duration(elapsed)}"
            + (f", ETA {_duration(eta)}" if self.done < self.total and share > 0 else "")
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif exc_type is None:
            logger.info("%s", self.line())


@dataclass
class StageTiming:
    stage: str
    seconds: float
    rows: int | None = None

    @property
    def rows_per_second(self) -> float | None:
        if self.rows is None or self.seconds <= 0:
            return None
        return self.rows / self.seconds


@dataclass
class StageTimings:
    """Wall time (and rows) per stage, in order: ``with timings.stage("score", rows=n): ...``."""

    stages: list[StageTiming] = field(default_factory=list)

    def add(self, stage: str, seconds: float, rows: int | None = None) -> None:
        self.stages.append(StageTiming(stage, seconds, rows))

    def stage(self, name: str, rows: int | None = None) -> _Timer:
        return _Timer(self, name, rows)

    def to_list(self) -> list[dict]:
        return [{**asdict(s), "rows_per_second": s.rows_per_second} for s in self.stages]

    @classmethod
    def from_list(cls, items: list[dict]) -> StageTimings:
        return cls([StageTiming(i["stage"], i["seconds"], i.get("rows")) for i in items])


class _Timer:
    def __init__(self, timings: StageTimings, name: str, rows: int | None):
        self.timings, self.name, self.rows = timings, name, rows

    def __enter__(self) -> _Timer:
        self.started = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.timings.add(self.name, time.perf_counter() - self.started, self.rows)
