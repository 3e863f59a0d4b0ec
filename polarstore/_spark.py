"""The point-in-time join on Apache Spark: the Polars path's answers, as a Spark DataFrame.

This is the only module that imports ``pyspark``, and only inside functions: the core never
needs it. The views' data files are the ones the Delta log lists for the pinned version, as
polarstore resolves them (``_offline``), read by Spark as plain Parquet: the session needs
no delta-spark package.

One as-of join per view, Spark style, without a range join: the spine rows and the view's
candidate rows are unioned, ordered per key by (time, kind, event time, created time, write
sequence), and every spine row takes the last view row before it (``last(...,
ignorenulls=True)`` over a running window). Feature rows sort in tie-breaking order, so
"the last one" is rule 4; a spine row sorts after the view rows of its own instant (rule 2)
or, for ``allow_exact_match=False``, before them. The TTL is checked on the row picked: every
other candidate is older. Spine rows keep all their columns through the window, so no join
back is needed and the row order column is computed once.

Aggregation views are Spark SQL too (:func:`_aggregate`: a range join on key and time bucket,
one group by per spine row). Derived features are an Arrow UDF (:func:`_derive`): Polars
evaluates the stored expressions on the workers, so their values are the Polars path's.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from polarstore._aggregations import AggregationView, table_of
from polarstore._definitions import SEQ_COLUMN, FeatureView, dtype_from_str, dtype_to_str
from polarstore._errors import PolarstoreError, StorageError, ValidationError, did_you_mean
from polarstore._expressions import expression_from_json, expression_to_json
from polarstore._frames import lossless_cast, to_polars
from polarstore._offline import (
    OfflineStore,
    _check_schema,
    _files_of,
    _polars_schema,
    seq_floor,
)
from polarstore._ondemand import Plan, request_frame
from polarstore._retrieval import EMPTY_VERSION, Requested, spine_key_dtype
from polarstore._time import check_range, to_utc_expr, warn_nanoseconds

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql import DataFrame as SparkDataFrame  # noqa: F401  (for the façade's hints)

__all__ = ["ENGINES", "check_engine", "historical_features"]

ENGINES = ("polars", "spark")
_WHERE = "get_historical_features(engine='spark')"
_ROW = "__polarstore_row"
_TS = "__polarstore_ts"
_REQ = "__polarstore_req_"  # as in _ondemand
# Working columns of the union: order time, kind, event, created, sequence, feature struct.
_O, _K, _E, _C, _Q, _F = (f"__polarstore_{c}" for c in "okecqf")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
_SHIFT = seq_floor(1).bit_length() - 1


def check_engine(engine: object, spark: object) -> None:
    """``ValidationError`` unless ``engine`` is a known engine and ``spark`` fits it."""
    if engine not in ENGINES:
        msg = (
            f"get_historical_features: engine must be one of {list(ENGINES)}, got {engine!r}."
            + did_you_mean(str(engine), ENGINES)
        )
        raise ValidationError(msg)
    if engine == "polars" and spark is not None:
        msg = "get_historical_features: spark= is only used with engine='spark'."
        raise ValidationError(msg)


def historical_features(
    offline: OfflineStore,
    entity_df: object,
    plan: Plan,
    *,
    timestamp_field: str,
    versions: Mapping[str, int | None],
    bitemporal: bool,
    spark: SparkSession | None,
) -> DataFrame:
    """The point-in-time join of ``entity_df`` with the plan's views, on Spark.

    ``entity_df`` is a Spark DataFrame (its rows keep the order Spark reads them in) or
    anything the Polars path accepts (its row order is kept). ``spark`` may be omitted for a
    Spark DataFrame (its session is used). Same rules and output as the Polars path; derived
    features are computed by Polars on the joined rows (:func:`_derive`).
    """
    sql = _pyspark()
    requested = plan.stored
    for r in requested:
        if isinstance(r.view, AggregationView) and bitemporal:
            msg = (  # as on the Polars path
                f"get_historical_features: bitemporal=True does not apply to aggregation view "
                f"{r.view.name!r} yet; request it without bitemporal."
            )
            raise ValidationError(msg)
    if isinstance(entity_df, sql.DataFrame):
        spark = spark or entity_df.sparkSession
    if not isinstance(spark, sql.SparkSession):
        msg = (
            f"{_WHERE} needs a SparkSession: pass spark=SparkSession.builder.getOrCreate() "
            f"(got {type(spark).__name__})."
        )
        raise ValidationError(msg)
    if plan.derived:
        _check_workers(spark)
    plans = _plans(requested)
    if isinstance(entity_df, sql.DataFrame):
        spine, columns, bounds = _spark_spine(
            entity_df, plans, plan, timestamp_field, versions, offline
        )
    else:
        spine, columns, bounds = _polars_spine(
            spark, entity_df, plans, plan, timestamp_field, versions, offline
        )
    for view_name, (reqs, keys) in plans.items():
        view = reqs[0].view
        if isinstance(view, AggregationView):
            version = versions.get(view.source_name)
            spine = _aggregate(spark, offline, spine, view, reqs, list(keys), version, bounds)
            continue
        rows = _view_rows(
            spark, offline, view, reqs, keys, versions.get(view_name), bounds, bitemporal
        )
        spine = _join(spine, rows, view, reqs, list(keys), bitemporal)
    if plan.derived:
        derived = {d.output for d in plan.derived}
        keep = [*columns, _ROW, *(o for o in plan.outputs if o not in derived)]
        spine = _derive(spine, plan, keep)
    return spine.orderBy(_ROW).select(*columns, *plan.outputs)


def _pyspark() -> Any:
    try:
        import pyspark.sql as sql
    except ImportError as e:
        msg = (
            "engine='spark' needs pyspark, which is not installed: "
            "pip install 'polarstore[spark]' (and Java 17 or later)."
        )
        raise PolarstoreError(msg) from e
    return sql


def _plans(requested: Sequence[Requested]) -> dict[str, tuple[list[Requested], dict[str, str]]]:
    """Per view: its requests and the spine's cast key columns (name -> stored kind)."""
    plans: dict[str, tuple[list[Requested], dict[str, str]]] = {}
    for r in requested:
        plans.setdefault(r.view.name, ([], {}))[0].append(r)
    return plans


def _check_columns(columns: Sequence[str], plan: Plan, ts: str) -> None:
    if ts not in columns:
        msg = (
            f"{_WHERE}: the entity_df has no timestamp column {ts!r}."
            + did_you_mean(ts, columns)
            + " Pass timestamp_field= to name it."
        )
        raise ValidationError(msg)
    # Spark resolves column names case-insensitively (by default): so are these checks.
    reserved = [c for c in columns if c.lower().startswith("__polarstore")]
    if reserved:
        msg = f"{_WHERE}: the entity_df column name(s) {reserved} are reserved."
        raise ValidationError(msg)
    lowered = {c.lower() for c in columns}
    clashes = [output for output in plan.outputs if output.lower() in lowered]
    if clashes:
        msg = (
            f"{_WHERE}: output feature column(s) {clashes} already exist in the entity_df; "
            "rename those columns or pass full_feature_names=True."
        )
        raise ValidationError(msg)
    missing = [c for c in plan.request if c not in columns]
    if missing:
        msg = (
            f"{_WHERE}: missing request column(s) {missing} that the requested on-demand "
            f"features read (declared in their request_schema: "
            f"{ {c: str(plan.request[c]) for c in missing} })." + did_you_mean(missing[0], columns)
        )
        raise ValidationError(msg)
    for reqs, _ in _plans(plan.stored).values():
        view = reqs[0].view
        missing = [k for k in view.join_keys if k not in columns]
        if missing:
            msg = (
                f"{_WHERE}: view {view.name!r} is keyed by {list(view.join_keys)} but the "
                f"entity_df has no column(s) {missing}." + did_you_mean(missing[0], columns)
            )
            raise ValidationError(msg)


def _stored_keys(
    offline: OfflineStore, view: FeatureView | AggregationView, versions: Mapping[str, int | None]
) -> dict[str, pl.DataType]:
    """The key dtypes the view's table stores (as the Polars path reads them), if any."""
    table = table_of(view)
    stored = None if versions.get(table) == EMPTY_VERSION else offline.table_schema(table)
    return {k: stored[k] for k in view.join_keys if k in stored} if stored else {}


def _temp_key(key: str, kind: pl.DataType) -> str:
    return f"__polarstore_key_{key}_{kind}"


def _polars_spine(
    spark: SparkSession,
    entity_df: object,
    plans: dict[str, tuple[list[Requested], dict[str, str]]],
    plan: Plan,
    ts: str,
    versions: Mapping[str, int | None],
    offline: OfflineStore,
) -> tuple[DataFrame, list[str], tuple[int, int] | None]:
    """The spine checked and cast as the Polars path does, then handed to Spark via Arrow.

    Its columns go as Spark can hold them: naive times as the UTC instants polarstore reads
    them as (Spark would read them in the session's zone), nanoseconds floored to µs with a
    ``NanosecondWarning``, unsigned integers widened, categoricals as strings.
    """
    spine = to_polars(entity_df, what="get_historical_features entity_df")
    _check_columns(spine.columns, plan, ts)
    check_range(spine[ts], where=_WHERE)
    extra: dict[str, pl.Expr] = {
        _ROW: pl.int_range(pl.len(), dtype=pl.Int64),
        _TS: to_utc_expr(ts, spine.schema[ts], where=_WHERE).dt.epoch("us"),
    }
    for reqs, keys in plans.values():
        view = reqs[0].view
        stored = _stored_keys(offline, view, versions)
        for key in view.join_keys:
            target = spine_key_dtype(spine, key, view, stored, where=_WHERE)
            temp = _temp_key(key, target)
            extra[temp] = lossless_cast(spine, key, target, _WHERE)
            keys[temp] = "long" if target == pl.Int64 else "string"
    out = spine.select(*(_sparkable(spine[c]) for c in spine.columns), **extra)
    if plan.request:  # cast (and checked) here, as the Polars path does
        request = request_frame(spine, plan, where=_WHERE).drop(_REQ)
        out = out.hstack(request.select(_sparkable(request[c]) for c in request.columns))
    times = out[_TS].drop_nulls()
    bounds = None if times.is_empty() else (int(times.min()), int(times.max()))  # type: ignore[arg-type]
    try:
        with warnings.catch_warnings():
            # pyspark checks the pandas version even for Arrow input; no pandas is involved.
            warnings.filterwarnings("ignore", "PySpark does not yet", FutureWarning)
            frame = spark.createDataFrame(out.to_arrow(compat_level=pl.CompatLevel.oldest()))
    except Exception as e:  # pyspark raises many kinds here
        msg = f"{_WHERE}: the entity_df cannot be handed to Spark: {e}"
        raise ValidationError(msg) from e
    return frame, spine.columns, bounds


def _sparkable(series: pl.Series) -> pl.Expr:
    col, dtype = pl.col(series.name), series.dtype
    if isinstance(dtype, pl.Datetime):
        if dtype.time_unit == "ns":
            warn_nanoseconds(series, where=_WHERE)
        col = col.dt.cast_time_unit("us")
        return col.dt.replace_time_zone("UTC") if dtype.time_zone is None else col
    widened = {pl.UInt8: pl.Int16, pl.UInt16: pl.Int32, pl.UInt32: pl.Int64, pl.UInt64: pl.Int64}
    for unsigned, signed in widened.items():
        if dtype == unsigned:
            return col.cast(signed, strict=True)
    if isinstance(dtype, (pl.Categorical, pl.Enum)):
        return col.cast(pl.String)
    return col


def _spark_spine(
    frame: DataFrame,
    plans: dict[str, tuple[list[Requested], dict[str, str]]],
    plan: Plan,
    ts: str,
    versions: Mapping[str, int | None],
    offline: OfflineStore,
) -> tuple[DataFrame, list[str], tuple[int, int] | None]:
    """A Spark spine with the working columns, and its time bounds (one small Spark job)."""
    from pyspark.sql import functions as F  # noqa: N812
    from pyspark.sql import types as T  # noqa: N812

    columns = list(frame.columns)
    _check_columns(columns, plan, ts)
    types = {f.name: f.dataType for f in frame.schema.fields}
    kind = types[ts]
    if isinstance(kind, T.TimestampType):
        micros = F.unix_micros(F.col(ts))
    elif isinstance(kind, T.TimestampNTZType):  # naive: UTC, whatever the session's zone
        micros = F.expr(f"timestampdiff(MICROSECOND, TIMESTAMP_NTZ'1970-01-01', `{ts}`)")
    elif isinstance(kind, T.DateType):
        micros = F.unix_date(F.col(ts)).cast("long") * 86_400_000_000
    elif isinstance(kind, T.NullType):  # no times at all: every feature is null
        micros = F.lit(None).cast("long")
    else:
        msg = f"{_WHERE}: column {ts!r} must be a timestamp or a date, got {kind.simpleString()}."
        raise ValidationError(msg)
    extra: dict[str, Column] = {_ROW: F.monotonically_increasing_id(), _TS: micros}
    # Request values go as given: cast (and checked) by the workers, in _derive.
    extra.update({_REQ + c: F.col(c) for c in plan.request})
    checks: list[tuple[str, pl.DataType]] = []
    for view_name, (reqs, keys) in plans.items():
        view = reqs[0].view
        stored_keys = _stored_keys(offline, view, versions)
        for key in view.join_keys:
            given = types[key]
            declared = view.key_dtypes.get(key)
            stored = stored_keys.get(key)
            if isinstance(given, T.StringType):
                target = "string"
            elif isinstance(given, T.IntegralType):
                target = "long"
            elif isinstance(given, T.NullType):
                string = (stored or declared) == pl.String
                target = "string" if string else "long"
            else:
                msg = (
                    f"{_WHERE}: join key {key!r} must be an integer or string column, got "
                    f"{given.simpleString()}."
                )
                raise ValidationError(msg)
            if declared is not None and (target == "string") != (declared == pl.String):
                msg = (
                    f"{_WHERE}: join key {key!r} is declared {declared} but the entity_df "
                    f"holds {given.simpleString()}; pass {declared} values."
                )
                raise ValidationError(msg)
            if stored is not None and (target == "string") != (stored == pl.String):
                msg = (
                    f"{_WHERE}: entity_df column {key!r} is {given.simpleString()} but view "
                    f"{view_name!r} stores {key!r} as {stored}."
                )
                raise ValidationError(msg)
            if declared is not None and declared != pl.String:
                checks.append((key, declared))
            temp = _temp_key(key, pl.String() if target == "string" else pl.Int64())
            extra[temp] = F.col(key).cast(target)
            keys[temp] = target
    spine = frame.withColumns(extra)
    aggs = [F.min(_TS), F.max(_TS)]
    aggs += [f(F.col(k)) for k, _ in checks for f in (F.min, F.max)]
    found = spine.agg(*aggs).first()
    assert found is not None  # an aggregation without grouping always has a row
    for i, (key, declared) in enumerate(checks):
        low, high = found[2 + 2 * i], found[3 + 2 * i]
        if low is not None and not _fits(low, high, declared):
            msg = (
                f"{_WHERE}: join key {key!r} is declared {declared} but the entity_df holds "
                f"values from {low} to {high}, outside it."
            )
            raise ValidationError(msg)
    bounds = None if found[0] is None else (int(found[0]), int(found[1]))
    return spine, columns, bounds


def _fits(low: int, high: int, dtype: pl.DataType) -> bool:
    series = pl.Series([low, high], dtype=pl.Int64)
    return series.cast(dtype, strict=False).null_count() == 0


def _moment(us: int) -> datetime | None:
    try:
        return _EPOCH + us * _US
    except OverflowError:  # before year 1: no bound
        return None


def _spark_type(dtype: pl.DataType) -> str:
    """The Spark SQL type of a stored Polars dtype (the ones a view may hold)."""
    if isinstance(dtype, pl.List):
        return f"array<{_spark_type(dtype.inner)}>"  # type: ignore[arg-type]
    if isinstance(dtype, pl.Datetime):
        return "timestamp" if dtype.time_zone else "timestamp_ntz"
    simple = {
        pl.Boolean: "boolean",
        pl.Int8: "tinyint",
        pl.Int16: "smallint",
        pl.Int32: "int",
        pl.Int64: "bigint",
        pl.Float32: "float",
        pl.Float64: "double",
        pl.String: "string",
        pl.Binary: "binary",
        pl.Date: "date",
    }
    for kind, name in simple.items():
        if dtype == kind:
            return name
    msg = f"{_WHERE}: dtype {dtype} has no Spark type here."
    raise ValidationError(msg)


def _spark_path(uri: str) -> str:
    """A path Spark (Hadoop) reads: local folders as file: paths, s3:// through s3a."""
    if "://" not in uri or uri.startswith("file://"):
        return "file://" + str(Path(uri.removeprefix("file://")).resolve())
    if uri.startswith("s3://"):
        return "s3a://" + uri.removeprefix("s3://")
    return uri


def _read(
    spark: SparkSession,
    offline: OfflineStore,
    view: FeatureView,
    version: int | None,
    since: int | None,
    until: int,
) -> tuple[DataFrame, dict[str, pl.DataType], list[Any]] | None:
    """The data files of ``view`` as of ``version`` that may hold event times in ``[since,
    until]`` (µs), read by Spark with the table's schema; None when there are none."""
    table = None if version == EMPTY_VERSION else offline._open(view.name, version)
    if table is None:
        return None
    first = None if since is None else _moment(since)
    last = _moment(until)
    files = [
        f
        for f in _files_of(table, view)
        if not (first is not None and f.max_ts is not None and f.max_ts < first)
        and not (last is not None and f.min_ts is not None and f.min_ts > last)
    ]
    offline.check_data_files(view.name, table, files, version)
    if not files:
        return None
    schema = _check_schema(view, _polars_schema(table))
    ddl = ", ".join(f"`{name}` {_spark_type(dtype)}" for name, dtype in schema.items())
    root = _spark_path(offline.table_uri(view.name))
    frame = _read_parquet(spark, ddl, [f"{root}/{f.path}" for f in files], view.name)
    return frame, schema, files


def _read_parquet(spark: SparkSession, ddl: str, paths: list[str], name: str) -> DataFrame:
    """``spark.read.parquet``; a session that cannot open the paths' file system (no S3A
    connector for ``s3a://``) is a ``StorageError`` saying what to add."""
    try:
        return spark.read.schema(ddl).parquet(*paths)
    except Exception as e:  # py4j / pyspark errors of many kinds
        scheme = paths[0].partition("://")[0] if paths else ""
        text = str(e)
        missing = "No FileSystem for scheme" in text or (
            "ClassNotFoundException" in text and "FileSystem not found" in text
        )
        if not missing:
            raise
        msg = (
            f"{_WHERE}: the Spark session cannot read the {scheme}:// files of view {name!r}: "
            "it has no file system (connector) for that scheme. For S3 add the S3A connector "
            "(spark.jars.packages=org.apache.hadoop:hadoop-aws:<the session's Hadoop version>) "
            "and its credentials (spark.hadoop.fs.s3a.*)."
        )
        raise StorageError(msg) from e


def _view_rows(
    spark: SparkSession,
    offline: OfflineStore,
    view: FeatureView,
    reqs: list[Requested],
    keys: dict[str, str],
    version: int | None,
    bounds: tuple[int, int] | None,
    bitemporal: bool,
) -> DataFrame | None:
    """The view's candidate rows: keys, order time, tie columns and the feature struct.

    None when there is nothing to read (no data as of the pin, or no spine time).
    """
    from pyspark.sql import functions as F  # noqa: N812
    from pyspark.sql.window import Window

    if bounds is None:
        return None
    lo, hi = bounds
    ttl = None if view.ttl is None else view.ttl // _US
    read = _read(spark, offline, view, version, None if ttl is None else lo - ttl, hi)
    if read is None:
        return None
    frame, schema, files = read
    event = F.unix_micros(F.col(view.timestamp_field))
    created = (
        F.unix_micros(F.col(view.created_timestamp_field))
        if view.created_timestamp_field
        else F.lit(None).cast("long")
    )
    features = [
        (F.col(r.feature) if r.feature in schema else F.lit(None))
        .cast(_spark_type(view.schema[r.feature]))
        .alias(f"_{i}")
        for i, r in enumerate(reqs)
    ]
    rows = frame.select(
        *(F.col(k).alias(t) for k, t in zip(view.join_keys, keys, strict=True)),
        event.alias(_E),
        created.alias(_C),
        F.col(SEQ_COLUMN).alias(_Q),
        F.struct(event.alias("e"), *features).alias(_F),
    )
    rows = rows.filter(F.col(_E) <= hi)
    if ttl is not None:
        rows = rows.filter(F.col(_E) >= lo - ttl)
    if not bitemporal:
        return rows.withColumn(_O, F.col(_E))
    times = offline.commit_times(view.name)
    for f in files:
        for seq in (f.min_seq, f.max_seq):
            if seq is not None and seq >> _SHIFT not in times:
                raise _unknown_commit(view)
    commits = spark.createDataFrame(
        [(v, ms * 1000) for v, ms in times.items()], "__polarstore_v long, __polarstore_t long"
    )
    rows = rows.join(
        F.broadcast(commits), F.shiftright(F.col(_Q), _SHIFT) == F.col("__polarstore_v"), "left"
    )
    commit = F.when(F.col("__polarstore_t").isNull(), F.raise_error(str(_unknown_commit(view))))
    strict = 0 if view.allow_exact_match else 1
    known = F.greatest(F.col(_E) + strict, F.col(_C), commit.otherwise(F.col("__polarstore_t")))
    rows = rows.withColumn(_O, known).filter(F.col(_O) <= hi)
    # Known from the minimum known time of the row and every later row of its key (see
    # _retrieval._known_rows): non-decreasing in tie order, so tie order stays the order.
    later = (
        Window.partitionBy(*keys)
        .orderBy(F.col(_E).desc(), F.col(_C).desc(), F.col(_Q).desc())
        .rowsBetween(Window.unboundedPreceding, Window.currentRow)
    )
    return rows.withColumn(_O, F.min(_O).over(later)).drop("__polarstore_v", "__polarstore_t")


def _unknown_commit(view: FeatureView) -> PolarstoreError:
    msg = (
        f"view {view.name!r}: some rows were written by commits whose time is no longer "
        "known (neither the Delta log nor .polarstore/commit_times holds it); "
        "bitemporal=True cannot tell when they became known."
    )
    return PolarstoreError(msg)


def _join(
    spine: DataFrame,
    rows: DataFrame | None,
    view: FeatureView,
    reqs: list[Requested],
    keys: list[str],
    bitemporal: bool,
) -> DataFrame:
    """``spine`` with the features of ``reqs`` added, by the union-and-window as-of join."""
    from pyspark.sql import functions as F  # noqa: N812
    from pyspark.sql.window import Window

    types = [_spark_type(view.schema[r.feature]) for r in reqs]
    if rows is None:
        return spine.withColumns(
            {r.output: F.lit(None).cast(t) for r, t in zip(reqs, types, strict=True)}
        )
    # Spine rows sort after the view rows of their instant, or before them when strict (in
    # bitemporal mode strictness is in the known time already).
    after = 1 if view.allow_exact_match or bitemporal else -1
    left = spine.withColumns({_O: F.col(_TS), _K: F.lit(after)})
    both = left.unionByName(rows.withColumn(_K, F.lit(0)), allowMissingColumns=True)
    window = (
        Window.partitionBy(*keys)
        .orderBy(_O, _K, _E, _C, _Q)
        .rowsBetween(Window.unboundedPreceding, Window.currentRow)
    )
    picked = F.last(_F, ignorenulls=True).over(window)
    both = both.withColumn(_F, picked).filter(F.col(_K) != 0)
    valid = F.col(_TS).isNotNull() & F.col(_F).isNotNull()
    for key in keys:
        valid &= F.col(key).isNotNull()  # a null key matches nothing
    if view.ttl is not None:
        valid &= F.col(_TS) - F.col(f"{_F}.e") <= view.ttl // _US
    return both.withColumns(
        {r.output: F.when(valid, F.col(f"{_F}._{i}")) for i, r in enumerate(reqs)}
    ).drop(_O, _K, _E, _C, _Q, _F)


# --- aggregation views: a range join and one group by --------------------------------------

_B, _V = "__polarstore_bucket", "__polarstore_v"
_TWO64 = "CAST('18446744073709551616' AS DECIMAL(38,0))"
_TWO63 = "CAST('9223372036854775808' AS DECIMAL(38,0))"


def _aggregate(
    spark: SparkSession,
    offline: OfflineStore,
    spine: DataFrame,
    view: AggregationView,
    reqs: list[Requested],
    keys: list[str],
    version: int | None,
    bounds: tuple[int, int] | None,
) -> DataFrame:
    """``spine`` with the aggregates of ``reqs`` over their windows (``_aggregations``).

    Each spine row meets its key's source events around ``(t - largest backward window, t +
    largest forward window]``: a left equi-join on the key and a time bucket as wide as that
    span (so a row spans at most two buckets and a key's events are never all paired with
    all its rows). One group by per spine row computes every aggregate by conditional
    aggregation on its own window's exact bounds; rows without events get what an empty
    window gives (counts 0, the rest null; a spine row without a time, nulls).
    """
    from pyspark.sql import functions as F  # noqa: N812

    source = view.source_view
    aggs = [(view.aggregation(r.feature), r.output) for r in reqs]
    back = max((_span(a) for a, _ in aggs if not a.forward), default=0)
    ahead = max((_span(a) for a, _ in aggs if a.forward), default=0)
    events = None
    if bounds is not None:
        lo, hi = bounds
        read = _read(spark, offline, source, version, lo - back, hi + ahead)
        if read is not None:
            frame, schema, _ = read
            columns = dict.fromkeys(a.column for a, _ in aggs if a.column is not None)
            values = {
                c: (F.col(c) if c in schema else F.lit(None)).cast(_spark_type(source.schema[c]))
                for c in columns
            }
            event = F.unix_micros(F.col(source.timestamp_field))
            created = (
                F.unix_micros(F.col(source.created_timestamp_field))
                if source.created_timestamp_field
                else F.lit(None).cast("long")
            )
            events = frame.select(
                *(F.col(k).alias(t) for k, t in zip(source.join_keys, keys, strict=True)),
                event.alias(_E),
                created.alias(_C),
                F.col(SEQ_COLUMN).alias(_Q),
                *(v.alias(f"{_V}_{i}") for i, v in enumerate(values.values())),
            ).filter((F.col(_E) > lo - back) & (F.col(_E) <= hi + ahead))
            slots = {c: f"{_V}_{i}" for i, c in enumerate(columns)}
    types = {o: _spark_type(view.schema[a.feature]) for a, o in aggs}
    counts = [o for a, o in aggs if a.function in ("count", "count_distinct")]
    if events is None:
        empty = {o: F.lit(None).cast(t) for o, t in types.items()}
        empty.update({o: F.when(F.col(_TS).isNotNull(), F.lit(0)).cast("bigint") for o in counts})
        return spine.withColumns(empty)
    span = max(back + ahead, 1)
    # explode_outer: a spine row without a time keeps one row (a null bucket, no events).
    bucket = F.explode_outer(
        F.sequence(F.expr(f"({_TS} - {back}) div {span}"), F.expr(f"({_TS} + {ahead}) div {span}"))
    )
    right = events.withColumn(_B, F.expr(f"{_E} div {span}"))
    # Spine rows carry their columns through the join and the group by (their copies in two
    # buckets are equal): no join back, so the row order column is computed once.
    pairs = spine.withColumn(_B, bucket).join(right, on=[*keys, _B], how="left")
    carried = [c for c in spine.columns if c != _ROW]
    found = pairs.groupBy(_ROW).agg(
        *(F.first(c).alias(c) for c in carried),
        *(
            _aggregation(a, F.col(slots[a.column]) if a.column else None, source).alias(o)
            for a, o in aggs
        ),
    )
    timed = F.col(_TS).isNotNull()
    return found.withColumns(
        {o: (F.when(timed, F.col(o)) if o in counts else F.col(o)).cast(types[o]) for o in types}
    )


def _span(agg: Any) -> int:
    """The window in µs, capped where it already covers every representable time (year 1 to
    9999 is ~3.2e17 µs), so that time arithmetic stays within a Spark bigint."""
    return min(agg.span // _US, 2**60)


def _aggregation(agg: Any, value: Column | None, source: FeatureView) -> Column:
    """One aggregate of the paired rows, over the rows inside its own window only."""
    from pyspark.sql import functions as F  # noqa: N812

    w = _span(agg)
    if agg.forward:
        inside = (F.col(_E) > F.col(_TS)) & (F.col(_E) <= F.col(_TS) + w)
    else:
        inside = (F.col(_E) > F.col(_TS) - w) & (F.col(_E) <= F.col(_TS))
    fn = agg.function
    if value is None:
        return F.count(F.when(inside, F.lit(1)))
    dtype = source.schema[agg.column]
    floating = dtype in (pl.Float32(), pl.Float64())
    x = F.when(inside, value)
    if fn == "count":
        return F.count(x)
    if fn == "count_distinct":
        return F.count_distinct(x)
    if fn in ("first", "last"):
        # By tie order (event, created, write sequence) among the non-null values.
        order = F.when(inside & value.isNotNull(), F.struct(_E, _C, _Q))
        return (F.min_by if fn == "first" else F.max_by)(x, order)
    if fn == "sum" and not floating:
        # Int64 semantics (wrapping, as Polars sums): an exact decimal sum taken mod 2**64.
        total = F.pmod(
            F.sum(x.cast("int" if dtype == pl.Boolean else "bigint").cast("decimal(38,0)")),
            F.expr(_TWO64),
        )
        return (
            F.when(total >= F.expr(_TWO63), total - F.expr(_TWO64)).otherwise(total).cast("bigint")
        )
    if fn in ("sum", "mean", "std", "var"):
        number = x.cast("double")
        done = {"sum": F.sum, "mean": F.avg, "std": F.stddev_samp, "var": F.var_samp}[fn]
        return done(number)
    if fn == "max" and floating:
        # Polars' max skips NaN unless every value is NaN; Spark's takes NaN as the largest.
        return F.coalesce(F.max(F.when(inside & ~F.isnan(value), value)), F.max(x))
    return (F.min if fn == "min" else F.max)(x)


# --- derived features: Polars on the workers ------------------------------------------------

_CHECKED_WORKERS: set[str] = set()


def _check_workers(spark: SparkSession) -> None:
    """In local mode, a clear error when the workers' Python cannot import polarstore.

    Spark starts its Python workers with ``PYSPARK_PYTHON`` (default ``python3`` from the
    PATH), which need not be the driver's environment; on a cluster the executors' Python is
    the operator's business (docs/contract.md, "The Spark engine").
    """
    import subprocess
    import sys

    context = spark.sparkContext
    python = getattr(context, "pythonExec", None) or "python3"
    if not (context.master or "").startswith("local") or python in _CHECKED_WORKERS:
        return
    try:
        found = subprocess.run(
            [python, "-c", "import polars, polarstore"], capture_output=True, timeout=60
        )
        ok = found.returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if not ok:
        msg = (
            f"{_WHERE}: derived features run Polars on Spark's Python workers, but the workers' "
            f"Python ({python!r}) cannot import polars and polarstore. Start the session with "
            f"PYSPARK_PYTHON={sys.executable} (or install polarstore there)."
        )
        raise PolarstoreError(msg)
    _CHECKED_WORKERS.add(python)


def _derive(frame: DataFrame, plan: Plan, keep: Sequence[str]) -> DataFrame:
    """``frame``'s ``keep`` columns and the plan's derived features, by an Arrow UDF.

    Each Arrow batch becomes a Polars frame and the derived expressions are evaluated on it
    by Polars, as the Polars path evaluates them: the values are equal bit for bit. The
    expressions travel to the workers as their Polars JSON (never pickled); the inputs are
    conformed to the dtypes the Polars path joins them as (Spark hands instants in its
    session zone, and request values as the spine holds them).
    """
    from pyspark.sql import types as T  # noqa: N812

    inputs = {column: dtype_to_str(plan.input_dtypes[ref]) for ref, column in plan.inputs}
    inputs.update({_REQ + c: dtype_to_str(t) for c, t in plan.request.items()})
    exprs = [json.dumps(expression_to_json(d.expr)) for d in plan.derived]
    fields = {f.name: f for f in frame.schema.fields}
    schema = T.StructType(
        [fields[c] for c in keep]
        + [
            T.StructField(d.output, T._parse_datatype_string(_spark_type(d.dtype)))
            for d in plan.derived
        ]
    )
    work = frame.select(*dict.fromkeys([*keep, _ROW, *inputs]))
    with warnings.catch_warnings():
        # pyspark checks the pandas version even for Arrow UDFs; no pandas is involved.
        warnings.filterwarnings("ignore", "PySpark does not yet", FutureWarning)
        return work.mapInArrow(
            functools.partial(_derive_batches, list(keep), inputs, exprs, schema.json()), schema
        )


def _derive_batches(
    keep: list[str],
    inputs: dict[str, str],
    exprs: list[str],
    schema_json: str,
    batches: Iterator[pa.RecordBatch],
) -> Iterator[pa.RecordBatch]:
    """The worker side of :func:`_derive`: batches in, batches with the derived features out."""
    import pyarrow as pa
    from pyspark.sql import types as T  # noqa: N812
    from pyspark.sql.pandas.types import to_arrow_schema

    derived = [expression_from_json(json.loads(e), where=_WHERE) for e in exprs]
    targets = {c: dtype_from_str(t) for c, t in inputs.items()}
    added = T.StructType.fromJson(json.loads(schema_json)).fields[len(keep) :]
    types = to_arrow_schema(T.StructType(added), timezone="UTC")
    names = [*keep, *types.names]
    for batch in batches:
        # The row number keeps the height when no input is read (literals only).
        given = pl.from_arrow(pa.Table.from_batches([batch]).select([_ROW, *inputs]))
        assert isinstance(given, pl.DataFrame)
        conformed = given.with_columns(_conform(given, c, t) for c, t in targets.items())
        # with_columns: a literal broadcasts to every row, as on the Polars path.
        values = conformed.with_columns(derived).select(types.names).to_arrow()
        columns = [batch.column(c) for c in keep]
        columns += [values.column(f.name).cast(f.type).combine_chunks() for f in types]
        yield pa.RecordBatch.from_arrays(columns, names=names)


def _conform(frame: pl.DataFrame, column: str, target: pl.DataType) -> pl.Expr:
    """``column`` as the Polars path joins it: instants in UTC (naive ones as UTC wall
    times), anything else cast without loss (a request value that does not fit is a
    ``ValidationError``, as on the Polars path)."""
    given = frame.schema[column]
    if isinstance(given, pl.Datetime) and given.time_zone is not None:
        utc = pl.col(column).dt.convert_time_zone("UTC")
        if isinstance(target, pl.Datetime) and target.time_zone is None:
            utc = utc.dt.replace_time_zone(None)
        return utc.cast(target)
    what = f"request column {column.removeprefix(_REQ)!r}" if _REQ in column else "an input"
    return lossless_cast(frame, column, target, where=f"{_WHERE}, {what}")
