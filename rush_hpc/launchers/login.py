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

# the remote directory must be the user's and not writable by group/others: another user could
# otherwise swap the credentials file or the job script between our writing and SLURM reading them
_PRIVATE_DIRECTORY = (
    'if [ ! -O "$D" ] || [ -n "$(find "$D" -maxdepth 0 -perm /022)" ]; then '
    'echo "directory $D must be owned by $(id -un) and not writable by group/others; '
    'run: chmod go-w $D" >&2; exit 3; fi')


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
        self._home: str | None = None

    @property
    def label(self) -> str:
        """``user@host:port`` as given: how handles in Redis name this login node."""
        return (f"{self.user}@" if self.user else "") + self.host + (f":{self.port}" if self.port else "")

    def key(self) -> tuple[Any, ...]:
        """Two start calls with the same key share one LoginNode (one connection)."""
        options = {k: repr(v) for k, v in self.options.items()}
        return self.label, tuple(sorted(options.items()))

    # -- the connection ------------------------------------------------------------------------
    def _connect(self) -> Connection:
        if self._connection is None:
            connection = open_connection(self.host, user=self.user, port=self.port, **self.options)
            try:
                connection.open()
            except HostKeyError:
                raise
            except Exception as error:  # noqa: BLE001 - socket, auth and DNS errors all land here
                raise LaunchError(f"cannot connect to the login node {self.label}: "
                                  f"{type(error).__name__}: {error}") from None
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
        with self._lock:
            self._drop()

    def _exec(self, script: str, stdin: bytes, timeout: float) -> tuple[int, str, str]:
        """``bash -c script`` on a new channel of the shared connection.

        A connection that broke while idle is reopened once, but only while the command has not
        been sent: once it may have run, an error is raised, never a second run (a lost reply to
        sbatch re-sent would submit the workers twice)."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    channel_in, channel_out, channel_err = self._connect().client.exec_command(
                        "bash -c " + shlex.quote(script), timeout=timeout)
                    break
                except (LaunchError, HostKeyError):
                    raise
                except Exception as error:  # noqa: BLE001 - a connection that died while idle
                    self._drop()
                    if attempt == 2:
                        raise self._failed(script, error) from None
                    logger.info("login node %s: connection lost (%s), reconnecting", self.label, error)
            try:
                if stdin:
                    channel_in.write(stdin)
                channel_in.channel.shutdown_write()
                out = channel_out.read().decode(errors="replace")
                err = channel_err.read().decode(errors="replace")
                return channel_out.channel.recv_exit_status(), out, err
            except Exception as error:  # noqa: BLE001 - the command may or may not have run
                self._drop()
                raise self._failed(script, error) from None

    def _failed(self, script: str, error: Exception) -> CommandError:
        return CommandError(["ssh", self.label, script[:200]], -1, "",
                            f"SSH to the login node failed: {type(error).__name__}: {error}")

    # -- what the SLURM launcher needs ---------------------------------------------------------
    def call(self, cmd: Sequence[str], *, timeout: float = 60, input: str | None = None) -> str:
        """``base.call`` on the login node: no shell interpretation of any argument (each one is
        quoted), stdout returned, ``CommandError`` with the output's tail on a non-zero exit."""
        argv = [str(c) for c in cmd]
        for arg in argv:
            check_line("command argument", arg)
        logger.debug("login node %s: running %s", self.label, shlex.join(argv))
        code, out, err = self._exec(shlex.join(argv), (input or "").encode(), timeout)
        if code != 0:
            raise CommandError(argv, code, out, err or f"(on the login node {self.label})")
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

    def private_directory(self, directory: str) -> None:
        """Create ``directory`` (0700) and check that it is ours and not writable by others."""
        script = f"set -e; (umask 077 && mkdir -p -- {shlex.quote(directory)}); D={shlex.quote(directory)}; " \
                 + _PRIVATE_DIRECTORY
        code, out, err = self._exec(script, b"", 60)
        if code != 0:
            raise LaunchError(f"login node {self.label}: {(err or out).strip()[-500:]}")

    def write_private_file(self, directory: str, prefix: str, content: bytes) -> str:
        """A new file with a random name in ``directory`` (mode 0600, created by mktemp: never
        through a planted symlink), ``content`` sent on stdin; returns its path."""
        self.private_directory(directory)
        script = (f"set -e; F=$(umask 077 && mktemp {shlex.quote(directory.rstrip('/') + '/' + prefix)}XXXXXXXXXXXX); "
                  'cat > "$F"; printf %s "$F"')
        code, out, err = self._exec(script, content, 60)
        if code != 0 or not out.startswith(directory.rstrip("/") + "/"):
            raise LaunchError(f"login node {self.label}: cannot write a file in {directory}: "
                              f"{(err or out).strip()[-500:]}")
        return out

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
