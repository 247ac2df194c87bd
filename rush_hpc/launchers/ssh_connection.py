"""SSH connections that check the host key against known_hosts, the way OpenSSH does.

fabric's default (paramiko's ``AutoAddPolicy``, known_hosts never loaded) accepts any host key, so a
spoofed host would receive the SSH password or key challenge, then the Redis password and the
signing secret. Here a connection:

* looks the host up in the system files (``GlobalKnownHostsFile``, default
  ``/etc/ssh/ssh_known_hosts``) and the user's (``UserKnownHostsFile`` of the ssh_config in use,
  default ``~/.ssh/known_hosts``), under its ``HostKeyAlias`` or ``HostName`` (``[host]:port`` off
  port 22), plain or hashed, with ``*``/``?`` patterns and ``!`` negations;
* accepts a known key, refuses a different key for a known host (always), a ``@revoked`` key, and by
  default an unknown key - each with an error that says how to fix it. Nothing is sent to a host
  whose key was refused: paramiko checks the key before any authentication;
* with ``host_key_policy="accept-new"`` (or ``StrictHostKeyChecking accept-new`` / ``no`` in the
  ssh_config) trusts an unknown key on first use and appends it to the user's known_hosts file.

An explicit ``host_key_policy`` wins over ``StrictHostKeyChecking``; ``ask`` (OpenSSH's default,
with no terminal to ask on) means ``reject``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..exceptions import ConfigError, LaunchError

if TYPE_CHECKING:
    from fabric import Connection
    from paramiko import PKey

logger = logging.getLogger(__name__)

HOST_KEY_POLICIES = ("reject", "accept-new")
SYSTEM_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
_STRICT = {"yes": "reject", "ask": "reject", "accept-new": "accept-new", "no": "accept-new", "off": "accept-new"}
_WRITE_LOCK = threading.Lock()


class HostKeyError(LaunchError):
    """An SSH host offered a key that is not known (or not the known one); nothing was sent to it."""


def check_host_key_policy(policy: str | None) -> str | None:
    """``policy`` if valid (None: from the ssh_config's StrictHostKeyChecking, else "reject")."""
    if policy is not None and policy not in HOST_KEY_POLICIES:
        raise ConfigError(f"host_key_policy must be one of {list(HOST_KEY_POLICIES)} (or None: the "
                          f"ssh_config's StrictHostKeyChecking, else 'reject'), got {policy!r}")
    return policy


def resolve_policy(policy: str | None, ssh_config: Mapping[str, Any]) -> str:
    if policy is not None:
        return check_host_key_policy(policy) or "reject"
    strict = str(ssh_config.get("stricthostkeychecking", "ask")).lower()
    return _STRICT.get(strict, "reject")


def fingerprint(key: PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_key_name(host: str, port: int) -> str:
    """The name known_hosts files use: ``host``, or ``[host]:port`` off the default port."""
    return host if port == 22 else f"[{host}]:{port}"


def _expand(path: str) -> Path:
    home = os.path.expanduser("~")
    return Path(os.path.expanduser(path.replace("%d", home).replace("%u", os.environ.get("USER", ""))))


def _files(ssh_config: Mapping[str, Any], key: str, default: tuple[str, ...]) -> list[Path]:
    value = ssh_config.get(key)
    if isinstance(value, (list, tuple)):
        value = " ".join(value)
    names = value.split() if value else list(default)
    return [_expand(name) for name in names if name.lower() != "none"]


def _glob(pattern: str) -> re.Pattern[str]:
    """An ssh pattern (only ``*`` and ``?`` are special; ``[host]:port`` is literal) as a regex."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower()))


def _matches(name: str, patterns: str) -> bool:
    """known_hosts host field: comma-separated patterns, ``!`` negation, or one ``|1|`` hash."""
    from paramiko.hostkeys import HostKeys

    if patterns.startswith("|1|"):
        return HostKeys.hash_host(name, patterns) == patterns
    matched = False
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        if _glob(pattern.lstrip("!")).fullmatch(name.lower()):
            if negated:
                return False
            matched = True
    return matched


@dataclass
class KnownHosts:
    """What the known_hosts files say about one host."""

    name: str
    keys: list[PKey] = field(default_factory=list)
    revoked: list[PKey] = field(default_factory=list)
    searched: list[Path] = field(default_factory=list)
    user_file: Path | None = None


def load_known_hosts(name: str, ssh_config: Mapping[str, Any]) -> KnownHosts:
    """The keys and revocations for ``name`` in the system and user known_hosts files."""
    from paramiko.hostkeys import HostKeyEntry

    user_files = _files(ssh_config, "userknownhostsfile", USER_KNOWN_HOSTS)
    files = _files(ssh_config, "globalknownhostsfile", SYSTEM_KNOWN_HOSTS) + user_files
    known = KnownHosts(name, searched=files, user_file=user_files[0] if user_files else None)
    for path in files:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            marker = words[0] if words[0].startswith("@") else None
            if marker:
                words = words[1:]
            if len(words) < 3 or not _matches(name, words[0]) or marker == "@cert-authority":
                continue
            try:
                entry = HostKeyEntry.from_line(" ".join(words[:3]))
            except Exception:  # noqa: BLE001 - a malformed or unsupported line is skipped, as ssh does
                entry = None
            if entry is not None and entry.key is not None:
                (known.revoked if marker == "@revoked" else known.keys).append(entry.key)
    return known


def _ssh_command(user: str | None, host: str, port: int) -> str:
    return "ssh " + (f"-p {port} " if port != 22 else "") + (f"{user}@" if user else "") + host


def _make_policy(known: KnownHosts, policy: str, label: str, user: str | None, host: str, port: int):
    import paramiko

    class CheckKnownHosts(paramiko.MissingHostKeyPolicy):
        """Called by paramiko, before any authentication, for a key the client does not know."""

        def missing_host_key(self, client: Any, hostname: str, key: PKey) -> None:
            if any(key == revoked for revoked in known.revoked):
                raise HostKeyError(f"the SSH host key of {label} ({key.get_name()} {fingerprint(key)}) is "
                                   "marked @revoked in known_hosts; refusing to connect (nothing was sent)")
            if policy == "accept-new":
                _remember(known, key, label)
                return
            searched = ", ".join(str(p) for p in known.searched)
            keyscan = "ssh-keyscan " + (f"-p {port} " if port != 22 else "") + host
            target = known.user_file or "~/.ssh/known_hosts"
            raise HostKeyError(
                f"the SSH host key of {label} is not known ({key.get_name()} {fingerprint(key)}; looked "
                f"for {known.name!r} in {searched}). Nothing was sent to this host. If it is the right "
                f"host (check the fingerprint with its administrator), accept its key once: run "
                f"`{_ssh_command(user, host, port)}` by hand and answer yes, or `{keyscan} >> {target}`, "
                "or pass host_key_policy='accept-new' to start_ssh_workers (trust on first use; the key "
                "is then recorded in known_hosts)")

    return CheckKnownHosts()


def _remember(known: KnownHosts, key: PKey, label: str) -> None:
    """Append the accepted key to the user's known_hosts file (as ``ssh`` would)."""
    path = known.user_file
    if path is None or str(path) == os.devnull:
        logger.warning("accepting the new SSH host key of %s (%s) without recording it", label, fingerprint(key))
        return
    line = f"{known.name} {key.get_name()} {key.get_base64()}\n"
    with _WRITE_LOCK:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    logger.warning("accepted the new SSH host key of %s (%s %s) and added it to %s", label, key.get_name(),
                   fingerprint(key), path)


def _install_check(connection: Connection, policy: str | None) -> None:
    """Give a fabric Connection (and any ProxyJump gateway fabric made) the known_hosts check."""
    ssh_config = connection.ssh_config
    alias = ssh_config.get("hostkeyalias")
    name = host_key_name(alias or connection.host, 22 if alias else connection.port)
    known = load_known_hosts(name, ssh_config)
    label = (f"{connection.user}@" if connection.user else "") + f"{connection.original_host}:{connection.port}"
    client = connection.client
    for key in known.keys:  # under the name paramiko looks up, whatever name they were found under
        client.get_host_keys().add(host_key_name(connection.host, connection.port), key.get_name(), key)
    client.set_missing_host_key_policy(_make_policy(known, resolve_policy(policy, ssh_config), label,
                                                    connection.user, connection.host, connection.port))
    gateway = connection.gateway
    if gateway is not None and not isinstance(gateway, str):
        _install_check(gateway, policy)


def _checked_connection_class() -> type:
    import paramiko
    from fabric import Connection

    class CheckedConnection(Connection):
        """A fabric Connection whose changed-host-key error says what happened and what to do."""

        def open(self) -> Any:
            try:
                return super().open()
            except paramiko.BadHostKeyException as error:
                raise HostKeyError(
                    f"the SSH host key of {error.hostname} CHANGED: it offered {error.key.get_name()} "
                    f"{fingerprint(error.key)}, known_hosts has {error.expected_key.get_name()} "
                    f"{fingerprint(error.expected_key)}. Someone may be intercepting the connection "
                    "(nothing was sent to it), or the host was reinstalled: then remove the old key with "
                    f"`ssh-keygen -R {host_key_name(error.hostname, self.port)}` and accept the new one") from None

    return CheckedConnection


def open_connection(host: str, *, user: str | None = None, port: int | None = None,
                    gateway: str | None = None, ssh_config: str | None = None,
                    connect_kwargs: Mapping[str, Any] | None = None, timeout: float | None = None,
                    host_key_policy: str | None = None) -> Connection:
    """A fabric Connection to ``host`` (not opened yet) that verifies the host key on ``open()``.

    ``gateway`` is a jump host, checked the same way; ``ssh_config`` a file read instead of
    ``~/.ssh/config``; ``host_key_policy`` "reject" or "accept-new" (None: StrictHostKeyChecking).
    """
    from fabric import Config

    check_host_key_policy(host_key_policy)
    if ssh_config:
        config = Config(runtime_ssh_path=os.path.expanduser(ssh_config))
        config.load_ssh_config()
    else:
        config = Config()
    connection_class = _checked_connection_class()
    jump = connection_class(gateway, config=config, connect_kwargs=dict(connect_kwargs or {}),
                            connect_timeout=timeout) if gateway else None
    connection = connection_class(host, user=user, port=port, config=config, gateway=jump,
                                  connect_kwargs=dict(connect_kwargs or {}), connect_timeout=timeout)
    _install_check(connection, host_key_policy)
    return connection
