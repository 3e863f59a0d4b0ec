"""``bitemporal=True`` when rows become known *inside* the spine's span.

    python -m benchmarks.bitemporal --size 2M       # ~2 min
    python -m benchmarks.bitemporal --size 5000 --repeat 1

In ``pit_join --bitemporal`` every row was committed (today) after every spine time (2024), so
no row is known then, the rows are dropped before the join and the answer is all null: that
measures the cheap case. Here the pit_join workload is written in four layouts, and the
repository's commit-time record (``.polarstore/commit_times/<view>.json``, what a purge keeps)
says when each version was committed, as if the writes had happened during the spine's span:

- ``daily``: each view written as 90 appends, one per day of events, each committed one hour
  after the end of its day (after every created time of its rows): a production pipeline;
- ``daily+backfill``: the same, plus on day 60 a correction of the first 30 days of 5% of the
  users (new ``f0``/``score`` values) — rows that become known long after their event;
- ``bulk`` and ``appends`` (one write; 20 appends of shuffled rows) with version ``v`` of ``n``
  committed at ``START + (v + 1) * 90 days / (n + 1)``: a worst case, as rows then carry
  created times *after* their commit and are out of known-time order for nearly every user.

Timed in this process, best of ``--repeat``: the plain point-in-time join and
``bitemporal=True`` on the same spine; printed with their ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from benchmarks._data import (
    START,
    TIMESTAMP,
    Workload,
    define_store,
    generate,
    parse_size,
    plan_writes,
)

LAYOUTS = ("daily", "daily+backfill", "bulk", "appends")
SPAN_US = 90 * 86_400_000_000


def _day_writes(
    workload: Workload, *, backfill: bool, days: int
) -> list[tuple[str, pl.DataFrame, int]]:
    """``(view, rows, commit time in ms)`` in write order for the daily layouts: the 90 days
    of events cut into ``days`` periods (one day each by default)."""
    writes: list[tuple[str, pl.DataFrame, int]] = []
    period_us = SPAN_US // days
    period = ((pl.col(TIMESTAMP) - START).dt.total_microseconds() // period_us).alias("__p")
    fixed = np.random.default_rng(7).choice(100_000, 5_000, replace=False)
    for view in workload.views:
        frame = view.frame.with_columns(period.clip(0, days - 1))
        feature = view.features[0]
        for p in range(days):
            commit = START + timedelta(microseconds=(p + 1) * period_us, hours=1)
            rows = frame.filter(pl.col("__p") == p).drop("__p")
            writes.append((view.name, rows, int(commit.timestamp() * 1000)))
            if backfill and p == days * 2 // 3:  # corrects the first third of the span
                fix = frame.filter((pl.col("__p") < days // 3) & pl.col("user_id").is_in(fixed))
                fix = fix.drop("__p").with_columns(pl.col(feature) + 1.0)
                at = commit + timedelta(minutes=5)
                writes.append((view.name, fix, int(at.timestamp() * 1000)))
    return writes


def _build(store: Any, root: Path, workload: Workload, layout: str, days: int) -> None:
    define_store(store, workload)
    record = root / ".polarstore" / "commit_times"
    record.mkdir(parents=True, exist_ok=True)
    times: dict[str, dict[str, int]] = {}
    if layout.startswith("daily"):
        for view, rows, ms in _day_writes(workload, backfill=layout == "daily+backfill", days=days):
            times.setdefault(view, {})[str(store.write(view, rows))] = ms
    else:
        plan = plan_writes(workload, layout)  # type: ignore[arg-type]
        for view, chunks in plan.chunks.items():
            versions = [int(store.write(view, chunk)) for chunk in chunks]
            n = versions[-1] + 1
            at = {v: START + (v + 1) * timedelta(days=90) / (n + 1) for v in range(n)}
            times[view] = {str(v): int(t.timestamp() * 1000) for v, t in at.items()}
    for view, ms in times.items():
        (record / f"{view}.json").write_text(json.dumps(ms))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2M", help="rows per view: tiny, 2M, 10M or a count")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--layout", choices=[*LAYOUTS, "all"], default="all")
    parser.add_argument("--days", type=int, default=90, help="writes per view in daily layouts")
    args = parser.parse_args(argv)
    import polarstore as ps

    workload = generate(parse_size(args.size))
    layouts = LAYOUTS if args.layout == "all" else (args.layout,)
    print("| layout | plain s | bitemporal s | ratio | spine rows whose f0 differs |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        for layout in layouts:
            root = Path(work, layout)
            store = ps.FeatureStore(root)
            _build(store, root, workload, layout, args.days)
            best: dict[bool, float] = {}
            answers: dict[bool, pl.DataFrame] = {}
            for _ in range(args.repeat):
                for bitemporal in (False, True):
                    start = time.perf_counter()
                    answers[bitemporal] = store.get_historical_features(
                        workload.spine, workload.features, bitemporal=bitemporal
                    ).collect()
                    took = time.perf_counter() - start
                    best[bitemporal] = min(best.get(bitemporal, took), took)
            a, b = answers[False]["f0"], answers[True]["f0"]
            differ = (a.is_null() != b.is_null()) | (a != b).fill_null(False)
            print(
                f"| {layout} | {best[False]:.3f} | {best[True]:.3f} | "
                f"{best[True] / best[False]:.2f} | {differ.sum():,} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
