"""What a controller and its workers share: the connection, task creation, counts and fetches."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, cast

import redis

from . import lua
from .codec import Codec
from .config import RedisConfig
from .exceptions import (NoWorkersError, RedisAuthError, RedisUnavailableError, RushTimeoutError,
                         TaskError, UnknownTaskError, WorkerNotRunningError)
from .frames import FrameBuffer, check_user_columns, columns_to_frame
from .fastpath import FastConnection
from .fastpath import available as fastpath_available
from .keys import TASK_STATES, NetworkKeys
from .outage import OutageRetry
from .rows import RECORD_WIDTH, VALUE_FIELDS, Columns, Record, collector_paused, parse_rows, pickle_refs, records_to_columns

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

_SCRIPTS = ("CREATE_TASKS", "CREATE_RUNNING_TASKS", "FINISH_TASKS", "FAIL_TASKS", "POP_TASK", "FINISH_AND_POP", "END_WORKER",
            "SWEEP_ORPHANED_TASKS", "SET_WORKER_STATE", "FETCH_ROWS")
#: task ids per FETCH_ROWS call: a few ms of Redis time each, so other clients are never held up
FETCH_CHUNK = 1000
#: finished rows per LRANGE of the (ready-made JSON) finished list
FINISHED_CHUNK = 5000


def _ended(result: Any) -> tuple[str, list[str], list[str]] | None:
    """END_WORKER's reply: (previous state, failed ids, requeued ids), None when it was refused."""
    if not result:
        return None
    previous, failed, requeued = result
    return text(previous), [text(i) for i in failed], [text(i) for i in requeued]


def new_task_id() -> str:
    """A task id: 16 URL-safe characters, 96 random bits (half the memory of a uuid4 hex in every list
    and row; collisions stay negligible even at billions of tasks)."""
    return secrets.token_urlsafe(12)


def connect(config: RedisConfig, **client_options: Any) -> redis.Redis:
    """A checked client: wrong password or unreachable Redis become clear ``RushError``s."""
    client = config.client(**client_options)
    # fail fast and clearly on a wrong password or address, or a port that accepts and never answers
    probe = config.client(outage_timeout=0, socket_timeout=min(config.socket_timeout or 5.0, 5.0))
    try:
        probe.ping()
    except redis.AuthenticationError as error:
        if config.password is None:
            raise RedisAuthError(f"Redis at {config} requires a password ({error}); give a password "
                                 "(redis://:PASSWORD@host, or an ACL user: redis://USER:PASSWORD@host)") from None
        raise RedisAuthError(f"Redis at {config} refused the credentials ({error}); check the "
                             "password / ACL user in the URL or RUSH_HPC_REDIS_PASSWORD") from None
    except redis.ResponseError as error:
        if "NOAUTH" in str(error) or "NOPERM" in str(error):
            raise RedisAuthError(f"Redis at {config}: {error}; give a password (redis://:PASSWORD@host) "
                                 "or an ACL user with access to the network's keys") from None
        raise
    except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
        raise RedisUnavailableError(f"cannot reach Redis at {config}: {error}. Is redis-server running "
                                    "there and reachable from this host?") from None
    finally:
        probe.close()
    return client


def text(value: bytes | str) -> str:
    """A Redis reply as str (replies are bytes; typing says bytes | str)."""
    return value.decode() if isinstance(value, bytes) else value


def _as_list_of_dicts(values: Any, name: str) -> list[dict[str, Any]]:
    if isinstance(values, Mapping):
        raise TaskError(f"{name} must be a list of dicts; wrap a single task as [{name[:-1]}]")
    if not isinstance(values, (list, tuple)):
        raise TaskError(f"{name} must be a list of dicts, got {type(values).__name__}")
    for i, value in enumerate(values):
        if not isinstance(value, Mapping):
            raise TaskError(f"{name}[{i}] must be a dict (column name -> value), got "
                            f"{type(value).__name__}: {value!r:.80}")
    dicts = [dict(v) for v in values]
    check_user_columns(dicts, name)
    return dicts


def _extras(extra: Any, n: int, name: str = "extra") -> list[dict[str, Any] | None]:
    if extra is None:
        return [None] * n
    if isinstance(extra, Mapping):
        check_user_columns([extra], name)
        return [dict(extra)] * n
    extras: list[dict[str, Any] | None] = list(_as_list_of_dicts(extra, name))
    if len(extras) != n:
        raise TaskError(f"{name} has {len(extras)} entries but there are {n} tasks")
    return extras


def _key_list(keys: str | Iterable[str]) -> list[str]:
    return [keys] if isinstance(keys, str) else list(keys)


def _float(value: str) -> float:
    """A number from Redis text (0.0 if it is none)."""
    try:
        return float(value)
    except ValueError:
        return 0.0


def _recent(epoch: str, seconds: float) -> bool:
    """``epoch`` (seconds, text from Redis) lies within the last ``seconds``."""
    return abs(time.time() - _float(epoch)) < seconds


def _append_rows(raw: list[bytes], refs: list[Any], chunk: Sequence[bytes], chunk_refs: Sequence[Any] | None) -> None:
    """Add one FETCH_ROWS chunk to a fetch: its refs' row positions shifted by the rows before it."""
    offset = len(raw)
    raw.extend(chunk)
    for i in range(0, len(chunk_refs or ()), 2):
        refs += [int(chunk_refs[i]) + offset, chunk_refs[i + 1]]  # type: ignore[index]


def _merge_indices(indices: Sequence[int], *, gap: int, longest: int) -> list[tuple[int, int]]:
    """Sorted list indices as ``(start, end)`` ranges to read: indices less than ``gap`` apart share
    a range (reading a few rows too many costs less than another seek), no range longer than ``longest``."""
    ranges: list[tuple[int, int]] = []
    for index in indices:
        if ranges and index - ranges[-1][1] < gap and index - ranges[-1][0] < longest:
            ranges[-1] = (ranges[-1][0], index)
        else:
            ranges.append((index, index))
    return ranges


#: rows as Redis returned them (JSON) and the positions of the signed pickles some of them refer to
RawRows = tuple[list[bytes], list[Any]]


class RushNetwork:
    """A connection to one network; the base of ``Rush`` (controller) and ``RushWorker``."""

    #: one dedicated connection (a worker: its loop is one thread) rather than a pool (a controller)
    _single_connection = False

    def __init__(self, network: str, config: RedisConfig, secret: bytes | None) -> None:
        self.keys = NetworkKeys(network)
        self.network = network
        self.config = config
        self.codec = Codec(secret, network)
        self.redis = connect(config, single_connection=self._single_connection)
        #: a worker's task scripts on a bare hiredis socket (same retry policy); None: through redis-py
        self._fast = FastConnection(config, self._retry) \
            if self._single_connection and fastpath_available(config) else None
        self._shas = {name: hashlib.sha1(getattr(lua, name).encode()).hexdigest() for name in _SCRIPTS}
        #: the worker whose task calls are fenced in Redis (None: a controller, not fenced)
        self._fence_id: str | None = None
        #: a creation whose reply never came (the call raised): (call, ids), reused if it is repeated
        self._pending_create: tuple[Any, list[str]] | None = None
        self._warned_no_workers = False
        self._finished = FrameBuffer()
        self._finished_position = 0  # rows of the finished list read so far (bad rows included)
        self._new_tasks_index = 0

    def _script(self, name: str, keys: Sequence[str], args: Sequence[Any], client: Any = None) -> Any:
        """Run one of the Lua scripts (EVALSHA; loaded on first use or after a Redis restart).

        A refused fence becomes ``WorkerNotRunningError``. Called directly rather than through
        redis-py's Script object: this is the hot path.
        """
        execute = (client or self.redis).execute_command if client is not None or self._fast is None \
            else self._fast.execute
        try:
            try:
                return execute("EVALSHA", self._shas[name], len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                execute("SCRIPT", "LOAD", getattr(lua, name))
                return execute("EVALSHA", self._shas[name], len(keys), *keys, *args)
        except redis.ResponseError as error:
            message = str(error)
            if "RUSH_NOT_RUNNING" in message:
                detail = message.split("RUSH_NOT_RUNNING", 1)[1].split()
                state = detail[0] if detail else "gone"
                self._on_refused(state)
                raise WorkerNotRunningError(self._fence_id or "?", state) from None
            raise

    @property
    def _retry(self) -> Any:
        """The client's ``OutageRetry`` (shared by its connections); a stand-in on a Redis Cluster,
        whose client retries cluster errors its own way."""
        retry = self.redis.get_connection_kwargs().get("retry") if hasattr(self.redis, "get_connection_kwargs") \
            else None
        if not isinstance(retry, OutageRetry):
            retry = self.__dict__.setdefault("_standin_retry", OutageRetry(0))
        return retry

    def set_outage_timeout(self, seconds: float) -> None:
        """How long this client's calls retry through a Redis outage before they raise."""
        self._retry.outage_timeout = float(seconds)

    def _on_refused(self, state: str) -> None:
        """Hook: a worker learns here that Redis refused it (RushWorker stops its loop)."""

    # -- creating tasks -----------------------------------------------------------------------
    def _create_tasks(self, xss: list[dict[str, Any]], extras: Sequence[dict[str, Any] | bytes | None], *,
                      state: str, max_retries: int = 0, priority: str | None = None) -> list[str]:
        """Create tasks in one script call (inputs already validated; an extra may be pre-encoded).

        Ids are made here, so a call that redis-py re-sends after a lost reply finds them and creates
        nothing twice. A worker's call is fenced (it must be running). ``priority``: the worker whose
        priority queue takes them while it is running (else the shared queue).
        """
        if not isinstance(max_retries, int) or max_retries < 0:
            raise TaskError(f"max_retries must be a non-negative integer, got {max_retries!r}")
        if not xss:
            return []
        encode = self.codec.encode
        fence, target = self._fence_id or "", priority or ""
        values = [(encode(xs), xs_extra if type(xs_extra) is bytes else encode(xs_extra) if xs_extra else b"")
                  for xs, xs_extra in zip(xss, extras)]
        call = (state, target, max_retries, values)
        pending = self._pending_create
        # the same call again after one that raised (its effect unknown): the same ids, so nothing twice
        ids = pending[1] if pending is not None and pending[0] == call else [new_task_id() for _ in xss]
        self._pending_create = (call, ids)
        args: list[Any] = [self.keys.task_prefix, state, fence, max_retries or "", target]
        for task_id, (xs_blob, extra_blob) in zip(ids, values):
            args += [task_id, xs_blob, extra_blob]
        keys = self.keys
        self._script("CREATE_TASKS", [keys.all_tasks, keys.running, keys.worker(fence), keys.held_tasks(fence),
                                      keys.queued, keys.wake, keys.worker(target), keys.priority(target),
                                      keys.worker_wake(target), keys.priority_workers], args)
        self._pending_create = None
        return ids

    def push_tasks(self, xss: Sequence[Mapping[str, Any]], extra: Any = None, *,
                   max_retries: int = 0) -> list[str]:
        """Queue tasks for any worker to ``pop_task()``; returns their keys.

        ``max_retries``: how often a task goes back to the queue when its worker is lost or killed.
        """
        xss = _as_list_of_dicts(xss, "xss")
        return self._create_tasks(xss, _extras(extra, len(xss)), state="queued", max_retries=max_retries)

    def push_priority_tasks(self, xss: Sequence[Mapping[str, Any]], priority: Sequence[str | None],
                            extra: Any = None, *, max_retries: int = 0) -> list[str]:
        """Queue each task for one worker (``priority[i]``); popped before the shared queue.

        A task whose worker is not running (or whose priority is None) goes to the shared queue.
        """
        xss = _as_list_of_dicts(xss, "xss")
        priority = list(priority)
        if len(priority) != len(xss):
            raise TaskError(f"priority has {len(priority)} entries but xss has {len(xss)}")
        extras = _extras(extra, len(xss))
        groups: dict[str | None, list[int]] = {}
        for i, worker_id in enumerate(priority):
            groups.setdefault(worker_id, []).append(i)
        keys: list[str] = [""] * len(xss)
        for worker_id, positions in groups.items():  # one script call per target worker
            created = self._create_tasks([xss[i] for i in positions], [extras[i] for i in positions],
                                         state="queued", max_retries=max_retries, priority=worker_id)
            for i, key in zip(positions, created):
                keys[i] = key
        return keys

    # -- counts --------------------------------------------------------------------------------
    @property
    def n_tasks(self) -> int:
        """Every task the network ever had (queued, running, finished, failed)."""
        return int(self.redis.llen(self.keys.all_tasks))

    @property
    def n_queued_tasks(self) -> int:
        """Tasks waiting in the shared queue (priority queues not included)."""
        return int(self.redis.llen(self.keys.queued))

    @property
    def n_queued_priority_tasks(self) -> int:
        """Tasks waiting in the workers' priority queues."""
        workers = self.redis.smembers(self.keys.priority_workers)
        if not workers:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in workers:
            pipe.llen(self.keys.priority(text(worker_id)))
        return sum(pipe.execute())

    @property
    def n_running_tasks(self) -> int:
        """Tasks a worker holds right now."""
        return int(self.redis.scard(self.keys.running))

    @property
    def n_finished_tasks(self) -> int:
        """Tasks finished so far (the length of the append-only finished list)."""
        return int(self.redis.llen(self.keys.finished))

    @property
    def n_failed_tasks(self) -> int:
        """Tasks that failed (a worker's push_failed, or a lost worker's task without retries left)."""
        return int(self.redis.llen(self.keys.failed))

    @property
    def n_running_workers(self) -> int:
        """Workers registered and not ended (found lost ones are not counted)."""
        return int(self.redis.scard(self.keys.worker_state_set("running")))

    def counts(self) -> dict[str, int]:
        """Every count in one round trip (plus one for priority queues when there are any)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.scard(self.keys.worker_state_set("running"))
        pipe.llen(self.keys.queued)
        pipe.scard(self.keys.running)
        pipe.llen(self.keys.finished)
        pipe.llen(self.keys.failed)
        pipe.llen(self.keys.all_tasks)
        workers, queued, running, finished, failed, total = pipe.execute()
        return {"running_workers": workers, "queued": queued,
                "queued_priority": self.n_queued_priority_tasks, "running": running,
                "finished": finished, "failed": failed, "total": total}

    # -- fetching ------------------------------------------------------------------------------
    def _fetch_rows(self, collection: str, kind: str, states: Sequence[str] | None = None) -> RawRows:
        """The rows (one per task, JSON) of an append-only list (all tasks, failed), read in chunks
        of ``FETCH_CHUNK`` ids by index (stable: the list only grows), and their pickle references.

        Each chunk is one FETCH_ROWS call, so Redis is never blocked for long; the state filter runs
        in Redis.
        """
        raw: list[bytes] = []
        refs: list[Any] = []
        position: Any = 0
        state_filter = ",".join(states) if states is not None else ""
        while True:
            chunk, chunk_refs, position = self._script(
                "FETCH_ROWS", [collection, self.keys.finished], [kind, position, FETCH_CHUNK, self.keys.task_prefix, state_filter])
            _append_rows(raw, refs, chunk, chunk_refs)
            if position in (b"0", "0", 0):
                break
        self._read_finished_rows(raw, refs)
        return raw, refs

    def _fetch_snapshots(self, collections: Sequence[str], kind: str, states: Sequence[str] | None = None
                         ) -> RawRows:
        """The rows of lists or sets that change while they are read (a queue workers pop from, the
        running set): each one's ids in one read (a consistent snapshot: no task missed or repeated),
        then the rows by id in chunks. A task that moved on meanwhile is shown in its new state, or
        left out."""
        raw: list[bytes] = []
        refs: list[Any] = []
        for collection in collections:
            self._fetch_snapshot(collection, kind, states, raw, refs)
        self._read_finished_rows(raw, refs)
        return raw, refs

    def _fetch_snapshot(self, collection: str, kind: str, states: Sequence[str] | None,
                        raw: list[bytes], refs: list[Any]) -> None:
        """Append one collection's rows (and their pickle references) to ``raw`` and ``refs``."""
        ids = self.redis.lrange(collection, 0, -1) if kind == "list" else sorted(self.redis.smembers(collection))
        state_filter = ",".join(states) if states is not None else ""
        for first in range(0, len(ids), FETCH_CHUNK):
            chunk, chunk_refs, _ = self._script("FETCH_ROWS", [collection, self.keys.finished], [
                "ids", 0, FETCH_CHUNK, self.keys.task_prefix, state_filter, *ids[first:first + FETCH_CHUNK]])
            _append_rows(raw, refs, chunk, chunk_refs)

    def _read_finished_rows(self, raw: list[bytes], refs: list[Any]) -> None:
        """Replace FETCH_ROWS' markers of finished tasks (``#<index>#<id>``) by their rows of the
        finished list, in place: the indices of a whole fetch sorted and read as few ranges (at most
        ``FINISHED_CHUNK`` rows each, near indices merged), in pipelines of a few commands, so that no
        command holds Redis long. A row that does not begin with its task's id (the list or the hash
        was changed by someone else) is built from the task's hash instead."""
        markers: list[tuple[int, int, bytes]] = []  # (position in raw, index in the finished list, id)
        for position, value in enumerate(raw):
            if value[:1] == b"#":
                index_text, _, marked_id = value[1:].partition(b"#")
                markers.append((position, int(index_text), marked_id))
        if not markers:
            return
        found: dict[int, bytes] = {}
        ranges = _merge_indices(sorted({index for _, index, _ in markers}), gap=512, longest=FINISHED_CHUNK)
        for first in range(0, len(ranges), 16):  # 16 range reads per round trip
            pipe = self.redis.pipeline(transaction=False)
            for start, end in ranges[first:first + 16]:
                pipe.lrange(self.keys.finished, start, end)
            for (start, _), rows in zip(ranges[first:first + 16], pipe.execute()):
                found.update(enumerate(rows, start))
        missing: list[tuple[int, bytes]] = []
        for position, index, task_id in markers:
            row = found.get(index)
            head = b"[" + json.dumps(task_id.decode(errors="replace")).encode() + b","
            if row is not None and row.startswith(head):
                raw[position] = row
            else:
                missing.append((position, task_id))
        for first in range(0, len(missing), FETCH_CHUNK):
            part = missing[first:first + FETCH_CHUNK]
            rebuilt, rebuilt_refs, _ = self._script("FETCH_ROWS", [self.keys.all_tasks, self.keys.finished], [
                "ids-from-hash", 0, len(part), self.keys.task_prefix, "", *(task_id for _, task_id in part)])
            for (position, _), row in zip(part, rebuilt):
                raw[position] = row
            for i in range(0, len(rebuilt_refs or ()), 2):
                refs += [part[int(rebuilt_refs[i])][0], rebuilt_refs[i + 1]]

    def _columns(self, raw: list[bytes], refs: Sequence[Any] = (), *, with_state: bool = False) -> Columns:
        """Rows (FETCH_ROWS rows or rows of the finished list) as columns, their signed pickles read
        separately and verified before they are unpickled; bad rows reported and left out.

        The cyclic collector is paused until the decoded rows are freed again, except while signed
        pickles are read (that waits for Redis and runs user code).
        """
        with collector_paused():
            records = parse_rows(raw, RECORD_WIDTH, "tasks", with_refs=True)
            # finished rows list their own signed pickles as a 9th element; FETCH_ROWS lists those of
            # the rows it built from task hashes in refs
            pairs = [(int(refs[i]), int(refs[i + 1])) for i in range(0, len(refs), 2)] + pickle_refs(records)
            if not pairs:
                return self._records_to_columns(records, with_state)
        self._resolve_refs(records, pairs)
        with collector_paused():
            return self._records_to_columns(records, with_state)

    @staticmethod
    def _records_to_columns(records: list[Record | None], with_state: bool) -> Columns:
        columns = records_to_columns([r for r in records if r is not None] if None in records
                                     else cast(list[Record], records), with_state=with_state)
        records.clear()  # freed now, while the collector is paused: it has nothing to walk
        return columns

    def _frame(self, rows: RawRows, *, with_state: bool = False) -> pd.DataFrame:
        return columns_to_frame(self._columns(*rows, with_state=with_state))

    def _resolve_refs(self, records: list[Record | None], pairs: list[tuple[int, int]]) -> None:
        """Replace each referenced field (``(record, position)`` pairs) by its signed pickle from the
        task's hash, decoded; a record whose pickle cannot be decoded is reported and dropped (None)."""
        pairs = [(row, index) for row, index in pairs
                 if 0 <= row < len(records) and 1 <= index <= len(VALUE_FIELDS) and records[row] is not None]
        pipe = self.redis.pipeline(transaction=False)
        for row, index in pairs:
            pipe.hget(self.keys.task(records[row][0]), VALUE_FIELDS[index - 1])  # type: ignore[index]
        for (row, index), blob in zip(pairs, pipe.execute()):
            record = records[row]
            if record is None:
                continue
            try:
                record[index] = self.codec.decode(blob, f"task {record[0]} {VALUE_FIELDS[index - 1]}")
            except Exception as error:  # noqa: BLE001 - one bad value must not break the rest
                logger.warning("skipping task %s: its %s cannot be decoded: %s", record[0],
                               VALUE_FIELDS[index - 1], error)
                records[row] = None

    def fetch_finished_tasks(self) -> pd.DataFrame:
        """Finished tasks (xs, ys and extra columns, worker_id, keys) in the order they finished.

        Incremental: only tasks finished since the last call are read from Redis (the finished list
        holds ready-made rows: LRANGE in chunks, decoded into columns); the rest comes from a
        cache whose frame is a view (pandas copy-on-write keeps your changes out of it). A row that
        cannot be decoded is reported and skipped, once.
        """
        while True:
            raw = cast(list[bytes], self.redis.lrange(self.keys.finished, self._finished_position,
                                                      self._finished_position + FINISHED_CHUNK - 1))
            if not raw:
                break
            columns = self._columns(raw)  # raises (Redis away): read these again next time
            self._finished.append(columns)
            self._finished_position += len(raw)
            if len(raw) < FINISHED_CHUNK:
                break
        return self._finished.frame()

    def _clear_task_cache(self) -> None:
        """Forget the fetched finished tasks (after a reset)."""
        self._finished, self._finished_position, self._new_tasks_index = FrameBuffer(), 0, 0

    def fetch_new_tasks(self) -> pd.DataFrame:
        """Finished tasks that no earlier ``fetch_new_tasks()`` call returned."""
        frame = self.fetch_finished_tasks()
        new = frame.iloc[self._new_tasks_index:].reset_index(drop=True)
        self._new_tasks_index = len(frame)
        return new

    def fetch_running_tasks(self) -> pd.DataFrame:
        """Tasks a worker holds right now (read from the running set only)."""
        return self._frame(self._fetch_snapshots([self.keys.running], "set"))

    def fetch_queued_tasks(self) -> pd.DataFrame:
        """Tasks waiting in the shared queue, in the order they will be popped."""
        return self._frame(self._fetch_snapshots([self.keys.queued], "list"))

    def fetch_priority_tasks(self) -> pd.DataFrame:
        """Tasks waiting in the workers' priority queues."""
        return self._frame(self._fetch_snapshots(self._priority_queues(), "list"))

    def _priority_queues(self) -> list[str]:
        return [self.keys.priority(text(worker_id)) for worker_id in sorted(self.redis.smembers(self.keys.priority_workers))]

    def fetch_failed_tasks(self) -> pd.DataFrame:
        """Failed tasks; the condition (e.g. ``message``) becomes columns."""
        return self._frame(self._fetch_rows(self.keys.failed, "list"))

    def fetch_tasks_with_state(self, states: Sequence[str] = TASK_STATES) -> pd.DataFrame:
        """Tasks in any of ``states`` with a ``state`` column, in creation order, no task twice.

        Read in chunks (Redis stays responsive at millions of tasks). One state is read from its
        own collection, so ``["running"]`` costs what the running tasks cost; several states are read
        from the all-tasks list with the filter applied in Redis. Each task is read once, with its
        state at the moment its chunk was read.
        """
        states = [states] if isinstance(states, str) else list(states)
        unknown = set(states) - set(TASK_STATES)
        if unknown:
            raise TaskError(f"unknown task state(s) {sorted(unknown)}; valid: {list(TASK_STATES)}")
        if states == ["running"]:
            return self._frame(self._fetch_snapshots([self.keys.running], "set", states=states), with_state=True)
        if states == ["failed"]:
            return self._frame(self._fetch_rows(self.keys.failed, "list", states=states), with_state=True)
        if states == ["queued"]:
            queues = [self.keys.queued, *self._priority_queues()]
            return self._frame(self._fetch_snapshots(queues, "list", states=states), with_state=True)
        return self._frame(self._fetch_rows(self.keys.all_tasks, "list", states=states), with_state=True)

    def fetch_tasks(self) -> pd.DataFrame:
        """Every task of the network, in creation order (read in chunks)."""
        return self._frame(self._fetch_rows(self.keys.all_tasks, "list"))

    def task_states(self, keys: str | Iterable[str]) -> dict[str, str]:
        """The state of each task key; raises ``UnknownTaskError`` for keys this network lacks."""
        keys = _key_list(keys)
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hget(self.keys.task(key), "state")
        states = pipe.execute()
        unknown = [k for k, s in zip(keys, states) if s is None]
        if unknown:
            raise UnknownTaskError(f"unknown task key(s) in network {self.network!r}: {unknown[:5]}")
        return {k: s.decode() for k, s in zip(keys, states)}

    def wait_for_tasks(self, keys: str | Iterable[str], timeout: float | None = None,
                       poll: float = 0.05, progress: bool | None = None) -> None:
        """Block until every task in ``keys`` is finished or failed.

        Never waits on what cannot happen: about once a second it checks the workers (a controller
        also detects lost ones), and raises ``NoWorkersError`` with the counts when tasks it waits for
        are queued or running but no worker is running or starting.
        ``progress``: a progress bar on stderr; None (default) shows it on a terminal only.
        """
        from . import progress as progress_display

        keys = _key_list(keys)
        deadline = None if timeout is None else time.monotonic() + timeout
        next_check = time.monotonic()
        with progress_display.tracker(total=len(keys), description="tasks", progress=progress) as bar:
            while True:
                states = self.task_states(keys)
                pending = {k: s for k, s in states.items() if s not in ("finished", "failed")}
                failed = sum(s == "failed" for s in states.values())
                bar.update(done=len(keys) - len(pending), extra=f"{failed} failed" if failed else "")
                if not pending:
                    return
                if time.monotonic() >= next_check:
                    if self._watch_workers():
                        continue  # lost workers' tasks were released: look at the states again
                    self._require_live_workers(pending, len(keys))
                    next_check = time.monotonic() + 1.0
                if deadline is not None and time.monotonic() > deadline:
                    raise RushTimeoutError(f"{len(pending)} of {len(keys)} tasks still not finished after "
                                           f"{timeout} s (e.g. {list(pending)[:3]})")
                time.sleep(poll)

    def _watch_workers(self) -> bool:
        """Hook for waits: the controller detects lost workers here; True when it found some."""
        return False

    def _require_live_workers(self, pending: Mapping[str, str], n_waited: int) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.scard(self.keys.worker_state_set("running"))
        pipe.scard(self.keys.worker_state_set("launched"))
        pipe.scard(self.keys.workers)
        pipe.hmget(self.keys.adapt, "status", "updated_at", "interval", "error")
        running_workers, starting_workers, ever, adapt = pipe.execute()
        if running_workers or starting_workers:
            return
        status, updated_at, interval, error = (text(v) if v is not None else "" for v in adapt)
        if status == "running" and _recent(updated_at, 3 * min(max(_float(interval), 0.0), 3600.0) + 10):
            return  # an elastic-workers policy is alive: it starts the next ones (a walltime gap)
        queued = sum(1 for s in pending.values() if s == "queued")
        counts = f"{len(pending)} of {n_waited} task(s) ({queued} queued, {len(pending) - queued} running)"
        if status == "error" and error:
            raise NoWorkersError(f"waiting for {counts} but no worker is running or starting, and the elastic "
                                 f"workers policy has stopped ({error[:500]})")
        if not ever:  # workers started elsewhere (worker_script, a job script) register when they come
            if not self._warned_no_workers:
                logger.warning("waiting for %s, but no worker has been started on network %s yet", counts,
                               self.network)
                self._warned_no_workers = True
            return
        raise NoWorkersError(f"waiting for {counts} but no worker is running or starting (all "
                             f"{ever} ended); start workers (start_*_workers) or see worker_info for why they ended")

    def end_worker(self, worker_id: str, state: str, allowed: Iterable[str], message: str, *,
                   client: Any = None, **fields: Any) -> tuple[str, list[str], list[str]] | None:
        """Move a worker to its final ``state`` and release what it holds, in ONE atomic step.

        Its running tasks are requeued (retries left) or failed with ``message``; its priority
        queue moves to the shared queue. Returns (previous state, failed ids, requeued ids), or None
        when its current state is not in ``allowed`` (e.g. it already ended: a re-sent call).
        """
        keys, args = self._end_worker_call(worker_id, state, allowed, message, fields)
        return _ended(self._script("END_WORKER", keys, args, client))

    def end_workers(self, ends: Sequence[tuple[str, str, Iterable[str], str, Mapping[str, Any]]]
                    ) -> dict[str, tuple[str, list[str], list[str]] | None]:
        """``end_worker`` for many workers in one pipelined pass (thousands lost at once: one round
        trip, not one per worker). ``ends``: (worker id, state, allowed, message, fields)."""
        if not ends:
            return {}
        self.redis.script_load(lua.END_WORKER)  # EVALSHA in a pipeline cannot load it on the way
        pipe = self.redis.pipeline(transaction=False)
        for worker_id, state, allowed, message, fields in ends:
            keys, args = self._end_worker_call(worker_id, state, allowed, message, fields)
            pipe.execute_command("EVALSHA", self._shas["END_WORKER"], len(keys), *keys, *args)
        results = pipe.execute(raise_on_error=False)  # one bad call must not hide the others' results
        for (worker_id, *_), result in zip(ends, results):
            if isinstance(result, Exception):
                logger.warning("could not end worker %s: %s", worker_id, result)
        return {end[0]: None if isinstance(result, Exception) else _ended(result)
                for end, result in zip(ends, results)}

    def _end_worker_call(self, worker_id: str, state: str, allowed: Iterable[str], message: str,
                         fields: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
        args: list[Any] = [state, self.keys.worker_set_prefix, worker_id, ",".join(allowed),
                           self.keys.task_prefix, self.codec.encode({"message": message})]
        for name, value in fields.items():
            args += [name, "" if value is None else str(value)]
        keys = self.keys
        return [keys.worker(worker_id), keys.workers, keys.running, keys.queued, keys.failed,
                keys.priority(worker_id), keys.priority_workers, keys.held_tasks(worker_id), keys.wake], args

    def sweep_orphaned_tasks(self, batch: int = 1000) -> tuple[list[str], list[str]]:
        """Release running tasks whose holder is not running (in any state, or without a record).

        The safety net behind ``end_worker``: whatever happened to a worker, none of its tasks stays
        running forever. Works in batches (SSCAN), so Redis is never blocked for long.
        Returns (failed ids, requeued ids).
        """
        failed: list[str] = []
        requeued: list[str] = []
        cursor: Any = 0
        while True:
            cursor, batch_failed, batch_requeued = self._script(
                "SWEEP_ORPHANED_TASKS", [self.keys.running, self.keys.queued, self.keys.failed, self.keys.wake,
                                         self.keys.priority_workers],
                [self.keys.task_prefix, self.keys.worker_prefix, cursor, batch, self.keys.priority_prefix])
            failed += [text(i) for i in batch_failed]
            requeued += [text(i) for i in batch_requeued]
            if int(cursor) == 0:
                break
        if failed or requeued:
            logger.warning("released %d task(s) held by workers that are not running: %d failed, %d requeued",
                           len(failed) + len(requeued), len(failed), len(requeued))
        return failed, requeued

    def close(self) -> None:
        """Close this client's connection(s) to Redis."""
        if self._fast is not None:
            self._fast.close()
        self.redis.close()
