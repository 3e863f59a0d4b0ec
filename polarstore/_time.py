"""The one place where time values are normalised: tz-naive means UTC, storage is µs UTC."""

from __future__ import annotations

import re
import warnings
from datetime import date, datetime, timedelta, timezone
from typing import cast

import polars as pl

from polarstore._errors import NanosecondWarning, ValidationError

__all__ = ["STORED_DTYPE", "as_ttl", "check_range", "to_utc", "to_utc_expr", "utc_now"]

STORED_DTYPE = pl.Datetime("us", "UTC")
# Digits past the sixth of an ISO fraction: Python's fromisoformat drops them silently.
_SUB_MICRO = re.compile(r"[T ]\d{2}:\d{2}:\d{2}[.,]\d{6}(\d+)")


def to_utc(value: datetime | date | str, *, what: str = "time") -> datetime:
    """Return an aware UTC datetime; naive values (and ISO strings without an offset) are UTC.

    Nanoseconds (a ``pandas.Timestamp``, an ISO string with more than six fractional digits)
    are truncated to microseconds with a :class:`NanosecondWarning`; a time that falls
    outside the years 1-9999 once in UTC is a ``ValidationError``.

    >>> to_utc("2024-01-01T01:00:00+01:00")
    datetime.datetime(2024, 1, 1, 0, 0, tzinfo=datetime.timezone.utc)
    """
    given = value
    if isinstance(value, str):
        extra = _SUB_MICRO.search(value)
        try:
            value = datetime.fromisoformat(value)
        except ValueError as e:
            msg = f"{what} {value!r} is not an ISO-8601 date or datetime."
            raise ValidationError(msg) from e
        if extra and extra.group(1).strip("0"):
            _warn_nanoseconds(what, f"{given!r}")
    if isinstance(value, datetime):
        if getattr(value, "nanosecond", 0):  # a pandas.Timestamp
            _warn_nanoseconds(what, f"{given!r}")
        value = datetime(
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
            value.microsecond,
            tzinfo=value.tzinfo,
            fold=value.fold,
        )
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        try:
            return value.astimezone(timezone.utc)
        except OverflowError as e:
            msg = (
                f"{what} {given!r} is outside the years 1 to 9999 once converted to UTC; "
                "use a time between 0001-01-01 and 9999-12-31T23:59:59.999999 UTC."
            )
            raise ValidationError(msg) from e
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    msg = f"{what} must be a datetime, date or ISO-8601 string, got {type(value).__name__}."
    raise ValidationError(msg)


def _warn_nanoseconds(where: str, what: str) -> None:
    msg = (
        f"{where}: {what} has nanoseconds; polarstore stores microseconds, so it was truncated "
        "(rows made equal by this go by write order)."
    )
    warnings.warn(msg, NanosecondWarning, stacklevel=4)


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
    """``ValidationError`` if a Datetime or Date column holds times outside years 1-9999.

    A nanosecond column with sub-microsecond parts gets a :class:`NanosecondWarning` naming
    it: storing it floors those values to the microsecond.
    """
    dtype = series.dtype
    if isinstance(dtype, pl.Datetime) and dtype.time_unit == "ns":
        warn_nanoseconds(series, where=where)
        return
    if isinstance(dtype, pl.Datetime):
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


def warn_nanoseconds(series: pl.Series, *, where: str) -> None:
    """A :class:`NanosecondWarning` if a ``Datetime("ns")`` series has sub-µs parts."""
    lost = (series.to_physical() % 1000 != 0).sum()
    if lost:
        _warn_nanoseconds(where, f"column {series.name!r} ({lost} value(s))")


def as_ttl(value: object, *, what: str) -> timedelta | None:
    """A view's ttl: a positive ``timedelta``, or None for unlimited."""
    if value is None:
        return None
    if not isinstance(value, timedelta):
        msg = f"{what} must be a datetime.timedelta or None, got {type(value).__name__}."
        raise ValidationError(msg)
    if value < timedelta(0):
        msg = f"{what} must not be negative, got {value}."
        raise ValidationError(msg)
    if value == timedelta(0):
        msg = (
            f"{what} is timedelta(0), which would match only rows at the spine's exact "
            "instant; for no time limit use ttl=None (a zero TTL means unlimited in Feast)."
        )
        raise ValidationError(msg)
    return value
