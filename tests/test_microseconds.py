"""Times inside one millisecond: Delta statistics are truncated to milliseconds.

delta-rs records a file's min/max event time at millisecond precision (``12:00:00.000700``
is recorded as ``12:00:00.000``). Retrieval, ``materialize``, ``read``, ``compact`` and
``delete_entities`` use those statistics to skip files and to decide that files do not
overlap; trusting them as exact skipped a file holding a row still inside the TTL, and
concatenated two files out of order when both fell in one millisecond. These are the audit's
cases, through the public API only; the property tests draw such times at random.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

from polarstore import Entity, FeatureStore, FeatureView

UTC = timezone.utc
NOON = datetime(2024, 1, 1, 12, tzinfo=UTC)
USER = Entity("user", join_keys="user_id")


def at(us: int, *, hours: int = 0) -> datetime:
    """``NOON + hours`` plus ``us`` microseconds."""
    return NOON + timedelta(hours=hours, microseconds=us)


def rows(users: list[int], times: list[datetime], values: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": users,
            "event_timestamp": pl.Series(times, dtype=pl.Datetime("us", "UTC")),
            "x": values,
        }
    )


def spine(users: list[int], times: list[datetime]) -> pl.DataFrame:
    return pl.DataFrame(
        {"user_id": users, "event_timestamp": pl.Series(times, dtype=pl.Datetime("us", "UTC"))}
    )


def values(store: FeatureStore, users: list[int], times: list[datetime]) -> list[int | None]:
    got = store.get_historical_features(spine(users, times), ["v:x"]).collect()
    return got["x"].to_list()


@pytest.fixture
def ttl_store(store: FeatureStore) -> FeatureStore:
    """View ``v`` (ttl 1 h) with one row at 12:00:00.000700."""
    store.apply(
        [USER, FeatureView("v", entities=[USER], schema={"x": pl.Int64}, ttl=timedelta(hours=1))]
    )
    store.write("v", rows([1], [at(700)], [7]))
    return store


def test_row_inside_the_ttl_by_microseconds_is_found(ttl_store: FeatureStore) -> None:
    # The file's recorded max is 12:00:00.000, more than 1 h before 13:00:00.000600: the file
    # must be read anyway, since the row itself (.000700) is inside the TTL.
    # Each spine alone: its time bounds decide which files are read.
    assert values(ttl_store, [1], [at(600, hours=1)]) == [7]
    assert values(ttl_store, [1], [at(700, hours=1)]) == [7]  # the TTL bound is inclusive
    assert values(ttl_store, [1], [at(701, hours=1)]) == [None]
    assert values(ttl_store, [1], [at(699)]) == [None]


def test_materialize_end_inside_a_millisecond_then_the_rest(ttl_store: FeatureStore) -> None:
    now = at(0, hours=0) + timedelta(minutes=30)
    ttl_store.materialize(end=at(500))
    assert ttl_store.get_feature_vector({"user_id": 1}, ["v:x"], now=now) == {"x": None}
    # The second sync reads rows after .000500; the file's recorded max (.000) is before that.
    ttl_store.materialize()
    assert ttl_store.get_feature_vector({"user_id": 1}, ["v:x"], now=now) == {"x": 7}


@pytest.fixture
def same_ms(store: FeatureStore) -> FeatureStore:
    """Two writes in one millisecond, the later write holding the earlier time."""
    store.apply([USER, FeatureView("v", entities=[USER], schema={"x": pl.Int64})])
    store.write("v", rows([1, 2], [at(900), at(900)], [1, 10]))
    store.write("v", rows([1, 2], [at(100), at(100)], [2, 20]))
    return store


def check_same_ms(store: FeatureStore, users: tuple[int, ...] = (1, 2)) -> None:
    read = store.read("v").collect()
    assert read["event_timestamp"].is_sorted()
    expected = {1: [2, 1, 1], 2: [20, 10, 10]}
    for user in users:
        # .000500 sees only the .000100 row; .000900 and later see the .000900 row (the
        # greater event time), whatever order the writes came in.
        got = values(store, [user] * 3, [at(500), at(900), at(950)])
        assert got == expected[user], user


def test_same_millisecond_writes_read_and_join_in_event_time_order(same_ms: FeatureStore) -> None:
    check_same_ms(same_ms)
    same_ms.materialize()
    vector = same_ms.get_feature_vector({"user_id": 1}, ["v:x"], now=at(0, hours=1))
    assert vector == {"x": 1}


def test_compact_and_delete_keep_event_time_order_inside_a_millisecond(
    same_ms: FeatureStore,
) -> None:
    same_ms.compact("v")
    check_same_ms(same_ms)
    same_ms.write("v", rows([1], [at(300)], [3]))
    same_ms.delete_entities("v", {"user_id": 2})
    read = same_ms.read("v").collect()
    assert read["event_timestamp"].to_list() == [at(100), at(300), at(900)]
    assert read["x"].to_list() == [2, 3, 1]
    assert values(same_ms, [1] * 3, [at(200), at(500), at(999)]) == [2, 3, 1]


def test_same_millisecond_boundary_ties_keep_write_order(store: FeatureStore) -> None:
    # Files meeting inside one millisecond, with full ties at the boundary: still the row
    # written last wins (the sort that now runs must keep write order for ties).
    store.apply([USER, FeatureView("v", entities=[USER], schema={"x": pl.Int64})])
    store.write("v", rows([1, 1], [at(100), at(400)], [1, 2]))
    store.write("v", rows([1, 1], [at(400), at(800)], [3, 4]))
    store.write("v", rows([1], [at(400)], [5]))
    assert values(store, [1] * 3, [at(399), at(400), at(799)]) == [1, 5, 5]
    store.compact("v")
    assert values(store, [1] * 3, [at(399), at(400), at(799)]) == [1, 5, 5]
    assert store.read("v").collect()["x"].to_list() == [1, 2, 3, 5, 4]
