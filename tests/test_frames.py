"""Helpers in rush_hpc.frames: reserved column names, short ids, local times."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from rush_hpc import TaskError
from rush_hpc.frames import (RESERVED_COLUMNS, check_user_columns, format_local, reserved_columns, short_ids,
                             to_local_times)


@pytest.mark.parametrize("name", ["state", "keys", "worker_id"])
@pytest.mark.parametrize("what", ["xss", "yss", "extra", "conditions"])
def test_reserved_names_are_refused_everywhere(name, what):
    with pytest.raises(TaskError) as error:
        check_user_columns([{"x": 1}, {"x": 2, name: 3}], what)
    message = str(error.value)
    assert message.startswith(f"{what}[1] uses the reserved column name(s) {name!r}")
    assert all(reserved in message for reserved in RESERVED_COLUMNS)  # names them all
    assert f"{name!r} -> {name + '_'!r}" in message  # and the fix


def test_pid_is_reserved_for_inputs_and_results_but_extras_may_set_it():
    for what in ("xss", "yss"):
        with pytest.raises(TaskError, match="'pid'"):
            check_user_columns([{"pid": 1}], what)
    check_user_columns([{"pid": 1}], "extra")
    assert "pid" in reserved_columns("xss") and "pid" not in reserved_columns("extra")


def test_ordinary_names_none_and_empty_dicts_pass():
    check_user_columns([{"x1": 1, "state_": 2, "my_keys": 3, "y": None}, {}, None], "xss")  # type: ignore[list-item]


def test_short_ids_shortens_only_id_columns_and_copies():
    frame = pd.DataFrame({"x": ["a" * 32], "worker_id": ["b" * 32], "keys": ["c" * 32]})
    short = short_ids(frame)
    assert short.iloc[0].tolist() == ["a" * 32, "b" * 8, "c" * 8]
    assert frame["keys"].iloc[0] == "c" * 32
    assert short_ids(pd.DataFrame(columns=["worker_id", "keys"])).empty


def test_times_are_local_with_the_offset(monkeypatch):
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        assert format_local(0) == "1970-01-01 01:00:00 +01:00"
        assert format_local(1_593_561_600, with_date=False) == "02:00:00 +02:00"  # 2020-07-01, summer time
        assert format_local(None) == "-"
        frame = to_local_times(pd.DataFrame({"t": pd.to_datetime([0], unit="s")}), ["t"])
        assert frame["t"].iloc[0].isoformat() == "1970-01-01T01:00:00+01:00"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
