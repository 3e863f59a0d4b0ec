"""Write benchmark: ``store.write`` against a bare ``deltalake.write_deltalake`` of the same rows.

    python -m benchmarks.write --size 2M         # tiny | 2M | 10M | a row count (default 2M)
    python -m benchmarks.write --size tiny       # smoke test (~12 s)

The rows: the ``user_stats`` view of ``benchmarks/_data.py`` (``N`` rows: ``user_id``, event and
created timestamps, ``f0..f4`` Float64), one Polars DataFrame read from parquet before timing.

Contenders, each run ``--repeat`` times in a fresh process (``benchmarks/_harness.py``),
round-robin, every run into a fresh directory; best wall time, max peak RSS:

- ``polarstore``: ``store.write("user_stats", frame)``. **Timed: everything the call does** —
  validation and casts, the write sequence, the sort by (event time, created time), the
  conversion to Arrow, the Delta commit. Not timed: ``FeatureStore(path)``, ``apply``.
- ``write_deltalake``: ``deltalake.write_deltalake(path, frame)`` with the Polars frame as it
  is (Arrow C stream), default options. Timed: the call.
- ``polarstore_no_stats``: ``store.write`` with the statistics summary switched off (the
  recorder that summarises the batch replaced by one that does nothing): the cost of keeping
  statistics is polarstore's time over this one's, less 1 (target <= 15%). After each write,
  ``store.statistics`` is timed too (not part of the write's time; target <= 1 s at 10M).

Three cases: **new table** (the view / table has no data yet), **existing table** (an append to
a table that already holds a first write of 1% of the rows, written before timing) and **back to
back** (the rows as 5 consecutive writes of a fifth each into a new table; for polarstore the
time includes the wait for the last summaries to be stored, so work a write leaves to a
background thread is counted where it slows the next write or the end). Throughput =
``N`` / best wall time; the ratio is polarstore's throughput over the bare write's (target
≥ 0.8). The written tables are checked to hold the ``N`` rows (plus the first 1%).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from benchmarks._data import SEED, Workload, define_store, parse_size, user_stats
from benchmarks._harness import Measurement, run_task, summarize

VIEW = "user_stats"
CONTENDERS = ("polarstore", "write_deltalake", "polarstore_no_stats")
CASES = ("new table", "existing table", "back to back")
BACK_TO_BACK = 5  # the back-to-back case: the rows as this many consecutive writes
TARGET = 0.8  # polarstore rows/s over write_deltalake's, at least
STATS_TARGET = 0.15  # keeping statistics: at most this much more write time
FIRST = 0.01  # existing table: the rows of the first write, as a fraction of N


# --- tasks (run in a fresh process by benchmarks._harness) ----------------------------------


class _NoStatistics:
    """Stands for ``record_rows(offline, view)``: a recorder that summarises nothing."""

    def __init__(self, *_: Any) -> None:
        pass

    def start(self, rows: pl.DataFrame) -> None:
        pass

    def __call__(self, version: int, rows: pl.DataFrame) -> None:
        pass


def write_task(
    contender: str, data_path: str, target: str, first_path: str | None, writes: int = 1
) -> Any:
    """Timed: the one write of the rows in ``data_path`` into ``target`` (a fresh path).

    With ``first_path``, those rows are written first, not timed (the existing-table case).
    With ``writes`` > 1, the rows are written as that many consecutive slices, and the timed
    part ends once polarstore stored every summary (``settle``): the work it leaves to a
    background thread after a write is paid for by the next write, or by this wait.
    """
    frame = pl.read_parquet(data_path)
    first = pl.read_parquet(first_path) if first_path else None
    size = -(-frame.height // writes)
    slices = [frame.slice(i, size) for i in range(0, frame.height, size)]
    if contender.startswith("polarstore"):
        import polarstore as ps

        if contender == "polarstore_no_stats":
            import polarstore._store

            polarstore._store.record_rows = _NoStatistics  # type: ignore[assignment]

        store = ps.FeatureStore(target)
        view = user_stats(10)  # the definition (the frame is not used)
        define_store(store, Workload(n=0, seed=SEED, spine=pl.DataFrame(), views=(view,)))
        if first is not None:
            store.write(VIEW, first)

        def run() -> Any:
            if writes == 1:
                return store.write(VIEW, frame)
            from polarstore._stats import settle

            versions = [store.write(VIEW, part) for part in slices]
            settle()
            return versions[-1]

        def finish(version: Any) -> dict[str, Any]:
            t0 = time.perf_counter()
            store.statistics(VIEW)
            seconds = time.perf_counter() - t0
            rows = store.read(VIEW).select(pl.len()).collect().item()
            return {
                "version": int(version),
                "rows": int(rows),
                "statistics_s": seconds,
                **_disk(Path(target) / "views"),
            }

        return run, finish

    from deltalake import DeltaTable, write_deltalake

    if first is not None:
        write_deltalake(target, first)

    def run_bare() -> Any:
        for part in slices:
            write_deltalake(target, part, mode="append")

    def finish_bare(_: Any) -> dict[str, Any]:
        table = DeltaTable(target)
        rows = pl.scan_delta(target).select(pl.len()).collect().item()
        return {"version": int(table.version()), "rows": int(rows), **_disk(Path(target))}

    return run_bare, finish_bare


def _disk(folder: Path) -> dict[str, Any]:
    files = [p for p in folder.rglob("*.parquet") if p.is_file()]
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


# --- the benchmark --------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    contender: str
    seconds: float
    cpu_seconds: float
    peak_mib: float
    delta_mib: float
    rows_per_s: float
    ratio: float | None  # polarstore rows/s / this contender's
    files: int
    mib_on_disk: float
    answer: str
    runs: list[float] = field(default_factory=list)
    statistics_s: float = float("nan")  # store.statistics() after the write (polarstore)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt(m: Measurement) -> str:
    if not m.ok:
        return f"FAILED: {m.error}"
    return (
        f"{m.seconds:.3f} s (cpu {m.cpu_seconds:.2f} s), peak {m.peak_rss / 2**20:.0f} MiB "
        f"(+{(m.peak_rss - m.base_rss) / 2**20:.0f}) {m.extra}"
    )


def run(args: argparse.Namespace, n: int, work: Path) -> list[Row]:
    t0 = time.perf_counter()
    frame = user_stats(n).frame
    k = max(int(n * FIRST), 1)
    first = user_stats(k, seed=SEED + 1).frame  # other rows: the table's earlier content
    data_path, first_path = work / "rows.parquet", work / "first.parquet"
    frame.write_parquet(data_path)
    first.write_parquet(first_path)
    del frame, first
    _log(f"generated {n:,} (+{k:,}) rows in {time.perf_counter() - t0:.2f} s")

    runs: dict[tuple[str, str], list[Measurement]] = {
        (case, c): [] for case in CASES for c in CONTENDERS
    }
    for i in range(args.repeat):
        for case, contender in runs:
            target = work / f"{contender}_{case.replace(' ', '_')}_{i}"
            m = run_task(
                "benchmarks.write:write_task",
                {
                    "contender": contender,
                    "data_path": str(data_path),
                    "target": str(target),
                    "first_path": str(first_path) if case == "existing table" else None,
                    "writes": BACK_TO_BACK if case == "back to back" else 1,
                },
            )
            runs[case, contender].append(m)
            _log(f"[{case}] run {i + 1}/{args.repeat} {contender}: {_fmt(m)}")
            shutil.rmtree(target, ignore_errors=True)  # fresh directories; keep the disk free

    rows: list[Row] = []
    for case in CASES:
        best = {c: summarize(runs[case, c]) for c in CONTENDERS}
        ps_m = best["polarstore"]
        for contender, m in best.items():
            if not m.ok:
                rows.append(Row(case, contender, *([float("nan")] * 5), None, 0, 0, m.error or ""))
                continue
            assert m.extra is not None
            want = n + (k if case == "existing table" else 0)
            answer = "ok" if m.extra["rows"] == want else f"{m.extra['rows']:,} rows, not {want:,}"
            ratio = m.seconds / ps_m.seconds if ps_m.ok else None  # = rows/s ratio
            rows.append(
                Row(
                    case=case,
                    contender=contender,
                    seconds=m.seconds,
                    cpu_seconds=m.cpu_seconds,
                    peak_mib=m.peak_rss / 2**20,
                    delta_mib=(m.peak_rss - m.base_rss) / 2**20,
                    rows_per_s=n / m.seconds,
                    ratio=ratio,
                    files=int(m.extra["files"]),
                    mib_on_disk=m.extra["bytes"] / 2**20,
                    answer=answer,
                    runs=[r.seconds for r in runs[case, contender]],
                    statistics_s=float(m.extra.get("statistics_s", float("nan"))),
                )
            )
    return rows


def render(rows: Sequence[Row], header: str) -> str:
    lines = [header, ""]
    lines.append(
        "| case | contender | best s | CPU s | peak RSS MiB | Δ RSS MiB | rows/s "
        "| polarstore / contender (rows/s) | target | files | MiB on disk | rows |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for r in rows:
        ratio = "–" if r.ratio is None else f"{r.ratio:.2f}"
        target, met = "", ""
        if r.contender == "write_deltalake" and r.ratio is not None:
            target = f">= {TARGET}"
            met = " yes" if r.ratio >= TARGET else " **MISSED**"
        lines.append(
            f"| {r.case} | {r.contender} | {r.seconds:.3f} | {r.cpu_seconds:.2f} | "
            f"{r.peak_mib:.0f} | {r.delta_mib:.0f} | {r.rows_per_s:,.0f} | {ratio} | "
            f"{target}{met} | {r.files} | {r.mib_on_disk:.1f} | {r.answer} |"
        )
    for case in CASES:
        by = {r.contender: r for r in rows if r.case == case}
        ps, bare = by.get("polarstore"), by.get("polarstore_no_stats")
        if ps is not None and bare is not None and ps.seconds == ps.seconds:
            cost, cpu = ps.seconds / bare.seconds - 1, ps.cpu_seconds / bare.cpu_seconds - 1
            met = "yes" if cost <= STATS_TARGET else "**MISSED**"
            lines.append(
                f"\n{case}: keeping statistics costs {cost:+.0%} wall ({cpu:+.0%} CPU) of the "
                f"write (target <= {STATS_TARGET:.0%}: {met}); statistics() after the write: "
                f"{ps.statistics_s:.3f} s"
            )
    return "\n".join(lines)


def _fmt_load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.write",
        description="store.write against a bare deltalake.write_deltalake of the same rows.",
    )
    parser.add_argument("--size", default="2M", help="rows: tiny (20k), 2M, 10M or a count")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per contender")
    parser.add_argument("--workdir", default=None, help="where the temporary folder goes")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be positive")

    n = parse_size(args.size)
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="polarstore_write_", dir=args.workdir))
    try:
        rows = run(args, n, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()

    import platform

    import deltalake

    header = (
        f"write --size {args.size}: {n:,} rows of user_stats (8 columns); best of {args.repeat} "
        f"fresh processes, fresh directories; deltalake {deltalake.__version__}, "
        f"polars {pl.__version__}, python {platform.python_version()}"
        f"\nload average (1, 5, 15 min) at start {_fmt_load(load_start)}, at end "
        f"{_fmt_load(load_end)}; {os.cpu_count()} cores"
    )
    if min(load_start[0], load_end[0]) > 0.5:
        header += " — other work was running: wall times are pessimistic"
    print(render(rows, header))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"size": args.size, "n": n, "rows": [asdict(r) for r in rows]}, indent=2)
        )
    return 0 if all(r.answer == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
