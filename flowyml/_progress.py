"""The live progress display of ``run(progress=True)`` (or ``FLOWYML_PROGRESS=1``), on stderr.

It is an ordinary event listener (plain function, so it only updates counters on the loop)
plus one task that redraws. Three forms:

- stderr is a terminal and ``rich`` is installed (``pip install "flowyml[progress]"``): a
  ``rich.live.Live`` region. rich handles what a hand-written display gets wrong: terminal width
  and cropping, Jupyter (the display becomes a widget), Windows consoles, and text that steps
  print meanwhile (written above the display rather than through it).
- stderr is a terminal without ``rich``: the same lines, redrawn in place with two ANSI escapes
  (cursor up, erase below), cropped to the terminal's width.
- stderr is not a terminal (a log file, CI): one plain line every :data:`PLAIN_INTERVAL` seconds.

The terminal forms redraw at most 10 times a second and are erased when the run ends; every
form ends with the run's one-line summary. The display shows counts of done / running / cached
/ failed steps of the total, steps per second, elapsed and estimated remaining time, the
longest-running steps and, for steps that map over items, their items' progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections import Counter
from typing import Any, Final, Protocol, TextIO

from ._report import PipelineResult
from ._results import StepStatus
from .events import Event, ItemsProgress, RunStarted, StepFinished, StepStarted

__all__ = ("PLAIN_INTERVAL", "Progress", "progress_wanted", "summary_line")

REDRAW_INTERVAL: Final = 0.1
"""Seconds between redraws of a terminal display: at most 10 a second."""

PLAIN_INTERVAL: Final = 5.0
"""Seconds between lines when stderr is not a terminal."""

_LONGEST: Final = 3
_FAILED = frozenset({StepStatus.FAILED, StepStatus.TIMED_OUT})


def summary_line(result: PipelineResult) -> str:
    """``run 3f2a… of 'train' completed in 4.20s: 10 succeeded, 2 cached, cache saved 31.00s``.

    The line the display leaves behind, and the INFO record that ends every run.
    """
    counts = Counter(r.status for r in result.step_results.values())
    parts = [f"{counts[s]} {s.value.replace('_', ' ')}" for s in _ORDER if counts[s]]
    saved = result.time_saved_seconds
    if saved > 0:
        parts.append(f"cache saved {saved:.2f}s")
    return (
        f"run {result.run_id} of {result.pipeline_name!r} {result.state} in "
        f"{result.duration_seconds:.2f}s: {', '.join(parts) or 'no steps'}"
    )


_ORDER = (
    StepStatus.SUCCEEDED,
    StepStatus.CACHED,
    StepStatus.FAILED,
    StepStatus.TIMED_OUT,
    StepStatus.CANCELLED,
    StepStatus.SKIPPED,
    StepStatus.PENDING,
)


def progress_wanted(progress: bool | None) -> bool:
    """``progress=`` if given, else whether ``FLOWYML_PROGRESS`` is set to a true value."""
    if progress is not None:
        return bool(progress)
    return os.environ.get("FLOWYML_PROGRESS", "").strip().lower() in {"1", "true", "yes", "on"}


class Progress:
    """Counts a run's events and draws them; see the module docstring."""

    def __init__(self, pipeline: str, stream: TextIO | None = None) -> None:
        self.pipeline = pipeline
        self.total = 0
        self.done = 0
        self.cached = 0
        self.failed = 0
        self.running: dict[str, float] = {}
        self.items: dict[str, tuple[int, int, int | None]] = {}
        self._stream = stream
        self._t0 = time.monotonic()
        self._screen: _Screen | None = None
        self._task: asyncio.Task[None] | None = None
        self._dirty = True

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepStarted):
            self.running[event.step] = event.time
        elif isinstance(event, StepFinished):
            self.running.pop(event.step, None)
            self.done += 1
            if event.cached:
                self.cached += 1
            elif event.status in _FAILED:
                self.failed += 1
        elif isinstance(event, ItemsProgress):
            self.items[event.step] = (event.done, event.failed, event.total)
        elif isinstance(event, RunStarted):
            self.total = event.steps
            self._t0 = event.time
        self._dirty = True

    def lines(self, now: float | None = None) -> list[str]:
        """What the display shows now, as plain text lines."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._t0, 1e-9)
        rate = self.done / elapsed
        left = self.total - self.done
        eta = f"~{_clock(left / rate)} left" if rate > 0 and left > 0 else "-- left"
        lines = [
            f"{self.pipeline}: {self.done}/{self.total} done, {len(self.running)} running, "
            f"{self.cached} cached, {self.failed} failed | {rate:.1f} steps/s | "
            f"{_clock(elapsed)} elapsed, {eta}"
        ]
        if self.running:
            longest = sorted(self.running.items(), key=lambda kv: kv[1])[:_LONGEST]
            lines.append("  running: " + ", ".join(f"{name} {now - t:.1f}s" for name, t in longest))
        for name, (done, failed, total) in self.items.items():
            if name in self.running:
                failing = f" ({failed} failed)" if failed else ""
                lines.append(f"  items: {name} {done}/{'?' if total is None else total}{failing}")
        return lines

    async def start(self) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        if stream is None:  # no stderr at all (pythonw, some services): nothing to draw on
            return
        self._stream = stream
        terminal = _is_terminal(stream)
        if terminal:
            self._screen = _rich_screen(stream) or _AnsiScreen(stream)
        else:
            self._screen = _PlainLines(stream)
        interval = REDRAW_INTERVAL if terminal else PLAIN_INTERVAL
        self._task = asyncio.get_running_loop().create_task(self._redraw(interval), name="flowyml-progress")

    async def stop(self, result: PipelineResult | None) -> None:
        """Stop redrawing, erase the display and leave the run's summary line."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._screen is not None:
            text = summary_line(result) if result is not None else f"run of {self.pipeline!r} cancelled"
            self._screen.close(text)
            self._screen = None

    async def _redraw(self, interval: float) -> None:
        assert self._screen is not None
        screen = self._screen
        last = 0.0
        while True:
            now = time.monotonic()
            if self._dirty or now - last >= 1.0 or isinstance(screen, _PlainLines):
                self._dirty = False
                last = now
                screen.draw(self.lines(now))
            await asyncio.sleep(interval)


class _Screen(Protocol):
    def draw(self, lines: list[str]) -> None: ...
    def close(self, summary: str) -> None: ...


class _AnsiScreen:
    """Redraws lines in place with cursor-up and erase-below; no library needed."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._drawn = 0

    def _erase(self) -> str:
        return f"\x1b[{self._drawn}A\r\x1b[J" if self._drawn else "\r\x1b[J"

    def draw(self, lines: list[str]) -> None:
        width = max(shutil.get_terminal_size((80, 24)).columns - 1, 20)
        text = "".join(line[:width] + "\n" for line in lines)
        self._stream.write(self._erase() + text)
        self._stream.flush()
        self._drawn = len(lines)

    def close(self, summary: str) -> None:
        self._stream.write(self._erase() + summary + "\n")
        self._stream.flush()
        self._drawn = 0


class _RichScreen:
    """The display as a transient ``rich.live.Live`` region, refreshed only when we draw."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self._text = Text
        self._console = Console(file=stream)
        self._live = Live(console=self._console, auto_refresh=False, transient=True)
        self._live.start()

    def draw(self, lines: list[str]) -> None:
        self._live.update(self._text("\n".join(lines), no_wrap=True, overflow="ellipsis"), refresh=True)

    def close(self, summary: str) -> None:
        self._live.stop()
        self._console.print(summary, markup=False, highlight=False, soft_wrap=True)


class _PlainLines:
    """One full line per draw, for logs and CI."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def draw(self, lines: list[str]) -> None:
        self._stream.write(f"flowyml: {lines[0]}\n")
        self._stream.flush()

    def close(self, summary: str) -> None:
        self._stream.write(f"flowyml: {summary}\n")
        self._stream.flush()


def _rich_screen(stream: TextIO) -> _RichScreen | None:
    try:
        return _RichScreen(stream)
    except ImportError:
        return None


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
