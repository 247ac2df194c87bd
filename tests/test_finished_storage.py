"""A finished task stores each value once: in its row of the finished list. Its hash keeps its state,
the row's index and only the signed pickles the row does not hold. Every read of a task still sees
its values; a re-sent finish still recognises itself; forged indices and rows are harmless."""

from __future__ import annotations

import logging
import random

import rush_hpc
from rush_hpc.config import RedisConfig

from conftest import SECRET
from faults import DroppingProxy


def test_a_finished_task_keeps_its_values_in_its_row_only(rush, worker, raw):
    keys = worker.push_running_tasks([{"x": 1}, {"x": 2}])
    worker.push_results(keys, [{"y": 10}, {"y": (1, 2)}], extra=[{}, {"note": "n"}])
    for index, key in enumerate(keys):
        stored = raw.hgetall(rush.keys.task(key))
        pickles = {b"ys"} if index == 1 else set()  # a tuple travels as a signed pickle
        assert set(stored) == {b"state", b"row"} | pickles
        assert stored[b"state"] == b"finished" and int(stored[b"row"]) == index
        assert raw.lindex(rush.keys.finished, index).startswith(f'["{key}",{{"x":{index + 1}}}'.encode())
    for frame in (rush.fetch_finished_tasks(), rush.fetch_tasks(), rush.fetch_tasks_with_state(["finished"]),
                  rush.fetch_tasks_with_state()):
        rows = frame.set_index("keys")
        assert rows.loc[keys[0], "y"] == 10 and rows.loc[keys[1], "y"] == (1, 2)
        assert rows.loc[keys[1], "note"] == "n" and rows.loc[keys[0], "x"] == 1
        assert set(rows["worker_id"]) == {worker.worker_id}
    assert rush.task_states(keys) == {keys[0]: "finished", keys[1]: "finished"}


def test_every_read_sees_finished_values_in_any_finish_order(rush, worker):
    """Finished out of creation order (rows far apart and near), mixed with tasks in other states."""
    keys = worker.push_running_tasks([{"x": i} for i in range(400)])
    order = list(range(400))
    random.Random(7).shuffle(order)
    finished_now, failed = order[:300], order[300:310]
    for first in range(0, 300, 37):
        batch = finished_now[first:first + 37]
        worker.push_results([keys[i] for i in batch], [{"y": i * 10} for i in batch])
    worker.push_failed([keys[i] for i in failed])
    queued = rush.push_tasks([{"x": -1}])
    everything = rush.fetch_tasks_with_state().set_index("keys")
    assert len(everything) == 401
    for i in finished_now:
        assert everything.loc[keys[i], "state"] == "finished" and everything.loc[keys[i], "y"] == i * 10
        assert everything.loc[keys[i], "x"] == i
    assert set(everything.loc[[keys[i] for i in failed], "state"]) == {"failed"}
    assert everything.loc[queued[0], "state"] == "queued"
    only_finished = rush.fetch_tasks_with_state(["finished"])
    assert list(only_finished["keys"]) == [k for k in keys if keys.index(k) in set(finished_now)]
    assert list(rush.fetch_finished_tasks()["keys"]) == [keys[i] for i in finished_now]


def _finish_again(worker, key: str, ys: bytes) -> list:
    """FINISH_TASKS exactly as push_results sends it: what redis-py re-sends after a lost reply."""
    keys = worker.keys
    return worker._script("FINISH_TASKS", [keys.running, keys.finished, keys.worker(worker.worker_id),
                                           keys.held_tasks(worker.worker_id)],
                          [keys.task_prefix, worker.worker_id, key, ys, b""])


def test_a_repeated_finish_is_recognised_and_another_workers_is_discarded(rush, worker, redis_config):
    other = rush_hpc.RushWorker(rush.network, config=redis_config, secret=SECRET)
    other.register()
    # the result contains what the end of a row finished by `other` would look like
    key = worker.push_running_tasks([{"x": 1}])[0]
    forged_tail = {"y": [0, None, other.worker_id, "finished"]}
    assert worker.push_results([key], [forged_tail]) == []
    count, *discarded = _finish_again(worker, key, b'j{"y":1}')
    assert count == 1 and discarded == []  # the same worker: a repeat, reported done
    count, *discarded = _finish_again(other, key, b'j{"y":2}')
    assert count == 1 and [d.decode() for d in discarded] == [key]  # not its task: discarded
    assert rush.n_finished_tasks == 1
    assert rush.fetch_finished_tasks()["y"].tolist() == [forged_tail["y"]]
    other.close()


def test_forged_row_indices_and_rows_are_harmless(rush, worker, raw, caplog):
    keys = worker.push_running_tasks([{"x": i} for i in range(5)])
    worker.push_results(keys, [{"y": i} for i in range(5)])
    raw.hset(rush.keys.task(keys[0]), "row", "not a number")
    raw.hset(rush.keys.task(keys[1]), "row", "2")  # the row of another task
    raw.hset(rush.keys.task(keys[2]), "row", "99999999999")  # no such row
    raw.lset(rush.keys.finished, 3, b"\x80garbage")
    everything = rush.fetch_tasks().set_index("keys")
    # no row of its own: the task is shown finished with the values its hash holds (none); the
    # others are intact
    assert list(everything.index) == keys and set(everything["worker_id"][:3]) == {None}
    assert everything.loc[keys[4], "y"] == 4 and everything.loc[keys[4], "x"] == 4
    assert everything[["x", "y"]].loc[keys[:4]].isna().all().all()
    with caplog.at_level(logging.WARNING):  # the finished list's garbage row is reported and skipped
        assert list(rush.fetch_finished_tasks()["keys"]) == [keys[0], keys[1], keys[2], keys[4]]
    assert "malformed row" in caplog.text
    assert set(rush.task_states(keys).values()) == {"finished"}
    # a repeat of a finish it cannot confirm from the row is reported, never finished twice
    count, *discarded = _finish_again(worker, keys[1], b'j{"y":1}')
    assert count == 5 and [d.decode() for d in discarded] == [keys[1]]


# -- finish_and_pop: a repeat gets the task its first execution popped ---------------------------------
def test_finish_and_pop_survives_a_dropped_reply(rush, redis_config, network):
    proxy = DroppingProxy(redis_config.port)
    worker = rush_hpc.RushWorker(network, config=RedisConfig(port=proxy.port), secret=SECRET)
    worker.register()
    rush.push_tasks([{"x": i} for i in range(4)])
    first = worker.pop_task()
    worker.finish_and_pop(worker.push_running_tasks([{"warm": 1}]), [{"y": 0}])  # loads the script
    assert rush.n_queued_tasks == 2 and rush.n_running_tasks == 2
    proxy.drop_next_reply()
    second = worker.finish_and_pop(first.key, [{"y": 1}])  # runs twice in Redis: the repeat sees its finish
    assert proxy.dropped == 1 and second is not None
    assert rush.n_queued_tasks == 1  # one pop, not two
    assert rush.task_states([first.key, second.key]) == {first.key: "finished", second.key: "running"}
    assert rush.n_running_tasks == 2  # the warm-up pop and `second`: nothing stranded
    worker.close()
    proxy.close()


def test_finish_and_pop_after_a_call_that_raised_returns_the_pending_pop(rush, worker):
    """A pop whose reply never came (the call raised): the next finish_and_pop carries its request id
    (not new), so Redis returns the task that pop took instead of popping another one."""
    rush.push_tasks([{"x": i} for i in range(3)])
    held = worker.pop_task()
    keys = worker.keys
    request = "lost-pop-request"
    lost = worker._script("POP_TASK", [keys.priority(worker.worker_id), keys.queued, keys.running,
                                       keys.worker(worker.worker_id), keys.held_tasks(worker.worker_id)],
                          [keys.task_prefix, worker.worker_id, request])
    worker._pending_pop = request  # what a raised call leaves behind
    task = worker.finish_and_pop(held.key, [{"y": 0}])
    assert task is not None and task.key == lost[0].decode()
    assert rush.n_queued_tasks == 1 and rush.n_running_tasks == 1


def test_a_finished_task_stored_by_an_older_version_is_read_from_its_hash(rush, worker, raw):
    """Networks written before this layout keep every value in the finished task's hash (no row
    index): reads build the row from the hash as they always did."""
    key = worker.push_running_tasks([{"x": 1}])[0]
    worker.push_results([key], [{"y": 2}])
    raw.delete(rush.keys.task(key))
    raw.hset(rush.keys.task(key), mapping={"xs": b'j{"x":1}', "ys": b'j{"y":2}', "state": "finished",
                                           "worker_id": worker.worker_id})
    row = rush.fetch_tasks().iloc[0]
    assert (row["keys"], row["x"], row["y"], row["worker_id"]) == (key, 1, 2, worker.worker_id)
    assert rush.fetch_tasks_with_state(["finished"])["y"].tolist() == [2]
