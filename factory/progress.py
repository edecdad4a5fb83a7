"""Progress of a long run, for a person at a terminal and for a log file alike.

At a terminal: a rich bar with accepted/requested, attempts, acceptance, records per second, elapsed
time and an ETA. Anywhere else (CI logs, `nohup`, a pipe): one plain line on stderr at most every
`interval` seconds (FACTORY_PROGRESS_INTERVAL, default 10) and one at the end, e.g.
`generate: 12,000 of 100,000 records (12.0%), 13,010 attempts, 1,234 records/s, ETA 1m 11s`.
Rates count only this process's work, so a resumed run's ETA is not skewed by its earlier part.
"""
from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    return f"{m}m {s:02d}s" if m < 60 else f"{m // 60}h {m % 60:02d}m"


class RunProgress:
    """`with RunProgress(total, done, attempted, enabled) as p: ... p.update(done, attempted)`."""

    def __init__(self, total: int, done: int = 0, attempted: int = 0, enabled: bool = True,
                 label: str = "generate", stream=None, interval: float | None = None):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream)
        self.terminal = enabled and self.console.is_terminal
        if interval is None:
            try:
                interval = float(os.environ.get("FACTORY_PROGRESS_INTERVAL", 10))
            except ValueError:
                interval = 10.0
        self.interval = interval
        self.start_done, self.done, self.attempted = done, done, attempted
        self.started = self.last_line = time.monotonic()
        self._bar: Progress | None = None

    def __enter__(self) -> RunProgress:
        if self.terminal:
            self._bar = Progress(
                TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                TextColumn("attempted {task.fields[attempted]:,}  acceptance {task.fields[rate]:.1%}  "
                           "{task.fields[speed]:,.0f} records/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.done,
                                            **self._fields())
        return self

    def _fields(self) -> dict:
        return {"attempted": self.attempted, "rate": self.done / max(1, self.attempted), "speed": self.speed}

    @property
    def speed(self) -> float:
        """Records per second accepted by this process so far."""
        return (self.done - self.start_done) / max(1e-9, time.monotonic() - self.started)

    def eta(self) -> float | None:
        return (self.total - self.done) / self.speed if self.speed > 0 else None

    def line(self) -> str:
        eta = self.eta()
        return (f"{self.label}: {self.done:,} of {self.total:,} records ({self.done / max(1, self.total):.1%}), "
                f"{self.attempted:,} attempts, {self.speed:,.0f} records/s, "
                + (f"ETA {_duration(eta)}" if eta is not None else "ETA unknown")
                + f", elapsed {_duration(time.monotonic() - self.started)}")

    def update(self, done: int, attempted: int) -> None:
        self.done, self.attempted = done, attempted
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=done, **self._fields())
        elif time.monotonic() - self.last_line >= self.interval:
            self.last_line = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled and exc[0] is None:
            print(self.line(), file=self.stream, flush=True)
