"""The states of a worker and the ONE table of allowed transitions.

A worker's state lives in its hash (field ``state``) and in one set per state. Every change goes
through ``set_worker_state``, which hands the allowed previous states from ``TRANSITIONS`` to the
``SET_WORKER_STATE`` Lua script: the check and the move happen in one atomic step in Redis, so a
controller and a worker racing (e.g. "lost" against "terminated") cannot both win.

    (none) -> launched -> running -> terminated
                 |           |----> failed | killed | lost
                 |---------> failed | killed
    (none) ------------------> running        (a worker started by hand registers directly)
    (none) ------------------> failed         (bootstrap failed before anything was recorded)

Terminal states (terminated, failed, killed, lost) are final: nothing leaves them.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from .network import RushNetwork


class WorkerState(str, Enum):
    """What a worker is doing, as recorded in Redis (the values are the stored strings)."""

    LAUNCHED = "launched"      # the controller asked a launcher to start it; not registered yet
    RUNNING = "running"        # registered, running its loop
    TERMINATED = "terminated"  # its loop returned (asked to terminate, or done)
    FAILED = "failed"          # its bootstrap or loop raised, or it never registered
    KILLED = "killed"          # the controller killed it
    LOST = "lost"              # its heartbeat expired or its process / job ended unnoticed

    def __str__(self) -> str:
        return self.value


NONE = ""  # the "state" of a worker that has no record yet

#: target state -> the states a worker may be in to move there ("" = no record yet)
TRANSITIONS: dict[WorkerState, frozenset[str]] = {
    WorkerState.LAUNCHED: frozenset({NONE}),
    WorkerState.RUNNING: frozenset({NONE, "launched"}),
    WorkerState.TERMINATED: frozenset({"running"}),
    WorkerState.FAILED: frozenset({NONE, "launched", "running"}),
    WorkerState.KILLED: frozenset({"launched", "running"}),
    WorkerState.LOST: frozenset({"running"}),
}

#: states a worker can still leave (it may hold tasks or a process / job)
ACTIVE: tuple[WorkerState, ...] = (WorkerState.LAUNCHED, WorkerState.RUNNING)
#: states nothing leaves
TERMINAL: tuple[WorkerState, ...] = tuple(s for s in WorkerState if s not in ACTIVE)


def allowed_previous(state: WorkerState | str, narrow: Iterable[str] | str | None = None) -> list[str]:
    """The previous states from which ``state`` may be reached, optionally narrowed by the caller.

    ``narrow`` (``None`` or ``"*"``: the whole table row) may only remove states from the table's
    row; asking for a transition the table does not allow is a programming error.
    """
    target = WorkerState(state)
    allowed = TRANSITIONS[target]
    if narrow is None or narrow == "*":
        return sorted(allowed)
    wanted = {narrow} if isinstance(narrow, str) else {str(s) for s in narrow}
    illegal = wanted - allowed
    if illegal:
        raise ValueError(f"transition to {target.value!r} from {sorted(illegal)} is not in the state table")
    return sorted(wanted)


def can_move(previous: str, state: WorkerState | str) -> bool:
    """Whether the table allows ``previous -> state``."""
    return previous in TRANSITIONS[WorkerState(state)]


def set_worker_state(network: RushNetwork, worker_id: str, state: WorkerState | str,
                     allowed: Iterable[str] | str | None = None, /, **fields: Any) -> str | None:
    """Move ``worker_id`` to ``state`` if the table (narrowed by ``allowed``) lets it; atomic in Redis.

    Returns the previous state (``""`` if there was none) or ``None`` when the move was refused.
    Used by the controller, the supervisor and the worker alike.
    """
    target = WorkerState(state)
    args: list[Any] = [target.value, network.keys.worker_set_prefix, worker_id,
                       ",".join(allowed_previous(target, allowed))]
    for name, value in fields.items():
        args += [name, "" if value is None else str(value)]
    previous = network._script("SET_WORKER_STATE", [network.keys.worker(worker_id), network.keys.workers], args)
    if previous is None:
        return None
    return previous.decode() if isinstance(previous, bytes) else str(previous)
