"""Property tests: ``get_historical_features`` against the brute-force reference.

Every example builds a fresh repository in a temporary folder (hypothesis does not reset
function-scoped fixtures), defines one or two views (int, string or compound int+string keys),
writes 1-4 batches to each (as a DataFrame, a many-chunk DataFrame, a LazyFrame or a pyarrow
Table; timestamps naive, UTC or zoned; sometimes compacting the view after a write), then
compares the point-in-time join of a random spine with ``reference.point_in_time`` row for row.

Times are microsecond instants near a 15-minute grid over four hours: a grid point plus an
offset of 0-3 ms, drawn from offsets at millisecond edges (0, 1, 999, 1000, 1001 µs, ...) or at
random. Most writes of a view cluster within a millisecond or two of one "hot" grid point, so
many rows written in different batches fall inside one millisecond — the precision of Delta's
file statistics, which must never be taken as exact — the later write often holding earlier
times; ties on event and created time happen often. Spine times are drawn near the grid the
same way (or 1 µs before), one microsecond either side of a written row's event time, at the
first and last microsecond of its millisecond, and exactly at ``event + ttl`` (and one
microsecond either side), so TTL and "same instant" edges are hit on purpose; TTLs range from
1 µs to an hour. Some spine times are null. Besides the join, ``read`` must return every
row in tie-breaking order. The grid starts just before New York's spring-forward
(2024-03-10 07:00Z), and the tests run with a local time zone that is not UTC.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from polarstore import Entity, FeatureStore, FeatureView, PolarstoreError
from polarstore._stats import settle
from tests.reference import RefView, point_in_time, resolve_features, to_utc

UTC = timezone.utc
BASE = datetime(2024, 3, 10, 5, 0, tzinfo=UTC)
STEP = timedelta(minutes=15)
GRID = 17  # event and created times are BASE + k * STEP, k in [0, GRID)
US = timedelta(microseconds=1)
MS = timedelta(milliseconds=1)
HOT = [0, 4, 8]  # grid points half the rows go to (4 steps: the 1-hour TTL apart)
# Offsets from a grid point, in µs: millisecond edges, so that rows written in different
# batches share a millisecond (and its first and last microsecond), or anything up to 3 ms.
EDGE_US = [0, 1, 2, 499, 500, 998, 999, 1000, 1001, 1999, 2000]
TTLS: list[timedelta | None] = [
    None,
    US,
    timedelta(microseconds=999),
    MS,
    STEP,
    2 * STEP,
    timedelta(hours=1),
    timedelta(minutes=7),
]

INT_KEYS = [0, 1, 2, -3]
STR_KEYS = ["", "a", "A", "é", "e\u0301", "日本", "a b", "🦀"]
KEY_DTYPES: dict[str, pl.DataType] = {"user_id": pl.Int64(), "item_id": pl.String()}
KEY_VALUES: dict[str, list[Any]] = {"user_id": INT_KEYS, "item_id": STR_KEYS}
ENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "user": ("user_id",),
    "item": ("item_id",),
    "user_item": ("user_id", "item_id"),
}
FEATURE_DTYPES: list[pl.DataType] = [pl.Float64(), pl.Int64(), pl.String(), pl.Boolean()]
ZONES: list[str | None] = [None, "UTC", "America/New_York", "Asia/Kolkata"]
SPINE_TS_NAMES = ["event_timestamp", "ts", "when"]
WRITE_KINDS = ["frame", "chunked", "lazy", "arrow"]


@pytest.fixture(autouse=True, scope="module")
def _local_time_is_not_utc() -> Iterator[None]:
    """Naive times mean UTC, never local time: run these tests with a local zone far from UTC."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Pacific/Chatham"  # UTC+13:45 in March
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
TimeUnit = Literal["ms", "us", "ns"]


@dataclass
class Write:
    view: str
    rows: list[dict[str, Any]]  # times as aware UTC datetimes
    zone: str | None  # the zone the timestamp columns are written in (None: naive)
    columns: list[str]  # column order of the written frame
    compact: bool = False  # compact the view right after this write (answers are unchanged)
    kind: str = "frame"  # what is passed to write(): see ``write_data``


@dataclass
class Case:
    views: dict[str, RefView]
    dtypes: dict[str, dict[str, pl.DataType]]  # view -> feature -> dtype
    entities: dict[str, str]  # view -> entity name
    writes: list[Write]  # in write order, views interleaved
    spine: list[dict[str, Any]]  # times as aware UTC datetimes
    spine_columns: list[str]
    spine_ts: str
    spine_zone: str | None
    spine_unit: TimeUnit
    null_dtype_keys: bool  # an all-null key column of the spine has dtype Null
    features: list[str]
    full_feature_names: bool
    versions: dict[str, list[int]] = field(default_factory=dict)  # view -> version per write


# --- strategies ----------------------------------------------------------------------------


def grid(k: int) -> datetime:
    return BASE + k * STEP


def sub_ms(up_to_us: int = 2999) -> st.SearchStrategy[timedelta]:
    """An offset of 0 to ``up_to_us`` µs, often at a millisecond edge."""
    return (st.sampled_from(EDGE_US) | st.integers(0, up_to_us)).map(lambda us: us * US)


@st.composite
def instants(draw: st.DrawFn, lo: int = 0, hi: int = GRID - 1) -> datetime:
    """A microsecond instant near grid point ``lo``..``hi``, half the time a hot one."""
    k = draw(st.integers(lo, hi) | st.sampled_from([h for h in HOT if lo <= h <= hi] or [lo]))
    return grid(k) + draw(sub_ms())


def feature_values(dtype: pl.DataType) -> st.SearchStrategy[Any]:
    if dtype == pl.Float64():
        return st.none() | st.integers(-400, 400).map(lambda i: i / 4)
    if dtype == pl.Int64():
        return st.none() | st.integers(-(2**63), 2**63 - 1)
    if dtype == pl.String():
        return st.none() | st.text(max_size=4)
    return st.none() | st.booleans()


@st.composite
def view_defs(draw: st.DrawFn, name: str, entity: str) -> tuple[RefView, dict[str, pl.DataType]]:
    n_features = draw(st.integers(1, 3))
    dtypes = {f"{name[0]}{i}": draw(st.sampled_from(FEATURE_DTYPES)) for i in range(n_features)}
    view = RefView(
        name=name,
        join_keys=ENTITY_KEYS[entity],
        features=tuple(dtypes),
        timestamp_field=draw(st.sampled_from(["event_timestamp", "ts"])),
        created_timestamp_field=draw(st.sampled_from([None, "created"])),
        ttl=draw(st.sampled_from(TTLS)),
        allow_exact_match=draw(st.booleans()),
    )
    return view, dtypes


@st.composite
def feature_rows(
    draw: st.DrawFn, view: RefView, dtypes: dict[str, pl.DataType], near: int | None = None
) -> dict[str, Any]:
    """A row; with ``near``, its event time is within 2 ms (mostly 1 ms) of grid point ``near``."""
    row: dict[str, Any] = {key: draw(st.sampled_from(KEY_VALUES[key])) for key in view.join_keys}
    row[view.timestamp_field] = draw(
        instants() if near is None else sub_ms().map(grid(near).__add__)
    )
    if view.created_timestamp_field is not None:
        # A narrow range of created times, so ties on (event, created) are common.
        offset = draw(st.sampled_from([0, 1, 999, 1000])) * US
        row[view.created_timestamp_field] = grid(draw(st.integers(0, 3))) + offset
    for feature, dtype in dtypes.items():
        row[feature] = draw(feature_values(dtype))
    return row


@st.composite
def writes_for(draw: st.DrawFn, view: RefView, dtypes: dict[str, pl.DataType]) -> list[Write]:
    columns = [*view.join_keys, view.timestamp_field]
    if view.created_timestamp_field is not None:
        columns.append(view.created_timestamp_field)
    columns += list(dtypes)
    tied = [*view.join_keys, view.timestamp_field]
    writes: list[Write] = []
    hot = draw(st.sampled_from(HOT))
    for _ in range(draw(st.integers(1, 4))):
        # Most writes fall within a few milliseconds of one point: files then share a
        # millisecond, the later write often holding earlier times (Delta's statistics
        # cannot tell the order of those).
        near = draw(st.sampled_from([None, hot, hot]))
        size = 6 if near is None else 3
        rows = draw(st.lists(feature_rows(view, dtypes, near), min_size=1, max_size=size))
        # Rows with the keys and event time of an earlier row (in this write or an earlier
        # one), with the same created time (a full tie) or another one, and new values.
        for _ in range(draw(st.integers(0, 3))):
            earlier = draw(st.sampled_from([*(r for w in writes for r in w.rows), *rows]))
            copied = tied + [view.created_timestamp_field] * draw(st.booleans())
            new_row = draw(feature_rows(view, dtypes))
            rows.append({**new_row, **{c: earlier[c] for c in copied if c is not None}})
        zone = draw(st.sampled_from(ZONES))
        order = list(draw(st.permutations(columns)))
        compact = draw(st.integers(0, 3)) == 0
        kind = draw(st.sampled_from(WRITE_KINDS))
        writes.append(Write(view.name, rows, zone, order, compact, kind))
    return writes


@st.composite
def spine_times(draw: st.DrawFn, view: RefView, row: dict[str, Any]) -> datetime | None:
    """A time near the grid (or 1 µs before it), at an edge of ``row``'s validity, or null."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return None
    if kind <= 3:
        return draw(instants(-1, GRID + 4)) - draw(st.sampled_from([0 * US, US]))
    event: datetime = row[view.timestamp_field]
    ttl = view.ttl if view.ttl is not None else timedelta(hours=2)
    edge = draw(st.sampled_from([0 * US, ttl]))
    # The first and last microsecond of the millisecond, as Delta's statistics round it.
    in_ms = event.microsecond % 1000 * US
    return event + edge + draw(st.sampled_from([0 * US, -US, US, -in_ms, MS - US - in_ms]))


@st.composite
def spine_rows(
    draw: st.DrawFn, views: dict[str, RefView], writes: list[Write], ts_name: str
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i in range(draw(st.integers(1, 8))):
        # Most spine rows aim at a written row: its keys, a time at one of its edges.
        write = draw(st.sampled_from(writes))
        source = draw(st.sampled_from(write.rows))
        row: dict[str, Any] = {"row_id": i}
        for key, values in KEY_VALUES.items():
            if key in source and draw(st.integers(0, 3)) > 0:
                row[key] = source[key]
            else:
                row[key] = draw(st.sampled_from([*values, None]))
        row[ts_name] = draw(spine_times(views[write.view], source))
        row["label"] = draw(st.none() | st.integers(0, 1).map(float))
        # A pass-through column named like a view's created timestamp field.
        row["created"] = draw(st.none() | st.integers(0, GRID).map(grid))
        rows.append(row)
    # Duplicate spine rows: each must get its own, identical, output row.
    for _ in range(draw(st.integers(0, 3))):
        rows.append(dict(draw(st.sampled_from(rows))))
    return list(draw(st.permutations(rows)))


@st.composite
def requested_features(draw: st.DrawFn, views: dict[str, RefView]) -> list[str]:
    refs: list[str] = []
    for view in views.values():
        if draw(st.integers(0, 4)) == 0:
            refs.append(f"{view.name}:*")
        else:
            chosen = draw(st.lists(st.sampled_from(view.features), min_size=1, unique=True))
            refs += [f"{view.name}:{feature}" for feature in chosen]
    return list(draw(st.permutations(refs)))


@st.composite
def cases(draw: st.DrawFn, n_views: int) -> Case:
    names = ["alpha", "beta"][:n_views]
    entities = draw(st.permutations(list(ENTITY_KEYS)))[:n_views]
    views: dict[str, RefView] = {}
    dtypes: dict[str, dict[str, pl.DataType]] = {}
    per_view: list[list[Write]] = []
    for name, entity in zip(names, entities, strict=True):
        view, view_dtypes = draw(view_defs(name, entity))
        views[name], dtypes[name] = view, view_dtypes
        per_view.append(draw(writes_for(view, view_dtypes)))
    # Interleave the views' writes; each view keeps its own write order.
    writes: list[Write] = []
    while any(per_view):
        pending = [ws for ws in per_view if ws]
        writes.append(draw(st.sampled_from(pending)).pop(0))
    spine_ts = draw(st.sampled_from(SPINE_TS_NAMES))
    spine = draw(spine_rows(views, writes, spine_ts))
    spine_columns = list(
        draw(st.permutations(["row_id", "user_id", "item_id", spine_ts, "label", "created"]))
    )
    return Case(
        views=views,
        dtypes=dtypes,
        entities=dict(zip(names, entities, strict=True)),
        writes=writes,
        spine=spine,
        spine_columns=spine_columns,
        spine_ts=spine_ts,
        spine_zone=draw(st.sampled_from(ZONES)),
        spine_unit=draw(st.sampled_from(["us", "ns"])),
        null_dtype_keys=draw(st.booleans()),
        features=draw(requested_features(views)),
        full_feature_names=draw(st.booleans()),
    )


# --- building frames and checking answers ---------------------------------------------------


def time_series(
    name: str, values: Sequence[datetime | None], zone: str | None, unit: TimeUnit
) -> pl.Series:
    """UTC instants as a column in ``zone`` (None: naive wall time in UTC)."""
    naive = [None if v is None else v.astimezone(UTC).replace(tzinfo=None) for v in values]
    series = pl.Series(name, naive, dtype=pl.Datetime(unit)).dt.replace_time_zone("UTC")
    if zone is None:
        return series.dt.replace_time_zone(None)
    return series.dt.convert_time_zone(zone)


def in_zone(value: datetime | None, zone: str | None) -> datetime | None:
    """How the reference sees a spine time given in ``zone``: naive UTC, or aware in the zone."""
    if value is None:
        return None
    if zone is None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value.astimezone(ZoneInfo(zone))


def write_frame(case: Case, write: Write) -> pl.DataFrame:
    view = case.views[write.view]
    time_fields = {view.timestamp_field, view.created_timestamp_field}
    columns = []
    for name in write.columns:
        values = [row[name] for row in write.rows]
        if name in time_fields:
            columns.append(time_series(name, values, write.zone, "us"))
        else:
            dtype = KEY_DTYPES.get(name) or case.dtypes[write.view][name]
            columns.append(pl.Series(name, values, dtype=dtype))
    return pl.DataFrame(columns)


def write_data(case: Case, write: Write) -> pl.DataFrame | pl.LazyFrame | pa.Table:
    """The rows of ``write`` in the input type ``write.kind``; row order is write order."""
    frame = write_frame(case, write)
    if write.kind == "frame":
        return frame
    # One chunk (record batch) per row: write order must survive any re-chunking.
    parts = [frame.slice(i, 1) for i in range(frame.height)]
    if write.kind == "chunked":
        return pl.concat(parts, rechunk=False)
    if write.kind == "lazy":
        return pl.concat([part.lazy() for part in parts])
    return pa.Table.from_batches([b for part in parts for b in part.to_arrow().to_batches()])


def spine_frame(case: Case) -> pl.DataFrame:
    dtypes: dict[str, pl.DataType] = {**KEY_DTYPES, "row_id": pl.Int64(), "label": pl.Float64()}
    columns = []
    for name in case.spine_columns:
        values = [row[name] for row in case.spine]
        if name == case.spine_ts:
            columns.append(time_series(name, values, case.spine_zone, case.spine_unit))
        elif name == "created":
            columns.append(time_series(name, values, "Asia/Kolkata", "ms"))
        elif name in KEY_DTYPES and case.null_dtype_keys and all(v is None for v in values):
            columns.append(pl.Series(name, values, dtype=pl.Null()))
        else:
            columns.append(pl.Series(name, values, dtype=dtypes[name]))
    return pl.DataFrame(columns)


def define_views(store: FeatureStore, case: Case) -> None:
    """Apply the case's entities and views to ``store``."""
    entities = {name: Entity(name, join_keys=list(keys)) for name, keys in ENTITY_KEYS.items()}
    objects: list[Any] = [entities[case.entities[name]] for name in case.views]
    for name, view in case.views.items():
        objects.append(
            FeatureView(
                name,
                entities=[entities[case.entities[name]]],
                schema=case.dtypes[name],
                timestamp_field=view.timestamp_field,
                created_timestamp_field=view.created_timestamp_field,
                ttl=view.ttl,
                allow_exact_match=view.allow_exact_match,
            )
        )
    store.apply(objects)


def build_store(path: str, case: Case) -> FeatureStore:
    store = FeatureStore(path)
    define_views(store, case)
    for write in case.writes:
        version = store.write(write.view, write_data(case, write))
        assert isinstance(version, int)
        case.versions.setdefault(write.view, []).append(version)
        if write.compact:
            store.compact(write.view)
    settle()  # the statistics of the last write, before the caller deletes the folder
    return store


def check(
    store: FeatureStore,
    case: Case,
    rows: dict[str, list[dict[str, Any]]],
    *,
    as_of: dict[str, int] | None = None,
) -> None:
    """The library's answer equals the reference's, row for row and column for column."""
    spine = spine_frame(case)
    got = store.get_historical_features(
        spine,
        case.features,
        timestamp_field=case.spine_ts,
        full_feature_names=case.full_feature_names,
        as_of=as_of,
    ).collect()
    reference_spine = [
        {**row, case.spine_ts: in_zone(row[case.spine_ts], case.spine_zone)} for row in case.spine
    ]
    expected = point_in_time(
        reference_spine,
        case.features,
        case.views,
        rows,
        timestamp_field=case.spine_ts,
        full_feature_names=case.full_feature_names,
    )
    resolved = resolve_features(
        case.views, case.features, full_feature_names=case.full_feature_names
    )
    outputs = [output for _, _, output in resolved]

    assert got.columns == spine.columns + outputs
    assert got.height == spine.height
    # Input columns unchanged: same dtypes (time zone and unit included), values and order.
    assert_frame_equal(got.select(spine.columns), spine, check_exact=True)
    for view_name, feature, output in resolved:
        assert got.schema[output] == case.dtypes[view_name][feature], output
        want = [row[output] for row in expected]
        have = got[output].to_list()
        if have != want:
            bad = next(i for i, (h, w) in enumerate(zip(have, want, strict=True)) if h != w)
            msg = (
                f"{output} ({view_name}:{feature}) differs at spine row {bad}: "
                f"got {have[bad]!r}, expected {want[bad]!r}; spine row {case.spine[bad]}"
            )
            raise AssertionError(msg)


def check_read(
    store: FeatureStore,
    case: Case,
    rows: dict[str, list[dict[str, Any]]],
    *,
    as_of: dict[str, int] | None = None,
) -> None:
    """``read`` returns every row written, in tie-breaking order (event, created, write)."""
    for name, view in case.views.items():
        created = view.created_timestamp_field
        columns = [*view.join_keys, view.timestamp_field, *([created] if created else [])]
        columns += list(view.features)

        def order(item: tuple[int, dict[str, Any]], view: RefView = view) -> tuple[Any, ...]:
            i, row = item
            stamp = row[view.created_timestamp_field] if view.created_timestamp_field else None
            return (to_utc(row[view.timestamp_field]), to_utc(stamp) if stamp else None, i)

        ranked = sorted(enumerate(rows[name]), key=order)
        want = [tuple(row[c] for c in columns) for _, row in ranked]
        got = store.read(name, as_of=as_of).select(columns).collect().rows()
        assert got == want, name


def all_rows(case: Case, upto: dict[str, int] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Rows written to each view in write order; with ``upto``, only its first n writes."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in case.views}
    seen: dict[str, int] = dict.fromkeys(case.views, 0)
    for write in case.writes:
        seen[write.view] += 1
        if upto is None or seen[write.view] <= upto[write.view]:
            rows[write.view] += write.rows
    return rows


# --- the properties -------------------------------------------------------------------------


@settings(SETTINGS, max_examples=200)
@given(case=cases(n_views=1))
def test_one_view_matches_reference(case: Case) -> None:
    with tempfile.TemporaryDirectory() as path:
        store = build_store(path, case)
        check(store, case, all_rows(case))
        check_read(store, case, all_rows(case))


@settings(SETTINGS, max_examples=150)
@given(case=cases(n_views=2))
def test_two_views_on_one_spine_match_reference(case: Case) -> None:
    with tempfile.TemporaryDirectory() as path:
        store = build_store(path, case)
        check(store, case, all_rows(case))


@settings(SETTINGS, max_examples=100)
@given(case=cases(n_views=2), data=st.data())
def test_as_of_version_matches_reference_on_earlier_writes(case: Case, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as path:
        store = build_store(path, case)
        upto = {
            name: data.draw(st.integers(1, len(versions)), label=f"writes of {name}")
            for name, versions in case.versions.items()
        }
        as_of = {name: case.versions[name][n - 1] for name, n in upto.items()}
        check(store, case, all_rows(case, upto), as_of=as_of)
        check_read(store, case, all_rows(case, upto), as_of=as_of)


# --- a few fixed edges the properties leave out ----------------------------------------------


def simple_case(spine: list[dict[str, Any]]) -> Case:
    view = RefView("alpha", ("user_id",), ("a0",))
    rows = [
        {"user_id": 1, "event_timestamp": grid(0), "a0": 1.0},
        {"user_id": 1, "event_timestamp": grid(2), "a0": 2.0},
    ]
    return Case(
        views={"alpha": view},
        dtypes={"alpha": {"a0": pl.Float64()}},
        entities={"alpha": "user"},
        writes=[Write("alpha", rows, None, ["user_id", "event_timestamp", "a0"])],
        spine=spine,
        spine_columns=["row_id", "user_id", "item_id", "event_timestamp", "label"],
        spine_ts="event_timestamp",
        spine_zone="UTC",
        spine_unit="us",
        null_dtype_keys=False,
        features=["alpha:a0"],
        full_feature_names=False,
    )


def test_null_spine_timestamp_gives_null_features() -> None:
    spine = [
        {"row_id": i, "user_id": 1, "item_id": None, "event_timestamp": ts, "label": None}
        for i, ts in enumerate([grid(3), None, grid(1), None])
    ]
    case = simple_case(spine)
    with tempfile.TemporaryDirectory() as path:
        check(build_store(path, case), case, all_rows(case))


def test_empty_spine_gives_empty_result_with_all_columns() -> None:
    case = simple_case([])
    with tempfile.TemporaryDirectory() as path:
        check(build_store(path, case), case, all_rows(case))


def test_same_output_name_twice_is_an_error() -> None:
    spine = [{"row_id": 0, "user_id": 1, "item_id": "a", "event_timestamp": grid(3), "label": 1.0}]
    case = simple_case(spine)
    case.views["beta"] = RefView("beta", ("item_id",), ("a0",))
    case.dtypes["beta"] = {"a0": pl.Int64()}
    case.entities["beta"] = "item"
    beta_rows = [{"item_id": "a", "event_timestamp": grid(1), "a0": 5}]
    case.writes.append(Write("beta", beta_rows, "UTC", ["item_id", "event_timestamp", "a0"]))
    case.features = ["alpha:a0", "beta:a0"]
    with tempfile.TemporaryDirectory() as path:
        store = build_store(path, case)
        with pytest.raises(PolarstoreError, match="a0"):
            store.get_historical_features(spine_frame(case), case.features).collect()
        # With full names the two are distinct: alpha__a0 = 2.0 (grid 2 <= grid 3), beta__a0 = 5.
        case.full_feature_names = True
        check(store, case, all_rows(case))


def test_null_key_in_spine_does_not_match_a_null_key_written() -> None:
    spine = [
        {"row_id": i, "user_id": key, "item_id": None, "event_timestamp": grid(3), "label": None}
        for i, key in enumerate([None, 1, None])
    ]
    case = simple_case(spine)
    with tempfile.TemporaryDirectory() as path:
        store = build_store(path, case)
        # Storing a null key may be refused; if it is stored, it must never match (rule 1).
        null_rows = [{"user_id": None, "event_timestamp": grid(2), "a0": 9.0}]
        write = Write("alpha", null_rows, None, ["user_id", "event_timestamp", "a0"])
        try:
            store.write("alpha", write_frame(case, write))
        except PolarstoreError:
            pass
        else:
            case.writes.append(write)
        check(store, case, all_rows(case))


def test_as_of_a_version_that_does_not_exist_is_an_error() -> None:
    spine = [
        {"row_id": 0, "user_id": 1, "item_id": None, "event_timestamp": grid(3), "label": None}
    ]
    case = simple_case(spine)
    with tempfile.TemporaryDirectory() as path:
        store = build_store(path, case)
        missing = case.versions["alpha"][-1] + 1
        with pytest.raises(PolarstoreError, match="alpha"):
            store.get_historical_features(
                spine_frame(case), case.features, as_of={"alpha": missing}
            ).collect()


def test_compact_keeps_the_write_order_of_ties() -> None:
    # Many writes of the same key and event time: the last written row wins (rule 4), before
    # and after compact() ("answers are unchanged"). Each round adds ties and compacts again
    # (a wrong order after a compaction is not certain in one round, so there are several).
    spine = [
        {"row_id": 0, "user_id": 1, "item_id": None, "event_timestamp": grid(3), "label": None}
    ]
    case = simple_case(spine)
    case.writes = []
    columns = ["user_id", "event_timestamp", "a0"]
    with tempfile.TemporaryDirectory() as path:
        store = build_store(path, case)
        for round_ in range(8):
            for i in range(3):
                row = {"user_id": 1, "event_timestamp": grid(1), "a0": float(10 * round_ + i)}
                write = Write("alpha", [row], None, columns)
                store.write("alpha", write_data(case, write))
                case.writes.append(write)
            check(store, case, all_rows(case))
            store.compact("alpha")
            check(store, case, all_rows(case))
