"""Columns to frames: column dtypes, and their promotion as the finished-task buffer grows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rush_hpc.frames import FrameBuffer, column_order, columns_to_frame, infer_array


@pytest.mark.parametrize("values, kind", [
    ([1, 2], "i"), ([1, 2.5], "f"), ([1, None], "f"), ([True, False], "b"), (["a", 1], "O"),
    ([None, None], "O"), ([2**70, 1], "O"), ([True, 1], "O"), ([[1], [2]], "O"),
])
def test_infer_array(values, kind):
    assert infer_array(values).dtype.kind == kind


def test_missing_numbers_become_nan():
    array = infer_array([1, None, 3])
    assert math.isnan(array[1]) and array[2] == 3.0


def test_column_order_puts_library_columns_last():
    assert column_order(["keys", "y", "x", "worker_id", "z"]) == ["y", "x", "z", "worker_id", "keys"]


def test_columns_to_frame_keeps_dtypes():
    frame = columns_to_frame({"x": [1, 2], "y": [1.5, None], "s": ["a", "b"]})
    assert frame["x"].dtype == np.int64 and frame["y"].dtype == np.float64 and frame["s"].dtype == object
    assert list(columns_to_frame({}).columns) == ["worker_id", "keys"]


def test_buffer_promotes_int_to_float_then_object():
    buffer = FrameBuffer()
    buffer.append({"x": [1, 2]})
    assert buffer.frame()["x"].dtype == np.int64
    buffer.append({"x": [2.5]})
    assert buffer.frame()["x"].dtype == np.float64 and buffer.frame()["x"].tolist() == [1.0, 2.0, 2.5]
    buffer.append({"x": ["text"]})
    assert buffer.frame()["x"].dtype == object and buffer.frame()["x"].tolist()[-1] == "text"


def test_buffer_fills_missing_columns_both_ways():
    buffer = FrameBuffer()
    buffer.append({"a": [1]})
    buffer.append({"b": [True]})  # a new column: earlier rows get a missing value
    frame = buffer.frame()
    assert frame["a"].dtype == np.float64 and math.isnan(frame["a"][1])
    assert frame["b"].dtype == object and frame["b"].tolist() == [None, True]


def test_buffer_grows_past_its_capacity_without_losing_rows():
    buffer = FrameBuffer()
    for start in range(0, 3000, 700):
        buffer.append({"i": list(range(start, start + 700))})
    assert buffer.frame()["i"].tolist() == list(range(3500)) and buffer.capacity >= 3500


def test_buffer_ignores_an_empty_append():
    buffer = FrameBuffer()
    buffer.append({})
    buffer.append({"x": []})
    assert buffer.n == 0 and list(buffer.frame().columns) == ["worker_id", "keys"]
