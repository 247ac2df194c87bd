"""Second review of the fetch decoding (35eaa8b, b08ce85): rows forged in Redis against fetch_*.

The FINDINGs named in tests failed before their fixes."""

from __future__ import annotations

import gc
import threading

import pytest

import rush_hpc
from rush_hpc import network as network_module

from conftest import SECRET

#: what follows the xs field in the FETCH_ROWS row of a queued task
_QUEUED_TAIL = b',null,null,null,null,null,"queued"]'


def _swallowing_tasks(rush, raw) -> tuple[str, str, str]:
    """Three queued tasks; the xs of the first and the last (JSON written straight into Redis: no
    secret needed) make the one decode of the rows read the middle row as a value inside a forged
    record. Each of the three rows still decodes to one record: the count check of FINDING 3
    (35eaa8b) cannot see it."""
    a, b, c = rush.push_tasks([{"x": 1}, {"x": 2}, {"x": 3}])
    raw.hset(rush.keys.task(a), "xs", b'j{"x":1}' + _QUEUED_TAIL + b',["forged",{"x":[[0')
    raw.hset(rush.keys.task(c), "xs", b"j0],0]}" + _QUEUED_TAIL + b',["forged2",{"x":3}')
    return a, b, c


@pytest.mark.parametrize("fetch", ["fetch_tasks", "fetch_queued_tasks", "fetch_tasks_with_state"])
def test_forged_rows_cannot_swallow_the_row_between_them(rush, raw, fetch):
    _, b, _ = _swallowing_tasks(rush, raw)
    frame = getattr(rush, fetch)()
    assert b in frame["keys"].tolist(), frame
    assert "forged" not in frame["keys"].tolist()


def test_the_swallowed_row_is_well_formed_alone(rush, raw):
    """The premise of FINDING 1: alone, the middle row decodes (and the forged ones do not)."""
    _, b, _ = _swallowing_tasks(rush, raw)
    rows, _ = rush._fetch_rows(rush.keys.all_tasks, "list")
    assert len(rows) == 3
    assert rush._frame(([rows[1]], []))["keys"].tolist() == [b]
    assert [len(rush._frame(([row], []))) for row in (rows[0], rows[2])] == [0, 0]


@pytest.fixture
def collector_restored():
    """The test may leave the collector off (the finding): switch it on again for the tests after it."""
    yield
    gc.enable()


def test_two_threads_fetching_leave_the_collector_on(rush, worker, monkeypatch, collector_restored):
    """Two fetches in two threads (two networks' controllers, a monitor thread beside the main loop):
    T1 pauses the collector to decode; T2 starts meanwhile (it sees the collector off: it will not
    switch it on) and waits for its signed pickles while T1 ends (T1 switches the collector on).
    _columns then disables it unconditionally after _resolve_refs; with the old gc_paused (only
    around parse_rows) the collector ended on."""
    keys = worker.push_running_tasks([{"x": 1}])
    worker.push_results(keys, [{"y": (1, "pickled")}])  # a signed pickle: T2's decode reads Redis
    assert gc.isenabled()
    t1_decoding, t2_waits_for_redis = threading.Event(), threading.Event()
    to_columns = network_module.records_to_columns

    def slow_to_columns(records, **kwargs):
        if threading.current_thread() is t1:  # inside T1's paused decode
            t1_decoding.set()
            t2_waits_for_redis.wait(10)
        return to_columns(records, **kwargs)

    monkeypatch.setattr(network_module, "records_to_columns", slow_to_columns)
    real_pipeline = worker.redis.pipeline

    def pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        execute = pipe.execute

        def execute_after_t1(*a, **k):  # T2 reads its pickles: T1 ends meanwhile
            t2_waits_for_redis.set()
            t1.join(10)
            return execute(*a, **k)
        pipe.execute = execute_after_t1
        return pipe

    monkeypatch.setattr(worker.redis, "pipeline", pipeline)
    t1 = threading.Thread(target=rush.fetch_tasks)
    t1.start()
    assert t1_decoding.wait(10)
    assert not gc.isenabled()  # T1 decodes
    assert worker.fetch_finished_tasks()["y"].tolist() == [(1, "pickled")]  # T2
    assert not t1.is_alive()
    assert gc.isenabled()


def test_a_fetch_after_a_caller_enabled_the_collector_meanwhile_leaves_it_as_found(rush, worker, collector_restored):
    """Single-threaded regression guard: the collector is restored as the caller left it."""
    keys = worker.push_running_tasks([{"x": 1}])
    worker.push_results(keys, [{"y": (1, "pickled")}])
    for enabled in (True, False, True):
        (gc.enable if enabled else gc.disable)()
        for fetch in (rush.fetch_finished_tasks, rush.fetch_tasks, rush.fetch_failed_tasks,
                      rush.fetch_queued_tasks, rush.fetch_running_tasks, rush.fetch_priority_tasks):
            fetch()
            assert gc.isenabled() is enabled, fetch


@pytest.fixture
def two_more_workers(redis_config, network, rush):
    made = []
    for _ in range(2):
        w = rush_hpc.RushWorker(network=network, config=redis_config, secret=SECRET)
        w.register(launcher="in-process")
        made.append(w)
    yield made
    for w in made:
        w.close()


def test_several_queues_in_one_decode_keep_each_task_and_its_pickles(rush, raw, two_more_workers):
    """b08ce85 decodes the shared queue and every priority queue in one go: pickle positions of rows
    in later queues must still point at their own rows, a bad pickle drop only its own task."""
    w1, w2 = sorted(two_more_workers, key=lambda w: w.worker_id)
    shared = rush.push_tasks([{"x": ("s", 0)}, {"x": 1}, {"x": ("s", 2)}])
    p1 = rush.push_priority_tasks([{"x": 10}, {"x": ("p1", 11)}], priority=[w1.worker_id] * 2)
    p2 = rush.push_priority_tasks([{"x": ("p2", 20)}, {"x": 21}, {"x": ("p2", 22)}],
                                  priority=[w2.worker_id] * 3)
    raw.hset(rush.keys.task(p2[2]), "xs", b"p" + b"0" * 64 + b"forged")  # a pickle without the secret
    x_of = dict(zip(shared + p1 + p2, [("s", 0), 1, ("s", 2), 10, ("p1", 11), ("p2", 20), 21]))

    queued = rush.fetch_queued_tasks()
    assert queued["keys"].tolist() == shared
    assert queued["x"].tolist() == [x_of[k] for k in shared]
    priority = rush.fetch_priority_tasks()
    assert priority["keys"].tolist() == p1 + p2[:2]
    assert priority["x"].tolist() == [x_of[k] for k in p1 + p2[:2]]
    with_state = rush.fetch_tasks_with_state(["queued"])
    assert with_state["keys"].tolist() == shared + p1 + p2[:2]
    assert with_state["x"].tolist() == [x_of[k] for k in shared + p1 + p2[:2]]
    assert set(with_state["state"]) == {"queued"}
    assert rush.fetch_tasks()["keys"].tolist() == shared + p1 + p2[:2]
