"""Progress of long work on stderr: a rich bar on a terminal, plain lines at an interval elsewhere.

A job without a terminal (CI, SLURM, ``nohup``, a pipe) gets no live bar — rich draws nothing
until the end there — so it gets one plain line every ``$MAXA_PROGRESS_S`` seconds (default 30)
and one at the end of work that lasted that long, each complete on its own (a log reader sees
the rate and the ETA):

    extract vit_b16 coco/train: 1,536/5,000 img (31%), 85.2 img/s, elapsed 18s, eta 41s

Extraction, target building and probe training (steps/s, loss) and evaluation use it.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from runtime import settings

__all__ = ["ProgressReporter", "format_duration"]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressReporter:
    """``with ProgressReporter("extract", total) as p: p.advance(n)``.

    Args:
        description: what is being done (the line's start).
        total: units in all.
        enabled: ``False``: silent.
        unit: what is counted (``img``).
        transient: on a terminal, remove the bar when done (a probe epoch's bar).
        stream: where to write (default: stderr); a terminal gets a bar, anything else lines.
        interval_s: seconds between lines (default ``$MAXA_PROGRESS_S``).
    """

    def __init__(self, description: str, total: int, *, enabled: bool = True, unit: str = "img",
                 transient: bool = False, stream: TextIO | None = None, interval_s: float | None = None) -> None:
        self.description, self.total, self.unit = description, int(total), unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = settings.progress_s() if interval_s is None else interval_s
        self.done = 0
        self.fields: dict[str, str] = {}
        self._bar: Any = None
        self._task: Any = None
        self._start = self._last = 0.0
        if enabled and _is_terminal(self.stream):
            self._bar = _rich_bar(self.stream, transient)
            self._task = self._bar.add_task(description, total=total, rate="")

    @property
    def lines(self) -> bool:
        """Whether this reporter prints plain lines (enabled, not on a terminal)."""
        return self.enabled and self._bar is None

    def __enter__(self) -> "ProgressReporter":
        self._start = self._last = time.monotonic()
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.lines and exc_type is None and time.monotonic() - self._start >= self.interval_s:
            self._line(final=True)  # a pass shorter than the interval stays silent

    def advance(self, n: int, **fields: Any) -> None:
        """``n`` more units done; ``fields`` (``loss=0.12``) are shown beside the rate."""
        if not self.enabled:
            return
        self.done += n
        self.fields.update({k: (f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in fields.items()})
        if self._bar is not None:
            self._bar.advance(self._task, n)
            speed = self._bar.tasks[0].speed
            extra = "".join(f"  {k} {v}" for k, v in self.fields.items())
            self._bar.update(self._task, rate=(f"{speed:,.1f} {self.unit}/s" if speed else "") + extra)
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._line(final=False)

    def _line(self, final: bool) -> None:
        elapsed = time.monotonic() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.description}: {self.done:,}/{self.total:,} {self.unit}{pct}"]
        parts.append(f"{rate:,.1f} {self.unit}/s" if rate else f"0 {self.unit}/s")
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        parts.append(f"elapsed {format_duration(elapsed)}")
        if final:
            parts.append("done")
        elif rate and self.total:
            parts.append(f"eta {format_duration((self.total - self.done) / rate)}")
        print(", ".join(parts), file=self.stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _rich_bar(stream: TextIO, transient: bool) -> Any:
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=Console(file=stream), transient=transient)
