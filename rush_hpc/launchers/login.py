"""SLURM from a laptop: the scheduler's client commands run on a login node over SSH.

``start_sbatch_workers(..., login="alice@login1")`` writes the job script and the 0600 credentials
file on the login node and runs ``sbatch`` there; the handles of those workers ask ``squeue`` /
``sacct`` and ``scancel`` through the same connection. Everything the SSH launcher guarantees holds
here too, because it is the same code: the host key is checked against known_hosts before anything
is sent (``ssh_connection.open_connection``), every argument is shell-quoted, secrets travel on
stdin, never on a command line.

One SSH connection per login node is kept open and shared (a lock serialises its use; a broken
connection is reopened once per call), so a monitor checking jobs every few seconds does not pay an
SSH handshake each time.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import threading
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..defaults import OUTPUT_TAIL_LINES, SSH_CONNECT_TIMEOUT
from ..exceptions import CommandError, ConfigError, LaunchError
from .base import check_line
from .ssh_connection import HostKeyError, check_host_key_policy, open_connection

if TYPE_CHECKING:
    from fabric import Connection

logger = logging.getLogger(__name__)

#: options of ``start_sbatch_workers`` that configure the SSH connection to the login node
CONNECTION_OPTIONS = ("ssh_config", "connect_kwargs", "gateway", "connect_timeout", "host_key_policy")

# The remote directory must be ours and not writable by group/others, and so must every directory
# above it (owned by us or root; writable by others only with the sticky bit, as /tmp): else
# another user could swap the directory or the job script, or redirect the job's output, between
# our check and SLURM's opening the files at job start. Symlinks are resolved first ($R is the
# real path; job output paths use it). Run with $D set; sets $R.
_SAFE_DIRECTORY = (
    'set -e; (umask 077 && mkdir -p -- "$D"); R=$(readlink -f -- "$D"); U=$(id -u); set -f; '
    'bad() { echo "log_dir $D: $1 (fix: use a directory only you can write, e.g. under your home, '
    'or chmod go-w it)" >&2; exit 3; }; '
    'P=/; REST=${R#/}; while :; do '
    'O=$(stat -c %u -- "$P"); [ "$O" = 0 ] || [ "$O" = "$U" ] || bad "$P is owned by another user"; '
    '[ -z "$(find "$P" -maxdepth 0 -perm /022 ! -perm -1000)" ] || bad "$P is writable by others"; '
    '[ -n "$REST" ] || break; P=${P%/}/${REST%%/*}; case $REST in */*) REST=${REST#*/};; *) REST=;; esac; '
    'done; [ -O "$R" ] || bad "$R is not owned by you"; '
    '[ -z "$(find "$R" -maxdepth 0 -perm /022)" ] || bad "$R is writable by group or others"')


def parse_target(target: str) -> tuple[str | None, str, int | None]:
    """``"host"``, ``"user@host"`` or ``"user@host:port"`` -> (user, host, port)."""
    check_line("login", target)
    if not isinstance(target, str) or not target or any(c.isspace() for c in target):
        raise ConfigError(f"login must be 'host', 'user@host' or 'user@host:port', got {target!r}")
    user, _, host = target.rpartition("@")
    port: int | None = None
    if host.count(":") == 1:
        host, port_text = host.split(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"login: bad port in {target!r}")
        port = int(port_text)
    if not host or host.startswith("-"):
        raise ConfigError(f"login must name a host, got {target!r}")
    return user or None, host, port


class LoginNode:
    """Runs commands and writes private files on a SLURM login node over one checked SSH connection."""

    def __init__(self, target: str, *, ssh_config: str | None = None,
                 connect_kwargs: Mapping[str, Any] | None = None, gateway: str | None = None,
                 connect_timeout: float = SSH_CONNECT_TIMEOUT, host_key_policy: str | None = None) -> None:
        self.user, self.host, self.port = parse_target(target)
        check_line("gateway", gateway)
        self.options: dict[str, Any] = {"ssh_config": ssh_config, "connect_kwargs": dict(connect_kwargs or {}),
                                        "gateway": gateway, "timeout": connect_timeout,
                                        "host_key_policy": check_host_key_policy(host_key_policy)}
        self._connection: Connection | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._home: str | None = None

    @property
    def label(self) -> str:
        """``user@host:port`` as given: how handles in Redis name this login node."""
        return (f"{self.user}@" if self.user else "") + self.host + (f":{self.port}" if self.port else "")

    def key(self) -> tuple[Any, ...]:
        """Two start calls with the same key share one LoginNode (one connection)."""
        options = {k: repr(sorted(v.items()) if isinstance(v, dict) else v) for k, v in self.options.items()}
        return self.label, tuple(sorted(options.items()))

    # -- the connection ------------------------------------------------------------------------
    def _connect(self) -> Connection:
        if self._connection is None:
            connection = open_connection(self.host, user=self.user, port=self.port, **self.options)
            connection.open()
            self._connection = connection
        return self._connection

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass

    def close(self) -> None:
        """Close the connection for good: a later call (a monitor thread still running) raises."""
        self._closed = True
        with self._lock:
            self._drop()

    def _open_channel(self, timeout: float) -> Any:
        """A new session channel; reconnects once when the connection died while idle. Nothing has
        been sent yet, so retrying is safe; an unreachable node is ``CommandError`` 255 (as ssh
        exits): callers that treat a failing sacct as "unknown" treat this the same way."""
        for attempt in (1, 2):
            if self._closed:
                raise CommandError(["ssh", self.label], 255, "", f"the connection to the login node {self.label} "
                                   "was closed (the controller is closed)")
            try:
                transport = self._connect().client.get_transport()
                if transport is None or not transport.is_active():
                    raise ConnectionError("the SSH transport is not active")
                return transport.open_session(timeout=timeout)
            except HostKeyError:
                raise
            except Exception as error:  # noqa: BLE001 - socket, auth and DNS errors all land here
                self._drop()
                if attempt == 2:
                    raise CommandError(["ssh", self.label], 255, "", f"cannot reach the login node {self.label}: "
                                       f"{type(error).__name__}: {error}") from None
                logger.info("login node %s: connection lost (%s), reconnecting", self.label, error)
        raise AssertionError("unreachable")

    def _exec(self, script: str, stdin: bytes, timeout: float) -> tuple[int, str, str]:
        """``bash -c script`` on a new channel of the shared connection, within ``timeout`` seconds.

        Once the request is sent, nothing is retried: a lost reply, a broken or silent link (a
        watchdog closes the connection after ``timeout``: paramiko itself would wait forever) is
        ``CommandError`` -1, "the outcome is unknown" - a re-sent sbatch would submit twice."""
        with self._lock:
            channel = self._open_channel(timeout)
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                self._drop()  # unblocks every wait on this connection

            watchdog = threading.Timer(timeout, expire)
            watchdog.daemon = True
            watchdog.start()
            try:
                channel.settimeout(timeout)
                channel.exec_command("bash -c " + shlex.quote(script))
                if stdin:
                    channel.sendall(stdin)
                channel.shutdown_write()
                out = channel.makefile("rb").read().decode(errors="replace")
                err = channel.makefile_stderr("rb").read().decode(errors="replace")
                if not channel.status_event.wait(timeout) or expired.is_set():
                    raise TimeoutError(f"no answer within {timeout} s")
                return channel.recv_exit_status(), out, err
            except Exception as error:  # noqa: BLE001 - the command may or may not have run
                self._drop()
                reason = f"no answer within {timeout} s" if expired.is_set() else f"{type(error).__name__}: {error}"
                raise CommandError(["ssh", self.label, script[:200]], -1, "",
                                   f"SSH to the login node failed after the command was sent (it may have run): "
                                   f"{reason}") from None
            finally:
                watchdog.cancel()
                try:
                    channel.close()
                except Exception:  # noqa: BLE001
                    pass

    # -- what the SLURM launcher needs ---------------------------------------------------------
    def call(self, cmd: Sequence[str], *, timeout: float = 60, input: str | None = None) -> str:
        """``base.call`` on the login node: no shell interpretation of any argument (each one is
        quoted), stdout returned, ``CommandError`` with the output's tail on a non-zero exit
        (255: the node was not reached, nothing ran; -1: the outcome is unknown)."""
        argv = [str(c) for c in cmd]
        for arg in argv:
            check_line("command argument", arg)
        logger.debug("login node %s: running %s", self.label, shlex.join(argv)[:300])
        code, out, err = self._exec(shlex.join(argv), (input or "").encode(), timeout)
        if code != 0:
            raise CommandError(argv[:8], code, out, err or f"(on the login node {self.label})")
        return out

    def home(self) -> str:
        """The remote user's home directory (relative log directories are made absolute from it:
        ``#SBATCH --output`` does not expand ``~``)."""
        if self._home is None:
            home = self.call(["sh", "-c", 'printf %s "$HOME"'], timeout=30).strip()
            if not home.startswith("/") or any(c in home for c in "\r\n\0"):
                raise LaunchError(f"login node {self.label}: cannot tell the home directory (got {home!r})")
            self._home = home
        return self._home

    def absolute(self, path: str) -> str:
        """``path`` on the login node made absolute (``~/x`` and ``x`` are relative to the home)."""
        check_line("log_dir", path)
        if path.startswith("/"):
            return path
        path = path[2:] if path.startswith("~/") else path
        return f"{self.home().rstrip('/')}/{path}"

    def private_directory(self, directory: str) -> str:
        """Create ``directory`` (0700) and check it and every directory above it (see
        ``_SAFE_DIRECTORY``); returns its resolved path (job output paths use it)."""
        code, out, err = self._exec(f"D={shlex.quote(directory)}; {_SAFE_DIRECTORY}; printf %s \"$R\"", b"", 60)
        if code != 0 or not out.startswith("/"):
            raise LaunchError(f"login node {self.label}: {(err or out).strip()[-500:]}")
        return out

    def write_private_file(self, directory: str, prefix: str, content: bytes) -> str:
        """A new file ``directory/<prefix><random>`` (mode 0600, created with O_EXCL: never through
        a planted symlink, never over an existing file), ``content`` sent on stdin; the directory
        is checked in the same script. The name is chosen here, so that after a lost reply the
        file can still be deleted (the secret is never left at a path nobody knows)."""
        path = f"{directory.rstrip('/')}/{prefix}{secrets.token_hex(8)}"
        script = (f"D={shlex.quote(directory)}; {_SAFE_DIRECTORY}; F={shlex.quote(path)}; "
                  'set -C; (umask 077 && cat > "$F")')
        try:
            code, out, err = self._exec(script, content, 60)
        except CommandError as error:
            if error.returncode == -1:
                self._remove_quietly(path)
            raise
        if code != 0:
            raise LaunchError(f"login node {self.label}: cannot write a file in {directory}: "
                              f"{(err or out).strip()[-500:]}")
        return path

    def _remove_quietly(self, path: str) -> None:
        try:
            self.call(["rm", "-f", "--", path], timeout=30)
        except CommandError as error:
            logger.warning("login node %s: could not delete %s after a lost reply: %s", self.label, path, error)

    def read_tail(self, path: str | None, lines: int = OUTPUT_TAIL_LINES) -> str:
        """The end of a file on the login node (only paths a trusted handle holds)."""
        if not path:
            return ""
        try:
            return self.call(["tail", "-n", str(int(lines)), "--", path], timeout=30)
        except CommandError:
            return ""

    def __repr__(self) -> str:
        return f"LoginNode({self.label})"


class LoginCredentials:
    """The credentials file written on the login node; ``remove()`` deletes it over SSH (once the
    workers registered, and at close() at the latest). Its path is held in memory, never read from Redis."""

    def __init__(self, login: LoginNode, path: str) -> None:
        self.login, self.path = login, path

    def remove(self) -> None:
        try:
            self.login.call(["rm", "-f", "--", self.path], timeout=30)
        except Exception as error:  # noqa: BLE001 - best effort; said in the log
            logger.warning("login node %s: could not delete the credentials file %s: %s", self.login.label,
                           self.path, error)

    def __repr__(self) -> str:
        return f"LoginCredentials({self.login.label}:{self.path})"
