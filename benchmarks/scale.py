"""Training sets larger than memory: 2 views x N rows, an N/10-row spine, the join to Parquet.

Three contenders write the same point-in-time training set to a Parquet file, each in a fresh
process whose peak RSS is read from ``/proc/self/status`` (``VmHWM``) and which is killed if
its RSS passes ``--max-rss``:

- ``polarstore``: what ``save_dataset(output=)`` and ``polarstore train-set`` run: the join
  in time slices of the spine (``polarstore._stream``), each slice reading only its window's
  view rows, streamed into the file;
- ``polarstore-plain``: ``get_historical_features(spine, features).sink_parquet(out)``, one
  lazy query (Polars' as-of join then holds every view row in the spine's time range);
- ``duckdb``: one ``ASOF LEFT JOIN`` per view over the views' Parquet files, TTL as CASE
  nulling, ``ORDER BY`` the spine row, ``COPY ... TO out``, with ``memory_limit`` and a
  ``temp_directory`` so that it spills to disk instead of failing;
- ``naive``: the hand-written Polars pipeline (``benchmarks._peers.naive_polars``: sort each
  view, dedupe ties, ``join_asof``) collected in memory, then ``write_parquet``.

Usage::

    python -m benchmarks.scale build /tmp/scale --size 10M    # the repository + spine
    python -m benchmarks.scale run /tmp/scale                 # the three, side by side
    python -m benchmarks.scale s3 /tmp/scale3 --size 2M       # the workflow: S3 vs a folder
    /usr/bin/time -v python -m benchmarks.scale join /tmp/scale   # collect() in memory, timed

The data arrives as a feature pipeline delivers it: ``--chunks`` appends per view, each
covering the next slice of the 90 days (so the files do not overlap in time), 100k entities,
microsecond event times, 5 + 3 features; it is generated chunk by chunk, so building it needs
about one chunk of memory. The workload has no exact ties (random microseconds), so DuckDB's
plain ASOF join (which picks an arbitrary row of a tie) is correct on it; the answers of the
three are compared (``--check``) on a sample of rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

START = datetime(2024, 1, 1, tzinfo=timezone.utc)
SPAN_US = 90 * 86_400 * 1_000_000
N_ENTITIES = 100_000
SEGMENTS = [f"seg_{i:02d}" for i in range(20)]
STATS_TTL = timedelta(days=7)
PROFILE_TTL = timedelta(days=30)
FEATURES = [
    *(f"user_stats:f{i}" for i in range(5)),
    "user_profile:score",
    "user_profile:segment",
    "user_profile:count",
]
_MARK = "__SCALE__ "


def parse_size(text: str) -> int:
    t = text.strip().replace("_", "").upper()
    mult = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}.get(t[-1:], 1)
    return int(float(t.rstrip("KMG")) * mult)


def _definitions() -> list[Any]:
    import polarstore as ps

    user = ps.Entity("user", join_keys="user_id")
    stats = ps.FeatureView(
        "user_stats",
        entities=[user],
        schema={f"f{i}": pl.Float64 for i in range(5)},
        created_timestamp_field="created",
        ttl=STATS_TTL,
    )
    profile = ps.FeatureView(
        "user_profile",
        entities=[user],
        schema={"score": pl.Float64, "segment": pl.String, "count": pl.Int64},
        ttl=PROFILE_TTL,
    )
    return [user, stats, profile]


def _chunk(n: int, k: int, chunks: int, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Rows ``k`` of ``chunks`` of both views: event times in the k-th slice of the span."""
    rng = np.random.default_rng(seed * 1000 + k)
    lo, hi = SPAN_US * k // chunks, SPAN_US * (k + 1) // chunks
    start_us = (START - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)

    def times(size: int) -> pl.Series:
        us = rng.integers(lo, hi, size) + start_us
        return pl.Series("event_timestamp", us).cast(pl.Datetime("us", "UTC"))

    ts = times(n)
    stats = pl.DataFrame(
        {
            "user_id": rng.integers(0, N_ENTITIES, n),
            "event_timestamp": ts,
            "created": ts + pl.Series(rng.integers(0, 3_600_000_000, n)).cast(pl.Duration("us")),
            **{f"f{i}": rng.random(n) for i in range(5)},
        }
    )
    profile = pl.DataFrame(
        {
            "user_id": rng.integers(0, N_ENTITIES, n),
            "event_timestamp": times(n),
            "score": rng.random(n),
            "segment": pl.Series(rng.integers(0, len(SEGMENTS), n)).replace_strict(
                dict(enumerate(SEGMENTS)), return_dtype=pl.String
            ),
            "count": rng.integers(0, 1000, n),
        }
    )
    return stats, profile


def _spine(n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    start_us = (START - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
    return pl.DataFrame(
        {
            "user_id": rng.integers(0, int(N_ENTITIES * 1.01), n),  # ~1% unknown ids
            "event_timestamp": pl.Series(rng.integers(0, SPAN_US, n) + start_us).cast(
                pl.Datetime("us", "UTC")
            ),
            "label": rng.integers(0, 2, n),
        }
    )


def build(
    root: Path,
    n: int,
    chunks: int,
    *,
    uri: str | None = None,
    options: dict[str, str] | None = None,
) -> float:
    """Write the repository (at ``uri`` or ``root/repo``) and ``root/spine.parquet``."""
    import polarstore as ps

    root.mkdir(parents=True, exist_ok=True)
    store = ps.FeatureStore(uri or root / "repo", storage_options=options)
    store.apply(_definitions())
    started = time.perf_counter()
    sizes = [n // chunks + (1 if k < n % chunks else 0) for k in range(chunks)]
    for k, size in enumerate(sizes):
        stats, profile = _chunk(size, k, chunks, seed=20_240_101)
        store.write("user_stats", stats)
        store.write("user_profile", profile)
        del stats, profile
    seconds = time.perf_counter() - started
    _spine(n // 10, seed=7).write_parquet(root / "spine.parquet")
    return seconds


# --- the contenders (each runs in a process of its own) --------------------------------------


def _polarstore(
    root: Path,
    out: Path,
    uri: str | None,
    options: dict[str, str] | None,
    *,
    plain: bool,
    slice_rows: int | None = None,
) -> None:
    import polarstore as ps
    from polarstore._stream import sink_training_set

    store = ps.FeatureStore(uri or root / "repo", storage_options=options)
    spine = pl.read_parquet(root / "spine.parquet")
    if plain:  # one lazy query: Polars holds the views' rows in the spine's time range
        store.get_historical_features(spine, FEATURES).sink_parquet(out)
    else:  # what save_dataset(output=) and `polarstore train-set` do: spine time slices
        sink_training_set(
            store, spine, FEATURES, out, **({"slice_rows": slice_rows} if slice_rows else {})
        )


def _view_files(root: Path, view: str) -> list[str]:
    """The current files of the view's Delta table (every write was an append: all of them)."""
    from deltalake import DeltaTable

    return [str(p) for p in DeltaTable(str(root / "repo" / "views" / view)).file_uris()]


def _duckdb(root: Path, out: Path, memory_limit: str) -> None:
    import duckdb

    spill = Path(tempfile.mkdtemp(prefix="duckdb-spill-", dir=root))
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("SET enable_progress_bar = false")
        con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute(f"SET temp_directory = '{spill}'")
        con.execute("SET preserve_insertion_order = false")

        def files(view: str) -> str:
            return "[" + ", ".join(f"'{p}'" for p in _view_files(root, view)) + "]"

        stats = [f"f{i}" for i in range(5)]
        profile = ["score", "segment", "count"]
        ttl1, ttl2 = (t // timedelta(microseconds=1) for t in (STATS_TTL, PROFILE_TTL))
        select = ", ".join(
            [
                "s.user_id",
                "s.event_timestamp",
                "s.label",
                *(
                    f"CASE WHEN a.event_timestamp >= s.event_timestamp - to_microseconds({ttl1}) "
                    f"THEN a.{f} END AS {f}"
                    for f in stats
                ),
                *(
                    f"CASE WHEN b.event_timestamp >= s.event_timestamp - to_microseconds({ttl2}) "
                    f'THEN b."{f}" END AS "{f}"'
                    for f in profile
                ),
            ]
        )
        spine = str(root / "spine.parquet")
        sql = (
            f"COPY (SELECT {select} FROM "
            f"(SELECT *, row_number() OVER () AS r FROM read_parquet('{spine}')) s "
            f"ASOF LEFT JOIN (SELECT user_id, event_timestamp, {', '.join(stats)} "
            f"FROM read_parquet({files('user_stats')})) a "
            "ON s.user_id = a.user_id AND s.event_timestamp >= a.event_timestamp "
            f'ASOF LEFT JOIN (SELECT user_id, event_timestamp, score, segment, "count" '
            f"FROM read_parquet({files('user_profile')})) b "
            "ON s.user_id = b.user_id AND s.event_timestamp >= b.event_timestamp "
            f"ORDER BY s.r) TO '{out}' (FORMAT parquet)"
        )
        con.execute(sql)
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def _naive(root: Path, out: Path) -> None:
    """The hand-written Polars pipeline of benchmarks._peers, collected in memory."""
    spine = pl.read_parquet(root / "spine.parquet").with_row_index("__row")
    joined = spine.lazy().sort("event_timestamp")
    for view, ttl, created, features in (
        ("user_stats", STATS_TTL, ["created"], [f"f{i}" for i in range(5)]),
        ("user_profile", PROFILE_TTL, [], ["score", "segment", "count"]),
    ):
        right = (
            pl.scan_parquet(_view_files(root, view))
            .select("user_id", "event_timestamp", *created, "_polarstore_seq", *features)
            .sort(["user_id", "event_timestamp", *created, "_polarstore_seq"])
            .unique(subset=["user_id", "event_timestamp"], keep="last", maintain_order=True)
            .select("user_id", "event_timestamp", *features)
        )
        joined = joined.join_asof(
            right, on="event_timestamp", by="user_id", tolerance=ttl, check_sortedness=False
        )
    joined.sort("__row").drop("__row").collect().write_parquet(out)


def peer(name: str, root: Path, out: Path, extra: dict[str, Any]) -> None:
    """Run one contender in this process; print its time and peak RSS as one JSON line."""
    started = time.perf_counter()
    if name in ("polarstore", "polarstore-plain"):
        plain = name == "polarstore-plain"
        _polarstore(
            root,
            out,
            extra.get("uri"),
            extra.get("options"),
            plain=plain,
            slice_rows=extra.get("slice_rows"),
        )
    elif name == "duckdb":
        _duckdb(root, out, extra.get("memory_limit", "8GB"))
    else:
        _naive(root, out)
    seconds = time.perf_counter() - started
    print(_MARK + json.dumps({"seconds": seconds, "peak_rss": _vmhwm()}), flush=True)


def _vmhwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(name: str, root: Path, out: Path, max_rss: int, **extra: Any) -> dict[str, Any]:
    """Run ``peer`` in a fresh process, killed if its RSS passes ``max_rss``."""
    cwd = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{cwd}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = json.dumps({"name": name, "root": str(root), "out": str(out), "extra": extra})
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.scale", "_peer", args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )
    seen, killed = 0, False
    while proc.poll() is None:
        seen = max(seen, _rss(proc.pid))
        if seen > max_rss:
            proc.kill()
            killed = True
            break
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    if killed:
        return {"error": f"killed: RSS passed {max_rss / 2**30:.1f} GiB", "peak_rss": seen}
    for line in stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])  # type: ignore[no-any-return]
    tail = " | ".join(stderr.strip().splitlines()[-3:])
    return {"error": f"exit {proc.returncode}: {tail}", "peak_rss": seen}


def _check(outs: dict[str, Path]) -> None:
    """The contenders' answers agree (a 1M-row sample of positions, every column)."""
    ref_name, ref_path = next(iter(outs.items()))
    n = pl.scan_parquet(ref_path).select(pl.len()).collect().item()
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(n, size=min(n, 1_000_000), replace=False))
    ref = pl.read_parquet(ref_path).with_row_index("i").filter(pl.col("i").is_in(rows))
    for name, path in list(outs.items())[1:]:
        got = pl.read_parquet(path).with_row_index("i").filter(pl.col("i").is_in(rows))
        same = got.equals(ref.select(got.columns))
        print(f"  check: {name} == {ref_name} on {len(rows):,} sampled rows: {same}")


def run(
    root: Path, peers: Sequence[str], max_rss: int, check: bool, slice_rows: int | None
) -> None:
    spine_rows = pl.scan_parquet(root / "spine.parquet").select(pl.len()).collect().item()
    print(
        f"spine {spine_rows:,} rows x {len(FEATURES)} features -> parquet; max RSS "
        f"{max_rss / 2**30:.0f} GiB per contender, {os.cpu_count()} cores"
    )
    results, outs = {}, {}
    for name in peers:
        out = root / f"out-{name}.parquet"
        out.unlink(missing_ok=True)
        results[name] = measure(name, root, out, max_rss, slice_rows=slice_rows)
        if "error" not in results[name]:
            outs[name] = out
    base = results.get("polarstore", {})
    print(f"{'contender':<12} {'seconds':>9} {'peak RSS':>10} {'time ratio':>11}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<12} {'-':>9} {r['peak_rss'] / 2**30:>8.2f} G  {r['error']}")
            continue
        ratio = r["seconds"] / base["seconds"] if "seconds" in base else float("nan")
        print(f"{name:<12} {r['seconds']:>9.2f} {r['peak_rss'] / 2**30:>8.2f} G {ratio:>10.2f}x")
    if check and len(outs) > 1:
        _check(outs)
    for out in outs.values():
        out.unlink(missing_ok=True)


def s3(root: Path, n: int, chunks: int, max_rss: int) -> None:
    """The same workflow (build, then the join to Parquet) on a local S3 server and a folder."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests._s3server import s3_server

    print(f"workflow: 2 views x {n:,} rows in {chunks} appends each, then the join to parquet")
    with s3_server() as server:
        uri = f"s3://{server.bucket()}/repo"
        cache = tempfile.mkdtemp()
        os.environ["POLARSTORE_CACHE"] = cache
        rows = []
        for where, target in (("folder", None), ("s3 (moto)", uri)):
            sub = root / ("folder" if target is None else "s3")
            shutil.rmtree(sub, ignore_errors=True)
            write = build(sub, n, chunks, uri=target, options=server.options() if target else None)
            out = sub / "out.parquet"
            extra = {"uri": target, "options": server.options()} if target else {}
            joined = measure("polarstore", sub, out, max_rss, **extra)
            rows.append((where, write, joined))
        shutil.rmtree(cache, ignore_errors=True)
    print(f"{'repository':<12} {'write s':>8} {'join s':>8} {'join peak':>10}")
    for where, write, joined in rows:
        print(
            f"{where:<12} {write:>8.2f} {joined.get('seconds', float('nan')):>8.2f} "
            f"{joined['peak_rss'] / 2**30:>8.2f} G {joined.get('error', '')}"
        )


def join(root: Path) -> None:
    """``get_historical_features(...).collect()`` in memory, timed (run under time -v)."""
    import polarstore as ps

    spine = pl.read_parquet(root / "spine.parquet")
    store = ps.FeatureStore(root / "repo")
    started = time.perf_counter()
    out = store.get_historical_features(spine, FEATURES).collect()
    print(f"joined {spine.height:,} spine rows x {len(FEATURES)} features: {out.shape} ")
    print(f"in {time.perf_counter() - started:.2f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["build", "run", "join", "s3", "_peer"])
    parser.add_argument("root")
    parser.add_argument("--size", default="10M", help="rows per view (10M, 100M, 2.5M, ...)")
    parser.add_argument("--chunks", type=int, default=10, help="appends per view")
    parser.add_argument("--peers", default="polarstore,polarstore-plain,duckdb,naive")
    parser.add_argument("--max-rss", default="12", help="GiB; a contender above is killed")
    parser.add_argument("--slice-rows", default=None, help="spine rows per slice (2.5M)")
    parser.add_argument("--no-check", action="store_true", help="skip comparing the answers")
    args = parser.parse_args(argv)
    max_rss = int(float(args.max_rss) * 2**30)
    if args.step == "_peer":
        spec = json.loads(args.root)
        peer(spec["name"], Path(spec["root"]), Path(spec["out"]), spec["extra"])
        return 0
    root = Path(args.root)
    if args.step == "build":
        n = parse_size(args.size)
        seconds = build(root, n, args.chunks)
        print(f"wrote 2 views x {n:,} rows ({args.chunks} appends each) in {seconds:.1f} s")
    elif args.step == "join":  # the core issue's check: the join collected in memory
        join(root)
    elif args.step == "run":
        slices = parse_size(args.slice_rows) if args.slice_rows else None
        run(root, args.peers.split(","), max_rss, not args.no_check, slices)
    else:
        s3(root, parse_size(args.size), args.chunks, max_rss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
