"""The rush-hpc command line, run as a real subprocess against real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    import logging

    from rush_hpc.logs import RedisLogHandler

    logger = logging.getLogger("test.cli")
    logger.addHandler(RedisLogHandler(worker.redis, worker.keys.log, worker.worker_id))
    logger.warning("a record for the cli")
    assert f"{worker.worker_id} WARNING a record for the cli" in run("logs", env=cli_env).stdout
    assert "asked to terminate" in run("stop", env=cli_env).stdout
    assert worker.terminated
    assert run("lost", env=cli_env).stdout.strip() == "no lost workers"
    top = run("top", "--iterations", "1", env=cli_env).stdout
    assert "<Rush>" in top and "workers: 1 running" in top
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
