"""The supervisor: watches, waits for, finds lost, kills and reaps workers - over handles.

The controller starts workers (``controller.py``); everything after that lives here. The
supervisor acts on workers only through handles: the trusted ones the launchers returned (held in
memory), or handles rebuilt from a worker hash by the launcher registry with strict validation
(see ``launchers/base.py``). Values read from Redis never name a file to read, a pid to signal,
a job to cancel or a host to contact on their own. The tail of a worker's output is shown in
exceptions only when a trusted handle holds its path, and never written back into Redis: the
worker hash's ``reason`` stays short.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import redis

from . import defaults
from .exceptions import ConfigError, RushTimeoutError, WorkerStartError
from .launchers.base import Handle, HandleContext, handle_from_info, handle_type
from .states import ACTIVE, TERMINAL, WorkerState, allowed_previous, set_worker_state

if TYPE_CHECKING:
    from .network import RushNetwork

logger = logging.getLogger(__name__)

_MAX_REASON = 2000  # characters of a reason read from Redis that an error message shows
_HANDLE_FIELDS = frozenset({"launcher", "host", "pid", "job_id", "login"})  # what handles are rebuilt from


def _decode(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _now() -> str:
    return f"{time.time():.3f}"


def _seconds(value: str | None, limit: float = 3600.0) -> float:
    """A duration read from a worker hash (untrusted): a number of seconds in [0, limit], else 0."""
    try:
        seconds = float(value or 0)
    except ValueError:
        return 0.0
    return seconds if 0.0 <= seconds <= limit else 0.0


class Supervisor:
    """Watches the workers of one network for one controller."""

    def __init__(self, network: RushNetwork) -> None:
        self.network = network
        self.handles: dict[str, Handle] = {}  # trusted: returned by the launchers of this controller
        #: ids a launcher of this controller is starting now (recorded as launched, no handle yet)
        self.starting: set[str] = set()
        self.context = HandleContext(network=network.network if network is not None else None)
        self._rebuilt: dict[str, tuple[tuple[tuple[str, str], ...], Handle | None]] = {}
        self._monitor: threading.Thread | None = None
        self._monitor_stop = threading.Event()
        self._squeue_checked = 0.0
        self._problems_seen: dict[str, str] = {}
        self.released_by_sweep = 0  # tasks the last sweep released (held by workers not running)
        #: running workers the last ``detect_lost_workers`` could not ask their launcher about
        #: (no handle: e.g. SSH workers of another controller); only their heartbeat tells
        self.unchecked: list[str] = []
        #: workers the last ``kill`` could not force-kill from here (they only got the kill message)
        self.not_force_killed: list[str] = []

    # -- what Redis says ---------------------------------------------------------------------
    def worker_hashes(self, worker_ids: Iterable[str] | None = None) -> dict[str, dict[str, str]]:
        keys = self.network.keys
        redis = self.network.redis
        ids = sorted(_decode(w) for w in redis.smembers(keys.workers)) if worker_ids is None else list(worker_ids)
        pipe = redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hgetall(keys.worker(worker_id))
        return {wid: {_decode(k): _decode(v) for k, v in h.items()} for wid, h in zip(ids, pipe.execute())}

    def worker_ids(self, *states: WorkerState | str) -> list[str]:
        """Ids of the workers in any of ``states`` (every worker without states), sorted."""
        keys = self.network.keys
        if not states:
            return sorted(_decode(w) for w in self.network.redis.smembers(keys.workers))
        pipe = self.network.redis.pipeline(transaction=False)
        for state in states:
            pipe.smembers(keys.worker_state_set(WorkerState(state).value))
        return sorted({_decode(w) for members in pipe.execute() for w in members})

    # -- handles -----------------------------------------------------------------------------
    def add(self, handles: Iterable[Handle]) -> None:
        for handle in handles:
            self.handles[handle.worker_id] = handle

    def handle(self, worker_id: str, info: Mapping[str, str]) -> Handle | None:
        """The trusted handle, else one rebuilt (validated) from the worker hash, else None.

        Rebuilt handles are kept while the record they came from stays the same (waits poll often;
        a record that fails validation is reported once, not on every poll)."""
        trusted = self.handles.get(worker_id)
        if trusted is not None:
            return trusted
        if worker_id in self.starting:  # our launcher is starting it: its record is still being written
            return None
        record = tuple(sorted((k, v) for k, v in info.items() if k in _HANDLE_FIELDS)) + (
            ("ssh launchers", str(len(self.context.ssh))),  # a new host list may make it checkable
            ("login nodes", str(len(self.context.logins))))
        cached = self._rebuilt.get(worker_id)
        if cached is None or cached[0] != record:
            cached = self._rebuilt[worker_id] = (record, handle_from_info(worker_id, info, self.context))
        return cached[1]

    def _grouped(self, infos: Mapping[str, Mapping[str, str]],
                 without: list[str] | None = None) -> dict[type[Handle], list[Handle]]:
        """Handles by kind; ids of a known launcher without a handle (cannot be checked from here:
        another controller's SSH hosts, a value that failed validation) go to ``without``."""
        groups: dict[type[Handle], list[Handle]] = {}
        for worker_id, info in infos.items():
            handle = self.handle(worker_id, info)
            if handle is not None:
                groups.setdefault(type(handle), []).append(handle)
            elif without is not None and handle_type(info.get("launcher")) is not None:
                without.append(worker_id)  # (workers started by hand have no launcher to ask anyway)
        return groups

    def gone(self, infos: Mapping[str, Mapping[str, str]], *, registered: bool = False,
             without: list[str] | None = None) -> dict[str, str]:
        """Ask each kind of handle, one batch per kind, which processes / jobs have ended."""
        reasons: dict[str, str] = {}
        for kind, handles in self._grouped(infos, without).items():
            if registered and not kind.checks_running_workers:
                continue
            reasons.update(kind.check(handles))
        return reasons

    def output_tail(self, worker_id: str) -> str:
        handle = self.handles.get(worker_id)  # only trusted handles read output files
        return handle.output_tail() if handle is not None else ""

    def _with_output(self, worker_id: str, reason: str) -> str:
        output = self.output_tail(worker_id)
        reason = reason[:_MAX_REASON]
        return reason + (f"\n--- end of its output ---\n{output}" if output else "")

    # -- waiting -----------------------------------------------------------------------------
    def wait_for_workers(self, n: int | None = None, worker_ids: Sequence[str] | None = None,
                         timeout: float | None = defaults.WAIT_TIMEOUT, poll: float = defaults.WAIT_POLL,
                         on_poll: Callable[..., None] | None = None) -> None:
        if n is None and worker_ids is None:
            raise ConfigError("wait_for_workers needs n= or worker_ids=")
        target = len(worker_ids) if worker_ids is not None else (n or 0)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            hashes = self.worker_hashes(worker_ids)
            registered = [w for w, h in hashes.items() if h.get("started_at")]
            waiting = {w: h for w, h in hashes.items() if not h.get("started_at")}
            failures = self.start_failures(waiting)
            if on_poll is not None:
                on_poll(done=len(registered), extra=f"{len(waiting)} starting" if waiting else "")
            if failures:
                details = "\n".join(f"worker {w}: {r}" for w, r in failures.items())
                raise WorkerStartError(f"{len(failures)} worker(s) failed before registering:\n{details}",
                                       failures)
            if len(registered) >= target:
                return
            problems = self.start_problems(waiting)
            if problems:
                details = "\n".join(f"worker {w}: {r}" for w, r in problems.items())
                raise WorkerStartError(f"{len(problems)} worker(s) will not start:\n{details}", problems)
            if deadline is not None and time.monotonic() > deadline:
                details = "\n".join(f"worker {w} ({h.get('launcher')}, {h.get('state')}): "
                                    f"{self._with_output(w, 'not registered')}"
                                    for w, h in list(waiting.items())[:10])
                raise RushTimeoutError(f"only {len(registered)} of {target} workers registered within "
                                       f"{timeout} s.\n{details}")
            time.sleep(poll)

    def start_problems(self, waiting: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        """Launched workers that will never start (asked at most every ``SQUEUE_INTERVAL_S``)."""
        launched = {w: h for w, h in waiting.items() if h.get("state") == WorkerState.LAUNCHED.value}
        now = time.monotonic()
        if not launched or now - self._squeue_checked < defaults.SQUEUE_INTERVAL_S:
            return {}
        self._squeue_checked = now
        seen: dict[str, str] = {}
        for kind, handles in self._grouped(launched).items():
            seen.update(kind.start_problems(handles))
        # only what two checks in a row agree on: right after a submission SLURM shows a passing
        # reason (PartitionConfig for a job whose real problem is PartitionTimeLimit)
        confirmed = {w: p for w, p in seen.items() if self._problems_seen.get(w) == p}
        self._problems_seen = seen
        return confirmed

    def start_failures(self, waiting: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        """Workers that failed or exited before registering: ``{worker_id: reason + output}``.

        Exited ones are marked failed with a short reason (their output stays out of Redis).
        """
        failures = {w: self._with_output(w, h.get("reason") or "failed")
                    for w, h in waiting.items() if h.get("state") == WorkerState.FAILED.value}
        launched = {w: h for w, h in waiting.items() if h.get("state") == WorkerState.LAUNCHED.value}
        for worker_id, reason in self.gone(launched).items():
            reason = f"{reason} before registering"
            if set_worker_state(self.network, worker_id, WorkerState.FAILED, (WorkerState.LAUNCHED.value,),
                                reason=reason, ended_at=_now()) is not None:
                failures[worker_id] = self._with_output(worker_id, reason)
        # a job that failed before registering may have been requeued (NODE_FAIL): cancel it too
        self._kill_lost({w: waiting[w] for w in failures if w in launched})
        return failures

    # -- lost workers ------------------------------------------------------------------------
    def detect_lost_workers(self) -> list[str]:
        network = self.network
        hashes = self.worker_hashes(self.worker_ids(WorkerState.RUNNING))
        pipe = network.redis.pipeline(transaction=False)
        for worker_id in hashes:
            pipe.exists(network.keys.heartbeat(worker_id))
        beating = dict(zip(hashes, pipe.execute()))
        unchecked: list[str] = []
        reasons = self.gone(hashes, registered=True, without=unchecked)
        self.unchecked = [w for w in unchecked if w not in reasons]
        grace = self._in_outage_grace(hashes)
        for worker_id, info in hashes.items():
            if grace:
                break  # Redis was down for everyone: give the workers time to beat again
            if worker_id not in reasons and info.get("heartbeat_expire") and not beating[worker_id]:
                reasons[worker_id] = f"heartbeat expired (no beat for {info['heartbeat_expire']} s)"
        allowed = allowed_previous(WorkerState.LOST, (WorkerState.RUNNING.value,))
        ended_at = _now()
        results = network.end_workers([(w, WorkerState.LOST.value, allowed, f"worker {w} lost: {reason}",
                                        {"reason": reason, "ended_at": ended_at}) for w, reason in reasons.items()])
        lost = [w for w, ended in results.items() if ended is not None]
        refused = [w for w, ended in results.items() if ended is None]
        if refused:  # a re-sent pipeline finds them ended already: ours if they carry our time stamp
            lost += [w for w, h in self.worker_hashes(refused).items()
                     if h.get("state") == WorkerState.LOST.value and h.get("ended_at") == ended_at]
        for worker_id in lost[:20]:
            previous_state, failed_ids, requeued_ids = results[worker_id] or ("", [], [])
            logger.warning("worker %s lost (%s); %d task(s) failed, %d requeued", worker_id, reasons[worker_id],
                           len(failed_ids), len(requeued_ids))
        if len(lost) > 20:
            logger.warning("... and %d more workers lost", len(lost) - 20)
        self._kill_lost({w: hashes[w] for w in lost})
        self.start_failures(self.worker_hashes(self.worker_ids(WorkerState.LAUNCHED)))
        failed, requeued = network.sweep_orphaned_tasks()
        self.released_by_sweep = len(failed) + len(requeued)
        self.record_final_states()
        return lost

    def _in_outage_grace(self, hashes: Mapping[str, Mapping[str, str]]) -> bool:
        """True shortly after a Redis outage (this client saw commands fail, or Redis restarted):
        heartbeats that expired while Redis was down say nothing about the workers."""
        window = max((_seconds(h.get("heartbeat_expire")) + _seconds(h.get("heartbeat_period"))
                      for h in hashes.values() if h.get("heartbeat_expire")), default=0.0)
        if not window:
            return False
        if self.network._retry.seen_outage_within(window):
            return True
        try:
            uptime = int(self.network.redis.info("server").get("uptime_in_seconds", window + 1))
        except redis.ResponseError:  # INFO may be denied to an ACL user
            return False
        return uptime < window

    def _kill_lost(self, infos: Mapping[str, Mapping[str, str]]) -> None:
        """Cancel what is left of lost workers where that frees resources (SLURM jobs, requeued ones too)."""
        for kind, handles in self._grouped(infos).items():
            if kind.kill_when_lost:
                self._note_ended_siblings(handles)
                kind.kill_all(handles)
                self._record_kill(kind, handles)

    def record_final_states(self) -> None:
        """Join the scheduler's final state (NODE_FAIL, TIMEOUT, CANCELLED...) to ended workers of
        this controller, once each (field ``job_state``): also when the worker ended cleanly."""
        active = set(self.worker_ids(*ACTIVE))
        ended = [w for w, h in list(self.handles.items()) if h.reports_final_state and w not in active]
        if not ended:
            return
        hashes = self.worker_hashes(ended)
        todo = {w: h for w, h in hashes.items() if h and not h.get("job_state")}
        pipe = self.network.redis.pipeline(transaction=False)
        for kind, handles in self._grouped(todo).items():
            for worker_id, state in kind.final_states(handles).items():
                pipe.hset(self.network.keys.worker(worker_id), "job_state", state)
        pipe.execute()

    def start_monitor(self, interval: float = defaults.MONITOR_INTERVAL,
                      check: Callable[[], object] | None = None) -> None:
        """Run ``check`` (default: ``detect_lost_workers``) every ``interval`` seconds in a thread."""
        if self._monitor is not None and self._monitor.is_alive():
            return
        self._monitor_stop.clear()
        run = check or self.detect_lost_workers

        def watch() -> None:
            warned_at = -float("inf")
            while not self._monitor_stop.wait(interval):
                try:
                    run()
                except redis.RedisError as error:  # an outage longer than outage_timeout: say it once a minute
                    if time.monotonic() - warned_at > 60:
                        logger.warning("lost-worker monitor: Redis unavailable (%s); still watching", error)
                        warned_at = time.monotonic()
                except Exception:  # noqa: BLE001 - keep watching
                    logger.exception("lost-worker monitor failed")

        self._monitor = threading.Thread(target=watch, name=f"rush-monitor-{self.network.network}", daemon=True)
        self._monitor.start()

    def stop_monitor(self) -> None:
        self._monitor_stop.set()

    # -- killing -----------------------------------------------------------------------------
    def kill(self, ids: Sequence[str], grace: float = defaults.KILL_GRACE) -> list[str]:
        """Mark killed, release their tasks, ask them through Redis, then force what did not go."""
        network = self.network
        for worker_id in ids:
            network.end_worker(worker_id, WorkerState.KILLED.value, allowed_previous(WorkerState.KILLED),
                               f"worker {worker_id} killed by the controller",
                               reason="killed by the controller", ended_at=_now())
        # every requested worker that is killed or lost now gets the kill, whatever end_worker answered:
        # one declared lost earlier (frozen, cut off) may still run, and a re-sent end_worker is refused
        hashes = self.worker_hashes(ids)
        killed = [w for w in ids if hashes[w].get("state") in (WorkerState.KILLED.value, WorkerState.LOST.value)]
        if killed:
            pipe = network.redis.pipeline(transaction=False)
            for worker_id in killed:
                pipe.rpush(network.keys.control(worker_id), "kill")
            pipe.execute()
        deadline = time.monotonic() + grace
        pending = set(killed)
        while pending and time.monotonic() < deadline:
            pipe = network.redis.pipeline(transaction=False)
            order = list(pending)
            for worker_id in order:
                pipe.exists(network.keys.heartbeat(worker_id))
            ended = self.gone({w: hashes[w] for w in order})
            pending = {w for w, beat in zip(order, pipe.execute()) if beat and w not in ended}
            if pending:
                time.sleep(0.05)
        without: list[str] = []
        for kind, handles in self._grouped({w: hashes[w] for w in killed}, without).items():
            force = [h for h in handles if h.worker_id in pending or kind.always_force_kill]
            if force:
                self._note_ended_siblings(force)
                kind.kill_all(force)
                self._record_kill(kind, force)
        self.not_force_killed = [w for w in without if w in pending]
        if self.not_force_killed:
            logger.warning("%d killed worker(s) did not answer and cannot be force-killed from here (no handle): %s",
                           len(self.not_force_killed), self.not_force_killed[:5])
        logger.info("killed %d worker(s) of network %s", len(killed), network.network)
        return killed

    def _note_ended_siblings(self, handles: Sequence[Handle]) -> None:
        """Tell the job share of each handle (a SLURM job running several workers) which of its
        workers are in a final state now (terminated ones too), so that the job is cancelled
        once none of them runs (``launchers.slurm.cancellable``)."""
        shares = [share for share in (getattr(h, "share", None) for h in handles) if share is not None]
        siblings = sorted({w for share in shares for w in share.worker_ids})
        if not siblings:
            return
        final = {state.value for state in TERMINAL}
        ended = {w for w, h in self.worker_hashes(siblings).items() if h.get("state") in final}
        for share in shares:
            share.ended.update(ended.intersection(share.worker_ids))

    def _record_kill(self, kind: type[Handle], handles: Sequence[Handle]) -> None:
        if kind.kill_record:
            pipe = self.network.redis.pipeline(transaction=False)
            for handle in handles:
                pipe.hset(self.network.keys.worker(handle.worker_id), kind.kill_record, _now())
            pipe.execute()

    # -- reaping -----------------------------------------------------------------------------
    def reap(self, timeout: float = 0.0) -> None:
        """Collect exited local children (waiting up to ``timeout`` in all); the rest run on."""
        deadline = time.monotonic() + timeout
        for handle in list(self.handles.values()):
            handle.reap(max(0.0, deadline - time.monotonic()))

    def forget(self) -> None:
        """Drop every handle (after reset: the workers are gone or no longer ours to watch)."""
        self.handles.clear()
        self._rebuilt.clear()
