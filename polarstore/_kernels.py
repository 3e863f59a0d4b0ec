"""Compiled loops of the offline aggregation query, one pass per window and aggregate.

numpy alone needs a pass over all events per step (a sort, a gather, a ``reduceat``, a
scatter), and those memory-bound passes made the windowed query slower than DuckDB's range
join. These loops visit each window's events once, in cache order, in machine code compiled
by numba. They release the GIL (``nogil``), so the caller runs them on two threads, and are
compiled once per installation (``cache``: numba's cache next to this module, or in the
user's cache directory when the package folder is read-only).

Conventions: events are in *position order* (by key code, then tie order); window ``i`` is
the range ``[start[i], end[i])`` of positions; ``present`` marks non-null values. The caller
orders the windows by key, so the loops read the positions forwards, in memory order. Every
kernel takes int64 or float64 arrays (the caller converts), so each compiles for few
signatures.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Executor
from typing import Any

import numpy as np
from numba import njit

__all__ = [
    "key_order",
    "running_count",
    "shifted",
    "split",
    "warm",
    "window_distinct",
    "window_edges",
    "window_extreme",
    "window_nearest",
    "window_sum",
    "window_var",
]


def _jit(function: Any) -> Any:
    """``njit(nogil=True, cache=True)``; where numba finds no writable cache folder (it then
    raises at decoration) the loops compile in every process instead of failing."""
    try:
        return njit(nogil=True, cache=True)(function)
    except RuntimeError:
        return njit(nogil=True)(function)


def key_order(
    keys: np.ndarray, low: int, n_codes: int, times: np.ndarray, pool: Executor, parts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stable counting sort of the events by key code ``keys - low`` (in
    ``range(n_codes)``), its ``parts`` slices counted and placed in parallel on ``pool``.

    Returns ``order`` (the event at each position), ``offsets`` (key ``k``'s positions are
    ``offsets[k]:offsets[k + 1]``) and ``times`` in position order. Events come in tie order,
    so each key's times ascend.

    >>> from concurrent.futures import ThreadPoolExecutor
    >>> with ThreadPoolExecutor(2) as pool:
    ...     order, offsets, ordered = key_order(
    ...         np.array([8, 7, 8, 7]), 7, 2, np.array([10, 20, 30, 40]), pool, 2
    ...     )
    >>> order.tolist(), offsets.tolist(), ordered.tolist()
    ([1, 3, 0, 2], [0, 2, 4], [20, 40, 10, 30])
    """
    slices = split(keys.size, parts)
    counts = list(pool.map(lambda s: _key_counts(keys, low, *s, n_codes), slices))
    offsets = np.zeros(n_codes + 1, np.int64)
    np.cumsum(np.sum(counts, axis=0), out=offsets[1:])
    # Slice j's events of key k go after those of the earlier slices: a stable order.
    fills = [offsets[:-1] + sum(counts[:j], np.zeros(n_codes, np.int64)) for j in range(parts)]
    order = np.empty(keys.size, np.int64)
    ordered_times = np.empty(keys.size, np.int64)
    jobs = [(*s, fill) for s, fill in zip(slices, fills, strict=True)]
    list(pool.map(lambda j: _key_place(keys, low, times, *j, order, ordered_times), jobs))
    return order, offsets, ordered_times


def warm() -> None:
    """Set up numba's compiler state and load one loop: what a process's first call pays
    (~0.2 s), done now; ~5 µs afterwards."""
    window_sum(np.zeros(1), np.zeros(1, np.int64), np.ones(1, np.int64))


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``range(n)`` cut into ``parts`` slices ``(low, high)`` of near-equal size."""
    return list(itertools.pairwise(np.linspace(0, n, parts + 1).astype(np.int64).tolist()))


@_jit
def _key_counts(keys: np.ndarray, low: int, first: int, stop: int, n_codes: int) -> Any:
    counts = np.zeros(n_codes, np.int64)
    for row in range(first, stop):
        counts[keys[row] - low] += 1
    return counts


@_jit
def _key_place(
    keys: np.ndarray,
    low: int,
    times: np.ndarray,
    first: int,
    stop: int,
    fill: np.ndarray,
    order: np.ndarray,
    ordered_times: np.ndarray,
) -> None:
    for row in range(first, stop):
        code = keys[row] - low
        at = fill[code]
        fill[code] = at + 1
        order[at] = row
        ordered_times[at] = times[row]


@_jit
def shifted(values: np.ndarray, order: np.ndarray, low: int) -> Any:
    """``values[order] - low`` in one pass (integer codes in position order)."""
    out = np.empty(order.size, np.int64)
    for p in range(order.size):
        out[p] = values[order[p]] - low
    return out


@_jit
def running_count(present: np.ndarray, order: np.ndarray) -> Any:
    """How many of the first ``p`` positions hold a value, for ``0 <= p <= n``: the count
    of window ``[s, e)`` is ``out[e] - out[s]`` (``present`` in the events' order)."""
    out = np.empty(order.size + 1, np.int64)
    out[0] = 0
    for p in range(order.size):
        out[p + 1] = out[p] + present[order[p]]
    return out


@_jit
def window_edges(
    times: np.ndarray,
    offsets: np.ndarray,
    codes: np.ndarray,
    moments: np.ndarray,
    shifts: np.ndarray,
    low: int,
    high: int,
    out: np.ndarray,
) -> None:
    """For spine rows ``low <= i < high`` and each shift ``j``, ``out[j, i]``: the first
    position of the row's key whose time is after ``moments[i] + shifts[j]`` (binary
    searches inside the key's run, all shifts while it is in cache); 0 for code -1.

    ``|shift|`` stays below 2**62 and times within a few 2**57 µs, so nothing overflows.
    """
    for i in range(low, high):
        code = codes[i]
        if code < 0:
            out[:, i] = 0
            continue
        for j in range(shifts.size):
            moment = moments[i] + shifts[j]
            first, last = offsets[code], offsets[code + 1]
            while first < last:
                middle = (first + last) >> 1
                if times[middle] <= moment:
                    first = middle + 1
                else:
                    last = middle
            out[j, i] = first


@_jit
def window_sum(values: np.ndarray, start: np.ndarray, end: np.ndarray) -> Any:
    """Each window's float sum, in position order (nulls given as 0)."""
    out = np.empty(start.size, np.float64)
    for i in range(start.size):
        total = 0.0
        for p in range(start[i], end[i]):
            total += values[p]
        out[i] = total
    return out


@_jit
def window_var(values: np.ndarray, present: np.ndarray, start: np.ndarray, end: np.ndarray) -> Any:
    """Each window's sample variance (ddof=1) in two passes, mean then squared deviations;
    NaN below two values."""
    out = np.full(start.size, np.nan)
    for i in range(start.size):
        count = 0
        total = 0.0
        for p in range(start[i], end[i]):
            if present[p]:
                count += 1
                total += values[p]
        if count < 2:
            continue
        mean = total / count
        squares = 0.0
        for p in range(start[i], end[i]):
            if present[p]:
                deviation = values[p] - mean
                squares += deviation * deviation
        out[i] = squares / (count - 1)
    return out


@_jit
def window_extreme(
    values: np.ndarray,
    present: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    largest: bool,
    missing: Any,
) -> Any:
    """Each window's largest (or smallest) present value, skipping NaN as Polars' min/max
    do; ``missing`` where there is none (an empty window, or only NaN: then NaN)."""
    out = np.empty(start.size, values.dtype)
    for i in range(start.size):
        best = missing
        found = False
        for p in range(start[i], end[i]):
            value = values[p]
            if not present[p] or value != value:  # NaN
                continue
            if not found or (value > best if largest else value < best):
                best = value
                found = True
        out[i] = best
    return out


@_jit
def window_nearest(present: np.ndarray, start: np.ndarray, end: np.ndarray, first: bool) -> Any:
    """Each window's first (or last) position holding a value; -1 where none does."""
    out = np.full(start.size, -1, np.int64)
    for i in range(start.size):
        if first:
            for p in range(start[i], end[i]):
                if present[p]:
                    out[i] = p
                    break
        else:
            for p in range(end[i] - 1, start[i] - 1, -1):
                if present[p]:
                    out[i] = p
                    break
    return out


@_jit
def window_distinct(codes: np.ndarray, n_values: int, start: np.ndarray, end: np.ndarray) -> Any:
    """How many distinct codes (``0 <= code < n_values``; -1 is null) each window holds:
    a tally per code, raised over the window and lowered again after it."""
    tally = np.zeros(max(n_values, 1), np.int32)
    out = np.zeros(start.size, np.int64)
    for i in range(start.size):
        distinct = 0
        for p in range(start[i], end[i]):
            code = codes[p]
            if code >= 0:
                if tally[code] == 0:
                    distinct += 1
                tally[code] += 1
        for p in range(start[i], end[i]):
            if codes[p] >= 0:
                tally[codes[p]] = 0
        out[i] = distinct
    return out
