"""Second review of rows.py (35eaa8b, b08ce85): orjson against json on rows forged in Redis.

FINDINGs named in tests failed before their fixes; the other tests are probes kept as regression guards."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import pytest

from rush_hpc import rows as rows_module
from rush_hpc.rows import loads_many, parse_rows

_TAIL = b',null,null,null,null,"w","finished"]'


def json_only_parse_rows(raw: list[bytes]) -> list[Any]:
    """parse_rows as it reads without orjson (the json module decodes everything)."""
    saved, rows_module._orjson = rows_module._orjson, None
    try:
        return parse_rows(raw, 8, "tasks", with_refs=True)
    finally:
        rows_module._orjson = saved


def _depth() -> int:
    frame, n = sys._getframe(), 0
    while frame is not None:
        frame, n = frame.f_back, n + 1
    return n


def _at_depth(depth: int, call: Callable[[], Any]) -> Any:
    return call() if _depth() >= depth else _at_depth(depth, call)


def _swallowing_rows() -> list[bytes]:
    """Three rows: the first and the last forged (no secret needed: plain JSON), the middle one a
    task's. Joined, they make three well-formed records, the middle row a value inside the second."""
    a = b'["a",{"x":1}' + _TAIL + b',["forged",{"x":[[0' + _TAIL
    b = json.dumps(["b", {"x": 2}, None, None, None, None, "w", "finished"]).encode()
    c = b'["c",0],0]}' + _TAIL + b',["forged2",{"x":3}' + _TAIL
    return [a, b, c]


def test_swallowing_rows_are_one_record_each_yet_hide_their_neighbour():
    """The premise of FINDING 1: alone, only the middle row is a record; joined, three records."""
    rows = _swallowing_rows()
    assert [parse_rows([row], 8, "tasks", with_refs=True)[0] is not None for row in rows] == [False, True, False]
    assert [r[0] for r in json.loads(b"[" + b",".join(rows) + b"]")] == ["a", "forged", "forged2"]


def test_each_row_decodes_as_it_does_alone():
    rows = _swallowing_rows()
    assert parse_rows(rows, 8, "tasks", with_refs=True) == [
        parse_rows([row], 8, "tasks", with_refs=True)[0] for row in rows]


# -- probes (regression guards): orjson is trusted only where it reads as json ------------------------
_NUMBERS = [
    b"-0", b"-0.0", b"0e0", b"-0e-0", b"1E400", b"-1e400", b"1e-400", b"1.7976931348623159e308",
    b"4.9406564584124654e-324", b"2.4703282292062328e-324", b"9007199254740993", b"9007199254740993.0",
    b"9" * 19, b"1" + b"9" * 19, b"2" + b"0" * 19, b"18446744073709551615", b"18446744073709551616",
    b"-9223372036854775808", b"-9223372036854775809", b"-" + b"9" * 18, b"-" + b"9" * 19, b"9" * 25 + b".5",
    b"9" * 19 + b".5", b"0." + b"1" * 40, b"1e0000000000000000000000001", b"12345678901234567890e-5",
    b"1" * 400, b"0.000000000000000000001e21",
]
_STRINGS = [
    b'"\\ud800"', b'"\\udc00\\ud800"', b'"\xed\xa0\x80"', b'"\xc0\x80"', b'"\xff"', b'"\x01"', b'"\x7f"',
    b'"\\u0000"', b'"\xe2\x80\xa8"', b'"[[[[{{{{"', b'"\\"]],[["', b'{"\\ud800":1}',
    b'{"a":1,"b":2,"a":3}', b'"12345678901234567890"', b'"-1234567890123456789"',
]
_BAD = [b"NaN", b"-Infinity", b"Infinity", b"01", b"+1", b".5", b"1.", b"1e", b"[1,]", b"\x0c1", b"\xef\xbb\xbf1",
        b"\xc2\xa01", b"1 2", b"\x001", b"True", b"\xd9\xa1"]


def _same(a: Any, b: Any) -> bool:
    return repr(a) == repr(b) and _types(a) == _types(b)


def _types(value: Any) -> Any:
    if isinstance(value, list):
        return [_types(v) for v in value]
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    return type(value).__name__


@pytest.mark.parametrize("value", _NUMBERS + _STRINGS + _BAD)
@pytest.mark.parametrize("where", ["alone", "in a record", "first of two"])
def test_orjson_decodes_like_json(value, where):
    if where == "alone":
        rows = [value]
    else:
        rows = [b'["t",' + value + _TAIL]
        if where == "first of two":
            rows.append(b'["u",1' + _TAIL)
    try:
        expected: Any = json.loads(b"[" + b",".join(rows) + b"]")
    except (ValueError, RecursionError) as error:
        expected = type(error)
    try:
        got: Any = loads_many(rows)
    except (ValueError, RecursionError) as error:
        got = type(error)
    assert got is expected if isinstance(expected, type) else _same(got, expected)
    assert _same(parse_rows(rows, 8, "tasks", with_refs=True), json_only_parse_rows(rows))


@pytest.mark.parametrize("size", [510, 511, 512, 513])
def test_rows_near_the_depth_bound_decode_like_json(size):
    depth = (size - len(b'["t",') - len(_TAIL)) // 2
    nested = b"[" * depth + b"]" * depth
    row = b'["t",' + nested + b" " * (size - len(b'["t",') - len(_TAIL) - 2 * depth) + _TAIL
    assert len(row) == size
    assert _same(parse_rows([row], 8, "tasks", with_refs=True), json_only_parse_rows([row]))
