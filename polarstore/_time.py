"""The one place where time values are normalised: tz-naive means UTC, storage is µs UTC."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import polars as pl

from polarstore._errors import ValidationError

__all__ = ["STORED_DTYPE", "to_utc", "to_utc_expr", "utc_now"]

STORED_DTYPE = pl.Datetime("us", "UTC")


def to_utc(value: datetime | date | str, *, what: str = "time") -> datetime:
    """Return an aware UTC datetime; naive values (and ISO strings without an offset) are UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as e:
            msg = f"{what} {value!r} is not an ISO-8601 date or datetime."
            raise ValidationError(msg) from e
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    msg = f"{what} must be a datetime, date or ISO-8601 string, got {type(value).__name__}."
    raise ValidationError(msg)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def to_utc_expr(name: str, dtype: pl.DataType, *, where: str) -> pl.Expr:
    """An expression turning column ``name`` of ``dtype`` into ``Datetime("us", "UTC")``.

    Naive datetimes are read as UTC, other zones converted; dates are midnight UTC.
    Anything else (strings, integers) is rejected: guessing an epoch unit silently is how
    training sets end up a thousand times off.
    """
    col = pl.col(name)
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            col = col.dt.replace_time_zone("UTC")
        elif dtype.time_zone != "UTC":
            col = col.dt.convert_time_zone("UTC")
        return col.dt.cast_time_unit("us")
    if dtype == pl.Date:
        return col.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype == pl.Null:  # an empty or all-null column; nulls are rejected by the caller
        return col.cast(STORED_DTYPE)
    msg = f"{where}: column {name!r} must be a Datetime or Date, got {dtype}."
    raise ValidationError(msg)


def as_timedelta(value: object, *, what: str) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        if isinstance(value, timedelta) and value < timedelta(0):
            msg = f"{what} must not be negative, got {value}."
            raise ValidationError(msg)
        return value
    msg = f"{what} must be a datetime.timedelta or None, got {type(value).__name__}."
    raise ValidationError(msg)
