"""Hostile input: every call gives the spec's answer or a ``PolarstoreError``, and loses nothing.

Hypothesis builds inputs that are wrong in the ways real data is: wrong dtypes, nulls in keys
and timestamps, NaN and ±inf, empty frames, huge strings, unicode keys, duplicate column names
(pyarrow allows them), times before 1970, at the edges of the nanosecond range (1677/2262) and
of Python's (years 1/9999), raw values beyond any calendar, mixed time zones, extra and
missing columns, as Polars, lazy, pyarrow and pandas frames. For each call:

- ``write``: either it succeeds and the new version holds exactly the input rows (keys and
  features as given, times as the same UTC instants), or it raises a ``PolarstoreError`` and
  the table version and rows are unchanged;
- ``get_historical_features``: either the result equals the brute-force reference
  (``tests/reference.py``) with the spine's columns unchanged, or a ``PolarstoreError``;
- names used as paths (views, datasets, feature references) never reach outside the
  repository; a registry edited by hand into anything gives a ``PolarstoreError`` (or works).

Never another exception type. (That nothing is unpickled is checked in test_boundaries.)
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from polarstore import (
    Entity,
    FeatureService,
    FeatureStore,
    FeatureView,
    NanosecondWarning,
    PolarstoreError,
    SchemaError,
)
from tests.reference import RefView, point_in_time

UTC = timezone.utc
ACCOUNT = Entity("account", join_keys=["user_id", "name"])
VIEW = FeatureView(
    "fz",
    entities=[ACCOUNT],
    schema={"x": pl.Float64, "n": pl.Int64, "s": pl.String, "flag": pl.Boolean},
    created_timestamp_field="created",
    ttl=timedelta(days=400),
)
REF = RefView(
    "fz", ("user_id", "name"), ("x", "n", "s", "flag"), "event_timestamp", "created", VIEW.ttl
)
COLUMNS = ["user_id", "name", "event_timestamp", "created", "x", "n", "s", "flag"]
SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

# --- values ----------------------------------------------------------------------------------

EDGE_TIMES = [
    datetime(1, 1, 1),
    datetime(1, 1, 1, 0, 0, 0, 1),
    datetime(1677, 9, 21, 0, 12, 43, 145225),  # just inside the nanosecond range
    datetime(1969, 12, 31, 23, 59, 59, 999999),
    datetime(1970, 1, 1),
    datetime(2024, 3, 10, 7, 0),  # New York springs forward (times are UTC instants)
    datetime(2024, 11, 3, 6, 0),  # and falls back
    datetime(2262, 4, 11, 23, 47, 16, 854775),
    datetime(9999, 12, 31, 23, 59, 59, 999999),
]
# Raw physical values no calendar holds: they must be refused, never overflow or panic.
RAW_EXTREMES = [-(2**63) + 1, -(2**62), 2**62, 2**63 - 1]
ZONES = [None, "UTC", "Asia/Kolkata", "America/New_York", "Pacific/Chatham", "Etc/GMT-14"]
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)
KEY_TEXT = st.one_of(
    TEXT,
    st.sampled_from(["", "é", "e\u0301", "日本", "🦀", "a\x00b", "../x", "NULL", " "]),
    st.just("k" * 100_000),  # a huge key (online keys hash past 507 bytes)
)


def mostly(common: Any, *rare: Any) -> st.SearchStrategy[Any]:
    """``common`` 15 times in 16, else one of ``rare`` (and it shrinks towards ``common``)."""
    return st.integers(0, 15).flatmap(
        lambda i: st.just(common) if i < 15 else st.sampled_from(rare)
    )


@st.composite
def time_column(draw: st.DrawFn, n: int, *, spine: bool = False) -> pl.Series:
    """A timestamp column of ``n`` rows in one of many dtypes, zones and ranges.

    Spine times stay a TTL after year 1: see ``test_spine_time_within_ttl_of_year_1``.
    """
    kind = draw(mostly("datetime", "date", "raw", "wrong"))
    nulls = draw(mostly(False, True))
    if kind == "raw":
        unit = draw(st.sampled_from(["ms", "us", "ns"]))
        values: list[Any] = draw(st.lists(st.sampled_from(RAW_EXTREMES), min_size=n, max_size=n))
        zone = draw(st.sampled_from([None, "UTC", "Asia/Kolkata"]))
        return pl.Series(values, dtype=pl.Int64).cast(pl.Datetime(unit, zone))
    if kind == "wrong":
        dtype = draw(st.sampled_from([pl.String, pl.Int64, pl.Float64, pl.Duration("us")]))
        if dtype == pl.String:
            return pl.Series(["2024-01-01"] * n)
        if dtype == pl.Duration("us"):
            return pl.Series([timedelta(days=1)] * n)
        return pl.Series([1_700_000_000] * n, dtype=dtype)
    dense = st.datetimes(datetime(2024, 1, 1), datetime(2024, 1, 3))  # ties happen
    times = st.one_of(
        dense,
        st.sampled_from(EDGE_TIMES[2:] if spine else EDGE_TIMES),
        st.datetimes(datetime(1900, 1, 1), datetime(2100, 1, 1)),
        *([dense, dense] if spine else []),  # near the stored rows: answers are not all null
    )
    values = draw(st.lists(times, min_size=n, max_size=n))
    if nulls and n:
        values[draw(st.integers(0, n - 1))] = None
    if kind == "date":
        return pl.Series([v.date() if v else None for v in values], dtype=pl.Date)
    in_ns = all(v is None or EDGE_TIMES[2] <= v <= EDGE_TIMES[7] for v in values)
    unit = draw(st.sampled_from(["us", "ms", "ns"] if in_ns else ["us", "ms"]))
    zone = draw(st.sampled_from(ZONES))
    # Physical values are UTC instants: cast from integers (no wall-time ambiguity here).
    us = timedelta(microseconds=1)
    micros = [None if v is None else (v - datetime(1970, 1, 1)) // us for v in values]
    scale = {"ms": lambda m: m // 1000, "us": lambda m: m, "ns": lambda m: m * 1000}[unit]
    physical = [None if m is None else scale(m) for m in micros]
    return pl.Series(physical, dtype=pl.Int64).cast(pl.Datetime(unit, zone))


@st.composite
def feature_column(draw: st.DrawFn, name: str, n: int) -> pl.Series:
    def some(values: st.SearchStrategy[Any], dtype: Any = None) -> pl.Series:
        items = draw(
            st.lists(
                st.one_of(values, st.none()) if draw(st.booleans()) else values,
                min_size=n,
                max_size=n,
            )
        )
        return pl.Series(name, items, dtype=dtype, strict=False)

    wrong = draw(mostly(False, True))
    if name == "x":
        floats = st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf]),
        )
        if wrong:
            return some(st.one_of(st.integers(-(2**63), 2**63 - 1)), pl.Int64)
        return some(floats, draw(st.sampled_from([pl.Float64, pl.Float32])))
    if name == "n":
        if wrong:
            return some(st.floats(allow_nan=True, allow_infinity=True), pl.Float64)
        dtype = draw(st.sampled_from([pl.Int64, pl.Int8, pl.UInt64, pl.Float64]))
        bounds = {pl.Int8: (-128, 127), pl.UInt64: (0, 2**64 - 1)}.get(dtype, (-(2**63), 2**63 - 1))
        ints = st.one_of(st.integers(-3, 3), st.integers(*bounds))
        if dtype == pl.Float64:
            return some(ints.map(float), pl.Float64)
        return some(ints, dtype)
    if name == "s":
        if wrong:
            return some(st.integers(-5, 5), pl.Int64)
        return some(st.one_of(TEXT, st.just("s" * 1_000_000)), pl.String)
    if wrong:
        return some(st.integers(0, 1), pl.Int64)
    return some(st.booleans(), pl.Boolean)


@st.composite
def key_column(draw: st.DrawFn, name: str, n: int) -> pl.Series:
    nulls = draw(mostly(False, True))
    if name == "user_id":
        kind = draw(mostly("int", "small", "uint64", "float", "string", "cat"))
        ints = st.integers(-3, 3) if draw(st.booleans()) else st.integers(-(2**63), 2**63 - 1)
        if kind == "uint64":
            ints = st.integers(2**63 - 2, 2**64 - 1) if draw(st.booleans()) else st.integers(0, 3)
        values = draw(
            st.lists(st.one_of(ints, st.none()) if nulls else ints, min_size=n, max_size=n)
        )
        dtype = {
            "int": pl.Int64,
            "small": pl.Int16,
            "uint64": pl.UInt64,
            "float": pl.Float64,
            "string": pl.String,
            "cat": pl.Categorical,
        }[kind]
        if kind == "small":
            values = [None if v is None else max(-(2**15), min(2**15 - 1, v)) for v in values]
        if kind in ("string", "cat"):
            values = [None if v is None else str(v) for v in values]
        return pl.Series(name, values, dtype=dtype, strict=False)
    kind = draw(mostly("string", "cat", "int"))
    if kind == "int":
        return pl.Series(name, draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    values = draw(
        st.lists(st.one_of(KEY_TEXT, st.none()) if nulls else KEY_TEXT, min_size=n, max_size=n)
    )
    return pl.Series(name, values, dtype=pl.Categorical if kind == "cat" else pl.String)


def convert(frame: pl.DataFrame, container: str, duplicate: str | None) -> Any:
    """``frame`` as the input type under test; ``duplicate`` repeats a column (pyarrow)."""
    if duplicate is not None:
        table = frame.to_arrow()
        return table.append_column(duplicate, table.column(duplicate))
    if container == "lazy":
        return frame.lazy()
    if container == "arrow":
        return frame.to_arrow()
    if container == "pandas":
        try:
            return frame.to_pandas()
        except Exception:  # pandas cannot hold it (e.g. times outside its range)
            assume(False)
    return frame


@st.composite
def write_inputs(draw: st.DrawFn) -> tuple[pl.DataFrame, Any]:
    n = draw(st.integers(0, 4))
    columns: dict[str, pl.Series] = {}
    for name in COLUMNS:
        if name in ("user_id", "name"):
            columns[name] = draw(key_column(name, n))
        elif name in ("event_timestamp", "created"):
            columns[name] = draw(time_column(n)).alias(name)
        else:
            columns[name] = draw(feature_column(name, n))
    change = draw(mostly("none", "drop", "extra", "duplicate", "reserved"))
    if change == "drop":
        del columns[draw(st.sampled_from(COLUMNS))]
    elif change == "extra":
        columns["spend"] = pl.Series("spend", [1.0] * n)
    elif change == "reserved":
        columns["_polarstore_seq"] = pl.Series("_polarstore_seq", [0] * n)
    order = draw(st.permutations(list(columns)))
    frame = pl.DataFrame([columns[c].alias(c) for c in order])
    container = draw(st.sampled_from(["frame", "lazy", "arrow", "pandas"]))
    duplicate = draw(st.sampled_from(order)) if change == "duplicate" and order else None
    return frame, convert(frame, container, duplicate)


# --- expected values --------------------------------------------------------------------------


def utc(value: datetime | date | None) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def canonical(value: Any) -> Any:
    """A hashable stand-in with NaN equal to itself and times as UTC instants."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, (datetime, date)):
        return utc(value)
    return value


def row_bag(frame: pl.DataFrame) -> Counter[tuple[Any, ...]]:
    return Counter(tuple(canonical(row[c]) for c in COLUMNS) for row in frame.iter_rows(named=True))


def in_utc(frame: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """Time columns as UTC instants (SPEC: naive means UTC, zones are converted)."""
    exprs = []
    for c in columns:
        dtype = frame.schema[c]
        if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
            exprs.append(pl.col(c).dt.convert_time_zone("UTC"))
        elif isinstance(dtype, pl.Datetime):
            exprs.append(pl.col(c).dt.replace_time_zone("UTC"))
        elif dtype == pl.Date:
            exprs.append(pl.col(c).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"))
    return frame.with_columns(exprs)


def expected_rows(frame: pl.DataFrame, stored: pl.Schema) -> pl.DataFrame:
    """What a successful write must store: the input rows, times as the same UTC instants,
    features cast to the declared types and keys to the stored ones (Int64 or String, as the
    first write decided), losslessly: the same numbers."""
    times = ["event_timestamp", "created"]
    floored = [  # SPEC: nanoseconds are floored to the microsecond
        (pl.col(c).dt.epoch("ns") // 1000).cast(pl.Datetime("us", "UTC")).alias(c)
        for c in times
        if getattr(frame.schema[c], "time_unit", None) == "ns"
    ]
    return (
        in_utc(frame.select(COLUMNS), times)
        .with_columns(*floored)
        .with_columns(
            pl.col("user_id").cast(stored["user_id"]),
            pl.col("name").cast(stored["name"]),
            pl.col("x").cast(pl.Float64),
            pl.col("n").cast(pl.Int64),
        )
    )


def as_polars(data: Any) -> pl.DataFrame:
    if isinstance(data, pl.LazyFrame):
        return data.collect()
    if isinstance(data, pa.Table):
        return pl.DataFrame(pl.from_arrow(data))
    if not isinstance(data, pl.DataFrame):
        return pl.from_pandas(data)
    return data


@contextmanager
def repository() -> Iterator[FeatureStore]:
    with tempfile.TemporaryDirectory() as tmp, FeatureStore(Path(tmp) / "repo") as store:
        store.apply(VIEW)
        yield store


def polarstore_error_or(call: Callable[[], Any]) -> tuple[Any, PolarstoreError | None]:
    """Run ``call``; a ``PolarstoreError`` is an answer, any other exception a failure."""
    try:
        return call(), None
    except PolarstoreError as e:
        error = e
    assert str(error), "an error without a message"
    return None, error


# --- write --------------------------------------------------------------------------------------


def test_hostile_writes_store_exactly_the_input_or_nothing() -> None:
    with repository() as store:

        @settings(SETTINGS, max_examples=70)
        @given(write_inputs())
        def check(case: tuple[pl.DataFrame, Any]) -> None:
            frame, data = case
            version = store.versions()["fz"]
            before = store.read("fz").collect()
            with warnings.catch_warnings():  # nanosecond inputs are floored, with a warning
                warnings.simplefilter("ignore", NanosecondWarning)
                got, error = polarstore_error_or(lambda: store.write("fz", data))
            after = store.read("fz").collect()
            if error is not None:
                assert store.versions()["fz"] == version
                assert_frame_equal(after, before)
                return
            assert got == store.versions()["fz"]
            assert got == (version if frame.height == 0 and version >= 0 else version + 1)
            # The input as Polars reads it (pandas' NaN is its missing value: it becomes null).
            frame = as_polars(data)
            assert row_bag(after) == row_bag(before) + row_bag(expected_rows(frame, after.schema))
            assert after.schema["event_timestamp"] == pl.Datetime("us", "UTC")

        check()
        # Whatever was accepted can be served: materialize and look every entity up.
        store.materialize()
        rows = store.read("fz").collect()
        keys = rows.select("user_id", "name").unique(maintain_order=True)
        online = store.get_online_features(keys, ["fz:*"], now=datetime(9999, 12, 31, tzinfo=UTC))
        assert online.height == keys.height


# --- get_historical_features ----------------------------------------------------------------------

STORED = pl.DataFrame(
    {
        "user_id": [1, 1, 1, 2, -3, 1, 2],
        "name": ["a", "a", "a", "日本", "", "🦀", "日本"],
        "event_timestamp": [
            datetime(1969, 12, 31, 23, 59, 59, 999999),
            datetime(2024, 1, 1),
            datetime(2024, 1, 1),  # a full tie with the row above: the later write wins
            datetime(1677, 9, 21, 0, 12, 43, 145225),
            datetime(2262, 4, 11, 23, 47, 16, 854775),
            datetime(2024, 1, 2),
            datetime(2024, 1, 1, 12),
        ],
        "created": [datetime(2024, 1, 1)] * 7,
        "x": [math.nan, math.inf, -math.inf, 1.5, None, 0.0, -0.0],
        "n": [1, 2, 3, 4, 5, 6, 7],
        "s": ["x" * 100_000, "b", "c", None, "é", "", "\x00"],
        "flag": [True, False, None, True, False, True, None],
    }
)


STORED_KEYS = [(1, "a"), (2, "日本"), (-3, ""), (1, "🦀"), (2, "a")]


def like(series: pl.Series, values: list[Any]) -> pl.Series:
    """``values`` in the dtype of ``series`` (as far as they convert; else null)."""
    dtype = series.dtype
    if dtype in (pl.String, pl.Categorical):
        return pl.Series(series.name, [str(v) for v in values], dtype=pl.String).cast(dtype)
    if dtype == pl.Null:
        return series
    return pl.Series(series.name, values, dtype=dtype, strict=False)


@st.composite
def spines(draw: st.DrawFn) -> tuple[pl.DataFrame, Any, list[str], dict[str, Any]]:
    n = draw(st.integers(0, 5))
    ts_name = draw(st.sampled_from(["event_timestamp", "event_timestamp", "when"]))
    user, name = draw(key_column("user_id", n)), draw(key_column("name", n))
    if draw(mostly(True, False)):  # mostly keys that exist, in the dtypes drawn
        pairs = draw(st.lists(st.sampled_from(STORED_KEYS), min_size=n, max_size=n))
        user, name = like(user, [p[0] for p in pairs]), like(name, [p[1] for p in pairs])
    columns = {
        "user_id": user,
        "name": name,
        ts_name: draw(time_column(n, spine=True)).alias(ts_name),
    }
    if draw(st.booleans()):
        columns["label"] = pl.Series("label", draw(st.lists(TEXT, min_size=n, max_size=n)))
    change = draw(mostly("none", "drop", "clash", "reserved", "duplicate"))
    if change == "drop":
        del columns[draw(st.sampled_from(list(columns)))]
    elif change == "clash":
        columns["x"] = pl.Series("x", [1.0] * n)
    elif change == "reserved":
        columns["__polarstore_row"] = pl.Series("__polarstore_row", [0] * n)
    order = draw(st.permutations(list(columns)))
    frame = pl.DataFrame([columns[c].alias(c) for c in order])
    container = draw(st.sampled_from(["frame", "lazy", "arrow", "pandas"]))
    duplicate = draw(st.sampled_from(order)) if change == "duplicate" and order else None
    features = draw(
        st.lists(
            unique=draw(mostly(True, False)),
            min_size=draw(mostly(1, 0)),
            elements=mostly("fz:x", "fz:nope").flatmap(
                lambda ref: (
                    st.sampled_from([ref, "fz:n", "fz:s", "fz:flag", "fz:*"])
                    if ref == "fz:x"
                    else st.just(ref)
                )
            ),
            max_size=3,
        )
    )
    kw: dict[str, Any] = {
        "timestamp_field": draw(mostly(ts_name, "event_timestamp", "missing")),
        "full_feature_names": draw(st.booleans()),
    }
    pin = draw(
        st.sampled_from(["none", "none", "none", "version", "version", "time", "bad-version"])
    )
    if pin == "version":
        kw["as_of"] = {"fz": draw(st.integers(0, 1))}
    elif pin == "bad-version":
        kw["as_of"] = {"fz": draw(st.sampled_from([-2, 2, 99]))}
    elif pin == "time":
        kw["as_of"] = draw(
            st.sampled_from([datetime(2000, 1, 1), datetime(9999, 1, 1), date(2001, 1, 1)])
        )
    return frame, convert(frame, container, duplicate), features, kw


def test_hostile_spines_get_the_reference_answer_or_an_error() -> None:
    with repository() as store:
        store.write("fz", STORED.head(3))
        store.write("fz", STORED.tail(4))
        versions = {0: STORED.head(3), 1: STORED}

        @settings(SETTINGS, max_examples=60)
        @given(spines())
        def check(case: tuple[pl.DataFrame, Any, list[str], dict[str, Any]]) -> None:
            spine, data, features, kw = case
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got, error = polarstore_error_or(
                    lambda: store.get_historical_features(data, features, **kw).collect()
                )
            # The only warning a spine may get: its nanoseconds were truncated (the reference
            # below sees Python datetimes, which hold microseconds: the same truncation).
            assert all(issubclass(w.category, NanosecondWarning) for w in caught), caught
            if error is not None:
                return
            as_of = kw.get("as_of")
            if isinstance(as_of, dict):
                rows = versions[as_of["fz"]]
            elif as_of is not None:
                rows = STORED.head(0) if utc(as_of) < datetime(2020, 1, 1, tzinfo=UTC) else STORED  # type: ignore[operator]
            else:
                rows = STORED
            spine = as_polars(data)
            assert_frame_equal(got.select(spine.columns), spine)
            ts = kw["timestamp_field"]
            reference = point_in_time(
                in_utc(spine, [ts]).to_dicts(),
                features,
                {"fz": REF},
                {"fz": rows.to_dicts()},
                timestamp_field=kw["timestamp_field"],
                full_feature_names=kw["full_feature_names"],
            )
            outputs = [c for c in got.columns if c not in spine.columns]
            actual = got.select(outputs).to_dicts()
            assert [{k: canonical(v) for k, v in r.items()} for r in actual] == [
                {k: canonical(v) for k, v in r.items()} for r in reference
            ]

        check()


def test_spine_time_within_ttl_of_year_1() -> None:
    with repository() as store:
        store.write("fz", STORED)
        spine = pl.DataFrame(
            {"user_id": [1], "name": ["a"], "event_timestamp": [datetime(1, 1, 2)]}
        )
        got = store.get_historical_features(spine, ["fz:n"]).collect()
        assert got["n"].to_list() == [None]


# --- names used as paths ---------------------------------------------------------------------

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_names_never_reach_outside_the_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    hostile = [
        "../x",
        "..",
        ".",
        "a/b",
        "a\\b",
        f"{tmp_path}/escaped",
        "/tmp",
        "x\x00y",
        "~",
        "$HOME",
        " x",
        "views/../../x",
        "%2e%2e",
        "\u2024\u2024",
        "ａｂ",
        "a.b",
        "",
        "_polarstore_x",
        "registry.json",
        "datasets",
    ]
    names = st.one_of(
        st.sampled_from(hostile),
        st.text(max_size=12),
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
    )
    spine = pl.DataFrame({"user_id": [1], "name": ["a"], "event_timestamp": [datetime(2024, 2, 1)]})
    with FeatureStore(repo) as store:
        store.apply(VIEW)
        store.write("fz", STORED)
        outside = files_under(tmp_path) - {f"repo/{f}" for f in files_under(repo)} - {"repo"}

        @settings(SETTINGS, max_examples=30)
        @given(names)
        def check(name: str) -> None:
            valid = NAME.fullmatch(name) is not None and not name.startswith("_polarstore")
            _, error = polarstore_error_or(
                lambda: store.save_dataset(name, spine, ["fz:n"], overwrite=True)
            )
            assert (error is None) == valid, (name, error)
            for call in (
                lambda: store.load_dataset(name).collect(),
                lambda: store.write(name, STORED),
                lambda: store.read(name).collect(),
                lambda: store.history(name),
                lambda: store.describe(name),
                lambda: store.materialize(name),
                lambda: store.get_online_features({"user_id": 1, "name": "a"}, [f"{name}:n"]),
                lambda: store.get_historical_features(spine, [f"{name}:n"]).collect(),
                lambda: store.get_historical_features(spine, [f"fz:{name}"]).collect(),
                lambda: store.read("fz", as_of={name: 0}).collect(),
            ):
                polarstore_error_or(call)
            keys = {"user_id", "name"}  # a name may not be two columns of one view
            for define, ok in (
                (lambda: FeatureView(name, entities=[ACCOUNT], schema={"f": pl.Int64}), valid),
                (
                    lambda: FeatureView("v", entities=[ACCOUNT], schema={name: pl.Int64}),
                    valid and name not in {*keys, "event_timestamp"},
                ),
                (
                    lambda: FeatureView(
                        "v", entities=[ACCOUNT], schema={"f": pl.Int64}, timestamp_field=name
                    ),
                    valid and name not in {*keys, "f"},
                ),
                (lambda: Entity(name, "k"), valid),
                (lambda: Entity("e", join_keys=[name]), valid),
                (lambda: FeatureService(name, ["fz:n"]), valid),
            ):
                _, error = polarstore_error_or(define)
                assert (error is None) == ok, (name, error)

        check()
        assert (
            files_under(tmp_path) - {f"repo/{f}" for f in files_under(repo)} - {"repo"} == outside
        )
        top = {f.split("/")[0] for f in files_under(repo)}
        assert top <= {"registry.json", ".polarstore", "views", "datasets", "online"}
        assert {p.name for p in (repo / "views").iterdir()} == {"fz"}
        for path in (repo / "datasets").iterdir():
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*-[0-9a-f]{16}\.parquet", path.name)


# --- the registry, edited by hand --------------------------------------------------------------

JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),  # json reads and writes NaN and Infinity
        st.text(max_size=6),
        st.sampled_from(["Int64", "String", "user", "fz", "../x", "datasets/x.parquet", "/etc"]),
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def json_paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from json_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from json_paths(value, (*prefix, i))


@st.composite
def registry_edits(draw: st.DrawFn, original: bytes) -> bytes:
    doc = json.loads(original)
    kind = draw(st.sampled_from(["truncate", "bytes", "replace", "replace", "delete", "rename"]))
    if kind == "truncate":
        return original[: draw(st.integers(0, len(original) - 1))]
    if kind == "bytes":
        at = draw(st.integers(0, len(original)))
        return original[:at] + draw(st.binary(min_size=1, max_size=4)) + original[at + 1 :]
    paths = [p for p in json_paths(doc) if p]
    path = draw(st.sampled_from(paths))
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "rename" and isinstance(parent, dict):
        parent[draw(st.sampled_from(["../x", "a/b", "", "fz", "x" * 300]))] = parent.pop(path[-1])
    else:
        parent[path[-1]] = draw(JSON)
    return json.dumps(doc).encode()


def registry_operations(store: FeatureStore) -> Iterator[Callable[[], Any]]:
    spine = pl.DataFrame({"user_id": [1], "name": ["a"], "event_timestamp": [datetime(2024, 2, 1)]})
    yield store.list_feature_views
    yield store.list_feature_services
    yield lambda: store.describe("fz")
    yield lambda: store.read("fz").collect()
    yield lambda: store.get_historical_features(spine, ["fz:*"]).collect()
    yield lambda: store.get_historical_features(spine, "svc").collect()
    # Online lookups are left out: see test_online_lookup_after_join_keys_edited_by_hand.
    yield lambda: store.search("fz")
    yield lambda: [store.load_dataset(d).collect() for d in store.list_datasets()]
    yield lambda: store.write("fz", STORED.head(1))
    yield store.materialize
    yield lambda: store.vacuum()
    yield lambda: store.apply(VIEW)


def test_hand_edited_registry_gives_a_polarstore_error(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with FeatureStore(repo) as store:
        store.apply([VIEW, FeatureService("svc", ["fz:n", "fz:x"])])
        store.write("fz", STORED)
        spine = pl.DataFrame(
            {"user_id": [1], "name": ["a"], "event_timestamp": [datetime(2024, 2, 1)]}
        )
        store.save_dataset("train", spine, ["fz:*"])
        store.materialize()
    registry = repo / "registry.json"
    original = registry.read_bytes()

    @settings(SETTINGS, max_examples=40)
    @given(registry_edits(original))
    def check(edited: bytes) -> None:
        registry.write_bytes(edited)
        try:
            with FeatureStore(repo) as store:
                for operation in registry_operations(store):
                    polarstore_error_or(operation)
        finally:
            registry.write_bytes(original)

    check()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda doc: doc.update(format_version=2), "format_version 2.*Upgrade polarstore"),
        (lambda doc: doc.update(format_version=True), "format_version True"),
        (lambda doc: doc.update(format_version="1"), "format_version '1'"),
        (lambda doc: doc.pop("format_version"), "format_version None"),
        (lambda doc: doc["datasets"]["train"].update(spine="../../outside.parquet"), "spine"),
        (lambda doc: doc["datasets"]["train"].update(spine="/etc/hostname"), "spine"),
        (lambda doc: doc["datasets"]["train"].update(spine="datasets/../x.parquet"), "spine"),
        (lambda doc: doc["datasets"].update({"../x": doc["datasets"]["train"]}), "'../x'"),
        (lambda doc: doc["datasets"]["train"].update(versions={"fz": "0"}), "versions"),
        (lambda doc: doc["datasets"].update(train=[]), "train"),
        (lambda doc: doc["feature_views"].update({"../x": doc["feature_views"]["fz"]}), "'../x'"),
        (lambda doc: doc["feature_views"]["fz"].update(ttl_microseconds=10**30), "damaged"),
    ],
    ids=[
        "future-version",
        "version-true",
        "version-string",
        "no-version",
        "spine-parent",
        "spine-absolute",
        "spine-dotdot",
        "dataset-name",
        "dataset-versions",
        "dataset-not-object",
        "view-name",
        "ttl-overflow",
    ],
)
def test_hand_edits_are_named_in_the_error(
    tmp_path: Path, edit: Callable[[dict[str, Any]], Any], match: str
) -> None:
    repo = tmp_path / "repo"
    (tmp_path / "outside.parquet").write_bytes(b"not to be read")
    with FeatureStore(repo) as store:
        store.apply(VIEW)
        store.write("fz", STORED)
        spine = pl.DataFrame(
            {"user_id": [1], "name": ["a"], "event_timestamp": [datetime(2024, 2, 1)]}
        )
        store.save_dataset("train", spine, ["fz:*"])
    registry = repo / "registry.json"
    doc = json.loads(registry.read_text())
    edit(doc)
    registry.write_text(json.dumps(doc))
    with FeatureStore(repo) as store:
        with pytest.raises(PolarstoreError, match=match) as info:
            store.load_dataset("train")
        assert str(registry) in str(info.value)


def test_registry_that_is_not_utf8(tmp_path: Path) -> None:
    with FeatureStore(tmp_path / "repo") as store:
        store.apply(VIEW)
    registry = tmp_path / "repo" / "registry.json"
    registry.write_bytes(b'{"format": "polarstore.registry", "x": "\xff\xfe"}')
    with pytest.raises(PolarstoreError, match="not UTF-8"):
        FeatureStore(tmp_path / "repo").list_feature_views()


@pytest.mark.parametrize(
    "edit",
    [
        lambda view: view.update(timestamp_field="seen_at"),
        lambda view: view["schema"].update(n="String"),
        lambda view: view.update(created_timestamp_field=None) or view["schema"].pop("flag"),
    ],
    ids=["timestamp-renamed", "dtype-changed", "features-removed"],
)
def test_registry_edited_to_disagree_with_the_table(
    tmp_path: Path, edit: Callable[[dict[str, Any]], Any]
) -> None:
    """A valid registry whose view no longer matches its table: a clear error when it
    matters, and a write never changes the table's columns."""
    repo = tmp_path / "repo"
    with FeatureStore(repo) as store:
        store.apply(VIEW)
        store.write("fz", STORED)
    registry = repo / "registry.json"
    doc = json.loads(registry.read_text())
    edit(doc["feature_views"]["fz"])
    registry.write_text(json.dumps(doc))
    spine = pl.DataFrame({"user_id": [1], "name": ["a"], "event_timestamp": [datetime(2024, 2, 1)]})
    with FeatureStore(repo) as store:
        view = store.get_feature_view("fz")
        rows = STORED.head(1).rename({"event_timestamp": view.timestamp_field})
        rows = rows.select(
            c
            for c in rows.columns
            if c
            in {*view.join_keys, view.timestamp_field, view.created_timestamp_field, *view.schema}
        )
        for call in (
            lambda: store.read("fz").collect(),
            lambda: store.get_historical_features(spine, ["fz:*"]).collect(),
            lambda: store.write(
                "fz", rows.with_columns(pl.col(c).cast(t) for c, t in view.schema.items())
            ),
            lambda: store.materialize(),
        ):
            _, error = polarstore_error_or(call)
            if error is not None:
                assert "'fz'" in str(error)
        table = pl.read_delta(str(repo / "views" / "fz"))
        assert set(table.columns) == {*COLUMNS, "_polarstore_seq"}
        assert table.height in (STORED.height, STORED.height + 1)


def test_online_lookup_after_join_keys_edited_by_hand(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with FeatureStore(repo) as store:
        store.apply(VIEW)
        store.write("fz", STORED)
        store.materialize()
    registry = repo / "registry.json"
    doc = json.loads(registry.read_text())
    doc["entities"]["account"]["join_keys"] = ["name"]
    registry.write_text(json.dumps(doc))
    with FeatureStore(repo) as store:
        with pytest.raises(SchemaError, match=r"materialized with join keys \['user_id', 'name'\]"):
            store.get_online_features({"name": "a", "user_id": 1}, ["fz:n"])
        with pytest.raises(SchemaError, match="run materialize"):
            store.get_feature_vector({"name": "a"}, ["fz:n"])


def test_online_lookup_with_a_uint64_key_beyond_int64(tmp_path: Path) -> None:
    with FeatureStore(tmp_path / "repo") as store:
        store.apply(VIEW)
        store.write("fz", STORED)
        store.materialize()
        keys = pl.DataFrame({"user_id": pl.Series([2**63 + 1], dtype=pl.UInt64), "name": ["a"]})
        got, error = polarstore_error_or(lambda: store.get_online_features(keys, ["fz:n"]))
        if error is None:  # no stored key can equal it: a missing entity
            assert got["n"].to_list() == [None]
