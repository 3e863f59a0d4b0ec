"""write(): validation before any I/O, one commit per call, nothing half-written."""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

from polarstore import FeatureStore, NotFoundError, ValidationError

from .conftest import STATS, T0, stats_rows


def test_write_returns_increasing_versions(stats_store: FeatureStore) -> None:
    assert stats_store.write("user_stats", stats_rows([3], [1])) == 1
    assert stats_store.write(STATS, stats_rows([4], [2])) == 2
    assert stats_store.read("user_stats").collect().height == 4


@pytest.mark.parametrize(
    "convert",
    [
        lambda df: df.lazy(),
        lambda df: df.to_arrow(),
        lambda df: df.to_pandas(),
    ],
    ids=["lazyframe", "pyarrow", "pandas"],
)
def test_write_accepts_other_frame_types(stats_store: FeatureStore, convert: object) -> None:
    rows = stats_rows([5], [3], clicks=[99])
    stats_store.write("user_stats", convert(rows))  # type: ignore[operator]
    got = stats_store.read("user_stats").filter(pl.col("user_id") == 5).collect()
    assert got["clicks"].to_list() == [99]
    assert got.schema["event_timestamp"] == pl.Datetime("us", "UTC")


def test_naive_and_zoned_timestamps_are_stored_as_utc(stats_store: FeatureStore) -> None:
    zoned = stats_rows([7], [0]).with_columns(
        pl.lit(datetime(2024, 1, 1, 12))
        .dt.replace_time_zone("Asia/Kolkata")
        .alias("event_timestamp")
    )
    stats_store.write("user_stats", zoned)
    got = stats_store.read("user_stats").filter(pl.col("user_id") == 7).collect()
    assert got["event_timestamp"].item() == datetime(2024, 1, 1, 6, 30, tzinfo=timezone.utc)


def test_lossless_casts_are_accepted(stats_store: FeatureStore) -> None:
    rows = stats_rows([8], [0]).with_columns(
        pl.col("user_id").cast(pl.Int16),
        pl.col("clicks").cast(pl.Int8),
        pl.col("spend").cast(pl.Float32),
    )
    stats_store.write("user_stats", rows)
    schema = stats_store.read("user_stats").collect_schema()
    assert schema["user_id"] == pl.Int64
    assert schema["clicks"] == pl.Int64


def version(store: FeatureStore) -> int:
    return store.versions()["user_stats"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda df: df.drop("spend"), r"missing column\(s\) \['spend'\]"),
        (lambda df: df.with_columns(spendd=pl.lit(1.0)), r"\['spendd'\].*Did you mean 'spend'"),
        (
            lambda df: df.rename({"spend": "spent"}),
            r"\['spent'\] are not .*Did you mean 'spend'.* Missing: \['spend'\]",
        ),
        (lambda df: df.drop("created"), r"missing column\(s\) \['created'\]"),
        (lambda df: df.drop("user_id"), r"missing column\(s\) \['user_id'\]"),
        (
            lambda df: df.with_columns(pl.lit(None, pl.Int64).alias("user_id")),
            r"'user_id' has 2 null value\(s\)",
        ),
        (
            lambda df: df.with_columns(pl.lit(None, pl.Datetime).alias("event_timestamp")),
            r"'event_timestamp' has 2 null",
        ),
        (
            lambda df: df.with_columns(pl.col("event_timestamp").cast(pl.String)),
            r"'event_timestamp' must be a Datetime or Date, got String",
        ),
        (
            lambda df: df.with_columns(pl.col("clicks").cast(pl.String)),
            r"'clicks' must be Int64, got String",
        ),
        (
            lambda df: df.with_columns(pl.col("spend") + 0.5).with_columns(
                pl.col("spend").alias("clicks")
            ),
            r"'clicks' holds Float64 values that do not fit Int64 exactly",
        ),
        (
            lambda df: df.with_columns(pl.col("user_id").cast(pl.String)),
            r"join key 'user_id' is String but the view's stored keys are Int64",
        ),
        (
            lambda df: df.with_columns(pl.col("user_id").cast(pl.Float64)),
            r"join key 'user_id' must be an integer or string column, got Float64",
        ),
    ],
    ids=[
        "missing-feature",
        "unknown-column",
        "renamed-column",
        "missing-created",
        "missing-key",
        "null-key",
        "null-timestamp",
        "string-timestamp",
        "wrong-dtype",
        "lossy-cast",
        "key-dtype-changed",
        "float-key",
    ],
)
def test_bad_rows_are_rejected_and_nothing_is_written(
    stats_store: FeatureStore, change: object, match: str
) -> None:
    before = version(stats_store)
    rows = change(stats_rows([1, 2], [1, 1]))  # type: ignore[operator]
    with pytest.raises(ValidationError, match=match) as info:
        stats_store.write("user_stats", rows)
    assert "user_stats" in str(info.value)
    assert version(stats_store) == before
    assert stats_store.read("user_stats").collect().height == 2


def test_unknown_view_suggests_close_match(stats_store: FeatureStore) -> None:
    with pytest.raises(NotFoundError, match="Did you mean 'user_stats'"):
        stats_store.write("user_stat", stats_rows([1], [0]))


def test_not_a_frame_is_rejected(stats_store: FeatureStore) -> None:
    with pytest.raises(ValidationError, match=r"expected a polars DataFrame.*got dict"):
        stats_store.write("user_stats", {"user_id": [1]})


def test_pandas_with_duplicate_columns_is_rejected(stats_store: FeatureStore) -> None:
    frame = pd.DataFrame([[1, 2]], columns=["user_id", "user_id"])
    with pytest.raises(ValidationError, match="user_stats"):
        stats_store.write("user_stats", frame)
    assert version(stats_store) == 0


def test_empty_write_commits_nothing(stats_store: FeatureStore) -> None:
    assert stats_store.write("user_stats", stats_rows([], [])) == 0
    assert version(stats_store) == 0


def test_first_write_of_empty_frame_creates_table(store: FeatureStore) -> None:
    store.apply(STATS)
    assert store.write("user_stats", stats_rows([], [])) == 0
    assert store.read("user_stats").collect().height == 0


def test_arrow_record_batch(stats_store: FeatureStore) -> None:
    batch = stats_rows([9], [0]).to_arrow().to_batches()[0]
    assert isinstance(batch, pa.RecordBatch)
    assert stats_store.write("user_stats", batch) == 1


def test_idempotency_key_skips_a_retried_write(stats_store: FeatureStore) -> None:
    rows = stats_rows([3], [1])
    first = stats_store.write("user_stats", rows, idempotency_key="job-2024-01-05")
    again = stats_store.write("user_stats", rows, idempotency_key="job-2024-01-05")
    assert first == again == 1
    assert stats_store.read("user_stats").collect().height == 3
    assert stats_store.write("user_stats", rows, idempotency_key="job-2024-01-06") == 2


def test_nan_and_inf_are_values(stats_store: FeatureStore) -> None:
    rows = stats_rows([1, 2], [1, 1]).with_columns(spend=pl.Series([float("nan"), float("inf")]))
    stats_store.write("user_stats", rows)
    spine = pl.DataFrame({"user_id": [1, 2], "event_timestamp": [T0.replace(day=3)] * 2})
    got = stats_store.get_historical_features(spine, ["user_stats:spend"]).collect()
    assert got["spend"].is_nan().to_list() == [True, False]
    assert got["spend"][1] == float("inf")


@pytest.mark.parametrize("column", ["event_timestamp", "created"])
def test_times_beyond_python_datetimes_are_rejected(stats_store: FeatureStore, column: str) -> None:
    # Converting these to microseconds makes Polars panic unless they are rejected first.
    rows = stats_rows([3], [1]).with_columns(pl.Series(column, [2**62]).cast(pl.Datetime("ms")))
    with pytest.raises(ValidationError, match=rf"'{column}' holds times outside the years 1"):
        stats_store.write("user_stats", rows)
    assert stats_store.versions()["user_stats"] == 0
