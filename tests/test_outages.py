"""Redis outages: workers and controller ride through a restart; without persistence they end cleanly.

A real redis-server is SIGKILLed and restarted on the same port while real local workers run the
vignette loop. With AOF (``appendfsync always``) nothing is lost and nobody is declared lost; without
persistence the workers find their records gone and exit with a clear line in their log.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import rush_hpc
from rush_hpc.config import RedisConfig
from rush_hpc.server import free_port

from conftest import SECRET, wait_until
from test_ownership import assert_invariants, process_gone

FAST = {"heartbeat_period": 0.2, "heartbeat_expire": 1.0}
AOF = ("--appendonly", "yes", "--appendfsync", "always")
NO_PERSISTENCE = ("--appendonly", "no", "--save", "")


class RestartableRedis:
    """A redis-server on a fixed port that a test can SIGKILL and start again."""

    def __init__(self, directory: Path, persistence: tuple[str, ...]) -> None:
        self.directory, self.persistence = directory, persistence
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed; run scripts/test"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--logfile", str(self.directory / "redis.log"), "--save", "", *self.persistence],
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    if RedisConfig(port=self.port).client(outage_timeout=0).ping():
                        return
            except Exception:  # noqa: BLE001 - still starting (or loading the AOF)
                time.sleep(0.02)
        raise AssertionError(f"redis-server did not start: {(self.directory / 'redis.log').read_text()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def wl_vignette(rush):
    import random

    while not rush.terminated:
        key = rush.push_running_tasks([{"x": random.random()}])
        time.sleep(0.01)
        rush.push_results(key, [{"y": 1.0}])


@pytest.fixture
def restartable(tmp_path, request):
    server = RestartableRedis(tmp_path / "redis", request.param)
    yield server
    server.stop()


@pytest.mark.parametrize("restartable", [AOF], indirect=True, ids=["aof-always"])
def test_workers_ride_through_a_redis_restart(restartable, tmp_path, caplog):
    rush = rush_hpc.rsh(network="outage", config=RedisConfig(port=restartable.port), secret=SECRET,
                        redis_outage_timeout=30)
    try:
        ids = rush.start_local_workers(worker_loop=wl_vignette, n_workers=2, log_dir=str(tmp_path / "logs"),
                                       **FAST)
        rush.wait_for_workers(worker_ids=ids)
        rush.start_monitor(interval=0.2)
        wait_until(lambda: rush.n_finished_tasks > 20, what="first results")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            restartable.kill()
            time.sleep(3)  # 3 x heartbeat_expire: every heartbeat key expires meanwhile
            restartable.start()
            before = rush.n_finished_tasks
            wait_until(lambda: rush.n_finished_tasks > before + 50, timeout=20, what="results after the restart")
            time.sleep(2 * FAST["heartbeat_expire"])  # the monitor had time to (wrongly) declare them lost
            assert rush.running_worker_ids == sorted(ids)  # the same workers, none lost
        monitor_lines = [r for r in caplog.records if r.name.startswith("rush_hpc")]
        assert all(r.exc_info is None for r in monitor_lines), "a traceback was logged during the outage"
        assert len([r for r in monitor_lines if "unreachable" in r.getMessage()]) <= 2
        rush.stop_workers(type="terminate")
        wait_until(lambda: not rush.running_worker_ids, timeout=10, what="workers to terminate")
        assert_invariants(rush)
        assert set(rush.worker_info["state"]) == {"terminated"}
    finally:
        rush.reset()
        rush.close()


@pytest.mark.parametrize("restartable", [NO_PERSISTENCE], indirect=True, ids=["no-persistence"])
def test_workers_exit_when_redis_comes_back_without_their_network(restartable, tmp_path):
    rush = rush_hpc.rsh(network="outage", config=RedisConfig(port=restartable.port), secret=SECRET,
                        redis_outage_timeout=30)
    log_dir = tmp_path / "logs"
    try:
        ids = rush.start_local_workers(worker_loop=wl_vignette, n_workers=2, log_dir=str(log_dir), **FAST)
        rush.wait_for_workers(worker_ids=ids)
        pids = [int(p) for p in rush.worker_info["pid"]]
        wait_until(lambda: rush.n_finished_tasks > 5, what="first results")
        restartable.kill()
        time.sleep(1)
        restartable.start()  # empty: no persistence
        for pid in pids:
            wait_until(lambda pid=pid: process_gone(pid), timeout=5, what=f"worker process {pid} to exit")
        logs = "".join((log_dir / f"{w}.err").read_text() for w in ids)
        assert "no record in Redis" in logs or "is gone, not running" in logs
    finally:
        for pid in pids:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)
        rush.close()


CONTROLLER_SCRIPT = """
import sys, time
import rush_hpc

def loop(rush):
    while not rush.terminated:
        time.sleep(0.05)

rush = rush_hpc.rsh(network="orphans")          # embedded Redis
ids = rush.start_local_workers(worker_loop=loop, n_workers=2)
rush.wait_for_workers(2, timeout=60)
print(" ".join(rush.worker_info["pid"]), flush=True)
time.sleep(600)                                  # killed before it reaches close()
"""


def test_workers_of_an_embedded_redis_end_when_its_controller_is_killed(tmp_path):
    import sys

    script = tmp_path / "controller.py"
    script.write_text(CONTROLLER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUSH_HPC_URL", "REDIS_URL"))}
    controller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env,
                                  cwd=tmp_path)
    try:
        pids = [int(p) for p in controller.stdout.readline().split()]
        assert len(pids) == 2, "the controller did not start its workers"
        controller.send_signal(signal.SIGKILL)
        controller.wait(10)
        killed_at = time.monotonic()
        for pid in pids:
            wait_until(lambda pid=pid: process_gone(pid), timeout=10, what=f"worker {pid} to exit")
        assert time.monotonic() - killed_at < 10
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait(10)
        controller.stdout.close()
