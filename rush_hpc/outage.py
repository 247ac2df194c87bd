"""Riding through Redis outages: a redis-py retry policy bounded by time, not by a count.

A Redis restart (or a network blip) must not kill every worker: each client retries a failed command
with exponential backoff (capped at 1 s) for up to ``outage_timeout`` seconds, then gives up with the
last error. Only errors that end by themselves are retried: lost connections, timeouts, and the
replies of a server that is busy, still loading, failing over, out of memory or unable to persist
(``BUSY``, ``LOADING``, ``TRYAGAIN``, ``READONLY``, ``OOM``, ``MISCONF``, ...). A
wrong type, a refused script or a bad argument fails at once.

Re-sending is safe because every state-changing script of rush-hpc recognises a repeat (see lua.py).

One policy object is shared by all connections of a client, so it also knows when the client last
saw Redis fail (``last_failure``): the controller uses that to not declare workers lost for an
outage that everyone saw. It logs one warning when an outage starts and one line when it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

DEFAULT_OUTAGE_TIMEOUT = 60.0
_TRANSIENT_REPLIES = ("BUSY", "LOADING", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "READONLY", "OOM", "MISCONF")


def is_transient(error: BaseException) -> bool:
    """Errors that an outage, a restart or a busy Redis cause, and that end by themselves."""
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError, TimeoutError, ConnectionError)):
        return True
    return isinstance(error, redis.ResponseError) and str(error).startswith(_TRANSIENT_REPLIES)


class OutageRetry(Retry):
    """Retry transient errors until ``outage_timeout`` seconds have passed since the first failure."""

    def __init__(self, outage_timeout: float = DEFAULT_OUTAGE_TIMEOUT, label: str = "Redis") -> None:
        super().__init__(ExponentialBackoff(cap=1.0, base=0.02), retries=-1,
                         supported_errors=(redis.ConnectionError, redis.TimeoutError, redis.ResponseError,
                                           TimeoutError, ConnectionError))
        self.outage_timeout = outage_timeout
        self.label = label
        #: monotonic time of the last failed attempt (0.0: never)
        self.last_failure = 0.0
        self._outage_started: float | None = None
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> OutageRetry:
        return self  # redis-py copies the policy per connection; one shared state per client

    def get_retries(self) -> int:
        return 1_000_000  # bounded by time, see call_with_retry

    def update_supported_errors(self, specified_errors: Any) -> None:
        """Keep our own list: is_transient decides."""

    def call_with_retry(self, do: Callable[[], Any], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> Any:
        failures = 0
        started: float | None = None
        while True:
            try:
                result = do()
            except Exception as error:
                if not is_transient(error) or (is_retryable and not is_retryable(error)):
                    raise
                now = time.monotonic()
                started = now if started is None else started
                failures += 1
                self._note_failure(error, now)
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                if now - started >= self.outage_timeout:
                    raise
                time.sleep(min(self._backoff.compute(failures), max(0.0, started + self.outage_timeout - now)))
                continue
            if started is not None:
                self._note_recovery()
            return result

    @property
    def in_outage(self) -> bool:
        """True while a command of this client is retrying (e.g. to keep log records out of Redis)."""
        return self._outage_started is not None

    def _note_failure(self, error: Exception, now: float) -> None:
        with self._lock:  # log outside the lock: a log handler may use this very client
            self.last_failure = now
            starts = self._outage_started is None and self.outage_timeout > 0
            if starts:
                self._outage_started = now
        if starts:
            logger.warning("%s unreachable (%s: %s); retrying for up to %.0f s", self.label,
                           type(error).__name__, error, self.outage_timeout)

    def _note_recovery(self) -> None:
        with self._lock:
            started, self._outage_started = self._outage_started, None
        if started is not None:
            logger.warning("%s reachable again after %.1f s", self.label, time.monotonic() - started)

    def seen_outage_within(self, seconds: float) -> bool:
        """True when a command of this client failed within the last ``seconds``."""
        return self.last_failure > 0 and time.monotonic() - self.last_failure < seconds
