"""Peer implementations of the point-in-time join, for comparison with polarstore.

Each peer takes the spine and the views' rows **in write order** (``ViewData.frame``: the row
order is the write order, the last tie-break) and answers with a Polars DataFrame: the spine
columns in input order, then every view's features (``f0..f4, score, segment, count``).

The contract (SPEC, "Point-in-time semantics"): for each spine row and view, the row with the
same key, ``event_timestamp <= spine ts``, ``event_timestamp >= spine ts - ttl`` (inclusive),
greatest event time, ties by greatest ``created``, then by the row written last.

Every peer is split in three so the benchmark can time only the join:

- ``prepare(spine, views)`` -> native inputs (not timed: the equivalent of loading the data
  in the peer's own format, e.g. pandas frames);
- ``run(native)`` -> native result (timed);
- ``finish(native_result)`` -> Polars DataFrame (not timed; only for the equality check).

``PEERS[name](spine, views)`` runs all three: the plain function.

``python -m benchmarks._peers`` checks the peers against each other and against a brute-force
reference on small workloads (dense keys, many ties).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import polars as pl

from benchmarks._data import ViewData, Workload, generate, plan_writes

__all__ = [
    "PEERS",
    "TIE_FREE_PEERS",
    "Peer",
    "bruteforce",
    "compare_frames",
    "duckdb_asof",
    "duckdb_plain",
    "naive_polars",
    "pandas_merge_asof",
]

SPINE_ROW = "__spine_row"
WRITE_ORDER = "__write_order"


@dataclass(frozen=True)
class Peer:
    name: str
    prepare: Callable[[pl.DataFrame, Sequence[ViewData]], Any]
    run: Callable[[Any], Any]
    finish: Callable[[Any], pl.DataFrame]

    def __call__(self, spine: pl.DataFrame, views: Sequence[ViewData]) -> pl.DataFrame:
        return self.finish(self.run(self.prepare(spine, views)))


def _output_schema(spine: pl.DataFrame, views: Sequence[ViewData]) -> dict[str, Any]:
    schema: dict[str, Any] = dict(spine.schema)
    for v in views:
        schema.update({f: v.dtypes[f] for f in v.features})
    return schema


def _spine_ts(views: Sequence[ViewData]) -> str:
    return views[0].timestamp_field


# --- naive Polars ---------------------------------------------------------------------------


def _naive_prepare(spine: pl.DataFrame, views: Sequence[ViewData]) -> Any:
    return spine, tuple(views)


def _naive_run(native: Any) -> pl.DataFrame:
    """Hand-written lazy Polars: per view, attach the write order, sort by (key, ts, created,
    write order), keep the last row of each (key, ts), then ``join_asof`` backward by key with
    ``tolerance=ttl``; finally restore the spine order."""
    spine, views = native
    ts = _spine_ts(views)
    out = spine.lazy().with_row_index(SPINE_ROW).sort(ts)
    for v in views:
        key = v.join_key
        order = [key, v.timestamp_field]
        if v.created_field:
            order.append(v.created_field)
        order.append(WRITE_ORDER)
        right = (
            v.frame.lazy()
            .with_row_index(WRITE_ORDER)
            .sort(order)
            .unique(subset=[key, v.timestamp_field], keep="last", maintain_order=True)
            .select(key, pl.col(v.timestamp_field).alias(ts), *v.features)
        )
        # Left is sorted by ts globally, right by (key, ts): both sorted within each key group,
        # which is what join_asof with `by` needs.
        out = out.join_asof(
            right,
            on=ts,
            by=key,
            strategy="backward",
            tolerance=v.ttl,
            check_sortedness=False,
        )
    return out.sort(SPINE_ROW).drop(SPINE_ROW).collect()


naive_polars = Peer("naive_polars", _naive_prepare, _naive_run, lambda df: df)


# --- DuckDB ASOF JOIN -----------------------------------------------------------------------


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _duckdb_prepare(spine: pl.DataFrame, views: Sequence[ViewData]) -> Any:
    import duckdb

    con = duckdb.connect()  # default threads: every core
    # TIMESTAMPTZ arithmetic and output follow the session zone; UTC keeps both exact.
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    return con, spine, tuple(views)


def _duckdb_sql(spine_cols: Sequence[str], views: Sequence[ViewData], *, dedupe: bool) -> str:
    ts = _spine_ts(views)
    ctes, selects, joins = [], [f"s.{_q(c)}" for c in spine_cols], []
    for i, v in enumerate(views):
        alias = f"v{i}"
        order = [f"{_q(v.created_field)} DESC"] if v.created_field else []
        order.append(f"{_q(WRITE_ORDER)} DESC")
        cols = ", ".join(_q(c) for c in (v.join_key, v.timestamp_field, *v.features))
        if dedupe:
            ctes.append(
                f"{alias} AS (SELECT {cols} FROM {alias}_raw QUALIFY row_number() OVER ("
                f"PARTITION BY {_q(v.join_key)}, {_q(v.timestamp_field)} "
                f"ORDER BY {', '.join(order)}) = 1)"
            )
        else:
            ctes.append(f"{alias} AS (SELECT {cols} FROM {alias}_raw)")
        vts = f"{alias}.{_q(v.timestamp_field)}"
        for f in v.features:
            if v.ttl is None:
                selects.append(f"{alias}.{_q(f)} AS {_q(f)}")
            else:
                ttl_us = v.ttl // timedelta(microseconds=1)
                selects.append(
                    f"CASE WHEN {vts} >= s.{_q(ts)} - to_microseconds({ttl_us}) "
                    f"THEN {alias}.{_q(f)} END AS {_q(f)}"
                )
        joins.append(
            f"ASOF LEFT JOIN {alias} ON s.{_q(v.join_key)} = {alias}.{_q(v.join_key)} "
            f"AND s.{_q(ts)} >= {vts}"
        )
    return (
        f"WITH {', '.join(ctes)}\n"
        f"SELECT {', '.join(selects)}\nFROM spine_raw s\n"
        + "\n".join(joins)
        + f"\nORDER BY s.{_q(SPINE_ROW)}"
    )


def _duckdb_run(native: Any) -> pl.DataFrame:
    """Register the frames (zero-copy Arrow scans) with a row index each, deduplicate ties with
    ``QUALIFY row_number() ... = 1``, one ``ASOF LEFT JOIN`` per view, TTL as CASE nulling,
    ``ORDER BY`` the spine row index, fetch as Polars."""
    con, spine, views = native
    con.register("spine_raw", spine.with_row_index(SPINE_ROW))
    for i, v in enumerate(views):
        con.register(f"v{i}_raw", v.frame.with_row_index(WRITE_ORDER))
    return con.sql(_duckdb_sql(spine.columns, views, dedupe=True)).pl()


def _duckdb_plain_run(native: Any) -> pl.DataFrame:
    """The plainest query a user would write on data without ties: ``ASOF LEFT JOIN`` per
    view and TTL as CASE nulling, no tie dedupe (which row of a tie it takes is unspecified,
    so it is correct only on tie-free data: ``--tie-free``)."""
    con, spine, views = native
    con.register("spine_raw", spine.with_row_index(SPINE_ROW))
    for i, v in enumerate(views):
        con.register(f"v{i}_raw", v.frame)
    return con.sql(_duckdb_sql(spine.columns, views, dedupe=False)).pl()


def _duckdb_finish(df: pl.DataFrame) -> pl.DataFrame:
    return df


duckdb_asof = Peer("duckdb_asof", _duckdb_prepare, _duckdb_run, _duckdb_finish)
duckdb_plain = Peer("duckdb_plain", _duckdb_prepare, _duckdb_plain_run, _duckdb_finish)


# --- pandas merge_asof ----------------------------------------------------------------------


def _pandas_prepare(spine: pl.DataFrame, views: Sequence[ViewData]) -> Any:
    """Convert to pandas (numpy-backed, the default): the pandas user's loaded data."""
    return (
        spine.to_pandas(),
        tuple((v, v.frame.to_pandas()) for v in views),
        _output_schema(spine, views),
    )


def _pandas_run(native: Any) -> Any:
    """Per view: attach the write order, sort by (ts, key, created, write order), drop
    duplicate (key, ts) keeping the last, ``merge_asof`` backward ``by`` key with
    ``tolerance=ttl`` and ``allow_exact_matches=True``; restore the spine order."""
    import numpy as np
    import pandas as pd

    spine, views, schema = native
    ts = views[0][0].timestamp_field
    left = spine.assign(**{SPINE_ROW: np.arange(len(spine))}).sort_values(ts, kind="stable")
    for v, frame in views:
        key = v.join_key
        order = [v.timestamp_field, key]
        if v.created_field:
            order.append(v.created_field)
        order.append(WRITE_ORDER)
        right = (
            frame.assign(**{WRITE_ORDER: np.arange(len(frame))})
            .sort_values(order, kind="stable")
            .drop_duplicates([v.timestamp_field, key], keep="last")
        )
        right = right[[key, v.timestamp_field, *v.features]]
        if v.timestamp_field != ts:
            right = right.rename(columns={v.timestamp_field: ts})
        left = pd.merge_asof(
            left,
            right,
            on=ts,
            by=key,
            direction="backward",
            tolerance=None if v.ttl is None else pd.Timedelta(v.ttl),
            allow_exact_matches=True,
        )
    out = left.sort_values(SPINE_ROW, kind="stable").drop(columns=SPINE_ROW)
    return out.reset_index(drop=True), schema


def _pandas_finish(result: Any) -> pl.DataFrame:
    """Back to Polars with the declared dtypes (unmatched Int64 became float64 NaN in pandas;
    the data have no NaN of their own, so NaN -> null is exact)."""
    df, schema = result
    out = pl.from_pandas(df, nan_to_null=True)
    return out.select(pl.col(name).cast(dtype) for name, dtype in schema.items())


pandas_merge_asof = Peer("pandas_merge_asof", _pandas_prepare, _pandas_run, _pandas_finish)

PEERS: dict[str, Peer] = {p.name: p for p in (naive_polars, duckdb_asof, pandas_merge_asof)}
# Peers that are correct only when no two rows of a view share (key, event time).
TIE_FREE_PEERS: dict[str, Peer] = {duckdb_plain.name: duckdb_plain}


# --- brute-force reference (small data only) ------------------------------------------------


def bruteforce(spine: pl.DataFrame, views: Sequence[ViewData]) -> pl.DataFrame:
    """The contract written literally: join every spine row to every row of its key, filter
    rules 2-3, take the max by (event time, created, write order). Quadratic per key."""
    ts = _spine_ts(views)
    out = spine.with_row_index(SPINE_ROW)
    for v in views:
        key = v.join_key
        right = v.frame.with_row_index(WRITE_ORDER).rename({v.timestamp_field: "__fts"})
        cand = (
            out.select(SPINE_ROW, key, ts)
            .join(right, on=key, how="inner")
            .filter(pl.col("__fts") <= pl.col(ts))
        )
        if v.ttl is not None:
            cand = cand.filter(pl.col("__fts") >= pl.col(ts) - v.ttl)
        order = ["__fts", *([v.created_field] if v.created_field else []), WRITE_ORDER]
        best = cand.sort(order).group_by(SPINE_ROW).last().select(SPINE_ROW, *v.features)
        out = out.join(best, on=SPINE_ROW, how="left")
    return out.sort(SPINE_ROW).drop(SPINE_ROW)


# --- comparison -----------------------------------------------------------------------------


def compare_frames(got: pl.DataFrame, want: pl.DataFrame) -> str | None:
    """None if equal (names, dtypes, order, exact values incl. floats); else a short reason."""
    if got.columns != want.columns:
        return f"columns {got.columns} != {want.columns}"
    if got.height != want.height:
        return f"{got.height} rows != {want.height}"
    problems = []
    dtypes = [
        f"{c}: {a} != {b}"
        for c, a, b in zip(got.columns, got.dtypes, want.dtypes, strict=True)
        if a != b
    ]
    if dtypes:
        problems.append("dtypes " + "; ".join(dtypes))
    diffs = []
    for c in got.columns:
        a, b = got[c], want[c]
        if a.dtype != b.dtype:
            try:
                a = a.cast(b.dtype)
            except Exception:  # a dtype mismatch is already reported
                continue
        n = int((~a.eq_missing(b)).sum())
        if n:
            diffs.append(f"{c}: {n} rows")
    if diffs:
        problems.append("values differ in " + ", ".join(diffs))
    return "; ".join(problems) or None


# --- self-check -----------------------------------------------------------------------------


def _check(
    workload: Workload, layouts: Sequence[str] = ("bulk", "appends"), *, tie_free: bool = False
) -> list[str]:
    errors = []
    for layout in layouts:
        plan = plan_writes(workload, layout)  # type: ignore[arg-type]
        views = plan.workload_views(workload)
        want = bruteforce(workload.spine, views)
        matched = want.select(pl.col("f0").is_not_null().sum(), pl.col("score").is_not_null().sum())
        peers = PEERS | (TIE_FREE_PEERS if tie_free else {})
        for name, peer in peers.items():
            problem = compare_frames(peer(workload.spine, views), want)
            tag = f"n={workload.n} seed={workload.seed} layout={layout} {name}"
            if problem:
                errors.append(f"{tag}: {problem}")
            print(f"{tag}: {problem or 'OK'}  (matched {matched.row(0)})")
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    errors = []
    for seed in range(args.seeds):
        # Dense: few entities, so most spine rows match and ties/TTL edges are frequent.
        errors += _check(generate(20_000, seed=seed, n_entities=500, dup_frac=0.05))
        errors += _check(generate(5_000, seed=seed, n_entities=50, dup_frac=0.2, edge_frac=0.2))
        # Without ties, for the peers that ignore them (still dense: TTL edges are frequent).
        errors += _check(generate(20_000, seed=seed, n_entities=500, dup_frac=0.0), tie_free=True)
    # The benchmark's own tiny workload (sparse: 100k entities).
    errors += _check(generate(20_000))
    print("\n".join(errors) or "all peers agree with the brute-force reference")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
