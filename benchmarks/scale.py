"""The scale check of the core issue: two views of N rows, 100k entities, an N/10-row spine.

Run the two steps as separate processes so that ``/usr/bin/time -v`` measures the join alone::

    python -m benchmarks.scale build /tmp/scale10m --size 10M   # writes the repository + spine
    /usr/bin/time -v python -m benchmarks.scale join /tmp/scale10m

``join`` prints the wall time of ``get_historical_features(...).collect()`` and the result's
shape; ``time -v`` adds the process's peak RSS ("Maximum resident set size").
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from benchmarks._data import define_store, generate, parse_size, plan_writes, write_plan


def build(repo: Path, n: int) -> None:
    import polarstore as ps

    workload = generate(n)
    store = ps.FeatureStore(repo)
    define_store(store, workload)
    started = time.perf_counter()
    write_plan(store, plan_writes(workload, "bulk"))
    print(f"wrote 2 views x {n:,} rows in {time.perf_counter() - started:.2f} s")
    workload.spine.write_parquet(repo / "spine.parquet")
    features = "\n".join(workload.features)
    (repo / "features.txt").write_text(features)


def join(repo: Path) -> None:
    import polarstore as ps

    spine = pl.read_parquet(repo / "spine.parquet")
    features = (repo / "features.txt").read_text().split()
    store = ps.FeatureStore(repo)
    started = time.perf_counter()
    out = store.get_historical_features(spine, features).collect()
    print(f"joined {spine.height:,} spine rows x {len(features)} features: {out.shape} ")
    print(f"in {time.perf_counter() - started:.2f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["build", "join"])
    parser.add_argument("repo", type=Path)
    parser.add_argument("--size", default="10M", help="rows per view: tiny, 2M, 10M or a count")
    args = parser.parse_args(argv)
    if args.step == "build":
        build(args.repo, parse_size(args.size))
    else:
        join(args.repo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
