"""Windowed aggregations: definitions, validation and the offline point-in-time query.

An :class:`AggregationView` aggregates the raw events of a source :class:`FeatureView` over
sliding windows ending (``forward=False``) or starting (``forward=True``) at each spine time:
``(t - window, t]`` or ``(t, t + window]``, exactly — no tiles, no hops.

The offline query never compares every spine row with every event. The events of the read
range are sorted by key (stable, so each key's events stay in tie order) and numbered; for
each spine row and window bound one as-of join finds the number of the first or last event
inside the window, so each window is a contiguous range of positions. The range of the
largest window is exploded once per direction and every aggregate of a smaller window masks
it (windows with the same end nest), then one ``group_by`` over the spine rows computes them
all with Polars' own aggregations. The online state (``_windows``) answers the same question
per entity.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from polarstore._definitions import (
    FeatureView,
    _check_tags,
    _check_text,
    check_column,
    check_name,
)
from polarstore._errors import NotFoundError, SchemaError, ValidationError, did_you_mean

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

_POS = "__polarstore_pos"
_ROW = "__polarstore_row"
_TS = "__polarstore_ts"
# ``code * span + time`` must fit an Int64 (a test lowers it to reach the ranks fallback).
_COMBINED_LIMIT = 2**62


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
    else:
        frame = events.with_columns(pl.col(_TS).cast(pl.Int64)).collect(engine="in-memory")
    times = spine[_TS].cast(pl.Int64)
    back = sorted({a.span // _US for a, _ in aggs if not a.forward})
    ahead = sorted({a.span // _US for a, _ in aggs if a.forward})
    edges = sorted({0, *(-w for w in back), *ahead})
    order, position = _positions(frame, spine.select(key_list), times, key_list, edges)
    rows = spine.select(pl.col(_ROW).set_sorted())
    out = rows
    for forward, windows in ((False, back), (True, ahead)):
        if not windows:
            continue
        group = [(a, o) for a, o in aggs if a.forward is forward]
        # Backward windows share their end (after the last event <= t) and start after the
        # last event <= t - w; forward ones share their start and end after t + w. Positions
        # are in (key, tie order): a window is the range [start, end).
        if forward:
            bounds = {f"__end_{w}": position[w] for w in windows}
            start, end = position[0], position[windows[-1]]
        else:
            bounds = {f"__start_{w}": position[-w] for w in windows}
            start, end = position[-windows[-1]], position[0]
        ranged = rows.with_columns(pl.int_ranges(start, end, dtype=pl.Int64).alias(_POS), **bounds)
        exploded = ranged.explode(_POS, empty_as_null=True)
        pos = exploded[_POS]
        rows_of = order.gather(pos)
        exploded = exploded.with_columns(frame[c].gather(rows_of) for c in columns)
        masks: dict[int, pl.Expr] = {}
        for w in windows:
            bound = pl.col(f"__end_{w}" if forward else f"__start_{w}")
            inside = pl.col(_POS) < bound if forward else pl.col(_POS) >= bound
            masks[w] = inside.fill_null(False)
        exprs = [_aggregate(a, o, masks[a.span // _US], schema[a.feature]) for a, o in group]
        result = exploded.group_by(_ROW, maintain_order=True).agg(exprs)
        picks = [(a, o) for a, o in group if a.function in ("first", "last")]
        result = result.with_columns(
            frame[a.column].gather(order.gather(result[o])).alias(o)  # type: ignore[index]
            for a, o in picks
        )
        out = out.hstack(result.drop(_ROW))
    return out.select(_ROW, *(pl.col(o).cast(schema[f]) for f, o in features))


def _positions(
    frame: pl.DataFrame,
    spine_keys: pl.DataFrame,
    times: pl.Series,
    keys: list[str],
    edges: list[int],
) -> tuple[pl.Series, dict[int, pl.Series]]:
    """The events in (key, tie order), and for each spine row and edge ``e`` (µs) the number
    of events before its key's first event after ``t + e``.

    Keys are numbered densely (an integer key by its offset from the smallest, when that is
    dense enough) and the events, already in tie order, are sorted stably by that code (two
    16-bit radix passes). Each event is then ``code * span + time``, one Int64 in ascending
    order whose binary search finds a window edge inside its key's segment; ``span`` covers
    every event and query time. When ``codes x span`` would not fit an Int64, times are
    replaced by their ranks among all those times (same order, same ties). Returns ``order``
    (the row of ``frame`` at each position) and the positions per edge.
    """
    code_ev, code_sp, n_codes = _codes(frame, spine_keys, keys)
    ev_ts = frame[_TS].to_numpy()
    t = times.to_numpy()
    queries = {e: t + e for e in edges}
    lo = min([*([ev_ts.min()] if ev_ts.size else []), *(q.min() for q in queries.values())])
    hi = max([*([ev_ts.max()] if ev_ts.size else []), *(q.max() for q in queries.values())])
    span = int(hi) - int(lo) + 2
    if (n_codes + 1) * span < _COMBINED_LIMIT:
        ev_rel, rel = ev_ts - lo, {e: q - lo for e, q in queries.items()}
    else:  # ranks: as many values as times, whatever their spread
        every = np.unique(np.concatenate([ev_ts, *queries.values()]))
        ev_rel = np.searchsorted(every, ev_ts)
        rel = {e: np.searchsorted(every, q) for e, q in queries.items()}
        span = every.size + 1
    order = _stable_order(code_ev)
    combined = code_ev[order] * span + ev_rel[order]
    known = code_sp >= 0
    base = np.where(known, code_sp * span, -1)
    # Queries in ascending order make the binary searches walk the array forwards; the same
    # order serves every edge (t + e keeps the order of t within a key).
    perm = np.argsort(np.where(known, base + rel[0], -1), kind="stable")
    position: dict[int, pl.Series] = {}
    for e, r in rel.items():
        query = np.where(known, base + r, -1)[perm]
        found = np.empty(t.size, dtype=np.int64)
        found[perm] = np.searchsorted(combined, query, side="right")
        position[e] = pl.Series(found).set(pl.Series(~known), None)  # type: ignore[arg-type]
    return pl.Series(order), position


def _codes(
    frame: pl.DataFrame, spine_keys: pl.DataFrame, keys: list[str]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Dense int64 codes of the events' and the spine's keys (-1: a key with no event)."""
    if len(keys) == 1 and frame.schema[keys[0]].is_integer() and frame.height:
        column = frame[keys[0]]
        low, high = int(column.min()), int(column.max())  # type: ignore[arg-type]
        if high - low < 2**31:
            given = spine_keys[keys[0]]
            inside = given.is_between(low, high).fill_null(False)
            code = pl.select(pl.when(inside).then(given.cast(pl.Int64) - low).otherwise(-1))
            return (
                (column - low).cast(pl.Int64).to_numpy(),
                code.to_series().to_numpy(),
                high - low + 1,
            )
    codes = frame.select(keys).unique().with_row_index("__code")
    code_ev = frame.select(keys).join(codes, on=keys, how="left", maintain_order="left")
    code_sp = spine_keys.join(codes, on=keys, how="left", maintain_order="left")
    return (
        code_ev["__code"].cast(pl.Int64).to_numpy(),
        code_sp["__code"].cast(pl.Int64).fill_null(-1).to_numpy(),
        codes.height,
    )


def _stable_order(code: np.ndarray) -> np.ndarray:
    """``argsort(code, kind="stable")`` for codes below 2**32, as two 16-bit radix passes."""
    if code.size == 0 or code.max() >= 2**32:
        return np.argsort(code, kind="stable")
    low = (code & 0xFFFF).astype(np.uint16)
    first = np.argsort(low, kind="stable")
    high = (code[first] >> 16).astype(np.uint16)
    return first[np.argsort(high, kind="stable")]


def _aggregate(agg: Aggregation, output: str, inside: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    if agg.column is None:
        return inside.sum().cast(pl.Int64).alias(output)
    raw = pl.col(agg.column)
    fn = agg.function
    if fn in ("first", "last"):
        # The position of the first/last non-null value; gathered after the group_by.
        at = pl.when(inside & raw.is_not_null()).then(pl.col(_POS))
        return (at.min() if fn == "first" else at.max()).alias(output)
    if fn in ("sum", "mean", "std", "var") and isinstance(raw, pl.Expr):
        base = raw.cast(pl.Float64) if fn != "sum" or dtype == pl.Float64 else raw.cast(pl.Int64)
    else:
        base = raw
    x = pl.when(inside).then(base)
    if fn == "count":
        return x.count().cast(pl.Int64).alias(output)
    if fn == "count_distinct":
        return (x.n_unique() - (x.null_count() > 0)).cast(pl.Int64).alias(output)
    if fn == "sum":
        return pl.when(x.count() > 0).then(x.sum()).alias(output)
    if fn == "mean":
        return x.mean().alias(output)
    if fn == "std":
        return x.std(ddof=1).alias(output)
    if fn == "var":
        return x.var(ddof=1).alias(output)
    if fn == "min":
        return x.min().alias(output)
    return x.max().alias(output)


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
