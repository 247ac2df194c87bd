"""Workers on remote hosts over SSH (fabric): detached, quoted, secrets uploaded over SFTP.

Per host: connect -> create the log directory -> upload the credentials file (mode 0600, via SFTP,
never on a command line) -> run the setup lines and start the workers with ``nohup setsid`` (stdin
closed, output to ``<log_dir>/<worker id>.log``), so they survive the SSH session. Hosts are handled
in parallel; a host that fails does not stop the others.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..exceptions import ConfigError, LaunchError, tail
from .base import Launcher, WorkerCommand, WorkerInfo
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
    if not parsed.python.startswith("/") and parsed.python not in ("python", "python3"):
        raise ConfigError(f"python for host {parsed.label} must be an absolute path, got {parsed.python!r}")
    return parsed


class SSHLauncher(Launcher):
    name = "ssh"

    def __init__(self, hosts: Sequence[Any], *, n_workers: int = 1, network: str, credentials: bytes,
                 python: str | None = None, setup: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 log_dir: str = "~/.rush-hpc/logs", connect_kwargs: Mapping[str, Any] | None = None,
                 gateway: str | None = None, ssh_config: str | None = None,
                 connect_timeout: float = 10.0, host_key_policy: str | None = None) -> None:
        if not hosts:
            raise ConfigError("start_ssh_workers needs at least one host")
        defaults = {"n_workers": n_workers, "python": python or sys.executable, "setup": list(setup),
                    "env": dict(env or {})}
        self.hosts = [parse_host(h, defaults) for h in hosts]
        self.network, self.credentials = network, credentials
        self.log_dir = log_dir
        self.connect_kwargs = dict(connect_kwargs or {})
        self.gateway, self.ssh_config, self.connect_timeout = gateway, ssh_config, connect_timeout
        self.host_key_policy = check_host_key_policy(host_key_policy)  # see ssh_connection.py
        self._checked: dict[str, float] = {}
        self.check_interval = 3.0  # seconds between SSH checks of workers that did not register yet

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
    def start(self, worker_ids: Sequence[str], command: WorkerCommand) -> dict[str, dict[str, str]]:
        self._checked["gone"] = time.monotonic()  # give the workers time before asking the hosts
        assignments: list[tuple[HostSpec, list[str]]] = []
        ids = list(worker_ids)
        for host in self.hosts:
            assignments.append((host, ids[:host.n_workers]))
            ids = ids[host.n_workers:]
        infos: dict[str, dict[str, str]] = {}
        failures: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=min(32, len(assignments))) as pool:
            futures = {pool.submit(self._start_on_host, host, ids_): (host, ids_) for host, ids_ in assignments}
            for future, (host, _) in futures.items():
                try:
                    infos.update(future.result())
                except Exception as error:  # noqa: BLE001 - reported per host
                    reason = str(error) or type(error).__name__
                    failures[host.label] = reason
                    logger.error("ssh host %s: %s", host.label, reason)
        if failures:
            details = "\n".join(f"- {host}: {reason}" for host, reason in failures.items())
            raise LaunchError(f"could not start workers on {len(failures)} of {len(self.hosts)} "
                              f"host(s) ({len(infos)} workers started elsewhere):\n{details}",
                              started=list(infos), failures=failures, infos=infos)
        return infos

    def _start_on_host(self, host: HostSpec, worker_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        if not worker_ids:
            return {}
        try:
            connection = self.connect(host)
            connection.open()
        except Exception as error:  # noqa: BLE001 - socket, auth and DNS errors all land here
            raise LaunchError(f"cannot connect: {type(error).__name__}: {error}") from None
        try:
            # one round trip: create the log directory, receive the credentials on stdin into a
            # 0600 file (never on a command line), run the setup lines, start the workers
            credentials = shlex.quote(f"{self.network}.credentials.json")
            command = WorkerCommand(self.network, host.python, {**host.env, "RUSH_HPC_LAUNCHER": self.name})
            lines = ["set -e", f"(umask 077 && mkdir -p {_remote_path(self.log_dir)})",
                     f"cd {_remote_path(self.log_dir)}", f"(umask 077 && cat > {credentials})",
                     'RUSH_LOG_DIR="$PWD"', 'echo "log_dir $RUSH_LOG_DIR"',
                     f'export RUSH_HPC_CREDENTIALS="$RUSH_LOG_DIR"/{credentials}',
                     *host.setup, *command.export_lines()]
            for worker_id in worker_ids:
                lines.append(f"nohup setsid {command.shell(worker_id, with_env=False)} "
                             f'> "$RUSH_LOG_DIR"/{worker_id}.log 2>&1 < /dev/null & echo "pid {worker_id} $!"')
            output = self._run(connection, "\n".join(lines), "the setup / start commands",
                               stdin=self.credentials)
        finally:
            connection.close()
        log_dir = next(line[8:] for line in output.splitlines() if line.startswith("log_dir "))
        pids = dict(line.split()[1:3] for line in output.splitlines() if line.startswith("pid "))
        return {w: {"launcher": self.name, "host": host.label, "pid": pids.get(w, ""),
                    "stdout": f"{log_dir}/{w}.log", "ssh_host": host.host,
                    "ssh_user": host.user or "", "ssh_port": str(host.port or "")} for w in worker_ids}

    # -- observing and killing -----------------------------------------------------------------
    def _host_of(self, info: WorkerInfo) -> HostSpec:
        for host in self.hosts:
            if host.label == info.get("host"):
                return host
        return parse_host(info.get("host", ""), {})

    def _by_host(self, infos: Mapping[str, WorkerInfo]) -> dict[str, tuple[HostSpec, dict[str, WorkerInfo]]]:
        groups: dict[str, tuple[HostSpec, dict[str, WorkerInfo]]] = {}
        for worker_id, info in infos.items():
            host = self._host_of(info)
            groups.setdefault(host.label, (host, {}))[1][worker_id] = info
        return groups

    def gone(self, infos: Mapping[str, WorkerInfo]) -> dict[str, str]:
        """Only for workers that never registered (a running worker is watched by its heartbeat);
        asks each host at most every 2 s which worker processes have exited."""
        waiting = {w: i for w, i in infos.items() if not i.get("started_at") and i.get("pid")}
        now = time.monotonic()
        if not waiting or now - self._checked.get("gone", 0.0) < self.check_interval:
            return {}
        self._checked["gone"] = now

        def check(host: HostSpec, group: dict[str, WorkerInfo]) -> dict[str, str]:
            checks = " ; ".join(f"ps -o stat= -p {int(i['pid'])} | grep -qv Z || echo {w}"
                                for w, i in group.items())
            try:
                connection = self.connect(host)
                output = self._exec(connection, checks, timeout=30)[1]
                connection.close()
            except Exception as error:  # noqa: BLE001
                logger.warning("ssh host %s: cannot check workers: %s", host.label, error)
                return {}
            return {w: f"process {group[w]['pid']} on {host.label} exited" for w in output.split() if w in group}

        groups = list(self._by_host(waiting).values())
        reasons: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=min(32, len(groups))) as pool:
            for found in pool.map(lambda g: check(*g), groups):
                reasons.update(found)
        return reasons

    def kill(self, infos: Mapping[str, WorkerInfo]) -> None:
        for host, group in self._by_host(infos).values():
            pids = [int(i["pid"]) for i in group.values() if i.get("pid")]
            if not pids:
                continue
            try:
                connection = self.connect(host)
                self._exec(connection, " ; ".join(f"kill -KILL -- -{p} 2>/dev/null" for p in pids) + " ; true",
                           timeout=30)
                connection.close()
            except Exception as error:  # noqa: BLE001
                logger.warning("ssh host %s: could not kill %s: %s", host.label, pids, error)

    def output_tail(self, info: WorkerInfo, lines: int = 20) -> str:
        if not info.get("stdout"):
            return ""
        try:
            connection = self.connect(self._host_of(info))
            output = self._exec(connection, f"tail -n {int(lines)} {shlex.quote(info['stdout'])}", timeout=30)[1]
            connection.close()
            return output
        except Exception as error:  # noqa: BLE001
            return f"(could not read {info['stdout']} on {info.get('host')}: {error})"


def _remote_path(path: str) -> str:
    """Quote a remote path but keep a leading ``~/`` expandable by the remote shell."""
    if path == "~":
        return "~"
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)
