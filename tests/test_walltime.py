"""Walltime-aware workers: near the end of their allocation they take no new task and end
"terminated" with reason "walltime"; nothing is lost."""

from __future__ import annotations

import time

import pytest

from rush_hpc.walltime import job_end_time, parse_slurm_time, walltime_margin

from conftest import wait_until


def test_the_end_comes_from_the_environment_or_squeue_text():
    assert job_end_time({"RUSH_HPC_JOB_END": "1800000000"}) == 1800000000.0
    assert job_end_time({}) is None
    assert job_end_time({"SLURM_JOB_ID": "x; rm -rf /"}) is None  # never reaches a command
    assert parse_slurm_time("N/A") is None
    assert parse_slurm_time("2026-11-26T09:30:00") == pytest.approx(
        time.mktime(time.strptime("2026-11-26T09:30:00", "%Y-%m-%dT%H:%M:%S")))


def test_the_default_margin_is_60_s_or_a_quarter_of_a_short_allocation():
    now = time.time()
    assert walltime_margin(None, None) == 60 and walltime_margin("5", now + 10) == 5
    assert walltime_margin(None, now + 3600) == 60
    assert walltime_margin(None, now + 60) == pytest.approx(15, abs=0.1)


def test_a_worker_near_its_walltime_takes_no_task(rush, worker):
    rush.push_tasks([{"x": 1}])
    worker.job_end, worker.walltime_margin = time.time() + 3600, 60
    assert worker.time_left > 3000 and not worker.near_walltime
    worker.job_end = time.time() + 30
    assert worker.near_walltime and worker.pop_task(timeout=5) is None
    assert worker.terminated and rush.n_queued_tasks == 1


def wl_pop_slowly(rush):
    while not rush.terminated:
        task = rush.pop_task(timeout=0.2)
        if task is not None:
            time.sleep(0.3)
            rush.push_results(task.key, [{"y": task.xs["x"]}])


def test_a_launched_worker_ends_before_its_walltime_and_loses_nothing(rush, monkeypatch):
    keys = rush.push_tasks([{"x": i} for i in range(40)], max_retries=1)
    monkeypatch.setenv("RUSH_HPC_JOB_END", f"{time.time() + 8:.3f}")  # the default margin: a quarter, 2 s
    [worker_id] = rush.start_local_workers(worker_loop=wl_pop_slowly, n_workers=1, heartbeat_period=0.2,
                                           heartbeat_expire=1.0)
    rush.wait_for_workers(worker_ids=[worker_id])
    wait_until(lambda: worker_id not in rush.running_worker_ids, timeout=20, what="the worker to end")
    info = rush.worker_info.set_index("worker_id").loc[worker_id]
    assert info["state"] == "terminated" and info["reason"] == "walltime"
    states = rush.task_states(keys)
    assert "running" not in states.values() and 0 < list(states.values()).count("finished") < 40
    assert set(states.values()) <= {"finished", "queued"}  # the rest is still there for a next worker
