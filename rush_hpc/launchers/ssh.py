"""Workers on remote hosts over SSH (fabric): detached, quoted, secrets uploaded over SFTP.

Per host: connect -> create the log directory -> upload the credentials file (mode 0600, via SFTP,
never on a command line) -> run the setup lines and start the host's workers with ``nohup setsid``
as ONE interpreter that forks them (``rush_hpc worker --worker-id A --worker-id B ...``, see
``spawner.run_group``: one import per host; each worker in its own session, output to
``<log_dir>/<worker id>.log``), so they survive the SSH session. The start script waits until the
group wrote its workers' pids. Hosts are handled in parallel; a host that fails does not stop the others.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..defaults import OUTPUT_TAIL_LINES, SSH_CHECK_INTERVAL, SSH_CONNECT_TIMEOUT, SSH_LOG_DIR
from ..exceptions import ConfigError, LaunchError, tail
from .base import (ENV_NAME, Handle, HandleContext, InvalidInfo, Launcher, WorkerCommand, WorkerInfo,
                   check_line, check_name, check_no_nul, valid_pid)
from .ssh_connection import check_host_key_policy, open_connection

logger = logging.getLogger(__name__)


@dataclass
class HostSpec:
    """One remote host and how to start workers there."""

    host: str
    user: str | None = None
    port: int | None = None
    n_workers: int = 1
    python: str = sys.executable
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return (f"{self.user}@" if self.user else "") + self.host + (f":{self.port}" if self.port else "")


_HOST_KEYS = {"host", "user", "port", "n_workers", "python", "setup", "env"}


def parse_host(spec: Any, defaults: Mapping[str, Any]) -> HostSpec:
    """``"node"``, ``"alice@node:2222"`` or ``{"host": "node", "n_workers": 8, "python": ...}``."""
    values = dict(defaults)
    if isinstance(spec, str):
        spec = {"host": spec}
    if not isinstance(spec, Mapping) or "host" not in spec:
        raise ConfigError(f"a host must be 'host', 'user@host:port' or a dict with 'host', got {spec!r}")
    unknown = set(spec) - _HOST_KEYS
    if unknown:
        raise ConfigError(f"unknown host option(s) {sorted(unknown)}; valid: {sorted(_HOST_KEYS)}")
    values.update(spec)
    host = str(values["host"])
    if "@" in host:
        values["user"], host = host.split("@", 1)
    if host.count(":") == 1:
        host, port = host.split(":")
        values["port"] = int(port)
    values["host"] = host
    parsed = HostSpec(**values)
    check_host(parsed)
    if not parsed.python.startswith("/") and parsed.python not in ("python", "python3"):
        raise ConfigError(f"python for host {parsed.label} must be an absolute path, got {parsed.python!r}")
    return parsed


def check_host(host: HostSpec) -> None:
    """No value of a host may break the remote script: names, python and env are checked here."""
    if not host.host or any(c.isspace() for c in host.host):
        raise ConfigError(f"ssh host may not be empty or contain whitespace, got {host.host!r}")
    for option, value in (("host", host.host), ("user", host.user), ("python", host.python)):
        check_line(option, value)
    for line in host.setup:
        check_no_nul("setup", line)
    for name, value in host.env.items():
        check_name("env", name, ENV_NAME)
        check_no_nul(f"env[{name!r}]", value)


class SSHLauncher(Launcher):
    name = "ssh"

    def __init__(self, hosts: Sequence[Any], *, n_workers: int = 1, network: str, credentials: bytes,
                 python: str | None = None, setup: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 log_dir: str = SSH_LOG_DIR, connect_kwargs: Mapping[str, Any] | None = None,
                 gateway: str | None = None, ssh_config: str | None = None,
                 connect_timeout: float = SSH_CONNECT_TIMEOUT, host_key_policy: str | None = None) -> None:
        super().__init__()
        if not hosts:
            raise ConfigError("start_ssh_workers needs at least one host")
        defaults = {"n_workers": n_workers, "python": python or sys.executable, "setup": list(setup),
                    "env": dict(env or {})}
        self.hosts = [parse_host(h, defaults) for h in hosts]
        self.network, self.credentials = network, credentials
        self.log_dir = check_line("log_dir", log_dir)
        check_line("gateway", gateway)
        self.connect_kwargs = dict(connect_kwargs or {})
        self.gateway, self.ssh_config, self.connect_timeout = gateway, ssh_config, connect_timeout
        self.host_key_policy = check_host_key_policy(host_key_policy)  # see ssh_connection.py
        self._checked: dict[str, float] = {}
        self.check_interval = SSH_CHECK_INTERVAL  # seconds between SSH checks of unregistered workers
        #: the credentials files written on the hosts, with the workers that read them
        self.credential_files: list[tuple[RemoteCredentials, list[str]]] = []

    @property
    def total_workers(self) -> int:
        return sum(h.n_workers for h in self.hosts)

    def command(self) -> WorkerCommand:
        return WorkerCommand(self.network, "<per host>")

    # -- connections ---------------------------------------------------------------------------
    def connect(self, host: HostSpec):
        return open_connection(host.host, user=host.user, port=host.port, gateway=self.gateway,
                               ssh_config=self.ssh_config, connect_kwargs=self.connect_kwargs,
                               timeout=self.connect_timeout, host_key_policy=self.host_key_policy)

    @staticmethod
    def _exec(connection, script: str, stdin: bytes = b"", timeout: float = 120) -> tuple[int, str, str]:
        """Run ``bash -c script`` on one SSH channel; returns (exit code, stdout, stderr).

        paramiko directly rather than ``Connection.run``: invoke feeds a non-tty stdin one byte
        every 10 ms, which made uploading the credentials on stdin take seconds.
        """
        connection.open()
        channel_in, channel_out, channel_err = connection.client.exec_command(
            "bash -c " + shlex.quote(script), timeout=timeout)
        if stdin:
            channel_in.write(stdin)
        channel_in.channel.shutdown_write()
        out = channel_out.read().decode(errors="replace")
        err = channel_err.read().decode(errors="replace")
        return channel_out.channel.recv_exit_status(), out, err

    def _run(self, connection, script: str, what: str, timeout: float = 120, stdin: bytes = b"") -> str:
        code, out, err = self._exec(connection, script, stdin, timeout)
        if code != 0:
            raise LaunchError(f"{what} exited with {code}:\n{tail(err or out, 15)}")
        return out

    # -- starting ------------------------------------------------------------------------------
    def host_by_label(self, label: str | None) -> HostSpec | None:
        """One of this launcher's own hosts (never a host named only in Redis)."""
        return next((h for h in self.hosts if h.label == label), None)

    def start(self, worker_ids: Sequence[str], command: WorkerCommand) -> list[Handle]:
        self._checked["gone"] = time.monotonic()  # give the workers time before asking the hosts
        assignments: list[tuple[HostSpec, list[str]]] = []
        ids = list(worker_ids)
        for host in self.hosts:
            assignments.append((host, ids[:host.n_workers]))
            ids = ids[host.n_workers:]
        started: list[Handle] = []
        failures: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=min(32, len(assignments))) as pool:
            futures = {pool.submit(self._start_on_host, host, ids_, command): (host, ids_)
                       for host, ids_ in assignments}
            for future, (host, _) in futures.items():
                try:
                    started.extend(future.result())
                except Exception as error:  # noqa: BLE001 - reported per host
                    reason = str(error) or type(error).__name__
                    failures[host.label] = reason
                    logger.error("ssh host %s: %s", host.label, reason)
        if failures:
            details = "\n".join(f"- {host}: {reason}" for host, reason in failures.items())
            raise LaunchError(f"could not start workers on {len(failures)} of {len(self.hosts)} "
                              f"host(s) ({len(started)} workers started elsewhere):\n{details}",
                              started=[h.worker_id for h in started], failures=failures,
                              infos={h.worker_id: h.to_info() for h in started})
        return started

    def _start_on_host(self, host: HostSpec, worker_ids: Sequence[str], command: WorkerCommand) -> list[Handle]:
        if not worker_ids:
            return []
        try:
            connection = self.connect(host)
            connection.open()
        except Exception as error:  # noqa: BLE001 - socket, auth and DNS errors all land here
            raise LaunchError(f"cannot connect: {type(error).__name__}: {error}") from None
        try:
            # one round trip: create the log directory, receive the credentials on stdin into a
            # 0600 file (never on a command line), run the setup lines, start the workers
            command = WorkerCommand(self.network, host.python, {**host.env, **command.env}, command.launcher)
            lines = ["set -e", f"(umask 077 && mkdir -p {_remote_path(self.log_dir)})",
                     f"cd {_remote_path(self.log_dir)}", 'RUSH_LOG_DIR="$PWD"', *_PRIVATE_DIRECTORY_CHECK,
                     # a fresh random name, created 0600 with O_EXCL (never through a planted symlink)
                     'RUSH_CREDENTIALS=$(umask 077 && mktemp "$RUSH_LOG_DIR/credentials-XXXXXXXXXXXX.json")',
                     'cat > "$RUSH_CREDENTIALS"', 'echo "log_dir $RUSH_LOG_DIR"', 'echo "credentials $RUSH_CREDENTIALS"',
                     'export RUSH_HPC_CREDENTIALS="$RUSH_CREDENTIALS"',
                     *host.setup, *command.export_lines()]
            lines += group_lines(command, worker_ids)
            output = self._run(connection, "\n".join(lines), "the setup / start commands",
                               stdin=self.credentials)
        finally:
            connection.close()
        log_dir = next(line[8:] for line in output.splitlines() if line.startswith("log_dir "))
        credentials_path = next(line[12:] for line in output.splitlines() if line.startswith("credentials "))
        self.credential_files.append((RemoteCredentials(self, host, credentials_path), list(worker_ids)))
        pids = dict(line.split()[1:3] for line in output.splitlines() if line.startswith("pid "))
        handles: list[Handle] = []
        for worker_id in worker_ids:
            handle = SshHandle(worker_id, self, host, valid_pid(pids.get(worker_id)), log=f"{log_dir}/{worker_id}.log")
            self.handles[worker_id] = handle
            handles.append(handle)
        return handles


def group_lines(command: WorkerCommand, worker_ids: Sequence[str], wait: float = 60.0) -> list[str]:
    """Shell lines that start ``worker_ids`` as one group in the background and print one
    ``pid <id> <pid>`` line per worker. A group that ends before it wrote its pid file (a broken
    interpreter) is reported as every worker's process, with its output as every worker's log, so
    the controller shows that output as the reason they never registered."""
    first = worker_ids[0]
    argv = command.argv(None)
    for worker_id in worker_ids:
        argv += ["--worker-id", worker_id]
    line = " ".join(shlex.quote(a) for a in argv)
    pids, group_log = f'"$RUSH_LOG_DIR"/{first}.pids', f'"$RUSH_LOG_DIR"/{first}.group.log'
    copies = " ; ".join(f'cp {group_log} "$RUSH_LOG_DIR"/{w}.log ; echo "pid {w} $group"' for w in worker_ids)
    return [f'rm -f {pids}',
            f'nohup setsid {line} --log-dir "$RUSH_LOG_DIR" --pid-file {pids} > {group_log} 2>&1 < /dev/null &',
            "group=$!",
            f"for _ in $(seq {int(wait * 20)}); do [ -e {pids} ] && break; kill -0 $group 2>/dev/null || break; "
            "sleep 0.05; done",
            f"if [ -e {pids} ]; then sed 's/^/pid /' {pids}; rm -f {pids}; else {copies} ; fi"]


# The remote log directory must be the user's and not writable by group/others (else another user
# could swap the credentials file between our writing and the workers' reading it).
_PRIVATE_DIRECTORY_CHECK = [
    'if [ ! -O "$RUSH_LOG_DIR" ] || [ -n "$(find "$RUSH_LOG_DIR" -maxdepth 0 -perm /022)" ]; then',
    '  echo "log_dir $RUSH_LOG_DIR must be owned by $(id -un) and not writable by group/others;'
    ' run: chmod go-w $RUSH_LOG_DIR" >&2; exit 3',
    'fi']


class RemoteCredentials:
    """A credentials file on a remote host; ``remove()`` deletes it over SSH (once the workers
    registered, and at close() at the latest). The path is the one the start script printed, held
    in memory; never one read from Redis."""

    def __init__(self, ssh: SSHLauncher, host: HostSpec, path: str) -> None:
        self.ssh, self.host, self.path = ssh, host, path

    def remove(self) -> None:
        try:
            connection = self.ssh.connect(self.host)
            try:
                self.ssh._exec(connection, f"rm -f -- {shlex.quote(self.path)}", timeout=30)
            finally:
                connection.close()
        except Exception as error:  # noqa: BLE001 - best effort; said in the log
            logger.warning("ssh host %s: could not delete the credentials file %s: %s", self.host.label,
                           self.path, error)

    def __repr__(self) -> str:
        return f"RemoteCredentials({self.host.label}:{self.path})"


class SshHandle(Handle):
    """A worker on a remote host: the host comes from the controller's own host list (the
    launcher that holds it), the pid is checked against the worker's command line on the host
    before it is signalled. From Redis without a matching host of this controller: no handle."""

    launcher = "ssh"
    checks_running_workers = False  # their heartbeat watches them; a round trip per host is costly

    def __init__(self, worker_id: str, ssh: SSHLauncher, host: HostSpec, pid: int, *, log: str | None = None,
                 trusted: bool = True) -> None:
        super().__init__(worker_id, trusted=trusted)
        self.ssh, self.host, self.pid, self.log = ssh, host, pid, log

    def to_info(self) -> dict[str, str]:
        info = {"launcher": self.launcher, "host": self.host.label, "pid": str(self.pid),
                "ssh_host": self.host.host, "ssh_user": self.host.user or "", "ssh_port": str(self.host.port or "")}
        if self.log:
            info["stdout"] = self.log
        return info

    @classmethod
    def from_info(cls, worker_id: str, info: WorkerInfo, context: HandleContext) -> SshHandle:
        for launcher in context.ssh:
            host = launcher.host_by_label(info.get("host"))
            if host is not None:
                return cls(worker_id, launcher, host, valid_pid(info.get("pid")), trusted=False)
        raise InvalidInfo(f"host {info.get('host')!r} is not one of this controller's ssh hosts")

    def _match(self) -> str:
        """Shell test: is ``pid`` still this worker (not a zombie, not a reused pid)? Its command
        line must read ``... -m rush_hpc worker --network N --worker-id ID`` with these very
        values (never the group's interpreter, which shows ``--group <n>``; never ``ID2``). ``-ww``: ps
        cuts the line at 80 columns when its output is not a terminal."""
        network, worker_id = shlex.quote(self.ssh.network), shlex.quote(self.worker_id)
        return (f'case " $(ps -ww -o args= -p {int(self.pid)} 2>/dev/null) " in '
                f'*" -m rush_hpc worker --network "{network}" --worker-id "{worker_id}" "*) true ;; *) false ;; esac')

    @classmethod
    def _by_host(cls, handles: Sequence[Handle]) -> list[tuple[SSHLauncher, HostSpec, list[SshHandle]]]:
        groups: dict[tuple[int, str], tuple[SSHLauncher, HostSpec, list[SshHandle]]] = {}
        for handle in handles:
            if isinstance(handle, SshHandle):
                key = (id(handle.ssh), handle.host.label)
                groups.setdefault(key, (handle.ssh, handle.host, []))[2].append(handle)
        return list(groups.values())

    @classmethod
    def check(cls, handles: Sequence[Handle]) -> dict[str, str]:
        """Asks each host (in parallel, at most every ``check_interval`` s per launcher) which
        worker processes have exited."""
        groups = []
        now = time.monotonic()
        for launcher in {id(g[0]): g[0] for g in cls._by_host(handles)}.values():
            if now - launcher._checked.get("gone", 0.0) >= launcher.check_interval:
                launcher._checked["gone"] = now
                groups += [g for g in cls._by_host(handles) if g[0] is launcher]
        if not groups:
            return {}

        def check(group: tuple[SSHLauncher, HostSpec, list[SshHandle]]) -> dict[str, str]:
            launcher, host, members = group
            script = " ; ".join(f"{h._match()} || echo {shlex.quote(h.worker_id)}" for h in members)
            try:
                connection = launcher.connect(host)
                output = launcher._exec(connection, script, timeout=30)[1]
                connection.close()
            except Exception as error:  # noqa: BLE001
                logger.warning("ssh host %s: cannot check workers: %s", host.label, error)
                return {}
            ended = set(output.split())
            return {h.worker_id: f"process {h.pid} on {host.label} exited" for h in members if h.worker_id in ended}

        reasons: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=min(32, len(groups))) as pool:
            for found in pool.map(check, groups):
                reasons.update(found)
        return reasons

    def kill(self) -> None:
        type(self).kill_all([self])

    @classmethod
    def kill_all(cls, handles: Sequence[Handle]) -> None:
        for launcher, host, members in cls._by_host(handles):
            script = " ; ".join(f"if {h._match()}; then kill -KILL -- -{int(h.pid)} 2>/dev/null; fi"
                                for h in members) + " ; true"
            try:
                connection = launcher.connect(host)
                launcher._exec(connection, script, timeout=30)
                connection.close()
            except Exception as error:  # noqa: BLE001
                logger.warning("ssh host %s: could not kill %s: %s", host.label, [h.pid for h in members], error)

    def output_tail(self, lines: int = OUTPUT_TAIL_LINES) -> str:
        if not self.trusted or not self.log:
            return ""
        try:
            connection = self.ssh.connect(self.host)
            output = self.ssh._exec(connection, f"tail -n {int(lines)} {shlex.quote(self.log)}", timeout=30)[1]
            connection.close()
            return output
        except Exception as error:  # noqa: BLE001
            return f"(could not read {self.log} on {self.host.label}: {error})"


def _remote_path(path: str) -> str:
    """Quote a remote path but keep a leading ``~/`` expandable by the remote shell."""
    if path == "~":
        return "~"
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)
