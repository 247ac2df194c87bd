"""The one small interface of every launcher: a starter and the typed handles it returns.

A launcher starts N copies of the worker command and returns one ``Handle`` per worker (as
submitit splits executor and job). A handle checks whether its worker's process / job has ended,
kills it, shows the end of its output and round-trips through the worker's hash in Redis.

Two kinds of handles, and the difference matters (Redis content is untrusted input):

* handles a launcher returned from ``start`` are *trusted*: held in memory by the controller that
  started the workers, they may read the worker's output files and signal its process;
* handles rebuilt by ``from_info`` from a worker hash (a second controller: ``rush-hpc lost``,
  ``rush-hpc stop --kill``) are *untrusted*: every value is validated strictly (job ids, pids that
  belong to this user and run this very worker, hosts from the controller's own host list), and
  they never read a file whose path came from Redis.

Handles are found by the registry of launcher names (``handle_from_info``), so any controller can
check and kill any worker without knowing which launcher class started it.
"""

from __future__ import annotations

import importlib
import logging
import re
import shlex
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence, TypeVar

from .. import defaults
from ..exceptions import CommandError, ConfigError, tail

logger = logging.getLogger(__name__)

WorkerInfo = Mapping[str, str]
H = TypeVar("H", bound="Handle")

JOB_ID = re.compile(r"^\d+(_\d+)?$")
WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DIRECTIVE_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_LINE_BREAKS = ("\r", "\n", "\0")


# -- validation of launcher values (they end up in shell lines and job scripts) ----------------
def check_line(option: str, value: Any) -> Any:
    """Refuse CR, LF and NUL in a value that becomes (part of) one shell line or directive."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    if any(c in text for c in _LINE_BREAKS):
        raise ConfigError(f"{option} may not contain a line break or NUL character, got {text!r}")
    return value


def check_no_nul(option: str, value: Any) -> Any:
    """Refuse NUL in a value that may span lines (setup lines): bash would drop the rest silently."""
    if value is not None and "\0" in str(value):
        raise ConfigError(f"{option} may not contain a NUL character, got {str(value)!r}")
    return value


def check_name(option: str, name: Any, pattern: re.Pattern[str]) -> str:
    """Refuse a name (directive, environment variable) that does not match ``pattern``."""
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise ConfigError(f"{option}: invalid name {name!r} (must match {pattern.pattern})")
    return name


# -- strict parsing of values read from Redis --------------------------------------------------
class InvalidInfo(ValueError):
    """A worker hash value that failed validation: the handle is not built, nothing is acted on."""


def valid_worker_id(value: str) -> str:
    if not WORKER_ID.fullmatch(value or ""):
        raise InvalidInfo(f"invalid worker id {value!r}")
    return value


def valid_job_id(value: str | None) -> str:
    if not value or not JOB_ID.fullmatch(value):
        raise InvalidInfo(f"invalid SLURM job id {value!r}")
    return value


def valid_pid(value: str | None) -> int:
    if not value or not value.isdigit() or not 1 < int(value) < 2**22:
        raise InvalidInfo(f"invalid pid {value!r}")
    return int(value)


LAUNCHER_ENV = "RUSH_HPC_LAUNCHER"


@dataclass(frozen=True)
class WorkerCommand:
    """``python -m rush_hpc worker --network N --worker-id ID``, plus the environment it needs.

    Every launcher starts this same command; only how it is started differs. Secrets are not in
    here: the environment only names the credentials file. ``launcher`` (set by the controller's
    one start path) reaches the worker as ``RUSH_HPC_LAUNCHER``, the same way for every launcher.
    """

    network: str
    python: str
    env: Mapping[str, str] = field(default_factory=dict)
    launcher: str | None = None

    def environment(self) -> dict[str, str]:
        """The variables the worker needs (credentials file, launcher name), sorted."""
        env = dict(self.env)
        if self.launcher:
            env[LAUNCHER_ENV] = self.launcher
        return dict(sorted(env.items()))

    def argv(self, worker_id: str | None) -> list[str]:
        """The command; without ``worker_id`` the worker makes up its own id."""
        argv = [self.python, "-m", "rush_hpc", "worker", "--network", self.network]
        return argv + ["--worker-id", worker_id] if worker_id else argv

    def shell(self, worker_id: str | None, *, with_env: bool = True) -> str:
        """One shell line, every value quoted (safe to paste into a remote shell or job script)."""
        assignments = [f"{k}={shlex.quote(v)}" for k, v in self.environment().items()] if with_env else []
        return " ".join(assignments + [shlex.quote(a) for a in self.argv(worker_id)])

    def export_lines(self) -> list[str]:
        return [f"export {k}={shlex.quote(v)}" for k, v in self.environment().items()]


@dataclass
class HandleContext:
    """What a controller knows by itself (never from Redis) when rebuilding handles from info.

    ``ssh``: the SSH launchers this controller built; their host lists are the only hosts a
    handle from Redis may contact. A second controller without them does not ssh anywhere.
    ``logins``: the SLURM login nodes this controller connected to (``start_sbatch_workers(login=)``),
    the only ones where a handle from Redis may run squeue / sacct / scancel.
    """

    ssh: list[Any] = field(default_factory=list)
    logins: list[Any] = field(default_factory=list)
    #: the controller's network: a SLURM job named in Redis is cancelled only if it carries its comment
    network: str | None = None


class Handle(ABC):
    """One started worker as its launcher knows it. See the module docstring on trust."""

    launcher: ClassVar[str]
    #: kill through the launcher even when the worker answered the kill message (frees a SLURM job)
    always_force_kill: ClassVar[bool] = False
    #: also kill the workers of this kind that are declared lost (a SLURM job may be requeued)
    kill_when_lost: ClassVar[bool] = False
    #: field of the worker hash that records a forced kill even when the worker ended cleanly
    kill_record: ClassVar[str | None] = None
    #: ``final_states`` asks the scheduler (recorded as ``job_state`` once the worker ended)
    reports_final_state: ClassVar[bool] = False
    #: ``check`` is also asked about registered workers (not only those that never registered)
    checks_running_workers: ClassVar[bool] = True

    def __init__(self, worker_id: str, *, trusted: bool) -> None:
        self.worker_id = worker_id
        self.trusted = trusted

    # -- Redis round trip ----------------------------------------------------------------------
    @abstractmethod
    def to_info(self) -> dict[str, str]:
        """What goes into the worker hash (for people and for ``from_info``)."""

    @classmethod
    @abstractmethod
    def from_info(cls: type[H], worker_id: str, info: WorkerInfo, context: HandleContext) -> H:
        """An untrusted handle rebuilt from a worker hash; raises ``InvalidInfo`` on bad values."""

    # -- supervision (class methods work on a batch: one sacct / one ssh round trip per batch) ---
    def gone(self) -> str | None:
        """Why this worker's process / job has ended, or None (running, or unknown)."""
        return None

    @classmethod
    def check(cls, handles: Sequence[Handle]) -> dict[str, str]:
        """``{worker_id: reason}`` for the handles whose process / job has ended."""
        reasons = {}
        for handle in handles:
            reason = handle.gone()
            if reason:
                reasons[handle.worker_id] = reason
        return reasons

    @classmethod
    def start_problems(cls, handles: Sequence[Handle]) -> dict[str, str]:
        """Workers that will not start by waiting (e.g. a job pending for a reason that never
        clears), with the reason and the fix; ``wait_for_workers`` reports them at once."""
        return {}

    @classmethod
    def final_states(cls, handles: Sequence[Handle]) -> dict[str, str]:
        """``{worker_id: final state}`` the scheduler reports for ended workers (SLURM only)."""
        return {}

    def kill(self) -> None:
        """Force-kill this worker (after it did not answer the kill message through Redis)."""

    @classmethod
    def kill_all(cls, handles: Sequence[Handle]) -> None:
        for handle in handles:
            try:
                handle.kill()
            except Exception as error:  # noqa: BLE001 - one failing kill must not stop the others
                logger.warning("could not kill worker %s: %s", handle.worker_id, error)

    def output_tail(self, lines: int = defaults.OUTPUT_TAIL_LINES) -> str:
        """The end of the worker's output, for start failures; only from paths held in memory."""
        return ""

    def reap(self, timeout: float = 0.0) -> None:
        """Collect an exited child process (local workers); nothing for the others."""

    def release(self) -> None:
        """Give up resources held for the worker (temporary files); called after it is gone."""

    def __repr__(self) -> str:
        kind = "trusted" if self.trusted else "from Redis"
        return f"<{type(self).__name__} {self.worker_id} {self.to_info()} ({kind})>"


class Launcher(ABC):
    """Starts workers of one kind; returns their handles and keeps them in ``handles``."""

    name: ClassVar[str]
    python: str

    def __init__(self) -> None:
        self.handles: dict[str, Handle] = {}

    @abstractmethod
    def start(self, worker_ids: Sequence[str], command: WorkerCommand) -> list[Handle]:
        """Start one worker per id. On a partial failure raise ``LaunchError`` whose ``started``
        lists the ids that did start (their handles are in ``self.handles``)."""


# -- the registry: launcher name (stored in the worker hash) -> handle class --------------------
_REGISTRY: dict[str, str | type[Handle]] = {
    "local": "local:LocalHandle",
    "ssh": "ssh:SshHandle",
    "slurm": "slurm:SlurmHandle",
    "sbatch": "slurm:SbatchHandle",
}


def register_handle(name: str, handle_type: type[Handle]) -> None:
    """Make workers of launcher ``name`` checkable and killable by any controller."""
    _REGISTRY[name] = handle_type


def handle_type(name: str | None) -> type[Handle] | None:
    entry = _REGISTRY.get(name or "")
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        entry = getattr(importlib.import_module(f"{__package__}.{module}"), cls)
        _REGISTRY[name or ""] = entry
    return entry


def handle_from_info(worker_id: str, info: WorkerInfo, context: HandleContext) -> Handle | None:
    """An untrusted handle for a worker another controller started, or None if it cannot be
    checked (unknown launcher, a value that fails validation, a host not in our own list)."""
    kind = handle_type(info.get("launcher"))
    if kind is None:
        return None
    try:
        return kind.from_info(valid_worker_id(worker_id), info, context)
    except InvalidInfo as error:
        logger.warning("worker %s: not acting on its record in Redis: %s", worker_id[:64], error)
        return None


# -- the one subprocess seam ---------------------------------------------------------------
def call(cmd: Sequence[str], *, timeout: float = defaults.COMMAND_TIMEOUT, env: Mapping[str, str] | None = None,
         input: str | None = None) -> str:
    """Run a command without a shell; returns stdout, raises ``CommandError`` with the output tail."""
    logger.debug("running %s", " ".join(shlex.quote(c) for c in cmd))
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                                env=dict(env) if env is not None else None, input=input)
    except FileNotFoundError:
        raise CommandError(list(cmd), 127, "", f"{cmd[0]}: command not found") from None
    except subprocess.TimeoutExpired as error:
        raise CommandError(list(cmd), -1, str(error.stdout or ""), f"timed out after {timeout} s") from None
    if result.returncode != 0:
        raise CommandError(list(cmd), result.returncode, result.stdout, result.stderr)
    return result.stdout


def read_tail(path: str | None, lines: int = defaults.OUTPUT_TAIL_LINES) -> str:
    """The end of a local file. Call it only with a path a trusted handle holds, never one from Redis."""
    if not path:
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - 16384))
            return tail(handle.read(), lines)
    except OSError:
        return ""
