"""Input frames: conversion to Polars and validation of written rows, before any I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from polarstore._definitions import FeatureView
from polarstore._errors import ValidationError, did_you_mean
from polarstore._time import STORED_DTYPE, check_range, to_utc_expr

__all__ = [
    "KEY_DTYPES",
    "cast_keys",
    "check_declared_keys",
    "declared_key",
    "entity_frame",
    "key_dtype",
    "lossless_cast",
    "prepare_rows",
    "to_polars",
]

_INTEGER = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)
# Join keys are stored as Int64 or String whatever the input width, so spines, views and the
# online key encoding agree without per-view dtype bookkeeping.
KEY_DTYPES = (pl.Int64(), pl.String())


def to_polars(data: Any, *, what: str) -> pl.DataFrame:
    """Accept a Polars DataFrame/LazyFrame, a pyarrow Table/RecordBatch or a pandas DataFrame."""
    if isinstance(data, pl.DataFrame):
        return data
    if isinstance(data, pl.LazyFrame):
        try:
            return data.collect()
        except pl.exceptions.PolarsError as e:
            msg = f"{what}: the LazyFrame could not be collected: {e}"
            raise ValidationError(msg) from e
    module = type(data).__module__.split(".")[0]
    if module in ("pyarrow", "pandas"):
        try:
            frame = pl.from_pandas(data) if module == "pandas" else pl.from_arrow(data)
        except (pl.exceptions.PolarsError, ValueError, TypeError) as e:
            msg = f"{what}: could not convert the {type(data).__name__} to Polars: {e}"
            raise ValidationError(msg) from e
        if isinstance(frame, pl.DataFrame):
            return frame
    msg = (
        f"{what}: expected a polars DataFrame or LazyFrame, a pyarrow Table or a pandas "
        f"DataFrame, got {type(data).__name__}."
    )
    raise ValidationError(msg)


def key_dtype(dtype: pl.DataType, *, where: str, column: str) -> pl.DataType:
    """The stored dtype of a join key given its input dtype (Int64 or String)."""
    if isinstance(dtype, _INTEGER):
        return pl.Int64()
    if isinstance(dtype, (pl.String, pl.Categorical, pl.Enum)):
        return pl.String()
    if dtype == pl.Null:
        return pl.Null()
    msg = f"{where}: join key {column!r} must be an integer or string column, got {dtype}."
    raise ValidationError(msg)


def declared_key(
    frame: pl.DataFrame, key: str, declared: Mapping[str, pl.DataType], *, where: str
) -> pl.DataType:
    """:func:`key_dtype` of ``frame[key]``, first checked against the key's declared dtype.

    A key declared ``String`` refuses integers (``42`` is not ``"0042"``); one declared
    ``Int32`` refuses values beyond Int32. The result is the stored kind (Int64 or String),
    so an undeclared key behaves exactly as before.
    """
    given = key_dtype(frame.schema[key], where=where, column=key)
    want = declared.get(key)
    if want is None:
        return given
    kind = key_dtype(want, where=where, column=key)
    if given == pl.Null:
        return kind
    if given != kind:
        msg = (
            f"{where}: join key {key!r} is declared {want} but the data holds "
            f"{frame.schema[key]}; pass {want} values"
            + (" (as text, so that e.g. '0042' keeps its zeros)." if kind == pl.String else ".")
        )
        raise ValidationError(msg)
    lossless_cast(frame, key, want, where)  # values must fit the declared width
    return kind


def check_declared_keys(
    frame: pl.DataFrame, declared: Mapping[str, pl.DataType], *, where: str
) -> None:
    """``ValidationError`` unless every declared key column of ``frame`` fits its dtype."""
    for key in declared:
        if key in frame.columns:
            declared_key(frame, key, declared, where=where)


def cast_keys(
    frame: pl.DataFrame,
    join_keys: Sequence[str],
    stored: Mapping[str, pl.DataType] | None,
    *,
    where: str,
) -> pl.DataFrame:
    """The join key columns in their stored dtypes (Int64 or String), cast losslessly.

    ``ValidationError`` if a key's kind differs from the stored one (a string key for an
    integer view) or a value does not fit (a UInt64 beyond Int64's range).
    """
    exprs: list[pl.Expr] = []
    for key in join_keys:
        target = key_dtype(frame.schema[key], where=where, column=key)
        have = (stored or {}).get(key)
        if have is not None and target not in (have, pl.Null()):
            msg = (
                f"{where}: join key {key!r} is {frame.schema[key]} but the view stores "
                f"{key!r} as {have}."
            )
            raise ValidationError(msg)
        if target == pl.Null:
            target = have or pl.Int64()
        exprs.append(lossless_cast(frame, key, target, where).alias(key))
    return frame.select(exprs)


def lossless_cast(frame: pl.DataFrame, column: str, target: pl.DataType, where: str) -> pl.Expr:
    """``pl.col(column).cast(target)`` after checking that no value of it changes.

    Integers and floats must survive the cast exactly, except that ``Float32`` takes any
    finite float and rounds it; lists follow these rules element by element (a list of ints
    is not a ``List(String)``); nanosecond datetimes are floored to microseconds with a
    :class:`NanosecondWarning`. Anything else is a ``ValidationError`` naming the column.
    """
    problem = _loss(frame[column], target, where=where)
    if problem:
        source = frame.schema[column]
        listed = isinstance(source, pl.List)
        inside = f" (its list elements, {source} for {target})" if listed else ""
        msg = f"{where}: column {column!r}{inside} {problem}"
        raise ValidationError(msg)
    return pl.col(column).cast(target)


def _loss(series: pl.Series, target: pl.DataType, *, where: str) -> str | None:
    """Why casting ``series`` to ``target`` would change a value, or None if it would not."""
    source = series.dtype
    if source == target or source == pl.Null:
        return None
    if isinstance(source, pl.List) and isinstance(target, pl.List):
        return _loss(series.explode(), target.inner, where=where)  # type: ignore[arg-type]
    if isinstance(source, (pl.Categorical, pl.Enum)) and target == pl.String:
        return None
    if isinstance(source, pl.Datetime) and isinstance(target, pl.Datetime):
        if source.time_zone is not None and target.time_zone is None:
            return f"must be {target}, got {source}: convert zone-aware times yourself."
        check_range(series, where=where)  # warns about nanoseconds, refuses year 10000
        return None
    if not (source.is_numeric() and target.is_numeric()):
        return f"must be {target}, got {source}; cast it yourself if that is intended."
    cast = series.cast(target, strict=False)
    if target == pl.Float32 and source.is_float():
        # Rounding to Float32 is what a Float32 feature is for; overflowing to inf is not.
        bad = series.filter(series.is_finite() & cast.is_infinite())
        return f"holds {bad[0]}, beyond Float32's range." if bad.len() else None
    back = cast.cast(source, strict=False)
    changed = series.filter((cast.is_null() != series.is_null()) | ~back.eq_missing(series))
    if changed.len():
        return (
            f"holds {source} values that do not fit {target} exactly (e.g. {changed[0]!r}); "
            "cast it yourself if losing precision is intended."
        )
    return None


def prepare_rows(
    view: FeatureView, data: Any, stored_keys: dict[str, pl.DataType] | None
) -> pl.DataFrame:
    """Validate rows for ``view`` and return them in stored dtypes; nothing is written here.

    ``stored_keys`` are the key dtypes of the existing table, if any: a view keyed by
    integers stays keyed by integers. Declared key dtypes (``Entity(join_keys={...})``) win
    over what the first write would otherwise fix.
    """
    where = f"write to view {view.name!r}"
    frame = to_polars(data, what=where)
    ts, created = view.timestamp_field, view.created_timestamp_field
    expected = [*view.join_keys, ts, *([created] if created else []), *view.feature_names]
    unknown = [c for c in frame.columns if c not in expected]
    missing = [c for c in expected if c not in frame.columns]
    if unknown:
        hints = "".join(did_you_mean(c, missing or expected) for c in unknown[:3])
        absent = f" Missing: {missing}." if missing else ""
        msg = (
            f"{where}: column(s) {unknown} are not join keys, timestamps or declared features "
            f"of the view.{hints}{absent} Add them to the view's schema with apply(), or drop "
            "them."
        )
        raise ValidationError(msg)
    if missing:
        msg = (
            f"{where}: missing column(s) {missing}; every join key, the timestamp field and "
            "every declared feature must be present (a column of nulls is fine for a feature)."
        )
        raise ValidationError(msg)
    exprs: list[pl.Expr] = []
    declared = view.key_dtypes
    for key in view.join_keys:
        target = declared_key(frame, key, declared, where=where)
        if stored_keys and target not in (stored_keys.get(key, target), pl.Null()):
            msg = (
                f"{where}: join key {key!r} is {frame.schema[key]} but the view's stored "
                f"keys are {stored_keys[key]}."
            )
            raise ValidationError(msg)
        if target == pl.Null:
            target = stored_keys.get(key, pl.Int64()) if stored_keys else pl.Int64()
        exprs.append(lossless_cast(frame, key, target, where))
    for column in (ts, created):
        if column is not None:
            check_range(frame[column], where=where)
            exprs.append(to_utc_expr(column, frame.schema[column], where=where).alias(column))
    for name, dtype in view.schema.items():
        exprs.append(lossless_cast(frame, name, dtype, where))
    out = frame.select(exprs)
    for column in (*view.join_keys, ts, created):
        if column is not None and out[column].null_count():
            msg = (
                f"{where}: column {column!r} has {out[column].null_count()} null value(s); "
                "join keys and timestamps must not be null."
            )
            raise ValidationError(msg)
    assert out.schema[ts] == STORED_DTYPE
    return out


def entity_frame(rows: Any, join_keys: Sequence[str], *, where: str) -> pl.DataFrame:
    """Join keys given as a dict, a dict of lists, a list of dicts or a frame, as a DataFrame."""
    if isinstance(rows, Mapping):
        # A dict of lists is columns (join keys are never lists); a dict of scalars, one row.
        columnar = any(isinstance(v, (list, tuple)) for v in rows.values())
        rows = dict(rows) if columnar else [rows]
    if isinstance(rows, dict):
        try:
            frame = pl.DataFrame(rows, strict=False)
        except (pl.exceptions.PolarsError, TypeError, ValueError) as e:
            msg = f"{where}: could not read the entity columns: {e}"
            raise ValidationError(msg) from e
    elif isinstance(rows, list):
        if not all(isinstance(r, Mapping) for r in rows):
            msg = f"{where}: entity rows must be dicts of join key to value."
            raise ValidationError(msg)
        try:
            frame = pl.DataFrame(rows, infer_schema_length=None)
        except (pl.exceptions.PolarsError, TypeError, ValueError) as e:
            msg = f"{where}: could not read the entity rows: {e}"
            raise ValidationError(msg) from e
    else:
        frame = to_polars(rows, what=where)
    missing = [k for k in join_keys if k not in frame.columns]
    if missing:
        msg = f"{where}: missing join key(s) {missing}; expected {list(join_keys)}." + did_you_mean(
            missing[0], frame.columns
        )
        raise ValidationError(msg)
    for key in join_keys:
        key_dtype(frame.schema[key], where=where, column=key)
    return frame.select(join_keys)
