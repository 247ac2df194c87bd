"""Worker log records in Redis: a handler that writes them, ``read_log`` that reads them back, and
``LogFollower`` for ``rush-hpc logs --follow``.

The log list is capped (``max_records``), so a list index does not identify a record for long:
once the cap is reached every new record shifts the others down. Each write therefore also
increments a counter (``<log key>:seq``) in the same transaction; the record at list position
``i`` of ``n`` has sequence number ``counter - n + 1 + i``. Followers remember the last sequence
number they printed, which keeps working past the cap.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import pandas as pd
    import redis

DEFAULT_MAX_RECORDS = 10_000
COLUMNS = ["time", "worker_id", "level", "logger", "message"]


def sequence_key(log_key: str) -> str:
    """The counter of records ever written to ``log_key`` (deleted with the network by ``reset``)."""
    return log_key + ":seq"


class RedisLogHandler(logging.Handler):
    """Appends each record as JSON to a capped Redis list (the network's ``log`` key)."""

    def __init__(self, client: redis.Redis, key: str, worker_id: str, level: int = logging.INFO,
                 max_records: int = DEFAULT_MAX_RECORDS) -> None:
        super().__init__(level)
        self.client, self.key, self.worker_id, self.max_records = client, key, worker_id, max_records
        self.seq_key = sequence_key(key)
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False):  # redis-py logging from inside emit()
            return
        self._local.busy = True
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + self.format_exception(record)
            entry = {"time": record.created, "worker_id": self.worker_id, "level": record.levelname,
                     "logger": record.name, "message": message}
            pipe = self.client.pipeline(transaction=True)  # the counter and the list move together
            pipe.rpush(self.key, json.dumps(entry))
            pipe.ltrim(self.key, -self.max_records, -1)
            pipe.incr(self.seq_key)
            pipe.execute()
        except Exception:  # noqa: BLE001 - a log handler must never raise
            self.handleError(record)
        finally:
            self._local.busy = False

    @staticmethod
    def format_exception(record: logging.LogRecord) -> str:
        return logging.Formatter().formatException(record.exc_info)  # type: ignore[arg-type]


def _parse(raw: bytes | str) -> dict[str, Any] | None:
    """One stored record, or None when it is not one (Redis contents are untrusted input)."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("time"), (int, float)):
        return None
    return {"time": float(record["time"]), **{c: str(record.get(c, "")) for c in COLUMNS[1:]}}


def _frame(records: list[dict[str, Any]], worker_ids: Iterable[str] | None,
           extra: list[str] = []) -> pd.DataFrame:  # noqa: B006 - never mutated
    import pandas as pd

    if worker_ids is not None:
        wanted = set(worker_ids)
        records = [r for r in records if r["worker_id"] in wanted]
    frame = pd.DataFrame.from_records(records, columns=COLUMNS + extra)
    frame["time"] = pd.to_datetime(frame["time"], unit="s")
    return frame


def read_log(client: redis.Redis, key: str, worker_ids: Iterable[str] | None = None,
             n: int | None = None) -> pd.DataFrame:
    """Log records (time in UTC, worker_id, level, logger, message), oldest first; ``n`` newest only."""
    raw = client.lrange(key, -n if n else 0, -1)
    return _frame([r for r in map(_parse, raw) if r is not None], worker_ids)


class LogFollower:
    """Reads the records written since the last call, by sequence number (see the module doc).

    ``dropped`` counts records that were trimmed away by the cap before they could be read.
    """

    def __init__(self, client: redis.Redis, key: str, after: int = 0) -> None:
        self.client, self.key, self.seq_key = client, key, sequence_key(key)
        self.last = after
        self.dropped = 0

    def _counter(self) -> int:
        value = self.client.get(self.seq_key)
        try:
            return int(value) if value is not None else 0
        except ValueError:
            return 0

    def read(self, worker_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """New records with a ``seq`` column, oldest first (empty when there are none)."""
        counter = self._counter()
        if counter < self.last:  # the network was reset: start again
            self.last = 0
        raw: list[Any] = []
        first, ran = self.last + 1, counter > self.last
        while counter > self.last:
            pipe = self.client.pipeline(transaction=True)
            pipe.get(self.seq_key)
            pipe.lrange(self.key, -(counter - self.last), -1)
            value, raw = pipe.execute()
            latest = max(int(value or 0), len(raw))  # records written before the counter existed
            first = latest - len(raw) + 1
            if first <= self.last + 1 or latest == counter:
                break  # the range reaches back to the last record we printed, or the cap trimmed it
            counter = latest  # more records arrived in between: ask again for the longer range
        records = []
        for offset, item in enumerate(raw):
            seq = first + offset
            if seq <= self.last:
                continue
            record = _parse(item)
            if record is not None:
                records.append({**record, "seq": seq})
        if ran:
            self.dropped += max(0, first - self.last - 1)
            self.last = max(self.last, first + len(raw) - 1)
        return _frame(records, worker_ids, extra=["seq"])
