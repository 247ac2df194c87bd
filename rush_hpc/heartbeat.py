"""The worker's heartbeat: keeps ``worker:<id>:heartbeat`` alive and carries control messages.

Liveness has to tell a *busy* worker from a dead, frozen or cut-off one. A thread cannot: a worker
inside one long call that holds the GIL (a C extension, ``math.factorial`` of a huge number) starves
it, and its heartbeat expires although the worker is healthy. So a launched worker beats from a
small **forked child process** (as R rush beats from a separate process):

* it beats while the worker process exists and is not stopped: a busy worker (even one holding the
  GIL for minutes) keeps beating; a SIGSTOPped (frozen) worker stops beating and expires; a killed
  worker takes the beat with it (the child exits when its parent is gone); a worker cut off from
  Redis cannot beat, and ends itself after ``redis_outage_timeout`` without Redis;
* one blocking ``BLPOP`` on the worker's control list doubles as the beat's sleep: "kill" SIGKILLs
  the worker at once (also one stuck in a GIL-holding call), "terminate" goes to the worker through
  a pipe that ``rush.terminated`` reads (no signal: the loop may use SIGUSR1 itself);
* every beat also reads the worker's state: when the controller declared it lost or killed, or the
  network was reset (no record), the child SIGKILLs the worker. Its late task calls were refused
  in Redis already (see ``lua.py``); this makes it stop using CPU and Redis, too.
* any unexpected error in the heartbeat ends the worker (recorded in Redis when possible): a worker
  without a heartbeat would be declared lost while it kept working.

Where ``os.fork`` is missing, and for in-process workers, the same loop runs in a daemon thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable

import redis

from . import lua
from .exceptions import ConfigError
from .outage import DEFAULT_OUTAGE_TIMEOUT, is_transient

if TYPE_CHECKING:
    from .worker import RushWorker

logger = logging.getLogger(__name__)

DEFAULT_PERIOD = 1.0
DEFAULT_EXPIRE = 5.0
_WAKE = b"__wake__"


def validate(period: float | None, expire: float | None) -> None:
    if period is None:
        return
    if period <= 0 or expire is None or expire <= period:
        raise ConfigError(f"heartbeat expire ({expire}) must be larger than its period ({period}); "
                          "e.g. heartbeat_period=1, heartbeat_expire=5")


def _exit_now(reason: str) -> None:
    logger.warning("exiting: %s", reason)
    logging.shutdown()
    os._exit(137)


class BeatLoop:
    """The heartbeat's loop, shared by the child process and the thread.

    ``owner_state()`` says whether the worker is "running", "stopped" (frozen) or "gone";
    ``terminate()`` and ``end(reason)`` act on the worker; ``should_stop()`` is the caller's stop flag.
    """

    def __init__(self, worker: RushWorker, period: float, expire: float, outage_timeout: float,
                 client: redis.Redis | None = None) -> None:
        validate(period, expire)
        self.worker, self.period, self.expire, self.outage_timeout = worker, period, expire, outage_timeout
        keys = worker.keys
        self._heartbeat_key = keys.heartbeat(worker.worker_id)
        self._control_key = keys.control(worker.worker_id)
        self._worker_key = keys.worker(worker.worker_id)
        # short timeouts: a beat into a dead link must fail within about a period, so that a worker
        # cut off and then reconnected learns its fate within two periods of the link coming back
        self.client = client or dataclasses.replace(
            worker.config, socket_connect_timeout=max(0.2, period)).client(
            socket_timeout=1.5 * period + 0.1, outage_timeout=0)  # this loop rides outages itself
        self._beat = self.client.register_script(lua.HEARTBEAT)

    def beat(self) -> bytes | None:
        """Refresh the key (only while the worker is running); returns the worker's state as recorded
        in Redis (None: no record, e.g. the network was reset)."""
        state = self._beat(keys=[self._worker_key, self._heartbeat_key],
                           args=[f"{time.time():.3f}", int(self.expire * 1000)])
        return state or None

    def clear(self) -> None:
        self.client.delete(self._heartbeat_key, self._control_key)

    def run(self, owner_state: Callable[[], str], terminate: Callable[[], None],
            end: Callable[[str], None], should_stop: Callable[[], bool]) -> None:
        worker_id = self.worker.worker_id
        last_contact = time.monotonic()
        outage_logged = False
        while not should_stop():
            owner = owner_state()
            if owner == "gone":
                return
            if owner == "stopped":  # frozen: stay silent, so the controller sees it as lost
                time.sleep(min(self.period, 0.2))
                continue
            try:
                state = self.beat()
                last_contact = time.monotonic()
                if outage_logged:
                    logger.warning("worker %s: Redis is back", worker_id)
                    outage_logged = False
                if state != b"running":
                    if state in (None, b"lost", b"killed"):
                        what = "has no record in Redis (was the network reset, or did Redis restart without " \
                            "persistence?)" if state is None \
                            else f"was marked {state.decode()} by the controller"
                        end(f"worker {worker_id} {what}")
                    else:  # terminated / failed: the worker is ending by itself
                        self.clear()
                    return
                if should_stop():
                    return
                message = self.client.blpop([self._control_key], timeout=self.period)
            except redis.RedisError as error:
                if not is_transient(error):
                    raise
                down = time.monotonic() - last_contact
                if down > self.outage_timeout:
                    end(f"worker {worker_id} could not reach Redis for {down:.0f} s (redis_outage_timeout "
                        f"{self.outage_timeout:.0f} s): {error}")
                    return
                if not outage_logged:
                    logger.warning("worker %s: cannot reach Redis (%s); retrying for up to %.0f s",
                                   worker_id, error, self.outage_timeout)
                    outage_logged = True
                    continue  # at once: a single dropped connection costs no beat
                time.sleep(min(self.period, 1.0) / 2)
                continue
            if message is None or message[1] == _WAKE:
                continue
            if message[1] == b"kill":
                self.client.delete(self._heartbeat_key)  # tells the controller: answered
                end(f"worker {worker_id} killed through Redis")
                return
            if message[1] == b"terminate":
                logger.info("worker %s: terminate requested", worker_id)
                terminate()


def _record_heartbeat_failure(worker: RushWorker, error: BaseException, client: redis.Redis) -> str:
    """Record the failure with ``client``: in the child process, never through the worker's own
    connection (its socket is the parent's: writing to it would garble the parent's replies)."""
    reason = f"heartbeat failed: {type(error).__name__}: {error}"
    try:
        worker.end_worker(worker.worker_id, "failed", ("running",), f"worker {worker.worker_id} {reason}",
                          client=client, reason=reason, ended_at=f"{time.time():.3f}")
    except Exception as record_error:  # noqa: BLE001 - best effort: Redis may be the problem
        print(f"rush-hpc worker {worker.worker_id}: could not record the heartbeat failure: {record_error}",
              file=sys.stderr, flush=True)
    return reason


def _process_state(pid: int) -> str:
    """"running", "stopped" (SIGSTOP / traced) or "gone" (exited or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            code = stat.read().rsplit(b")", 1)[1].split()[0]
        return "gone" if code in (b"Z", b"X") else "stopped" if code in (b"T", b"t") else "running"
    except FileNotFoundError:
        return "gone"
    except OSError:
        import psutil

        try:
            status = psutil.Process(pid).status()
        except psutil.Error:
            return "gone"
        if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return "gone"
        return "stopped" if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP) else "running"


class HeartbeatProcess:
    """Beats from a forked child process; see the module docstring for why.

    Forked early (before the worker loop is unpickled, so the child shares no large objects and no
    threads of user code), it waits until ``begin()`` (the worker registered). The child tells the
    worker "terminate" through a pipe (``terminate_requested()``), never with a signal that the
    loop might use itself.
    """

    def __init__(self, worker: RushWorker, period: float, expire: float,
                 outage_timeout: float = DEFAULT_OUTAGE_TIMEOUT) -> None:
        validate(period, expire)
        self.worker, self.period, self.expire, self.outage_timeout = worker, period, expire, outage_timeout
        go_read, self._go = os.pipe()
        self._terminate, terminate_write = os.pipe()
        owner = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child never returns
            os.close(self._go)
            os.close(self._terminate)
            code = 0
            try:
                self._child(owner, go_read, terminate_write)
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        os.close(go_read)
        os.close(terminate_write)
        os.set_blocking(self._terminate, False)
        self.pid: int | None = pid

    def begin(self) -> None:
        """Start beating (the worker has registered)."""
        os.write(self._go, b"g")

    def is_alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False

    def terminate_requested(self) -> bool:
        """True once the controller asked this worker to terminate (no round trip: a pipe read)."""
        try:
            return bool(os.read(self._terminate, 64))
        except BlockingIOError:
            return False
        except OSError:
            return False

    def _child(self, owner: int, go: int, terminate: int) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, signal.SIG_IGN)  # the worker handles those; this child ends with it
        root = logging.getLogger()
        for handler in list(root.handlers):  # the Redis log handler belongs to the parent's connection
            root.removeHandler(handler)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s rush_hpc.heartbeat: %(message)s")
        if os.read(go, 1) != b"g":
            return  # the worker ended before it registered
        loop = BeatLoop(self.worker, self.period, self.expire, self.outage_timeout)

        def should_stop() -> bool:
            return bool(select.select([go], [], [], 0)[0])  # readable = EOF: the parent closed it

        def owner_state() -> str:
            return "gone" if os.getppid() != owner else _process_state(owner)

        def end(reason: str) -> None:
            logger.warning("%s: ending the worker process %d", reason, owner)
            try:
                os.kill(owner, signal.SIGKILL)
            except ProcessLookupError:
                pass

        def ask_to_terminate() -> None:
            try:
                os.write(terminate, b"t")
            except OSError:
                pass

        try:
            loop.run(owner_state, ask_to_terminate, end, should_stop)
        except BaseException as error:  # noqa: BLE001 - never die silently
            logger.error("worker %s: %s", self.worker.worker_id,
                         _record_heartbeat_failure(self.worker, error, loop.client))
            end("the heartbeat failed")
            raise

    def stop(self) -> None:
        """Stop beating, reap the child, and remove the heartbeat key and the control list."""
        if self.pid is None:
            return
        os.close(self._go)
        try:
            self.worker.redis.rpush(self.worker.keys.control(self.worker.worker_id), _WAKE)
        except redis.RedisError:
            pass
        deadline = time.monotonic() + 2 * self.period + 2
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                    break
            except ChildProcessError:
                break
            time.sleep(0.01)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        self.pid = None
        os.close(self._terminate)
        try:
            self.worker.redis.delete(self.worker.keys.heartbeat(self.worker.worker_id),
                                     self.worker.keys.control(self.worker.worker_id))
        except redis.RedisError as error:
            logger.warning("worker %s: could not clear heartbeat: %s", self.worker.worker_id, error)


class Heartbeat(threading.Thread):
    """The same loop in a daemon thread: for in-process workers and where ``os.fork`` is missing.

    A thread cannot beat while another thread holds the GIL: prefer ``HeartbeatProcess``.
    """

    def __init__(self, worker: RushWorker, period: float, expire: float,
                 on_exit: Callable[[str], None] = _exit_now,
                 outage_timeout: float = DEFAULT_OUTAGE_TIMEOUT) -> None:
        super().__init__(name=f"rush-heartbeat-{worker.worker_id}", daemon=True)
        self.loop = BeatLoop(worker, period, expire, outage_timeout)
        self.worker, self.period, self.on_exit = worker, period, on_exit
        self._stop_event = threading.Event()

    def beat(self) -> bytes | None:
        return self.loop.beat()

    def begin(self) -> None:
        self.start()

    def terminate_requested(self) -> bool:
        return False  # the thread sets the worker's flag itself

    def run(self) -> None:
        try:
            self.loop.run(lambda: "running", self.worker.terminate, self.on_exit, self._stop_event.is_set)
        except BaseException as error:  # noqa: BLE001 - never die silently
            self.on_exit(_record_heartbeat_failure(self.worker, error, self.loop.client))

    def stop(self) -> None:
        """Stop beating and remove the key, so the controller sees a clean end at once."""
        self._stop_event.set()
        try:
            self.loop.client.rpush(self.loop._control_key, _WAKE)
            if self.is_alive():
                self.join(timeout=2 * self.period + 1)
            self.loop.clear()
        except redis.RedisError as error:
            logger.warning("worker %s: could not clear heartbeat: %s", self.worker.worker_id, error)
        finally:
            self.loop.client.close()


def first_beat(worker: RushWorker, expire: float) -> None:
    """Create the key before the worker registers, so it is never found lost in that gap."""
    worker.redis.set(worker.keys.heartbeat(worker.worker_id), f"{time.time():.3f}", px=int(expire * 1000))


def make_heartbeat(worker: RushWorker, period: float, expire: float, outage_timeout: float, *,
                   in_process: bool) -> Heartbeat | HeartbeatProcess:
    """A heartbeat, ready to ``begin()`` once the worker registered: a forked child process where
    possible (forked now, before the worker loop is unpickled), else a thread."""
    if in_process or not hasattr(os, "fork"):
        on_exit: Callable[[str], None] = _exit_now
        if in_process:
            def on_exit(reason: str) -> None:
                logger.warning("%s", reason)
                worker.terminate()
        return Heartbeat(worker, period, expire, on_exit, outage_timeout)
    return HeartbeatProcess(worker, period, expire, outage_timeout)
