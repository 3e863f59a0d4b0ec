"""Aggregation views online: the window state kept by ``materialize`` answers exactly what
``get_historical_features`` answers at ``now`` (SPEC, "Windowed aggregations": parity at any
``now >= T``), incrementally, atomically (SIGKILL mid-sync), and never from the future.

Property test: events at microsecond times (ties, nulls) written in several batches, with a
``materialize`` after some of them (so the state is merged incrementally, late events
included), then lookups at random ``now >= T`` — on window edges of the events, 1 µs either
side, and later — by both online paths, compared with the offline answer at ``now``.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from polarstore import (
    Aggregation,
    AggregationView,
    FeatureStore,
    FeatureView,
    SchemaError,
    ValidationError,
    _windows,
)

from . import _online_procs as procs
from ._procs import T0, USER, Log, kill_after
from .test_aggregations import (
    HARD,
    HARD_FUNCTIONS,
    HARD_SCHEMA,
    HARD_WINDOWS,
    ORDERS,
    SPARSE_KEYS,
    aggregations,
    events,
    hard_rows,
    orders,
    same_value,
)

US = timedelta(microseconds=1)


def _same(online: Any, offline: Any, function: str) -> bool:
    if online is None or offline is None:
        return online is offline
    if function in ("std", "var", "mean") or isinstance(offline, float):
        return math.isclose(online, offline, rel_tol=1e-9, abs_tol=1e-12)
    return bool(online == offline)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    batches=st.lists(st.lists(events, min_size=1, max_size=10), min_size=1, max_size=4),
    unsynced=st.sets(st.integers(0, 3), max_size=2),
    delete_after=st.sets(st.integers(0, 3), max_size=1),
    picked=st.lists(aggregations, min_size=1, max_size=5),
    nows=st.lists(
        st.tuples(st.integers(0, 99), st.sampled_from([-1, 0, 1])), min_size=3, max_size=3
    ),
    compact=st.booleans(),
    tail_events=st.sampled_from([0, 1, 3, 16]),
    in_order=st.booleans(),
)
def test_online_equals_offline_at_now(
    batches: list[list[tuple[int, datetime, float | None, str | None]]],
    unsynced: set[int],
    delete_after: set[int],
    picked: list[tuple[str | None, str, timedelta, bool]],
    nows: list[tuple[int, int]],
    compact: bool,
    tail_events: int,
    in_order: bool,
) -> None:
    """Incremental syncs append to tails (merged into the main value past ``tail_events``;
    0: always), late events merge, a delete of user 1 reaches main values and tails. With
    ``in_order``, the events are sorted by time and dealt into batches of the same sizes, so
    syncs bring mostly events after the synced ones (the tail path)."""
    if in_order:
        flat = iter(sorted((e for batch in batches for e in batch), key=lambda e: e[1]))
        batches = [[next(flat) for _ in batch] for batch in batches]
    aggs = [
        Aggregation(c, f, w, name=f"a{i}")  # type: ignore[arg-type]
        for i, (c, f, w, _) in enumerate(picked)
    ]
    features = [f"w:{a.feature}" for a in aggs]
    with (
        tempfile.TemporaryDirectory() as tmp,
        FeatureStore(tmp) as store,
        mock.patch.object(_windows, "_TAIL_EVENTS", tail_events),
    ):
        store.apply([USER, ORDERS, AggregationView("w", "orders", aggs)])
        for b, batch in enumerate(batches):
            store.write("orders", orders(batch))
            if b not in unsynced:
                store.materialize()
            if b in delete_after:
                store.delete_entities("orders", {"user_id": [1]})
        if compact:
            store.compact("orders")
        store.materialize()
        times = [t for batch in batches for _, t, _, _ in batch]
        latest = max(times)
        users = [{"user_id": u} for u in (1, 2, 3, 4)]
        for pick, delta in nows:
            base = times[pick % len(times)] + aggs[pick % len(aggs)].span
            now = max(latest, base + delta * US)
            online = store.get_online_features(users, features, now=now)
            spine = pl.DataFrame({"user_id": [1, 2, 3, 4], "event_timestamp": [now] * 4})
            offline = store.get_historical_features(spine, features).collect()
            for i, user in enumerate(users):
                vector = store.get_feature_vector(user, features, now=now)
                for agg in aggs:
                    want = offline[agg.feature][i]
                    assert _same(online[agg.feature][i], want, agg.function), (agg, now, user)
                    assert _same(vector[agg.feature], want, agg.function), (agg, now, user)
            assert online.schema == pl.Schema(
                {"user_id": pl.Int64, **{a.feature: offline.schema[a.feature] for a in aggs}}
            )


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(rows=hard_rows, cut=st.integers(0, 40), later=st.sampled_from([0, 1, 999, 10**6]))
@example(  # cancellation, then inf - inf: fsum gave 1.5 against 0.0, then raised
    rows=[
        (SPARSE_KEYS[0], T0 + i * US, x, n)
        for i, (x, n) in enumerate(
            [
                *[(1e300, 2**63 - 1), (1.5, 2**63 - 1), (-1e300, 3), (math.nan, None)],
                *[(math.inf, -(2**63)), (-math.inf, -1), (-0.0, 0), (0.0, 0)],
            ]
        )
    ],
    cut=3,
    later=0,
)
def test_online_equals_offline_for_hard_values(
    rows: list[tuple[int, datetime, float | None, int | None]], cut: int, later: int
) -> None:
    """NaN, ±inf, -0.0, overflow and the Int64 extremes: online answers what offline answers
    at ``now``, exactly (same arithmetic: sums in tie order, NaN-skipping min/max, NaN counted
    once), where ``math.fsum`` raised on ``inf - inf`` and on an overflow. Two syncs: the
    second one appends to tails or merges."""
    aggs = [
        Aggregation(c, f, w, name=f"{c}_{f}_{i}")  # type: ignore[arg-type]
        for c, functions in HARD_FUNCTIONS.items()
        for f in functions
        for i, w in enumerate(HARD_WINDOWS)
    ]
    features = [f"h:{a.feature}" for a in aggs]
    frame = pl.DataFrame(rows, schema=HARD_SCHEMA, orient="row")
    with tempfile.TemporaryDirectory() as tmp, FeatureStore(tmp) as store:
        store.apply([USER, HARD, AggregationView("h", "hard", aggs)])
        for part in (frame[:cut], frame[cut:]):
            if part.height:
                store.write("hard", part)
                store.materialize()
        now = (max(r[1] for r in rows) if rows else T0) + later * US
        users = [{"user_id": u} for u in SPARSE_KEYS]
        online = store.get_online_features(users, features, now=now)
        spine = pl.DataFrame({"user_id": SPARSE_KEYS, "event_timestamp": [now] * len(users)})
        offline = store.get_historical_features(spine, features).collect()
        for i, user in enumerate(users):
            vector = store.get_feature_vector(user, features, now=now)
            for agg in aggs:
                want = offline[agg.feature][i]
                assert same_value(online[agg.feature][i], want, agg.function), (agg, user)
                assert same_value(vector[agg.feature], want, agg.function), (agg, user)


@pytest.fixture
def spend_store(store: FeatureStore) -> FeatureStore:
    spend = AggregationView(
        "spend",
        "orders",
        [
            Aggregation("amount", "sum", "1h"),
            Aggregation(None, "count", "1h"),
            Aggregation("item", "last", "1h"),
            Aggregation("amount", "sum", "1d", forward=True, name="next_day"),
        ],
    )
    store.apply([USER, ORDERS, spend])
    return store


def test_events_after_now_never_count(spend_store: FeatureStore) -> None:
    store = spend_store
    store.write("orders", orders([(1, T0, 1.0, "a"), (1, T0 + timedelta(minutes=30), 2.0, "b")]))
    store.materialize()
    feats = ["spend:amount_sum_1h", "spend:count_1h", "spend:item_last_1h"]
    # The state keeps the events after T - W (T = T0 + 30 min, W = 1 h): before T a 1-hour
    # window could need events it dropped, so an earlier now is refused, not answered wrong.
    before = T0 + timedelta(minutes=30) - US
    with pytest.raises(ValidationError, match=r"answers for now >= 2024-01-01T00:30:00"):
        store.get_feature_vector({"user_id": 1}, feats, now=before)
    with pytest.raises(ValidationError, match=r"answers for now >= 2024-01-01T00:30:00"):
        store.get_online_features({"user_id": [1]}, feats, now=before)
    with pytest.raises(ValidationError, match=r"answers for now >= 2024-01-01T00:30:00"):
        store.get_feature_vector({"user_id": 9}, feats, now=before)  # no events kept for 9
    at = T0 + timedelta(minutes=30)
    assert store.get_feature_vector({"user_id": 1}, feats, now=at) == {
        "amount_sum_1h": 3.0,
        "count_1h": 2,
        "item_last_1h": "b",
    }
    later = T0 + timedelta(hours=1)  # (T0, T0 + 1 h]: the first event has left the window
    assert store.get_online_features({"user_id": [1]}, feats, now=later).row(0) == (1, 2.0, 1, "b")
    # An entity with no events gets what an empty window gets.
    assert store.get_feature_vector({"user_id": 9}, feats, now=at) == {
        "amount_sum_1h": None,
        "count_1h": 0,
        "item_last_1h": None,
    }


def test_forward_labels_are_refused_online(spend_store: FeatureStore) -> None:
    store = spend_store
    store.write("orders", orders([(1, T0, 1.0, "a")]))
    store.materialize()
    with pytest.raises(ValidationError, match=r"spend:next_day is a forward aggregation"):
        store.get_feature_vector({"user_id": 1}, ["spend:next_day"], now=T0)
    with pytest.raises(ValidationError, match=r"spend:next_day is a forward aggregation"):
        store.get_online_features({"user_id": 1}, ["spend:*"], now=T0)


def test_materialize_is_incremental_and_honours_end(spend_store: FeatureStore) -> None:
    store = spend_store
    store.write("orders", orders([(1, T0, 1.0, "a"), (2, T0, 5.0, "x")]))
    assert store.materialize()["spend"]["rows_read"] == 2
    store.write("orders", orders([(1, T0 + timedelta(minutes=10), 2.0, "b")]))
    store.write("orders", orders([(1, T0 + timedelta(hours=3), 4.0, "c")]))
    summary = store.materialize(end=T0 + timedelta(hours=1))["spend"]
    assert (summary["rows_read"], summary["entities_written"]) == (1, 1)  # user 2 untouched
    now = T0 + timedelta(minutes=20)
    feats = ["spend:amount_sum_1h", "spend:count_1h"]
    assert store.get_feature_vector({"user_id": 1}, feats, now=now) == {
        "amount_sum_1h": 3.0,
        "count_1h": 2,
    }
    later = T0 + timedelta(hours=3)  # the event at 3h is after end: not synced yet
    assert store.get_feature_vector({"user_id": 1}, feats, now=later)["count_1h"] == 0
    assert store.materialize()["spend"]["rows_read"] == 1
    assert store.get_feature_vector({"user_id": 1}, feats, now=later) == {
        "amount_sum_1h": 4.0,
        "count_1h": 1,
    }
    assert store.materialize()["spend"]["rows_read"] == 0
    assert store.get_feature_vector({"user_id": 2}, feats, now=later)["count_1h"] == 0


def test_delete_entities_reaches_the_window_state(spend_store: FeatureStore) -> None:
    store = spend_store
    store.write("orders", orders([(1, T0, 1.0, "a"), (2, T0, 5.0, "x")]))
    store.materialize()
    store.delete_entities("orders", {"user_id": 1})
    feats = ["spend:count_1h"]
    assert store.get_feature_vector({"user_id": 1}, feats, now=T0) == {"count_1h": 0}
    assert store.get_feature_vector({"user_id": 2}, feats, now=T0) == {"count_1h": 1}
    store.materialize()
    assert store.get_feature_vector({"user_id": 1}, feats, now=T0) == {"count_1h": 0}


def test_offline_only_aggregation_views(store: FeatureStore) -> None:
    source = FeatureView("orders", entities=[USER], schema=ORDERS.schema, online=False)
    view = AggregationView("spend", source, [Aggregation(None, "count", "1h")], online=False)
    store.apply([view])
    store.write("orders", orders([(1, T0, 1.0, "a")]))
    assert store.materialize() == {}
    with pytest.raises(ValidationError, match=r"\['spend'\] are not online"):
        store.get_feature_vector({"user_id": 1}, ["spend:count_1h"])
    store.apply(AggregationView("spend", source, [Aggregation(None, "count", "1h")]))
    assert store.materialize()["spend"]["rows_read"] == 1  # online: whatever the source says


# --- a SIGKILL during an aggregation materialize --------------------------------------------

WINDOWED = AggregationView(
    "big_windows",
    "big",
    [
        Aggregation(None, "count", "1h"),
        Aggregation("gen", "max", "1h"),
        Aggregation("gen", "min", "1h"),
        Aggregation("x", "sum", "1h"),
        Aggregation("s", "last", "1h"),
    ],
)


def _check_windows(store: FeatureStore, version: int) -> None:
    """The window state is exactly the sync of ``version``: every user's last hour holds only
    batch ``version`` (6 events) and equals the offline answer pinned to that version."""
    users = pl.DataFrame({"user_id": [*range(0, procs.BIG_USERS, 97), -1]})
    now = procs.big_latest(version)
    online = store.get_online_features(users, ["big_windows:*"], now=now)
    assert online["gen_max_1h"].head(-1).unique().to_list() == [version]
    assert online["gen_min_1h"].head(-1).unique().to_list() == [version]
    spine = users.with_columns(event_timestamp=pl.lit(now))
    offline = store.get_historical_features(
        spine, ["big_windows:*"], as_of={"big": version}
    ).collect()
    assert online.rows() == offline.drop("event_timestamp").rows()


def test_materialize_of_windows_killed_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(7)
    repo = tmp_path / "repo"
    with FeatureStore(repo) as store:
        store.apply([USER, procs.BIG, WINDOWED])
        store.write("big", procs.big_batch(0))
        store.materialize()
        _check_windows(store, 0)
    kills = 3
    for kill in range(1, kills + 1):
        with FeatureStore(repo) as store:
            before = store.describe("big_windows")["materialized_version"]
            assert store.write("big", procs.big_batch(kill)) == kill
        log = Log(tmp_path / f"materialize-{kill}.log")
        progress = kill_after(
            procs.materialize_then_wait, (str(repo), str(log.path)), log, rng.uniform(0.0, 2.5)
        )
        with FeatureStore(repo) as store:
            synced = store.describe("big_windows")["materialized_version"]
            assert synced in {before, kill}
            assert store.describe("big")["materialized_version"] == synced  # one transaction
            if progress.done:
                assert synced == kill, "an acknowledged sync was lost"
            _check_windows(store, synced)
    with FeatureStore(repo) as store:
        store.materialize()
        _check_windows(store, kills)


def test_demo_forward_label_equals_the_hand_written_one(tmp_path: Path) -> None:
    """The demo's churn label, written by hand with a forward as-of join, is exactly
    ``order_windows:orders_next_30d == 0``; its windowed features agree online and offline."""
    import io

    from rich.console import Console

    from polarstore.demo import run_demo

    figures = run_demo(tmp_path / "demo", Console(file=io.StringIO()), n_users=400)
    assert figures["forward_label_mismatches"] == 0
    assert figures["aggregation_parity_checked"] == 400
    assert figures["aggregation_parity_mismatches"] == 0
    assert figures["aggregation_materialize"]["order_windows"]["rows_read"] > 0


def test_tails_compaction_late_events_and_deletes(spend_store: FeatureStore) -> None:
    """The storage paths one by one, each checked against the offline answer at window edges:
    a first sync (main values), syncs of later events (appended to a tail), a tail past
    ``_TAIL_EVENTS`` (merged into the main value), a late event (merged and sorted), and
    deletes, which must reach the tail too."""
    store = spend_store
    feats = ["spend:amount_sum_1h", "spend:count_1h", "spend:item_last_1h"]
    minute = timedelta(minutes=1)
    env = store._online
    written: list[datetime] = []

    def sync(rows: list[tuple[int, datetime, float | None, str | None]]) -> None:
        store.write("orders", orders(rows))
        store.materialize()
        written.extend(t for _, t, _, _ in rows)

    def tails() -> int:
        online = env()
        with online._env.begin() as txn:
            layout = _windows.WindowLayout.from_json(txn.get(b"\0\0\0\0layout/spend"))
            with txn.cursor() as cursor:
                if not cursor.set_range(layout.tail_prefix):
                    return 0
                return sum(1 for k in cursor.iternext(values=False) if k[:4] == layout.tail_prefix)

    def check() -> None:
        latest = max(written)
        for now in {
            latest,
            latest + US,
            *(t + timedelta(hours=1) + d for t in written for d in (-US, 0 * US, US)),
        }:
            if now < latest:
                continue
            users = [{"user_id": u} for u in (1, 2, 3)]
            online = store.get_online_features(users, feats, now=now).drop("user_id")
            spine = pl.DataFrame({"user_id": [1, 2, 3], "event_timestamp": [now] * 3})
            offline = store.get_historical_features(spine, feats).collect()
            assert online.rows() == offline.drop("user_id", "event_timestamp").rows(), now
            for i, user in enumerate(users):
                assert tuple(
                    store.get_feature_vector(user, feats, now=now).values()
                ) == offline.drop("user_id", "event_timestamp").row(i)

    with mock.patch.object(_windows, "_TAIL_EVENTS", 3):
        sync([(1, T0, 1.0, "a"), (2, T0, 2.0, "b")])
        assert tails() == 0  # a first sync writes main values
        sync([(1, T0 + 10 * minute, 4.0, "c"), (3, T0 + 10 * minute, None, None)])
        assert tails() == 2  # later events: tails, for a known and a new entity
        check()
        sync([(1, T0 + 20 * minute, 16.0, "d"), (1, T0 + 20 * minute, 32.0, None)])
        assert tails() == 2  # appended
        check()
        sync([(1, T0 + 30 * minute, 64.0, "e"), (3, T0 + 40 * minute, 128.0, "f")])
        assert tails() == 1  # user 1's tail (4 events) merged into its main value
        check()
        sync([(3, T0 + 35 * minute, 256.0, "g"), (3, T0 + 75 * minute, 512.0, "h")])
        assert tails() == 0  # a late event: user 3 merged, sorted
        check()
        sync([(2, T0 + 80 * minute, 1024.0, "i")])
        assert tails() == 1
        store.delete_entities("orders", {"user_id": [2]})
        assert tails() == 0
        check()


def test_a_view_that_stops_being_online_leaves_no_tails(spend_store: FeatureStore) -> None:
    store = spend_store
    store.write("orders", orders([(1, T0, 1.0, "a")]))
    store.materialize()
    store.write("orders", orders([(1, T0 + timedelta(minutes=1), 2.0, "b")]))
    store.materialize()  # user 1 now has a tail
    online = store._online()
    with online._env.begin() as txn:
        layout = _windows.WindowLayout.from_json(txn.get(b"\0\0\0\0layout/spend"))
    prefixes = [layout.records.prefix, layout.tail_prefix]

    def entries() -> list[int]:
        with online._env.begin() as txn, txn.cursor() as cursor:
            keys = list(cursor.iternext(values=False))
        return [sum(k[:4] == p for k in keys) for p in prefixes]

    assert entries() == [1, 1]
    store.apply(
        AggregationView("spend", "orders", [Aggregation(None, "count", "1h")], online=False)
    )
    store.materialize()  # drops the view's online data: main values and tails
    assert entries() == [0, 0]


def test_window_state_of_an_older_format_asks_for_materialize(spend_store: FeatureStore) -> None:
    store = spend_store
    store.write("orders", orders([(1, T0, 1.0, "a")]))
    store.materialize()
    online = store._online()
    key = b"\0\0\0\0layout/spend"
    with online._env.begin(write=True) as txn:  # as the first version of the format wrote it
        doc = json.loads(txn.get(key))
        del doc["windows"]["format"], doc["windows"]["tail_id"], doc["extra_ids"]
        txn.put(key, json.dumps(doc).encode())
    feats = ["spend:count_1h"]
    with pytest.raises(SchemaError, match=r"older polarstore .* run materialize\(\)"):
        store.get_feature_vector({"user_id": 1}, feats, now=T0)
    with pytest.raises(SchemaError, match=r"older polarstore .* run materialize\(\)"):
        store.get_online_features({"user_id": [1]}, feats, now=T0)
    store.materialize()  # rebuilds the state in the current format
    assert store.get_feature_vector({"user_id": 1}, feats, now=T0) == {"count_1h": 1}


def test_a_purge_keeps_the_window_state_incremental(tmp_path: Path) -> None:
    """A purge rewrites the source's history, so before it the store records which deletes
    the window state already reflects, as it does for feature views: the next materialize is
    incremental, not a rebuild, and answers as before."""
    spend = AggregationView(
        "spend", "orders", [Aggregation("amount", "sum", "1d"), Aggregation(None, "count", "1d")]
    )
    with FeatureStore(tmp_path / "repo") as store:
        store.apply([USER, ORDERS, spend])
        store.write("orders", orders([(1, T0, 2.0, "a"), (2, T0, 3.0, "b"), (3, T0, 4.0, "c")]))
        store.write("orders", orders([(1, T0 + US, 1.0, "d")]))
        store.materialize()
        store.delete_entities("orders", {"user_id": [2]})  # reaches the window state at once
        now = T0 + timedelta(hours=1)
        before = store.get_online_features({"user_id": [1, 2, 3]}, ["spend:*"], now=now)
        store.vacuum(retention=timedelta(0), force=True)
        synced = store.materialize()
        assert synced["spend"]["rows_read"] == 0
        after = store.get_online_features({"user_id": [1, 2, 3]}, ["spend:*"], now=now)
        assert after.equals(before)
        assert after["count_1d"].to_list() == [2, 0, 1]
