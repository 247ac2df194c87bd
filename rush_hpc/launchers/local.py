"""Workers as local processes: forked by this process's fork server (``forkserver.Template``: one
import for all workers), or, where that is impossible, one interpreter each (``Popen``). psutil
checks liveness; the fork server / Popen reaps them and reports their exit status."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import psutil

from .. import defaults, forkserver
from ..exceptions import LaunchError
from .base import (Handle, HandleContext, InvalidInfo, Launcher, WorkerCommand, WorkerInfo, read_tail,
                   valid_pid)

logger = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie counts as dead (PID 1 may reap late)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def is_our_worker(pid: int, worker_id: str, network: str | None = None) -> bool:
    """True if ``pid`` is a live process of this user running ``rush_hpc worker --worker-id <id>``
    (of ``network``, when given).

    What a pid read from Redis must pass before it is signalled: a Redis writer could name pid 1,
    another user's process or a reused pid.
    """
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or process.uids().real != os.getuid():
            return False
        argv = process.cmdline()
    except psutil.Error:
        return False
    return worker_argv_matches(argv, worker_id, network)


def worker_argv_matches(argv: Sequence[str], worker_id: str, network: str | None = None) -> bool:
    """Whether a command line is ``... -m rush_hpc worker ... --worker-id <worker_id>`` (and
    ``--network <network>``, when given). A group's interpreter shows ``--group <n>`` instead of
    its workers' ids (``spawner.run_group``): it never passes for one of them."""
    argv = list(argv)
    if network is not None and not any(argv[i] == "--network" and argv[i + 1] == network
                                       for i in range(len(argv) - 1)):
        return False
    for i in range(len(argv) - 1):
        if argv[i] == "--worker-id" and argv[i + 1] == worker_id:
            return "rush_hpc" in argv and "worker" in argv
    return False


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def controller_pythonpath() -> str:
    """The controller's import path beyond the interpreter's own (script directory, cwd, PYTHONPATH),
    so that a loop importing a module next to the controller's script works in local workers."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    entries: list[str] = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if any(path == p or path.startswith(p + os.sep) for p in prefixes) or not os.path.isdir(path):
            continue
        if path not in entries:
            entries.append(path)
    return os.pathsep.join(entries)


class LocalHandle(Handle):
    """A local worker process. Trusted: holds the Popen and its log paths. From Redis: only a pid
    that must belong to this user and run this very worker, on this host."""

    launcher = "local"
    always_force_kill = True  # the whole process group goes, children of the loop included

    def __init__(self, worker_id: str, pid: int, *, host: str | None = None,
                 process: subprocess.Popen[bytes] | forkserver.ForkedProcess | None = None, stdout: Path | None = None,
                 stderr: Path | None = None, trusted: bool = True, network: str | None = None) -> None:
        super().__init__(worker_id, trusted=trusted)
        self.pid, self.host = pid, host or socket.gethostname()
        self.network = network  # when known: the pid checks match ``--network`` too
        self.process, self.stdout, self.stderr = process, stdout, stderr

    def to_info(self) -> dict[str, str]:
        info = {"launcher": self.launcher, "host": self.host, "pid": str(self.pid)}
        if self.stdout is not None and self.stderr is not None:
            info.update(stdout=str(self.stdout), stderr=str(self.stderr))
        return info

    @classmethod
    def from_info(cls, worker_id: str, info: WorkerInfo, context: HandleContext) -> LocalHandle:
        if info.get("host") != socket.gethostname():
            raise InvalidInfo(f"local worker of another host ({info.get('host')!r})")
        return cls(worker_id, valid_pid(info.get("pid")), trusted=False,  # no paths: never read from Redis
                   network=context.network)

    def gone(self) -> str | None:
        if self.process is not None:
            code = self.process.poll()
            if code is not None:
                return f"process {self.pid} {describe_exit(code)}"
            if not getattr(self.process, "orphaned", False):
                return None  # else its fork server is gone: ask the system
        if not self._is_this_worker():
            return f"process {self.pid} is gone"
        return None

    def _is_this_worker(self) -> bool:
        """Whether ``pid`` still runs this worker: for a forked one, the process the fork server
        forked (pid + start time, whatever title its loop set); else a process of this user
        showing this worker's command line."""
        if isinstance(self.process, forkserver.ForkedProcess) and self.process.started is not None:
            return self.process.is_running() and pid_alive(self.pid)
        return is_our_worker(self.pid, self.worker_id, self.network)

    def kill(self) -> None:
        if self.process is not None and not getattr(self.process, "orphaned", False):
            # a forked worker is reaped by its fork server, which may not have reported it yet:
            # check that the pid is still this very process (pid + start time: never signal a reused
            # pid; not its title, which the loop may have changed)
            if self.process.poll() is None and (isinstance(self.process, subprocess.Popen)
                                                or self._is_this_worker()):
                _killpg(self.pid)  # the worker leads its own session (start_new_session / setsid)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                if isinstance(self.process, subprocess.Popen):
                    raise
        elif self._is_this_worker():
            try:
                leader = os.getpgid(self.pid) == self.pid
            except ProcessLookupError:
                return
            _killpg(self.pid) if leader else _kill(self.pid)

    def output_tail(self, lines: int = defaults.OUTPUT_TAIL_LINES) -> str:
        if not self.trusted:
            return ""
        return read_tail(str(self.stderr) if self.stderr else None, lines) or \
            read_tail(str(self.stdout) if self.stdout else None, lines)

    def reap(self, timeout: float = 0.0) -> None:
        """Collect the exited child (waiting up to ``timeout``); a worker still running is left
        running (a controller may exit while its workers go on) and parked so no ResourceWarning fires."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            if isinstance(self.process, subprocess.Popen):
                _DETACHED.append(self.process)
        self.process = None if self.process.returncode is not None else self.process


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class LocalLauncher(Launcher):
    """Workers in their own sessions, with the controller's environment, import path and working
    directory: forked by the fork server of ``python`` (``fork=None``: unless ``RUSH_HPC_FORK_SERVER=0``),
    else (no fork server possible) children of this process, one interpreter each."""

    name = "local"

    def __init__(self, log_dir: str | os.PathLike[str], python: str | None = None,
                 fork: bool | None = None) -> None:
        super().__init__()
        self.log_dir = Path(log_dir)
        self.python = python or sys.executable
        self.fork = forkserver.enabled() if fork is None else fork and forkserver.enabled()

    def environment(self, command: WorkerCommand) -> dict[str, str]:
        env = {**os.environ, **command.environment()}
        path = controller_pythonpath()
        if path:
            env["PYTHONPATH"] = path
        return env

    def start(self, worker_ids: Sequence[str], command: WorkerCommand) -> list[Handle]:
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = self.environment(command)
        if self.fork and worker_ids:
            forked = self._fork(worker_ids, command, env)
            if forked is not None:
                return forked
        handles: list[Handle] = []
        for worker_id in worker_ids:
            stdout, stderr = self.log_dir / f"{worker_id}.out", self.log_dir / f"{worker_id}.err"
            with open(stdout, "wb") as out, open(stderr, "wb") as err:
                process = subprocess.Popen(command.argv(worker_id), env=env, stdin=subprocess.DEVNULL,
                                           stdout=out, stderr=err, start_new_session=True, cwd=os.getcwd())
            handle = LocalHandle(worker_id, process.pid, process=process, stdout=stdout, stderr=stderr,
                                 network=command.network)
            self.handles[worker_id] = handle
            handles.append(handle)
        return handles

    def _fork(self, worker_ids: Sequence[str], command: WorkerCommand, env: dict[str, str]) -> list[Handle] | None:
        """Ask the fork server for the workers; None: it cannot (start interpreters instead)."""
        template = forkserver.template(command.python, env)
        if template is None or not template.fits(command.network, worker_ids):
            return None
        files = {w: (self.log_dir / f"{w}.out", self.log_dir / f"{w}.err") for w in worker_ids}
        for paths in files.values():  # there when start returns, as for an interpreter of its own
            for path_ in paths:
                path_.open("wb").close()
        path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        processes, error = template.fork(command.network, [(w, str(o), str(e)) for w, (o, e) in files.items()],
                                         env, os.getcwd(), path)
        if processes is None:  # never start an id twice: these may run
            raise LaunchError(f"starting local workers: {error}", maybe_started=True)
        handles: list[Handle] = []
        for worker_id, process in processes.items():
            stdout, stderr = files[worker_id]
            handle = LocalHandle(worker_id, process.pid, process=process, stdout=stdout, stderr=stderr,
                                 network=command.network)
            self.handles[worker_id] = handle
            handles.append(handle)
        if error is None:
            return handles
        if not handles:
            logger.warning("fork server failed (%s): starting interpreters", error)
            return None
        raise LaunchError(f"the fork server started {len(handles)} of {len(worker_ids)} workers: {error}",
                          started=[h.worker_id for h in handles])


_DETACHED: list[subprocess.Popen[bytes]] = []


def wait_gone(handles: Sequence[LocalHandle], timeout: float) -> None:
    """Wait up to ``timeout`` for local workers to exit (used before removing their directory)."""
    deadline = time.monotonic() + timeout
    for handle in handles:
        handle.reap(max(0.0, deadline - time.monotonic()))
