"""The fork server: local workers forked from one pre-imported template process.

For local workers, one template process per interpreter path and controller process (as
multiprocessing's forkserver): the controller asks it over a pipe to fork workers (``spawner.run_child``)
with the environment, working directory, import path and umask it would have given a fresh
interpreter (the environment as changes to the one the fork server started with, so what a
``python=`` wrapper set stays; variables read at interpreter start get a fork server of their own).
It reports each child's pid, start time and exit status back (requests and replies carry an id: a
late reply is never taken for the next one), and exits when the controller's end of the pipe closes
(the workers live on, as started ones do). A fork server that leaves a request unanswered is
replaced at the next start. Its processes are stopped when the controller's process exits.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Mapping, Sequence

from .spawner import _ROOM, FORK_ENV, cmdline_room, exit_code, preload, run_child, wait_ready, worker_argv

logger = logging.getLogger(__name__)


def serve() -> int:
    """The template process: import everything once, then fork workers on request.

    Requests (stdin) and events (stdout) are JSON lines; the first event is ``{"ready": room}``.
    A request ``{"id", "python", "network", "workers": [[id, out, err], ...], "env", "unset", "cwd",
    "path", "umask"}`` is answered with ``{"id", "pids": {id: pid}, "started": {id: start ticks}}``;
    each child's end with ``{"exit": [pid, code]}`` (always after the reply that named the pid).
    """
    preload()  # the point of the template
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the controller's
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    base_path = list(sys.path[1:])
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    base_path = [p for p in base_path if p not in inherited]
    _send({"ready": cmdline_room()})
    pending = b""
    while True:
        readable = select.select([0, wake_read], [], [])[0]
        if wake_read in readable:
            while _drain(wake_read):
                pass
        _reap()
        if 0 in readable:
            chunk = os.read(0, 65536)
            if not chunk:
                return 0  # the controller is gone; its workers live on
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                _send(_fork_request(json.loads(line), base_path))


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 512))
    except BlockingIOError:
        return False


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send({"exit": [pid, exit_code(status)]})


def _fork_request(request: dict[str, Any], base_path: list[str]) -> dict[str, Any]:
    pids: dict[str, int] = {}
    started: dict[str, int | None] = {}
    read, write = os.pipe()
    try:
        for worker_id, output, errors in request["workers"]:
            pid = os.fork()
            if pid == 0:
                os.close(read)
                run_child(request["python"], request["network"], worker_id, output, errors, write,
                          lambda: _enter(request, base_path))
            pids[worker_id] = pid
            started[worker_id] = start_ticks(pid)  # not reaped before this reply is sent: still this child
    except Exception as error:  # noqa: BLE001 - reported to the controller with what did start
        return {"id": request.get("id"), "pids": pids, "started": started,
                "error": f"{type(error).__name__}: {error}"}
    finally:
        wait_ready(read, write)
    return {"id": request.get("id"), "pids": pids, "started": started}


def _enter(request: dict[str, Any], base_path: list[str]) -> None:
    """Give the child what a fresh interpreter started by the controller would have: the
    controller's changes to the environment the fork server started with, on top of the fork
    server's own (which keeps what a ``python=`` wrapper set), its working directory, import path
    and umask."""
    for name in request.get("unset", ()):
        os.environ.pop(name, None)
    os.environ.update(request["env"])
    if request.get("umask") is not None:
        os.umask(int(request["umask"]))
    os.chdir(request["cwd"])
    sys.path[:] = [request["cwd"], *request["path"], *base_path]
    import importlib

    importlib.invalidate_caches()


def _send(event: dict[str, Any]) -> None:
    data = (json.dumps(event) + "\n").encode()
    while data:
        data = data[os.write(1, data):]


class ForkedProcess:
    """A worker forked by a ``Template``: the parts of ``Popen`` the local handles use. Its exit
    status is set by the template's reader (the fork server reports it), never looked up by pid:
    a pid may be reused by a later worker."""

    def __init__(self, template: Template, pid: int, started: int | None = None) -> None:
        self.template, self.pid, self.started = template, pid, started
        self.returncode: int | None = None

    @property
    def orphaned(self) -> bool:
        """The template is gone: this worker's exit status will never be reported."""
        return self.returncode is None and not self.template.alive

    def poll(self) -> int | None:
        return self.returncode

    def is_running(self) -> bool:
        """Still this very process (pid and start time as the fork server saw them at fork),
        whatever command line it shows now (a loop may set its own process title)."""
        return self.returncode is None and self.started is not None and start_ticks(self.pid) == self.started

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.template.changed:
            while self.poll() is None:
                if self.orphaned:
                    raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
                self.template.changed.wait(left)
        assert self.returncode is not None
        return self.returncode


def start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22): with the
    pid, what identifies one process for its whole life (a reused pid starts later)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


#: environment variables an interpreter reads once, at start (a forked child keeps the fork
#: server's): a start whose values differ gets a fork server of its own
INTERPRETER_VARIABLES = ("PYTHONHASHSEED", "PYTHONWARNINGS", "PYTHONOPTIMIZE", "PYTHONDONTWRITEBYTECODE",
                         "PYTHONMALLOC", "PYTHONUTF8", "PYTHONIOENCODING", "PYTHONHOME", "PYTHONNOUSERSITE",
                         "PYTHONUSERBASE", "PYTHONDEVMODE", "PYTHONFAULTHANDLER", "PYTHONTRACEMALLOC",
                         "PYTHONSAFEPATH", "PYTHONPLATLIBDIR", "PYTHONINTMAXSTRDIGITS", "LD_LIBRARY_PATH",
                         "LD_PRELOAD", "MALLOC_ARENA_MAX")


def interpreter_key(env: Mapping[str, str]) -> tuple[tuple[str, str | None], ...]:
    """What of ``env`` a fork server fixes at its start (see ``INTERPRETER_VARIABLES``)."""
    return tuple((name, env.get(name)) for name in INTERPRETER_VARIABLES)


class Template:
    """The controller's side of one fork server (see ``serve``)."""

    def __init__(self, python: str, env: Mapping[str, str]) -> None:
        self.python = python
        self.env = dict(env)  # what the fork server started with: later requests send changes to it
        self.owner = os.getpid()  # a forked copy of the controller must not share this pipe
        self.process = subprocess.Popen([python, "-m", "rush_hpc", "worker", "--fork-server", _ROOM],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, env=self.env, start_new_session=True)
        self.changed = threading.Condition()
        self._running: dict[int, ForkedProcess] = {}  # forked, exit not reported yet (by pid, while it lives)
        self._replies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._request = 0  # the id of the request whose reply ``_reply`` waits for (0: the ready line)
        self.alive = True
        self.stalled = False  # a request went unanswered: the next start gets a new fork server
        self.room = 0
        self._reader = threading.Thread(target=self._read, name=f"rush-fork-server-{self.process.pid}",
                                        daemon=True)
        self._reader.start()
        ready = self._reply(timeout=60)
        self.room = int(ready.get("ready", 0)) if ready else 0

    def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            for line in self.process.stdout:
                try:
                    event = json.loads(line)
                    if not isinstance(event, dict):
                        raise ValueError("not an object")
                    self._event(event)
                except (ValueError, TypeError, KeyError, IndexError):
                    # a sitecustomize / .pth that prints: not ours, skip it
                    logger.debug("fork server %s: skipped a line: %r", self.process.pid, line[:200])
        finally:
            self.process.stdout.close()
            with self.changed:
                self.alive = False
                self.changed.notify_all()
            self.process.wait()

    def _event(self, event: dict[str, Any]) -> None:
        with self.changed:
            if "exit" in event:
                pid, code = int(event["exit"][0]), int(event["exit"][1])
                process = self._running.pop(pid, None)
                if process is not None:
                    process.returncode = code
            elif "pids" in event:
                # a reused pid now names this new process (the old one's exit came before: the
                # fork server reaped it, only then could the pid be reused)
                started = event.get("started") or {}
                processes = {}
                for worker_id, pid in dict(event["pids"]).items():
                    process = ForkedProcess(self, int(pid), started.get(worker_id))
                    self._running[process.pid] = processes[worker_id] = process
                event["processes"] = processes
                self._replies.append(event)
            elif "ready" in event:
                self._replies.append(event)
            else:
                raise ValueError("unknown event")
            self.changed.notify_all()

    def _reply(self, timeout: float) -> dict[str, Any] | None:
        """The reply to the current request; replies to earlier requests (late: their caller gave
        up waiting) are dropped."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                while self._replies:
                    reply = self._replies.pop(0)
                    if reply.get("id", 0) == self._request:
                        return reply
                    logger.warning("fork server %s: dropped a late reply (request %s)", self.process.pid,
                                   reply.get("id"))
                left = deadline - time.monotonic()
                if not self.alive or left <= 0:
                    return None
                self.changed.wait(left)

    def fits(self, network: str, worker_ids: Sequence[str]) -> bool:
        """Whether every child can show its own worker command line (else: start interpreters)."""
        longest = max(worker_ids, key=len)
        return self.alive and len(b"\0".join(os.fsencode(a) for a in
                                             worker_argv(self.python, network, longest))) + 1 <= self.room

    def fork(self, network: str, workers: Sequence[tuple[str, str, str]], env: Mapping[str, str],
             cwd: str, path: Sequence[str]) -> tuple[dict[str, ForkedProcess] | None, str | None]:
        """Fork ``workers`` (id, stdout path, stderr path); returns their processes and an error
        (fork failed part way: the returned ones did start). None instead of processes: no answer
        came, so some workers may run.

        The environment goes as changes to the one the fork server started with, applied to the
        fork server's own: what a ``python=`` wrapper set up (module load, conda, a container)
        stays, as it would in an interpreter that wrapper starts."""
        changed = {k: v for k, v in env.items() if self.env.get(k) != v}
        removed = [k for k in self.env if k not in env]
        with self._lock:
            self._request += 1
            request = {"id": self._request, "python": self.python, "network": network,
                       "workers": [list(w) for w in workers], "env": changed, "unset": removed, "cwd": cwd,
                       "path": list(path), "umask": _umask()}
            assert self.process.stdin is not None
            try:
                self.process.stdin.write((json.dumps(request) + "\n").encode())
                self.process.stdin.flush()
            except (OSError, ValueError) as error:  # ValueError: another thread stopped it (closed pipe)
                return {}, f"the fork server is gone: {error}"
            reply = self._reply(timeout=60)
        if reply is None:
            self.stalled = True
            return None, "the fork server did not answer within 60 s"
        return reply["processes"], reply.get("error")

    def stop(self) -> None:
        """Close the pipe: the template exits (its workers do not)."""
        if self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)


def _umask() -> int | None:
    """This process's umask, from ``/proc/self/status`` (``os.umask`` would change it for a moment,
    for every thread)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


_TEMPLATES: dict[tuple[str, tuple[tuple[str, str | None], ...]], Template | None] = {}
_TEMPLATES_LOCK = threading.Lock()
_AT_EXIT = False


def enabled() -> bool:
    """Fork servers are used where fork and the command-line rewrite work, unless
    ``RUSH_HPC_FORK_SERVER=0`` asks for one interpreter per worker."""
    return hasattr(os, "fork") and sys.platform.startswith("linux") and os.environ.get(FORK_ENV, "1") != "0"


def template(python: str, env: Mapping[str, str]) -> Template | None:
    """This process's fork server for ``python`` and the interpreter variables of ``env`` (see
    ``INTERPRETER_VARIABLES``), started at first use (the first start pays one import); None if
    it cannot run (then workers start as interpreters of their own). Older fork servers stay:
    they report the exits of the workers they forked."""
    key = (python, interpreter_key(env))
    with _TEMPLATES_LOCK:
        current = _TEMPLATES.get(key)
        if current is not None and current.owner != os.getpid():
            current = None  # inherited through a fork of this process: its pipe is the parent's
            _TEMPLATES.clear()
        if current is not None and current.alive and not current.stalled:
            return current
        if key in _TEMPLATES and current is None:
            return None  # failed before: do not pay for a broken interpreter again
        if current is not None:
            current.stop()  # it died (killed) or stalled: stop and reap it, start another
        global _AT_EXIT
        if not _AT_EXIT:  # registered at the first fork server, not at import
            atexit.register(stop_templates)
            _AT_EXIT = True
        try:
            current = Template(python, env)
        except OSError as error:
            logger.info("no fork server for %s (%s): starting interpreters", python, error)
            current = None
        if current is not None and not current.room:
            current.stop()
            logger.info("the fork server for %s did not start: starting interpreters", python)
            current = None
        _TEMPLATES[key] = current
        return current


def stop_templates() -> None:
    """Stop this process's fork servers (at exit; tests)."""
    with _TEMPLATES_LOCK:
        for current in _TEMPLATES.values():
            if current is not None and current.owner == os.getpid():
                current.stop()
        _TEMPLATES.clear()
