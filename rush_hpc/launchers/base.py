"""The one small interface every launcher implements, and the command every launcher starts.

A launcher knows how to start N copies of the worker command, report which of them are gone (and
why), kill them, and show the script it would run. Everything else - payload, registration,
heartbeats, lost-task handling - lives in the controller and the bootstrap and is the same for all.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Sequence

from ..exceptions import CommandError, tail

logger = logging.getLogger(__name__)

WorkerInfo = Mapping[str, str]


@dataclass(frozen=True)
class WorkerCommand:
    """``python -m rush_hpc worker --network N --worker-id ID``, plus the environment it needs.

    Secrets are not in here: the environment only names the credentials file.
    """

    network: str
    python: str
    env: Mapping[str, str] = field(default_factory=dict)

    def argv(self, worker_id: str | None) -> list[str]:
        """The command; without ``worker_id`` the worker makes up its own id."""
        argv = [self.python, "-m", "rush_hpc", "worker", "--network", self.network]
        return argv + ["--worker-id", worker_id] if worker_id else argv

    def shell(self, worker_id: str | None, *, with_env: bool = True) -> str:
        """One shell line, every value quoted (safe to paste into a remote shell or job script)."""
        assignments = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())] if with_env else []
        return " ".join(assignments + [shlex.quote(a) for a in self.argv(worker_id)])

    def export_lines(self) -> list[str]:
        return [f"export {k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]


class Launcher(ABC):
    """Starts, checks and kills workers of one kind."""

    name: ClassVar[str]
    #: kill through the launcher even when the worker answered the kill message (frees a SLURM job)
    always_force_kill: ClassVar[bool] = False

    @abstractmethod
    def start(self, worker_ids: Sequence[str], command: WorkerCommand) -> dict[str, dict[str, str]]:
        """Start one worker per id; returns what is known of each (pid, host, job_id, log paths)."""

    def gone(self, infos: Mapping[str, WorkerInfo]) -> dict[str, str]:
        """Workers whose process or job has ended, with the reason; unknown ones are left out."""
        return {}

    def kill(self, infos: Mapping[str, WorkerInfo]) -> None:
        """Force-kill these workers (after they did not answer the kill message through Redis)."""

    def output_tail(self, info: WorkerInfo, lines: int = 20) -> str:
        """The end of a worker's stderr/stdout, for "never started" and crash reports."""
        return ""


def call(cmd: Sequence[str], *, timeout: float = 60, env: Mapping[str, str] | None = None,
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


def read_tail(path: str | None, lines: int = 20) -> str:
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
