"""The Spark engine (``engine="spark"``) gives the Polars path's answers, row for row.

One local Spark session (``local[2]``, two shuffle partitions, no UI) serves the whole module;
its session time zone is New York, so nothing may depend on it. The properties draw the cases
of ``test_pit_properties`` (compound and string keys, ties on event and created time, TTL
edges ±1 µs, many rows inside one millisecond, null keys and times, zoned, naive and
nanosecond spines, one or two views, ``as_of`` pins) and the bitemporal steps of
``test_bitemporal`` (backfills, compactions, deletes, purges, real commit times), run each
through both engines and compare every column. The spine goes in as a Polars frame or as a
Spark DataFrame (times as ``timestamp`` or ``timestamp_ntz``); the Spark result's features
are also checked against the brute-force reference. Derived features draw test_ondemand's
random expressions (values compared bit for bit); aggregation views draw test_aggregations'
cases (compared with the Polars path and with ``reference.window_aggregate``; float sums,
means and deviations within 1e-9 relative, the rest exactly).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
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
    OnDemandView,
    PolarstoreError,
    SchemaError,
    ValidationError,
)
from tests.reference import (
    point_in_time,
    resolve_features,
)
from tests.test_aggregations import (
    CASE_PARTS,
    US,
    check_reference,
    play_case,
)
from tests.test_aggregations import T0 as AGG_T0
from tests.test_aggregations import aggregations as agg_choices
from tests.test_bitemporal import _log, bitemporal_view, play, steps
from tests.test_expressions import same
from tests.test_ondemand import PA, PB, REQUEST, T0, USER, parity_cases
from tests.test_pit_properties import (
    Case,
    all_rows,
    build_store,
    cases,
    in_zone,
    spine_frame,
)

pyspark = pytest.importorskip("pyspark", reason="pyspark is not installed (polarstore[spark])")
if shutil.which("java") is None:
    pytest.skip("Spark needs Java (17 or later); no java on PATH", allow_module_level=True)

from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402, N812

pytestmark = pytest.mark.filterwarnings(
    # pyspark checks the pandas version even for Arrow input, and pandas 3 is newer than it knows.
    "ignore:PySpark does not yet fully support pandas:FutureWarning"
)

UTC = timezone.utc
SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def spark() -> Iterator[SparkSession]:
    # Derived features run Polars on Spark's Python workers: this venv's Python, not the
    # PATH's python3.
    old = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = (
        SparkSession.builder.master("local[2]")
        .appName("polarstore-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.adaptive.enabled", "false")  # re-planning costs more than it saves here
        .config("spark.sql.session.timeZone", "America/New_York")
        .config("spark.driver.memory", "1g")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    if old is None:
        os.environ.pop("PYSPARK_PYTHON", None)
    else:
        os.environ["PYSPARK_PYTHON"] = old


def to_spark_spine(spark: SparkSession, spine: pl.DataFrame, ts: str, ntz: bool) -> Any:
    """``spine`` as a Spark DataFrame, its time column an instant or a naive UTC wall time."""
    frame = spine.with_columns(
        pl.col(c).dt.replace_time_zone("UTC") if spine.schema[c].time_zone is None else pl.col(c)  # type: ignore[union-attr]
        for c, t in spine.schema.items()
        if isinstance(t, pl.Datetime)
    ).with_columns(pl.col(c).dt.cast_time_unit("us") for c in spine.columns if c == ts)
    out = spark.createDataFrame(frame.to_arrow())
    if ntz:
        old = spark.conf.get("spark.sql.session.timeZone")
        spark.conf.set("spark.sql.session.timeZone", "UTC")  # the cast is resolved now
        try:
            out = out.withColumn(ts, F.col(ts).cast("timestamp_ntz"))
        finally:
            spark.conf.set("spark.sql.session.timeZone", old or "UTC")
    return out


def normalised(series: pl.Series) -> list[Any]:
    """Values to compare across engines: times as UTC µs instants (naive ones are UTC)."""
    dtype = series.dtype
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            series = series.dt.replace_time_zone("UTC")
        series = series.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    return series.to_list()


def both_engines(
    store: FeatureStore,
    spark: SparkSession,
    spine: pl.DataFrame,
    features: Any,
    *,
    spark_spine: Any = None,
    order: str | None = None,
    **kw: Any,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The Polars answer and the Spark one (as Polars), checked equal column by column."""
    want = store.get_historical_features(spine, features, **kw).collect()
    result = store.get_historical_features(
        spine if spark_spine is None else spark_spine, features, engine="spark", spark=spark, **kw
    )
    assert isinstance(result, pyspark.sql.DataFrame)
    got = pl.DataFrame(pl.from_arrow(result.toArrow()))
    assert got.columns == want.columns
    assert got.height == want.height
    if order is not None:  # a Spark spine: compared by the input's own order column
        want, got = want.sort(order, maintain_order=True), got.sort(order, maintain_order=True)
    for name in spine.columns:
        assert normalised(got[name]) == normalised(want[name]), name
    for name in want.columns[len(spine.columns) :]:
        assert got.schema[name] == want.schema[name], name
        pairs = zip(got[name].to_list(), want[name].to_list(), strict=True)
        assert all(same(x, y) for x, y in pairs), (name, got[name], want[name])
    return want, got


def check_case(
    spark: SparkSession, case: Case, data: st.DataObject, *, as_of: dict[str, int] | None = None
) -> None:
    with tempfile.TemporaryDirectory() as path:
        store = build_store(path, case)
        upto = None
        if as_of is not None:
            upto = {
                name: data.draw(st.integers(1, len(versions)), label=f"writes of {name}")
                for name, versions in case.versions.items()
            }
            as_of = {name: case.versions[name][n - 1] for name, n in upto.items()}
        spine = spine_frame(case)
        kind = data.draw(st.sampled_from(["polars", "timestamp", "timestamp_ntz"]), label="spine")
        given_spine = None
        if kind != "polars" and spine.schema[case.spine_ts] != pl.Null:
            given_spine = to_spark_spine(spark, spine, case.spine_ts, kind == "timestamp_ntz")
        _, got = both_engines(
            store,
            spark,
            spine,
            case.features,
            spark_spine=given_spine,
            order=None if given_spine is None else "row_id",
            timestamp_field=case.spine_ts,
            full_feature_names=case.full_feature_names,
            as_of=as_of,
        )
        if given_spine is not None:
            return  # reordered by row_id: the reference below goes by input order
        expected = point_in_time(
            [{**r, case.spine_ts: in_zone(r[case.spine_ts], case.spine_zone)} for r in case.spine],
            case.features,
            case.views,
            all_rows(case, upto),
            timestamp_field=case.spine_ts,
            full_feature_names=case.full_feature_names,
        )
        for _, _, output in resolve_features(
            case.views, case.features, full_feature_names=case.full_feature_names
        ):
            assert got[output].to_list() == [row[output] for row in expected], output


@settings(SETTINGS, max_examples=4)
@given(case=cases(n_views=1), data=st.data())
def test_one_view_same_answers_as_polars(spark: SparkSession, case: Case, data: Any) -> None:
    check_case(spark, case, data)


@settings(SETTINGS, max_examples=4)
@given(case=cases(n_views=2), data=st.data())
def test_two_views_same_answers_as_polars(spark: SparkSession, case: Case, data: Any) -> None:
    check_case(spark, case, data)


@settings(SETTINGS, max_examples=3)
@given(case=cases(n_views=2), data=st.data())
def test_as_of_same_answers_as_polars(spark: SparkSession, case: Case, data: Any) -> None:
    check_case(spark, case, data, as_of={})


@settings(SETTINGS, max_examples=4)
@given(
    created=st.booleans(),
    ttl=st.sampled_from([None, timedelta(microseconds=1), timedelta(milliseconds=5)]),
    exact=st.booleans(),
    data=st.data(),
)
def test_bitemporal_same_answers_as_polars(
    spark: SparkSession, created: bool, ttl: timedelta | None, exact: bool, data: Any
) -> None:
    plan = data.draw(steps(created), label="steps")
    view = bitemporal_view(created, ttl, exact)
    with tempfile.TemporaryDirectory() as path, FeatureStore(path) as store:
        store.apply(view)
        start = datetime.now(UTC)
        _, _, purged = play(store, plan, start, created)
        us = timedelta(microseconds=1)
        times = [t + d for t in _log(store).values() for d in (-us, 0 * us, us)]
        times += [start + data.draw(st.integers(-30_000, 300_000)) * us for _ in range(4)]
        keys = st.lists(st.sampled_from([0, 1, 2, None]), min_size=len(times), max_size=len(times))
        spine = pl.DataFrame(
            {"user_id": data.draw(keys), "ts": times},
            schema={"user_id": pl.Int64, "ts": pl.Datetime("us", "UTC")},
        )
        pin = None
        if not purged and data.draw(st.booleans()):
            pin = data.draw(st.integers(0, store.versions()["v"]))
        both_engines(
            store,
            spark,
            spine,
            ["v:x"],
            timestamp_field="ts",
            bitemporal=True,
            as_of=None if pin is None else {"v": pin},
        )


# --- fixed cases the properties leave out ---------------------------------------------------


def small_store(path: str) -> FeatureStore:
    store = FeatureStore(path)
    user = Entity("user", join_keys={"user_id": pl.Int32})
    account = Entity("account", join_keys={"code": pl.String})
    store.apply(
        [
            user,
            account,
            FeatureView("stats", entities=[user], schema={"clicks": pl.Int64}),
            FeatureView("plan", entities=[account], schema={"tier": pl.String}),
            FeatureView("unwritten", entities=[user], schema={"y": pl.Float32}),
        ]
    )
    rows = {"user_id": [1, 1, 2], "clicks": [3, 5, 7]}
    days = [datetime(2024, 1, d, tzinfo=UTC) for d in (1, 3, 2)]
    store.write("stats", pl.DataFrame({**rows, "event_timestamp": days}))
    codes = pl.DataFrame({"code": ["0042", "42"], "tier": ["gold", "free"]})
    store.write("plan", codes.with_columns(event_timestamp=pl.lit(days[0])))
    return store


def test_services_evolved_schemas_unwritten_views_and_date_spines(
    spark: SparkSession, tmp_path: Any
) -> None:
    from polarstore import FeatureService

    store = small_store(str(tmp_path))
    # A feature added after the first write: its old rows read as null on both engines.
    user = store.get_feature_view("stats").entities
    store.apply(
        [
            FeatureView("stats", entities=user, schema={"clicks": pl.Int64, "spend": pl.Float64}),
            FeatureService("model", ["stats:*", "plan:tier", "unwritten:y"]),
        ]
    )
    new = {"user_id": [2], "clicks": [8], "spend": [1.5]}
    store.write("stats", pl.DataFrame({**new, "event_timestamp": [datetime(2024, 1, 4)]}))
    spine = pl.DataFrame(
        {
            "row_id": [0, 1, 2, 3, 4],
            "user_id": pl.Series([1, 2, 2, None, 1], dtype=pl.Int32),
            "code": ["0042", "42", "x", "42", None],
            "event_timestamp": [date(2024, 1, d) for d in (2, 3, 5, 3, 5)],
        }
    )
    want, _ = both_engines(store, spark, spine, "model", full_feature_names=True)
    assert want["stats__clicks"].to_list() == [3, 7, 8, None, 5]  # dates are midnight UTC
    assert want["stats__spend"].to_list() == [None, None, 1.5, None, None]
    assert want["plan__tier"].to_list() == ["gold", "free", None, "free", None]
    given = spark.createDataFrame(spine.to_arrow())
    assert dict(given.dtypes)["event_timestamp"] == "date"
    both_engines(store, spark, spine, "model", spark_spine=given, order="row_id")
    # Empty spines, and a pin before any commit (every view reads as empty).
    both_engines(store, spark, spine.clear(), ["stats:clicks", "plan:tier"])
    both_engines(store, spark, spine, ["stats:clicks"], as_of=datetime(2000, 1, 1))


def test_bad_input_is_a_clear_error(
    spark: SparkSession, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = small_store(str(tmp_path))
    spine = pl.DataFrame(
        {"user_id": [1], "code": ["0042"], "event_timestamp": [datetime(2024, 1, 2)]}
    )
    feats = ["stats:clicks"]
    with pytest.raises(ValidationError, match="'spark'"):
        store.get_historical_features(spine, feats, engine="sparkk")  # type: ignore[call-overload]
    with pytest.raises(ValidationError, match="only used with engine='spark'"):
        store.get_historical_features(spine, feats, spark=spark)  # type: ignore[call-overload]
    with pytest.raises(ValidationError, match="needs a SparkSession"):
        store.get_historical_features(spine, feats, engine="spark")
    with pytest.raises(NotFoundError, match="stats"):
        store.get_historical_features(spine, ["stat:clicks"], engine="spark", spark=spark)
    sdf = spark.createDataFrame(spine.to_arrow())
    bad: list[tuple[Any, list[str], str]] = [
        (sdf.withColumn("event_timestamp", F.lit("2024-01-02")), feats, "timestamp or a date"),
        (sdf.withColumn("user_id", F.lit(1.5)), feats, "integer or string"),
        (sdf.withColumn("user_id", F.lit("1")), feats, "declared Int32"),
        (sdf.withColumn("code", F.lit(42)), ["plan:tier"], "declared String"),
        (sdf.withColumn("user_id", F.lit(2**40)), feats, "outside it"),
        (sdf.drop("user_id"), feats, "no column"),
        (sdf.withColumn("clicks", F.lit(1)), feats, "already exist"),
        (sdf.withColumn("__polarstore_row", F.lit(1)), feats, "reserved"),
        (sdf, ["stats:clicks"], "no timestamp column 'ts'"),
    ]
    for frame, features, message in bad:
        kw: dict[str, Any] = {"timestamp_field": "ts"} if "'ts'" in message else {}
        with pytest.raises(ValidationError, match=message):
            store.get_historical_features(frame, features, engine="spark", **kw)
    # pyspark missing: a PolarstoreError that names the extra.
    monkeypatch.setitem(sys.modules, "pyspark.sql", None)
    with pytest.raises(PolarstoreError, match=r"polarstore\[spark\]"):
        store.get_historical_features(spine, feats, engine="spark", spark=spark)


# --- derived features: Polars on the workers, same values bit for bit -----------------------


def same_values(want: pl.DataFrame, got: pl.DataFrame, names: list[str]) -> None:
    """Equal dtypes and values, floats bit for bit (NaN is NaN, -0.0 is not 0.0)."""
    for name in names:
        assert got.schema[name] == want.schema[name], name
        pairs = zip(got[name].to_list(), want[name].to_list(), strict=True)
        assert all(same(x, y) for x, y in pairs), (name, got[name], want[name])


@settings(SETTINGS, max_examples=5)
@given(case=parity_cases(), data=st.data())
def test_derived_features_same_values_as_polars(
    spark: SparkSession, case: tuple, data: Any
) -> None:
    """Random row-wise expressions (test_ondemand's) over random inputs with nulls, NaN,
    infinities and Int64 extremes, and request columns; the spine as a Polars frame or as a
    Spark DataFrame."""
    exprs, a, b, request = case
    with tempfile.TemporaryDirectory() as path, FeatureStore(path) as store:
        store.apply([USER, PA, PB])
        view = OnDemandView("d", {f"e{i}": e for i, e in enumerate(exprs)}, request_schema=REQUEST)
        try:
            store.apply(view)
        except SchemaError:
            return  # not an expression polarstore accepts on these dtypes
        for name, rows in (("pa", a), ("pb", b)):
            if rows.height:
                store.write(name, rows)
        spine = request.with_columns(
            row_id=pl.int_range(pl.len()),
            event_timestamp=pl.lit(T0 + timedelta(seconds=1), dtype=pl.Datetime("us")),
        )
        full = data.draw(st.booleans(), label="full_feature_names")
        feats = ["d:*", "pa:x"] if data.draw(st.booleans(), label="with a stored one") else ["d:*"]
        kw: dict[str, Any] = {"full_feature_names": full}
        given_spine: Any = spine
        if data.draw(st.booleans(), label="Spark spine"):
            given_spine = to_spark_spine(spark, spine, "event_timestamp", ntz=True)
        try:
            want = store.get_historical_features(spine, feats, **kw).collect()
        except pl.exceptions.PolarsError:
            # A strict cast that fails on these values: Spark's workers fail alike.
            with pytest.raises(Exception, match=r"InvalidOperationError|conversion"):
                store.get_historical_features(
                    given_spine, feats, engine="spark", spark=spark, **kw
                ).collect()
            return
        result = store.get_historical_features(
            given_spine, feats, engine="spark", spark=spark, **kw
        )
        got = pl.DataFrame(pl.from_arrow(result.toArrow())).sort("row_id")
    assert got.columns == want.columns
    same_values(want, got, want.columns[len(spine.columns) :])


def test_derived_features_of_every_input_kind_and_errors(
    spark: SparkSession, tmp_path: Any
) -> None:
    """Inputs of every stored dtype (instants, naive times, dates, lists, binary), request
    columns of several dtypes, literals only, an entity with no row; clear errors."""
    from polarstore import Entity

    user = Entity("user", join_keys={"user_id": pl.Int32})
    kinds = FeatureView(
        "kinds",
        entities=[user],
        schema={
            "at": pl.Datetime("us", "UTC"),
            "naive": pl.Datetime("us"),
            "day": pl.Date,
            "tags": pl.List(pl.Int64),
            "raw": pl.Binary,
            "small": pl.Float32,
            "tiny": pl.Int8,
        },
    )
    derived = OnDemandView(
        "derived",
        {
            "hour": pl.col("kinds:at").dt.hour(),
            "naive_hour": pl.col("kinds:naive").dt.hour(),
            "later": pl.col("when") > pl.col("kinds:at"),
            "day_of": pl.col("when").dt.truncate("1d"),
            "weekday": pl.col("kinds:day").dt.weekday(),
            "no_tags": pl.col("kinds:tags").is_null(),
            "tags": pl.col("kinds:tags"),
            "raw": pl.col("kinds:raw"),
            "half": pl.col("kinds:small") / 2,
            "wrap": pl.col("kinds:tiny") * 100,
            "scaled": pl.col("amount") * pl.col("count"),
            "label": pl.lit("x"),
        },
        request_schema={"when": pl.Datetime("us", "UTC"), "amount": pl.Float64, "count": pl.Int16},
    )
    store = FeatureStore(tmp_path)
    store.apply([user, kinds, derived])
    at = datetime(2024, 1, 1, 23, 30, tzinfo=UTC)
    store.write(
        "kinds",
        pl.DataFrame(
            {
                "user_id": [1, 2],
                "at": [at, None],
                "naive": [datetime(2024, 1, 1, 22), datetime(2024, 1, 1, 1)],
                "day": [date(2024, 1, 1), None],
                "tags": [[1, 2**62, 2**62], []],
                "raw": [b"ab", None],
                "small": [1.5, float("nan")],
                "tiny": [100, -3],
                "event_timestamp": [at, at],
            },
            schema_overrides={"user_id": pl.Int32, **kinds.schema},
        ),
    )
    spine = pl.DataFrame(
        {
            "row_id": [0, 1, 2],
            "user_id": pl.Series([1, 2, 3], dtype=pl.Int32),
            "event_timestamp": [at + timedelta(hours=1)] * 3,
            "when": [at + timedelta(microseconds=7), None, at],
            "amount": [0.5, -0.0, float("inf")],
            "count": [3, 2, None],
        }
    )
    for full in (False, True):
        want, _ = both_engines(store, spark, spine, ["derived:*"], full_feature_names=full)
        assert want[f"{'derived__' if full else ''}hour"].to_list() == [23, None, None]
    assert want["derived__wrap"].to_list() == [16, -44, None]  # Int8 wraps, as Polars does
    assert want["derived__later"].to_list() == [True, None, None]
    given = to_spark_spine(spark, spine, "event_timestamp", ntz=False)
    both_engines(store, spark, spine, ["derived:*"], spark_spine=given, order="row_id")
    # A request column missing, or holding values its dtype cannot take.
    with pytest.raises(ValidationError, match=r"missing request column\(s\) \['amount'\]"):
        store.get_historical_features(
            spine.drop("amount"), ["derived:scaled"], engine="spark", spark=spark
        )
    with pytest.raises(ValidationError, match="'count'"):
        store.get_historical_features(
            spine.with_columns(count=pl.lit(2**40)), ["derived:scaled"], engine="spark", spark=spark
        )
    with pytest.raises(ValidationError, match="already exist"):
        store.get_historical_features(
            spine.with_columns(label=pl.lit(1)), ["derived:label"], engine="spark", spark=spark
        )
    late = given.withColumn("count", F.lit(2**40))  # a Spark spine: checked by the workers
    with pytest.raises(Exception, match="'count'"):
        store.get_historical_features(late, ["derived:scaled"], engine="spark").collect()


def test_workers_that_cannot_import_polars_are_a_clear_error(
    spark: SparkSession, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polarstore import _spark

    store = small_store(str(tmp_path))
    store.apply(OnDemandView("ratio", features={"double": pl.col("stats:clicks") * 2}))
    spine = pl.DataFrame({"user_id": [1], "event_timestamp": [datetime(2024, 1, 2)]})
    monkeypatch.setattr(spark.sparkContext, "pythonExec", sys.executable + "-missing")
    monkeypatch.setattr(_spark, "_CHECKED_WORKERS", set())
    with pytest.raises(PolarstoreError, match="PYSPARK_PYTHON"):
        store.get_historical_features(spine, ["ratio:double"], engine="spark", spark=spark)


# --- aggregation views: a range join and a group by on Spark --------------------------------

# Float aggregates Spark sums in its own order: equal to Polars' within this relative error.
SUMMED = ("sum", "mean", "std", "var")


def close_values(want: pl.DataFrame, got: pl.DataFrame, functions: dict[str, str]) -> None:
    """Equal dtypes; equal values, except float sums, means and deviations within 1e-9."""
    for name, function in functions.items():
        assert got.schema[name] == want.schema[name], name
        for x, y in zip(got[name].to_list(), want[name].to_list(), strict=True):
            if isinstance(x, float) and isinstance(y, float) and function in SUMMED:
                assert (x != x and y != y) or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
            else:
                assert same(x, y), (name, x, y)


@settings(SETTINGS, max_examples=6)
@given(
    **CASE_PARTS,
    picked=st.lists(agg_choices, min_size=1, max_size=6),
    spark_spine=st.booleans(),
)
def test_aggregations_same_answers_as_polars_and_the_reference(
    spark: SparkSession,
    batches: list[list[tuple[int, datetime, float | None, str | None]]],
    compact_after: set[int],
    picked: list[tuple[str | None, str, timedelta, bool]],
    spine_keys: list[int | None],
    shifts: list[tuple[int, int]],
    created: bool,
    pin: bool,
    spark_spine: bool,
) -> None:
    """test_aggregations' cases (µs times around a few anchors, many in one ms, exact ties,
    created times that reorder ties, nulls, 1-3 writes with compactions, spine times on
    window edges ±1 µs, null and absent keys, as_of the first write) through both engines,
    and the Spark answers against the brute-force reference."""
    with tempfile.TemporaryDirectory() as tmp, FeatureStore(tmp) as store:
        view, aggs, spine, rows, as_of = play_case(
            store, picked, batches, compact_after, spine_keys, shifts, created, pin
        )
        want = store.get_historical_features(spine, ["w:*"], as_of=as_of).collect()
        given = to_spark_spine(spark, spine, "event_timestamp", ntz=False) if spark_spine else spine
        result = store.get_historical_features(
            given, ["w:*"], as_of=as_of, engine="spark", spark=spark
        )
        got = pl.DataFrame(pl.from_arrow(result.toArrow())).sort("row_id")
    assert got.columns == want.columns
    close_values(want, got, {a.feature: a.function for a in aggs})
    check_reference(view, aggs, spine, rows, got)


def test_aggregations_compose_with_plain_and_derived_features(
    spark: SparkSession, tmp_path: Any
) -> None:
    """Aggregations next to a plain view and feeding a derived feature, in one call; compound
    string keys; NaN, Int64 sums that wrap, null times and keys, empty windows; as_of before
    any write; bitemporal refused as on the Polars path."""
    pair = Entity("pair", join_keys=["user_id", "shop"])
    visits = FeatureView(
        "visits",
        entities=[pair],
        schema={"amount": pl.Float64, "qty": pl.Int64, "paid": pl.Boolean, "at": pl.Date},
    )
    profile = FeatureView("profile", entities=[pair], schema={"age": pl.Int32})
    hour = timedelta(hours=1)
    fns = ["count", "sum", "mean", "min", "max", "std", "var", "first", "last", "count_distinct"]
    aggs = [Aggregation("amount", f, "1h", name=f"amount_{f}") for f in fns]
    aggs += [
        Aggregation("qty", "sum", "1d", name="qty_sum"),
        Aggregation("paid", "sum", "1d", name="paid_sum"),
        Aggregation("at", "max", "1d", name="last_day"),
        Aggregation(None, "count", "1us", name="now"),
        Aggregation("amount", "last", hour, forward=True, name="next"),
    ]
    ratio = OnDemandView(
        "ratio",
        {"share": pl.col("amount") / pl.col("v:amount_sum")},
        request_schema={"amount": pl.Float64},
    )
    store = FeatureStore(tmp_path)
    store.apply([pair, visits, profile, AggregationView("v", "visits", aggs), ratio])
    rows = [
        (1, "a", AGG_T0, 1.0, 2**62, True),
        (1, "a", AGG_T0 + US, float("nan"), 2**62, False),
        (1, "a", AGG_T0 + US, None, 2**62, None),
        (1, "b", AGG_T0, 4.0, -5, True),
        (2, "a", AGG_T0 + hour, 2.5, None, True),
        (1, "a", AGG_T0 + hour, 16.0, 1, True),  # a tie, written last
    ]
    frame = pl.DataFrame(
        rows, schema=["user_id", "shop", "event_timestamp", "amount", "qty", "paid"], orient="row"
    ).with_columns(at=pl.col("event_timestamp").dt.date())
    version = store.write("visits", frame)
    store.write("visits", frame.head(1).with_columns(amount=pl.lit(8.0)))  # an exact tie
    store.write(
        "profile",
        pl.DataFrame({"user_id": [1], "shop": ["a"], "age": [30], "event_timestamp": [AGG_T0]}),
    )
    spine = pl.DataFrame(
        {
            "user_id": [1, 1, 1, 2, 3, None, 1],
            "shop": ["a", "a", "b", "a", "a", "a", "a"],
            "event_timestamp": [
                AGG_T0,
                AGG_T0 + hour,
                AGG_T0 + hour,
                AGG_T0 + hour - US,
                AGG_T0,
                AGG_T0,
                None,
            ],
            "amount": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
        },
        schema_overrides={"event_timestamp": pl.Datetime("us", "UTC")},
    )
    feats = ["v:*", "profile:age", "ratio:share"]
    functions = {a.feature: a.function for a in aggs} | {"age": "", "share": "sum"}
    for kw in ({}, {"as_of": {"visits": version}}, {"as_of": datetime(2000, 1, 1)}):
        want = store.get_historical_features(spine, feats, **kw).collect()
        result = store.get_historical_features(spine, feats, engine="spark", spark=spark, **kw)
        got = pl.DataFrame(pl.from_arrow(result.toArrow()))
        assert got.columns == want.columns
        close_values(want, got, functions)
    counts = want["amount_count"].to_list(), want["now"].to_list()
    assert counts == ([0, 0, 0, 0, 0, 0, None], [0, 0, 0, 0, 0, 0, None])  # before any write
    with pytest.raises(ValidationError, match="bitemporal=True does not apply to aggregation"):
        store.get_historical_features(spine, ["v:*"], bitemporal=True, engine="spark", spark=spark)


def test_a_session_without_the_s3a_connector_is_a_clear_error(spark: SparkSession) -> None:
    """s3:// repositories are read through s3a://, which needs hadoop-aws on the session (not
    installable here: no Maven Central); without it the error says what to add."""
    from polarstore import StorageError
    from polarstore._spark import _read_parquet, _spark_path

    path = _spark_path("s3://bucket/repo/offline/v") + "/part-0.parquet"
    assert path.startswith("s3a://bucket/")
    with pytest.raises(StorageError, match=r"s3a:// files of view 'v'.*hadoop-aws"):
        _read_parquet(spark, "x bigint", [path], "v")
