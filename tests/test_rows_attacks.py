"""Review of the columnar row decoder (8287769) against real Redis: every fetch_* against the
decoder it replaced (8287769^, copied in tests/unit/test_rows_attacks.py), rows with different
names in different chunks, signed pickles in rows, forged values written straight into Redis, and
the garbage collector's pause when a fetch raises.

The FINDINGs named in tests failed before their fixes."""

from __future__ import annotations

import copy
import gc
import json
import random

import pytest
import redis

from rush_hpc import network as network_module
from rush_hpc.rows import VALUE_FIELDS

from unit.test_rows_attacks import OldFrameBuffer, cells, old_parse_rows, old_rows, old_rows_to_frame


def by_name(frame) -> dict:
    """cells() with the columns sorted: the column order is FINDING 1 (tests/unit/test_rows_attacks.py)."""
    return dict(sorted(cells(frame).items()))


def old_decode_finished(rush, raw: list[bytes]) -> list[dict]:
    """network._rows of 8287769^ for rows of the finished list (their own 9th field names their pickles)."""
    records = old_parse_rows(raw)
    refs = [(i, position) for i, r in enumerate(records) if r is not None and len(r) == 9 for position in r.pop()]
    for i, position in refs:
        record = records[i]
        if record is None:
            continue
        blob = rush.redis.hget(rush.keys.task(record[0]), VALUE_FIELDS[position - 1])
        try:
            record[position] = rush.codec.decode(blob, "task value")
        except Exception:  # noqa: BLE001 - as the old code: the row is dropped
            records[i] = None
    return old_rows(records, with_state=False)


class OldFinishedCache:
    """fetch_finished_tasks of 8287769^: LRANGE in chunks, old rows into the old FrameBuffer."""

    def __init__(self, rush) -> None:
        self.rush, self.position, self.buffer = rush, 0, OldFrameBuffer()

    def fetch(self):
        while True:
            raw = self.rush.redis.lrange(self.rush.keys.finished, self.position,
                                         self.position + network_module.FINISHED_CHUNK - 1)
            if not raw:
                break
            self.buffer.append_rows(old_decode_finished(self.rush, raw))
            self.position += len(raw)
            if len(raw) < network_module.FINISHED_CHUNK:
                break
        return self.buffer.frame()


def spy_on_decoded_records(monkeypatch) -> list:
    """The well-formed records (pickles resolved) each decode of a fetch turns into columns."""
    seen: list = []
    to_columns = network_module.records_to_columns

    def spy(records, **kwargs):
        seen.append(copy.deepcopy(records))
        return to_columns(records, **kwargs)

    monkeypatch.setattr(network_module, "records_to_columns", spy)
    return seen


def _random_xs(rng: random.Random, i: int) -> dict:
    xs = {"x": rng.choice([i, i + 0.5, None, "s", True])}
    if rng.random() < 0.4:
        xs["b"] = rng.choice([1, 2.5, [1, 2], {"n": i}])
    if rng.random() < 0.2:
        xs["t"] = (i, "tuple")  # not plain JSON: stored as a signed pickle
    return xs


def _random_ys(rng: random.Random, i: int) -> dict:
    ys = {"y": rng.choice([i, i / 3, float("nan"), 2 ** 70, "text", None])}
    if rng.random() < 0.3:
        ys["x"] = "overrides xs"
    if rng.random() < 0.2:
        ys["arr"] = (1.5, i)  # a signed pickle
    return ys


def test_finished_cache_equals_the_old_one_chunk_by_chunk(rush, worker, monkeypatch):
    """fetch_finished_tasks called again and again while rows are added, chunks of 7 rows with
    different names (uniform chunks and mixed ones), pickles and extras: the same columns, values
    and dtypes as the old decoder fed the same chunks."""
    monkeypatch.setattr(network_module, "FINISHED_CHUNK", 7)
    rng = random.Random(8287769)
    old = OldFinishedCache(rush)
    for round_ in range(8):
        n = rng.choice([1, 6, 7, 8, 15])
        uniform = rng.random() < 0.5
        xss = [{"x": i, "z": -i} if uniform else _random_xs(rng, i) for i in range(n)]
        keys = worker.push_running_tasks(xss, extra=[{"e": round_}] * n if rng.random() < 0.3 else None)
        yss = [{"y": i / 2} if uniform else _random_ys(rng, i) for i in range(n)]
        worker.push_results(keys, yss, extra=[{"pid": "forged", "extra": i} for i in range(n)]
                            if rng.random() < 0.3 else None)
        assert by_name(rush.fetch_finished_tasks()) == by_name(old.fetch())
    assert len(rush.fetch_finished_tasks()) == rush.n_finished_tasks


@pytest.mark.parametrize("fetch", ["fetch_tasks", "fetch_tasks_with_state", "fetch_failed_tasks",
                                   "fetch_priority_tasks", "fetch_queued_tasks", "fetch_running_tasks"])
def test_every_fetch_equals_the_old_decoding_of_its_records(rush, worker, fetch, monkeypatch):
    """Mixed rows in every state (pickles, extras, conditions): each fetch_* equals the old
    dict-per-row decoding of the records it decoded."""
    rng = random.Random(fetch)
    running = worker.push_running_tasks([_random_xs(rng, i) for i in range(12)])
    worker.push_results(running[:6], [_random_ys(rng, i) for i in range(6)])
    worker.fail_tasks(running[6:9], [{"message": "boom", "code": i} for i in range(3)])
    rush.push_tasks([_random_xs(rng, i) for i in range(5)], extra=[{"e": 1}, {}, {"e": (1, 2)}, {"f": 0}, {}])
    rush.push_priority_tasks([_random_xs(rng, i) for i in range(4)], priority=[worker.worker_id] * 4)
    seen = spy_on_decoded_records(monkeypatch)
    frame = getattr(rush, fetch)()
    records = [r for batch in seen for r in batch]
    expected = old_rows_to_frame(old_rows(records, with_state=fetch == "fetch_tasks_with_state"))
    assert len(frame) == len(records) > 0
    assert by_name(frame) == by_name(expected)


def test_forged_pickle_positions_and_bad_rows_are_skipped_alone(rush, worker, raw, caplog):
    """Rows written straight into the finished list: a forged 9th field, non-JSON, a wrong shape,
    64-bit-overflowing integers and NaN: bad rows are skipped, the others kept, the collector on."""
    keys = worker.push_running_tasks([{"x": 1}, {"x": 2}])
    worker.push_results(keys, [{"y": (1, "pickled")}, {"y": 2}])
    finished = rush.keys.finished
    raw.rpush(finished, b'["forged",{"x":3},null,null,null,null,"w","finished",[2]]')  # no pickle in its hash
    raw.rpush(finished, b'["forged2",{"x":4},null,null,null,null,"w","finished",[9]]')  # position out of range
    raw.rpush(finished, b"not json", b'["short"]', b'["big",{"x":18446744073709551616,"y":NaN},null,null,null,'
                                                  b'null,"w","finished"]')
    raw.hset(rush.keys.task("forged2"), "xs", b"p" + b"\0" * 40)
    frame = rush.fetch_finished_tasks().set_index("keys")
    assert gc.isenabled()
    assert list(frame.index) == [*keys, "forged", "big"]
    assert frame.loc[keys[0], "y"] == (1, "pickled") and frame.loc["forged", "y"] is None
    assert frame.loc["big", "x"] == 2 ** 64 and type(frame.loc["big", "x"]) is int
    assert frame["y"].dtype == object
    assert by_name(rush.fetch_finished_tasks()) == by_name(OldFinishedCache(rush).fetch())


def test_redis_gone_mid_fetch_leaves_the_collector_on_and_the_cache_whole(rush, worker, monkeypatch):
    """The pickles' pipeline fails after some chunks were appended (Redis went away): the fetch
    raises, the collector is enabled again, and the next fetch reads the rest once (no row twice)."""
    monkeypatch.setattr(network_module, "FINISHED_CHUNK", 3)
    keys = worker.push_running_tasks([{"x": i} for i in range(8)])
    worker.push_results(keys, [{"y": (i, "pickled")} for i in range(8)])
    real = rush.redis.pipeline
    calls = {"n": 0}

    def failing_pipeline(*args, **kwargs):
        calls["n"] += 1
        pipe = real(*args, **kwargs)
        if calls["n"] == 2:
            def execute(*_a, **_k):
                raise redis.ConnectionError("Redis went away")
            pipe.execute = execute
        return pipe

    monkeypatch.setattr(rush.redis, "pipeline", failing_pipeline)
    with pytest.raises(redis.ConnectionError):
        rush.fetch_finished_tasks()
    assert gc.isenabled()
    frame = rush.fetch_finished_tasks()
    assert gc.isenabled()
    assert list(frame["keys"]) == keys
    assert [v for v in frame["y"]] == [(i, "pickled") for i in range(8)]


def test_a_caller_that_disabled_the_collector_keeps_it_disabled(rush, worker):
    keys = worker.push_running_tasks([{"x": 1}, {"x": 2}])
    worker.push_results(keys, [{"y": (1, "pickled")}, {"y": 2}])  # one row with a signed pickle
    gc.disable()
    try:
        assert len(rush.fetch_finished_tasks()) == 2 and len(rush.fetch_tasks()) == 2
        assert not gc.isenabled()
    finally:
        gc.enable()


def _crafted_tasks(rush, raw) -> tuple[list[str], str]:
    """Three queued tasks A, B, C; B's xs is a signed pickle (FETCH_ROWS names it in refs). A's and
    C's xs are rewritten in Redis (by someone without the secret) so that rows A, B, C read as ONE
    record: the fast path of parse_rows accepts it, and B's ref (row 1) points past the records."""
    keys = rush.push_tasks([{"x": 1}, {"x": (2, "pickled")}, {"x": 3}])
    a, _, c = keys
    raw.hset(rush.keys.task(a), "xs", b'j{"x":[[0')
    raw.hset(rush.keys.task(c), "xs", b"j0]]}")
    return keys, a


def test_rows_merged_by_crafted_values_do_not_break_fetch_tasks(rush, raw):
    keys, _ = _crafted_tasks(rush, raw)
    frame = rush.fetch_tasks().set_index("keys")  # was: IndexError in _resolve_refs
    assert keys[1] in frame.index and frame.loc[keys[1], "x"] == (2, "pickled")


def test_rows_merged_by_crafted_values_were_one_record_for_the_old_parser(rush, raw):
    """FINDING 3 was older than 8287769: the old parser returned one record for three rows (and
    fetch_tasks raised IndexError); rows are now decoded one by one when the counts differ."""
    keys, a = _crafted_tasks(rush, raw)
    chunk, refs, _ = rush._script("FETCH_ROWS", [rush.keys.all_tasks, rush.keys.finished],
                                  ["list", 0, 1000, rush.keys.task_prefix, ""])
    assert [int(r) for r in refs] == [1, 1]
    records = old_parse_rows(list(chunk))
    assert len(chunk) == 3 and len(records) == 1 and records[0][0] == a
    assert len(rush.fetch_tasks()) >= 1


def test_one_finished_entry_is_at_most_one_row(rush, raw):
    raw.rpush(rush.keys.finished, b'["a",{"x":1},null,null,null,null,"w","finished"],'
                                  b'["b",{"x":2},null,null,null,null,"w","finished"]')
    raw.rpush(rush.keys.finished, json.dumps(["c", {"x": 3}, None, None, None, None, "w", "finished"]))
    assert len(rush.fetch_finished_tasks()) <= 2


def test_the_collector_runs_while_the_finished_fetch_waits_for_redis(rush, worker, monkeypatch):
    keys = worker.push_running_tasks([{"x": 1}])
    worker.push_results(keys, [{"y": (1, "pickled")}])  # its row names a signed pickle: one pipeline
    real = rush.redis.pipeline
    seen: list[bool] = []

    def observed_pipeline(*args, **kwargs):
        pipe = real(*args, **kwargs)
        execute = pipe.execute

        def observed_execute(*a, **k):
            seen.append(gc.isenabled())  # where a Redis outage would block, retried for up to 60 s
            return execute(*a, **k)
        pipe.execute = observed_execute
        return pipe

    monkeypatch.setattr(rush.redis, "pipeline", observed_pipeline)
    assert rush.fetch_finished_tasks()["y"].tolist() == [(1, "pickled")]
    assert seen and all(seen), seen


def test_one_huge_integer_result_does_not_break_every_fetch(rush, worker):
    keys = worker.push_running_tasks([{"x": 1}, {"x": 2}, {"x": 3}])
    worker.push_results(keys, [{"y": 0.5}, {"y": 10 ** 400}, {"z": 1}])
    for _ in range(2):  # the chunk is read again on every call: the failure is permanent
        try:
            frame = rush.fetch_finished_tasks()
        except OverflowError:
            frame = None
        assert frame is not None and len(frame) >= 2
    assert len(rush.fetch_tasks()) == 3


def test_a_too_deep_row_does_not_poison_the_finished_frame(rush, worker, raw):
    keys = worker.push_running_tasks([{"x": 1}])
    worker.push_results(keys, [{"y": 2}])
    raw.rpush(rush.keys.finished, b'["deep",{"x":' + b"[" * 1015 + b"]" * 1015 + b'},null,null,null,null,"w","finished"]')
    frame = rush.fetch_finished_tasks()
    repr(frame)  # RecursionError today
    assert list(frame["keys"]) == keys


@pytest.mark.parametrize("states", [["running"], ["failed"], ["queued"], ["finished", "failed"], ["finished"]])
def test_every_state_branch_equals_the_old_decoding(rush, worker, raw, states, monkeypatch):
    rng = random.Random(str(states))
    running = worker.push_running_tasks([_random_xs(rng, i) for i in range(10)])
    worker.push_results(running[:4], [_random_ys(rng, i) for i in range(4)])
    worker.fail_tasks(running[4:6], [{"message": "boom"}, {"message": (1, "pickled")}])
    # library names written into values by someone without the secret: the library's values win
    raw.hset(rush.keys.task(running[4]), "condition", b'j{"message":"x","state":"forged","keys":"k","worker_id":1}')
    rush.push_tasks([_random_xs(rng, i) for i in range(3)])
    rush.push_priority_tasks([_random_xs(rng, i) for i in range(2)], priority=[worker.worker_id] * 2)
    seen = spy_on_decoded_records(monkeypatch)
    frame = rush.fetch_tasks_with_state(states)
    records = [r for batch in seen for r in batch]
    assert len(frame) == len(records) > 0 and set(frame["state"]) <= set(states)
    assert by_name(frame) == by_name(old_rows_to_frame(old_rows(records, with_state=True)))


def test_columns_of_a_conditional_search_space_keep_their_old_order(rush, worker):
    keys = worker.push_running_tasks([{"a": 1}, {"a": 2, "b": 3}])
    worker.push_results(keys, [{"y": 0.5}, {"y": 0.25}])
    assert list(rush.fetch_finished_tasks().columns) == ["a", "y", "pid", "b", "worker_id", "keys"]
    assert list(rush.fetch_tasks().columns) == ["a", "y", "pid", "b", "worker_id", "keys"]
