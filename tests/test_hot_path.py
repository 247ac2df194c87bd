"""The hot path: two round trips per vignette task, one per queue task, pops that block in Redis."""

from __future__ import annotations

import threading
import time

import rush_hpc


def round_trips(client, call, fast=None) -> int:
    """Commands ``client`` (and the worker's fast-path connection ``fast``) send during ``call()``
    (each one round trip; nothing here pipelines)."""
    sent = []
    original = client.execute_command
    client.execute_command = lambda *args, **options: sent.append(args[0]) or original(*args, **options)
    if fast is not None:
        fast_original = fast.execute
        fast.execute = lambda *args: sent.append(args[0]) or fast_original(*args)
    try:
        call()
    finally:
        del client.execute_command
        if fast is not None:
            del fast.execute
    return len(sent)


def test_the_vignette_step_takes_two_round_trips(rush, worker, raw):
    worker.push_results(worker.push_running_tasks([{"x": 0}]), [{"y": 0}])

    def step():
        assert worker.n_finished_tasks >= 1       # answered by the last push_results
        keys = worker.push_running_tasks([{"x": 1}])
        worker.push_results(keys, [{"y": 1}])

    assert round_trips(worker.redis, step, worker._fast) == 2
    assert worker.n_finished_tasks == 2
    assert round_trips(worker.redis, lambda: worker.n_finished_tasks, worker._fast) == 1  # a second read asks Redis


def test_finish_and_pop_is_one_round_trip(rush, worker, raw):
    rush.push_tasks([{"x": i} for i in range(-1, 3)])
    warm = worker.pop_task()
    task = worker.finish_and_pop(warm.key, [{"y": -1}])  # the first call also loads the script
    seen = []

    def step():
        seen.append(worker.finish_and_pop(task.key, [{"y": task.xs["x"]}]))

    assert round_trips(worker.redis, step, worker._fast) == 1
    nxt = seen[0]
    assert nxt is not None and nxt.xs == {"x": 1}
    last = worker.finish_and_pop(nxt.key, [{"y": 1}])
    assert worker.finish_and_pop(last.key, [{"y": 2}]) is None  # queue empty, no timeout
    assert sorted(rush.fetch_finished_tasks()["y"]) == [-1, 0, 1, 2]
    assert rush.n_running_tasks == 0


def test_an_idle_worker_wakes_up_when_a_task_is_pushed(rush, worker):
    got = []
    waiter = threading.Thread(target=lambda: got.append((worker.pop_task(timeout=20), time.monotonic())))
    waiter.start()
    time.sleep(0.5)  # the worker is blocked in Redis now
    pushed_at = time.monotonic()
    [key] = rush.push_tasks([{"x": 1}])
    waiter.join(25)
    task, popped_at = got[0]
    assert task is not None and task.key == key
    assert popped_at - pushed_at < 5  # woken by the push, not by the end of its 20 s wait


def test_priority_tasks_for_a_worker_that_ended_go_to_the_shared_queue(rush, worker, redis_config, network):
    other = rush_hpc.RushWorker(network, config=redis_config, secret=worker.codec.secret)
    other.register()
    rush.end_worker(other.worker_id, "terminated", ("running",), "ended")
    keys = rush.push_priority_tasks([{"x": 1}, {"x": 2}], priority=[other.worker_id, worker.worker_id])
    assert rush.n_queued_priority_tasks == 1 and rush.n_queued_tasks == 1
    assert worker.pop_task().key == keys[1]  # own priority first
    assert worker.pop_task().key == keys[0]
    other.close()
