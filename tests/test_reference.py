"""Hand-checked answers for the brute-force reference in ``reference.py``.

The property tests are only as good as the reference; each case here is small enough to work
out on paper, and the expected values come from SPEC rules 1-4, not from running the code.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.reference import RefView, point_in_time

UTC = timezone.utc
US = timedelta(microseconds=1)


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


def at(hour: int, minute: int = 0) -> datetime:
    return datetime(2024, 1, 1, hour, minute, tzinfo=UTC)


def values(
    view: RefView,
    rows: list[dict[str, Any]],
    spine: list[dict[str, Any]],
    feature: str = "x",
) -> list[Any]:
    answer = point_in_time(spine, [f"{view.name}:{feature}"], {view.name: view}, {view.name: rows})
    return [row[feature] for row in answer]


def test_event_time_tie_is_broken_by_created_time() -> None:
    view = RefView("v", ("k",), ("x",), created_timestamp_field="created")
    rows = [
        # Greatest created time of all, but an older event: loses on event time (rule 4).
        {"k": 1, "event_timestamp": at(9, 50), "created": at(12), "x": 0.0},
        # Same event time as the next row, greater created time: wins the tie.
        {"k": 1, "event_timestamp": at(10), "created": at(10, 5), "x": 1.0},
        # Written last, but created earlier: loses, write order only breaks full ties.
        {"k": 1, "event_timestamp": at(10), "created": at(10, 1), "x": 2.0},
        # Newer event, but after the spine time (rule 2).
        {"k": 1, "event_timestamp": at(10, 31), "created": at(9), "x": 3.0},
    ]
    spine = [
        {"k": 1, "event_timestamp": at(10, 30)},  # candidates 0.0, 1.0, 2.0 -> 1.0
        {"k": 1, "event_timestamp": at(9, 55)},  # only 0.0 is old enough -> 0.0
        {"k": 1, "event_timestamp": at(10, 31)},  # 3.0 exactly at the spine time -> 3.0
    ]
    assert values(view, rows, spine) == [1.0, 0.0, 3.0]


def test_full_tie_is_broken_by_write_order() -> None:
    with_created = RefView("v", ("k",), ("x",), created_timestamp_field="created")
    rows = [
        {"k": "a", "event_timestamp": at(10), "created": at(11), "x": "first"},
        {"k": "a", "event_timestamp": at(10), "created": at(11), "x": "second"},
        {"k": "a", "event_timestamp": at(10), "created": at(11), "x": None},
        {"k": "b", "event_timestamp": at(10), "created": at(11), "x": "other"},
    ]
    spine = [{"k": "a", "event_timestamp": at(12)}]
    # Three rows tie on event and created time; the last written one wins, even with a null.
    assert values(with_created, rows, spine) == [None]
    assert values(with_created, rows[:2], spine) == ["second"]

    # Without a created timestamp field, a tie on event time goes straight to write order.
    without = RefView("v", ("k",), ("x",))
    rows = [
        {"k": "a", "event_timestamp": at(10), "x": "first"},
        {"k": "a", "event_timestamp": at(10), "x": "second"},
        {"k": "a", "event_timestamp": at(9), "x": "older"},
    ]
    assert values(without, rows, spine) == ["second"]


def test_ttl_lower_bound_is_inclusive() -> None:
    view = RefView("v", ("k",), ("x",), ttl=timedelta(hours=1))
    rows = [{"k": 1, "event_timestamp": at(10), "x": 7}]
    spine = [
        {"k": 1, "event_timestamp": at(11)},  # 11:00 - 1h = 10:00 <= 10:00 -> 7
        {"k": 1, "event_timestamp": at(11) + US},  # 10:00:00.000001 > 10:00 -> None
        {"k": 1, "event_timestamp": at(10)},  # the same instant is available -> 7
        {"k": 1, "event_timestamp": at(10) - US},  # one µs before the event -> None
    ]
    assert values(view, rows, spine) == [7, None, 7, None]

    # At microsecond scale: a 1 µs TTL reaches back exactly one microsecond.
    tiny = RefView("v", ("k",), ("x",), ttl=US)
    close = [{"k": 1, "event_timestamp": at(10) + d * US} for d in (-1, 0, 1, 2)]
    assert values(tiny, rows, close) == [None, 7, 7, None]

    # A zero TTL keeps only rows observed exactly at the spine time.
    zero = RefView("v", ("k",), ("x",), ttl=timedelta(0))
    assert values(zero, rows, spine) == [None, None, 7, None]


def test_null_key_matches_nothing() -> None:
    view = RefView("v", ("k",), ("x",))
    rows: list[dict[str, Any]] = [
        {"k": None, "event_timestamp": at(10), "x": 1},
        {"k": 0, "event_timestamp": at(10), "x": 2},
    ]
    spine: list[dict[str, Any]] = [
        {"k": None, "event_timestamp": at(11)},  # null never equals null -> None
        {"k": 0, "event_timestamp": at(11)},  # 0 is a key, not a null -> 2
    ]
    assert values(view, rows, spine) == [None, 2]

    compound = RefView("v", ("user_id", "item_id"), ("x",))
    rows = [
        {"user_id": 1, "item_id": "", "event_timestamp": at(10), "x": 3},
        {"user_id": 1, "item_id": "é", "event_timestamp": at(10), "x": 4},
    ]
    spine = [
        {"user_id": 1, "item_id": "", "event_timestamp": at(11)},  # "" is a key -> 3
        {"user_id": 1, "item_id": "é", "event_timestamp": at(11)},  # -> 4
        {"user_id": 1, "item_id": None, "event_timestamp": at(11)},  # half null -> None
        {"user_id": None, "item_id": "", "event_timestamp": at(11)},  # -> None
        {"user_id": 2, "item_id": "", "event_timestamp": at(11)},  # no such pair -> None
    ]
    assert values(compound, rows, spine) == [3, 4, None, None, None]


def test_spine_time_before_any_event_or_null_gives_null() -> None:
    view = RefView("v", ("k",), ("x",))
    rows = [
        {"k": 1, "event_timestamp": at(10), "x": True},
        {"k": 1, "event_timestamp": at(12), "x": False},
    ]
    spine: list[dict[str, Any]] = [
        {"k": 1, "event_timestamp": at(9)},  # before both events -> None
        {"k": 1, "event_timestamp": None},  # null time -> None
        {"k": 1, "event_timestamp": at(11)},  # only the 10:00 row -> True
        {"k": 1, "event_timestamp": at(13)},  # the 12:00 row -> False
    ]
    assert values(view, rows, spine) == [None, None, True, False]


def test_time_zones_are_compared_as_utc_instants() -> None:
    view = RefView("v", ("k",), ("x",))
    # The row is stored naive (read as UTC): 10:00 UTC.
    rows = [{"k": 1, "event_timestamp": datetime(2024, 1, 1, 10), "x": 1}]
    kolkata = ZoneInfo("Asia/Kolkata")  # UTC+05:30
    new_york = ZoneInfo("America/New_York")  # UTC-05:00 in January
    spine = [
        {"k": 1, "event_timestamp": datetime(2024, 1, 1, 15, 30, tzinfo=kolkata)},  # 10:00Z -> 1
        {"k": 1, "event_timestamp": datetime(2024, 1, 1, 15, 29, tzinfo=kolkata)},  # 09:59Z
        {"k": 1, "event_timestamp": datetime(2024, 1, 1, 5, tzinfo=new_york)},  # 10:00Z -> 1
        {"k": 1, "event_timestamp": datetime(2024, 1, 1, 9, 59)},  # naive, 09:59Z -> None
        # 10:00 local wall time in Kolkata is 04:30Z: before the event, whatever the digits say.
        {"k": 1, "event_timestamp": datetime(2024, 1, 1, 10, tzinfo=kolkata)},
    ]
    assert values(view, rows, spine) == [1, None, 1, None, None]


def test_feature_names_order_and_collisions() -> None:
    a = RefView("a", ("k",), ("x", "y"))
    b = RefView("b", ("k",), ("x",), ttl=timedelta(minutes=30))
    views = {"a": a, "b": b}
    rows = {
        "a": [{"k": 1, "event_timestamp": at(10), "x": 1, "y": 2}],
        "b": [{"k": 1, "event_timestamp": at(10), "x": 3}],
    }
    spine = [{"k": 1, "event_timestamp": at(10, 30)}, {"k": 1, "event_timestamp": at(10, 31)}]
    got = point_in_time(spine, ["b:x", "a:*"], views, rows, full_feature_names=True)
    # Requested order, "a:*" in declared order; b's TTL of 30 min drops it at 10:31.
    assert [list(row) for row in got] == [["b__x", "a__x", "a__y"]] * 2
    assert got == [{"b__x": 3, "a__x": 1, "a__y": 2}, {"b__x": None, "a__x": 1, "a__y": 2}]
    with pytest.raises(ValueError, match="same output name"):
        point_in_time(spine, ["b:x", "a:*"], views, rows)
