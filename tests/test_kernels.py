"""The compiled loops of the offline aggregation query (``polarstore._kernels``) on their own:
the key sort against numpy's stable argsort, the window edges against ``searchsorted``, and
the loops' fallback where numba has no writable cache folder. Their aggregates are checked
through the store against the reference in ``test_aggregations``."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polarstore import _kernels


@settings(max_examples=60, deadline=None)
@given(
    codes=st.lists(st.integers(0, 5), max_size=60),
    low=st.sampled_from([0, -(2**62), 10**15]),
    parts=st.integers(1, 3),
)
def test_key_order_is_a_stable_sort_by_key(codes: list[int], low: int, parts: int) -> None:
    keys = np.array(codes, dtype=np.int64) + low
    times = np.arange(len(codes), dtype=np.int64) * 7
    with ThreadPoolExecutor(2) as pool:
        order, offsets, ordered = _kernels.key_order(keys, low, 6, times, pool, parts)
    want = np.argsort(np.array(codes, dtype=np.int64), kind="stable")
    assert order.tolist() == want.tolist()
    assert offsets.tolist() == [0, *np.cumsum(np.bincount(codes, minlength=6)).tolist()]
    assert ordered.tolist() == times[want].tolist()


@settings(max_examples=60, deadline=None)
@given(
    runs=st.lists(st.lists(st.integers(-5, 5), max_size=8), min_size=1, max_size=4),
    rows=st.lists(st.tuples(st.integers(-1, 3), st.integers(-8, 8)), min_size=1, max_size=20),
    shifts=st.lists(st.integers(-3, 3), min_size=1, max_size=3),
)
def test_window_edges_are_searches_inside_each_key(
    runs: list[list[int]], rows: list[tuple[int, int]], shifts: list[int]
) -> None:
    """Row ``i``'s edge ``j``: the first position of its key whose time is after
    ``t + shift``; 0 for an unknown key (code -1), whatever the key's run holds."""
    times = np.array([t for run in runs for t in sorted(run)], dtype=np.int64)
    offsets = np.array([0, *np.cumsum([len(r) for r in runs])], dtype=np.int64)
    codes = np.array([c if c < len(runs) else -1 for c, _ in rows], dtype=np.int64)
    moments = np.array([t for _, t in rows], dtype=np.int64)
    out = np.full((len(shifts), len(rows)), -7, dtype=np.int64)
    _kernels.window_edges(
        times, offsets, codes, moments, np.array(shifts, dtype=np.int64), 0, len(rows), out
    )
    for i, (code, moment) in enumerate(zip(codes.tolist(), moments.tolist(), strict=True)):
        for j, shift in enumerate(shifts):
            if code < 0:
                want = 0
            else:
                run = times[offsets[code] : offsets[code + 1]]
                want = int(offsets[code] + np.searchsorted(run, moment + shift, side="right"))
            assert out[j, i] == want, (i, j)


def test_the_loops_compile_uncached_without_a_cache_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """numba raises at decoration when no folder can hold its cache (a read-only package
    and home): the module then compiles its loops in every process instead of failing."""
    import numba

    real = numba.njit

    def njit(**options: Any) -> Any:
        if options.get("cache"):
            msg = "cannot cache function: no locator available for file"
            raise RuntimeError(msg)
        return real(**options)

    monkeypatch.setattr(numba, "njit", njit)
    spec = importlib.util.spec_from_file_location("uncached_kernels", _kernels.__file__)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    values = np.array([1.5, 2.0, 4.0])
    got = module.window_sum(values, np.array([0, 1]), np.array([3, 2]))
    assert got.tolist() == [7.5, 2.0]
