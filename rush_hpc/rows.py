"""Task rows as Redis returns them (JSON records) to columns: the one decoder of task rows.

A record is ``[id, xs, ys, xs_extra, ys_extra, condition, worker_id, state]`` (a finished row may
carry a 9th field: the positions of its signed pickles). Each row is decoded on its own (orjson
where it reads exactly as json does), then turned into columns, never into one dict per row: a
fetch of 100k finished tasks spends its time decoding JSON, not in Python loops. Records come from
Redis, which is untrusted: every shape is checked, and a malformed record is reported and left out
rather than breaking the fetch.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import threading
from types import ModuleType
from typing import Any, Iterator, Sequence

from .frames import LAST_COLUMNS, column_order

logger = logging.getLogger(__name__)

_orjson: ModuleType | None
try:
    import orjson as _orjson
except ImportError:  # a platform without its wheels: the standard json module decodes everything
    _orjson = None

#: text with digits as "0", "." and "-" kept, everything else a space. orjson reads an integer exactly
#: from -2**63 to 2**64 - 1 and makes a float of anything longer: 20 digits (not a fraction's: those
#: follow a ".") or "-" and 19 digits may be such a number (or a string, an exponent: json reads
#: those then, just as well). translate + find: ~1 ms per MB; a regular expression takes 10x longer.
_NUMBER_SHAPE = bytes(ord("0") if ord("0") <= c <= ord("9") else c if c in b".-" else ord(" ") for c in range(256))
_LONG_POSITIVE, _LONG_NEGATIVE = b" " + b"0" * 20, b"-" + b"0" * 19
#: a row orjson and json may disagree on by depth: orjson reads 1024 levels, json fewer (its
#: recursion limit, ~1000 minus the caller's stack). A row of fewer than 2 * _DEEP bytes or with
#: fewer than _DEEP opening brackets nests less than _DEEP levels; json reads the others.
_DEEP = 256

#: the value fields of a record, at positions 1..5 (the names of the task hash's fields)
VALUE_FIELDS = ("xs", "ys", "xs_extra", "ys_extra", "condition")
RECORD_WIDTH = 8
_WORKER_ID, _STATE = 6, 7

Record = list[Any]
Columns = dict[str, list[Any]]


_pause_lock = threading.Lock()
_pauses = 0
_collecting_before = True


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while decoded rows exist: they are many objects and no
    cycles, and a collection over them only costs time. Nested and concurrent pauses (threads that
    fetch at once) share one pause: the first one in stops the collector, the last one out restores
    what the first found (a caller that disabled the collector keeps it disabled)."""
    global _pauses, _collecting_before
    with _pause_lock:
        if _pauses == 0:
            _collecting_before = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _collecting_before:
                gc.enable()


def _refs_well_formed(record: Record, width: int) -> bool:
    """The extra field of a finished row: the positions (1..4: xs, ys and their extras; a finished
    task has no condition) of its signed pickles."""
    refs = record[width]
    return type(refs) is list and all(type(p) is int and 1 <= p <= 4 for p in refs)


def _well_formed(record: Any, width: int, with_refs: bool) -> bool:
    """A row of ``width`` fields whose id is a string; finished rows (``with_refs``) may carry a
    ``width + 1``-th field: the positions of their signed pickles."""
    if type(record) is not list or not record or type(record[0]) is not str:
        return False
    if len(record) == width:
        return True
    return with_refs and len(record) == width + 1 and _refs_well_formed(record, width)


def _all_well_formed(records: Any, width: int, with_refs: bool) -> bool:
    """``_well_formed`` for every record, checked with builtins over whole lists (no Python call
    per record unless a record carries pickle positions)."""
    if type(records) is not list or not records or set(map(type, records)) != {list}:
        return type(records) is list and not records
    lengths = set(map(len, records))
    if not lengths <= ({width, width + 1} if with_refs else {width}):
        return False
    if set(map(type, [r[0] for r in records])) != {str}:
        return False
    return width + 1 not in lengths or all(_refs_well_formed(r, width) for r in records if len(r) > width)


def _orjson_reads_like_json(rows: Sequence[bytes]) -> bool:
    """False where orjson might read a row otherwise than json: an integer beyond 64 bits (orjson:
    a float), a row nested deeper than json reads (orjson: kept).

    json's own depth limit depends on the caller's stack (Python's recursion limit minus the frames
    in use): called from a very deep stack, json refuses shallower rows that orjson reads. Such a
    row is kept, not reported; nothing else about it differs.
    """
    shape = b" ".join(rows).translate(_NUMBER_SHAPE)
    if shape.find(_LONG_POSITIVE) >= 0 or shape.find(_LONG_NEGATIVE) >= 0 or shape.startswith(_LONG_POSITIVE[1:]):
        return False
    return max(map(len, rows)) < 2 * _DEEP or not any(
        r.count(b"[") + r.count(b"{") >= _DEEP for r in rows if len(r) >= 2 * _DEEP)


_JSON_DECODER = json.JSONDecoder()


def _json_loads(row: bytes) -> Any:
    """json's reading of one row, as ``json.loads`` reads UTF-8 bytes, without its guess of
    UTF-16/32 from the first bytes (a row is UTF-8 or malformed)."""
    return _JSON_DECODER.decode(row.decode("utf-8", "surrogatepass"))


def loads_many(rows: Sequence[bytes]) -> list[Any]:
    """Decode each row (a JSON text) on its own: with orjson when it is installed (2-3x faster),
    with the json module where orjson could differ (see _orjson_reads_like_json) or refuses what
    json reads (NaN, Infinity, 1e400, lone surrogates). Raises ValueError or RecursionError as json
    does when a row is malformed.

    Each row alone, never the rows joined into one document: values written into Redis by someone
    else could then open a bracket in one row and close it in a later one, swallowing the rows
    between them into one well-formed record (as many records as rows, and a real task gone).
    """
    if _orjson is not None and _orjson_reads_like_json(rows):
        try:
            return list(map(_orjson.loads, rows))
        except _orjson.JSONDecodeError:
            pass
    return list(map(_json_loads, rows))


def parse_rows(raw: Sequence[bytes], width: int, what: str, *, with_refs: bool = False) -> list[Record | None]:
    """JSON rows as lists of ``width`` fields (one more: the positions of signed pickles): decoded
    in one pass (fast); when a row is malformed (non-UTF-8, bad JSON, too deep, wrong shape), one
    by one again, so that each malformed row is reported and left out (None)."""
    if not raw:
        return []
    try:
        records = loads_many(raw)
        if _all_well_formed(records, width, with_refs):
            return records
    except (ValueError, RecursionError):
        pass
    parsed: list[Record | None] = []
    for item in raw:
        try:
            record = json.loads(item.decode("utf-8", "replace"))
            if not _well_formed(record, width, with_refs):
                raise ValueError(f"expected {width} fields, the first a task id"
                                 + (" (and pickle positions)" if with_refs else ""))
        except (ValueError, RecursionError) as error:
            logger.warning("skipping a malformed row of %s (%s): %.200r", what, error, item)
            parsed.append(None)
            continue
        parsed.append(record)
    return parsed


def pickle_refs(records: Sequence[Record | None]) -> list[tuple[int, int]]:
    """``(record index, field position)`` of every signed pickle finished rows name in their 9th
    field; the field is removed (the records are left with ``RECORD_WIDTH`` fields)."""
    refs: list[tuple[int, int]] = []
    if RECORD_WIDTH + 1 not in set(map(len, filter(None, records))):
        return refs
    for i, record in enumerate(records):
        if record is not None and len(record) > RECORD_WIDTH:
            refs += [(i, int(position)) for position in record.pop()]
    return refs


def _same_names(dicts: list[dict[str, Any]]) -> Columns | None:
    """The columns of dicts that all hold the same names (the common case: one comprehension per
    column); None if they do not."""
    first = dicts[0]
    if set(map(len, dicts)) != {len(first)}:
        return None
    try:  # same size and every name of the first present: the same names
        return {name: [d[name] for d in dicts] for name in first}
    except KeyError:
        return None


def records_to_columns(records: Sequence[Record], *, with_state: bool) -> Columns:
    """Well-formed records as columns, as if each row's value fields were merged into one dict in
    order (a later field's value wins): the names in order of first appearance, row by row, then
    ``worker_id``, ``state`` (with_state), ``keys``. A name some rows lack is None there."""
    columns: Columns = {}
    if not records:
        return columns
    mixed = False
    for position in range(1, len(VALUE_FIELDS) + 1):
        values = [r[position] for r in records]
        kinds = set(map(type, values))
        if dict not in kinds:
            continue  # None (the usual extra and condition fields) or values that are no dict: no columns
        uniform = _same_names(values) if kinds == {dict} else None
        if uniform is not None:
            columns.update(uniform)
            continue
        mixed = True
        dicts = [v if type(v) is dict else {} for v in values]
        for name in dict.fromkeys(name for d in dicts for name in d):
            earlier = columns.get(name)
            if earlier is None:
                columns[name] = [d.get(name) for d in dicts]
            else:
                columns[name] = [d[name] if name in d else old for d, old in zip(dicts, earlier)]
    if mixed:  # field by field gave another order than row by row: the first row with a name places it
        first_seen = dict.fromkeys(name for r in records for values in r[1:len(VALUE_FIELDS) + 1]
                                   if type(values) is dict for name in values)
        columns = {name: columns[name] for name in first_seen}
    # a value field named like one of the library's columns (refused when written, but Redis is
    # untrusted): the library's value wins, and the column moves to its place at the end
    misplaced = any(name in columns for name in LAST_COLUMNS)
    columns["worker_id"] = [r[_WORKER_ID] for r in records]
    if with_state:
        columns["state"] = [r[_STATE] for r in records]
    columns["keys"] = [r[0] for r in records]
    return {name: columns[name] for name in column_order(columns)} if misplaced else columns
