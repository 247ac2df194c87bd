"""Task ownership: a worker that is not running can change no task, and no task stays running.

Real Redis, real worker processes. Each scenario ends by checking the invariants: every task is
finished or failed (or queued for a retry), none is left running, none finished twice.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

import rush_hpc
from rush_hpc.exceptions import NoWorkersError, WorkerNotRunningError

from conftest import SECRET, wait_until

FAST = {"heartbeat_period": 0.2, "heartbeat_expire": 1.0}


def assert_invariants(rush, n_tasks: int | None = None) -> None:
    """No task left running, none finished twice, finished and failed disjoint."""
    counts = rush.counts()
    assert counts["running"] == 0, rush.fetch_running_tasks()
    finished = rush.fetch_finished_tasks()
    keys = list(finished["keys"]) if len(finished) else []
    assert len(keys) == len(set(keys)), "a task finished twice"
    failed = set(rush.fetch_failed_tasks()["keys"]) if counts["failed"] else set()
    assert failed.isdisjoint(keys)
    if n_tasks is not None:
        assert counts["total"] == n_tasks
        assert len(keys) + len(failed) + counts["queued"] == n_tasks


def declare_lost(rush, worker_id: str) -> None:
    assert rush.end_worker(worker_id, "lost", ("running",), f"worker {worker_id} lost: test",
                           reason="test") is not None


# -- in-process workers: every task call is fenced --------------------------------------------------
def test_a_lost_worker_can_change_no_task(rush, worker):
    queued = rush.push_tasks([{"x": 1}, {"x": 2}], max_retries=1)
    held = worker.pop_task()
    own = worker.push_running_tasks([{"x": 3}])
    declare_lost(rush, worker.worker_id)
    calls = {
        "pop_task": lambda: worker.pop_task(),
        "push_running_tasks": lambda: worker.push_running_tasks([{"x": 4}]),
        "push_tasks": lambda: worker.push_tasks([{"x": 5}]),
        "push_results": lambda: worker.push_results(held.key, [{"y": 1}]),
        "push_failed": lambda: worker.push_failed(own),
    }
    for name, call in calls.items():
        with pytest.raises(WorkerNotRunningError, match="lost"):
            call()
            pytest.fail(f"{name} was not refused")
    assert worker.terminated
    states = rush.task_states(queued + own)
    assert states[held.key] == "queued"  # requeued: it had a retry left
    assert states[own[0]] == "failed"
    assert rush.n_tasks == 3  # nothing was created by the lost worker
    assert_invariants(rush, 3)


def test_a_worker_of_a_reset_network_is_refused(rush, worker):
    worker.push_running_tasks([{"x": 1}])
    rush.reset()
    with pytest.raises(WorkerNotRunningError, match="gone"):
        worker.push_running_tasks([{"x": 2}])
    assert rush.n_tasks == 0


def test_a_late_result_of_the_first_owner_is_not_credited_to_the_second(rush, redis_config, network):
    first = rush_hpc.RushWorker(network, config=redis_config, secret=SECRET)
    second = rush_hpc.RushWorker(network, config=redis_config, secret=SECRET)
    first.register()
    second.register()
    [key] = rush.push_tasks([{"x": 1}], max_retries=1)
    assert first.pop_task().key == key
    declare_lost(rush, first.worker_id)
    assert second.pop_task().key == key
    with pytest.raises(WorkerNotRunningError):
        first.push_results(key, [{"y": "late"}])
    # even a running worker cannot finish a task another worker holds
    third = rush_hpc.RushWorker(network, config=redis_config, secret=SECRET)
    third.register()
    assert third.push_results(key, [{"y": "not mine"}]) == [key]
    assert second.push_results(key, [{"y": "mine"}]) == []
    row = rush.fetch_finished_tasks().iloc[0]
    assert row["y"] == "mine" and row["worker_id"] == second.worker_id
    for w in (first, second, third):
        w.close()


def test_ending_a_worker_releases_its_tasks_and_priority_queue_in_one_step(rush, worker, raw):
    rush.push_priority_tasks([{"x": 1}, {"x": 2}], priority=[worker.worker_id, worker.worker_id])
    held = worker.pop_task()
    previous, failed, requeued = rush.end_worker(worker.worker_id, "terminated", ("running",), "ended")
    assert previous == "running" and failed == [held.key] and requeued == []
    assert rush.n_queued_tasks == 1 and rush.n_queued_priority_tasks == 0
    assert raw.scard(rush.keys.held_tasks(worker.worker_id)) == 0
    # a re-sent end is refused and changes nothing
    assert rush.end_worker(worker.worker_id, "terminated", ("running",), "ended") is None
    assert_invariants(rush, 2)


def test_the_sweep_releases_tasks_of_workers_that_are_not_running(rush, worker, raw):
    keys = rush.push_tasks([{"x": i} for i in range(3)], max_retries=1)
    tasks = [worker.pop_task() for _ in keys]
    # a writer (or a crash between two steps of an old version) leaves the worker ended, tasks held
    raw.hset(rush.keys.worker(worker.worker_id), "state", "terminated")
    failed, requeued = rush.sweep_orphaned_tasks(batch=1)
    assert failed == [] and sorted(requeued) == sorted(t.key for t in tasks)
    assert rush.n_queued_tasks == 3 and rush.n_running_tasks == 0
    # a task whose holder has no record at all is released too
    raw.hset(rush.keys.worker(worker.worker_id), "state", "running")
    task = worker.pop_task()
    raw.delete(rush.keys.worker(worker.worker_id))
    failed, requeued = rush.sweep_orphaned_tasks()
    assert failed == [task.key] and requeued == []  # its one retry was used above
    assert "gone" in rush.fetch_failed_tasks().set_index("keys").loc[task.key, "message"]


# -- re-sent commands (a reply dropped on the wire) ---------------------------------------------------
def test_every_task_call_survives_a_dropped_reply(rush, proxied_worker):
    worker, proxy = proxied_worker
    worker.push_running_tasks([{"warm": 1}])  # load the scripts before dropping anything
    worker.push_results(worker.push_running_tasks([{"warm": 2}]), [{"y": 0}])
    worker.push_failed(worker.push_running_tasks([{"warm": 3}]))
    rush.push_tasks([{"x": i} for i in range(3)])

    proxy.drop_next_reply()
    created = worker.push_running_tasks([{"x": 10}, {"x": 11}])
    assert proxy.dropped == 1
    assert rush.n_tasks == 8  # 3 warm-up + 3 queued + 2, each once

    proxy.drop_next_reply()
    task = worker.pop_task()
    assert proxy.dropped == 2
    assert task is not None and rush.n_queued_tasks == 2  # one pop, not two
    assert rush.task_states(task.key)[task.key] == "running"

    proxy.drop_next_reply()
    assert worker.push_results([task.key, created[0]], [{"y": 1}, {"y": 2}]) == []  # not "discarded"
    assert proxy.dropped == 3

    proxy.drop_next_reply()
    assert worker.push_failed([created[1]]) == []
    assert proxy.dropped == 4

    rush.wait_for_tasks([task.key, *created], timeout=5)
    finished = rush.fetch_finished_tasks()
    assert sorted(finished["keys"]) == sorted(set(finished["keys"]))
    assert rush.n_finished_tasks == 3 and rush.n_failed_tasks == 2
    assert rush.counts()["running"] == 1  # the first warm-up task, still held by the worker


# -- real worker processes ---------------------------------------------------------------------------
def wl_pop_forever(rush):
    while not rush.terminated:
        task = rush.pop_task(timeout=0.5)
        if task is not None:
            time.sleep(task.xs.get("sleep", 0.05))
            rush.push_results(task.key, [{"y": task.xs["x"]}])


def wl_hold_the_gil(rush):
    import ctypes

    task = rush.pop_task(timeout=5)
    ctypes.PyDLL(None).sleep(task.xs["seconds"])  # PyDLL keeps the GIL for the whole call
    rush.push_results(task.key, [{"y": "done"}])


def pid_of(rush, worker_id: str) -> int:
    return int(rush.worker_info.set_index("worker_id").loc[worker_id, "pid"])


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    import psutil

    try:  # a zombie (not reaped yet), or gone meanwhile (a forked worker's fork server reaps it at once)
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def signal_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # it ended meanwhile (its heartbeat ended it, or it was killed)
        pass


def test_terminate_applies_to_running_workers_only(rush):
    first = rush.start_local_workers(worker_loop=wl_pop_forever, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=first)
    rush.stop_workers(type="terminate")
    wait_until(lambda: rush.worker_info.set_index("worker_id").loc[first[0], "state"] == "terminated",
               what="the first worker to terminate")
    later = rush.start_local_workers(worker_loop=wl_pop_forever, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=later)
    keys = rush.push_tasks([{"x": 1}])
    rush.wait_for_tasks(keys, timeout=10)  # the later worker runs: it was not told to stop
    assert rush.worker_info.set_index("worker_id").loc[later[0], "state"] == "running"


def test_stopping_a_network_that_does_not_exist_is_an_error(redis_config):
    other = rush_hpc.rsh(network="no-such-network-xyz", config=redis_config, secret=SECRET)
    with pytest.raises(rush_hpc.ConfigError, match="no workers"):
        other.stop_workers()
    assert other.redis.exists(other.keys.workers) == 0  # and nothing was created
    other.close()


def test_wait_for_tasks_raises_when_every_worker_is_dead(rush):
    ids = rush.start_local_workers(worker_loop=wl_pop_forever, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=ids)
    os.kill(pid_of(rush, ids[0]), signal.SIGKILL)
    keys = rush.push_tasks([{"x": 1, "sleep": 0}, {"x": 2, "sleep": 0}])
    started = time.monotonic()
    with pytest.raises(NoWorkersError, match="no worker is running or starting"):
        rush.wait_for_tasks(keys)  # no timeout: it must not hang
    assert time.monotonic() - started < 10


def test_a_worker_holding_the_gil_is_not_lost_and_a_frozen_one_is(rush):
    settings = {"heartbeat_period": 0.5, "heartbeat_expire": 2.0}
    [busy] = rush.start_local_workers(worker_loop=wl_hold_the_gil, n_workers=1, **settings)
    rush.wait_for_workers(worker_ids=[busy])
    [key] = rush.push_tasks([{"seconds": 6}])  # 3 x heartbeat_expire inside one GIL-holding call
    deadline = time.monotonic() + 20
    while rush.task_states(key)[key] != "finished" and time.monotonic() < deadline:
        assert rush.detect_lost_workers() == []
        time.sleep(0.2)
    assert rush.task_states(key)[key] == "finished"

    [frozen] = rush.start_local_workers(worker_loop=wl_pop_forever, n_workers=1, **settings)
    rush.wait_for_workers(worker_ids=[frozen])
    pid = pid_of(rush, frozen)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_until(lambda: frozen in rush.detect_lost_workers(), timeout=10, poll=0.1, what="frozen worker lost")
        assert time.monotonic() - stopped_at <= settings["heartbeat_expire"] + 2 * settings["heartbeat_period"] + 1
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: process_gone(pid), timeout=2 * settings["heartbeat_period"] + 2, what="resumed worker gone")


def test_a_frozen_worker_resumed_after_it_was_lost_changes_nothing(rush):
    """SIGSTOP past expire, then SIGCONT, twice: its task is requeued and finished by another worker."""
    keys = rush.push_tasks([{"x": i, "sleep": 0.3} for i in range(20)], max_retries=5)
    for _ in range(2):
        [frozen] = rush.start_local_workers(worker_loop=wl_pop_forever, n_workers=1, **FAST)
        rush.wait_for_workers(worker_ids=[frozen])
        wait_until(lambda: rush.n_running_tasks > 0, what="a task to run")
        pid = pid_of(rush, frozen)
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: frozen in rush.detect_lost_workers(), timeout=10, poll=0.1, what="lost")
        os.kill(pid, signal.SIGCONT)
        wait_until(lambda: process_gone(pid), timeout=3, what="resumed worker gone")
    rush.start_local_workers(worker_loop=wl_pop_forever, n_workers=2, **FAST)
    rush.wait_for_tasks(keys, timeout=60)
    assert rush.n_failed_tasks == 0
    assert_invariants(rush, 20)


def test_a_heartbeat_that_fails_ends_the_worker(rush, raw):
    [worker_id] = rush.start_local_workers(worker_loop=wl_pop_forever, n_workers=1, **FAST)
    rush.wait_for_workers(worker_ids=[worker_id])
    pid = pid_of(rush, worker_id)
    raw.set(rush.keys.control(worker_id), "not a list")  # a Redis writer breaks the heartbeat's BLPOP
    wait_until(lambda: process_gone(pid), timeout=5, what="the worker to end")
    info = rush.worker_info.set_index("worker_id").loc[worker_id]
    assert info["state"] == "failed" and "heartbeat failed" in info["reason"]


def test_random_kills_and_freezes_leave_no_task_running(rush):
    """The invariant test: random SIGKILL / SIGSTOP / SIGCONT on real workers, then drain."""
    rng = random.Random(7)
    n_tasks = 120
    keys = rush.push_tasks([{"x": i, "sleep": 0.02} for i in range(n_tasks)], max_retries=2)
    workers = rush.start_local_workers(worker_loop=wl_pop_forever, n_workers=4, **FAST)
    rush.wait_for_workers(worker_ids=workers)
    rush.start_monitor(interval=0.3)
    stopped: list[int] = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.1, 0.5))
        alive = rush.running_worker_ids
        if not alive:
            workers += rush.start_local_workers(worker_loop=wl_pop_forever, n_workers=2, **FAST)
            continue
        pid = pid_of(rush, rng.choice(alive))
        action = rng.choice(["kill", "stop", "cont"])
        if action == "kill":
            signal_quietly(pid, signal.SIGKILL)
        elif action == "stop":
            signal_quietly(pid, signal.SIGSTOP)
            stopped.append(pid)
        elif stopped:
            signal_quietly(stopped.pop(rng.randrange(len(stopped))), signal.SIGCONT)
    for pid in stopped:
        signal_quietly(pid, signal.SIGCONT)
    rush.start_local_workers(worker_loop=wl_pop_forever, n_workers=2, **FAST)
    rush.wait_for_tasks(keys, timeout=90)
    rush._monitor_stop.set()
    rush.detect_lost_workers()
    assert_invariants(rush, n_tasks)
    rush.stop_workers(type="kill")
    assert set(rush.worker_info["state"]) <= {"terminated", "killed", "lost", "failed"}
    assert_invariants(rush, n_tasks)
