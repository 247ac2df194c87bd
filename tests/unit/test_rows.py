"""The decoder of task rows: JSON records to columns, checked like untrusted input."""

from __future__ import annotations

import json
import logging
import random

import pytest
from conftest import require_cluster

from rush_hpc.frames import column_order
from rush_hpc import rows
from rush_hpc.rows import parse_rows, pickle_refs, records_to_columns


def record(task_id="t", xs=None, ys=None, xs_extra=None, ys_extra=None, condition=None, worker_id="w",
           state="finished"):
    return [task_id, xs, ys, xs_extra, ys_extra, condition, worker_id, state]


def merged_rows(records, with_state):
    """The reference: one dict per row, the value fields merged in order (what a user expects)."""
    rows = []
    for r in records:
        row = {}
        for values in r[1:6]:
            if type(values) is dict:
                row.update(values)
        row["worker_id"] = r[6]
        if with_state:
            row["state"] = r[7]
        row["keys"] = r[0]
        rows.append(row)
    names = column_order(dict.fromkeys(name for row in rows for name in row))
    return {name: [row.get(name) for row in rows] for name in names}


def raw(records):
    return [json.dumps(r).encode() for r in records]


def test_uniform_rows_become_columns_in_order():
    records = [record(f"t{i}", {"x1": i, "x2": -i}, {"y": i / 2}, {"pid": 7}, None, None, "w1") for i in range(3)]
    columns = records_to_columns(records, with_state=False)
    assert list(columns) == ["x1", "x2", "y", "pid", "worker_id", "keys"]
    assert columns["x1"] == [0, 1, 2] and columns["y"] == [0.0, 0.5, 1.0] and columns["keys"] == ["t0", "t1", "t2"]


def test_a_later_value_field_wins_and_missing_names_are_none():
    records = [record("a", {"x": 1, "z": 0}, {"x": 2}), record("b", {"x": 3}, {"y": 4}), record("c", {"x": 5}, [1, 2])]
    columns = records_to_columns(records, with_state=True)
    assert columns == merged_rows(records, with_state=True)
    assert columns["x"] == [2, 3, 5] and columns["z"] == [0, None, None] and columns["y"] == [None, 4, None]


def test_library_columns_written_into_values_are_overridden_and_placed_last():
    records = [record("real", {"keys": "forged", "state": "queued", "worker_id": "x", "v": 1}, worker_id="w")]
    assert records_to_columns(records, with_state=False) == {"v": [1], "worker_id": ["w"], "state": ["queued"],
                                                             "keys": ["real"]}
    assert list(records_to_columns(records, with_state=True)) == ["v", "worker_id", "state", "keys"]


@pytest.mark.parametrize("seed", range(30))
def test_random_rows_decode_like_merged_dicts(seed):
    """Invariant over random shapes: columns equal the merge of each row's dicts, whatever mixes of
    names, missing fields and non-dict values the rows hold."""
    rng = random.Random(seed)
    names = ["a", "b", "c", "state", "keys"]

    def values():
        choice = rng.random()
        if choice < 0.2:
            return None
        if choice < 0.25:
            return rng.choice([[1], "text", 3])
        return {name: rng.choice([1, 2.5, "s", None, True]) for name in rng.sample(names, rng.randint(0, 3))}

    uniform = rng.random() < 0.3
    template = values()
    records = [record(f"t{i}", *(template if uniform else values() for _ in range(5)), worker_id=f"w{i % 3}")
               for i in range(rng.randint(1, 20))]
    for with_state in (False, True):
        assert records_to_columns(records, with_state=with_state) == merged_rows(records, with_state)


def test_parse_rows_keeps_well_formed_rows_and_reports_each_bad_one(caplog):
    good = record("ok", {"x": 1})
    bad = [b"{not json", b'"a string"', b"[]", json.dumps([1] + good[1:]).encode(), json.dumps(good[:7]).encode(),
           json.dumps(good + [[9]]).encode(), b"\xff\xfe", json.dumps(good + [[1], 2]).encode()]
    with caplog.at_level(logging.WARNING, logger="rush_hpc.rows"):
        parsed = parse_rows([raw([good])[0], *bad, raw([good])[0]], 8, "tasks", with_refs=True)
    assert parsed[0] == good and parsed[-1] == good and parsed[1:-1] == [None] * len(bad)
    assert sum("skipping a malformed row" in m for m in caplog.messages) == len(bad)


def test_parse_rows_accepts_pickle_positions_only_where_allowed():
    row = record("p", {"x": 1}) + [[1, 2]]
    assert parse_rows(raw([row]), 8, "tasks", with_refs=True) == [row]
    assert parse_rows(raw([row]), 8, "tasks", with_refs=False) == [None]


def test_pickle_refs_are_taken_off_their_rows():
    records = [record("a") + [[2]], record("b"), None, record("c") + [[1, 4]]]
    assert pickle_refs(records) == [(0, 2), (3, 1), (3, 4)]
    assert all(r is None or len(r) == 8 for r in records)
    assert pickle_refs([record("a"), None]) == []


def random_value(rng, depth=0):
    """Values whose JSON the two decoders may read differently: big integers, NaN, infinities, lone
    surrogates, long digit runs in strings and fractions, deep-ish nesting."""
    choice = rng.random()
    if depth < 3 and choice < 0.2:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 3 and choice < 0.4:
        return {f"k{rng.randrange(5)}": random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return rng.choice([
        rng.randint(-2**80, 2**80), rng.randint(-10**6, 10**6), 2**63, -2**63 - 1, 10**18, 10**19,
        rng.random() * 10 ** rng.randint(-320, 308), 0.00031622776601683794, float("nan"), float("inf"),
        -0.0, True, None, "\ud800", "id 12345678901234567890", "é✓", ""])


def same(a, b):
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return (a != a and b != b) or (a == b and str(a) == str(b))
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("seed", range(20))
def test_loads_many_reads_like_the_json_module(seed):
    """orjson (when installed) is used only where it reads exactly what json reads: never a big
    integer turned into a float, never a refusal of what json accepts."""
    rng = random.Random(seed)
    for _ in range(50):
        text = json.dumps([random_value(rng) for _ in range(rng.randrange(1, 6))]).encode("utf-8", "surrogatepass")
        assert same(rows.loads_many([text]), [json.loads(text)]), text


def test_parse_rows_gives_the_same_records_with_and_without_orjson(monkeypatch):
    # orjson has wheels for x86_64 and aarch64 only (elsewhere json decodes everything); scripts/test
    # installs it, so there this fails instead of skipping
    require_cluster("orjson", rows._orjson is not None, "not installed on this platform")
    rng = random.Random(7)
    raw_rows = [json.dumps(record(f"t{i}", {"x": random_value(rng)}, {"y": random_value(rng)})).encode(
        "utf-8", "surrogatepass") for i in range(300)]
    fast = parse_rows(raw_rows, 8, "tasks", with_refs=True)
    monkeypatch.setattr(rows, "_orjson", None)
    assert same(fast, parse_rows(raw_rows, 8, "tasks", with_refs=True))


def test_a_big_integer_in_a_row_stays_an_integer():
    row = record("t", {"seed": 2**64 + 1}, {"y": 12345678901234567890123})
    assert parse_rows(raw([row]), 8, "tasks") == [row]


@pytest.mark.parametrize("row, orjson_reads_it", [
    (b'[1732612345678901234, -922337203685477580, 0.000316227766016837941234]', True),  # time_ns, fractions
    (b'[18446744073709551616]', False), (b'[-9223372036854775809]', False),           # beyond 64 bits
    (b'[' + b'[1],' * 300 + b'1]', False),                                           # may nest deep: json decides
    (b'[' + b'1,' * 300 + b'1]', True),
])
def test_what_orjson_is_trusted_with(row, orjson_reads_it):
    """orjson reads integers exactly from -2**63 to 2**64 - 1 and 1024 levels deep; text that may
    leave those bounds goes to json (a false alarm only costs speed)."""
    assert rows._orjson_reads_like_json([row]) is orjson_reads_it
