"""The task API against a real redis-server."""

from __future__ import annotations

import logging
import math
import pickle
import threading
import time

import numpy as np
import pytest

import rush_hpc
from rush_hpc import TaskError, UnknownTaskError


def test_running_task_finishes_and_shows_in_finished_frame(rush, worker):
    keys = worker.push_running_tasks([{"x1": 1.0, "x2": 2.0}])
    assert rush.task_states(keys) == {keys[0]: "running"}
    assert rush.n_running_tasks == 1
    worker.push_results(keys, [{"y": 3.0}])
    assert rush.n_finished_tasks == 1 and rush.n_running_tasks == 0
    frame = rush.fetch_finished_tasks()
    assert list(frame.columns) == ["x1", "x2", "y", "pid", "worker_id", "keys"]
    row = frame.iloc[0]
    assert (row.x1, row.x2, row.y, row.worker_id, row["keys"]) == (1.0, 2.0, 3.0, worker.worker_id, keys[0])
    assert row.pid == worker.pid


def test_failed_task_carries_its_condition(rush, worker):
    keys = worker.push_running_tasks([{"x": 1}, {"x": 2}])
    worker.push_failed(keys[:1], conditions=[{"message": "diverged"}])
    failed = rush.fetch_failed_tasks()
    assert failed["message"].tolist() == ["diverged"] and failed["keys"].tolist() == keys[:1]
    assert (rush.n_failed_tasks, rush.n_running_tasks) == (1, 1)


def test_first_writer_wins_and_late_result_is_discarded_with_warning(rush, worker, caplog):
    key = worker.push_running_tasks([{"x": 1}])
    worker.push_failed(key, [{"message": "first"}])
    with caplog.at_level(logging.WARNING, logger="rush_hpc"):
        discarded = worker.push_results(key, [{"y": 1}])
    assert discarded == key
    assert "no longer running" in caplog.text and "failed" in caplog.text
    assert rush.task_states(key) == {key[0]: "failed"}
    assert (rush.n_finished_tasks, rush.n_failed_tasks) == (0, 1)
    # and the other way round: a finished task cannot fail any more
    key2 = worker.push_running_tasks([{"x": 2}])
    worker.push_results(key2, [{"y": 2}])
    assert worker.push_failed(key2) == key2
    assert rush.task_states(key2) == {key2[0]: "finished"}


def test_concurrent_finish_and_fail_never_both(rush, worker, redis_config, network):
    keys = worker.push_running_tasks([{"i": i} for i in range(300)])
    threads = [threading.Thread(target=worker.push_results, args=(keys, [{"y": 1}] * 300)),
               threading.Thread(target=worker.push_failed, args=(keys,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rush.n_finished_tasks + rush.n_failed_tasks == 300
    finished = set(rush.fetch_finished_tasks()["keys"])
    failed = set(rush.fetch_failed_tasks()["keys"])
    assert finished.isdisjoint(failed) and finished | failed == set(keys)


def test_queue_pop_and_results(rush, worker):
    keys = rush.push_tasks([{"x": i} for i in range(3)])
    assert rush.n_queued_tasks == 3 and rush.fetch_queued_tasks()["x"].tolist() == [0, 1, 2]
    task = worker.pop_task()
    assert task.key == keys[0] and task.xs == {"x": 0}
    assert rush.task_states(task.key) == {task.key: "running"}
    worker.push_results(task.key, [{"y": 0}])
    assert rush.fetch_running_tasks().empty
    assert rush.n_queued_tasks == 2


def test_pop_task_on_empty_queue_returns_none_after_timeout(worker):
    assert worker.pop_task() is None
    started = time.monotonic()
    assert worker.pop_task(timeout=0.3) is None
    assert time.monotonic() - started >= 0.3


def test_pop_task_waits_for_a_task_pushed_later(rush, worker):
    threading.Timer(0.2, rush.push_tasks, args=([{"x": 7}],)).start()
    task = worker.pop_task(timeout=5)
    assert task is not None and task.xs == {"x": 7}


def test_priority_tasks_are_popped_first_and_fall_back_to_shared_queue(rush, worker):
    rush.push_tasks([{"x": "shared"}])
    rush.push_priority_tasks([{"x": "mine"}, {"x": "nobody"}], priority=[worker.worker_id, "not-a-worker"])
    assert rush.n_queued_priority_tasks == 1 and rush.n_queued_tasks == 2
    assert worker.pop_task().xs == {"x": "mine"}
    assert [worker.pop_task().xs["x"] for _ in range(2)] == ["shared", "nobody"]
    with pytest.raises(TaskError, match="priority has 1 entries"):
        rush.push_priority_tasks([{"x": 1}, {"x": 2}], priority=[worker.worker_id])


def test_fetch_tasks_with_state_returns_each_task_once(rush, worker):
    queued = rush.push_tasks([{"x": 1}])
    running = worker.push_running_tasks([{"x": 2}])
    finished = worker.push_running_tasks([{"x": 3}])
    worker.push_results(finished, [{"y": 3}])
    failed = worker.push_running_tasks([{"x": 4}])
    worker.push_failed(failed)
    frame = rush.fetch_tasks_with_state()
    assert dict(zip(frame["keys"], frame["state"])) == {
        queued[0]: "queued", running[0]: "running", finished[0]: "finished", failed[0]: "failed"}
    subset = rush.fetch_tasks_with_state(states=["running", "finished"])
    assert sorted(subset["state"]) == ["finished", "running"]
    assert len(rush.fetch_tasks()) == rush.n_tasks == 4
    with pytest.raises(TaskError, match="unknown task state"):
        rush.fetch_tasks_with_state(states=["done"])


def test_fetch_finished_is_incremental(rush, worker, raw):
    first = worker.push_running_tasks([{"x": i} for i in range(5)])
    worker.push_results(first, [{"y": i} for i in range(5)])
    assert len(rush.fetch_finished_tasks()) == 5
    # change an already fetched task behind the cache's back: an incremental fetch must not reread it
    raw.hset(rush.keys.task(first[0]), "ys", b'j{"y":999}')
    second = worker.push_running_tasks([{"x": 5}])
    worker.push_results(second, [{"y": 5}])
    frame = rush.fetch_finished_tasks()
    assert frame["y"].tolist() == [0, 1, 2, 3, 4, 5]
    assert frame["keys"].tolist() == first + second


def test_fetch_new_tasks_returns_only_unseen_rows(rush, worker):
    keys = worker.push_running_tasks([{"x": 1}, {"x": 2}])
    worker.push_results(keys, [{"y": 1}, {"y": 2}])
    assert rush.fetch_new_tasks()["keys"].tolist() == keys
    assert rush.fetch_new_tasks().empty
    more = worker.push_running_tasks([{"x": 3}])
    worker.push_results(more, [{"y": 3}])
    assert rush.fetch_new_tasks()["keys"].tolist() == more


PLAIN = {"int": 3, "float": 0.1, "neg": -2.5e-300, "str": "grüße ✓", "none": None, "true": True,
         "false": False, "list": [1, "a", [None, 2.0]], "dict": {"nested": {"deep": [1, {"k": "v"}]}},
         "big": 2**62, "empty": {}}


def test_plain_values_round_trip_exactly_without_unpickling(rush, worker, monkeypatch):
    key = worker.push_running_tasks([{"x": PLAIN}])
    worker.push_results(key, [{"y": PLAIN, "nan": math.nan}])

    def refuse(*args, **kwargs):
        raise AssertionError("plain data must never be unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    row = rush.fetch_finished_tasks().iloc[0]
    assert row.x == PLAIN and row.y == PLAIN and math.isnan(row.nan)
    assert type(row.x["int"]) is int and type(row.x["true"]) is bool
    raw_row = rush.redis.lindex(rush.keys.finished, 0)  # a finished task's values live in its row
    assert raw_row.startswith(f'["{key[0]}",{{"x":'.encode())  # readable by any tool


def test_other_values_round_trip_through_signed_pickle(rush, worker):
    array = np.arange(6.0).reshape(2, 3)
    key = worker.push_running_tasks([{"coords": (1, 2), "lookup": {1: "int key"}}])
    worker.push_results(key, [{"array": array}])
    row = rush.fetch_finished_tasks().iloc[0]
    assert row.coords == (1, 2) and row["lookup"] == {1: "int key"} and row["keys"] == key[0]
    np.testing.assert_array_equal(row["array"], array)


def test_extra_columns(rush, worker):
    keys = worker.push_running_tasks([{"x": 1}, {"x": 2}], extra=[{"stage": "a"}, {"stage": "b"}])
    worker.push_results(keys, [{"y": 1}, {"y": 2}], extra={"budget": 10})
    frame = rush.fetch_finished_tasks()
    assert frame["stage"].tolist() == ["a", "b"] and frame["budget"].tolist() == [10, 10]


@pytest.mark.parametrize("call, message", [
    (lambda w: w.push_running_tasks({"x": 1}), "wrap a single task"),
    (lambda w: w.push_running_tasks([1, 2]), r"xss\[0\] must be a dict"),
    (lambda w: w.push_running_tasks("x"), "must be a list of dicts"),
    (lambda w: w.push_results(["a", "b"], [{"y": 1}]), "2 keys but 1 results"),
    (lambda w: w.push_failed(["a"], [{"m": 1}, {"m": 2}]), "1 keys but 2 conditions"),
    (lambda w: w.push_running_tasks([{"x": 1}], extra=[{}, {}]), "extra has 2 entries but there are 1"),
    (lambda w: w.push_tasks([{"x": 1}], max_retries=-1), "max_retries"),
])
def test_bad_task_input_raises_task_error(worker, call, message):
    with pytest.raises(TaskError, match=message):
        call(worker)


def test_unknown_task_key(rush):
    with pytest.raises(UnknownTaskError, match="unknown task key"):
        rush.wait_for_tasks(["no-such-key"])


def test_wait_for_tasks(rush, worker):
    keys = worker.push_running_tasks([{"x": 1}])
    threading.Timer(0.2, worker.push_results, args=(keys, [{"y": 1}])).start()
    rush.wait_for_tasks(keys, timeout=5)
    with pytest.raises(rush_hpc.RushTimeoutError, match="1 of 1 tasks still not finished"):
        rush.wait_for_tasks(worker.push_running_tasks([{"x": 2}]), timeout=0.1)


def test_aliases_from_later_r_rush(worker):
    assert rush_hpc.RushWorker.finish_tasks is rush_hpc.RushWorker.push_results
    assert rush_hpc.RushWorker.fail_tasks is rush_hpc.RushWorker.push_failed


def test_summary_block_like_the_vignette(rush, worker):
    worker.push_running_tasks([{"x": 1}])
    rush.push_tasks([{"x": 2}, {"x": 3}])
    assert str(rush) == ("<Rush>\n* Running Workers: 1\n* Queued Tasks: 2\n* Queued Priority Tasks: 0\n"
                         "* Running Tasks: 1\n* Finished Tasks: 0\n* Failed Tasks: 0")


def test_every_key_lives_under_the_network_prefix_and_reset_spares_other_networks(
        rush, worker, redis_config, raw):
    other = rush_hpc.rsh(network=rush.network + "-other", config=redis_config)
    try:
        other.push_tasks([{"x": 1}])
        worker.push_results(worker.push_running_tasks([{"x": 1}]), [{"y": 1}])
        rush.push_tasks([{"x": 1}])
        ours = [k.decode() for k in raw.scan_iter(match=f"*{{{rush.network}}}*")]
        assert ours and all(k.startswith(f"rush:{{{rush.network}}}:") for k in ours)
        rush.reset()
        assert list(raw.scan_iter(match=rush.keys.pattern)) == []
        assert other.n_queued_tasks == 1
    finally:
        other.reset()
        other.close()


def test_transient_connection_loss_is_retried(rush, worker, raw):
    keys = worker.push_running_tasks([{"x": 1}])
    raw.client_kill_filter(_type="normal", skipme=True)  # drop every other client's connection
    worker.push_results(keys, [{"y": 1}])
    assert rush.n_finished_tasks == 1


def test_changing_a_fetched_frame_does_not_change_the_cache(rush, worker):
    keys = worker.push_running_tasks([{"x": 1}, {"x": 2}])
    worker.push_results(keys, [{"y": 1.0}, {"y": 2.0}])
    frame = rush.fetch_finished_tasks()
    frame.loc[0, "y"] = 99.0
    frame["extra"] = 1
    again = rush.fetch_finished_tasks()
    assert again["y"].tolist() == [1.0, 2.0] and "extra" not in again
