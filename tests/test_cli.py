"""The rush-hpc command line, run as a real subprocess against real Redis."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

import rush_hpc

from conftest import SECRET


def run(*args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 120):
    result = subprocess.run([sys.executable, "-m", "rush_hpc", *args], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}")
    return result


@pytest.fixture
def cli_env(redis_config, network):
    return {"RUSH_HPC_URL": redis_config.to_url(show_secrets=True), "RUSH_HPC_NETWORK": network,
            "RUSH_HPC_SECRET": SECRET.decode()}


def test_status_workers_tasks_logs_stop_reset(rush, worker, cli_env):
    keys = worker.push_running_tasks([{"x": 1}, {"x": 2}])
    worker.push_results(keys[:1], [{"y": 10}])
    rush.push_tasks([{"x": 3}])
    assert run("status", env=cli_env).stdout.splitlines()[:2] == ["<Rush>", "* Running Workers: 1"]
    workers = json.loads(run("workers", "--format", "json", env=cli_env).stdout)
    assert [w["worker_id"] for w in workers] == [worker.worker_id]
    finished = run("tasks", "--state", "finished", "--format", "csv", env=cli_env).stdout.splitlines()
    assert finished[0].split(",")[:3] == ["x", "y", "pid"] and len(finished) == 2
    everything = run("tasks", env=cli_env).stdout
    assert "queued" in everything and "running" in everything
    from rush_hpc.logs import RedisLogHandler

    logger = logging.getLogger("test.cli")
    logger.addHandler(RedisLogHandler(worker.redis, worker.keys.log, worker.worker_id))
    logger.warning("a record for the cli")
    assert f"{worker.worker_id[:8]} WARNING a record for the cli" in run("logs", env=cli_env).stdout
    assert f"{worker.worker_id} WARNING" in run("logs", "--full-ids", env=cli_env).stdout
    assert "asked to terminate" in run("stop", env=cli_env).stdout
    assert worker.terminated
    assert run("lost", env=cli_env).stdout.strip() == "no lost workers"
    top = run("top", "--once", "--interval", "0.1", env=cli_env).stdout
    assert "workers  1 running" in top and "1 queued · 1 running · 1 finished · 0 failed" in top
    run("reset", "--yes", env=cli_env)
    assert rush.n_tasks == 0


def test_worker_script_redacts_secrets(cli_env, rush):
    line = run("worker-script", env=cli_env).stdout
    assert SECRET.decode() not in line and "RUSH_HPC_SECRET='***'" in line


def test_errors_are_one_line_without_traceback():
    result = run("status", "-n", "x", "--url", "redis://:pw@127.0.0.1:1/0", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach Redis at redis://:***@127.0.0.1:1/0")
    assert "Traceback" not in result.stderr and "pw@" not in result.stderr
    missing = run("status", "-n", "x", check=False, env={"RUSH_HPC_URL": ""})
    assert missing.returncode == 1 and "give --url or set RUSH_HPC_URL" in missing.stderr


def test_demo_random_search_and_module_entry_point(redis_config):
    url = redis_config.to_url(show_secrets=True)
    out = run("demo", "random-search", "--workers", "2", "--tasks", "30", "--url", url).stdout
    assert "<Rush>" in out and "best y =" in out and "by 2 workers" in out
    module = subprocess.run([sys.executable, "-m", "rush_hpc.examples.random_search", "--workers", "1",
                             "--tasks", "10", "--url", url], capture_output=True, text=True, timeout=120)
    assert module.returncode == 0 and "best y =" in module.stdout


def test_version():
    assert rush_hpc.__version__ in run("--version").stdout


# -- output at 80 columns ---------------------------------------------------------------------------
def test_tables_show_short_ids_and_limit_rows(rush, worker, cli_env):
    keys = worker.push_running_tasks([{"x": i} for i in range(5)])
    worker.push_results(keys, [{"y": i} for i in range(5)])
    table = run("tasks", "--limit", "2", env=cli_env)
    lines = table.stdout.splitlines()
    assert len(lines) == 3 and "(2 of 5 rows; --limit)" in table.stderr
    assert keys[4][:8] in lines[-1] and keys[4] not in table.stdout and worker.worker_id not in table.stdout
    assert keys[4] in run("tasks", "--full-ids", env=cli_env).stdout
    assert len(json.loads(run("tasks", "--format", "json", "--limit", "3", env=cli_env).stdout)) == 3
    workers = run("workers", env=cli_env).stdout.splitlines()
    assert len(workers) == 2 and workers[1].startswith(worker.worker_id[:8] + "  running")
    assert max(map(len, workers)) <= 100


def test_workers_lines_fit_100_columns_with_long_reasons_and_times_are_local(rush, worker, cli_env):
    rush.redis.hset(rush.keys.worker(worker.worker_id), mapping={
        "hostname": "a-very-long-host-name.cluster.example.org", "reason": "x" * 300 + "\nsecond line"})
    line = run("workers", env={**cli_env, "TZ": "Asia/Kolkata"}).stdout.splitlines()[1]
    assert len(line) <= 100 and line.endswith("...") and "second line" not in line
    assert re.search(r" \d\d:\d\d:\d\d \+05:30 ", line)
    records = json.loads(run("workers", "--format", "json", env={**cli_env, "TZ": "Asia/Kolkata"}).stdout)
    assert records[0]["worker_id"] == worker.worker_id and records[0]["reason"].endswith("second line")
    assert records[0]["started_at"].endswith("+05:30") and records[0]["ended_at"] is None


# -- logs --follow past the cap -----------------------------------------------------------------------
def test_logs_follow_keeps_printing_after_the_log_reached_its_cap(rush, worker, cli_env):
    from rush_hpc.logs import RedisLogHandler

    logger = logging.getLogger("test.cli.follow")
    logger.propagate = False
    handler = RedisLogHandler(worker.redis, worker.keys.log, worker.worker_id, max_records=3)
    logger.addHandler(handler)
    process = subprocess.Popen([sys.executable, "-m", "rush_hpc", "logs", "--follow", "--interval", "0.05"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **cli_env})
    watchdog = threading.Timer(60, process.kill)  # a silent follower must not hang the test
    watchdog.start()
    try:
        for i in range(10):  # the cap is 3: from the 4th record on the list index stands still
            logger.warning("record %d", i)
            line = process.stdout.readline()  # blocks until the follower printed it
            assert line.rstrip().endswith(f"{worker.worker_id[:8]} WARNING record {i}"), line
    finally:
        watchdog.cancel()
        process.kill()
        process.communicate()
        logger.removeHandler(handler)


# -- edges ------------------------------------------------------------------------------------------
def serve(reply: bytes | None):
    """A loopback TCP server that answers every connection with ``reply`` (None: never answers)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            held.append(connection)
            if reply is not None:
                connection.recv(4096)
                connection.sendall(reply)

    threading.Thread(target=accept, daemon=True).start()
    return server, held


@pytest.mark.parametrize("reply", [None, b"HTTP/1.0 400 Bad Request\r\n\r\n<html></html>", b"SSH-2.0-OpenSSH_9.2\r\n"],
                         ids=["silent", "http", "ssh"])
def test_something_that_is_not_redis_gives_one_line_within_seconds(reply):
    server, held = serve(reply)
    try:
        port = server.getsockname()[1]
        started = time.monotonic()
        result = run("status", "-n", "x", "--url", f"redis://:pw@127.0.0.1:{port}/0", check=False, timeout=30)
        elapsed = time.monotonic() - started
    finally:
        server.close()
        for connection in held:
            connection.close()
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: redis://:***@127.0.0.1:{port}/0 ")
    assert ("did not answer within 3 s" if reply is None else "does not speak the Redis protocol") in result.stderr
    assert elapsed < 20  # not the 60 s socket timeout (a bound, not a performance measurement)


def test_stop_refuses_unknown_worker_ids_and_networks(rush, worker, cli_env):
    bogus = run("stop", "--worker-id", "bogus", env=cli_env, check=False)
    assert bogus.returncode == 1 and "unknown worker id(s)" in bogus.stderr and "bogus" in bogus.stderr
    assert not worker.terminated
    missing = run("stop", "-n", "no-such-network", env=cli_env, check=False)
    assert missing.returncode == 1 and "network 'no-such-network' does not exist" in missing.stderr
    assert "asked to terminate" in run("stop", "--worker-id", worker.worker_id[:8], env=cli_env).stdout
    assert worker.terminated  # an 8-character prefix, as the tables show, is enough


def test_demo_refuses_to_wipe_an_existing_network(rush, worker, cli_env):
    keys = worker.push_running_tasks([{"x": 1}])
    url = cli_env["RUSH_HPC_URL"]
    result = run("demo", "random-search", "--network", rush.network, "--url", url, check=False)
    assert result.returncode == 1 and "already exists" in result.stderr and "--yes" in result.stderr
    assert rush.task_states(keys) == {keys[0]: "running"}  # untouched


def test_redis_errors_in_the_middle_of_a_command_are_one_line(raw, redis_config, network):
    """The CLI-wide handler: an ACL user that may connect but not read the network's keys."""
    user, password = f"cli-{network}", "cli-password"
    raw.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["other:*"],
                    commands=["+@all", "-@dangerous"])
    try:
        url = f"redis://{user}:{password}@127.0.0.1:{redis_config.port}/0"
        result = run("status", "-n", network, "--url", url, check=False)
    finally:
        raw.acl_deluser(user)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert "no permissions" in result.stderr and "needs access to the network's keys" in result.stderr
    assert password not in result.stderr
