"""Shared fixtures: a real redis-server per test session, one network per test.

Real components only: redis-server comes from PATH (scripts/test installs it with apt). The SSH
hosts and the SLURM cluster are started by scripts/test-cluster; tests marked ``ssh``/``slurm``
skip with the reason when they are not up, unless RUSH_HPC_TEST_REQUIRE_CLUSTER=1 (set by
scripts/test), which turns a missing cluster into a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

import rush_hpc
from rush_hpc.config import RedisConfig
from rush_hpc.server import free_port

SECRET = b"test-secret-0123456789abcdef"
CLUSTER_ENV = Path(__file__).resolve().parent.parent / ".test-cluster" / "cluster.env"


def _load_cluster_env() -> None:
    """Pick up what scripts/test-cluster wrote, so plain `pytest` works after `test-cluster up`."""
    if CLUSTER_ENV.exists():
        for line in CLUSTER_ENV.read_text().splitlines():
            name, _, value = line.partition("=")
            if name and value:
                os.environ.setdefault(name, value)


_load_cluster_env()


def start_redis_server(directory: Path, *args: str, port: int | None = None,
                       tls: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; run scripts/test (it installs it with apt)")
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    port_args = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
    cmd = [binary, *port_args, "--save", "", "--appendonly", "no", "--dir", str(directory),
           "--logfile", str(directory / f"redis-{port}.log"), *args]
    if "--bind" not in args:
        cmd += ["--bind", "127.0.0.1"]
    process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    import socket

    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"redis-server exited: {(directory / f'redis-{port}.log').read_text()}")
            time.sleep(0.01)
    return process, port


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session", autouse=True)
def private_config_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the default secret file out of the real home directory."""
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("config-home"))
    for name in ("RUSH_HPC_URL", "REDIS_URL", "RUSH_HPC_SECRET", "RUSH_HPC_SECRET_FILE"):
        os.environ.pop(name, None)


@pytest.fixture(scope="session")
def redis_config(tmp_path_factory: pytest.TempPathFactory):
    process, port = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield RedisConfig(port=port)
    stop(process)


@pytest.fixture
def network() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def rush(redis_config: RedisConfig, network: str):
    controller = rush_hpc.rsh(network=network, config=redis_config, secret=SECRET)
    yield controller
    controller.reset()
    controller.close()


@pytest.fixture
def worker(redis_config: RedisConfig, network: str, rush):
    w = rush_hpc.RushWorker(network=network, config=redis_config, secret=SECRET)
    w.register(launcher="in-process")
    yield w
    w.close()


@pytest.fixture
def proxied_worker(redis_config: RedisConfig, network: str, rush):
    """A registered worker whose connection runs through a DroppingProxy (lost replies, re-sent
    commands), and the proxy; both closed afterwards."""
    from faults import DroppingProxy

    proxy = DroppingProxy(redis_config.port)
    w = rush_hpc.RushWorker(network, config=RedisConfig(port=proxy.port), secret=SECRET)
    w.register()
    yield w, proxy
    w.close()
    proxy.close()


@pytest.fixture
def raw(redis_config: RedisConfig) -> redis.Redis:
    return redis_config.client()


def require_cluster(component: str, ready: bool, why: str) -> None:
    """Skip (printing why) when a real component or privilege a test needs is missing (a cluster
    component, root, network namespaces); fail instead under scripts/test, which provides them all."""
    if ready:
        return
    if os.environ.get("RUSH_HPC_TEST_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"{component} is required by scripts/test but not available: {why}")
    print(f"skipping: {component} not available ({why})")
    pytest.skip(f"{component} not available ({why}); scripts/test provides it (as root: cluster, namespaces)")


def wait_until(predicate, timeout: float = 10.0, poll: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
