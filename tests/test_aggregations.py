"""Windowed aggregations offline: definitions, apply validation, registry round trip, and
``get_historical_features`` against the plain-loop reference (``reference.window_aggregate``).

Property test: events at microsecond times clustered around a few anchors (many in one
millisecond, exact ties, some with a created time), values with nulls, written in 1-3 batches
with compactions in between; spine times exactly on window edges and 1 µs either side; some
spine keys null or absent; ``as_of`` an earlier version. Float values are multiples of 1/4, so
every sum is exact in any order and sums/means compare exactly; std/var within 1e-9.
"""

from __future__ import annotations

import math
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polarstore import (
    Aggregation,
    AggregationView,
    Entity,
    FeatureStore,
    FeatureView,
    NotFoundError,
    SchemaError,
    ValidationError,
)
from polarstore._offline import OfflineStore
from tests.reference import (
    RefAggregation,
    RefView,
    window_aggregate,
    window_aggregate_in_order,
)

UTC = timezone.utc
T0 = datetime(2024, 3, 10, 6, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
USER = Entity("user", join_keys="user_id")
ORDERS = FeatureView(
    "orders",
    entities=[USER],
    schema={"amount": pl.Float64, "qty": pl.Int64, "item": pl.String, "paid": pl.Boolean},
)


def orders(rows: list[tuple[int | None, datetime, float | None, str | None]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "event_timestamp": [r[1] for r in rows],
            "amount": [r[2] for r in rows],
            "qty": [None if r[2] is None else int(r[2]) for r in rows],
            "item": [r[3] for r in rows],
            "paid": [None if r[2] is None else r[2] > 2 for r in rows],
        },
        schema_overrides={"event_timestamp": pl.Datetime("us", "UTC")},
    )


# --- definitions and apply ------------------------------------------------------------------


def test_names_and_windows() -> None:
    assert Aggregation("amount", "sum", "7d").name == "amount_sum_7d"
    assert Aggregation("amount", "sum", timedelta(days=7)).name == "amount_sum_7d"
    assert Aggregation("amount", "mean", timedelta(hours=36)).name == "amount_mean_1d12h"
    assert Aggregation(None, "count", "1h").name == "count_1h"
    assert Aggregation("amount", "max", "90s", name="peak").name == "peak"
    assert Aggregation("amount", "max", "1w").window == timedelta(days=7)
    assert Aggregation("amount", "max", "1500us").window == timedelta(microseconds=1500)
    assert Aggregation("amount", "max", timedelta(microseconds=3)).name == "amount_max_3us"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"column": "amount", "function": "summ", "window": "1d"}, "unknown function.*'sum'"),
        ({"column": None, "function": "sum", "window": "1d"}, "column=None counts rows"),
        ({"column": "amount", "function": "sum", "window": timedelta(0)}, "must be positive"),
        ({"column": "amount", "function": "sum", "window": "-1d"}, "not a duration"),
        ({"column": "amount", "function": "sum", "window": "1mo"}, "calendar unit 'mo'"),
        ({"column": "amount", "function": "sum", "window": "1y"}, "calendar unit 'y'"),
        ({"column": "amount", "function": "sum", "window": "7 days"}, "not a duration"),
        ({"column": "amount", "function": "sum", "window": "1500ns"}, "whole number of micro"),
        ({"column": "amount", "function": "sum", "window": 7}, "timedelta or a Polars"),
        ({"column": "amount", "function": "sum", "window": "1d", "forward": 1}, "forward must"),
        ({"column": "__x", "function": "sum", "window": "1d"}, "reserved"),
    ],
)
def test_bad_aggregations(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Aggregation(**kwargs)


def test_duplicate_output_names() -> None:
    with pytest.raises(ValidationError, match="two aggregations have the output name 'x'"):
        AggregationView(
            "a",
            "orders",
            [
                Aggregation("amount", "sum", "1d", name="x"),
                Aggregation(None, "count", "1d", name="x"),
            ],
        )
    with pytest.raises(ValidationError, match=r"'amount_sum_1d'.*pass name="):
        AggregationView("a", "orders", [Aggregation("amount", "sum", "1d")] * 2)


def test_apply_checks_columns_and_dtypes(store: FeatureStore) -> None:
    store.apply([USER, ORDERS])
    with pytest.raises(NotFoundError, match=r"column 'amont'.*Did you mean 'amount'"):
        store.apply(AggregationView("a", "orders", [Aggregation("amont", "sum", "1d")]))
    with pytest.raises(NotFoundError, match="'user_id' is a join key or timestamp"):
        store.apply(AggregationView("a", "orders", [Aggregation("user_id", "sum", "1d")]))
    with pytest.raises(SchemaError, match="sum does not apply to column 'item' of dtype String"):
        store.apply(AggregationView("a", "orders", [Aggregation("item", "sum", "1d")]))
    with pytest.raises(NotFoundError, match=r"source 'order'.*Did you mean 'orders'"):
        store.apply(AggregationView("a", "order", [Aggregation("amount", "sum", "1d")]))
    with pytest.raises(ValidationError, match="there is a feature view of that name"):
        store.apply(AggregationView("orders", "orders", [Aggregation("amount", "sum", "1d")]))
    assert store.list_aggregation_views() == []  # nothing half-applied


def test_registry_round_trip(tmp_path: Path) -> None:
    view = AggregationView(
        "spend",
        ORDERS,  # the source given as an object: registered with it
        [
            Aggregation("amount", "sum", "7d"),
            Aggregation(None, "count", timedelta(microseconds=1)),
            Aggregation("item", "count_distinct", "1d12h", name="items"),
            Aggregation("amount", "max", "30d", forward=True, name="label"),
        ],
        online=False,
        description="spend",
        owner="me",
        tags={"a": "b"},
    )
    FeatureStore(tmp_path).apply([view])
    again = FeatureStore(tmp_path)
    [loaded] = again.list_aggregation_views()
    assert loaded == view.resolve({"orders": again.get_feature_view("orders")})
    assert loaded.schema == {
        "amount_sum_7d": pl.Float64,
        "count_1us": pl.Int64,
        "items": pl.Int64,
        "label": pl.Float64,
    }
    assert again.describe("spend")["source"] == "orders"


def test_dtypes_of_outputs(store: FeatureStore) -> None:
    aggs = [
        Aggregation("qty", "sum", "1d"),
        Aggregation("paid", "sum", "1d"),
        Aggregation("qty", "mean", "1d"),
        Aggregation("qty", "min", "1d"),
        Aggregation("item", "last", "1d"),
        Aggregation("qty", "std", "1d"),
        Aggregation("item", "count", "1d"),
    ]
    store.apply([USER, ORDERS, AggregationView("a", "orders", aggs)])
    assert store.describe("a")["schema"] == {
        "qty_sum_1d": pl.Int64,
        "paid_sum_1d": pl.Int64,
        "qty_mean_1d": pl.Float64,
        "qty_min_1d": pl.Int64,
        "item_last_1d": pl.String,
        "qty_std_1d": pl.Float64,
        "item_count_1d": pl.Int64,
    }


# --- offline --------------------------------------------------------------------------------


def test_windows_are_right_closed_and_labels_forward(store: FeatureStore) -> None:
    day = timedelta(days=1)
    view = AggregationView(
        "spend",
        "orders",
        [
            Aggregation("amount", "sum", "1d"),
            Aggregation(None, "count", "1d"),
            Aggregation("amount", "sum", "1d", forward=True, name="next_day"),
        ],
    )
    store.apply([USER, ORDERS, view])
    store.write("orders", orders([(1, T0, 1.0, "a"), (1, T0 + day, 2.0, "b")]))
    spine = pl.DataFrame(
        {"user_id": [1, 1, 1, 1], "event_timestamp": [T0 - US, T0, T0 + day - US, T0 + day]}
    )
    got = store.get_historical_features(spine, ["spend:*"]).collect()
    # (t - 1d, t]: the event at t counts, the one at exactly t - 1d does not.
    assert got["amount_sum_1d"].to_list() == [None, 1.0, 1.0, 2.0]
    assert got["count_1d"].to_list() == [0, 1, 1, 1]
    # (t, t + 1d]: the event at t does not count, the one at t + 1d does.
    assert got["next_day"].to_list() == [1.0, 2.0, 2.0, None]


def test_composes_with_plain_features_and_saves(store: FeatureStore) -> None:
    profile = FeatureView("profile", entities=[USER], schema={"age": pl.Int64})
    spend = AggregationView("spend", "orders", [Aggregation("amount", "sum", "2d")])
    store.apply([USER, ORDERS, profile, spend])
    store.write("orders", orders([(1, T0, 1.0, "a"), (2, T0, 4.0, "b")]))
    store.write(
        "profile", pl.DataFrame({"user_id": [1, 2], "age": [30, 40], "event_timestamp": [T0, T0]})
    )
    spine = pl.DataFrame({"user_id": [2, 1, 3], "event_timestamp": [T0, T0, T0]})
    got = store.get_historical_features(
        spine, ["profile:age", "spend:amount_sum_2d"], full_feature_names=True
    ).collect()
    assert got.columns == ["user_id", "event_timestamp", "profile__age", "spend__amount_sum_2d"]
    assert got.rows() == [
        (2, T0, 40, 4.0),
        (1, T0, 30, 1.0),
        (3, T0, None, None),
    ]
    store.save_dataset("train", spine, ["spend:*"])
    store.write("orders", orders([(1, T0, 100.0, "c")]))  # a late event
    assert store.load_dataset("train").collect()["amount_sum_2d"].to_list() == [4.0, 1.0, None]
    now = store.get_historical_features(spine, ["spend:*"]).collect()
    assert now["amount_sum_2d"].to_list() == [4.0, 101.0, None]
    assert store.get_historical_features(spine, ["spend:*"], as_of={"orders": 0}).collect()[
        "amount_sum_2d"
    ].to_list() == [4.0, 1.0, None]
    with pytest.raises(ValidationError, match="bitemporal=True does not apply to aggregation"):
        store.get_historical_features(spine, ["spend:*"], bitemporal=True)


def test_reads_only_the_window_range_and_columns(
    store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    spend = AggregationView(
        "spend",
        "orders",
        [Aggregation("amount", "sum", "2d"), Aggregation("qty", "max", "3d", forward=True)],
    )
    store.apply([USER, ORDERS, spend])
    store.write("orders", orders([(1, T0, 1.0, "a")]))
    seen: list[dict[str, Any]] = []
    scan = OfflineStore.scan

    def spy(self: OfflineStore, view: FeatureView, **kw: Any) -> Any:
        seen.append(kw)
        return scan(self, view, **kw)

    monkeypatch.setattr(OfflineStore, "scan", spy)
    spine = pl.DataFrame(
        {"user_id": [1, 1], "event_timestamp": [T0 + timedelta(days=5), T0 + timedelta(days=9)]}
    )
    store.get_historical_features(spine, ["spend:*"]).collect()
    [kw] = seen
    assert kw["since"] == T0 + timedelta(days=3)
    assert kw["until"] == T0 + timedelta(days=12)
    assert kw["columns"] == ["user_id", "event_timestamp", "amount", "qty"]


# --- property test against the reference ----------------------------------------------------

WINDOWS = [
    US,
    timedelta(microseconds=999),
    timedelta(milliseconds=1),
    timedelta(seconds=1),
    timedelta(minutes=15),
    timedelta(hours=1),
]
ANCHORS = [T0, T0 + timedelta(minutes=15), T0 + timedelta(hours=1)]
EDGES_US = [0, 1, 2, 999, 1000, 1001]
COLUMN_FUNCTIONS = {
    None: ["count"],
    "amount": [
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
    ],
    "qty": ["sum", "mean", "min", "max", "first", "last", "count_distinct"],
    "item": ["count", "min", "max", "first", "last", "count_distinct"],
    "paid": ["sum", "mean", "first", "last", "count_distinct"],
}

times = st.builds(
    lambda a, e: a + timedelta(microseconds=e),
    st.sampled_from(ANCHORS),
    st.sampled_from(EDGES_US) | st.integers(0, 3000),
)
amounts = st.none() | st.integers(-40, 40).map(lambda k: k / 4)
events = st.tuples(
    st.sampled_from([1, 2, 3]), times, amounts, st.none() | st.sampled_from(["a", "b", "é", ""])
)
aggregations = st.sampled_from(list(COLUMN_FUNCTIONS)).flatmap(
    lambda c: st.tuples(
        st.just(c), st.sampled_from(COLUMN_FUNCTIONS[c]), st.sampled_from(WINDOWS), st.booleans()
    )
)


# The parts of a reference case besides its aggregations (test_spark draws the same ones).
CASE_PARTS: dict[str, st.SearchStrategy[Any]] = {
    "batches": st.lists(st.lists(events, min_size=0, max_size=12), min_size=1, max_size=3),
    "compact_after": st.sets(st.integers(0, 2)),
    "spine_keys": st.lists(st.sampled_from([1, 2, 3, 4, None]), min_size=1, max_size=8),
    "shifts": st.lists(
        st.tuples(st.integers(0, 99), st.sampled_from([-1, 0, 1])), min_size=8, max_size=8
    ),
    "created": st.booleans(),
    "pin": st.booleans(),
}


def _close(got: Any, want: Any, function: str) -> bool:
    if got is None or want is None:
        return got is want
    if function in ("std", "var"):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
    return bool(got == want and type(got) is type(want))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(**CASE_PARTS, picked=st.lists(aggregations, min_size=1, max_size=5))
def test_matches_reference(
    batches: list[list[tuple[int, datetime, float | None, str | None]]],
    compact_after: set[int],
    picked: list[tuple[str | None, str, timedelta, bool]],
    spine_keys: list[int | None],
    shifts: list[tuple[int, int]],
    created: bool,
    pin: bool,
) -> None:
    with tempfile.TemporaryDirectory() as tmp, FeatureStore(tmp) as store:
        view, aggs, spine, rows, as_of = play_case(
            store, picked, batches, compact_after, spine_keys, shifts, created, pin
        )
        got = store.get_historical_features(spine, ["w:*"], as_of=as_of).collect()
    check_reference(view, aggs, spine, rows, got)


def case_definitions(
    picked: list[tuple[str | None, str, timedelta, bool]], created: bool
) -> tuple[FeatureView, list[Aggregation]]:
    """The source view (with a created time or not) and the picked aggregations."""
    view = FeatureView(
        "orders",
        entities=[USER],
        schema=ORDERS.schema,
        created_timestamp_field="created" if created else None,
    )
    aggs = [
        Aggregation(c, f, w, name=f"a{i}", forward=fwd)  # type: ignore[arg-type]
        for i, (c, f, w, fwd) in enumerate(picked)
    ]
    return view, aggs


def write_case(
    store: FeatureStore,
    batches: list[list[tuple[int, datetime, float | None, str | None]]],
    compact_after: set[int],
    created: bool,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Write the batches (compacting after some); the rows written and the versions."""
    written: list[dict[str, Any]] = []
    versions: list[int] = []
    for b, batch in enumerate(batches):
        frame = orders(batch)
        if created:  # a created time that reorders ties: later for odd quantities
            frame = frame.with_columns(
                created=pl.col("event_timestamp")
                + pl.duration(microseconds=pl.col("qty").fill_null(0) % 2)
            )
        if frame.height:
            versions.append(store.write("orders", frame))
            written += frame.to_dicts()
            if b in compact_after:
                store.compact("orders")
    return written, versions


def edge_spine(
    written: list[dict[str, Any]],
    aggs: list[Aggregation],
    spine_keys: list[int | None],
    shifts: list[tuple[int, int]],
) -> pl.DataFrame:
    """Spine times on window edges of written events, and 1 µs either side; a row_id."""
    event_times = [r["event_timestamp"] for r in written] or [T0]
    spine_times = []
    for i, (pick, delta) in enumerate(shifts):
        window = aggs[i % len(aggs)].span
        edge = (window, -window, timedelta(0))[i % 3]
        spine_times.append(event_times[pick % len(event_times)] + edge + delta * US)
    return pl.DataFrame(
        {
            "row_id": range(len(spine_times)),
            "user_id": [spine_keys[i % len(spine_keys)] for i in range(len(spine_times))],
            "event_timestamp": spine_times,
        },
        schema_overrides={"user_id": pl.Int64, "event_timestamp": pl.Datetime("us", "UTC")},
    )


def pinned_rows(
    batches: list[list[Any]], written: list[dict[str, Any]], versions: list[int], pin: bool
) -> tuple[list[dict[str, Any]], dict[str, int] | None]:
    """The rows a query sees and its ``as_of``: with ``pin``, as of the first write."""
    if pin and len(versions) > 1:
        return written[: len(next(b for b in batches if b))], {"orders": versions[0]}
    return written, None


def play_case(
    store: FeatureStore,
    picked: list[tuple[str | None, str, timedelta, bool]],
    batches: list[list[tuple[int, datetime, float | None, str | None]]],
    compact_after: set[int],
    spine_keys: list[int | None],
    shifts: list[tuple[int, int]],
    created: bool,
    pin: bool,
) -> tuple[FeatureView, list[Aggregation], pl.DataFrame, list[dict[str, Any]], Any]:
    """Apply a case's views (aggregation view ``w``) and write its batches: the source view,
    the aggregations, the spine, the rows a query sees and its ``as_of``."""
    view, aggs = case_definitions(picked, created)
    store.apply([USER, view, AggregationView("w", "orders", aggs)])
    written, versions = write_case(store, batches, compact_after, created)
    spine = edge_spine(written, aggs, spine_keys, shifts)
    rows, as_of = pinned_rows(batches, written, versions, pin)
    return view, aggs, spine, rows, as_of


def check_reference(
    view: FeatureView,
    aggs: list[Aggregation],
    spine: pl.DataFrame,
    rows: list[dict[str, Any]],
    got: pl.DataFrame,
) -> None:
    """Every aggregate of every spine row (``got`` in spine order) against the reference."""
    ref_view = RefView(
        "orders",
        ("user_id",),
        tuple(ORDERS.schema),
        created_timestamp_field=view.created_timestamp_field,
    )
    for i, spine_row in enumerate(spine.to_dicts()):
        for agg in aggs:
            ref = RefAggregation(agg.column, agg.function, agg.window, agg.forward)  # type: ignore[arg-type]
            want = window_aggregate(
                ref_view, rows, [spine_row["user_id"]], spine_row["event_timestamp"], ref
            )
            if want is not None and agg.function in ("mean", "std", "var"):
                want = float(want)
            assert _close(got[agg.feature][i], want, agg.function), (i, agg, spine_row, want)


HARD_FLOATS = [0.0, -0.0, 1.5, -2.25, 1e300, -1e300, math.inf, -math.inf, math.nan, 5e-324]
HARD_INTS = [-(2**63), 2**63 - 1, 0, -1, 3, 2**40]
# Far apart, so the keys are numbered by a join rather than by their offset from the smallest;
# events have the first and the last, the spine all of them.
SPARSE_KEYS = [-(2**62), 7, 10**15, 2**62]
HARD = FeatureView("hard", entities=[USER], schema={"x": pl.Float64, "n": pl.Int64})
HARD_FUNCTIONS = {
    "x": ["count", "sum", "mean", "min", "max", "std", "var", "first", "last", "count_distinct"],
    "n": ["sum", "mean", "min", "max", "std", "first", "last", "count_distinct"],
}
HARD_WINDOWS = [US, timedelta(milliseconds=1), timedelta(seconds=1)]


hard_rows = st.lists(
    st.tuples(
        st.sampled_from(SPARSE_KEYS[::3]),
        st.builds(lambda e: T0 + e * US, st.sampled_from(EDGES_US) | st.integers(0, 1500)),
        st.sampled_from([None, *HARD_FLOATS, math.nan, math.nan]),
        st.sampled_from([None, *HARD_INTS]),
    ),
    max_size=40,
)
HARD_SCHEMA = {
    "user_id": pl.Int64,
    "event_timestamp": pl.Datetime("us", "UTC"),
    "x": pl.Float64,
    "n": pl.Int64,
}


def same_value(got: Any, want: Any, function: str) -> bool:
    """Equal, NaN equal to NaN; std/var (rounded twice) within 1e-9 relative."""
    if got is None or want is None:
        return got is want
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    if function in ("std", "var") and math.isfinite(want):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-300)
    return bool(got == want)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    rows=hard_rows,
    spine_picks=st.lists(
        st.tuples(
            st.integers(0, 99),
            st.sampled_from([*SPARSE_KEYS, 8, None, "event", "event", "event"]),
            st.sampled_from(HARD_WINDOWS),
            st.sampled_from([-1, 0, 1]) | st.integers(-1500, 1500),
        ),
        min_size=1,
        max_size=12,
    ),
    forward=st.booleans(),
)
def test_hard_values_match_the_in_order_reference(
    rows: list[tuple[int, datetime, float | None, int | None]],
    spine_picks: list[tuple[int, Any, timedelta, int]],
    forward: bool,
) -> None:
    """NaN, ±inf, -0.0, overflow, the Int64 extremes and sparse keys, against the reference's
    in-order arithmetic (``window_aggregate_in_order``): every aggregate of both columns over
    a microsecond, a millisecond and a second, spine times on edges, 1 µs either side and
    in between."""
    aggs = [
        Aggregation(c, f, w, name=f"{c}_{f}_{i}", forward=forward and f != "count")  # type: ignore[arg-type]
        for c, functions in HARD_FUNCTIONS.items()
        for f in functions
        for i, w in enumerate(HARD_WINDOWS)
    ]
    frame = pl.DataFrame(rows, schema=HARD_SCHEMA, orient="row")
    spine_rows = []
    for pick, key, window, delta in spine_picks:
        event = rows[pick % len(rows)] if rows else (7, T0, None, None)
        at = event[1] + (window if pick % 2 else timedelta(0)) + delta * US
        spine_rows.append((event[0] if key == "event" else key, at))
    spine = pl.DataFrame(
        spine_rows,
        schema={"user_id": pl.Int64, "event_timestamp": pl.Datetime("us", "UTC")},
        orient="row",
    )
    with tempfile.TemporaryDirectory() as tmp, FeatureStore(tmp) as store:
        store.apply([USER, HARD, AggregationView("h", "hard", aggs)])
        if rows:
            store.write("hard", frame)
        got = store.get_historical_features(spine, ["h:*"]).collect()
    ref_view = RefView("hard", ("user_id",), tuple(HARD.schema))
    written = frame.to_dicts()
    for i, spine_row in enumerate(spine.to_dicts()):
        for agg in aggs:
            ref = RefAggregation(agg.column, agg.function, agg.span, agg.forward)  # type: ignore[arg-type]
            want = window_aggregate_in_order(
                ref_view, written, [spine_row["user_id"]], spine_row["event_timestamp"], ref
            )
            assert same_value(got[agg.feature][i], want, agg.function), (i, agg, spine_row, want)


def test_count_distinct_counts_a_value_after_nulls(store: FeatureStore) -> None:
    """Nulls never count and never hide a value: a null just before the column's smallest
    value, inside the window, once made that value look like a repeat (found by the online
    parity property)."""
    aggs = [Aggregation(c, "count_distinct", "1ms", name=c) for c in ("qty", "amount", "item")]
    store.apply([USER, ORDERS, AggregationView("d", "orders", aggs)])
    rows = [(1, T0, None, None), (1, T0 + 500 * US, None, None), (1, T0 + 501 * US, 0.0, "a")]
    rows += [(2, T0 + 600 * US, 3.0, "b")]
    store.write("orders", orders(rows))
    spine = pl.DataFrame(
        {"user_id": [1, 1, 2], "event_timestamp": [T0 + 501 * US, T0 + 500 * US, T0 + 600 * US]}
    )
    got = store.get_historical_features(spine, ["d:*"]).collect()
    ref_view = RefView("orders", ("user_id",), tuple(ORDERS.schema))
    written = orders(rows).to_dicts()
    for column in ("qty", "amount", "item"):
        ref = RefAggregation(column, "count_distinct", timedelta(milliseconds=1), False)
        want = [
            window_aggregate(ref_view, written, [r["user_id"]], r["event_timestamp"], ref)
            for r in spine.to_dicts()
        ]
        assert got[column].to_list() == want == [1, 0, 1], column


def test_compound_string_keys(store: FeatureStore) -> None:
    """Keys numbered by a join (strings, compound keys): same answers as integer keys."""
    pair = Entity("pair", join_keys=["user_id", "shop"])
    visits = FeatureView("visits", entities=[pair], schema={"amount": pl.Float64})
    aggs = [Aggregation("amount", f, "1h", name=f) for f in ("sum", "count", "last")]
    store.apply([pair, visits, AggregationView("v", "visits", aggs)])
    hour = timedelta(hours=1)
    rows = [
        (1, "a", T0, 1.0),
        (1, "a", T0 + hour, 2.0),
        (1, "b", T0, 4.0),
        (2, "a", T0, 8.0),
        (1, "a", T0 + hour, 16.0),  # a tie: written last, so it is the last one
    ]
    store.write(
        "visits",
        pl.DataFrame(rows, schema=["user_id", "shop", "event_timestamp", "amount"], orient="row"),
    )
    spine = pl.DataFrame(
        {
            "user_id": [1, 1, 1, 2, 3, None],
            "shop": ["a", "a", "b", "a", "a", "a"],
            "event_timestamp": [T0, T0 + hour, T0 + hour, T0 + hour - US, T0, T0],
        }
    )
    got = store.get_historical_features(spine, ["v:*"]).collect()
    assert got.select("sum", "count", "last").rows() == [
        (1.0, 1, 1.0),
        (18.0, 2, 16.0),
        (None, 0, None),
        (8.0, 1, 8.0),
        (None, 0, None),
        (None, 0, None),
    ]


def test_services_search_and_describe_know_aggregation_views(store: FeatureStore) -> None:
    from polarstore import FeatureService

    spend = AggregationView("spend", "orders", [Aggregation("amount", "sum", "2d")], owner="ds")
    store.apply([USER, ORDERS, spend, FeatureService("churn", ["spend:*", "orders:qty"])])
    store.write("orders", orders([(1, T0, 1.0, "a")]))
    spine = pl.DataFrame({"user_id": [1], "event_timestamp": [T0]})
    assert store.get_historical_features(spine, "churn").collect().row(0)[2:] == (1.0, 1)
    assert [d.name for d in store.search("amount_sum")] == ["spend"]
    with pytest.raises(NotFoundError, match=r"no feature 'amount_sum_3d'.*'amount_sum_2d'"):
        store.get_historical_features(spine, ["spend:amount_sum_3d"])
    info = store.describe("spend")
    assert (info["source"], info["owner"], info["materialized_version"]) == ("orders", "ds", None)
