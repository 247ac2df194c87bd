"""Worker log records in Redis: a handler that writes them, and ``read_log`` that reads them back."""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import pandas as pd
    import redis

DEFAULT_MAX_RECORDS = 10_000


class RedisLogHandler(logging.Handler):
    """Appends each record as JSON to a capped Redis list (the network's ``log`` key)."""

    def __init__(self, client: redis.Redis, key: str, worker_id: str, level: int = logging.INFO,
                 max_records: int = DEFAULT_MAX_RECORDS) -> None:
        super().__init__(level)
        self.client, self.key, self.worker_id, self.max_records = client, key, worker_id, max_records
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
            pipe = self.client.pipeline(transaction=False)
            pipe.rpush(self.key, json.dumps(entry))
            pipe.ltrim(self.key, -self.max_records, -1)
            pipe.execute()
        except Exception:  # noqa: BLE001 - a log handler must never raise
            self.handleError(record)
        finally:
            self._local.busy = False

    @staticmethod
    def format_exception(record: logging.LogRecord) -> str:
        return logging.Formatter().formatException(record.exc_info)  # type: ignore[arg-type]


def read_log(client: redis.Redis, key: str, worker_ids: Iterable[str] | None = None,
             n: int | None = None) -> pd.DataFrame:
    """Log records (time, worker_id, level, logger, message), oldest first; ``n`` newest only."""
    import pandas as pd

    raw = client.lrange(key, -n if n else 0, -1)
    records: list[dict[str, Any]] = [json.loads(r) for r in raw]
    if worker_ids is not None:
        wanted = set(worker_ids)
        records = [r for r in records if r["worker_id"] in wanted]
    frame = pd.DataFrame.from_records(records, columns=["time", "worker_id", "level", "logger", "message"])
    frame["time"] = pd.to_datetime(frame["time"], unit="s")
    return frame
