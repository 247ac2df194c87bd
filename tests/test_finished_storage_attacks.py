"""Attacks on the finished-task layout (hash = {state, row} + signed pickles), the re-sent
finish recognised from its row, HSETNX-on-state creation, finish_and_pop's skipped re-sent-pop search
and pop request ids from a prefix and a counter. Real Redis; lost replies through DroppingProxy.

Tests named after a FINDING of the review showed a defect; all are fixed."""

from __future__ import annotations

import logging
import os
import random

import pytest

import rush_hpc

from conftest import SECRET
from test_cluster import cluster_ports  # noqa: F401 - the module-scoped fixture


def _declare_lost(rush, worker_id: str) -> None:
    assert rush.end_worker(worker_id, "lost", ("running",), f"worker {worker_id} lost: test",
                           reason="test") is not None


def _finish_again(worker, key: str, ys: bytes, ys_extra: bytes = b"") -> list:
    """FINISH_TASKS exactly as push_results sends it: what a client re-sends after a lost reply."""
    keys = worker.keys
    return worker._script("FINISH_TASKS", [keys.running, keys.finished, keys.worker(worker.worker_id),
                                           keys.held_tasks(worker.worker_id)],
                          [keys.task_prefix, worker.worker_id, key, ys, ys_extra])


def _agree(rush) -> None:
    """fetch_finished_tasks and fetch_tasks show the same finished tasks with the same values."""
    finished = rush.fetch_finished_tasks().set_index("keys")
    everything = rush.fetch_tasks_with_state().set_index("keys")
    assert not finished.index.duplicated().any()
    done = everything[everything["state"] == "finished"]
    assert sorted(done.index) == sorted(finished.index)
    for column in finished.columns:
        for key in finished.index:
            a, b = finished.loc[key, column], done.loc[key, column]
            same = a == b if isinstance(a, (tuple, set, str)) else (a == b or (a != a and b != b))
            assert same, (key, column, a, b)


# -- sound: a finished task stays finished and readable whatever happens to its worker --------------
def test_finished_then_worker_lost_keeps_the_task_finished_and_readable(rush, worker):
    keys = worker.push_running_tasks([{"x": 1}, {"x": 2}])
    worker.push_results(keys[:1], [{"y": (1, "pickled")}])  # a tuple travels as a signed pickle
    _declare_lost(rush, worker.worker_id)
    assert rush.task_states(keys) == {keys[0]: "finished", keys[1]: "failed"}
    rush.sweep_orphaned_tasks()
    assert rush.task_states(keys)[keys[0]] == "finished"
    row = rush.fetch_tasks().set_index("keys").loc[keys[0]]
    assert row["y"] == (1, "pickled") and row["x"] == 1 and row["worker_id"] == worker.worker_id
    assert rush.n_failed_tasks == 1 and rush.n_finished_tasks == 1
    _agree(rush)


def test_resent_finish_with_a_pickle_after_a_lost_reply_counts_once(rush, proxied_worker, caplog):
    worker, proxy = proxied_worker
    keys = worker.push_running_tasks([{"x": 1}, {"x": 2}])
    worker.push_results(keys[:1], [{"y": 0}])  # loads the script
    proxy.drop_next_reply()
    with caplog.at_level(logging.WARNING):
        assert worker.push_results(keys[1:], [{"y": {1, 2}}], extra=[{"note": (3,)}]) == []
    assert proxy.dropped == 1 and "discarded" not in caplog.text
    assert rush.n_finished_tasks == 2
    row = rush.fetch_tasks().set_index("keys").loc[keys[1]]
    assert row["y"] == {1, 2} and row["note"] == (3,)
    _agree(rush)


@pytest.mark.parametrize("forged", ["-1", "1e3", "0x1", " 1", "1 ", "", "18446744073709551617",
                                    "999999999999999", "0"])
def test_forged_row_fields_never_break_reads_or_a_resent_finish(rush, worker, raw, forged):
    keys = worker.push_running_tasks([{"x": i} for i in range(3)])
    worker.push_results(keys, [{"y": i} for i in range(3)])
    raw.hset(rush.keys.task(keys[1]), "row", forged)
    frame = rush.fetch_tasks().set_index("keys")
    assert list(frame.index) == keys and frame.loc[keys[2], "y"] == 2 and frame.loc[keys[0], "y"] == 0
    if forged == "1 " or forged == " 1":
        assert frame.loc[keys[1], "y"] != frame.loc[keys[1], "y"]  # not a plain index: no row
    count, *_ = _finish_again(worker, keys[1], b'j{"y":9}')
    assert count == 3 and rush.n_finished_tasks == 3  # never finished twice


def test_a_finished_hash_edited_back_to_running_is_not_finished_again(rush, worker, raw):
    key = worker.push_running_tasks([{"x": 1}])[0]
    worker.push_results([key], [{"y": 1}])
    raw.hset(rush.keys.task(key), mapping={"state": "running", "worker_id": worker.worker_id})
    count, *discarded = _finish_again(worker, key, b'j{"y":2}')
    assert count == 1 and [d.decode() for d in discarded] == [key]
    assert rush.fetch_finished_tasks()["y"].tolist() == [1]


def test_rows_appended_by_someone_else_do_not_shift_the_index_of_real_rows(rush, worker, raw):
    keys = worker.push_running_tasks([{"x": i} for i in range(3)])
    worker.push_results(keys[:1], [{"y": 0}])
    raw.rpush(rush.keys.finished, f'["{keys[1]}",{{"x":99}},{{"y":99}},null,null,null,"intruder","finished"]')
    worker.push_results(keys[1:], [{"y": 1}, {"y": 2}])
    frame = rush.fetch_tasks().set_index("keys")
    assert frame.loc[keys[1], "y"] == 1 and frame.loc[keys[2], "y"] == 2
    assert frame.loc[keys[1], "worker_id"] == worker.worker_id


# -- finish_and_pop and pop request ids -------------------------------------------------------------
def test_finish_and_pop_resent_pops_one_task_per_request(rush, proxied_worker):
    """Several lost replies in a row: every repeat of one request returns the task it popped first."""
    worker, proxy = proxied_worker
    rush.push_tasks([{"x": i} for i in range(20)])
    task = worker.pop_task()
    worker.finish_and_pop(worker.push_running_tasks([{"warm": 1}]), [{"y": 0}])  # loads the scripts
    popped = 2
    while task is not None:
        proxy.drop_next_reply()
        task = worker.finish_and_pop(task.key, [{"y": task.xs["x"]}])
        popped += task is not None
        assert rush.n_queued_tasks == 20 - popped
        assert rush.n_running_tasks == 1 + (task is not None)  # the warm-up pop and this one
    assert rush.n_finished_tasks == 20 and rush.n_failed_tasks == 0
    _agree(rush)


def test_pop_request_prefixes_differ_between_forked_workers(redis_config, network, rush):
    """Two workers made in processes forked from one parent: their request prefixes differ (the id
    comes from the OS after the fork), and counters restart, so equal prefixes would repeat ids."""
    read, write = os.pipe()
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            worker = rush_hpc.RushWorker(network, config=redis_config, secret=SECRET)
            os.write(write, (worker._pop_request() + "\n").encode())
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    os.close(write)
    with os.fdopen(read) as lines:
        ids = lines.read().split()
    assert len(ids) == 2 and ids[0] != ids[1]


# -- old data ---------------------------------------------------------------------------------------
def test_resent_finish_of_a_task_finished_by_the_previous_layout_is_a_repeat(rush, worker, raw, caplog):
    key = worker.push_running_tasks([{"x": 1}])[0]
    worker.push_results([key], [{"y": 2}])
    raw.delete(rush.keys.task(key))  # as the previous version left it
    raw.hset(rush.keys.task(key), mapping={"xs": b'j{"x":1}', "ys": b'j{"y":2}', "state": "finished",
                                           "worker_id": worker.worker_id})
    count, *discarded = _finish_again(worker, key, b'j{"y":2}')
    assert count == 1 and discarded == []


# -- finish_and_pop: the skipped search, with a key the worker does not hold yet ----------------------
def test_resent_finish_and_pop_never_pops_two_tasks_for_one_request(rush, proxied_worker):
    worker, proxy = proxied_worker
    queued = rush.push_tasks([{"x": i} for i in range(5)])
    held = worker.pop_task()  # queued[0]
    worker.finish_and_pop(worker.push_running_tasks([{"warm": 1}]), [{"y": 0}])  # pops queued[1]
    # the caller names the next queued task too (a key it knows, e.g. from its own push_tasks): the
    # first execution discards it (queued) and then pops it; the repeat finds it held and finishes it
    proxy.drop_next_reply()
    task = worker.finish_and_pop([held.key, queued[2]], [{"y": 1}, {"y": 2}])
    assert proxy.dropped == 1 and task is not None
    assert rush.n_queued_tasks == 2  # one pop for one request: queued[2] only


def test_fetch_agrees_after_random_finish_order_with_pickles(rush, worker):
    keys = worker.push_running_tasks([{"x": i} for i in range(300)])
    order = list(range(300))
    random.Random(3).shuffle(order)
    for first in range(0, 300, 50):
        batch = order[first:first + 50]
        worker.push_results([keys[i] for i in batch],
                            [{"y": (i,)} if i % 3 == 0 else {"y": i} for i in batch])
    _agree(rush)


# -- Redis Cluster: FETCH_ROWS now also names the finished list (same hash tag) ----------------------
def test_reads_of_finished_tasks_on_a_cluster(cluster_ports):  # noqa: F811 - the fixture
    from test_cluster import networks_on_every_master

    url = f"redis+cluster://127.0.0.1:{cluster_ports[0]}"
    probe = rush_hpc.RedisConfig.from_url(url).client()
    name = networks_on_every_master(probe, 3)[2]
    rush = rush_hpc.rsh(network=name, url=url, secret=SECRET)
    worker = rush_hpc.RushWorker(name, config=rush_hpc.RedisConfig.from_url(url), secret=SECRET)
    try:
        worker.register()
        keys = worker.push_running_tasks([{"x": i} for i in range(50)])
        order = list(range(50))
        random.Random(5).shuffle(order)
        worker.push_results([keys[i] for i in order], [{"y": (i,) if i % 2 else i} for i in order])
        count, *discarded = _finish_again(worker, keys[order[10]], b'j{"y":0}')
        assert count == 50 and discarded == []
        _agree(rush)
        assert rush.fetch_tasks_with_state(["finished"])["keys"].tolist() == keys
    finally:
        worker.close()
        rush.reset()
        rush.close()


# -- big lists: a chunk of tasks finished far apart costs one list seek each -------------------------
def _lrange_calls(raw) -> int:
    return int(raw.info("commandstats").get("cmdstat_lrange", {}).get("calls", 0))


def test_one_fetch_call_makes_a_bounded_number_of_list_seeks(rush, worker, raw):
    """Tasks finished far apart in the finished list (here 65 rows apart; in random finish order at
    100k+ tasks nearly every task): the work of one FETCH_ROWS call must not grow with the list."""
    probes = worker.push_running_tasks([{"p": i} for i in range(200)])
    fillers = worker.push_running_tasks([{"f": i} for i in range(200 * 64)])
    order: list[str] = []
    for i, probe in enumerate(probes):
        order += [probe, *fillers[i * 64:(i + 1) * 64]]
    worker.push_results(order, [{"y": 1}] * len(order))
    keys = rush.keys
    before = _lrange_calls(raw)
    raw_rows, _, _ = rush._script("FETCH_ROWS", [keys.all_tasks, keys.finished],
                                  ["list", 0, 1000, keys.task_prefix, ""])
    seeks = _lrange_calls(raw) - before
    assert len(raw_rows) == 1000
    assert seeks <= 64, f"{seeks} LRANGE calls in one FETCH_ROWS call of 1000 tasks"
