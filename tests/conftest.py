from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from polarstore import Entity, FeatureStore, FeatureView

# Every test runs in a zone far from UTC: tz-naive values must still mean UTC, never local
# time (delta-rs's own load_as_version reads a naive datetime as local time).
os.environ["TZ"] = "America/Los_Angeles"
time.tzset()

T0 = datetime(2024, 1, 1)
USER = Entity("user", join_keys="user_id", description="a shopper", tags={"domain": "shop"})
STATS = FeatureView(
    "user_stats",
    entities=[USER],
    schema={"clicks": pl.Int64, "spend": pl.Float64},
    created_timestamp_field="created",
    ttl=timedelta(days=7),
    description="daily activity",
    owner="growth@example.com",
    tags={"team": "growth"},
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeatureStore]:
    with FeatureStore(tmp_path / "repo") as s:
        yield s


@pytest.fixture
def stats_store(store: FeatureStore) -> FeatureStore:
    """A store with ``user_stats`` applied and one write (version 0)."""
    store.apply([USER, STATS])
    store.write("user_stats", stats_rows([1, 2], [0, 0], clicks=[10, 20]))
    return store


def stats_rows(
    users: list[int], days: list[int], *, clicks: list[int] | None = None
) -> pl.DataFrame:
    """Rows for ``user_stats``: one per (user, day offset from T0)."""
    times = [T0 + timedelta(days=d) for d in days]
    return pl.DataFrame(
        {
            "user_id": users,
            "event_timestamp": times,
            "created": times,
            "clicks": clicks if clicks is not None else list(range(len(users))),
            "spend": [float(c) for c in range(len(users))],
        }
    )
