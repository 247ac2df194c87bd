"""The benchmark marks a number that regressed by more than 10% from the README's table."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench  # noqa: E402


def test_regressions_are_found_in_both_directions():
    last = {"loop": "1,000 tasks/s; floor 2,000", "fetch": "100 ms (median of 3)", "new": "?"}
    rows = [("loop", "850 tasks/s; floor 2,100", ""), ("fetch", "115 ms", ""), ("other", "1 tasks/s", "")]
    worse = bench.regressions(rows, last)
    assert len(worse) == 2 and worse[0].startswith("loop: 850") and "15% worse" in worse[1]
    assert bench.regressions([("loop", "950 tasks/s", ""), ("fetch", "90 ms", "")], last) == []


def test_the_readme_table_is_read():
    table = bench.readme_table()
    assert any(name.startswith("vignette loop") for name in table)


def test_rows_with_a_floor_are_judged_by_their_ratio():
    last = {"loop": "10,000 tasks/s; floor 8,000 tasks/s; ratio 1.25"}
    slower_machine = [("loop", "7,000 tasks/s; floor 5,600 tasks/s; ratio 1.25", "")]
    assert bench.regressions(slower_machine, last) == []  # both slowed alike: no regression
    worse = bench.regressions([("loop", "10,000 tasks/s; floor 10,000 tasks/s; ratio 1.00", "")], last)
    assert len(worse) == 1 and "20% worse" in worse[0]
