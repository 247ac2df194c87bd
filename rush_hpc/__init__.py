"""rush-hpc: asynchronous, distributed computing over a shared Redis database.

Names are imported on first use (PEP 562), so a worker process only loads what it runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "RedisConfig": "config",
    "Rush": "controller",
    "rsh": "controller",
    "RushWorker": "worker",
    "Task": "worker",
    "short_ids": "frames",
    **{name: "exceptions" for name in (
        "CommandError", "ConfigError", "EmbeddedRedisError", "EnvironmentMismatchError", "LaunchError",
        "NoWorkersError", "PayloadError", "RedisAuthError", "RedisUnavailableError", "RushError",
        "RushTimeoutError", "SignatureError", "TaskError", "UnknownTaskError", "WorkerError",
        "WorkerNotRunningError", "WorkerStartError")},
}

__all__ = [
    "CommandError",
    "ConfigError",
    "EmbeddedRedisError",
    "EnvironmentMismatchError",
    "LaunchError",
    "NoWorkersError",
    "PayloadError",
    "RedisAuthError",
    "RedisConfig",
    "RedisUnavailableError",
    "Rush",
    "RushError",
    "RushTimeoutError",
    "RushWorker",
    "SignatureError",
    "Task",
    "TaskError",
    "UnknownTaskError",
    "WorkerError",
    "WorkerNotRunningError",
    "WorkerStartError",
    "__version__",
    "rsh",
    "short_ids",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rush_hpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .config import RedisConfig
    from .controller import Rush, rsh
    from .exceptions import (CommandError, ConfigError, EmbeddedRedisError, EnvironmentMismatchError,
                             LaunchError, NoWorkersError, PayloadError, RedisAuthError, RedisUnavailableError,
                             RushError, RushTimeoutError, SignatureError, TaskError, UnknownTaskError,
                             WorkerError, WorkerNotRunningError, WorkerStartError)
    from .frames import short_ids
    from .worker import RushWorker, Task
