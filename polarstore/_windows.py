"""The online window state of aggregation views: what ``materialize`` keeps per entity, and
the evaluation of every backward aggregate at a lookup's ``now``.

Per entity, the state holds the source events that can still fall in a window: those after
``T - W``, where ``T`` is the latest synced event time of the view and ``W`` its largest
backward window (for any ``now >= T``, ``(now - w, now]`` starts after ``T - W``). An
entity has a main value, msgpack (no pickle) of ``[times, columns, [created times, write
sequences], null mask]``, events in tie-breaking order; a column is its values (physical:
temporal values as integers), or only their validity when it is just counted; bit j of the
mask is set when column j may hold nulls. It may also have a *tail*: the events of later
syncs, each after every event of the main value, row-major (``[[time, created, seq,
*values] per event, null mask]``) in a key range of its own (see ``_merge``). A lookup
decodes both (not the tie-breaking keys of the main value) and runs the view's
compiled evaluation (``_compile``): each window's range by two binary searches on the event
times (``bisect``), then exactly that slice aggregated with the offline query's arithmetic:
sums added in tie order, deviations in two passes, min/max skipping NaN. No tiles or hops:
the answer is the aggregate of exactly the events in the window.

Raw events rather than tiles plus edge events: with per-entity histories of tens of events
per largest window (the benchmark: 20 events per user over 90 days), a value is a few hundred
bytes and a lookup decodes it in microseconds; tiles would save space only for entities with
thousands of events in a window, and would need the edge events anyway to stay exact.

A sync reads only the rows committed since the last one (the same bookkeeping as feature
views, ``_sync._SyncState``, over the source's table) and merges them into the state of the
entities they touch; entities with no new event are not rewritten. It runs inside the
caller's write transaction, like every sync.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import gc
import itertools
import json
import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
import polars as pl

from polarstore._aggregations import Aggregation, AggregationView
from polarstore._definitions import SEQ_COLUMN, dtype_from_str, dtype_to_str
from polarstore._errors import SchemaError, ValidationError
from polarstore._frames import key_dtype
from polarstore._offline import OfflineStore, _polars_schema
from polarstore._records import Layout, _physical, cast_keys
from polarstore._records import _python_converter as _converter
from polarstore._sync import (
    _next_id,
    _SyncState,
    delete_prefix,
    extra_prefixes,
    meta_key,
    must_rebuild,
)

__all__ = [
    "WindowLayout",
    "WindowVector",
    "check_online",
    "empty_values",
    "lookup_windows",
    "sync_windows",
]

_US = timedelta(microseconds=1)
_NO_CREATED = -(1 << 63)
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder()
# A lookup needs the times and columns only: the tie-breaking keys stay undecoded.
_READ = msgspec.msgpack.Decoder(tuple[list[int], list[Any], msgspec.Raw, int]).decode
_FORMAT = 2  # values [times, columns, [created, seq]] + tails; an older state is rebuilt
_TAIL_EVENTS = 16  # a tail longer than this is merged into its entity's main value
_TIME, _ORDER = operator.itemgetter(0), operator.itemgetter(0, 1, 2)  # of a row-major event
_Txn = Any


class WindowLayout:
    """How one aggregation view's entities are stored; kept beside the values it describes.

    Readable by ``_records.Layout.from_json`` (id and keys; no fixed-width features), so the
    generic metadata code (dropping a view's data, key dtypes of an empty lookup) works.
    """

    def __init__(
        self,
        view_id: int,
        keys: Sequence[tuple[str, str]],
        columns: Sequence[tuple[str, str, str]],
        retain_us: int,
        tail_id: int | None,
    ) -> None:
        self.view_id = view_id
        self.keys = tuple((k, t) for k, t in keys)
        # (column, dtype text, "values" | "valid")
        self.columns = tuple((c, t, m) for c, t, m in columns)
        self.index = {c: i for i, (c, _, _) in enumerate(self.columns)}
        self.retain_us = retain_us
        self.records = Layout(view_id, self.keys, [])
        # Tails (see _merge) live under their own id, keyed like the main values.
        self.tail_id = tail_id
        self.tail_prefix = b"" if tail_id is None else tail_id.to_bytes(4, "big")
        self.tails = Layout(tail_id or 0, self.keys, [])
        # No tail id: read from a state of an older format (rebuilt by the next sync).
        fmt = None if tail_id is None else _FORMAT
        windows = {"columns": self.columns, "retain_us": retain_us, "format": fmt}
        doc = {
            "id": view_id,
            "keys": self.keys,
            "features": [],
            "windows": {**windows, "tail_id": tail_id},
            # Read by _sync.extra_prefixes: removed with the view's values, and per entity.
            "extra_ids": [] if tail_id is None else [tail_id],
        }
        self.json = json.dumps(doc).encode()
        self.signature = json.dumps({"keys": self.keys, "windows": windows})

    @classmethod
    def of(
        cls,
        view_id: int,
        tail_id: int,
        view: AggregationView,
        schema: Mapping[str, pl.DataType],
    ) -> WindowLayout:
        source = view.source_view
        keys = [
            (k, dtype_to_str(key_dtype(schema[k], where=view.name, column=k)))
            for k in source.join_keys
        ]
        modes: dict[str, str] = {}
        for agg in view.aggregations:
            if agg.column is not None and not agg.forward:
                # A column only counted needs only its validity (also: list columns).
                mode = "valid" if agg.function == "count" else "values"
                modes[agg.column] = "values" if modes.get(agg.column) == "values" else mode
        columns = [(c, dtype_to_str(source.schema[c]), m) for c, m in sorted(modes.items())]
        back = [a.span // _US for a in view.aggregations if not a.forward]
        return cls(view_id, keys, columns, max(back, default=0), tail_id)

    @classmethod
    def from_json(cls, raw: bytes) -> WindowLayout:
        doc = json.loads(raw)
        windows = doc["windows"]
        return cls(
            doc["id"],
            [tuple(k) for k in doc["keys"]],
            [tuple(c) for c in windows["columns"]],
            windows["retain_us"],
            windows.get("tail_id") if windows.get("format") == _FORMAT else None,
        )


# --- materialize ----------------------------------------------------------------------------


def sync_windows(
    txn: _Txn,
    offline: OfflineStore,
    view: AggregationView,
    end_us: int | None,
    report: Callable[[str], None],
) -> tuple[int, int, int | None]:
    """Bring the view's window state up to the source's current version (events <= end);
    returns rows read, entities written and the version synced."""
    source = view.source_view
    # One open of the table for its version, schema and scan (each open reads the log).
    table = offline.open_table(source.name)
    if table is None:
        return 0, 0, None
    current, schema = table.version(), _polars_schema(table)
    state_key, layout_key = meta_key("state", view.name), meta_key("layout", view.name)
    raw_layout = txn.get(layout_key)
    old = None
    if raw_layout is not None:
        try:
            old = WindowLayout.from_json(raw_layout)
        except (KeyError, TypeError, ValueError):
            old = None  # a feature view's data under this name once: start over
    view_id = old.view_id if old else _next_id(txn)
    tail_id = old.tail_id if old and old.tail_id is not None else _next_id(txn)
    layout = WindowLayout.of(view_id, tail_id, view, schema)
    raw_state = txn.get(state_key)
    state = _SyncState(None if raw_state is None else json.loads(raw_state))
    rebuild = must_rebuild(
        offline, source, view.name, old and old.signature, layout.signature, state, current, report
    )
    if rebuild:
        if raw_layout is not None:
            for prefix in (Layout.from_json(raw_layout).prefix, *extra_prefixes(raw_layout)):
                delete_prefix(txn, prefix)
        delete_prefix(txn, layout.tail_prefix)
        state = _SyncState(None)
        txn.put(layout_key, layout.json)
    pending = state.pending(source, current, end_us)
    read = written = 0
    latest_event = None
    if pending is not None:
        rows = _pending_rows(offline, view, layout, table, pending)
        read = rows.height
        if read:
            latest_event = int(rows["__ts"].max())  # type: ignore[arg-type]
            latest = latest_event if state.max_event is None else max(latest_event, state.max_event)
            cutoff = latest - layout.retain_us
            rows = rows.filter(pl.col("__ts") > cutoff)
            if rows.height:
                report(f"{view.name}: merging {rows.height:,} events")
                with _gc_paused():
                    written = _merge(
                        txn, layout, rows, cutoff, fresh=rebuild, max_event=state.max_event
                    )
    state.synced(current, end_us, latest_event)
    txn.put(state_key, state.to_json())
    return read, written, current


def _bit(column: int) -> int:
    """A column's bit in a value's null mask (columns past the 62nd share the last bit)."""
    return 1 << min(column, 62)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while merging: the merge allocates a few lists per
    entity, none of them cyclic, and the collections they set off (which walk every object
    of the process) took half of an incremental sync's time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _pending_rows(
    offline: OfflineStore, view: AggregationView, layout: WindowLayout, table: Any, pending: Any
) -> pl.DataFrame:
    """The unsynced source rows: keys, time, created time, sequence and stored columns."""
    source = view.source_view
    created = source.created_timestamp_field
    scan = offline.scan(
        source,
        version=table.version(),
        columns=[
            *source.join_keys,
            source.timestamp_field,
            *([created] if created else []),
            SEQ_COLUMN,
            *(c for c, _, _ in layout.columns),
        ],
        since=pending.since,
        min_seq=pending.min_seq,
        table=table,
    )
    assert scan is not None
    return (
        scan.filter(pending.rows)
        .select(
            *source.join_keys,
            pl.col(source.timestamp_field).cast(pl.Int64).alias("__ts"),
            (pl.col(created).cast(pl.Int64) if created else pl.lit(_NO_CREATED)).alias("__created"),
            pl.col(SEQ_COLUMN).cast(pl.Int64).alias("__seq"),
            *(_stored(c, t, m) for c, t, m in layout.columns),
        )
        .collect(engine="in-memory")
    )


def _stored(column: str, dtype: str, mode: str) -> pl.Expr:
    if mode == "valid":
        return pl.col(column).is_not_null().alias(column)
    return pl.col(column).cast(_physical(dtype_from_str(dtype))).alias(column)


def _merge(
    txn: _Txn,
    layout: WindowLayout,
    rows: pl.DataFrame,
    cutoff: int,
    *,
    fresh: bool,
    max_event: int | None,
) -> int:
    """Merge new events into the state of the entities they touch; returns how many.

    The usual sync brings, per entity, events after every stored one (after ``max_event``,
    the latest synced time): they are appended to the entity's tail, a small value in a
    key range of its own, so neither the main value is read or rewritten nor its B-tree
    pages dirtied. A tail longer than ``_TAIL_EVENTS``, and any entity with a new event
    at or before ``max_event`` (a late one), is merged into the main value (sorted by
    time, created time, sequence; the events at or before ``cutoff`` go) and its tail
    deleted.
    """
    keys = [k for k, _ in layout.keys]
    rows = cast_keys(rows.select(keys), layout.records, "materialize").hstack(rows.drop(keys))
    rows = rows.sort([*keys, "__ts", "__created", "__seq"])
    # Bit j of a value's null mask: column j may hold nulls (lookups filter only those).
    masks = [
        pl.col(c).is_null().any().cast(pl.Int64) * _bit(j)
        for j, (c, _, _) in enumerate(layout.columns)
    ]
    groups = rows.group_by(keys, maintain_order=True).agg(
        pl.len().alias("__n"),
        pl.col("__ts").first().alias("__first"),
        functools.reduce(operator.or_, masks, pl.lit(0, pl.Int64)).alias("__nulls"),
    )
    encoded = layout.records.encode_keys(groups.select(keys))
    ends = list(itertools.accumulate(groups["__n"].to_list()))
    starts = [0, *ends[:-1]]
    nulls = groups["__nulls"].to_list()
    # Flat lists, sliced per entity: ``to_list`` of list columns after a group_by is slower.
    ts, created, seq = (rows[c].to_list() for c in ("__ts", "__created", "__seq"))
    cols = [rows[c].to_list() for c, _, _ in layout.columns]
    encode, decode = _ENCODER.encode, _DECODER.decode
    tail = layout.tail_prefix
    mains: dict[bytes, bytes] = {}
    tails: dict[bytes, bytes] = {}
    merging: list[tuple[bytes, list[Any], bool, int]] = []
    if fresh or max_event is None:
        for key, a, b, n in zip(encoded, starts, ends, nulls, strict=True):
            mains[key] = encode([ts[a:b], [c[a:b] for c in cols], [created[a:b], seq[a:b]], n])
    else:
        # Tails are row-major, [[time, created, seq, *values] per event, null mask]: one slice
        # per entity to write (column-major took three times as long), transposed at lookup.
        events = list(zip(ts, created, seq, *cols, strict=True))
        late = (groups["__first"] <= max_event).to_list()
        tail_keys = layout.tails.encode_keys(groups.select(keys))  # tail + key[4:]
        with txn.cursor() as cursor:
            found = dict(cursor.getmulti(tail_keys))
        for key, tkey, a, b, n, is_late in zip(
            encoded, tail_keys, starts, ends, nulls, late, strict=True
        ):
            raw = found.get(tkey)
            if raw is None and not is_late:
                tails[tkey] = encode((events[a:b], n))
                continue
            new = events[a:b]
            if raw is not None:
                old, n0 = decode(raw)
                n |= n0
                new = old[bisect.bisect_right(old, cutoff, key=_TIME) :] + new
            if is_late or len(new) > _TAIL_EVENTS:
                merging.append((key, new, is_late, n))
            else:
                tails[tkey] = encode((new, n))
    if merging:
        with txn.cursor() as cursor:
            stored = dict(cursor.getmulti([key for key, _, _, _ in merging]))
        for key, new, is_late, n in merging:
            txn.delete(tail + key[4:])  # no-op without one
            raw = stored.get(key)
            merged: list[Any] = []
            if raw is not None:
                t0, c0, (r0, s0), n0 = decode(raw)
                merged, n = list(zip(t0, r0, s0, *c0, strict=True)), n | n0
            merged += new
            if is_late:  # else every new event comes after every stored one
                merged.sort(key=_ORDER)
            merged = merged[bisect.bisect_right(merged, cutoff, key=_TIME) :]
            t, r, q, *c = (list(x) for x in zip(*merged, strict=True))
            mains[key] = encode([t, c, [r, q], n])
    with txn.cursor() as cursor:
        _, written = cursor.putmulti(mains.items())
    with txn.cursor() as cursor:
        _, appended = cursor.putmulti(tails.items())
    return int(written) + int(appended)


# --- lookups --------------------------------------------------------------------------------


def check_online(view: AggregationView, features: Sequence[str], where: str) -> None:
    """Forward aggregates are labels: refused online, before anything is read."""
    ahead = [f for f in features if view.aggregation(f).forward]
    if ahead:
        msg = (
            f"{where}: {view.name}:{ahead[0]} is a forward aggregation (a training label over "
            "(t, t + window]); it has no online value. Use get_historical_features."
        )
        raise ValidationError(msg)


def empty_values(view: AggregationView, wanted: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """What an entity with no events gets: counts 0, everything else null."""
    return {
        output: 0 if view.aggregation(f).function in ("count", "count_distinct") else None
        for f, output in wanted
    }


class _Plan:
    """The evaluation of some aggregates of one view against a stored layout, compiled once
    per layout (``_compile``), and the earliest ``now`` the state of one sync answers."""

    def __init__(
        self, view: AggregationView, layout: WindowLayout, wanted: Sequence[tuple[str, str]]
    ) -> None:
        source = view.source_view
        self.view_name, self.layout = view.name, layout
        specs: list[tuple[str, int | None, str, str, bool, int]] = []
        for feature, output in wanted:
            agg: Aggregation = view.aggregation(feature)
            column = None if agg.column is None else layout.index.get(agg.column, -1)
            dtype = "" if agg.column is None else dtype_to_str(source.schema[agg.column])
            valid = column is not None and column >= 0 and layout.columns[column][2] == "valid"
            specs.append((output, column, agg.function, dtype, valid, agg.span // _US))
        self.run = _compile(tuple(specs))
        # Events at or before T - W are dropped: a window (now - w, now] is whole only from
        # now = T - W + w on (T: the latest synced event time, W: the largest window).
        self.widest = max((w for _, c, _, _, _, w in specs if c != -1), default=0)
        self.earliest_us: int | None = None

    def at(self, raw_state: bytes | None) -> _Plan:
        """Adopt the sync state (``T``) of a snapshot."""
        latest = None if raw_state is None else json.loads(raw_state).get("max_event_us")
        self.earliest_us = None if latest is None else latest - self.layout.retain_us + self.widest
        return self

    def check_now(self, now_us: int) -> None:
        """``ValidationError`` when the state kept cannot answer at ``now`` (too early)."""
        if self.earliest_us is not None and now_us < self.earliest_us:
            self._too_early(now_us)

    def evaluate(self, raw: bytes | None, tail: bytes | None, now_us: int, out: dict) -> None:
        """The aggregates of an entity's main value and tail (not both None) at ``now``."""
        ts: Sequence[int]
        columns: Sequence[Sequence[Any]]
        if tail is None:
            ts, columns, _, nulls = _READ(raw)  # type: ignore[arg-type]
        else:
            events, nulls = _DECODER.decode(tail)
            ts, _, _, *columns = zip(*events, strict=True)  # tuples: sliced like lists
            if raw is not None:  # every tail event comes after every main one
                ts0, columns0, _, nulls0 = _READ(raw)
                ts, nulls = [*ts0, *ts], nulls0 | nulls
                columns = [[*a, *b] for a, b in zip(columns0, columns, strict=True)]
        self.run(ts, columns, nulls, now_us, out)

    def _too_early(self, now_us: int) -> None:
        assert self.earliest_us is not None
        at = datetime.fromtimestamp(self.earliest_us / 1e6, tz=timezone.utc).isoformat()
        msg = (
            f"aggregation view {self.view_name!r}: the online store keeps only the events that "
            f"the windows of the latest synced time need, so it answers for now >= {at}; got "
            f"now={datetime.fromtimestamp(now_us / 1e6, tz=timezone.utc).isoformat()}. Use "
            "get_historical_features for earlier moments."
        )
        raise ValidationError(msg)


_NAN = math.nan  # one object: a set of the window's values counts every NaN as it


def _in_order(values: Sequence[Any]) -> float:
    """The values added one by one, in tie order from 0.0: what the offline loops compute
    (``math.fsum`` rounds otherwise, and raises on ``inf - inf`` and on an overflow)."""
    return functools.reduce(operator.add, values, 0.0)


def _wrap_int64(total: int) -> int:
    return (total + 2**63) % 2**64 - 2**63


def _skip_nan(pick: Callable[[Sequence[float]], float]) -> Callable[[Sequence[float]], float]:
    """``min``/``max`` that skip NaN as the offline loops (and Polars) do; NaN when every
    value is NaN."""

    def extreme(values: Sequence[float]) -> float:
        kept = [v for v in values if v == v]
        return pick(kept) if kept else math.nan

    return extreme


@functools.lru_cache(maxsize=256)
def _compile(
    specs: tuple[tuple[str, int | None, str, str, bool, int], ...],
) -> Callable[[Sequence[int], Sequence[Any], int, int, dict[str, Any]], None]:
    """One function evaluating every aggregate of ``specs`` — (output, stored column or
    None to count rows or -1 when not stored yet, function, dtype, validity only, window
    µs) — on an entity's times, columns and null mask at ``now``, into ``out``.

    Generated (names come in as ``repr`` literals only): each window's range is found once
    (two ``bisect``), each (column, window) slice taken, cleared of nulls and summed once,
    whatever the number of aggregates over it, with no call per aggregate beyond the
    aggregate's own (``total``, ``min``, ...). About twice as fast as a loop over closures.
    """
    names: dict[str, Any] = {
        "right": bisect.bisect_right,
        "total": _in_order,
        "sqrt": math.sqrt,
        "nanmin": _skip_nan(min),
        "nanmax": _skip_nan(max),
        "NAN": _NAN,
        "wrap": _wrap_int64,
    }
    lines = ["def run(ts, columns, nulls, now, out):", "    hi = right(ts, now)"]
    # Widest window first: each narrower one is searched only from where the wider starts.
    windows: dict[int, str] = {}
    start = "0"
    for w in sorted({w for _, c, _, _, _, w in specs if c != -1}, reverse=True):
        windows[w] = f"lo{len(windows)}"
        lines.append(f"    {windows[w]} = right(ts, now - {w}, {start}, hi)")
        start = windows[w]
    slices: dict[tuple[int, int], str] = {}
    totals: dict[str, str] = {}

    def part(column: int, w: int, valid: bool) -> str:
        if (column, w) not in slices:
            name = slices[column, w] = f"p{len(slices)}"
            lines.append(f"    {name} = columns[{column}][{windows[w]}:hi]")
            if not valid:  # null values are ignored; the value's mask says where there are any
                kept = f"[v for v in {name} if v is not None]"
                lines.append(f"    if nulls & {_bit(column)}: {name} = {kept}")
        return slices[column, w]

    def total(p: str) -> str:
        if p not in totals:
            totals[p] = f"s{p}"
            lines.append(f"    s{p} = total({p})")
        return totals[p]

    for i, (output, column, fn, dtype, valid, w) in enumerate(specs):
        if column == -1:  # added to the view after the last sync
            value = "None"
        elif column is None:
            value = f"hi - {windows[w]}"
        else:
            p = part(column, w, valid)
            if valid or fn == "count":
                value = f"sum({p})" if valid else f"len({p})"
            elif fn == "count_distinct" and dtype in ("Float32", "Float64"):
                value = f"len({{NAN if v != v else v for v in {p}}})"  # NaN counts once
            elif fn == "count_distinct":
                value = f"len(set({p}))"
            elif fn == "sum" and dtype in ("Float32", "Float64"):
                value = f"({total(p)} if {p} else None)"
            elif fn == "sum":  # wraps as Polars' Int64 sum (and the offline one) does
                value = f"(wrap(sum({p})) if {p} else None)"
            elif fn == "mean":
                value = f"({total(p)} / len({p}) if {p} else None)"
            elif fn in ("std", "var"):  # two passes, inlined; ddof=1, null below two values
                n, m, d = f"n{p}", f"m{p}", f"d{p}"
                if n not in totals:
                    totals[n] = n
                    lines.append(f"    {n} = len({p})")
                    lines.append(f"    {m} = {total(p)} / {n} if {n} > 1 else 0.0")
                    kept = f"total([(v - {m}) * (v - {m}) for v in {p}])"
                    lines.append(f"    {d} = {kept} / ({n} - 1) if {n} > 1 else None")
                value = f"(sqrt({d}) if {n} > 1 else None)" if fn == "std" else d
            else:
                nan = "nan" if dtype in ("Float32", "Float64") else ""  # nanmin skips NaN
                pick = {"min": f"{nan}min({p})", "max": f"{nan}max({p})", "first": f"{p}[0]"}
                value = pick.get(fn, f"{p}[-1]")
                convert = _converter(dtype)
                if convert is not None:
                    names[f"convert{i}"] = convert
                    value = f"convert{i}({value})"
                value = f"({value} if {p} else None)"
        lines.append(f"    out[{output!r}] = {value}")
    exec("\n".join(lines), names)  # from the specs only; output names as repr literals
    return names["run"]  # type: ignore[no-any-return]


def _stored_layout(raw: bytes, view: AggregationView, where: str) -> WindowLayout:
    try:
        layout = WindowLayout.from_json(raw)
    except (KeyError, TypeError, ValueError) as e:
        msg = f"{where}: the online data of {view.name!r} is not window state; run materialize()."
        raise SchemaError(msg) from e
    if layout.tail_id is None:
        msg = (
            f"{where}: the online data of {view.name!r} was materialized by an older polarstore "
            f"(window state format < {_FORMAT}); run materialize() to rebuild it."
        )
        raise SchemaError(msg)
    if [k for k, _ in layout.keys] != list(view.join_keys):
        msg = (
            f"{where}: the online data of {view.name!r} was materialized with join keys "
            f"{[k for k, _ in layout.keys]}, but the registry now says {list(view.join_keys)}; "
            "run materialize() to rebuild it."
        )
        raise SchemaError(msg)
    return layout


def lookup_windows(
    txn: _Txn,
    raw_layout: bytes | None,
    view: AggregationView,
    frame: pl.DataFrame,
    wanted: Sequence[tuple[str, str]],
    now_us: int,
    where: str,
) -> dict[str, pl.Series]:
    """The aggregates of every row of ``frame`` (join keys) at ``now``; each key read once."""
    empty = empty_values(view, wanted)
    schema = view.schema
    dtypes = {output: schema[f] for f, output in wanted}
    rows: list[dict[str, Any]]
    if txn is None or raw_layout is None:
        rows = [empty] * frame.height
    else:
        layout = _stored_layout(raw_layout, view, where)
        plan = _Plan(view, layout, wanted).at(txn.get(meta_key("state", view.name)))
        plan.check_now(now_us)
        keys = cast_keys(frame.select(view.join_keys), layout.records, where)
        names = list(view.join_keys)
        distinct = keys.drop_nulls().unique(maintain_order=True)
        encoded = layout.records.encode_keys(distinct)
        tail = layout.tail_prefix
        with txn.cursor() as cursor:
            found = dict(cursor.getmulti(encoded))
            if tail:
                found.update(cursor.getmulti([tail + k[4:] for k in encoded]))
        results: dict[tuple[Any, ...], dict[str, Any]] = {}
        for key, row in zip(encoded, distinct.iter_rows(), strict=True):
            raw, raw_tail = found.get(key), found.get(tail + key[4:]) if tail else None
            if raw is None and raw_tail is None:
                results[row] = empty
                continue
            out: dict[str, Any] = {}
            plan.evaluate(raw, raw_tail, now_us, out)
            results[row] = out
        rows = [results.get(row, empty) for row in keys.select(names).iter_rows()]
    return {
        output: pl.Series(output, [r[output] for r in rows], dtype=dtypes[output], strict=False)
        for output in dtypes
    }


class WindowVector:
    """One aggregation view of a cached ``get_feature_vector`` plan (the interface of
    ``_online._VectorView``): adopts the stored layout once per snapshot."""

    def __init__(self, view: AggregationView, wanted: Sequence[tuple[str, str]]) -> None:
        self.view = view
        self.layout_key = meta_key("layout", view.name)
        self.wanted = list(wanted)
        self.empty = empty_values(view, self.wanted)
        self.layout_raw: bytes | None = None
        self.plan: _Plan | None = None
        self.encode: Callable[[Mapping[str, Any]], bytes | None] | None = None
        self.tail = b""
        self.env: Any = None
        self.snapshot = -1

    def check_layout(self, txn: _Txn, env: Any, snapshot: int) -> None:
        raw = txn.get(self.layout_key)
        if raw is None:
            self.layout_raw, self.plan, self.encode = None, None, None
        elif raw != self.layout_raw:
            layout = _stored_layout(raw, self.view, "get_feature_vector")
            self.plan = _Plan(self.view, layout, self.wanted)
            self.encode = layout.records.key_encoder("get_feature_vector", self.view.key_dtypes)
            self.tail = layout.tail_prefix
            self.layout_raw = raw
        if self.plan is not None:  # T moves with every sync, which also moves the snapshot
            self.plan.at(txn.get(meta_key("state", self.view.name)))
        self.env, self.snapshot = env, snapshot

    def _absent(self, txn: _Txn, entity: Mapping[str, Any], now_us: int, out: dict) -> None:
        for key in self.view.join_keys:
            if key not in entity:
                msg = f"get_feature_vector: missing join key {key!r}; got {sorted(entity)}."
                raise ValidationError(msg)
        out.update(self.empty)

    def fetch(self, txn: _Txn, entity: Mapping[str, Any], now_us: int, out: dict) -> None:
        if self.plan is None or self.encode is None:
            self._absent(txn, entity, now_us, out)
            return
        plan = self.plan
        if plan.earliest_us is not None and now_us < plan.earliest_us:
            plan.check_now(now_us)  # before the key: an entity may have no events kept
        key = self.encode(entity)
        if key is None:
            out.update(self.empty)
            return
        raw, tail = txn.get(key), txn.get(self.tail + key[4:]) if self.tail else None
        if tail is None and raw is not None:  # the usual case, inlined: this is request time
            ts, columns, _, nulls = _READ(raw)
            plan.run(ts, columns, nulls, now_us, out)
        elif raw is None and tail is None:
            out.update(self.empty)
        else:
            plan.evaluate(raw, tail, now_us, out)
