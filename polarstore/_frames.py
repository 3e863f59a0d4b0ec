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
    source = frame.schema[column]
    if source == target or source == pl.Null:
        return pl.col(column).cast(target)
    if (
        (source.is_numeric() and target.is_numeric())
        or (isinstance(source, (pl.Categorical, pl.Enum)) and target == pl.String)
        or (isinstance(source, pl.List) and isinstance(target, pl.List))
    ):
        cast = frame.select(pl.col(column).cast(target, strict=False))[column]
        original = frame[column]
        back = cast.cast(source, strict=False) if source.is_numeric() else cast
        same_nulls = (cast.is_null() == original.is_null()).all()
        if same_nulls and (not source.is_numeric() or back.eq_missing(original).all()):
            return pl.col(column).cast(target)
        msg = (
            f"{where}: column {column!r} holds {source} values that do not fit {target} "
            "exactly; cast it yourself if losing precision is intended."
        )
        raise ValidationError(msg)
    msg = f"{where}: column {column!r} must be {target}, got {source}."
    raise ValidationError(msg)


def prepare_rows(
    view: FeatureView, data: Any, stored_keys: dict[str, pl.DataType] | None
) -> pl.DataFrame:
    """Validate rows for ``view`` and return them in stored dtypes; nothing is written here.

    ``stored_keys`` are the key dtypes of the existing table, if any: a view keyed by
    integers stays keyed by integers.
    """
    where = f"write to view {view.name!r}"
    frame = to_polars(data, what=where)
    ts, created = view.timestamp_field, view.created_timestamp_field
    expected = [*view.join_keys, ts, *([created] if created else []), *view.feature_names]
    unknown = [c for c in frame.columns if c not in expected]
    if unknown:
        hints = "".join(did_you_mean(c, expected) for c in unknown[:3])
        msg = (
            f"{where}: column(s) {unknown} are not join keys, timestamps or declared features "
            f"of the view.{hints} Add them to the view's schema with apply(), or drop them."
        )
        raise ValidationError(msg)
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        msg = (
            f"{where}: missing column(s) {missing}; every join key, the timestamp field and "
            "every declared feature must be present (a column of nulls is fine for a feature)."
        )
        raise ValidationError(msg)
    exprs: list[pl.Expr] = []
    for key in view.join_keys:
        target = key_dtype(frame.schema[key], where=where, column=key)
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
