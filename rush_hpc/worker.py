"""``RushWorker``: what a worker loop gets as ``rush`` - create, pop, finish and fail tasks."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .config import RedisConfig, resolve_config
from .credentials import resolve_secret
from .exceptions import ConfigError, TaskError, WorkerNotRunningError
from .frames import reserved_columns
from .walltime import DEFAULT_WALLTIME_MARGIN, seconds_left
from .network import RushNetwork, _as_list_of_dicts, _extras, _key_list, new_task_id, text
from .states import set_worker_state  # noqa: F401 - re-exported: it moved to states.py

logger = logging.getLogger(__name__)

#: column names a result dict may not use (``check_user_columns`` refuses them with a clear message)
_RESULT_RESERVED = frozenset(reserved_columns("yss"))


@dataclass(frozen=True)
class Task:
    """A task popped from a queue: ``key`` to report its result, ``xs`` its inputs."""

    key: str
    xs: dict[str, Any]


class RushWorker(RushNetwork):
    """A worker of a network. Usable in-process, and what a launched worker's loop receives.

    ``RushWorker(network="n", url="redis://...")`` connects; ``register()`` makes it show up as a
    running worker (the bootstrap does this for launched workers).
    """

    _single_connection = True

    def __init__(self, network: str, url: str | None = None, *, config: RedisConfig | None = None,
                 worker_id: str | None = None, secret: str | bytes | None = None) -> None:
        resolved = resolve_config(url, config)
        if resolved is None:
            raise ConfigError("RushWorker needs a Redis: pass url=..., config=... or set RUSH_HPC_URL")
        super().__init__(network, resolved, resolve_secret(secret))
        self.worker_id = worker_id or uuid.uuid4().hex
        self._fence_id = self.worker_id
        self.pid = os.getpid()
        self._terminated = threading.Event()
        self._heartbeat: Any = None
        self._default_extra = {"pid": self.pid}
        self._default_extra_blob = self.codec.encode(self._default_extra)
        self._create_running_keys = [self.keys.all_tasks, self.keys.running, self.keys.worker(self.worker_id),
                                     self.keys.held_tasks(self.worker_id)]
        self._n_finished_seen: int | None = None
        self._pending_pop: str | None = None
        #: pop request ids: a random prefix (72 bits) and a counter, unique among this worker's calls
        self._pop_prefix, self._pop_count = new_task_id()[:12], 0
        #: the end of this worker's allocation (epoch seconds; the bootstrap asks SLURM), None: no limit
        self.job_end: float | None = None
        #: stop taking tasks this many seconds before ``job_end``
        self.walltime_margin = DEFAULT_WALLTIME_MARGIN
        #: the scheduler's time-limit signal arrived (the job script's --signal)
        self.walltime_signalled = False

    # -- lifecycle -----------------------------------------------------------------------------
    def register(self, **info: Any) -> None:
        """Record this worker as running, with its pid, host and Python (plus ``info``)."""
        fields = {"worker_id": self.worker_id, "pid": self.pid, "hostname": socket.gethostname(),
                  "python": sys.version.split()[0], "started_at": time.time(),
                  "process_started_at": f"{process_start_time():.3f}", **info}
        fields = {k: str(v) for k, v in fields.items() if v is not None}
        if self.set_state("running", ("", "launched"), **fields) is None:
            state = self.redis.hget(self.keys.worker(self.worker_id), "state")
            if state != b"running":  # else: a re-sent registration
                raise WorkerNotRunningError(self.worker_id, text(state) if state else "gone")
        logger.info("worker %s registered (pid %s on %s)", self.worker_id, self.pid, fields["hostname"])

    def set_state(self, state: str, allowed: Iterable[str] | str = "*", /, **fields: Any) -> str | None:
        """Atomically move this worker to ``state``; returns the previous state or None if refused."""
        return set_worker_state(self, self.worker_id, state, allowed, **fields)

    @property
    def terminated(self) -> bool:
        """True once the controller asked this worker to stop (or SLURM's time limit is near).

        With a heartbeat the request arrives by itself (a signal or the heartbeat thread); without
        one, this reads the worker's control list (one round trip).
        """
        if self._terminated.is_set():
            return True
        if self.job_end is not None and self.near_walltime:
            logger.info("worker %s: %.0f s of its allocation left: terminating", self.worker_id, self.time_left)
            self._terminated.set()
        elif self._heartbeat is not None and self._heartbeat.terminate_requested():
            self._terminated.set()
        elif self._heartbeat is None or not self._heartbeat.is_alive():
            messages = self.redis.lrange(self.keys.control(self.worker_id), 0, -1)
            if b"terminate" in messages or b"kill" in messages:
                self._terminated.set()
        return self._terminated.is_set()

    def _on_refused(self, state: str) -> None:
        self._terminated.set()

    @property
    def time_left(self) -> float | None:
        """Seconds until this worker's allocation ends (SLURM walltime), None without a limit."""
        return seconds_left(self.job_end)

    @property
    def near_walltime(self) -> bool:
        """True within ``walltime_margin`` seconds of the allocation's end: start no new work. The
        worker's ``pop_task`` returns None then, and ``terminated`` becomes True."""
        left = seconds_left(self.job_end)
        return left is not None and left <= self.walltime_margin

    def terminate(self) -> None:
        """Make ``terminated`` true in this process (signal handlers and the heartbeat use this)."""
        self._terminated.set()

    # -- tasks ---------------------------------------------------------------------------------
    def push_running_tasks(self, xss: Sequence[Mapping[str, Any]], extra: Any = None) -> list[str]:
        """Create tasks that this worker evaluates right now (state "running"); returns their keys."""
        xss = _as_list_of_dicts(xss, "xss")
        if extra is not None:
            extras = [{**self._default_extra, **(e or {})} for e in _extras(extra, len(xss))]
            return self._create_tasks(xss, extras, state="running")
        # the hot path: the constant pid extra (encoded once), a script with only the keys it needs
        encode = self.codec.encode
        values = [encode(xs) for xs in xss]
        pending = self._pending_create
        call = ("running", self._default_extra_blob, values)
        ids = pending[1] if pending is not None and pending[0] == call else [new_task_id() for _ in xss]
        self._pending_create = (call, ids)
        args: list[Any] = [self.keys.task_prefix, self.worker_id, self._default_extra_blob]
        for task_id, blob in zip(ids, values):
            args += [task_id, blob]
        if ids:
            self._script("CREATE_RUNNING_TASKS", self._create_running_keys, args)
        self._pending_create = None
        return ids

    def pop_task(self, timeout: float | None = None, fields: Any = None) -> Task | None:
        """Take the next queued task (own priority queue first) and mark it running.

        Waits up to ``timeout`` seconds for one (None: return at once) blocked in Redis, not polling:
        creating or requeueing a task wakes a waiting worker at once. Returns None when none came.
        Returns None at once near the end of the allocation (``near_walltime``): no task is started
        that cannot finish. Raises ``WorkerNotRunningError`` when this worker may no longer take tasks.
        """
        if self.job_end is not None and self.near_walltime:
            return None
        keys = self.keys
        script_keys = [keys.priority(self.worker_id), keys.queued, keys.running, keys.worker(self.worker_id),
                       keys.held_tasks(self.worker_id)]
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            popped = self._script("POP_TASK", script_keys, [keys.task_prefix, self.worker_id, self._pop_request()])
            self._pending_pop = None
            if popped:
                return self._task(popped)
            remaining = deadline - time.monotonic() if deadline is not None else 0.0
            if remaining <= 0 or self.terminated:
                return None
            # sleep in Redis until a task is created or requeued (slices of 1 s to notice terminate)
            self.redis.blpop([keys.worker_wake(self.worker_id), keys.wake], timeout=max(0.01, min(remaining, 1.0)))

    def _pop_request(self) -> str:
        """The request id of the next pop: a re-sent call (lost reply, redis-py's retry) and the next
        call after one that raised both repeat the pending id, and so get the task it popped."""
        if self._pending_pop is None:
            self._pop_count += 1  # kept in the task it pops; only this worker's held tasks are searched
            self._pending_pop = f"{self._pop_prefix}{self._pop_count:x}"
        return self._pending_pop

    def _task(self, popped: list[bytes]) -> Task:
        return Task(key=popped[0].decode(), xs=self.codec.decode(popped[1], "task xs"))

    def push_results(self, keys: str | Iterable[str], yss: Sequence[Mapping[str, Any]],
                     extra: Any = None) -> list[str]:
        """Finish running tasks with their results; returns the keys whose results were discarded.

        A result for a task that is no longer running or no longer held by this worker (failed or
        requeued meanwhile, e.g. because this worker was declared lost) is discarded with a warning:
        the first state change wins. Safe to re-send: a repeat reports the tasks as finished.
        """
        args = self._finish_args(keys, yss, extra)
        self._n_finished_seen, *discarded = self._script(
            "FINISH_TASKS", [self.keys.running, self.keys.finished, self.keys.worker(self.worker_id),
                             self.keys.held_tasks(self.worker_id)], args)
        return self._report_discarded(discarded, "results")

    def finish_and_pop(self, keys: str | Iterable[str], yss: Sequence[Mapping[str, Any]], extra: Any = None,
                       timeout: float | None = None) -> Task | None:
        """``push_results`` and then ``pop_task(timeout)`` in ONE round trip (a queue worker's step).

        Discarded results are logged as by ``push_results``. Returns the next task, or None when the
        queues stay empty for ``timeout`` seconds.
        """
        if self.job_end is not None and self.near_walltime:
            self.push_results(keys, yss, extra)
            return None
        finish = self._finish_args(keys, yss, extra)
        new_request = self._pending_pop is None  # no earlier call carried it (see FINISH_AND_POP)
        args = [*finish[:2], self._pop_request(), "1" if new_request else "0", *finish[2:]]
        self._n_finished_seen, discarded, popped = self._script(
            "FINISH_AND_POP", [self.keys.running, self.keys.finished, self.keys.worker(self.worker_id),
                               self.keys.held_tasks(self.worker_id), self.keys.priority(self.worker_id),
                               self.keys.queued], args)
        self._pending_pop = None
        self._report_discarded(discarded, "results")
        if popped:
            return self._task(popped)
        return self.pop_task(timeout) if timeout else None

    def _finish_args(self, keys: str | Iterable[str], yss: Sequence[Mapping[str, Any]], extra: Any) -> list[Any]:
        # the hot path: one key, one plain dict of results, no extra (the same checks, made directly)
        if extra is None and type(yss) is list and len(yss) == 1 and type(yss[0]) is dict \
                and _RESULT_RESERVED.isdisjoint(yss[0]):
            key = keys if type(keys) is str else keys[0] if type(keys) is list and len(keys) == 1 else None
            if type(key) is str:
                return [self.keys.task_prefix, self.worker_id, key, self.codec.encode(yss[0]), b""]
        keys = _key_list(keys)
        yss = _as_list_of_dicts(yss, "yss")
        if len(keys) != len(yss):
            raise TaskError(f"push_results got {len(keys)} keys but {len(yss)} results; "
                            "give one result dict per key")
        extras = _extras(extra, len(keys))
        encode = self.codec.encode
        args: list[Any] = [self.keys.task_prefix, self.worker_id]
        for key, ys, ys_extra in zip(keys, yss, extras):
            args += [key, encode(ys), encode(ys_extra) if ys_extra else b""]
        return args

    @property
    def n_finished_tasks(self) -> int:
        """Finished tasks of the network.

        Right after this worker finished tasks (``push_results`` / ``finish_and_pop``), the first
        read returns the count that call saw in Redis, without another round trip (the vignette
        loop's ``while rush.n_finished_tasks < n``); any other read asks Redis.
        """
        count, self._n_finished_seen = self._n_finished_seen, None
        return int(self.redis.llen(self.keys.finished)) if count is None else int(count)

    def push_failed(self, keys: str | Iterable[str], conditions: Sequence[Mapping[str, Any]] | None = None
                    ) -> list[str]:
        """Mark running (or queued) tasks failed with a condition such as ``{"message": "..."}``."""
        keys = _key_list(keys)
        conds = ([{"message": "failed"}] * len(keys) if conditions is None
                 else _as_list_of_dicts(conditions, "conditions"))
        if len(conds) != len(keys):
            raise TaskError(f"push_failed got {len(keys)} keys but {len(conds)} conditions")
        args: list[Any] = [self.keys.task_prefix, self.worker_id]
        for key, condition in zip(keys, conds):
            args += [key, self.codec.encode(condition)]
        discarded = self._script(
            "FAIL_TASKS", [self.keys.running, self.keys.failed, self.keys.queued, self.keys.worker(self.worker_id),
                           self.keys.held_tasks(self.worker_id)], args)
        return self._report_discarded(discarded, "failure")

    def _report_discarded(self, discarded: list[Any], what: str) -> list[str]:
        ids = [d.decode() if isinstance(d, bytes) else d for d in discarded]
        if ids:
            states = {k: s for k, s in self._states_or_unknown(ids).items()}
            logger.warning("worker %s: %s discarded for %d task(s) that were no longer running: %s",
                           self.worker_id, what, len(ids), states)
        return ids

    def _states_or_unknown(self, ids: list[str]) -> dict[str, str]:
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hget(self.keys.task(task_id), "state")
        return {k: (s.decode() if s else "unknown key") for k, s in zip(ids, pipe.execute())}

    # aliases for people coming from later versions of R rush
    finish_tasks = push_results
    fail_tasks = push_failed


def process_start_time() -> float:
    """When this process started (wall clock, ~10 ms precision on Linux; psutil elsewhere).

    psutil derives it from the boot time in whole seconds, too coarse to time job starts.
    """
    try:
        with open("/proc/self/stat") as stat:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            seconds_up = float(uptime.read().split()[0])
        return time.time() - (seconds_up - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        import psutil

        return float(psutil.Process().create_time())
