"""``bitemporal=True`` when rows become known *inside* the spine's span.

    python -m benchmarks.bitemporal --size 2M       # ~1 min
    python -m benchmarks.bitemporal --size 5000 --repeat 1

In ``pit_join --bitemporal`` every row was committed (today) after every spine time (2024), so
no row is known then, the rows are dropped before the join and the answer is all null: that
measures the cheap case. Here the pit_join workload is written as in its ``bulk`` and
``appends`` layouts, then the repository's commit-time record
(``.polarstore/commit_times/<view>.json``, what a purge keeps) says that version ``v`` of ``n``
was committed at ``START + (v + 1) * 90 days / (n + 1)``: as if the writes had happened during
the spine's span. Rows then become known mid-spine, out of tie order (created times, shuffled
appends), and the full per-key pass runs. Timed in this process, best of ``--repeat``: the
plain point-in-time join and ``bitemporal=True`` on the same spine; printed with their ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import polars as pl

from benchmarks._data import START, define_store, generate, parse_size, plan_writes, write_plan


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2M", help="rows per view: tiny, 2M, 10M or a count")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    import polarstore as ps

    workload = generate(parse_size(args.size))
    print("| layout | plain s | bitemporal s | ratio | rows with null f0: plain / bitemporal |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        for layout in ("bulk", "appends"):
            store = ps.FeatureStore(Path(work, layout))
            define_store(store, workload)
            write_plan(store, plan_writes(workload, layout))  # type: ignore[arg-type]
            record = Path(work, layout, ".polarstore", "commit_times")
            record.mkdir(parents=True, exist_ok=True)
            for view, last in store.versions().items():
                n = last + 1
                at = {v: START + (v + 1) * timedelta(days=90) / (n + 1) for v in range(n)}
                ms = {str(v): int(t.timestamp() * 1000) for v, t in at.items()}
                (record / f"{view}.json").write_text(json.dumps(ms))
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
            nulls = [answers[b]["f0"].null_count() for b in (False, True)]
            print(
                f"| {layout} | {best[False]:.3f} | {best[True]:.3f} | "
                f"{best[True] / best[False]:.2f} | {nulls[0]:,} / {nulls[1]:,} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
