"""Second review of the fetch decoding (35eaa8b, b08ce85): rows forged in Redis against fetch_*.

The FINDINGs are strict xfails: they fail on the code they were found in."""

from __future__ import annotations

import pytest

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


@pytest.mark.xfail(strict=True, reason="FINDING 1: two forged rows around a legitimate one hide it "
                   "silently (the joined decode reads it inside a forged record; count and shape match)")
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
