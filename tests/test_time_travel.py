"""as_of, history, versions, and saved datasets that reproduce exactly."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

from polarstore import FeatureStore, NotFoundError, ValidationError

from .conftest import T0, stats_rows

SPINE = pl.DataFrame({"user_id": [1, 2, 3], "event_timestamp": [T0 + timedelta(days=2)] * 3})


def clicks(store: FeatureStore, **kw: object) -> list[object]:
    got = store.get_historical_features(SPINE, ["user_stats:clicks"], **kw).collect()  # type: ignore[arg-type]
    return got["clicks"].to_list()


def test_as_of_version_and_time(stats_store: FeatureStore) -> None:
    time.sleep(0.01)
    between = datetime.now(timezone.utc)
    time.sleep(0.01)
    stats_store.write("user_stats", stats_rows([1, 3], [1, 1], clicks=[11, 31]))
    assert clicks(stats_store) == [11, 20, 31]
    assert clicks(stats_store, as_of={"user_stats": 0}) == [10, 20, None]
    assert clicks(stats_store, as_of=between) == [10, 20, None]
    naive = between.replace(tzinfo=None)  # tz-naive means UTC, whatever TZ says
    assert clicks(stats_store, as_of=naive) == [10, 20, None]
    assert clicks(stats_store, as_of=datetime(2000, 1, 1)) == [None, None, None]
    assert stats_store.read("user_stats", as_of={"user_stats": 0}).collect().height == 2


def test_bad_as_of(stats_store: FeatureStore) -> None:
    with pytest.raises(NotFoundError, match="no version 5: it has versions 0 to 0"):
        clicks(stats_store, as_of={"user_stats": 5})
    with pytest.raises(NotFoundError, match="Did you mean 'user_stats'"):
        clicks(stats_store, as_of={"user_stat": 0})
    with pytest.raises(ValidationError, match="must be a table version"):
        clicks(stats_store, as_of={"user_stats": "0"})
    with pytest.raises(ValidationError, match="not an ISO-8601"):
        clicks(stats_store, as_of="yesterday")


def test_history_and_versions(stats_store: FeatureStore) -> None:
    stats_store.write("user_stats", stats_rows([1], [1]))
    history = stats_store.history("user_stats")
    assert history["version"].to_list() == [0, 1]
    assert history["rows_added"].to_list() == [2, 1]
    assert history["operation"].to_list() == ["write", "write"]
    assert stats_store.versions() == {"user_stats": 1}


def test_saved_dataset_survives_later_writes_and_compaction(stats_store: FeatureStore) -> None:
    saved = stats_store.save_dataset("train", SPINE, ["user_stats:*"]).collect()
    stats_store.write("user_stats", stats_rows([1, 2, 3], [1, 1, 1], clicks=[7, 8, 9]))
    stats_store.compact("user_stats")
    assert stats_store.load_dataset("train").collect().equals(saved)
    with pytest.raises(ValidationError, match="already exists"):
        stats_store.save_dataset("train", SPINE, ["user_stats:*"])
    with pytest.raises(NotFoundError, match="Did you mean 'train'"):
        stats_store.load_dataset("trian")


def test_compact_keeps_answers_and_tie_order(stats_store: FeatureStore) -> None:
    # Three writes of the same key and times: the last write must keep winning.
    for n in (100, 200):
        stats_store.write("user_stats", stats_rows([1], [0], clicks=[n]))
    before = clicks(stats_store)
    rows_before = stats_store.read("user_stats").collect()
    version = stats_store.compact("user_stats")
    assert stats_store.history("user_stats")["operation"][-1] == "compact"
    assert clicks(stats_store) == before == [200, 20, None]
    assert stats_store.read("user_stats").collect().equals(rows_before)
    assert clicks(stats_store, as_of={"user_stats": version - 1}) == before
