"""The worker state machine: one table, used for every state change."""

from __future__ import annotations

import pytest

from rush_hpc.states import ACTIVE, TERMINAL, TRANSITIONS, WorkerState, allowed_previous, can_move


def test_every_state_has_a_row_and_values_are_the_stored_strings():
    assert set(TRANSITIONS) == set(WorkerState)
    assert [s.value for s in WorkerState] == ["launched", "running", "terminated", "failed", "killed", "lost"]
    assert str(WorkerState.RUNNING) == "running" and WorkerState("lost") is WorkerState.LOST


def test_terminal_states_are_final():
    for row in TRANSITIONS.values():
        assert not row & {s.value for s in TERMINAL}
    assert set(ACTIVE) | set(TERMINAL) == set(WorkerState)


@pytest.mark.parametrize("previous, state, allowed", [
    ("", "launched", True), ("launched", "running", True), ("", "running", True),
    ("running", "terminated", True), ("launched", "terminated", False),
    ("running", "lost", True), ("launched", "lost", False),
    ("launched", "killed", True), ("running", "killed", True), ("", "killed", False),
    ("launched", "failed", True), ("running", "failed", True), ("", "failed", True),
    ("terminated", "running", False), ("lost", "terminated", False), ("killed", "lost", False),
    ("failed", "running", False), ("running", "launched", False),
])
def test_transitions(previous, state, allowed):
    assert can_move(previous, state) is allowed


def test_callers_may_narrow_the_table_but_not_widen_it():
    assert allowed_previous("failed") == ["", "launched", "running"]
    assert allowed_previous("failed", "*") == ["", "launched", "running"]
    assert allowed_previous("failed", ("launched",)) == ["launched"]
    with pytest.raises(ValueError, match="not in the state table"):
        allowed_previous("lost", ("launched",))
    with pytest.raises(ValueError):
        allowed_previous("sleeping")
