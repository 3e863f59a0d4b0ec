"""A brute-force point-in-time join: plain loops over lists of dicts, no Polars.

It is deliberately naive, so that it is obviously correct; the property tests in
``test_pit_properties.py`` hold ``FeatureStore.get_historical_features`` to it, and
``test_reference.py`` checks it by hand on tiny cases. It implements SPEC, "Point-in-time
semantics", rules 1-4, for each spine row ``r`` and each requested view ``v``:

1. the join keys of the feature row equal those of ``r``; a null key in ``r`` matches nothing;
2. ``event_timestamp <= r.timestamp``;
3. if ``v.ttl`` is set: ``event_timestamp >= r.timestamp - v.ttl`` (inclusive);
4. the greatest event timestamp wins; ties go to the greatest created timestamp (if the view
   has one), then to the row written last.

With ``RefView.allow_exact_match=False`` rule 2 is strict (``event_timestamp < r.timestamp``).
Bitemporal retrieval (``commit_times`` given: the commit time of every written row) first drops
the rows not known at ``r.timestamp``: created timestamp (if any) or commit time later than it.

A null spine timestamp matches nothing either. Times are compared as UTC instants: a naive
``datetime`` is UTC, an aware one is converted.

>>> from datetime import datetime
>>> view = RefView("v", join_keys=("k",), features=("x",))
>>> rows = {"v": [{"k": 1, "event_timestamp": datetime(2024, 1, 1), "x": 1.5}]}
>>> spine = [{"k": 1, "event_timestamp": datetime(2024, 1, 2)}, {"k": 2, "event_timestamp": None}]
>>> point_in_time(spine, ["v:x"], {"v": view}, rows)
[{'x': 1.5}, {'x': None}]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = [
    "RefView",
    "chi_square",
    "feature_statistics",
    "ks_statistic",
    "pick_row",
    "point_in_time",
    "resolve_features",
    "to_utc",
    "window_aggregate",
    "window_aggregate_in_order",
    "window_values",
]

Row = Mapping[str, Any]


@dataclass(frozen=True)
class RefView:
    """What the reference needs to know about a feature view."""

    name: str
    join_keys: tuple[str, ...]
    features: tuple[str, ...]
    timestamp_field: str = "event_timestamp"
    created_timestamp_field: str | None = None
    ttl: timedelta | None = None
    allow_exact_match: bool = True


def to_utc(value: datetime | None) -> datetime | None:
    """An aware UTC datetime; a naive one is read as UTC. ``None`` stays ``None``."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def resolve_features(
    views: Mapping[str, RefView], features: Sequence[str], *, full_feature_names: bool
) -> list[tuple[str, str, str]]:
    """``(view, feature, output name)`` for each reference, ``"view:*"`` expanded in order."""
    resolved: list[tuple[str, str, str]] = []
    for ref in features:
        view_name, feature = ref.split(":")
        names = views[view_name].features if feature == "*" else (feature,)
        for name in names:
            if name not in views[view_name].features:
                msg = f"view {view_name!r} has no feature {name!r}"
                raise KeyError(msg)
            output = f"{view_name}__{name}" if full_feature_names else name
            resolved.append((view_name, name, output))
    outputs = [output for _, _, output in resolved]
    if len(set(outputs)) != len(outputs):
        msg = f"two requested features have the same output name: {outputs}"
        raise ValueError(msg)
    return resolved


def pick_row(
    view: RefView,
    rows: Sequence[Row],
    keys: Sequence[Any],
    at: datetime | None,
    commit_times: Sequence[datetime] | None = None,
) -> Row | None:
    """The row of ``view`` (``rows`` in write order) that SPEC rules 1-4 select, or None.

    ``keys`` are the spine row's values of ``view.join_keys``; ``at`` its timestamp. With
    ``commit_times`` (one per row: when the commit that first wrote it happened), only rows
    known at ``at`` count (bitemporal).
    """
    at = to_utc(at)
    if at is None or any(key is None for key in keys):
        return None
    if commit_times is not None:
        created_field = view.created_timestamp_field
        rows = [
            row
            for row, commit in zip(rows, commit_times, strict=True)
            if to_utc(commit) <= at  # type: ignore[operator]
            and (created_field is None or to_utc(row[created_field]) <= at)  # type: ignore[operator]
        ]
    best: Row | None = None
    best_event = best_created = datetime.min.replace(tzinfo=timezone.utc)
    for row in rows:
        # Rule 1: every join key equal (the spine's keys are not null here).
        if any(row[name] != key for name, key in zip(view.join_keys, keys, strict=True)):
            continue
        event = to_utc(row[view.timestamp_field])
        if event is None:
            msg = f"view {view.name!r}: a written row has a null event timestamp"
            raise ValueError(msg)
        # Rule 2: observed at or before the spine time.
        if event > at or (event == at and not view.allow_exact_match):
            continue
        # Rule 3: not older than the TTL; the lower bound is inclusive.
        if view.ttl is not None and event < at - view.ttl:
            continue
        # Rule 4: greatest event time, then greatest created time, then written last.
        # Rows come in write order, so ">=" on a full tie lets the later row win.
        created = best_created
        if view.created_timestamp_field is not None:
            stamp = to_utc(row[view.created_timestamp_field])
            if stamp is None:
                msg = f"view {view.name!r}: the SPEC does not rank a null created timestamp"
                raise ValueError(msg)
            created = stamp
        if best is None or (event, created) >= (best_event, best_created):
            best, best_event, best_created = row, event, created
    return best


def point_in_time(
    spine: Sequence[Row],
    features: Sequence[str],
    views: Mapping[str, RefView],
    rows: Mapping[str, Sequence[Row]],
    *,
    timestamp_field: str = "event_timestamp",
    full_feature_names: bool = False,
    commit_times: Mapping[str, Sequence[datetime]] | None = None,
) -> list[dict[str, Any]]:
    """The expected feature values, one dict (output name -> value) per spine row, in order.

    ``rows[view]`` holds every row written to the view, in write order (across writes).
    ``commit_times[view]``, aligned with ``rows[view]``, makes the join bitemporal.
    """
    resolved = resolve_features(views, features, full_feature_names=full_feature_names)
    result: list[dict[str, Any]] = []
    for spine_row in spine:
        at = spine_row[timestamp_field]
        values: dict[str, Any] = {}
        for view_name, feature, output in resolved:
            view = views[view_name]
            keys = [spine_row[name] for name in view.join_keys]
            known = None if commit_times is None else commit_times.get(view_name, ())
            match = pick_row(view, rows.get(view_name, ()), keys, at, known)
            values[output] = None if match is None else match[feature]
        result.append(values)
    return result


def derived_row_by_row(
    inputs: Sequence[Row], features: Mapping[str, Any], dtypes: Mapping[str, Any], schema: Any
) -> list[tuple[Any, ...]]:
    """Derived features as row-wise means: each expression evaluated on each row alone.

    ``inputs`` are the joined rows (columns named by the references and request columns),
    ``schema`` their Polars schema; ``features`` maps output name to expression, ``dtypes``
    to its output dtype. One tuple of values per input row, in ``features`` order.
    """
    import polars as pl

    out: list[tuple[Any, ...]] = []
    for row in inputs:
        one = pl.DataFrame([row], schema=schema)
        values = one.with_columns(
            expr.cast(dtypes[name]).alias(name) for name, expr in features.items()
        ).select(list(features))
        out.append(values.row(0))
    return out


# --- windowed aggregations (SPEC, "Windowed aggregations") ----------------------------------


@dataclass(frozen=True)
class RefAggregation:
    """One aggregate: ``function`` of ``column`` (None: rows) over ``window``."""

    column: str | None
    function: str
    window: timedelta
    forward: bool = False


def window_values(
    view: RefView,
    rows: Sequence[Row],
    keys: Sequence[Any],
    at: datetime,
    agg: RefAggregation,
) -> list[Any]:
    """The non-null values of ``agg.column`` (True per row for ``None``) of the rows (in
    write order) of ``keys`` in ``(at - w, at]`` (backward) or ``(at, at + w]`` (forward), in
    tie order: (event time, created time, write order). A null key gives none."""
    inside: list[tuple[datetime, datetime, int, Any]] = []
    for order, row in enumerate(rows):
        if any(key is None for key in keys):
            break
        if any(row[name] != key for name, key in zip(view.join_keys, keys, strict=True)):
            continue
        event = to_utc(row[view.timestamp_field])
        assert event is not None
        ok = at < event <= at + agg.window if agg.forward else at - agg.window < event <= at
        if not ok:
            continue
        created = (
            to_utc(row[view.created_timestamp_field])
            if view.created_timestamp_field
            else datetime.min.replace(tzinfo=timezone.utc)
        )
        value = True if agg.column is None else row[agg.column]
        inside.append((event, created, order, value))  # type: ignore[arg-type]
    return [v for *_, v in sorted(inside, key=lambda x: x[:3]) if v is not None]


def _values_at(
    view: RefView,
    rows: Sequence[Row],
    keys: Sequence[Any],
    at: datetime | None,
    agg: RefAggregation,
) -> list[Any] | None:
    """:func:`window_values`, or None for a null spine time (no window)."""
    at = to_utc(at)
    return None if at is None else window_values(view, rows, keys, at, agg)


def window_aggregate(
    view: RefView,
    rows: Sequence[Row],
    keys: Sequence[Any],
    at: datetime | None,
    agg: RefAggregation,
) -> Any:
    """The aggregate of the rows (in write order) of ``keys`` in ``(at - w, at]`` (backward)
    or ``(at, at + w]`` (forward), by plain loops.

    Nulls are ignored; counts of an empty window are 0, anything else None; std/var are sample
    statistics (None below two values); first/last go by (event time, created time, write
    order) over non-null values. A null spine time gives None, a null key an empty window.
    Sums are exact (``math.fsum``): the store is held to them within a tolerance.
    """
    import math

    values = _values_at(view, rows, keys, at, agg)
    if values is None or agg.function == "count":
        return values if values is None else len(values)
    n = len(values)
    if agg.function == "count_distinct":
        return len(set(values))
    if n == 0:
        return None
    if agg.function == "sum":
        return math.fsum(values) if isinstance(values[0], float) else sum(int(v) for v in values)
    if agg.function == "mean":
        return math.fsum(values) / n
    if agg.function in ("std", "var"):
        if n < 2:
            return None
        mean = math.fsum(values) / n
        var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
        return math.sqrt(var) if agg.function == "std" else var
    if agg.function == "min":
        return min(values)
    if agg.function == "max":
        return max(values)
    if agg.function == "first":
        return values[0]
    if agg.function == "last":
        return values[-1]
    msg = f"unknown function {agg.function!r}"
    raise ValueError(msg)


def window_aggregate_in_order(
    view: RefView,
    rows: Sequence[Row],
    keys: Sequence[Any],
    at: datetime | None,
    agg: RefAggregation,
) -> Any:
    """:func:`window_aggregate` with the arithmetic the store promises for any value, by
    plain loops in tie order: float sums and means add the values one by one (so NaN, ±inf
    and overflow come out as they would), integer sums wrap as Int64, std/var take the mean
    then the squared deviations, min/max skip NaN (NaN only when every value is NaN), and
    count_distinct counts NaN once and -0.0 as 0.0."""
    import math

    values = _values_at(view, rows, keys, at, agg)
    if values is None or agg.function == "count":
        return values if values is None else len(values)
    n = len(values)
    if agg.function == "count_distinct":
        return len({"nan" if v != v else (0.0 if v == 0 else v) for v in values})
    if n == 0:
        return None
    if agg.function in ("first", "last"):
        return values[0] if agg.function == "first" else values[-1]
    if agg.function in ("min", "max"):
        best = None
        for v in values:
            if v != v:
                continue
            if best is None or (v > best if agg.function == "max" else v < best):
                best = v
        return float("nan") if best is None else best
    if agg.function == "sum" and not isinstance(values[0], float):
        return (sum(int(v) for v in values) + 2**63) % 2**64 - 2**63
    total = 0.0
    for v in values:
        total += float(v)
    if agg.function == "sum":
        return total
    mean = total / n
    if agg.function == "mean":
        return mean
    if n < 2:
        return None
    squares = 0.0
    for v in values:
        deviation = float(v) - mean
        squares += deviation * deviation
    var = squares / (n - 1)
    return math.sqrt(var) if agg.function == "std" else var


def feature_statistics(values: Sequence[Any]) -> dict[str, Any]:
    """Exact statistics of one feature's values (a plain list; None is null, NaN not a number).

    ``count`` counts non-null values (NaN included); the moments, extremes and ``sorted`` (the
    values in order, to check quantiles against) leave NaN out; ``n_unique`` counts distinct
    non-null values (NaN once); ``counts`` maps each value to how often it occurs.
    """
    present = [v for v in values if v is not None]
    numbers = sorted(float(v) for v in present if not isinstance(v, str) and v == v)  # not NaN
    n = len(numbers)
    mean = sum(numbers) / n if n else None
    std = (sum((x - mean) ** 2 for x in numbers) / (n - 1)) ** 0.5 if n > 1 else None  # type: ignore[operator]
    counts: dict[Any, int] = {}
    for v in present:
        key = "NaN" if v != v else v
        counts[key] = counts.get(key, 0) + 1
    return {
        "count": len(present),
        "null_count": len(values) - len(present),
        "mean": mean,
        "std": std,
        "min": numbers[0] if n else None,
        "max": numbers[-1] if n else None,
        "sorted": numbers,
        "n_unique": len(counts),
        "counts": counts,
    }


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    points = sorted(set(a) | set(b))
    xs, ys = sorted(a), sorted(b)
    gap, i, j = 0.0, 0, 0
    for p in points:
        while i < len(xs) and xs[i] <= p:
            i += 1
        while j < len(ys) and ys[j] <= p:
            j += 1
        gap = max(gap, abs(i / len(xs) - j / len(ys)))
    return gap


def chi_square(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Pearson's chi-square statistic of the 2 x k table of category counts of ``a`` and ``b``."""
    categories = sorted(set(a) | set(b))
    rows = [[list(a).count(c) for c in categories], [list(b).count(c) for c in categories]]
    total = len(a) + len(b)
    statistic = 0.0
    for r, size in zip(rows, (len(a), len(b)), strict=True):
        for k, observed in enumerate(r):
            expected = size * (rows[0][k] + rows[1][k]) / total
            statistic += (observed - expected) ** 2 / expected
    return statistic


def hll_registers(values: Sequence[int], p: int, *, mix: bool = True) -> list[int]:
    """HyperLogLog registers, one value at a time: the 64-bit hash of each value (MurmurHash3's
    fmix64, or the value itself unless ``mix``), whose low ``p`` bits pick a register, which
    keeps the greatest rank seen (leading zeros of the hash + 1, at most 65 - p)."""
    full = 2**64 - 1
    registers = [0] * (1 << p)
    for h in values:
        if mix:
            h ^= h >> 33
            h = (h * 0xFF51AFD7ED558CCD) & full
            h ^= h >> 33
            h = (h * 0xC4CEB9FE1A85EC53) & full
            h ^= h >> 33
        r = h & ((1 << p) - 1)
        registers[r] = max(registers[r], min(65 - h.bit_length(), 65 - p))
    return registers
