"""Workers as local subprocesses (psutil checks liveness, Popen reaps them)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import psutil

from .base import Launcher, WorkerCommand, WorkerInfo, read_tail


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie counts as dead (PID 1 may reap late)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, log_dir: str | os.PathLike[str], python: str | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.python = python or sys.executable
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, worker_ids: Sequence[str], command: WorkerCommand) -> dict[str, dict[str, str]]:
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = {**os.environ, **command.env, "RUSH_HPC_LAUNCHER": self.name}
        infos: dict[str, dict[str, str]] = {}
        for worker_id in worker_ids:
            stdout, stderr = self.log_dir / f"{worker_id}.out", self.log_dir / f"{worker_id}.err"
            with open(stdout, "wb") as out, open(stderr, "wb") as err:
                process = subprocess.Popen(command.argv(worker_id), env=env, stdin=subprocess.DEVNULL,
                                           stdout=out, stderr=err, start_new_session=True)
            self.processes[worker_id] = process
            infos[worker_id] = {"launcher": self.name, "host": socket.gethostname(),
                                "pid": str(process.pid), "stdout": str(stdout), "stderr": str(stderr)}
        return infos

    def gone(self, infos: Mapping[str, WorkerInfo]) -> dict[str, str]:
        reasons = {}
        for worker_id, info in infos.items():
            process = self.processes.get(worker_id)
            if process is not None:
                if process.poll() is not None:
                    reasons[worker_id] = f"process {process.pid} {describe_exit(process.returncode)}"
            elif info.get("pid") and info.get("host") == socket.gethostname():
                if not pid_alive(int(info["pid"])):
                    reasons[worker_id] = f"process {info['pid']} is gone"
        return reasons

    def kill(self, infos: Mapping[str, WorkerInfo]) -> None:
        for worker_id, info in infos.items():
            process = self.processes.get(worker_id)
            pid = process.pid if process is not None else int(info.get("pid") or 0)
            if pid and (process is None or process.poll() is None):
                try:
                    os.killpg(pid, signal.SIGKILL)  # the worker leads its own session
                except ProcessLookupError:
                    pass
            if process is not None:
                process.wait(10)

    def output_tail(self, info: WorkerInfo, lines: int = 20) -> str:
        return read_tail(info.get("stderr"), lines) or read_tail(info.get("stdout"), lines)

    def reap(self, timeout: float = 0.0) -> None:
        """Collect exited children (waiting up to ``timeout`` for ending ones); keep the rest alive.

        Workers that still run are deliberately left running (a controller may exit while its
        workers go on); their handles move to a module-level list so no ResourceWarning fires.
        """
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _DETACHED.append(process)
        self.processes.clear()


_DETACHED: list[subprocess.Popen[bytes]] = []
