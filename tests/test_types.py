"""Types at the boundary (SPEC, "Concepts" and "Types at the boundary"): declared key dtypes,
entities by name, element-wise list casts, Float32 rounding, nanoseconds and a zero TTL."""

from __future__ import annotations

import itertools
import math
import struct
import warnings
from datetime import datetime, timedelta, timezone

import pandas as pd
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polarstore import (
    Entity,
    FeatureStore,
    FeatureView,
    NanosecondWarning,
    NotFoundError,
    SchemaError,
    ValidationError,
)
from polarstore._frames import lossless_cast

from .reference import RefView, point_in_time

T0 = datetime(2024, 1, 1)
ACCOUNT = Entity("account", join_keys={"account_code": pl.String})
BALANCE = FeatureView("balance", entities=[ACCOUNT], schema={"amount": pl.Int64})


def rows(
    keys: list[object], amounts: list[int], key_dtype: pl.DataType | None = None
) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "account_code": pl.Series(keys, dtype=key_dtype),
            "event_timestamp": [T0] * len(keys),
            "amount": amounts,
        }
    )


# --- declared join-key dtypes -------------------------------------------------------------


def test_entity_declares_key_dtypes() -> None:
    pair = Entity("pair", join_keys={"a": pl.String, "b": pl.Int32()})
    assert pair.join_keys == ("a", "b")
    assert pair.key_dtypes == {"a": pl.String(), "b": pl.Int32()}
    assert Entity("u", join_keys="u").key_dtypes == {}
    assert pair != Entity("pair", join_keys=["a", "b"])
    view = FeatureView("v", entities=[pair, Entity("u", "u")], schema={"x": pl.Int64})
    assert view.key_dtypes == {"a": pl.String(), "b": pl.Int32()}


@pytest.mark.parametrize("dtype", [pl.Float64, pl.UInt32, pl.Date, "String", None])
def test_a_key_dtype_must_be_an_integer_or_string_dtype(dtype: object) -> None:
    with pytest.raises(SchemaError, match=r"join key 'k'.*must be one of pl\.Int8"):
        Entity("e", join_keys={"k": dtype})


def test_two_entities_declaring_one_key_differently_are_refused() -> None:
    one = Entity("one", join_keys={"k": pl.String})
    two = Entity("two", join_keys={"k": pl.Int64})
    with pytest.raises(SchemaError, match=r"'k' is declared String by entity 'one' and Int64"):
        FeatureView("v", entities=[one, two], schema={"x": pl.Int64})


def test_a_declared_string_key_keeps_leading_zeros_and_refuses_ints(store: FeatureStore) -> None:
    store.apply([ACCOUNT, BALANCE])
    # The first write decides nothing: a declared String key refuses integers even then.
    with pytest.raises(ValidationError, match=r"'account_code' is declared String.*Int64"):
        store.write("balance", rows([42], [1]))
    assert store.versions() == {"balance": -1}
    store.write("balance", rows(["0042"], [7]))
    assert store.read("balance").collect()["account_code"].to_list() == ["0042"]
    spine = pl.DataFrame({"account_code": ["0042"], "event_timestamp": [T0]})
    got = store.get_historical_features(spine, ["balance:amount"]).collect()
    assert got["amount"].to_list() == [7]
    with pytest.raises(ValidationError, match=r"'account_code' is declared String"):
        store.get_historical_features(
            spine.with_columns(pl.lit(42).alias("account_code")), ["balance:amount"]
        )
    store.materialize()
    online = store.get_online_features({"account_code": "0042"}, ["balance:amount"], now=T0)
    assert online["amount"].to_list() == [7]


def test_a_declared_string_key_refuses_an_int_spine_before_any_write(store: FeatureStore) -> None:
    store.apply([ACCOUNT, BALANCE])
    spine = pl.DataFrame({"account_code": [42], "event_timestamp": [T0]})
    with pytest.raises(ValidationError, match=r"'account_code' is declared String"):
        store.get_historical_features(spine, ["balance:amount"])


def test_a_declared_narrow_int_key_is_range_checked(store: FeatureStore) -> None:
    small = Entity("small", join_keys={"k": pl.Int16})
    view = FeatureView("sv", entities=[small], schema={"x": pl.Int64})
    store.apply([small, view])
    frame = pl.DataFrame({"k": [2**20], "event_timestamp": [T0], "x": [1]})
    with pytest.raises(ValidationError, match=r"'k' holds Int64 values that do not fit Int16"):
        store.write("sv", frame)
    store.write("sv", frame.with_columns(pl.lit(7).alias("k")))
    spine = pl.DataFrame({"k": [7, 2**20], "event_timestamp": [T0, T0]})
    with pytest.raises(ValidationError, match=r"do not fit Int16"):
        store.get_historical_features(spine, ["sv:x"])
    got = store.get_historical_features(spine.head(1), ["sv:x"]).collect()
    assert got["x"].to_list() == [1]


def test_declaring_a_key_dtype_of_another_kind_than_the_data_is_refused(
    store: FeatureStore,
) -> None:
    plain = Entity("account", join_keys="account_code")
    store.apply([plain, FeatureView("balance", entities=[plain], schema={"amount": pl.Int64})])
    store.write("balance", rows([42], [1]))  # the first write fixed Int64
    with pytest.raises(SchemaError, match=r"keyed by 'account_code' as Int64.*String"):
        store.apply(ACCOUNT)
    store.apply(Entity("account", join_keys={"account_code": pl.Int32}))  # same kind: fine
    assert store.get_feature_view("balance").key_dtypes == {"account_code": pl.Int32()}


def test_undeclared_keys_are_still_fixed_by_the_first_write(store: FeatureStore) -> None:
    plain = Entity("account", join_keys="account_code")
    store.apply([plain, FeatureView("balance", entities=[plain], schema={"amount": pl.Int64})])
    store.write("balance", rows(["0042"], [1]))
    with pytest.raises(ValidationError, match=r"stored keys are String"):
        store.write("balance", rows([42], [1]))


# --- entities by name -----------------------------------------------------------------------


def test_views_may_name_their_entities(store: FeatureStore) -> None:
    view = FeatureView("balance", entities=["account"], schema={"amount": pl.Int64})
    assert not view.resolved
    with pytest.raises(ValidationError, match=r"names its entities \['account'\] by name"):
        _ = view.join_keys
    store.apply([view, ACCOUNT])  # the entity in the same apply, in any order
    registered = store.get_feature_view("balance")
    assert registered.join_keys == ("account_code",)
    assert registered.key_dtypes == {"account_code": pl.String()}
    assert store.write(view, rows(["7"], [1])) == 0  # the named form is the registered view
    later = FeatureView("balance2", entities="account", schema={"amount": pl.Int64})
    store.apply(later)  # an entity registered before
    assert FeatureStore(store.path).get_feature_view("balance2").entities == (ACCOUNT,)


def test_an_unknown_entity_name_is_refused_at_apply_with_a_hint(store: FeatureStore) -> None:
    store.apply(ACCOUNT)
    view = FeatureView("balance", entities=["acount"], schema={"amount": pl.Int64})
    with pytest.raises(NotFoundError, match=r"names the entity 'acount'.*Did you mean 'account'"):
        store.apply(view)
    assert store.list_feature_views() == []


# --- features: Float32 rounding, lists element by element -------------------------------------


def test_a_float32_feature_rounds_float64_input_in_lists_too(store: FeatureStore) -> None:
    user = Entity("user", "user_id")
    view = FeatureView(
        "f", entities=[user], schema={"x": pl.Float32, "xs": pl.List(pl.Float32)}, online=False
    )
    store.apply(view)
    store.write(
        "f",
        pl.DataFrame(
            {"user_id": [1], "event_timestamp": [T0], "x": [0.1], "xs": [[0.1, None, 2.5]]}
        ),
    )
    got = store.read("f").collect()
    assert got.schema["x"] == pl.Float32
    assert got["x"].to_list() == [pl.Series([0.1], dtype=pl.Float32).item()]
    assert got["xs"].to_list() == [pl.Series([0.1, None, 2.5], dtype=pl.Float32).to_list()]
    with pytest.raises(ValidationError, match=r"'x' holds 1e\+300, beyond Float32's range"):
        store.write(
            "f",
            pl.DataFrame({"user_id": [1], "event_timestamp": [T0], "x": [1e300], "xs": [[]]}),
        )


@pytest.mark.parametrize(
    ("feature", "values", "dtype", "match"),
    [
        (pl.List(pl.String), [[1, 2]], pl.List(pl.Int64), r"must be String, got Int64"),
        (pl.List(pl.Int64), [[1.5]], pl.List(pl.Float64), r"Float64 values that do not fit Int64"),
        (pl.List(pl.Int32), [[2**40]], pl.List(pl.Int64), r"Int64 values that do not fit Int32"),
        (
            pl.List(pl.List(pl.Int8)),
            [[[1], [300]]],
            pl.List(pl.List(pl.Int64)),
            r"do not fit Int8",
        ),
    ],
)
def test_list_features_follow_the_scalar_rules_element_by_element(
    store: FeatureStore, feature: pl.DataType, values: list[object], dtype: pl.DataType, match: str
) -> None:
    view = FeatureView("f", entities=Entity("user", "user_id"), schema={"xs": feature})
    store.apply(view)
    frame = pl.DataFrame(
        {"user_id": [1], "event_timestamp": [T0], "xs": pl.Series(values, dtype=dtype)}
    )
    with pytest.raises(ValidationError, match=r"'xs' \(its list elements.*\) .*" + match):
        store.write("f", frame)
    assert store.versions() == {"f": -1}


def test_list_features_accept_lossless_element_casts(store: FeatureStore) -> None:
    view = FeatureView(
        "f", entities=Entity("user", "user_id"), schema={"xs": pl.List(pl.Int64)}, online=False
    )
    store.apply(view)
    frame = pl.DataFrame(
        {
            "user_id": [1, 2, 3],
            "event_timestamp": [T0] * 3,
            "xs": pl.Series([[1.0, None], None, []], dtype=pl.List(pl.Float64)),
        }
    )
    store.write("f", frame)
    assert store.read("f").collect()["xs"].to_list() == [[1, None], None, []]


# --- nanoseconds --------------------------------------------------------------------------------


def test_a_pandas_ns_feature_column_is_accepted(store: FeatureStore) -> None:
    view = FeatureView(
        "f",
        entities=Entity("user", "user_id"),
        schema={"seen": pl.Datetime("us", "UTC"), "naive": pl.Datetime("us")},
        online=False,
    )
    store.apply(view)
    whole = pd.DataFrame(
        {
            "user_id": [1],
            "event_timestamp": pd.to_datetime(["2024-01-01 00:00:00"]),
            "seen": pd.to_datetime(["2024-01-01 00:00:00.000001"]),  # datetime64[ns]
            "naive": pd.to_datetime(["2024-01-01 00:00:00.000002"]),
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # whole microseconds: nothing to warn about
        store.write("f", whole)
    sub = whole.assign(seen=pd.to_datetime(["2024-01-01 00:00:00.000001999"]))
    with pytest.warns(NanosecondWarning, match=r"column 'seen' \(1 value"):
        store.write("f", sub)
    got = store.read("f").collect()
    want = datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc)
    assert got["seen"].to_list() == [want, want]  # floored, not rounded
    assert got["naive"].to_list() == [datetime(2024, 1, 1, 0, 0, 0, 2)] * 2


def test_nanosecond_timestamps_warn_naming_the_column(store: FeatureStore) -> None:
    view = FeatureView(
        "f",
        entities=Entity("user", "user_id"),
        schema={"x": pl.Int64},
        created_timestamp_field="created",
    )
    store.apply(view)
    base = 1_704_067_200_000_000_000  # 2024-01-01 in ns
    frame = pl.DataFrame(
        {
            "user_id": [1, 1],
            "event_timestamp": pl.Series([base + 1500, base + 1999]).cast(pl.Datetime("ns")),
            "created": pl.Series([base, base]).cast(pl.Datetime("ns")),
            "x": [1, 2],
        }
    )
    with pytest.warns(NanosecondWarning, match=r"'f'.*column 'event_timestamp' \(2 value"):
        store.write("f", frame)
    spine = pl.DataFrame({"user_id": [1], "when": pl.Series([base + 1001]).cast(pl.Datetime("ns"))})
    with pytest.warns(NanosecondWarning, match=r"column 'when'"):
        got = store.get_historical_features(spine, ["f:x"], timestamp_field="when").collect()
    # Both rows floor to .000001: a tie, which the row written last wins.
    assert got["x"].to_list() == [2]


@pytest.mark.parametrize("what", ["as_of", "now", "end"])
def test_nanosecond_moments_warn(stats_store: FeatureStore, what: str) -> None:
    moment = pd.Timestamp("2030-01-01 00:00:00.000000001")
    spine = pl.DataFrame({"user_id": [1], "event_timestamp": [T0]})
    calls = {
        "as_of": lambda: stats_store.get_historical_features(
            spine, ["user_stats:clicks"], as_of=moment
        ),
        "now": lambda: stats_store.get_online_features(
            {"user_id": 1}, ["user_stats:clicks"], now=moment
        ),
        "end": lambda: stats_store.materialize(end=moment),
    }
    with pytest.warns(NanosecondWarning, match=what):
        calls[what]()
    with pytest.warns(NanosecondWarning, match="as_of: '2030-01-01T00:00:00.000000001'"):
        stats_store.get_historical_features(
            spine, ["user_stats:clicks"], as_of="2030-01-01T00:00:00.000000001"
        )


@st.composite
def ns_writes(draw: st.DrawFn) -> tuple[list[list[tuple[int, int, int]]], list[tuple[int, int]]]:
    """Batches of (key, ns offset, value) inside a few µs, and a spine in ns: many ties."""
    offset = st.integers(min_value=0, max_value=4_000)
    rows = draw(
        st.lists(st.tuples(st.integers(1, 2), offset, st.integers(0, 99)), min_size=1, max_size=9)
    )
    cuts = sorted(draw(st.lists(st.integers(1, len(rows)), max_size=2, unique=True)))
    bounds = [0, *cuts, len(rows)]
    batches = [rows[a:b] for a, b in itertools.pairwise(bounds) if a < b]
    spine = draw(st.lists(st.tuples(st.integers(1, 3), offset), min_size=1, max_size=6))
    return batches, spine


@given(case=ns_writes(), ttl_us=st.sampled_from([None, 1, 2]))
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_truncated_ties_go_by_write_order(
    tmp_path_factory: pytest.TempPathFactory,
    case: tuple[list[list[tuple[int, int, int]]], list[tuple[int, int]]],
    ttl_us: int | None,
) -> None:
    """The point-in-time join of ns data equals the reference on the floored µs times."""
    batches, spine = case
    base = 1_704_067_200_000_000_000
    ttl = None if ttl_us is None else timedelta(microseconds=ttl_us)
    view = FeatureView("f", entities=Entity("k", "k"), schema={"x": pl.Int64}, ttl=ttl)
    store = FeatureStore(tmp_path_factory.mktemp("ns"))
    store.apply(view)

    def floor(ns: int) -> datetime:
        return datetime(2024, 1, 1) + timedelta(microseconds=ns // 1000)

    written: list[dict[str, object]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NanosecondWarning)
        for batch in batches:
            store.write(
                "f",
                pl.DataFrame(
                    {
                        "k": [k for k, _, _ in batch],
                        "event_timestamp": pl.Series([base + o for _, o, _ in batch]).cast(
                            pl.Datetime("ns")
                        ),
                        "x": [x for _, _, x in batch],
                    }
                ),
            )
            written += [{"k": k, "event_timestamp": floor(o), "x": x} for k, o, x in batch]
        frame = pl.DataFrame(
            {
                "k": [k for k, _ in spine],
                "event_timestamp": pl.Series([base + o for _, o in spine]).cast(pl.Datetime("ns")),
            }
        )
        got = store.get_historical_features(frame, ["f:x"]).collect()["x"].to_list()
    ref_view = RefView("f", ("k",), ("x",), ttl=ttl)
    ref_spine = [{"k": k, "event_timestamp": floor(o)} for k, o in spine]
    want = point_in_time(ref_spine, ["f:x"], {"f": ref_view}, {"f": written})
    assert got == [w["x"] for w in want]


# --- ttl ------------------------------------------------------------------------------------------


def test_a_zero_ttl_is_refused_with_a_hint() -> None:
    with pytest.raises(ValidationError, match=r"ttl.*timedelta\(0\).*use ttl=None"):
        FeatureView("v", entities=Entity("u", "u"), schema={"x": pl.Int64}, ttl=timedelta(0))
    one = FeatureView(
        "v", entities=Entity("u", "u"), schema={"x": pl.Int64}, ttl=timedelta(microseconds=1)
    )
    assert one.ttl == timedelta(microseconds=1)


# --- the cast rules against a plain-Python reference -----------------------------------------

NUMERIC = [pl.Int8(), pl.Int16(), pl.Int32(), pl.Int64(), pl.Float32(), pl.Float64()]


def ref_cast(value: float | None, source: pl.DataType, target: pl.DataType) -> tuple[bool, object]:
    """(fits, stored value) of one scalar, by the SPEC's rules, in plain Python."""
    if value is None:
        return True, None
    if target.is_integer():
        bits = int(str(target)[3:])
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            return False, None
        return -(2 ** (bits - 1)) <= value < 2 ** (bits - 1), int(value)
    if target == pl.Float32:
        try:
            rounded = struct.unpack("<f", struct.pack("<f", value))[0]
        except OverflowError:  # beyond Float32's range once rounded
            return False, None
        return source.is_float() or rounded == value, rounded
    return float(value) == value or math.isnan(value), float(value)


@st.composite
def numeric_columns(draw: st.DrawFn) -> tuple[pl.DataType, pl.DataType, list[object], bool]:
    source, target = draw(st.sampled_from(NUMERIC)), draw(st.sampled_from(NUMERIC))
    if source.is_integer():
        bits = int(str(source)[3:])
        scalar = st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    else:
        scalar = st.floats(width=32 if source == pl.Float32 else 64) | st.integers(-300, 300).map(
            float
        )
    value = st.none() | scalar
    listed = draw(st.booleans())
    values = draw(
        st.lists(st.none() | st.lists(value, max_size=3) if listed else value, max_size=6)
    )
    return source, target, values, listed


def same(a: object, b: object) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@given(case=numeric_columns())
@settings(max_examples=300, deadline=None)
def test_numeric_casts_match_the_reference(
    case: tuple[pl.DataType, pl.DataType, list[object], bool],
) -> None:
    source, target, values, listed = case
    dtype = pl.List(source) if listed else source
    frame = pl.DataFrame({"x": pl.Series(values, dtype=dtype)})
    scalars = [v for vs in values if vs is not None for v in vs] if listed else values
    fits = all(ref_cast(v, source, target)[0] for v in scalars)  # type: ignore[arg-type]
    want_dtype = pl.List(target) if listed else target
    if not fits:
        with pytest.raises(ValidationError, match=r"column 'x'"):
            lossless_cast(frame, "x", want_dtype, "w")
        return
    got = frame.select(lossless_cast(frame, "x", want_dtype, "w"))["x"].to_list()
    if listed:
        want = [
            None if vs is None else [ref_cast(v, source, target)[1] for v in vs]  # type: ignore[arg-type]
            for vs in values
        ]
    else:
        want = [ref_cast(v, source, target)[1] for v in values]  # type: ignore[arg-type]
    assert same(got, want)
