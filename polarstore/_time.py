"""The one place where time values are normalised: tz-naive means UTC, storage is µs UTC."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import cast

import polars as pl

from polarstore._errors import ValidationError

__all__ = ["STORED_DTYPE", "check_range", "to_utc", "to_utc_expr", "utc_now"]

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


# The times a Python datetime can hold (UTC), as physical values per unit. Outside them,
# converting to microseconds can overflow (Polars panics on that) and no Python datetime could
# hold the result anyway. Nanoseconds (years 1677-2262) always fit.
_FIRST = datetime(1, 1, 1, tzinfo=timezone.utc) - datetime(1970, 1, 1, tzinfo=timezone.utc)
_LAST = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc) - datetime(
    1970, 1, 1, tzinfo=timezone.utc
)
_US = timedelta(microseconds=1)
_BOUNDS: dict[str, tuple[int, int]] = {
    "us": (_FIRST // _US, _LAST // _US),
    "ms": (-(-_FIRST // timedelta(milliseconds=1)), _LAST // timedelta(milliseconds=1)),
    "d": (_FIRST.days, _LAST.days),
}


def check_range(series: pl.Series, *, where: str) -> None:
    """``ValidationError`` if a Datetime or Date column holds times outside years 1-9999."""
    dtype = series.dtype
    if isinstance(dtype, pl.Datetime) and dtype.time_unit != "ns":
        lo, hi = _BOUNDS[dtype.time_unit]
    elif dtype == pl.Date:
        lo, hi = _BOUNDS["d"]
    else:
        return
    physical = series.to_physical()
    low, high = cast("int | None", physical.min()), cast("int | None", physical.max())
    if (low is not None and low < lo) or (high is not None and high > hi):
        msg = (
            f"{where}: column {series.name!r} holds times outside the years 1 to 9999 UTC "
            f"(raw {dtype} values from {low} to {high}); check how it was built."
        )
        raise ValidationError(msg)


def as_timedelta(value: object, *, what: str) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        if isinstance(value, timedelta) and value < timedelta(0):
            msg = f"{what} must not be negative, got {value}."
            raise ValidationError(msg)
        return value
    msg = f"{what} must be a datetime.timedelta or None, got {type(value).__name__}."
    raise ValidationError(msg)
