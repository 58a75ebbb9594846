"""Progress of the long loops (epochs, batches, labeling, decoding files), with rate and
ETA: a live bar on a terminal, a plain log line every ``interval`` seconds elsewhere (CI
logs, files: no carriage returns), nothing when quiet or on a rank other than 0.

One switch, :func:`configure`; the loops only wrap their iterables in :func:`track` (or
hold a :func:`bar` and advance it by any amount)."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Settings:
    quiet: bool = False
    interval: float = 30.0  # seconds between plain lines when stderr is not a terminal
    # A bar that finishes within this many seconds is erased: short steps leave no trace.
    keep_after: float = 2.0


_settings = _Settings()


def configure(
    quiet: bool | None = None, interval: float | None = None, keep_after: float | None = None
) -> None:
    """The switch: ``quiet`` shows nothing (``-q``); ``interval`` spaces the plain lines
    written when stderr is not a terminal; ``keep_after`` is the shortest bar left on
    screen once done."""
    if quiet is not None:
        _settings.quiet = quiet
    if interval is not None:
        _settings.interval = interval
    if keep_after is not None:
        _settings.keep_after = keep_after


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _console() -> Console:
    return Console(stderr=True)


def _speed(task: Task) -> float | None:
    """Rich's recent rate, else the average since the start (rich needs two updates within
    its window, which slow steps such as epochs do not give)."""
    speed = task.finished_speed or task.speed
    if speed is None and task.completed and task.elapsed:
        speed = task.completed / task.elapsed
    return speed


class _RateColumn(ProgressColumn):
    """Items per second (per minute when slower than one a second)."""

    def render(self, task: Task) -> Text:
        speed, unit = _speed(task), task.fields.get("unit", "it")
        if speed is None:
            text = f"? {unit}/s"
        elif speed < 1:
            text = f"{speed * 60:.1f} {unit}/min"
        else:
            text = f"{speed:.1f} {unit}/s"
        return Text(text, style="progress.data.speed")


class _EtaColumn(ProgressColumn):
    """Time left at the present rate."""

    def render(self, task: Task) -> Text:
        speed = _speed(task)
        if task.finished:
            left: float | None = 0.0
        elif speed and task.total is not None:
            left = (task.total - task.completed) / speed
        else:
            left = None
        return Text(f"eta {_clock(left)}", style="progress.remaining")


class _Live:
    """The one live display on a terminal; nested bars are its rows, removed when done."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            _EtaColumn(),
            console=_console(),
        )
        self.depth = 0
        self.handlers: list[logging.StreamHandler] = []

    def start(self) -> None:
        stderr = sys.stderr
        self.progress.start()
        # Log lines go above the bar, as rich does for print(): through its stderr proxy.
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler and handler.stream is stderr:
                handler.setStream(sys.stderr)
                self.handlers.append(handler)

    def stop(self, erase: bool) -> None:
        self.progress.live.transient = erase
        self.progress.stop()
        for handler in self.handlers:
            handler.setStream(sys.stderr)


_live: _Live | None = None


class Bar:
    """What :func:`bar` gives: ``advance`` it as work gets done (this one shows nothing)."""

    def advance(self, amount: float = 1) -> None:
        pass


class _RichBar(Bar):
    def __init__(self, live: _Live, task: TaskID) -> None:
        self.live, self.task = live, task

    def advance(self, amount: float = 1) -> None:
        self.live.progress.advance(self.task, amount)


class _Lines(Bar):
    """A plain line at most every ``interval`` seconds: count, rate, ETA."""

    def __init__(self, description: str, total: float | None, unit: str) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.start = self.last = time.monotonic()
        self.done = 0.0
        self.written = False

    def advance(self, amount: float = 1) -> None:
        self.done += amount
        now = time.monotonic()
        if now - self.last >= _settings.interval:
            self.last = now
            self.written = True
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done:g}" + (f"/{self.total:g}" if self.total is not None else "")
        text = f"{self.description}: {count} {self.unit}, {rate:.1f} {self.unit}/s"
        if self.total is not None:
            remaining = (self.total - self.done) / rate if rate > 0 else math.inf
            text += f", elapsed {_clock(elapsed)}, eta {_clock(remaining)}"
        return text

    def finish(self) -> None:
        if self.written:  # a loop that reported progress also reports its end
            log.info("%s", self.line(time.monotonic()))


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _terminal() -> bool:
    console = _console()
    return console.is_terminal and not console.is_dumb_terminal


@contextmanager
def bar(description: str, total: float | None = None, unit: str = "it") -> Iterator[Bar]:
    """A progress bar to ``advance(amount)``: a row of the live display on a terminal
    (nested bars share it), plain periodic lines otherwise, nothing when quiet or off
    rank 0."""
    global _live
    if _settings.quiet or _rank() != 0:
        yield Bar()
        return
    if not _terminal():
        lines = _Lines(description, total, unit)
        yield lines
        lines.finish()
        return
    outer = _live is None
    if outer:
        _live = _Live()
        _live.start()
    live = _live
    task = live.progress.add_task(description, total=total, unit=unit)
    live.depth += 1
    try:
        yield _RichBar(live, task)
    finally:
        live.depth -= 1
        if outer:
            [done] = [t for t in live.progress.tasks if t.id == task]
            elapsed = done.elapsed or 0.0
            live.stop(erase=elapsed < _settings.keep_after)
            _live = None
        else:
            live.progress.remove_task(task)


def track(
    items: Iterable[T], description: str, total: float | None = None, unit: str = "it"
) -> Iterator[T]:
    """``items``, one by one, counted on a :func:`bar` (``total`` defaults to their
    ``len``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(description, total, unit) as progress:
        for item in items:
            yield item
            progress.advance(1)
