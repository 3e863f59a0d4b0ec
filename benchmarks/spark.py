"""The point-in-time join through both engines: Polars and Spark (``engine="spark"``).

    python -m benchmarks.spark --size 2M            # the pit_join workload, ~5 min on 2 cores
    python -m benchmarks.spark --size tiny --repeat 1

The pit_join workload (``benchmarks/_data.py``: two views of ``n`` rows, a spine of ``n // 10``,
8 features, ties on purpose) is written as in its ``bulk`` and ``appends`` layouts. Per layout,
best of ``--repeat``, in this process:

- ``polars``: ``get_historical_features(spine, features).collect()``;
- ``spark`` (Polars spine): ``get_historical_features(spine, features, engine="spark",
  spark=session).toArrow()`` — the spine goes to Spark via Arrow, the answer comes back to
  the driver; its answer must equal the Polars one (every column, row order included);
- ``spark_df`` (Spark spine): the spine read by Spark from a Parquet file, the answer written
  to Spark's ``noop`` sink (computed, not collected: what a cluster job writing a training set
  does).

Spark runs in local mode (``local[*]``, ``--partitions`` shuffle partitions, a 4 GiB driver) on
this machine: it pays for its JVM, the shuffle and the sort and shares the cores with nothing
it can use better; the point is identical answers and a path to a cluster, not speed here.
The session's start (JVM, ~10 s) is not timed; the first Spark query (JIT warm-up) is a run
like any other, so ``--repeat 1`` shows the cold figure.

Then, on the ``bulk`` layout, two more cases through ``polars`` and ``spark`` (Polars spine):

- ``derived``: three derived features (an ``OnDemandView``: a ratio, a string function, a
  floored cast) over four stored inputs, plus one plain feature; on Spark the join runs as
  Spark SQL and the expressions as an Arrow UDF (Polars on the workers): answers must be
  equal bit for bit;
- ``aggregation``: an ``AggregationView`` of ``user_stats`` with eight aggregates (sum, mean,
  max, count, std, last, min over 1, 7 and 30 days, and a forward 7-day label sum): answers
  must be equal, float sums, means and deviations within 1e-9 relative (Spark sums in its own
  order).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl
from polars.testing import assert_frame_equal

from benchmarks._data import define_store, generate, parse_size, plan_writes, write_plan

DERIVED = ["ratios:*", "user_stats:f0"]
AGGREGATED = ["stats_windows:*"]


def _normalised(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(
        pl.col(c).dt.convert_time_zone("UTC")
        for c, t in frame.schema.items()
        if isinstance(t, pl.Datetime) and t.time_zone is not None
    )


def _runs(
    store: Any, spine: pl.DataFrame, spark_spine: Any, features: list[str], spark: Any
) -> dict[str, Callable[[], Any]]:
    def polars() -> pl.DataFrame:
        return store.get_historical_features(spine, features).collect()

    def spark_polars_spine() -> pl.DataFrame:
        answer = store.get_historical_features(spine, features, engine="spark", spark=spark)
        return pl.DataFrame(pl.from_arrow(answer.toArrow()))

    def spark_spark_spine() -> None:
        answer = store.get_historical_features(spark_spine, features, engine="spark")
        answer.write.format("noop").mode("overwrite").save()

    return {"polars": polars, "spark": spark_polars_spine, "spark_df": spark_spark_spine}


def define_cases(store: Any) -> None:
    """The derived-feature and aggregation views of the extra cases."""
    import polarstore as ps

    ratios = ps.OnDemandView(
        "ratios",
        {
            "f0_per_f1": pl.col("user_stats:f0") / pl.col("user_stats:f1"),
            "loud_segment": pl.col("user_profile:segment").str.to_uppercase(),
            "score_tenths": (pl.col("user_profile:score") * 10).floor().cast(pl.Int64),
        },
    )
    windows = ps.AggregationView(
        "stats_windows",
        "user_stats",
        [
            ps.Aggregation("f0", "sum", "7d"),
            ps.Aggregation("f0", "mean", "30d"),
            ps.Aggregation("f1", "max", "1d"),
            ps.Aggregation(None, "count", "7d"),
            ps.Aggregation("f2", "std", "30d"),
            ps.Aggregation("f3", "last", "7d"),
            ps.Aggregation("f4", "min", "30d"),
            ps.Aggregation("f0", "sum", "7d", forward=True, name="label_7d"),
        ],
    )
    store.apply([ratios, windows])


def _same(want: pl.DataFrame, got: pl.DataFrame, *, exact: bool) -> bool:
    try:
        assert_frame_equal(
            _normalised(got), _normalised(want), check_exact=exact, rel_tol=1e-9, abs_tol=1e-12
        )
    except AssertionError:
        return False
    return True


def _cases(store: Any, spine: pl.DataFrame, spark: Any, repeat: int) -> bool:
    """The derived and aggregation cases: prints one row each; False if answers differ."""
    define_cases(store)
    print()
    print("| case | polars s | spark s (Polars spine) | ratio | answers |")
    print("|---|---:|---:|---:|---|")
    ok = True
    for case, features, exact in (("derived", DERIVED, True), ("aggregation", AGGREGATED, False)):
        best: dict[str, float] = {}
        answers: dict[str, pl.DataFrame] = {}
        runs = _runs(store, spine, None, features, spark)
        for _ in range(repeat):
            for name in ("polars", "spark"):
                start = time.perf_counter()
                answers[name] = runs[name]()
                took = time.perf_counter() - start
                best[name] = min(best.get(name, took), took)
        same = _same(answers["polars"], answers["spark"], exact=exact)
        ok &= same
        verdict = ("identical" if exact else "equal (floats within 1e-9)") if same else "DIFFER"
        base = best["polars"]
        print(
            f"| {case} | {base:.2f} | {best['spark']:.2f} | {best['spark'] / base:.1f}x | "
            f"{verdict} |"
        )
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2M", help="rows per view: tiny, 2M, 10M or a count")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=8, help="spark.sql.shuffle.partitions")
    args = parser.parse_args(argv)
    import os
    import sys

    from pyspark.sql import SparkSession

    import polarstore as ps

    # Derived features run Polars on Spark's Python workers: this interpreter's environment.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master("local[*]")
        .appName("polarstore-benchmark")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "4g")
        .config("spark.sql.shuffle.partitions", str(args.partitions))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    workload = generate(parse_size(args.size))
    spine, features = workload.spine, workload.features
    print(f"{workload.n:,} rows per view, spine {spine.height:,}, Spark {spark.version}")
    print(
        "| layout | polars s | spark s (Polars spine) | ratio | spark_df s (Spark spine) | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        spine_path = Path(work, "spine.parquet")
        spine.write_parquet(spine_path)
        spark_spine = spark.read.parquet(str(spine_path))
        for layout in ("bulk", "appends"):
            store = ps.FeatureStore(Path(work, layout))
            define_store(store, workload)
            write_plan(store, plan_writes(workload, layout))  # type: ignore[arg-type]
            best: dict[str, float] = {}
            answers: dict[str, pl.DataFrame] = {}
            runs = _runs(store, spine, spark_spine, features, spark)
            for _ in range(args.repeat):
                for name, run in runs.items():
                    start = time.perf_counter()
                    answer = run()
                    took = time.perf_counter() - start
                    best[name] = min(best.get(name, took), took)
                    if isinstance(answer, pl.DataFrame):
                        answers[name] = answer
            same = _normalised(answers["spark"]).equals(_normalised(answers["polars"]))
            base = best["polars"]
            print(
                f"| {layout} | {base:.2f} | {best['spark']:.2f} | {best['spark'] / base:.1f}x | "
                f"{best['spark_df']:.2f} | {best['spark_df'] / base:.1f}x |"
            )
            if not same:
                print(f"{layout}: the Spark answer differs from the Polars one")
                return 1
        bulk = ps.FeatureStore(Path(work, "bulk"))
        if not _cases(bulk, spine, spark, args.repeat):
            print("the Spark answer differs from the Polars one")
            return 1
    spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
