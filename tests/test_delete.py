"""delete_entities and vacuum: forgetting an entity, offline and online, and what pins keep.

``delete_entities`` rewrites the view's table without the entity (a new version), leaving
every other row and the tie order of the rows that remain as they were; the online store
drops the entity at once. Older versions still hold the rows (time travel and saved datasets
see them) until ``vacuum`` removes their files, which it refuses to do for files a saved
dataset pins, unless ``force=True``; such a dataset then fails to load with a clear error.
"""

from __future__ import annotations

import errno
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from polarstore import (
    Entity,
    FeatureStore,
    FeatureView,
    NotFoundError,
    PolarstoreError,
    ValidationError,
)

from .conftest import T0

ACCOUNT = Entity("account", join_keys=["user_id", "region"])
# No created timestamp: rows with equal keys and times are ordered by write alone.
SPEND = FeatureView("spend", entities=[ACCOUNT], schema={"amount": pl.Float64, "note": pl.String})
FEATURES = ["spend:amount", "spend:note"]


def rows(users: list[int], regions: list[str], hours: list[int], amounts: list[float]) -> Any:
    return pl.DataFrame(
        {
            "user_id": users,
            "region": regions,
            "event_timestamp": [T0 + timedelta(hours=h) for h in hours],
            "amount": amounts,
            "note": [f"{u}/{r}/{a}" for u, r, a in zip(users, regions, amounts, strict=True)],
        }
    )


@pytest.fixture
def spend(store: FeatureStore) -> FeatureStore:
    """Three writes; (1, "eu") and (2, "us") have full ties across writes (same time)."""
    store.apply(SPEND)
    store.write("spend", rows([1, 2, 1, 3], ["eu", "us", "us", "eu"], [0, 0, 0, 1], [1, 2, 3, 4]))
    store.write("spend", rows([1, 2, 2], ["eu", "us", "us"], [0, 0, 2], [10, 20, 21]))
    store.write("spend", rows([1, 2, 3], ["eu", "us", "eu"], [0, 0, 1], [100, 200, 300]))
    return store


SPINE = pl.DataFrame(
    {
        "user_id": [1, 1, 2, 3, 2],
        "region": ["eu", "us", "us", "eu", "us"],
        "event_timestamp": [T0 + timedelta(hours=5)] * 4 + [T0 + timedelta(hours=1)],
    }
)


def answers(store: FeatureStore, **kw: Any) -> pl.DataFrame:
    return store.get_historical_features(SPINE, FEATURES, **kw).collect()


@pytest.mark.parametrize(
    "keys",
    [
        {"user_id": 1, "region": "eu"},
        [{"user_id": 1, "region": "eu"}, {"user_id": 99, "region": "eu"}],
        {"user_id": [1, None], "region": ["eu", "us"]},  # a null key matches nothing
        pl.DataFrame({"region": ["eu"], "user_id": pl.Series([1], dtype=pl.Int16)}),
    ],
    ids=["dict", "list-of-dicts", "dict-of-lists", "frame"],
)
def test_delete_removes_one_entity_and_keeps_the_rest_in_order(
    spend: FeatureStore, keys: Any
) -> None:
    before = spend.read("spend").collect()
    answers_before = answers(spend)
    version = spend.delete_entities("spend", keys)
    assert version == 3
    history = spend.history("spend")
    assert history["version"].to_list() == [0, 1, 2, 3]
    assert history["operation"][-1] == "delete"
    gone = (pl.col("user_id") == 1) & (pl.col("region") == "eu")
    # Exactly the other rows, in the same (tie-breaking) order: (2, "us") keeps its last
    # write winning, and (1, "us") -- same user, other region -- is untouched.
    assert_frame_equal(spend.read("spend").collect(), before.filter(~gone))
    after = answers(spend)
    assert after["amount"].to_list() == [None, 3.0, 21.0, 300.0, 200.0]
    kept = pl.Series([False, True, True, True, True])
    assert_frame_equal(after.filter(kept), answers_before.filter(kept))
    # The deleted entity's rows are in the old versions, until vacuum.
    assert_frame_equal(spend.read("spend", as_of={"spend": 2}).collect(), before)
    assert_frame_equal(answers(spend, as_of={"spend": 2}), answers_before)


def test_delete_then_write_again(spend: FeatureStore) -> None:
    spend.delete_entities("spend", {"user_id": 2, "region": "us"})
    spend.write("spend", rows([2], ["us"], [0], [7.0]))
    got = answers(spend)["amount"].to_list()
    assert got[2] == 7.0  # only the new row: nothing old came back


def test_delete_online(spend: FeatureStore) -> None:
    spend.materialize()
    keys = {"user_id": [1, 1, 2, 3], "region": ["eu", "us", "us", "eu"]}
    now = T0 + timedelta(hours=3)
    before = spend.get_online_features(keys, FEATURES, now=now)
    assert before["amount"].to_list() == [100.0, 3.0, 21.0, 300.0]
    spend.delete_entities("spend", [{"user_id": 1, "region": "eu"}, {"user_id": 2, "region": "us"}])
    after = spend.get_online_features(keys, FEATURES, now=now)
    assert after["amount"].to_list() == [None, 3.0, None, 300.0]
    assert spend.get_feature_vector({"user_id": 1, "region": "eu"}, FEATURES, now=now) == {
        "amount": None,
        "note": None,
    }
    # A later sync (of a newer version with no new rows) does not bring them back...
    spend.materialize()
    assert_frame_equal(spend.get_online_features(keys, FEATURES, now=now), after)
    # ... and a new row for a deleted entity is synced like any other.
    spend.write("spend", rows([2], ["us"], [1], [5.0]))
    spend.materialize()
    got = spend.get_online_features(keys, FEATURES, now=now)
    assert got["amount"].to_list() == [None, 3.0, 5.0, 300.0]
    spine = pl.DataFrame({**keys, "event_timestamp": [now] * 4})
    offline = spend.get_historical_features(spine, FEATURES).collect()
    assert_frame_equal(got, offline.drop("event_timestamp"))


def test_a_failed_online_delete_is_repaired_by_the_next_materialize(
    spend: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import polarstore._online

    spend.materialize()
    keys = {"user_id": [1, 2, 3], "region": ["eu", "us", "eu"]}
    now = T0 + timedelta(hours=3)

    def fail(*args: Any) -> int:
        raise OSError(errno.EIO, "injected: the online delete failed")

    with monkeypatch.context() as patch:
        patch.setattr(polarstore._online, "delete_synced", fail)
        with pytest.raises(PolarstoreError, match=r"deleted offline .* next materialize\(\)"):
            spend.delete_entities("spend", {"user_id": 1, "region": "eu"})
    # The rows are gone offline; online still has them until the next sync repairs it.
    assert spend.get_online_features(keys, FEATURES, now=now)["amount"][0] == 100.0
    summary = spend.materialize()
    got = spend.get_online_features(keys, FEATURES, now=now)
    assert got["amount"].to_list() == [None, 21.0, 300.0]
    assert_frame_equal(got, answers_at(spend, keys, now))
    assert spend.get_feature_vector({"user_id": 1, "region": "eu"}, FEATURES, now=now) == {
        "amount": None,
        "note": None,
    }
    assert summary["spend"]["rows_read"] == spend.read("spend").collect().height  # rebuilt
    # A delete that reached the online store costs the next sync nothing.
    spend.delete_entities("spend", {"user_id": 3, "region": "eu"})
    assert spend.materialize()["spend"]["rows_read"] == 0
    assert spend.get_online_features(keys, FEATURES, now=now)["amount"].to_list() == [
        None,
        21.0,
        None,
    ]


def answers_at(store: FeatureStore, keys: dict[str, list[Any]], now: Any) -> pl.DataFrame:
    spine = pl.DataFrame({**keys, "event_timestamp": [now] * len(keys["user_id"])})
    return store.get_historical_features(spine, FEATURES).collect().drop("event_timestamp")


def test_delete_rows_not_yet_materialized_never_reach_the_online_store(
    spend: FeatureStore,
) -> None:
    spend.materialize()
    spend.write("spend", rows([1], ["eu"], [4], [1000.0]))  # written, not synced
    spend.delete_entities("spend", {"user_id": 1, "region": "eu"})
    spend.materialize()
    got = spend.get_online_features({"user_id": 1, "region": "eu"}, FEATURES)
    assert got["amount"].to_list() == [None]


def test_delete_with_idempotency_key_retry_does_not_resurrect(spend: FeatureStore) -> None:
    batch = rows([4], ["eu"], [0], [1.0])
    spend.write("spend", batch, idempotency_key="import-4")
    spend.delete_entities("spend", {"user_id": 4, "region": "eu"})
    version = spend.versions()["spend"]
    assert spend.write("spend", batch, idempotency_key="import-4") == version
    assert spend.read("spend").filter(pl.col("user_id") == 4).collect().is_empty()


def test_bad_deletes_change_nothing(spend: FeatureStore, store: FeatureStore) -> None:
    version = spend.versions()["spend"]
    bad: list[tuple[Any, type[Exception], str]] = [
        ({"user_id": "x", "region": "eu"}, ValidationError, "user_id"),
        ({"user_id": 1.5, "region": "eu"}, ValidationError, "user_id"),
        ({"user_id": 1}, ValidationError, r"missing join key\(s\) \['region'\]"),
        ({"user_id": 1, "region": 5}, ValidationError, "region"),
        ("user 1", ValidationError, "expected a polars DataFrame"),
    ]
    for keys, error, match in bad:
        with pytest.raises(error, match=match):
            spend.delete_entities("spend", keys)
        assert spend.versions()["spend"] == version
    with pytest.raises(NotFoundError, match="Did you mean 'spend'"):
        spend.delete_entities("spends", {"user_id": 1, "region": "eu"})
    store.apply(FeatureView("empty", entities=[ACCOUNT], schema={"x": pl.Int64}))
    with pytest.raises(NotFoundError, match="'empty' has no data"):
        store.delete_entities("empty", {"user_id": 1, "region": "eu"})


def parquet_rows(view_dir: Path) -> pl.DataFrame:
    """Every row in every Parquet file under the table folder, referenced or not."""
    files = sorted(view_dir.glob("*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files]) if files else pl.DataFrame()


def test_vacuum_keeps_what_datasets_pin_until_forced(spend: FeatureStore) -> None:
    gone = (pl.col("user_id") == 1) & (pl.col("region") == "eu")
    table = spend.path / "views" / "spend"
    saved = spend.save_dataset("before_delete", SPINE, FEATURES).collect()
    spend.delete_entities("spend", {"user_id": 1, "region": "eu"})
    after = spend.save_dataset("after_delete", SPINE, FEATURES).collect()

    # The default retention (7 days) keeps everything this young; so does half an hour, even
    # forced (Delta counts whole hours: rounding it down to 0 would delete these files).
    assert spend.vacuum() == {"spend": []}
    assert spend.vacuum(retention=timedelta(minutes=30), force=True) == {"spend": []}
    with pytest.raises(ValidationError, match="retention"):
        spend.vacuum(retention=timedelta(hours=-1))
    # No retention, not forced: files pinned by "before_delete" stay, so does its answer.
    assert spend.vacuum(retention=timedelta(0)) == {"spend": []}
    assert_frame_equal(spend.load_dataset("before_delete").collect(), saved)
    assert not parquet_rows(table).filter(gone).is_empty()

    removed = spend.vacuum(retention=timedelta(0), force=True)["spend"]
    assert len(removed) == 3  # the three files written before the delete rewrote them
    # Forgotten for good: no file left in the table holds the entity (the purge that comes
    # with retention 0 + force: tests/test_forget.py).
    assert parquet_rows(table).filter(gone).is_empty()
    # The purge removed the older versions, and the dataset pinned to one of them.
    assert "before_delete" not in spend.list_datasets()
    with pytest.raises(NotFoundError, match="before_delete"):
        spend.load_dataset("before_delete")
    with pytest.raises(NotFoundError):
        spend.read("spend", as_of={"spend": 0})
    with pytest.raises(NotFoundError):
        answers(spend, as_of={"spend": 1})
    # The current version and datasets pinned to its data are whole.
    assert_frame_equal(spend.load_dataset("after_delete").collect(), after)
    assert spend.read("spend").collect().height == 7


def test_a_forced_vacuum_with_retention_keeps_the_log(spend: FeatureStore) -> None:
    """Forced, but with a retention: files young enough stay, and so do all versions."""
    saved = spend.save_dataset("before_delete", SPINE, FEATURES).collect()
    spend.delete_entities("spend", {"user_id": 1, "region": "eu"})
    assert spend.vacuum(retention=timedelta(hours=1), force=True) == {"spend": []}
    assert_frame_equal(spend.load_dataset("before_delete").collect(), saved)
    assert spend.read("spend", as_of={"spend": 0}).collect().height == 4
