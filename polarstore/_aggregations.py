"""Windowed aggregations: definitions, validation and the offline point-in-time query.

An :class:`AggregationView` aggregates the raw events of a source :class:`FeatureView` over
sliding windows ending (``forward=False``) or starting (``forward=True``) at each spine time:
``(t - window, t]`` or ``(t, t + window]``, exactly — no tiles, no hops.

The offline query never compares every spine row with every event. The events of the read
range come in tie order; a stable counting sort by key makes each key's events a run of
positions, and a binary search per spine row and window edge turns every window into a
range ``[start, end)`` of positions (``_positions``). Each aggregate is then computed over
those ranges (``_Ranked``): counts and integer sums as differences of running totals,
everything else by a compiled loop over each range's events (``_kernels``, numba).
The online state (``_windows``) answers the same question per entity.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa

from polarstore._definitions import (
    FeatureView,
    _check_tags,
    _check_text,
    check_column,
    check_name,
)
from polarstore._errors import NotFoundError, SchemaError, ValidationError, did_you_mean
from polarstore._sorting import packed_sort

if TYPE_CHECKING:  # the registry imports this module, and the offline store the registry
    from polarstore._offline import OfflineStore

__all__ = [
    "FUNCTIONS",
    "Aggregation",
    "AggregationView",
    "aggregated_rows",
    "aggregation_view_from_json",
    "aggregation_view_to_json",
    "describe_aggregation",
    "parse_window",
    "table_of",
    "window_features",
    "window_label",
]

Function = Literal[
    "count", "sum", "mean", "min", "max", "std", "var", "first", "last", "count_distinct"
]
FUNCTIONS: tuple[str, ...] = (
    "count",
    "sum",
    "mean",
    "min",
    "max",
    "std",
    "var",
    "first",
    "last",
    "count_distinct",
)
_US = timedelta(microseconds=1)
_UNITS_US = {
    "w": 7 * 86_400_000_000,
    "d": 86_400_000_000,
    "h": 3_600_000_000,
    "m": 60_000_000,
    "s": 1_000_000,
    "ms": 1_000,
    "us": 1,
    "µs": 1,
}
# Largest first, for names: a week is written in days (``7d``), as the names are.
_LABEL_UNITS = (("d", 86_400_000_000), ("h", 3_600_000_000), ("m", 60_000_000))
_LABEL_SMALL = (("s", 1_000_000), ("ms", 1_000), ("us", 1))
_CALENDAR = {"mo", "q", "y", "i"}
_PART = re.compile(r"(\d+)(ns|us|µs|ms|mo|[wdhmsqyi])")

_INTS = {"Int8", "Int16", "Int32", "Int64"}
_FLOATS = {"Float32", "Float64"}
_NUMERIC = _INTS | _FLOATS | {"Boolean"}
_ORDERED = _INTS | _FLOATS | {"Boolean", "String", "Date", "Datetime(us)", "Datetime(us, UTC)"}
# Which column dtypes (as ``str(dtype)``-like text) each function accepts.
_ACCEPTS: dict[str, set[str] | None] = {
    "count": None,  # any dtype: non-null values are counted
    "sum": _NUMERIC,
    "mean": _NUMERIC,
    "std": _NUMERIC,
    "var": _NUMERIC,
    "min": _ORDERED,
    "max": _ORDERED,
    "first": _ORDERED | {"Binary"},
    "last": _ORDERED | {"Binary"},
    "count_distinct": _ORDERED | {"Binary"},
}


def _dtype_text(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.Datetime):
        return "Datetime(us, UTC)" if dtype.time_zone else "Datetime(us)"
    if isinstance(dtype, pl.List):
        return "List"
    return str(dtype)


def parse_window(value: object, *, where: str) -> timedelta:
    """A window as a positive ``timedelta``: a ``timedelta`` or a Polars duration string.

    Calendar units (``mo``, ``q``, ``y``) have no fixed length and are refused, as are windows
    that are not a whole number of microseconds (polarstore's time resolution).

    >>> parse_window("1d12h", where="x")
    datetime.timedelta(days=1, seconds=43200)
    >>> parse_window("1mo", where="x")
    Traceback (most recent call last):
    ...
    polarstore._errors.ValidationError: x: window '1mo' uses the calendar unit 'mo', ...
    """
    if isinstance(value, timedelta):
        window = value
    elif isinstance(value, str):
        text = value.strip()
        parts = _PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            msg = (
                f"{where}: window {value!r} is not a duration; give a datetime.timedelta or a "
                "Polars duration string such as '30m', '1h', '7d' or '1d12h'."
            )
            raise ValidationError(msg)
        calendar = [u for _, u in parts if u in _CALENDAR]
        if calendar:
            msg = (
                f"{where}: window {value!r} uses the calendar unit {calendar[0]!r}, which has no "
                "fixed length; give the window in weeks, days, hours, ... ('30d', not '1mo')."
            )
            raise ValidationError(msg)
        ns = sum(int(n) * (1 if u == "ns" else _UNITS_US[u] * 1000) for n, u in parts)
        if ns % 1000:
            msg = (
                f"{where}: window {value!r} is not a whole number of microseconds, "
                "polarstore's time resolution."
            )
            raise ValidationError(msg)
        window = timedelta(microseconds=ns // 1000)
    else:
        msg = (
            f"{where}: window must be a datetime.timedelta or a Polars duration string such "
            f"as '7d', got {type(value).__name__} {value!r}."
        )
        raise ValidationError(msg)
    if window <= timedelta(0):
        msg = (
            f"{where}: window must be positive, got {value!r}; a window (t - w, t] of length "
            "0 holds no event."
        )
        raise ValidationError(msg)
    return window


def window_label(window: timedelta) -> str:
    """A window as a Polars duration string, as used in feature names.

    >>> window_label(timedelta(days=7)), window_label(timedelta(hours=36))
    ('7d', '1d12h')
    >>> window_label(timedelta(seconds=90, microseconds=5))
    '1m30s5us'
    """
    us = window // _US
    text = ""
    for unit, size in (*_LABEL_UNITS, *_LABEL_SMALL):
        n, us = divmod(us, size)
        if n:
            text += f"{n}{unit}"
    return text


@dataclass(frozen=True)
class Aggregation:
    """One windowed aggregate of a source column: ``function`` over the last ``window``.

    Parameters
    ----------
    column
        The source view's feature to aggregate; ``None`` with ``function="count"`` counts
        rows (events).
    function
        count, sum, mean, min, max, std, var (sample: ddof=1), first, last (non-null values,
        by event time, created time, write order) or count_distinct. Nulls are ignored; an
        empty window gives 0 for counts and null otherwise.
    window
        A positive ``timedelta`` or a Polars duration string (``"1h"``, ``"7d"``).
    name
        The output feature name; default ``f"{column}_{function}_{window}"`` (``window``
        written as a duration string, e.g. ``amount_sum_7d``), or ``f"count_{window}"``.
    forward
        ``True`` aggregates over ``(t, t + window]``: a training label, offline only.

    Examples
    --------
    >>> Aggregation("amount", "sum", "7d").name
    'amount_sum_7d'
    >>> Aggregation(None, "count", timedelta(hours=36)).name
    'count_1d12h'
    """

    column: str | None
    function: Function
    window: timedelta | str
    name: str | None = None
    forward: bool = False

    def __post_init__(self) -> None:
        where = f"aggregation {self.column!r} {self.function!r}"
        if self.function not in FUNCTIONS:
            msg = (
                f"{where}: unknown function {self.function!r}; expected one of "
                f"{', '.join(FUNCTIONS)}." + did_you_mean(str(self.function), FUNCTIONS)
            )
            raise ValidationError(msg)
        if self.column is None:
            if self.function != "count":
                msg = (
                    f"{where}: column=None counts rows and goes only with function='count'; "
                    f"name the column to {self.function}."
                )
                raise ValidationError(msg)
        else:
            check_column(self.column, what=f"column of {where}")
        window = parse_window(self.window, where=where)
        label = self.window if isinstance(self.window, str) else window_label(window)
        object.__setattr__(self, "window", window)
        if not isinstance(self.forward, bool):
            msg = f"{where}: forward must be True or False, got {self.forward!r}."
            raise ValidationError(msg)
        if self.name is None:
            label = label.strip().replace("µs", "us")
            default = f"{self.column}_{self.function}_{label}" if self.column else f"count_{label}"
            object.__setattr__(self, "name", default)
        check_column(self.name, what=f"output name of {where}")

    @property
    def span(self) -> timedelta:
        return self.window  # type: ignore[return-value]

    @property
    def feature(self) -> str:
        return self.name  # type: ignore[return-value]

    def output_dtype(self, source: FeatureView) -> pl.DataType:
        if self.function in ("count", "count_distinct"):
            return pl.Int64()
        dtype = source.schema[self.column]  # type: ignore[index]
        if self.function == "sum":
            return pl.Float64() if _dtype_text(dtype) in _FLOATS else pl.Int64()
        if self.function in ("mean", "std", "var"):
            return pl.Float64()
        return dtype


@dataclass(frozen=True)
class AggregationView:
    """Features that aggregate a source view's raw events over sliding time windows.

    Parameters
    ----------
    name
        Identifier-like name, unique among feature views and aggregation views.
    source
        The feature view of raw events (every stored row is one event), or its name; the
        aggregation view has its entities and keys.
    aggregations
        The :class:`Aggregation` objects; their output names must differ.
    online
        Whether ``materialize`` keeps the per-entity window state online (whatever the
        source's own ``online`` flag).

    Examples
    --------
    >>> import polars as pl
    >>> from polarstore import Entity, FeatureView
    >>> orders = FeatureView("orders", entities=Entity("user", "user_id"),
    ...                      schema={"amount": pl.Float64})
    >>> spend = AggregationView("user_spend", orders, [Aggregation("amount", "sum", "7d"),
    ...                                               Aggregation(None, "count", "30d")])
    >>> spend.feature_names, spend.join_keys
    (('amount_sum_7d', 'count_30d'), ('user_id',))
    """

    name: str
    source: str | FeatureView
    aggregations: Sequence[Aggregation]
    online: bool = True
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        check_name(self.name, what="aggregation view")
        where = f"aggregation view {self.name!r}"
        if isinstance(self.source, str):
            check_name(self.source, what=f"source of {where}")
        elif not isinstance(self.source, FeatureView):
            msg = (
                f"{where}: source must be a FeatureView of raw events or its name, got "
                f"{type(self.source).__name__} {self.source!r}."
            )
            raise ValidationError(msg)
        given = self.aggregations
        items = [given] if isinstance(given, Aggregation) else given
        if not isinstance(items, Iterable) or isinstance(items, (str, bytes)):
            items = [items]
        aggregations = tuple(items)
        if not aggregations or not all(isinstance(a, Aggregation) for a in aggregations):
            msg = f"{where}: aggregations must be a non-empty list of Aggregation objects."
            raise ValidationError(msg)
        seen: dict[str, Aggregation] = {}
        for agg in aggregations:
            if agg.feature in seen:
                msg = (
                    f"{where}: two aggregations have the output name {agg.feature!r}; pass "
                    "name= to one of them."
                )
                raise ValidationError(msg)
            seen[agg.feature] = agg
        object.__setattr__(self, "aggregations", aggregations)
        if not isinstance(self.online, bool):
            msg = f"{where}: online must be True or False, got {self.online!r}."
            raise ValidationError(msg)
        _check_text(self.description, what=f"description of {where}")
        _check_text(self.owner, what=f"owner of {where}")
        object.__setattr__(self, "tags", _check_tags(self.tags, owner=where))
        if isinstance(self.source, FeatureView) and self.source.resolved:
            self._check_source(self.source)

    def _check_source(self, source: FeatureView) -> None:
        where = f"aggregation view {self.name!r}"
        for agg in self.aggregations:
            if agg.column is None:
                continue
            if agg.column not in source.schema:
                what = (
                    "is a join key or timestamp, not a feature"
                    if agg.column
                    in (*source.join_keys, source.timestamp_field, source.created_timestamp_field)
                    else "is not a feature of it"
                )
                msg = (
                    f"{where}, aggregation {agg.feature!r}: column {agg.column!r} {what} "
                    f"(source view {source.name!r} has {list(source.schema)})."
                    + did_you_mean(agg.column, source.schema)
                )
                raise NotFoundError(msg)
            dtype = source.schema[agg.column]
            accepted = _ACCEPTS[agg.function]
            if accepted is not None and _dtype_text(dtype) not in accepted:
                fits = [f for f, a in _ACCEPTS.items() if a is None or _dtype_text(dtype) in a]
                msg = (
                    f"{where}, aggregation {agg.feature!r}: {agg.function} does not apply to "
                    f"column {agg.column!r} of dtype {dtype}; for {dtype} use one of {fits}."
                )
                raise SchemaError(msg)
        clash = [a.feature for a in self.aggregations if a.feature in source.join_keys]
        if clash:
            msg = f"{where}: output name(s) {clash} are join keys of the source; rename them."
            raise SchemaError(msg)

    @property
    def resolved(self) -> bool:
        return isinstance(self.source, FeatureView) and self.source.resolved

    @property
    def source_view(self) -> FeatureView:
        if not self.resolved:
            msg = (
                f"aggregation view {self.name!r} names its source {self.source!r}; it is known "
                "once the view is applied (FeatureStore.apply)."
            )
            raise ValidationError(msg)
        return self.source  # type: ignore[return-value]

    @property
    def source_name(self) -> str:
        return self.source if isinstance(self.source, str) else self.source.name

    def resolve(self, views: Mapping[str, FeatureView]) -> AggregationView:
        """This view with its source (given by name, or re-applied) replaced by the registered
        view of that name, checked against it."""
        name = self.source_name
        if name not in views:
            msg = (
                f"aggregation view {self.name!r} names the source {name!r}, which is no feature "
                "view registered or in this apply." + did_you_mean(name, views)
            )
            raise NotFoundError(msg)
        source = views[name]
        self._check_source(source)
        if self.source is source:
            return self
        return dataclasses.replace(self, source=source)

    # What retrieval and the online store read off any view.
    @property
    def join_keys(self) -> tuple[str, ...]:
        return self.source_view.join_keys

    @property
    def key_dtypes(self) -> dict[str, pl.DataType]:
        return self.source_view.key_dtypes

    @property
    def entity_names(self) -> tuple[str, ...]:
        return self.source_view.entity_names

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(a.feature for a in self.aggregations)

    @property
    def schema(self) -> dict[str, pl.DataType]:
        source = self.source_view
        return {a.feature: a.output_dtype(source) for a in self.aggregations}

    def aggregation(self, feature: str) -> Aggregation:
        for agg in self.aggregations:
            if agg.feature == feature:
                return agg
        msg = f"aggregation view {self.name!r} has no feature {feature!r}."
        raise NotFoundError(msg + did_you_mean(feature, self.feature_names))


def table_of(view: FeatureView | AggregationView) -> str:
    """The Delta table a view reads: its own, or its source's (pins are per table)."""
    return view.source_name if isinstance(view, AggregationView) else view.name


# --- registry JSON --------------------------------------------------------------------------


def aggregation_view_to_json(view: AggregationView) -> dict[str, Any]:
    return {
        "source": view.source_name,
        "aggregations": [
            {
                "column": a.column,
                "function": a.function,
                "window_microseconds": a.span // _US,
                "name": a.feature,
                "forward": a.forward,
            }
            for a in view.aggregations
        ],
        "online": view.online,
        "description": view.description,
        "owner": view.owner,
        "tags": view.tags,
    }


def aggregation_view_from_json(
    name: str, doc: dict[str, Any], views: Mapping[str, FeatureView]
) -> AggregationView:
    aggregations = [
        Aggregation(
            a["column"],
            a["function"],
            timedelta(microseconds=a["window_microseconds"]),
            name=a["name"],
            forward=a["forward"],
        )
        for a in doc["aggregations"]
    ]
    view = AggregationView(
        name,
        doc["source"],
        aggregations,
        online=doc["online"],
        description=doc["description"],
        owner=doc["owner"],
        tags=doc["tags"],
    )
    return view.resolve(views)


# --- offline: the windowed point-in-time query ----------------------------------------------

_ROW = "__polarstore_row"
_TS = "__polarstore_ts"


def _bound(moment: datetime, delta: timedelta) -> datetime | None:
    try:
        return moment + delta
    except OverflowError:
        return None


def window_features(
    events: pl.LazyFrame | None,
    spine: pl.DataFrame,
    view: AggregationView,
    features: Sequence[tuple[str, str]],
    keys: Sequence[str],
) -> pl.DataFrame:
    """Every requested aggregate for every spine row: ``_ROW`` then one column per output.

    ``spine`` holds ``_ROW`` (ascending), ``_TS`` (no nulls) and the key columns ``keys``;
    ``events`` the source's rows in tie-breaking order with the same key columns, ``_TS``
    and the aggregated columns (``None``: no data). ``features`` pairs a feature with its
    output.
    """
    schema = view.schema
    aggs = [(view.aggregation(f), out) for f, out in features]
    columns = list(dict.fromkeys(a.column for a, _ in aggs if a.column is not None))
    key_list = list(keys)
    if events is None:
        frame = pl.DataFrame(
            schema={
                **{k: spine.schema[k] for k in key_list},
                _TS: pl.Int64(),
                **{c: view.source_view.schema[c] for c in columns},
            }
        )
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        # The first query of a process loads numba (~0.5 s): beside the scan, which runs in
        # Polars without the GIL.
        loading = pool.submit(_load_kernels)
        if events is not None:
            frame = events.with_columns(pl.col(_TS).cast(pl.Int64)).collect(engine="in-memory")
        loading.result()
        times = _int64(spine[_TS].cast(pl.Int64))
        values = _aggregates(frame, spine.select(key_list), times, key_list, aggs, schema, pool)
    out = spine.select(pl.col(_ROW))
    return out.with_columns(values[o].alias(o) for _, o in features)


def _load_kernels() -> None:
    from polarstore import _kernels

    _kernels.warm()


def _aggregates(
    frame: pl.DataFrame,
    spine_keys: pl.DataFrame,
    times: np.ndarray,
    keys: list[str],
    aggs: list[tuple[Aggregation, str]],
    schema: Mapping[str, pl.DataType],
    pool: ThreadPoolExecutor,
) -> dict[str, pl.Series]:
    """Each output of ``aggs`` for the spine rows, in their order."""
    edges = sorted({0, *(-(a.span // _US) if not a.forward else a.span // _US for a, _ in aggs)})
    order, perm, position = _positions(frame, spine_keys, times, keys, edges, pool)
    back = np.empty_like(perm)  # rows are computed in key order: the place of each row
    back[perm] = np.arange(perm.size)
    ranked = _Ranked(frame, order, back)

    def compute(group: list[tuple[Aggregation, str]]) -> dict[str, pl.Series]:
        values = {}
        for agg, output in group:
            w = agg.span // _US
            start, end = (position[0], position[w]) if agg.forward else (position[-w], position[0])
            values[output] = ranked.aggregate(agg, start, end).cast(schema[agg.feature])
        return values

    # One task per column (they share its arrays); the kernels release the GIL, so two
    # threads run on two cores. The heaviest columns go first.
    by_column: dict[str | None, list[tuple[Aggregation, str]]] = {}
    for agg, output in aggs:
        by_column.setdefault(agg.column, []).append((agg, output))
    groups = sorted(by_column.values(), key=_weight, reverse=True)
    values: dict[str, pl.Series] = {}
    for done in pool.map(compute, groups):
        values.update(done)
    return values


_THREADS = min(2, os.cpu_count() or 1)
_COST = {"count": 1, "first": 1, "last": 1, "sum": 2, "mean": 2, "min": 2, "max": 2}
# Shifts beyond this many µs reach past every representable time either way; clamping keeps
# the kernels' ``time + shift`` inside an int64.
_SHIFT_LIMIT = 2**62


def _weight(group: list[tuple[Aggregation, str]]) -> int:
    """A rough cost of a column's aggregates: two passes (std, var) or a tally is dearer."""
    return sum(_COST.get(a.function, 4) for a, _ in group)


def _int64(series: pl.Series) -> np.ndarray:
    """A Series without nulls as a contiguous int64 array (the kernels' signature)."""
    return np.ascontiguousarray(series.to_numpy(), dtype=np.int64)


def _positions(
    frame: pl.DataFrame,
    spine_keys: pl.DataFrame,
    times: np.ndarray,
    keys: list[str],
    edges: list[int],
    pool: ThreadPoolExecutor,
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """The events in (key, tie order), the spine rows in key order, and for each of those
    rows and edge ``e`` (µs) the position of its key's first event after ``t + e``.

    The frame's rows are in tie order, so a stable counting sort by dense key code
    (``_kernels.key_order``) puts each key's events in a run of positions with ascending
    times, and an edge is one binary search inside the run (``_kernels.window_edges``).
    Returns ``order`` (the row of ``frame`` at each position), ``perm`` (the spine row at
    each place, in key order: so the windows' events are read in memory order) and the
    positions per edge, by place. A spine row whose key has no event gets ``[0, 0)``.
    """
    from polarstore import _kernels  # numba loads on the first aggregation, not on import

    key_ev, low, code_sp, n_codes = _codes(frame, spine_keys, keys)
    order, offsets, ordered_times = _kernels.key_order(
        key_ev, low, n_codes, _int64(frame[_TS]), pool, _THREADS
    )
    packed, bits = packed_sort(code_sp + 1)
    perm = (packed & np.uint64((1 << bits) - 1)).view(np.int64)
    shifts = np.array([max(-_SHIFT_LIMIT, min(e, _SHIFT_LIMIT)) for e in edges], np.int64)
    found = np.empty((len(edges), times.size), np.int64)
    args = (ordered_times, offsets, code_sp[perm], times[perm], shifts)
    parts = _kernels.split(times.size, _THREADS)
    list(pool.map(lambda rows: _kernels.window_edges(*args, *rows, found), parts))
    return order, perm, dict(zip(edges, found, strict=True))


def _codes(
    frame: pl.DataFrame, spine_keys: pl.DataFrame, keys: list[str]
) -> tuple[np.ndarray, int, np.ndarray, int]:
    """Dense int64 codes of the events' keys (as ``values - low``: returns both), of the
    spine's keys (-1: a key with no event), and how many codes there are (at most a few per
    event: the counting sort's table)."""
    if len(keys) == 1 and frame.schema[keys[0]].is_integer() and frame.height:
        column = frame[keys[0]]
        low, high = int(column.min()), int(column.max())  # type: ignore[arg-type]
        if high - low < max(4 * frame.height, 1 << 16):
            given = spine_keys[keys[0]]
            inside = given.is_between(low, high).fill_null(False)
            code = pl.select(pl.when(inside).then(given.cast(pl.Int64) - low).otherwise(-1))
            return (
                _int64(column.cast(pl.Int64)),
                low,
                _int64(code.to_series()),
                high - low + 1,
            )
    codes = frame.select(keys).unique().with_row_index("__code")
    code_ev = frame.select(keys).join(codes, on=keys, how="left", maintain_order="left")
    code_sp = spine_keys.join(codes, on=keys, how="left", maintain_order="left")
    return (
        _int64(code_ev["__code"].cast(pl.Int64)),
        0,
        _int64(code_sp["__code"].cast(pl.Int64).fill_null(-1)),
        codes.height,
    )


class _Ranked:
    """The read events in (key, tie order), and each aggregate over ranges of positions.

    Counts and integer sums are differences of running totals (integer sums wrap as Polars'
    do, so the difference is the window's own wrapped sum); everything else is a compiled
    loop over each range (``_kernels``): float sums, extremes, first/last (the nearest
    non-null position), std/var (two passes) and count_distinct (a tally of dense value
    codes). Per-column arrays are built once, in the frame's order by Polars and put in
    position order by numpy, and shared by every window.
    """

    def __init__(self, frame: pl.DataFrame, order: np.ndarray, back: np.ndarray) -> None:
        self._frame = frame
        self._order = order
        self._back = back
        self._cache: dict[tuple[str, str], Any] = {}
        from polarstore import _kernels

        self._kernels = _kernels

    def _array(self, column: str, what: str, build: Callable[[pl.Series], pl.Series]) -> np.ndarray:
        """``build(column)`` as a numpy array in position order (built once)."""
        key = (column, what)
        if key not in self._cache:
            self._cache[key] = build(self._frame[column]).to_numpy()[self._order]
        return self._cache[key]  # type: ignore[no-any-return]

    def present(self, name: str) -> np.ndarray:
        if not self._frame[name].null_count():
            if ("", "present") not in self._cache:
                self._cache["", "present"] = np.ones(self._frame.height, dtype=np.bool_)
            return self._cache["", "present"]  # type: ignore[no-any-return]
        return self._array(name, "present", pl.Series.is_not_null)

    def _running(self, values: np.ndarray) -> np.ndarray:
        total = np.zeros(values.size + 1, dtype=np.int64)
        np.cumsum(values, out=total[1:])
        return total

    def aggregate(self, agg: Aggregation, start: np.ndarray, end: np.ndarray) -> pl.Series:
        fn = agg.function
        if agg.column is None:
            return self._series(end - start)
        name = agg.column
        dtype = self._frame.schema[name]
        if self._frame[name].null_count():
            counts = self._running_count(name)
            count = counts[end] - counts[start]
        else:
            count = end - start
        if fn == "count":
            return self._series(count)
        if fn == "count_distinct":
            codes, n_values = self._value_codes(name)
            return self._series(self._kernels.window_distinct(codes, n_values, start, end))
        some = count > 0
        if not some.any():  # also when there is no event to gather from
            return pl.repeat(None, count.size, dtype=dtype, eager=True)
        present = self.present(name)
        if fn in ("first", "last"):
            at = self._kernels.window_nearest(present, start, end, fn == "first")
            return self._picked(self._frame[name], self._order[np.where(some, at, 0)], some)
        if fn in ("min", "max"):
            return self._extreme(name, dtype, start, end, some, largest=fn == "max")
        if fn == "sum" and not dtype.is_float():
            x = self._array(name, "int64", lambda s: _physical(s).fill_null(0))
            running = self._running(x)
            return self._series(running[end] - running[start], some)
        x = self._array(name, "floats", lambda s: s.cast(pl.Float64).fill_null(0.0))
        if fn == "sum":
            return self._series(self._kernels.window_sum(x, start, end), some)
        if fn == "mean":
            mean = self._kernels.window_sum(x, start, end) / np.maximum(count, 1)
            return self._series(mean, some)
        var = self._kernels.window_var(x, present, start, end)
        return self._series(np.sqrt(var) if fn == "std" else var, count > 1)

    def _series(self, values: np.ndarray, keep: np.ndarray | None = None) -> pl.Series:
        """``values`` (int64 or float64, in key order: numpy's layout is Arrow's for those)
        as a Series in the spine's order, null where not ``keep``."""
        placed = values[self._back]
        # From buffers: pa.array(values, mask=...) probes for pandas (an import on first use).
        valid = (
            None if keep is None else pa.py_buffer(np.packbits(keep[self._back], bitorder="little"))
        )
        dtype = pa.from_numpy_dtype(placed.dtype)
        return pl.Series(pa.Array.from_buffers(dtype, placed.size, [valid, pa.py_buffer(placed)]))

    def _picked(self, source: pl.Series, rows: np.ndarray, keep: np.ndarray) -> pl.Series:
        """``source``'s values at ``rows`` (in key order), in the spine's order, null where
        not ``keep`` (a null index picks a null)."""
        return source.gather(self._series(rows, keep))

    def _running_count(self, name: str) -> np.ndarray:
        key = (name, "running count")
        if key not in self._cache:
            present = self._frame[name].is_not_null().to_numpy()
            self._cache[key] = self._kernels.running_count(present, self._order)
        return self._cache[key]  # type: ignore[no-any-return]

    def _extreme(
        self,
        name: str,
        dtype: pl.DataType,
        start: np.ndarray,
        end: np.ndarray,
        some: np.ndarray,
        *,
        largest: bool,
    ) -> pl.Series:
        present = self.present(name)
        if dtype.is_float():
            x = self._array(name, "floats", lambda s: s.cast(pl.Float64).fill_null(0.0))
            return self._series(
                self._kernels.window_extreme(x, present, start, end, largest, np.nan),
                some,
            )
        if dtype == pl.String:
            # A string's rank is where it first appears in the sorted column: reduce ranks.
            ranks = self._array(
                name, "ranks", lambda s: (s.rank("min") - 1).cast(pl.Int64).fill_null(0)
            )
            at = self._kernels.window_extreme(ranks, present, start, end, largest, 0)
            return self._picked(self._frame[name].sort(nulls_last=True), at, some)
        x = self._array(name, "int64", lambda s: _physical(s).fill_null(0))
        best = self._kernels.window_extreme(x, present, start, end, largest, 0)
        return self._series(best, some).cast(dtype)

    def _value_codes(self, name: str) -> tuple[np.ndarray, int]:
        """The column as dense codes in position order (-1: null) and how many there are;
        NaN equals NaN and 0.0 equals -0.0, as in ``n_unique``."""
        key = (name, "codes")
        if key not in self._cache:
            series = _physical(self._frame[name])
            n = series.len()
            if series.dtype.is_integer() and series.null_count() < n:
                low, high = int(series.min()), int(series.max())  # type: ignore[arg-type]
                dense = high - low < max(4 * n, 1 << 16)
            else:
                dense = False
            if dense:
                values, n_values = series.fill_null(low), high - low + 1
            else:
                low, values = 0, (series.rank("dense").cast(pl.Int64) - 1).fill_null(-1)
                n_values = int(values.max() or 0) + 1  # type: ignore[operator]
            codes = self._kernels.shifted(_int64(values), self._order, low)
            if dense and series.null_count():
                codes[~self.present(name)] = -1
            self._cache[key] = (codes, n_values)
        return self._cache[key]  # type: ignore[no-any-return]


def _physical(series: pl.Series) -> pl.Series:
    """Integers, booleans and temporal values as Int64 (same order); anything else as is."""
    if series.dtype.is_integer() or series.dtype.is_temporal() or series.dtype == pl.Boolean:
        return series.to_physical().cast(pl.Int64)
    return series


def aggregated_rows(
    offline: OfflineStore,
    view: AggregationView,
    features: Sequence[tuple[str, str]],
    keys: Sequence[str],
    version: int | None,
    spine: pl.DataFrame,
    *,
    empty: bool,
) -> pl.DataFrame:
    """:func:`window_features` over the source's rows in ``[min spine - largest backward
    window, max spine + largest forward window]``, reading only the needed columns.

    ``keys`` name the spine's key columns (cast to the source's key dtypes), in the order of
    the source's join keys; ``empty`` means the pinned source had no commit yet.
    """
    source = view.source_view
    aggs = [view.aggregation(f) for f, _ in features]
    columns = list(dict.fromkeys(a.column for a in aggs if a.column is not None))
    events = None
    if not empty and spine.height:
        lo, hi = spine[_TS].min(), spine[_TS].max()
        assert isinstance(lo, datetime)
        assert isinstance(hi, datetime)
        back = [a.span for a in aggs if not a.forward]
        ahead = [a.span for a in aggs if a.forward]
        since = _bound(lo, -max(back)) if back else lo
        until = _bound(hi, max(ahead)) if ahead else hi
        scan = offline.scan(
            source,
            version=version,
            columns=[*source.join_keys, source.timestamp_field, *columns],
            since=since,
            until=until,
            ordered=True,
        )
        if scan is not None:
            events = scan.select(
                *[pl.col(k).alias(t) for k, t in zip(source.join_keys, keys, strict=True)],
                pl.col(source.timestamp_field).alias(_TS),
                *[pl.col(c).cast(source.schema[c]) for c in columns],
            )
    return window_features(events, spine, view, features, keys)


def describe_aggregation(view: AggregationView, online: Mapping[str, Any]) -> dict[str, Any]:
    """What ``FeatureStore.describe`` shows of an aggregation view (``online``: sync state)."""
    return {
        "name": view.name,
        "kind": "aggregation",
        "source": view.source_name,
        "entities": list(view.entity_names),
        "join_keys": list(view.join_keys),
        "schema": view.schema,
        "aggregations": [
            {
                "name": a.feature,
                "column": a.column,
                "function": a.function,
                "window": a.span,
                "forward": a.forward,
            }
            for a in view.aggregations
        ],
        "online": view.online,
        "description": view.description,
        "owner": view.owner,
        "tags": dict(view.tags or {}),
        "materialized_version": online.get("version"),
        "materialized_at": online.get("materialized_at"),
    }
