"""The worker's heartbeat thread: keeps ``worker:<id>:heartbeat`` alive and listens for control messages.

One blocking ``BLPOP`` on the control list doubles as the beat's sleep, so a "kill" or "terminate"
sent by any controller reaches the worker at once, on any host. If the controller has declared
this worker lost or killed (its tasks were handed to others), the worker exits instead of working
on results that would be discarded.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Callable

import redis

from .exceptions import ConfigError

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


class Heartbeat(threading.Thread):
    """Daemon thread beating every ``period`` seconds; the key expires after ``expire`` seconds."""

    def __init__(self, worker: RushWorker, period: float, expire: float,
                 on_exit: Callable[[str], None] = _exit_now) -> None:
        super().__init__(name=f"rush-heartbeat-{worker.worker_id}", daemon=True)
        validate(period, expire)
        self.worker, self.period, self.expire, self.on_exit = worker, period, expire, on_exit
        self._stop_event = threading.Event()
        keys = worker.keys
        self._heartbeat_key = keys.heartbeat(worker.worker_id)
        self._control_key = keys.control(worker.worker_id)
        self._worker_key = keys.worker(worker.worker_id)
        self._terminate_key = keys.terminate
        self._client = worker.config.client(socket_timeout=max(2 * period, period + 2))

    def beat(self) -> None:
        """One beat: refresh the key, and learn whether the controller gave up on this worker."""
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self._heartbeat_key, f"{time.time():.3f}", px=int(self.expire * 1000))
        pipe.hget(self._worker_key, "state")
        pipe.exists(self._terminate_key)
        _, state, terminate = pipe.execute()
        if state in (b"lost", b"killed"):
            self.on_exit(f"worker {self.worker.worker_id} was marked {state.decode()} by the controller")
        if terminate:
            self.worker.terminate()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.beat()
                message = self._client.blpop([self._control_key], timeout=self.period)
            except redis.RedisError as error:
                logger.warning("worker %s: heartbeat failed (%s); retrying", self.worker.worker_id, error)
                self._stop_event.wait(min(self.period, 1.0))
                continue
            if message is None or message[1] == _WAKE:
                continue
            if message[1] == b"kill":
                self._client.delete(self._heartbeat_key)  # tells the controller: answered
                self.on_exit(f"worker {self.worker.worker_id} killed through Redis")
            elif message[1] == b"terminate":
                logger.info("worker %s: terminate requested", self.worker.worker_id)
                self.worker.terminate()

    def stop(self) -> None:
        """Stop beating and remove the key, so the controller sees a clean end at once."""
        self._stop_event.set()
        try:
            self._client.rpush(self._control_key, _WAKE)
            self.join(timeout=2 * self.period + 1)
            self._client.delete(self._heartbeat_key, self._control_key)
        except redis.RedisError as error:
            logger.warning("worker %s: could not clear heartbeat: %s", self.worker.worker_id, error)
        finally:
            self._client.close()
