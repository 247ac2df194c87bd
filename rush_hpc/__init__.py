"""rush-hpc: asynchronous, distributed computing over a shared Redis database."""

__version__ = "0.1.0"

from .config import RedisConfig
from .controller import Rush, rsh
from .exceptions import (CommandError, ConfigError, EmbeddedRedisError, EnvironmentMismatchError,
                         LaunchError, PayloadError, RedisAuthError, RedisUnavailableError, RushError,
                         RushTimeoutError, SignatureError, TaskError, UnknownTaskError, WorkerError,
                         WorkerStartError)
from .worker import RushWorker, Task

__all__ = [
    "CommandError",
    "ConfigError",
    "EmbeddedRedisError",
    "EnvironmentMismatchError",
    "LaunchError",
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
    "WorkerStartError",
    "__version__",
    "rsh",
]
