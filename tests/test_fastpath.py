"""The worker's hot commands on a bare hiredis socket (rush_hpc/fastpath.py), against a real Redis:
same results as through redis-py, scripts reloaded after a flush, a killed connection reopened, a
forked child on its own connection, a bad password refused at once."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
import redis

import rush_hpc
from rush_hpc.fastpath import FastConnection
from rush_hpc.outage import OutageRetry

from conftest import SECRET


def test_a_worker_runs_its_task_scripts_on_the_fast_path(rush, worker, monkeypatch):
    assert worker._fast is not None
    used = []
    original = worker._fast.execute
    monkeypatch.setattr(worker._fast, "execute", lambda *args: used.append(args[0]) or original(*args))
    keys = worker.push_running_tasks([{"x": 1}, {"x": 2}])
    worker.push_results(keys, [{"y": 1}, {"y": 2}])
    rush.push_tasks([{"x": 3}])
    task = worker.pop_task()
    assert worker.finish_and_pop(task.key, [{"y": 3}]) is None
    # four calls; a script's first use is NOSCRIPT, SCRIPT LOAD, EVALSHA again
    assert used.count("EVALSHA") - used.count("SCRIPT") == 4 and set(used) <= {"EVALSHA", "SCRIPT"}
    assert sorted(rush.fetch_finished_tasks()["y"]) == [1, 2, 3]


def test_without_the_fast_path_the_results_are_the_same(rush, redis_config, network, monkeypatch):
    monkeypatch.setenv("RUSH_HPC_FAST_PATH", "0")
    plain = rush_hpc.RushWorker(network, config=redis_config, secret=SECRET)
    plain.register()
    assert plain._fast is None
    keys = plain.push_running_tasks([{"x": 1}])
    plain.push_results(keys, [{"y": 1}])
    assert rush.fetch_finished_tasks()["y"].tolist() == [1]
    plain.close()


def test_scripts_are_loaded_again_after_a_flush_and_a_killed_connection_is_reopened(rush, worker, raw):
    worker.push_results(worker.push_running_tasks([{"x": 0}]), [{"y": 0}])
    raw.script_flush()  # NOSCRIPT on the next call: loaded again
    worker.push_results(worker.push_running_tasks([{"x": 1}]), [{"y": 1}])
    for client in raw.client_list():  # every connection but this one: the worker's fast one too
        if int(client["id"]) != raw.client_id():
            raw.client_kill_filter(_id=client["id"])
    worker.push_results(worker.push_running_tasks([{"x": 2}]), [{"y": 2}])
    assert sorted(rush.fetch_finished_tasks()["y"]) == [0, 1, 2]
    assert rush.n_running_tasks == 0


def test_a_forked_child_opens_its_own_connection(rush, worker, raw):
    worker.push_results(worker.push_running_tasks([{"x": 0}]), [{"y": 0}])
    parent_connection = worker._fast._sock
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        ok = 0
        try:
            worker.push_results(worker.push_running_tasks([{"x": 1}]), [{"y": 1}])
            ok = int(worker._fast._sock is not parent_connection)
        finally:
            os.write(write, bytes([ok]))
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"\x01"
    os.waitpid(pid, 0)
    worker.push_results(worker.push_running_tasks([{"x": 2}]), [{"y": 2}])  # the parent's is intact
    assert sorted(rush.fetch_finished_tasks()["y"]) == [0, 1, 2]


def test_a_wrong_password_is_refused_at_once_not_retried_as_an_outage(redis_config, tmp_path):
    from conftest import start_redis_server, stop

    process, port = start_redis_server(tmp_path, "--requirepass", "right")
    try:
        config = dataclasses.replace(redis_config, port=port, password="wrong")
        fast = FastConnection(config, OutageRetry(30))
        started = time.monotonic()
        with pytest.raises(redis.ResponseError, match="WRONGPASS"):
            fast.execute("PING")
        assert time.monotonic() - started < 5
        good = FastConnection(dataclasses.replace(config, password="right"), OutageRetry(30))
        assert good.execute("PING") == b"PONG"
        good.close()
    finally:
        stop(process)
