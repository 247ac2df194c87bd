"""Elastic workers: a policy thread that keeps the right number of workers alive by itself.

``rush.adapt(minimum, maximum, launcher=..., worker_loop=..., **options)`` starts one thread in the
controller. Every ``interval`` seconds it

1. detects lost workers (their tasks go back to the queue or fail, as always);
2. counts what is waiting (queued + priority tasks) and the workers that are *alive*: running, or
   launched and still starting (a job pending in the scheduler counts: a slow queue does not trigger
   a flood of jobs); workers whose allocation ends within ``lifetime_stagger`` seconds do not count,
   so their replacement is started before they go (long searches across many short SLURM jobs);
3. wants ``max(minimum, min(maximum, busy + waiting))`` workers, where busy = workers holding a task;
4. starts the missing ones with the launcher (``start_<launcher>_workers``); workers that fail before
   they register count as start failures: after ``max_start_failures`` in a row the policy stops with a
   clear error (``rush.adapt_status()``) instead of starting failing jobs in a loop, and between
   failures it backs off (doubling the wait);
5. asks workers that held no task for ``idle_timeout`` seconds to terminate, down to the wanted number.

Its state lives in Redis (``rush:{N}:adapt``), so a second controller and ``rush-hpc status`` see it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from .exceptions import ConfigError, RushError

if TYPE_CHECKING:
    from .controller import Rush

logger = logging.getLogger(__name__)

LAUNCHERS = ("local", "ssh", "slurm", "sbatch")
#: a worker that ran this long counts as a good start; one that failed sooner, as a failed start
HEALTHY_AFTER = 30.0


def _seconds(value: str | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0


class AdaptPolicy(threading.Thread):
    def __init__(self, rush: Rush, minimum: int, maximum: int, launcher: str, worker_loop: Callable[..., Any],
                 interval: float, idle_timeout: float, lifetime_stagger: float, max_start_failures: int,
                 options: dict[str, Any]) -> None:
        super().__init__(name=f"rush-adapt-{rush.network}", daemon=True)
        if launcher not in LAUNCHERS:
            raise ConfigError(f"adapt: launcher must be one of {list(LAUNCHERS)}, got {launcher!r}")
        if not 0 <= minimum <= maximum or maximum < 1:
            raise ConfigError(f"adapt: need 0 <= minimum <= maximum and maximum >= 1, got {minimum}, {maximum}")
        if interval <= 0 or idle_timeout <= 0:
            raise ConfigError("adapt: interval and idle_timeout must be positive seconds")
        self.rush, self.minimum, self.maximum, self.launcher = rush, minimum, maximum, launcher
        self.worker_loop, self.options = worker_loop, options
        self.interval, self.idle_timeout, self.lifetime_stagger = interval, idle_timeout, lifetime_stagger
        self.max_start_failures = max_start_failures
        self.stop_event = threading.Event()
        self.started_ids: list[str] = []  # every worker this policy started
        self.error: str | None = None
        self._idle_since: dict[str, float] = {}
        self._failures_in_a_row = 0
        self._counted_failures: set[str] = set()
        self._replaced: set[str] = set()  # leaving-soon workers whose replacement was started
        self._next_start = 0.0
        self.n_started = 0

    # -- one round ------------------------------------------------------------------------------
    def step(self) -> None:
        rush = self.rush
        rush.detect_lost_workers()
        counts = rush.counts()
        waiting = counts["queued"] + counts["queued_priority"]
        hashes = rush._worker_hashes(rush._ids_in_state("running", "launched"))
        now = time.time()
        # a worker whose allocation ends soon gets ONE replacement (then it counts as alive again),
        # and never more than 2 x maximum workers exist: a job shorter than the stagger cannot
        # make the policy submit without end
        leaving = [w for w, h in hashes.items() if self._leaving_soon(h, now) and w not in self._replaced]
        alive = [w for w in hashes if w not in leaving]
        pipe = rush.redis.pipeline(transaction=False)
        for worker_id in alive:
            pipe.scard(rush.keys.held_tasks(worker_id))
        holding = dict(zip(alive, pipe.execute()))
        busy = sum(1 for n in holding.values() if n)
        wanted = max(self.minimum, min(self.maximum, busy + waiting))
        self._count_start_failures()
        if self.error:
            return
        missing = min(wanted - len(alive), 2 * self.maximum - len(hashes))
        if missing > 0 and time.monotonic() >= self._next_start:
            self._start(missing)
            self._replaced.update(leaving[:missing])
        elif missing < 0:
            self._retire_idle(holding, -missing)
        else:
            self._note_idle(holding)
        self._publish(wanted=wanted, alive=len(alive), busy=busy, waiting=waiting)

    def _leaving_soon(self, info: dict[str, str], now: float) -> bool:
        """A worker whose allocation ends within lifetime_stagger: start its replacement now."""
        try:
            end = float(info.get("job_end") or 0)
        except ValueError:
            return False
        return bool(end) and end - now < self.lifetime_stagger

    def _start(self, n: int) -> None:
        start = getattr(self.rush, f"start_{self.launcher}_workers")
        try:
            if self.launcher == "ssh":
                ids = start(self.worker_loop, n_workers=1, **{**self.options, "hosts": self.options["hosts"][:n]})
            else:
                ids = start(self.worker_loop, n_workers=n, **self.options)
        except RushError as error:
            self._failed_start(f"starting {n} {self.launcher} worker(s) failed: {error}")
            return
        self.started_ids += ids
        self.n_started += len(ids)
        logger.info("adapt: started %d %s worker(s) in network %s", len(ids), self.launcher, self.rush.network)

    def _count_start_failures(self) -> None:
        """Workers of this policy that failed before registering: start failures (a bad setup line,
        a wrong python). Registered workers reset the count."""
        if not self.started_ids:
            return
        hashes = self.rush._worker_hashes(self.started_ids)
        now = time.time()
        for worker_id, info in hashes.items():
            if worker_id in self._counted_failures:
                continue
            started = _seconds(info.get("started_at"))
            if info.get("state") == "failed":  # before registering, or soon after (a loop that raises)
                ended = _seconds(info.get("ended_at")) or now
                if not started or ended - started < HEALTHY_AFTER:
                    self._counted_failures.add(worker_id)
                    self._failed_start(f"worker {worker_id} failed "
                                       f"{'before registering' if not started else 'right after it started'}: "
                                       f"{info.get('reason', '?')}")
                    continue
            if started and (now - started >= HEALTHY_AFTER or info.get("state") == "terminated"):
                self._counted_failures.add(worker_id)
                self._failures_in_a_row = 0

    def _failed_start(self, reason: str) -> None:
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= self.max_start_failures:
            self.error = (f"adapt stopped: {self._failures_in_a_row} worker starts failed in a row; the last: "
                          f"{reason}. Fix the cause (see rush.worker_info / rush.print_log) and call adapt() again")
            logger.error("%s", self.error)
            self._publish()
            self.stop_event.set()
            return
        backoff = min(300.0, self.interval * 2 ** self._failures_in_a_row)
        self._next_start = time.monotonic() + backoff
        logger.warning("adapt: %s; next start in %.0f s", reason, backoff)

    def _note_idle(self, holding: dict[str, int]) -> None:
        now = time.monotonic()
        for worker_id, n in holding.items():
            if n:
                self._idle_since.pop(worker_id, None)
            else:
                self._idle_since.setdefault(worker_id, now)

    def _retire_idle(self, holding: dict[str, int], surplus: int) -> None:
        self._note_idle(holding)
        now = time.monotonic()
        idle = sorted((since, w) for w, since in self._idle_since.items()
                      if w in holding and now - since >= self.idle_timeout)
        retire = [w for _, w in idle[:max(0, surplus)]]
        if retire:
            self.rush.stop_workers(type="terminate", worker_ids=retire)
            for worker_id in retire:
                self._idle_since.pop(worker_id, None)
            logger.info("adapt: asked %d idle worker(s) to terminate", len(retire))

    def _publish(self, **numbers: int) -> None:
        fields = {"minimum": self.minimum, "maximum": self.maximum, "launcher": self.launcher,
                  "interval": self.interval, "idle_timeout": self.idle_timeout, "started": self.n_started,
                  "status": "error" if self.error else ("stopped" if self.stop_event.is_set() else "running"),
                  "error": self.error or "", "controller": f"{socket.gethostname()}:{os.getpid()}",
                  "updated_at": f"{time.time():.3f}", **numbers}
        try:
            self.rush.redis.hset(self.rush.keys.adapt, mapping={k: str(v) for k, v in fields.items()})
        except Exception as error:  # noqa: BLE001 - the state in Redis is for observers only
            logger.debug("adapt: could not publish the state: %s", error)

    def run(self) -> None:
        warned_at = -float("inf")
        while not self.stop_event.is_set():
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 - keep adapting through a Redis outage
                if time.monotonic() - warned_at > 60:
                    logger.warning("adapt: %s: %s (still adapting)", type(error).__name__, error)
                    warned_at = time.monotonic()
            self.stop_event.wait(self.interval)
        self._publish()

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=self.interval + 5)
