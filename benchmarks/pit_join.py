"""Point-in-time join benchmark: polarstore against naive Polars, DuckDB and pandas.

    python -m benchmarks.pit_join --size 2M              # tiny | 2M | 10M | a row count
    python -m benchmarks.pit_join --size 10M --no-pandas --layout compacted
    python -m benchmarks.pit_join --size 2M --tie-free --no-pandas   # + duckdb_plain
    python -m benchmarks.pit_join --size 2M --no-pandas --bitemporal  # + bitemporal=True

The workload (``benchmarks/_data.py``): two views of 100k users, ``n`` rows each, a spine of
``n // 10`` rows; 8 features requested (``user_stats:f0..f4``, ``user_profile:score, segment,
count``).

Layouts (how the rows reach the store; each a fresh repository in a temporary folder):

- ``bulk``: one write per view;
- ``appends``: 20 appends per view of shuffled rows;
- ``compacted``: the appends repository, then ``store.compact(view)`` for each view.

Contenders, each run ``--repeat`` times in a fresh process, round-robin (best time, max peak RSS):

- ``polarstore``: ``FeatureStore(path).get_historical_features(spine, features).collect()``.
  **Timed: the whole query including reading the Delta tables** (that is the product). Not
  timed: reading the spine from parquet, opening ``FeatureStore(path)``.
- ``naive_polars`` / ``duckdb_asof`` / ``pandas_merge_asof`` (``benchmarks/_peers.py``): given
  the rows in write order. **Not timed: loading them** (from parquet files written once from
  the write-order frames, which equal the stored rows: checked against ``store.read(view)``)
  and converting them to the peer's own format (pandas frames); timed: the join itself
  including its tie deduplication and restoring the spine order.

With ``--tie-free`` the workload has no two rows of a view with the same key and event time,
and ``duckdb_plain`` joins too: the plainest query a user would write on such data (``ASOF LEFT
JOIN`` + TTL ``CASE``, no tie dedupe), with polarstore's ratios to it printed at the end.

Every answer must equal polarstore's exactly (names, dtypes, row order, float bits); without
polarstore, naive_polars' answer is the reference. Time travel: polarstore with
``as_of={view: version}`` against the current query, checked against the expected answer.
With ``--bitemporal``, ``bitemporal=True`` against the current query in the same table: every
row was committed after every (2024) spine time, so its answer is all null — the work is not
less for that (every candidate row is read, given its known time and joined).
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

from benchmarks._data import (
    Workload,
    WritePlan,
    define_store,
    generate,
    parse_size,
    plan_writes,
    view_definitions,
    write_plan,
)
from benchmarks._harness import Measurement, run_task, summarize
from benchmarks._peers import PEERS, TIE_FREE_PEERS, compare_frames, naive_polars

LAYOUTS = ("bulk", "appends", "compacted")
TIME_TRAVEL_PREFIX = 10  # appends layout: as_of the version after 10 of the 20 appends

# --- tasks (run in a fresh process by benchmarks._harness) ----------------------------------


def polarstore_task(
    repo: str,
    spine_path: str,
    features: list[str],
    as_of: dict[str, int] | None = None,
    result_path: str | None = None,
    bitemporal: bool = False,
) -> tuple[Any, Any]:
    import polarstore as ps

    spine = pl.read_parquet(spine_path)  # not timed
    store = ps.FeatureStore(repo)  # not timed: opening the repository (registry read)

    def run() -> pl.DataFrame:
        # Timed: planning the query, reading the Delta tables, the join, collecting.
        return store.get_historical_features(
            spine, features, as_of=as_of, bitemporal=bitemporal
        ).collect()

    return run, _saver(result_path)


def peer_task(
    peer: str, spine_path: str, view_paths: dict[str, str], result_path: str | None = None
) -> tuple[Any, Any]:
    impl = (PEERS | TIE_FREE_PEERS)[peer]
    spine = pl.read_parquet(spine_path)  # not timed: loading
    views = [v.with_frame(pl.read_parquet(view_paths[v.name])) for v in view_definitions()]
    native = impl.prepare(spine, views)  # not timed: the peer's own input format
    del spine, views

    def run() -> Any:
        return impl.run(native)  # timed: the join

    def finish(result: Any) -> dict[str, Any]:
        return _saver(result_path)(impl.finish(result))

    return run, finish


def _saver(path: str | None) -> Any:
    def finish(df: pl.DataFrame) -> dict[str, Any]:
        if path:
            df.write_parquet(path)
        return {"rows": df.height}

    return finish


# --- the benchmark --------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    task: str
    args: dict[str, Any]
    result: Path  # where the first run saves its answer
    runs: list[Measurement] = field(default_factory=list)


@dataclass
class Row:
    table: str  # "join" or "time_travel"
    layout: str
    contender: str
    seconds: float
    cpu_seconds: float
    peak_mib: float
    delta_mib: float
    ratio: float | None
    answer: str
    note: str = ""


def _mib(n: int) -> float:
    return n / 2**20


def _polarstore_available() -> str | None:
    try:
        import polarstore

        polarstore.FeatureStore  # noqa: B018
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _check(result_path: Path, want: pl.DataFrame | None) -> str:
    if want is None:
        return "no reference"
    if not result_path.exists():
        return "no answer"
    problem = compare_frames(pl.read_parquet(result_path), want)
    return "equal" if problem is None else f"DIFFERS: {problem}"


class Bench:
    def __init__(self, args: argparse.Namespace, workload: Workload, work: Path) -> None:
        self.args = args
        self.wl = workload
        self.work = work
        self.rows: list[Row] = []
        self.spine_path = work / "spine.parquet"
        workload.spine.write_parquet(self.spine_path)
        self.plans: dict[str, WritePlan] = {}
        self.peer_inputs: dict[str, dict[str, str]] = {}
        self.peer_results: dict[str, dict[str, tuple[Measurement, Path]]] = {}
        self.stores: dict[str, Any] = {}
        self.no_polarstore = (
            "skipped (--peers-only)" if args.peers_only else _polarstore_available()
        )
        self.peers = [p for p in PEERS if not (args.no_pandas and p == "pandas_merge_asof")]
        if args.tie_free:
            self.peers += list(TIE_FREE_PEERS)

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # -- inputs

    def plan(self, key: str) -> WritePlan:
        if key not in self.plans:
            self.plans[key] = plan_writes(self.wl, key)  # type: ignore[arg-type]
        return self.plans[key]

    def peer_paths(self, key: str) -> dict[str, str]:
        """Write the rows in write order to parquet once per write order (peers' input)."""
        if key not in self.peer_inputs:
            folder = self.work / f"peer_input_{key}"
            folder.mkdir()
            paths = {}
            for name, frame in self.plan(key).frames.items():
                paths[name] = str(folder / f"{name}.parquet")
                frame.write_parquet(paths[name])
            self.peer_inputs[key] = paths
        return self.peer_inputs[key]

    def build_store(self, layout: str) -> Any:
        import polarstore as ps

        key = "bulk" if layout == "bulk" else "appends"
        if layout == "compacted" and "appends" in self.stores:
            store = self.stores.pop("appends")  # compact the appends repository in place
        else:
            repo = self.work / f"repo_{key}"
            store = ps.FeatureStore(str(repo))
            define_store(store, self.wl)
            t0 = time.perf_counter()
            write_plan(store, self.plan(key))
            writes = len(self.plan(key).chunks[self.wl.views[0].name])
            self.log(
                f"[{layout}] wrote {len(self.wl.views)} views x {writes} writes "
                f"in {time.perf_counter() - t0:.2f} s"
            )
            self._verify_stored(store, key)
        if layout == "compacted":
            t0 = time.perf_counter()
            for v in self.wl.views:
                store.compact(v.name)
            self.log(f"[compacted] compact() of every view in {time.perf_counter() - t0:.2f} s")
            self._verify_stored(store, key)
        self.stores[layout] = store
        return store

    def _verify_stored(self, store: Any, key: str) -> None:
        """The stored rows are exactly the rows written (as a multiset; order is not checked)."""
        for name, frame in self.plan(key).frames.items():
            cols = frame.columns
            got = store.read(name).collect().select(cols).sort(cols)
            problem = compare_frames(got, frame.sort(cols))
            if problem:
                msg = f"stored rows of {name} differ from the written rows: {problem}"
                raise RuntimeError(msg)

    # -- measurements

    def _peer_job(self, key: str, peer: str) -> Job:
        return Job(
            name=peer,
            task="benchmarks.pit_join:peer_task",
            args={
                "peer": peer,
                "spine_path": str(self.spine_path),
                "view_paths": self.peer_paths(key),
            },
            result=self.work / f"answer_{key}_{peer}.parquet",
        )

    def _polarstore_job(
        self, layout: str, name: str, as_of: dict[str, int] | None, *, bitemporal: bool = False
    ) -> Job:
        tag = "current" if as_of is None else "asof_" + "_".join(map(str, as_of.values()))
        tag += "_bitemporal" if bitemporal else ""
        return Job(
            name=name,
            task="benchmarks.pit_join:polarstore_task",
            args={
                "repo": str(self.work / f"repo_{'bulk' if layout == 'bulk' else 'appends'}"),
                "spine_path": str(self.spine_path),
                "features": self.wl.features,
                "as_of": as_of,
                "bitemporal": bitemporal,
            },
            result=self.work / f"answer_{layout}_polarstore_{tag}.parquet",
        )

    def _run_jobs(self, layout: str, jobs: list[Job]) -> None:
        """Round-robin: run 1 of every job, then run 2 of every job, ... so a change in the
        machine's load over time hits every contender alike. The first run saves the answer."""
        for i in range(self.args.repeat):
            for job in jobs:
                if job.runs and not job.runs[-1].ok:
                    continue
                extra = {"result_path": str(job.result)} if i == 0 else {}
                m = run_task(job.task, {**job.args, **extra})
                job.runs.append(m)
                self.log(f"[{layout}] run {i + 1}/{self.args.repeat} {job.name}: {_fmt_measure(m)}")

    def _time_travel_cases(self, layout: str) -> list[tuple[str, dict[str, int], str]]:
        """(label, as_of, what the answer must equal: "current" or "prefix")."""
        store = self.stores[layout]
        plan = self.plan("bulk" if layout == "bulk" else "appends")
        latest = {v.name: int(store.versions()[v.name]) for v in self.wl.views}
        cases = [(f"pinned latest {latest}", latest, "current")]
        if layout == "appends":
            older = {v.name: plan.versions[v.name][TIME_TRAVEL_PREFIX - 1] for v in self.wl.views}
            cases.append((f"after {TIME_TRAVEL_PREFIX}/20 appends {older}", older, "prefix"))
        if layout == "compacted":
            before = {v.name: plan.versions[v.name][-1] for v in self.wl.views}
            cases.append((f"before compact {before}", before, "current"))
        return cases

    def run_layout(self, layout: str) -> None:
        key = "bulk" if layout == "bulk" else "appends"
        if self.no_polarstore is None:
            try:
                self.build_store(layout)
            except Exception as exc:
                self.no_polarstore = f"building the {layout} repository failed: {exc!r}"
                self.log(self.no_polarstore)
        peer_jobs = [] if key in self.peer_results else [self._peer_job(key, p) for p in self.peers]
        ps_jobs: list[Job] = []
        cases: list[tuple[str, dict[str, int], str]] = []
        if self.no_polarstore is None:
            ps_jobs.append(self._polarstore_job(layout, "polarstore", None))
            cases = self._time_travel_cases(layout)
            ps_jobs += [self._polarstore_job(layout, f"as_of {c[0]}", c[1]) for c in cases]
            if self.args.bitemporal:
                cases.append(("bitemporal=True (current)", {}, "unknown"))
                ps_jobs.append(self._polarstore_job(layout, "bitemporal", None, bitemporal=True))
        self._run_jobs(layout, [*peer_jobs, *ps_jobs])
        if peer_jobs:
            self.peer_results[key] = {j.name: (summarize(j.runs), j.result) for j in peer_jobs}
        peers = self.peer_results[key]

        _, naive_path = peers["naive_polars"]
        naive_answer = pl.read_parquet(naive_path) if naive_path.exists() else None
        reference = naive_answer
        ps_m: Measurement | None = None
        if ps_jobs:
            ps_m = summarize(ps_jobs[0].runs)
            if ps_m.ok:
                reference = pl.read_parquet(ps_jobs[0].result)
                vs_naive = _check(ps_jobs[0].result, naive_answer)
                answer = f"reference; vs naive: {vs_naive}"
            else:
                answer = ps_m.error or "failed"
            self._add("join", layout, "polarstore", ps_m, ps_m if ps_m.ok else None, answer)
        note = "" if layout != "compacted" else "peers: same inputs as appends, measured once"
        for peer, (m, path) in peers.items():
            answer = _check(path, reference) if m.ok else (m.error or "failed")
            self._add("join", layout, peer, m, ps_m, answer, note)

        for (label, _, expect), job in zip(cases, ps_jobs[1:], strict=True):
            m = summarize(job.runs)
            want: pl.DataFrame | None
            if expect == "prefix":
                plan = self.plan(key)
                want = naive_polars(self.wl.spine, plan.prefix_views(self.wl, TIME_TRAVEL_PREFIX))
            elif expect == "unknown":
                # Every row was committed after every spine time (the spine is in 2024): none
                # was known then, so every feature is null; the work done is the same.
                want = None
                if ps_m is not None and ps_m.ok:
                    want = reference.with_columns(
                        pl.lit(None, reference.schema[f]).alias(f)
                        for f in _outputs(reference, self.wl.spine)
                    )
            else:
                want = reference if ps_m is not None and ps_m.ok else None
            answer = _check(job.result, want) if m.ok else (m.error or "failed")
            row = self._add("time_travel", layout, f"as_of {label}", m, None, answer)
            if m.ok and ps_m is not None and ps_m.ok:
                row.ratio = m.seconds / ps_m.seconds

    def _add(
        self,
        table: str,
        layout: str,
        contender: str,
        m: Measurement,
        ps: Measurement | None,
        answer: str,
        note: str = "",
    ) -> Row:
        ratio = ps.seconds / m.seconds if (ps is not None and ps.ok and m.ok) else None
        row = Row(
            table=table,
            layout=layout,
            contender=contender,
            seconds=m.seconds,
            cpu_seconds=m.cpu_seconds,
            peak_mib=_mib(m.peak_rss),
            delta_mib=_mib(m.peak_rss - m.base_rss),
            ratio=ratio,
            answer=answer,
            note=note,
        )
        self.rows.append(row)
        return row


def _outputs(answer: pl.DataFrame, spine: pl.DataFrame) -> list[str]:
    return [c for c in answer.columns if c not in spine.columns]


def _fmt_measure(m: Measurement) -> str:
    if not m.ok:
        return f"FAILED: {m.error}"
    return (
        f"{m.seconds:.3f} s (cpu {m.cpu_seconds:.2f} s), peak {_mib(m.peak_rss):.0f} MiB "
        f"(+{_mib(m.peak_rss - m.base_rss):.0f})"
    )


def _fmt_load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def _fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}"


def render(rows: Sequence[Row], header: str) -> str:
    lines = [header, ""]
    lines.append(
        "| layout | contender | best s | CPU s | peak RSS MiB | Δ RSS MiB "
        "| polarstore / contender | answer |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---|")
    for r in (r for r in rows if r.table == "join"):
        answer = r.answer + (f" ({r.note})" if r.note else "")
        lines.append(
            f"| {r.layout} | {r.contender} | {r.seconds:.3f} | {r.cpu_seconds:.2f} | "
            f"{r.peak_mib:.0f} | "
            f"{r.delta_mib:.0f} | {_fmt_ratio(r.ratio)} | {answer} |"
        )
    tt = [r for r in rows if r.table == "time_travel"]
    if tt:
        lines += ["", "Time travel (polarstore, `as_of={view: version}`):", ""]
        lines.append(
            "| layout | as_of | best s | CPU s | peak RSS MiB | Δ RSS MiB | as_of / current "
            "| answer |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---|")
        for r in tt:
            lines.append(
                f"| {r.layout} | {r.contender.removeprefix('as_of ')} | {r.seconds:.3f} | "
                f"{r.cpu_seconds:.2f} | "
                f"{r.peak_mib:.0f} | {r.delta_mib:.0f} | {_fmt_ratio(r.ratio)} | {r.answer} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pit_join",
        description="Point-in-time join: polarstore vs naive Polars, DuckDB, pandas.",
    )
    parser.add_argument("--size", default="2M", help="tiny (20k), 2M, 10M or rows per view")
    parser.add_argument("--layout", choices=[*LAYOUTS, "all"], default="all")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per contender")
    parser.add_argument("--no-pandas", action="store_true", help="skip pandas (slow at 10M)")
    parser.add_argument("--peers-only", action="store_true", help="skip polarstore")
    parser.add_argument("--workdir", default=None, help="where the temporary folder goes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument(
        "--bitemporal", action="store_true", help="also time bitemporal=True (time travel table)"
    )
    parser.add_argument(
        "--tie-free",
        action="store_true",
        help="no two rows of a view share (key, event time); adds duckdb_plain, the ASOF JOIN "
        "without tie dedupe that is correct only then",
    )
    args = parser.parse_args(argv)

    n = parse_size(args.size)
    layouts = list(LAYOUTS) if args.layout == "all" else [args.layout]
    t0 = time.perf_counter()
    wl = generate(n, dup_frac=0.0) if args.tie_free else generate(n)
    if args.tie_free:
        for v in wl.views:
            keys = [v.join_key, v.timestamp_field]
            if v.frame.select(pl.struct(keys).is_duplicated().any()).item():
                parser.error(f"--tie-free: {v.name} has rows sharing {keys}; try another size")
    print(
        f"generated {n:,} rows x {len(wl.views)} views, spine {wl.spine.height:,} rows "
        f"in {time.perf_counter() - t0:.2f} s",
        file=sys.stderr,
    )
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="polarstore_pit_join_", dir=args.workdir))
    bench = Bench(args, wl, work)
    if bench.no_polarstore:
        print(f"polarstore unavailable ({bench.no_polarstore}): peers only", file=sys.stderr)
    try:
        for layout in layouts:
            bench.run_layout(layout)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    import platform

    import duckdb
    import pandas

    header = (
        f"pit_join --size {args.size}: {n:,} rows per view x 2 views, spine "
        f"{wl.spine.height:,}, 8 features; best of {args.repeat} fresh processes; "
        f"polars {pl.__version__}, duckdb {duckdb.__version__}, pandas {pandas.__version__}, "
        f"python {platform.python_version()}"
    )
    load_end = os.getloadavg()
    header += (
        f"\nload average (1, 5, 15 min) at start {_fmt_load(load_start)}, at end "
        f"{_fmt_load(load_end)}; {os.cpu_count()} cores"
    )
    if min(load_start[0], load_end[0]) > 0.5:
        header += " — other work was running: wall times are pessimistic, see CPU s"
    if bench.no_polarstore:
        header += f"\n(polarstore unavailable: {bench.no_polarstore}; reference: naive_polars)"
    if args.tie_free:
        header += "\ntie-free data (no two rows of a view share key and event time)"
    print(render(bench.rows, header))
    plain = {r.layout: r.ratio for r in bench.rows if r.contender == "duckdb_plain"}
    if plain:
        print(
            "\npolarstore / duckdb_plain: "
            + ", ".join(f"{layout} {_fmt_ratio(ratio)}" for layout, ratio in plain.items())
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"size": args.size, "n": n, "rows": [asdict(r) for r in bench.rows]}, indent=2
            )
        )
    bad = [r for r in bench.rows if not (r.answer == "equal" or r.answer.startswith("reference"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
