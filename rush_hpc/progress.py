"""Progress display for the waits and the demos, drawn with ``rich`` on a terminal only.

``progress=None`` (the default everywhere) means: show it when stderr is a terminal, and not in
CI, under pytest, with ``TERM=dumb`` or ``RUSH_HPC_PROGRESS=0``; ``True`` / ``False`` force it.
Nothing is ever written to logs or pipes unless forced. Usage::

    with progress.tracker(total=len(keys), description="tasks", progress=None) as bar:
        while ...:
            bar.update(done=n_done, extra="3 running")

``tracker`` returns a no-op when the display is off, so callers never branch on it.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import IO, Any, Iterator

_OFF = ("0", "false", "no", "off")


def enabled(progress: bool | None = None, stream: IO[str] | None = None) -> bool:
    """Whether to draw: ``progress`` if given, else only on an interactive terminal outside CI/pytest."""
    if progress is not None:
        return bool(progress)
    setting = os.environ.get("RUSH_HPC_PROGRESS", "").strip().lower()
    if setting in _OFF:
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    if os.environ.get("CI") or "PYTEST_CURRENT_TEST" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class Tracker:
    """What ``tracker()`` yields: ``update(done=..., total=..., extra=...)``; silent when off."""

    def __init__(self, total: int | None, description: str, bar: Any = None) -> None:
        self.total, self.description, self.done, self.extra = total, description, 0, ""
        self._bar = bar
        self._task: Any = None
        self.started = time.monotonic()

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def update(self, done: int | None = None, total: int | None = None, extra: str | None = None,
               advance: int = 0) -> None:
        """Set the count (``done``) or add to it (``advance``); ``extra``: a short status text."""
        if done is not None:
            self.done = done
        self.done += advance
        if total is not None:
            self.total = total
        if extra is not None:
            self.extra = extra
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total, extra=self.extra)

    def rate(self) -> float:
        """Counted units per second since the tracker started."""
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0


@contextmanager
def tracker(total: int | None, description: str = "", progress: bool | None = None, unit: str = "tasks",
            stream: IO[str] | None = None) -> Iterator[Tracker]:
    """A progress bar for ``total`` units (None: unknown), removed from the screen when done."""
    target = stream if stream is not None else sys.stderr
    if not enabled(progress, target):
        yield Tracker(total, description)
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = Console(file=target, force_terminal=True if progress else None)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[extra]}")]
    with Progress(*columns, console=console, transient=True, refresh_per_second=8) as bar:
        state = Tracker(total, description, bar)
        state._task = bar.add_task(description, total=total, extra="")
        yield state
