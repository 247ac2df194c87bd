"""Columns of task rows to pandas frames, and the growing buffer behind the finished-task cache.

pandas is imported lazily: workers that never fetch never pay for it.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from .exceptions import TaskError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

LAST_COLUMNS = ("worker_id", "state", "keys")
_NONE = type(None)

#: Columns rush-hpc adds to every task row: a task input, result, extra or condition with one of
#: these names would be silently replaced by the library's value (and ``keys`` would shadow
#: ``DataFrame.keys()``), so they are refused.
RESERVED_COLUMNS = ("keys", "state", "worker_id")
#: ``pid`` is the worker's process id, put into every task's extra columns by the worker itself.
#: Extras may set it on purpose (they replace the worker's value); inputs and results may not.
WORKER_COLUMNS = ("pid",)
ID_COLUMNS = ("worker_id", "keys")
SHORT_ID_LENGTH = 8


def reserved_columns(what: str) -> tuple[str, ...]:
    """The names ``what`` (``xss``, ``yss``, ``extra``, ``conditions``) may not use."""
    return RESERVED_COLUMNS if "extra" in what else RESERVED_COLUMNS + WORKER_COLUMNS


def check_user_columns(dicts: Iterable[Mapping[str, Any]], what: str) -> None:
    """Refuse task dicts whose names collide with the columns rush-hpc adds to each row.

    ``what`` names the argument in the message (``xss``, ``yss``, ``extra``, ``conditions``).
    Raises ``TaskError`` naming the offending and all reserved names and the fix.
    """
    reserved = reserved_columns(what)
    for i, values in enumerate(dicts):
        if values is None or isinstance(values, Mapping) and not values:
            continue
        clash = [name for name in reserved if name in values]
        if clash:
            names = ", ".join(repr(n) for n in clash)
            raise TaskError(
                f"{what}[{i}] uses the reserved column name(s) {names}: rush-hpc adds "
                f"{', '.join(reserved)} to every task row itself. Rename yours (e.g. {clash[0]!r} -> "
                f"{clash[0] + '_'!r})")


def short_ids(frame: pd.DataFrame, columns: Sequence[str] = ID_COLUMNS,
              length: int = SHORT_ID_LENGTH) -> pd.DataFrame:
    """A copy of ``frame`` whose id columns (worker_id, keys) keep their first ``length`` characters.

    Ids are 32 hex characters; 8 are unique in practice and keep a printed frame within 80
    columns. For printing only: use the full ids to address tasks and workers.
    """
    short = frame.copy()
    for column in columns:
        if column in short.columns:
            short[column] = short[column].map(lambda v: v[:length] if isinstance(v, str) else v)
    return short


def local_offset(moment: datetime | None = None) -> str:
    """This machine's UTC offset as ``+HH:MM`` (at ``moment``, default now)."""
    aware = (moment or datetime.now()).astimezone()
    offset = aware.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def format_local(timestamp: float | None, with_date: bool = True, with_offset: bool = True) -> str:
    """A Unix timestamp as local time with its UTC offset: ``2026-11-26 08:15:02 +01:00``.

    One time zone everywhere the CLI prints a time (headers, heartbeats, logs); ``with_offset=False``
    only where the offset is already printed above (the rows of ``top``).
    """
    if timestamp is None or timestamp != timestamp:  # None or NaN
        return "-"
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc).astimezone()
    text = moment.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")
    return f"{text} {local_offset(moment)}" if with_offset else text


def to_local_times(frame: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """A copy of ``frame`` whose naive-UTC datetime ``columns`` are local, time-zone-aware times."""
    from dateutil import tz

    local = frame.copy()
    for column in columns:
        if column in local.columns and str(local[column].dtype).startswith("datetime64"):
            series = local[column]
            if series.dt.tz is None:
                series = series.dt.tz_localize("UTC")
            local[column] = series.dt.tz_convert(tz.tzlocal())
    return local


def column_order(names: Iterable[str]) -> list[str]:
    """``names`` in their order, with worker_id / state / keys moved last."""
    names = list(names)
    return [n for n in names if n not in LAST_COLUMNS] + [n for n in LAST_COLUMNS if n in names]


def infer_array(values: list[Any]) -> np.ndarray:
    """A numpy array for one column: int64, float64 (None -> NaN), bool, or object."""
    import numpy as np

    kinds = set(map(type, values))
    if kinds <= {int} and kinds:
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:
            return np.array(values, dtype=object)
    if kinds <= {int, float, _NONE} and kinds - {_NONE}:
        try:
            return np.array([math.nan if v is None else v for v in values] if _NONE in kinds else values,
                            dtype=np.float64)
        except OverflowError:  # an integer beyond the float range: keep the values as they are
            pass
    if kinds == {bool}:
        return np.array(values, dtype=bool)
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def columns_to_frame(columns: Mapping[str, list[Any]]) -> pd.DataFrame:
    """A frame of columns (name -> values, equal lengths), each as int64, float64, bool or object."""
    import pandas as pd

    if not columns:
        return pd.DataFrame(columns=["worker_id", "keys"])
    arrays = {name: infer_array(values) for name, values in columns.items()}
    return pd.DataFrame({name: pd.Series(array, dtype=array.dtype, copy=False) for name, array in arrays.items()},
                        copy=False)


def _missing(dtype: np.dtype) -> Any:
    return math.nan if dtype.kind == "f" else None


def _common(a: np.dtype, b: np.dtype) -> np.dtype:
    import numpy as np

    if a == b:
        return a
    if a.kind in "iuf" and b.kind in "iuf":
        return np.result_type(a, b)
    return np.dtype(object)


def _holding_missing(dtype: np.dtype) -> np.dtype:
    """The dtype a column needs once it has a missing value."""
    import numpy as np

    return dtype if dtype.kind in "fO" else np.dtype(np.float64) if dtype.kind in "iu" else np.dtype(object)


class FrameBuffer:
    """Columns in numpy arrays with spare capacity behind one DataFrame.

    ``frame()`` returns a view of the first n rows (rows never change once written), so adding a
    few rows costs O(new rows), not a copy of everything: the warm path of fetch_finished_tasks.
    """

    def __init__(self) -> None:
        self.n = 0
        self.capacity = 0
        self.columns: dict[str, np.ndarray] = {}
        self._frame: pd.DataFrame | None = None

    def append(self, columns: Mapping[str, list[Any]]) -> None:
        """Add rows given as columns (name -> values, equal lengths); a name earlier rows lack is
        missing there, a name these rows lack is missing in them."""
        import numpy as np

        n = len(next(iter(columns.values()))) if columns else 0
        if not n:
            return
        start, end = self.n, self.n + n
        rebuild = end > self.capacity
        if rebuild:
            self.capacity = max(1024, 2 * self.capacity, end)
            for name, buffer in self.columns.items():
                grown = np.empty(self.capacity, dtype=buffer.dtype)
                grown[:start] = buffer[:start]
                self.columns[name] = grown
        for name, column in columns.items():
            values = infer_array(column)
            if name in self.columns:
                buffer = self.columns[name]
            else:
                dtype = values.dtype if start == 0 else _holding_missing(values.dtype)
                buffer = np.empty(self.capacity, dtype=dtype)
                if start:
                    buffer[:start] = _missing(dtype)
                rebuild = True
            target = _common(buffer.dtype, values.dtype)
            if target != buffer.dtype:
                buffer = buffer.astype(target)
                rebuild = True
            buffer[start:end] = values
            self.columns[name] = buffer
        for name in set(self.columns) - set(columns):
            buffer = self.columns[name]
            dtype = _holding_missing(buffer.dtype)
            if dtype != buffer.dtype:
                buffer = self.columns[name] = buffer.astype(dtype)
                rebuild = True
            buffer[start:end] = _missing(dtype)
        self.n = end
        if rebuild or self._frame is None:
            self._rebuild()

    def _rebuild(self) -> None:
        import pandas as pd

        order = column_order(self.columns)
        # explicit dtypes: pandas would otherwise copy object columns of strings into its str dtype,
        # and the frame would stop seeing rows written into the buffers later
        self._frame = pd.DataFrame({name: pd.Series(self.columns[name], dtype=self.columns[name].dtype,
                                                    copy=False) for name in order}, copy=False)

    def frame(self) -> pd.DataFrame:
        import pandas as pd

        if self._frame is None:
            return pd.DataFrame(columns=["worker_id", "keys"])
        view = self._frame.iloc[:self.n]
        # a view is safe to hand out only under copy-on-write (always on from pandas 3)
        copy_on_write = int(pd.__version__.split(".")[0]) >= 3 or pd.options.mode.copy_on_write is True
        return view if copy_on_write else view.copy()
