"""Every error rush-hpc raises on purpose, in one place.

The hierarchy::

    RushError
    ├── ConfigError                 a bad option or URL; the message names the fix
    ├── RedisUnavailableError       Redis cannot be reached (the URL is shown with the password redacted)
    │   └── RedisAuthError          wrong password / unknown ACL user / missing permission
    ├── EmbeddedRedisError          no redis-server to start, or it would not start
    ├── TaskError                   bad task input (length mismatch, values that are not dicts, ...)
    │   └── UnknownTaskError        a task key that this network does not hold
    ├── PayloadError                the worker loop payload cannot be stored or loaded
    │   ├── SignatureError          a pickled value without a valid HMAC signature: refused, never unpickled
    │   └── EnvironmentMismatchError  the worker's Python / cloudpickle / rush-hpc differ from the controller's
    ├── WorkerError                 a worker failed to start or misbehaved
    │   ├── WorkerStartError        workers that exited or failed before registering (with their stderr tail)
    │   ├── WorkerNotRunningError   a worker that is no longer "running" (lost, killed, ended, reset) tried to
    │   │                           change a task: refused in Redis; its loop ends
    │   └── NoWorkersError          a wait for tasks that cannot end: no worker is alive or starting
    ├── LaunchError                 a launcher could not start some workers (per host / per job reasons)
    │   └── CommandError            an external command (sbatch, ssh, ...) exited non-zero
    └── RushTimeoutError            a wait ran out of time (named so that it does not shadow ``TimeoutError``)
"""

from __future__ import annotations



class RushError(Exception):
    """Base class of every error rush-hpc raises on purpose."""


class ConfigError(RushError, ValueError):
    """An option or URL is invalid."""


class RedisUnavailableError(RushError):
    """Redis cannot be reached."""


class RedisAuthError(RedisUnavailableError):
    """Redis refused the credentials."""


class EmbeddedRedisError(RushError):
    """The embedded redis-server cannot be found or started."""


class TaskError(RushError, ValueError):
    """Task input is malformed."""


class UnknownTaskError(TaskError, KeyError):
    """A task key is not part of this network."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PayloadError(RushError):
    """The worker loop payload cannot be stored or loaded."""


class SignatureError(PayloadError):
    """A pickled value has no valid signature; it was not unpickled."""


class EnvironmentMismatchError(PayloadError):
    """The worker's environment does not match the controller's."""


class WorkerError(RushError):
    """A worker failed."""


class WorkerStartError(WorkerError):
    """Workers exited or failed before they registered."""

    def __init__(self, message: str, failures: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or {}


class WorkerNotRunningError(WorkerError):
    """This worker may no longer change tasks: the controller declared it lost or killed, it ended,
    or its network was reset. Raised by every task call; it ends the worker loop."""

    def __init__(self, worker_id: str, state: str) -> None:
        super().__init__(f"worker {worker_id} is {state}, not running: Redis refused the task change "
                         "(its tasks were released to other workers); the worker stops")
        self.worker_id, self.state = worker_id, state


class NoWorkersError(WorkerError):
    """Waiting for tasks that no worker is alive to run."""


class LaunchError(RushError):
    """A launcher could not start some workers.

    ``started`` holds the ids of workers that did start (``infos``: what the launcher knows of
    them), ``failures`` maps a host or job to its reason. ``maybe_started``: the outcome is unknown
    (sbatch timed out, the SSH connection broke after the command was sent): the workers that did
    not start for sure may still come up later.
    """

    def __init__(self, message: str, started: list[str] | None = None,
                 failures: dict[str, str] | None = None,
                 infos: dict[str, dict[str, str]] | None = None, maybe_started: bool = False) -> None:
        super().__init__(message)
        self.started = started or []
        self.failures = failures or {}
        self.infos = infos or {}
        self.maybe_started = maybe_started


class CommandError(LaunchError):
    """An external command exited non-zero; carries the command, exit code and output."""

    def __init__(self, cmd: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.cmd, self.returncode, self.stdout, self.stderr = cmd, returncode, stdout, stderr
        tail = "\n".join((stderr or stdout).strip().splitlines()[-10:])
        super().__init__(f"command {' '.join(cmd)!s} exited with {returncode}:\n{tail}")


class RushTimeoutError(RushError, TimeoutError):
    """A wait ran out of time."""


def tail(text: str | bytes | None, lines: int = 20) -> str:
    """The last ``lines`` lines of ``text``: what error messages show of a log."""
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])

