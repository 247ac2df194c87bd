"""``rush-hpc top``: a live view of one network - throughput, task counts, per-worker progress.

``TopView.sample()`` reads Redis (a few round trips; finished rows incrementally), ``render()`` is a
pure function of two samples, so the arithmetic (rates, ETA) is tested without a terminal.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .frames import SHORT_ID_LENGTH, format_local

if TYPE_CHECKING:
    from .controller import Rush

#: worker states that mean something went wrong: highlighted in the view
ALERT_STATES = ("lost", "failed", "killed")
_STATE_ORDER = {"running": 0, "launched": 1, "lost": 2, "failed": 3, "killed": 4, "terminated": 5}
MAX_RUNNING_LOOKUP = 10_000  # above this many running tasks, skip the per-worker running count


@dataclass
class WorkerRow:
    worker_id: str
    state: str
    host: str = ""
    pid: str = ""
    finished: int = 0
    running: int = 0
    heartbeat: float | None = None  # Unix time of the last beat (None: no live heartbeat key)
    started: float | None = None
    reason: str = ""


@dataclass
class Sample:
    """What one refresh read from Redis."""

    time: float
    counts: dict[str, int]
    workers: list[WorkerRow] = field(default_factory=list)


@dataclass
class Line:
    text: str
    style: str | None = None  # a rich style for terminals ("bold red"); plain output ignores it


def _seconds(value: Any) -> float | None:
    """A naive-UTC pandas timestamp (or NaT) as Unix seconds."""
    import pandas as pd

    if value is None or pd.isna(value):
        return None
    return float(pd.Timestamp(value).timestamp())


class TopView:
    """Samples one network; keeps the per-worker finished counts and the rate history between samples."""

    def __init__(self, rush: Rush, target: int | None = None, full_ids: bool = False, rows: int = 20,
                 window: int = 10) -> None:
        self.rush, self.target, self.full_ids, self.rows = rush, target, full_ids, rows
        self.finished_by_worker: dict[str, int] = {}
        self._finished_read = 0
        self.history: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def _count_finished(self) -> None:
        """Finished tasks by worker, from the controller's incremental fetch (the one row decoder)."""
        if int(self.rush.redis.llen(self.rush.keys.finished)) < self._finished_read:  # reset meanwhile
            self.rush._clear_task_cache()
        frame = self.rush.fetch_finished_tasks()
        self._finished_read = len(frame)
        counts = frame["worker_id"].value_counts() if len(frame) else {}
        self.finished_by_worker = {str(w): int(n) for w, n in dict(counts).items()}

    def _running_by_worker(self) -> dict[str, int]:
        redis, keys = self.rush.redis, self.rush.keys
        if redis.scard(keys.running) > MAX_RUNNING_LOOKUP:
            return {}
        ids = [i.decode() if isinstance(i, bytes) else i for i in redis.smembers(keys.running)]
        pipe = redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hget(keys.task(task_id), "worker_id")
        counts: dict[str, int] = {}
        for worker_id in pipe.execute():
            if worker_id is not None:
                name = worker_id.decode() if isinstance(worker_id, bytes) else str(worker_id)
                counts[name] = counts.get(name, 0) + 1
        return counts

    def sample(self) -> Sample:
        counts = self.rush.counts()
        self._count_finished()
        running = self._running_by_worker()
        info = self.rush.worker_info
        workers = []
        for row in info.itertuples(index=False):
            reason = str(row.reason).strip().splitlines()[0] if isinstance(row.reason, str) and row.reason else ""
            workers.append(WorkerRow(
                worker_id=row.worker_id, state=str(row.state or "?"),
                host=str(row.hostname if isinstance(row.hostname, str) else row.host or ""),
                pid=str(row.pid or ""), finished=self.finished_by_worker.get(row.worker_id, 0),
                running=running.get(row.worker_id, 0), heartbeat=_seconds(row.heartbeat),
                started=_seconds(row.started_at), reason=reason))
        now = time.time()
        self.history.append((now, counts["finished"]))
        return Sample(now, counts, workers)

    def render(self, sample: Sample, width: int = 80, interval: float | None = None) -> list[Line]:
        return render(sample, list(self.history), target=self.target, full_ids=self.full_ids,
                      rows=self.rows, width=width, network=self.rush.network, interval=interval)


def rate(history: list[tuple[float, int]]) -> float | None:
    """Finished tasks per second between the first and last of ``history`` ((time, finished) pairs)."""
    if len(history) < 2:
        return None
    (t0, n0), (t1, n1) = history[0], history[-1]
    return max(0, n1 - n0) / (t1 - t0) if t1 > t0 else None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def eta_text(finished: int, target: int, speed: float | None, now: float) -> str:
    """``50% of 5,000 · ETA 0:12 (08:15:14 +00:00)`` - or why there is no ETA."""
    if finished >= target:
        return f"reached ({finished:,} of {target:,})"
    done = f"{finished / target:.0%} of {target:,}"
    if not speed:
        return f"{done} · ETA - (no progress yet)"
    seconds = (target - finished) / speed
    if not math.isfinite(seconds) or seconds > 365 * 86400:
        return f"{done} · ETA -"
    return f"{done} · ETA {_duration(seconds)} ({format_local(now + seconds, with_date=False)})"


def render(sample: Sample, history: list[tuple[float, int]], *, target: int | None = None,
           full_ids: bool = False, rows: int = 20, width: int = 80,
           network: str = "", interval: float | None = None) -> list[Line]:
    """The lines of one frame. ``history``: (time, finished) of recent samples, oldest first."""
    c = sample.counts
    every = f" · every {interval:g} s" if interval else ""
    lines = [Line(f"rush-hpc top · {network} · {format_local(sample.time)}{every}", "bold")]
    states: dict[str, int] = {}
    for worker in sample.workers:
        states[worker.state] = states.get(worker.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items(), key=lambda i: _STATE_ORDER.get(i[0], 9)))
    alert = any(s in ALERT_STATES for s in states)
    lines.append(Line(f"workers  {summary or 'none'}", "bold red" if alert else None))
    queued = c["queued"] + c.get("queued_priority", 0)
    lines.append(Line(f"tasks    {queued:,} queued · {c['running']:,} running · {c['finished']:,} finished · "
                      f"{c['failed']:,} failed", "red" if c["failed"] else None))
    last = rate(history[-2:])
    recent = rate(history)
    parts = [f"{last:,.1f} tasks/s (last {history[-1][0] - history[-2][0]:.1f} s)" if last is not None
             else "- tasks/s (measuring)"]
    if recent is not None and len(history) > 2:
        parts.append(f"{recent:,.1f}/s over {history[-1][0] - history[0][0]:.0f} s")
    lines.append(Line("rate     " + " · ".join(parts)))
    if target is not None:
        lines.append(Line("target   " + eta_text(c["finished"], target, recent, sample.time)))
    lines.append(Line(""))
    id_width = 32 if full_ids else SHORT_ID_LENGTH
    header = f"{'worker':<{id_width}}  {'state':<10}  {'host':<12}  {'pid':>7}  {'done':>7}  {'run':>3}  {'beat':>5}  note"
    lines.append(Line(header[:width], "bold"))
    ordered = sorted(sample.workers, key=lambda w: (_STATE_ORDER.get(w.state, 9), -w.finished, w.worker_id))
    for worker in ordered[:rows]:
        beat = f"{max(0.0, sample.time - worker.heartbeat):.1f}s" if worker.heartbeat else "-"
        note = ""
        if worker.state in ("running", "launched") and worker.started:
            note = f"since {format_local(worker.started, with_date=False, with_offset=False)}"
        text = (f"{worker.worker_id[:id_width]:<{id_width}}  {worker.state:<10}  {worker.host[:12]:<12}  "
                f"{worker.pid[:7]:>7}  {worker.finished:>7,}  {worker.running:>3}  {beat:>5}  {note}")
        style = "bold red" if worker.state in ALERT_STATES else "dim" if worker.state == "terminated" else None
        lines.append(Line(text.rstrip(), style))
        if worker.reason and worker.state not in ("running", "launched", "terminated"):
            lines.append(Line(f"{'':{id_width}}  reason: {worker.reason}", style))  # a line of its own: readable
    if not ordered and not c.get("total"):
        lines.append(Line("(no workers and no tasks yet: is --network right?)"))
    if len(ordered) > rows:
        lines.append(Line(f"... and {len(ordered) - rows} more worker(s) (--rows)"))
    return [Line(line.text[:width], line.style) for line in lines]
