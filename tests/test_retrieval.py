"""get_historical_features: argument validation and shapes (semantics: test_pit_properties)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from polarstore import (
    Entity,
    FeatureService,
    FeatureStore,
    FeatureView,
    NotFoundError,
    ValidationError,
)

from .conftest import STATS, T0, stats_rows

SPINE = pl.DataFrame({"user_id": [2, 1], "event_timestamp": [T0 + timedelta(days=1)] * 2})


def test_service_and_star_references(stats_store: FeatureStore) -> None:
    stats_store.apply(FeatureService("svc", ["user_stats:spend", "user_stats:clicks"]))
    by_service = stats_store.get_historical_features(SPINE, "svc").collect()
    assert by_service.columns == ["user_id", "event_timestamp", "spend", "clicks"]
    star = stats_store.get_historical_features(SPINE, ["user_stats:*"], full_feature_names=True)
    assert star.collect().columns[2:] == ["user_stats__clicks", "user_stats__spend"]
    assert by_service["clicks"].to_list() == [20, 10]


def test_returns_lazyframe_with_input_unchanged(stats_store: FeatureStore) -> None:
    spine = SPINE.with_columns(pl.col("user_id").cast(pl.Int32), label=pl.lit("x"))
    got = stats_store.get_historical_features(spine, ["user_stats:clicks"])
    assert isinstance(got, pl.LazyFrame)
    df = got.collect()
    assert df.drop("clicks").equals(spine)


@pytest.mark.parametrize(
    ("features", "error", "match"),
    [
        (["user_stat:clicks"], NotFoundError, "no feature view 'user_stat'.*'user_stats'"),
        (["user_stats:clics"], NotFoundError, "no feature 'clics'.*'clicks'"),
        (["user_stats"], ValidationError, "must look like 'view:feature'"),
        (["user_stats:clicks", "user_stats:clicks"], ValidationError, "both produce"),
        ([], ValidationError, "no features requested"),
    ],
)
def test_bad_references_fail_before_reading(
    stats_store: FeatureStore, features: list[str], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        stats_store.get_historical_features(SPINE, features)


def test_bad_spines(stats_store: FeatureStore) -> None:
    with pytest.raises(ValidationError, match=r"no timestamp column 'ts'.*event_timestamp"):
        stats_store.get_historical_features(SPINE, ["user_stats:clicks"], timestamp_field="ts")
    with pytest.raises(ValidationError, match=r"keyed by \['user_id'\].*no column"):
        stats_store.get_historical_features(SPINE.drop("user_id"), ["user_stats:clicks"])
    with pytest.raises(ValidationError, match="is String but view 'user_stats' stores"):
        stats_store.get_historical_features(
            SPINE.with_columns(pl.col("user_id").cast(pl.String)), ["user_stats:clicks"]
        )
    with pytest.raises(ValidationError, match="already exist in the entity_df"):
        stats_store.get_historical_features(SPINE.with_columns(clicks=1), ["user_stats:clicks"])


def test_view_without_data_gives_nulls(store: FeatureStore) -> None:
    store.apply(STATS)
    got = store.get_historical_features(SPINE, ["user_stats:*"]).collect()
    assert got["clicks"].to_list() == [None, None]
    assert got.schema["spend"] == pl.Float64


def test_empty_spine(stats_store: FeatureStore) -> None:
    got = stats_store.get_historical_features(SPINE.clear(), ["user_stats:clicks"]).collect()
    assert got.height == 0
    assert got.columns == ["user_id", "event_timestamp", "clicks"]


def test_two_entities_on_one_spine(stats_store: FeatureStore) -> None:
    item = Entity("item", "item_id")
    prices = FeatureView("prices", entities=[item], schema={"price": pl.Float64})
    stats_store.apply(prices)
    stats_store.write(
        "prices",
        pl.DataFrame({"item_id": ["a", "b"], "event_timestamp": [T0, T0], "price": [1.0, 2.0]}),
    )
    spine = SPINE.with_columns(item_id=pl.Series(["b", "zz"]))
    got = stats_store.get_historical_features(spine, ["user_stats:clicks", "prices:price"])
    assert got.collect().select("clicks", "price").rows() == [(20, 2.0), (10, None)]


def test_stored_key_subset_is_read_only_in_time_range(stats_store: FeatureStore) -> None:
    stats_store.write("user_stats", stats_rows([1], [30], clicks=[99]))
    plan = stats_store.get_historical_features(SPINE, ["user_stats:clicks"]).explain()
    assert "2024-01-02" in plan  # the spine's max time bounds the scan


@pytest.mark.parametrize(
    ("column", "values", "match"),
    [
        # Polars panics (not an exception) on these unless they are rejected first.
        ("user_id", pl.Series([2**63 + 1], dtype=pl.UInt64), "do not fit Int64 exactly"),
        (
            "event_timestamp",
            pl.Series([-(2**62)]).cast(pl.Datetime("us")),
            "outside the years 1 to 9999",
        ),
        (
            "event_timestamp",
            pl.Series([2**62]).cast(pl.Datetime("ms")),
            "outside the years 1 to 9999",
        ),
    ],
)
def test_spine_values_beyond_the_stored_dtypes_are_rejected(
    stats_store: FeatureStore, column: str, values: pl.Series, match: str
) -> None:
    spine = SPINE.head(1).with_columns(values.alias(column))
    with pytest.raises(ValidationError, match=match) as info:
        stats_store.get_historical_features(spine, ["user_stats:clicks"])
    assert f"'{column}'" in str(info.value)


def test_a_misspelled_service_name_gets_a_close_match(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    view = FeatureView("stats", entities=Entity("user", "user_id"), schema={"clicks": pl.Int64})
    store.apply([view, FeatureService("churn_model", features=["stats:clicks"])])
    spine = pl.DataFrame({"user_id": [1], "event_timestamp": [datetime(2024, 1, 1)]})
    for call in (
        lambda: store.get_online_features({"user_id": 1}, "churn_modle"),
        lambda: store.get_feature_vector({"user_id": 1}, "churn_modle"),
        lambda: store.get_historical_features(spine, "churn_modle"),
    ):
        with pytest.raises(NotFoundError, match=r"no feature service 'churn_modle'.*'churn_model'"):
            call()
