"""Redis content is untrusted: malformed rows written by someone else are reported and skipped,
never breaking a fetch (and never making fetch_finished_tasks fail for good). Reads are chunked."""

from __future__ import annotations

import logging

from rush_hpc.network import FETCH_CHUNK


def test_malformed_values_are_skipped_and_reported(rush, worker, raw, caplog):
    keys = worker.push_running_tasks([{"x": i} for i in range(5)])
    writes = {
        keys[0]: b"j{not json",                       # bad JSON
        keys[1]: b"j\"\xff\xfe\"",                   # not UTF-8
        keys[2]: b"j" + b"[" * 100_000 + b"]" * 100_000,  # nested beyond any parser's depth
    }
    for key, value in writes.items():
        raw.hset(rush.keys.task(key), "xs", value)
    with caplog.at_level(logging.WARNING):
        running = rush.fetch_running_tasks()
        everything = rush.fetch_tasks()
        with_state = rush.fetch_tasks_with_state()
    # the undecodable rows are left out; the others are all there
    assert set(everything["keys"]) >= {keys[3], keys[4]}
    assert set(running["keys"]) <= set(keys) and {keys[3], keys[4]} <= set(running["keys"])
    assert keys[0] not in set(everything["keys"]) and keys[2] not in set(with_state["keys"])
    assert "malformed row" in caplog.text


def test_garbage_finished_rows_are_skipped_once(rush, worker, raw, caplog):
    keys = worker.push_running_tasks([{"x": i} for i in range(3)])
    worker.push_results(keys[:1], [{"y": 0}])
    raw.rpush(rush.keys.finished, b'["short", null]', b"\x80garbage", b'{"a": 1}')
    worker.push_results(keys[1:], [{"y": 1}, {"y": 2}])
    with caplog.at_level(logging.WARNING):
        first = rush.fetch_finished_tasks()
    assert list(first["keys"]) == keys and "malformed row" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = rush.fetch_finished_tasks()  # incremental: the bad rows are not read (or reported) again
    assert list(again["keys"]) == keys and "malformed" not in caplog.text
    assert rush.n_finished_tasks == 6  # the count is Redis' list length, garbage included


def test_fetches_are_chunked(rush, raw):
    n = 2 * FETCH_CHUNK + 10
    rush.push_tasks([{"i": i} for i in range(n)])
    raw.config_resetstat()
    frame = rush.fetch_tasks_with_state(["queued", "finished"])
    assert frame["i"].tolist() == list(range(n))
    calls = raw.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert calls >= 3  # one bounded script call per chunk, never one call for everything


def test_a_task_key_that_is_not_a_hash_does_not_break_lost_worker_detection(rush, worker, raw):
    keys = rush.push_tasks([{"x": 1}, {"x": 2}], max_retries=1)
    held = [worker.pop_task(), worker.pop_task()]
    raw.delete(rush.keys.task(held[0].key))
    raw.set(rush.keys.task(held[0].key), "not a hash")  # a Redis writer
    rush.end_worker(worker.worker_id, "lost", ("running",), "test")  # releases the good task, drops the bad id
    assert rush.n_running_tasks == 0 and rush.task_states([keys[1]]) == {keys[1]: "queued"}
    raw.sadd(rush.keys.running, "forged-id")
    raw.set(rush.keys.task("forged-id"), "x")
    rush.detect_lost_workers()  # the sweep drops it instead of failing on every call
    assert rush.n_running_tasks == 0
