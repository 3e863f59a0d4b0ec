"""statistics(view, as_of=): per-feature statistics that time-travel, held to an exact reference.

Every check compares ``statistics(as_of=v)`` with ``reference.feature_statistics`` of the rows
``read(as_of=v)`` returns: counts, moments and extremes exactly, quantiles by their rank error,
distinct counts within 2%. Histories mix writes, deletes, compactions, a feature added later
and a purge; summaries may be missing or damaged (they are a cache of the data files).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from polarstore import Entity, FeatureStore, FeatureView, NotFoundError

from .conftest import T0
from .reference import feature_statistics, hll_registers

RANK_ERROR = 0.008  # the documented bound (docs/contract.md, "Statistics, drift and checks")
USER = Entity("user", join_keys="user_id")
SCHEMA: dict[str, Any] = {
    "clicks": pl.Int64,
    "spend": pl.Float64,
    "tier": pl.String,
    "active": pl.Boolean,
}
VIEW = FeatureView("activity", entities=[USER], schema=SCHEMA)


def check(store: FeatureStore, view: str, as_of: Any = None) -> None:
    """statistics(view, as_of) against the exact reference of read(view, as_of)."""
    got = {r["feature"]: r for r in store.statistics(view, as_of=as_of).iter_rows(named=True)}
    rows = store.read(view, as_of=as_of).collect()
    definition = store.get_feature_view(view)
    assert list(got) == list(definition.schema)
    for name, dtype in definition.schema.items():
        values = rows[name].to_list()
        if dtype == pl.Boolean:
            values = [None if v is None else str(v).lower() for v in values]
        ref = feature_statistics(values)
        row = got[name]
        assert row["count"] == ref["count"], name
        assert row["null_count"] == ref["null_count"], name
        assert_distinct(row["n_unique"], ref["n_unique"], name)
        if dtype in (pl.String, pl.Boolean):
            assert all(row[c] is None for c in ("mean", "std", "min", "p50", "max"))
            want = sorted(ref["counts"].items(), key=lambda kv: (-kv[1], kv[0]))[:10]
            assert [(t["value"], t["count"]) for t in row["top_values"] or []] == want, name
            continue
        assert row["top_values"] is None
        assert (row["min"], row["max"]) == (ref["min"], ref["max"]), name
        assert close(row["mean"], ref["mean"]), name
        assert close(row["std"], ref["std"]), name
        for rank in (0.25, 0.5, 0.75):
            assert_rank(row[f"p{int(rank * 100)}"], ref["sorted"], rank, name)


def close(a: float | None, b: float | None) -> bool:
    return (a is None) == (b is None) and (
        a is None or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    )  # type: ignore[arg-type]


def assert_distinct(got: int | None, want: int, name: str) -> None:
    # HyperLogLog: within 2%; below ~1,000 values collisions are rare, and cost one value each.
    assert got is not None, name
    assert abs(got - want) <= max(1, 0.02 * want), (name, got, want)


def assert_rank(q: float | None, ordered: list[float], rank: float, name: str) -> None:
    """``q`` is a ``rank`` quantile of ``ordered`` within the documented rank error."""
    if not ordered:
        assert q is None
        return
    n = len(ordered)
    below = np.searchsorted(ordered, q, side="left") / n  # fraction < q
    upto = np.searchsorted(ordered, q, side="right") / n  # fraction <= q
    assert below <= rank + RANK_ERROR, (name, q, rank, below)
    assert upto >= rank - RANK_ERROR, (name, q, rank, upto)


# --- hypothesis: histories of writes, deletes and compactions --------------------------------

floats = st.one_of(
    st.none(),
    st.just(float("nan")),
    st.integers(-50, 50).map(lambda i: i / 4),
    st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: x != 0.0),
)
row = st.fixed_dictionaries(
    {
        "user_id": st.integers(0, 4),
        "us": st.integers(0, 2_000),  # microseconds: many rows inside one millisecond, ties
        "clicks": st.one_of(st.none(), st.integers(-(2**40), 2**40), st.integers(0, 3)),
        "spend": floats,
        "tier": st.one_of(st.none(), st.sampled_from(["gold", "silver", "", "ünï"])),
        "active": st.one_of(st.none(), st.booleans()),
    }
)
step = st.one_of(
    st.tuples(st.just("write"), st.lists(row, min_size=0, max_size=25)),
    st.tuples(st.just("delete"), st.integers(0, 4)),
    st.tuples(st.just("compact"), st.none()),
)


def frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [r["user_id"] for r in rows],
            "event_timestamp": [T0 + timedelta(microseconds=r["us"]) for r in rows],
            **{name: [r[name] for r in rows] for name in SCHEMA},
        },
        schema={"user_id": pl.Int64, "event_timestamp": pl.Datetime("us"), **SCHEMA},
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=st.lists(row, min_size=1, max_size=25), steps=st.lists(step, max_size=5))
def test_statistics_match_the_reference_at_every_version(
    tmp_path_factory: pytest.TempPathFactory, first: list[dict[str, Any]], steps: list[Any]
) -> None:
    store = FeatureStore(tmp_path_factory.mktemp("repo"))
    store.apply([USER, VIEW])
    versions = [store.write("activity", frame(first))]
    for op, arg in steps:
        if op == "write":
            versions.append(store.write("activity", frame(arg)))
        elif op == "delete":
            versions.append(store.delete_entities("activity", {"user_id": arg}))
        elif store.read("activity").collect().height:
            versions.append(store.compact("activity"))
    for version in sorted(set(versions)):
        check(store, "activity", as_of=version)
    check(store, "activity")


# --- time travel, evolution and the summaries themselves -------------------------------------


def batch(users: list[int], clicks: list[int | None], tiers: list[str | None]) -> pl.DataFrame:
    n = len(users)
    return pl.DataFrame(
        {
            "user_id": users,
            "event_timestamp": [T0 + timedelta(hours=i) for i in range(n)],
            "clicks": clicks,
            "spend": [float(c) if c is not None else None for c in clicks],
            "tier": tiers,
            "active": [c is not None and c % 2 == 0 for c in clicks],
        },
        schema={"user_id": pl.Int64, "event_timestamp": pl.Datetime("us"), **SCHEMA},
    )


@pytest.fixture
def activity(store: FeatureStore) -> FeatureStore:
    store.apply([USER, VIEW])
    store.write("activity", batch([1, 2, 3], [1, 2, None], ["a", "b", None]))
    store.write("activity", batch([1, 4], [10, 20], ["a", "c"]))
    return store


def stats_folder(store: FeatureStore, view: str = "activity") -> Path:
    return store.path / ".polarstore" / "stats" / view


def test_as_of_a_version_a_pin_or_a_moment(activity: FeatureStore) -> None:
    history = activity.history("activity")
    first_commit = history["timestamp"][0]
    by_version = activity.statistics("activity", as_of=0)
    assert by_version["count"].to_list() == [2, 2, 2, 3]
    assert activity.statistics("activity", as_of={"activity": 0}).equals(by_version)
    assert activity.statistics("activity", as_of=first_commit).equals(by_version)
    empty = activity.statistics("activity", as_of=first_commit - timedelta(seconds=1))
    assert empty["count"].to_list() == [0, 0, 0, 0]
    assert empty["null_count"].sum() == 0
    assert activity.statistics("activity")["count"].to_list() == [4, 4, 4, 5]
    with pytest.raises(NotFoundError, match="no version 7"):
        activity.statistics("activity", as_of=7)


def test_a_pin_for_another_view_only_is_refused(activity: FeatureStore) -> None:
    with pytest.raises(Exception, match="pins no version of view 'activity'"):
        activity.statistics("activity", as_of={"other": 0})


def test_a_feature_added_later_counts_the_old_rows_as_null(activity: FeatureStore) -> None:
    wider = FeatureView("activity", entities=[USER], schema={**SCHEMA, "score": pl.Float64})
    activity.apply(wider)
    new = batch([5], [7], ["a"]).with_columns(score=pl.lit(0.5))
    activity.write("activity", new)
    check(activity, "activity")
    score = activity.statistics("activity").row(4, named=True)
    assert (score["feature"], score["count"], score["null_count"]) == ("score", 1, 5)


def test_missing_or_damaged_summaries_are_rebuilt_from_the_files(activity: FeatureStore) -> None:
    before = activity.statistics("activity")
    files = sorted(stats_folder(activity).iterdir())
    assert len(files) == 2  # one per data file
    files[0].unlink()
    files[1].write_text("{not json")
    assert activity.statistics("activity").equals(before)
    assert len(list(stats_folder(activity).iterdir())) == 2  # written back
    check(activity, "activity", as_of=0)


def test_compaction_merges_summaries_without_reading(activity: FeatureStore) -> None:
    before = activity.statistics("activity")
    version = activity.compact("activity")
    assert len(list(stats_folder(activity).iterdir())) == 3  # the compacted file's, at once
    assert activity.statistics("activity", as_of=version).equals(before)
    check(activity, "activity")


def test_a_purge_leaves_no_summary_holding_deleted_values(activity: FeatureStore) -> None:
    activity.write("activity", batch([9], [12345], ["forget-me"]))
    activity.delete_entities("activity", {"user_id": 9})
    check(activity, "activity")
    assert any("forget-me" in p.read_text() for p in stats_folder(activity).iterdir())
    activity.vacuum(retention=timedelta(0), force=True)
    assert not any("forget-me" in p.read_text() for p in stats_folder(activity).iterdir())
    check(activity, "activity")


def test_large_batches_keep_quantile_and_distinct_error_bounds(store: FeatureStore) -> None:
    view = FeatureView("big", entities=[USER], schema={"x": pl.Float64, "k": pl.Int64})
    store.apply([USER, view])
    rng = np.random.default_rng(7)
    parts = [rng.normal(0, 1, 150_000), rng.exponential(3, 200_000), rng.normal(5, 1, 5_000)]
    for i, x in enumerate(parts):  # two sampled batches and one kept whole
        n = x.size
        store.write(
            "big",
            pl.DataFrame(
                {
                    "user_id": rng.integers(0, 1000, n),
                    "event_timestamp": [datetime(2024, 1, 1 + i, tzinfo=timezone.utc)] * n,
                    "x": x,
                    "k": rng.integers(0, 50_000, n),
                }
            ),
        )
    got = {r["feature"]: r for r in store.statistics("big").iter_rows(named=True)}
    everything = np.sort(np.concatenate(parts))
    for rank in (0.25, 0.5, 0.75):
        assert_rank(got["x"][f"p{int(rank * 100)}"], everything.tolist(), rank, "x")
    assert got["x"]["count"] == everything.size
    assert math.isclose(got["x"]["mean"], everything.mean(), rel_tol=1e-9)
    assert math.isclose(got["x"]["std"], everything.std(ddof=1), rel_tol=1e-9)
    exact_k = store.read("big").select(pl.col("k").n_unique()).collect().item()
    assert_distinct(got["k"]["n_unique"], exact_k, "k")
    assert_distinct(got["x"]["n_unique"], everything.size, "x")


# --- freshness and the command line ------------------------------------------------------------


def test_describe_shows_freshness(activity: FeatureStore) -> None:
    info = activity.describe("activity")
    latest = T0.replace(tzinfo=timezone.utc) + timedelta(hours=2)
    assert info["latest_event_time"] == latest
    lag = info["freshness_lag"]
    assert isinstance(lag, timedelta)
    assert abs((datetime.now(timezone.utc) - latest) - lag) < timedelta(minutes=5)
    assert info["materialized_version"] is None
    activity.materialize()
    info = activity.describe("activity")
    assert info["materialized_version"] == 1
    assert info["materialized_at"] is not None


def cli(*args: str | Path) -> str:
    from click.testing import CliRunner

    from polarstore._cli import cli as group

    result = CliRunner(env={"COLUMNS": "250"}).invoke(group, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_cli_stats_and_ls_freshness(activity: FeatureStore) -> None:
    out = cli("--repo", activity.path, "stats", "activity")
    assert "Statistics of activity" in out
    assert "a=2, b=1, c=1" in out  # top values of tier, as value=count
    assert "Statistics of activity as of 0" in cli(
        "--repo", activity.path, "stats", "activity", "--as-of", "0"
    )
    moment = activity.history("activity")["timestamp"][0].isoformat()
    assert "as of" in cli("--repo", activity.path, "stats", "activity", "--as-of", moment)
    listing = cli("--repo", activity.path, "ls")
    assert "latest event" in listing
    assert "2024-01-01 02:00:00+00:00" in listing
    assert "materialized" in listing


def test_cli_stats_refuses_a_bad_as_of(activity: FeatureStore) -> None:
    from click.testing import CliRunner

    from polarstore._cli import cli as group

    result = CliRunner().invoke(
        group, ["--repo", str(activity.path), "stats", "activity", "--as-of", "soon"]
    )
    assert result.exit_code == 2
    assert "'soon' is not a date or time" in result.stderr


def test_a_failing_summary_never_fails_a_committed_write(
    activity: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import polarstore._stats as stats

    real, calls = stats.summarize, []

    def broken(*args: Any) -> Any:
        calls.append(1)
        if len(calls) <= 2:  # the write's thread and its fallback
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(stats, "summarize", broken)
    assert activity.write("activity", batch([7], [3], ["z"])) == 2
    stats.settle()  # the summary is stored after the write returns
    assert len(calls) == 2
    check(activity, "activity")  # the new file is summarised from its rows


@pytest.mark.parametrize(
    "values",
    [
        np.arange(200_000) / 4.0,  # quarter steps: structured mantissas
        2.0 ** np.arange(-1000, 1000),  # powers of two: mantissa bits all zero
        np.arange(300_000, dtype=np.int64) * 1_000_000,  # whole seconds as microseconds
        np.repeat(np.arange(5_000, dtype=np.int64), 40),  # few values, many repeats
    ],
    ids=["quarters", "powers_of_two", "seconds", "repeats"],
)
def test_distinct_counts_of_structured_values(store: FeatureStore, values: np.ndarray) -> None:
    dtype = pl.Float64 if values.dtype.kind == "f" else pl.Int64
    view = FeatureView("v", entities=[USER], schema={"x": dtype})
    store.apply([USER, view])
    n = values.size
    store.write(
        "v",
        pl.DataFrame(
            {"user_id": np.zeros(n, dtype=np.int64), "event_timestamp": [T0] * n, "x": values}
        ),
    )
    got = store.statistics("v")["n_unique"][0]
    assert_distinct(got, np.unique(values).size, "x")


# --- the HyperLogLog registers, against one value at a time -----------------------------------

P = 14
# Hashes as drawn (mix=False: how string digests are fed) near the edges of a rank: a register
# index (the low bits; the last register is where 2^64 - 1 lands) under high bits of every
# length, all ones or all zeros below their top bit, or random.
edge_hash = st.builds(
    lambda bits, fill, register: ((fill % (1 << bits)) << P | register) % 2**64,
    st.integers(0, 64 - P),
    st.one_of(st.integers(0, 2**64), st.sampled_from([0, 2**64 - 1, 2**63])),
    st.one_of(st.sampled_from([0, 1, (1 << P) - 1]), st.integers(0, (1 << P) - 1)),
)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.one_of(edge_hash, st.integers(0, 2**64 - 1)), max_size=300),
    mix=st.booleans(),
)
@example(values=[2**64 - 1], mix=False)  # alone in the last register: rank 1, not "empty"
@example(values=[2**64 - 1000, 2**63 + 5], mix=False)  # a float would round it to 2^64
def test_registers_match_the_reference(values: list[int], mix: bool) -> None:
    import polarstore._stats as stats

    got = stats._registers(np.array(values, dtype=np.uint64), mix=mix)
    assert got.tolist() == hll_registers(values, P, mix=mix)


def test_registers_of_many_chunks_match_the_reference() -> None:
    import polarstore._stats as stats

    values = np.random.default_rng(3).integers(0, 2**63, 100_000, dtype=np.int64).view(np.uint64)
    values[::7] = np.arange(values[::7].size)  # structured values too
    got = stats._registers(values)  # chunks of 2^15 values: the last one is short
    assert got.tolist() == hll_registers(values.tolist(), P)


def test_minus_zero_is_zero_and_every_nan_one_value(store: FeatureStore) -> None:
    view = FeatureView("z", entities=[USER], schema={"x": pl.Float64, "y": pl.Float32})
    store.apply([USER, view])
    x = [0.0, -0.0, 1.0, float("nan"), -float("nan"), -0.0, None]
    store.write(
        "z",
        pl.DataFrame(
            {"user_id": [1] * 7, "event_timestamp": [T0] * 7, "x": x, "y": x},
            schema_overrides={"x": pl.Float64, "y": pl.Float32},
        ),
    )
    got = store.statistics("z")
    assert got["n_unique"].to_list() == [3, 3]  # 0, 1 and NaN: three registers, no collision
    assert got["count"].to_list() == [6, 6]


def test_a_summary_stored_late_never_recreates_a_deleted_repository(
    activity: FeatureStore,
) -> None:
    """Summaries are stored in the background after a write: one that comes after the
    repository was deleted must not bring its folders back; ``close()`` waits for them."""
    import shutil

    from polarstore._stats import write_summary

    activity.close()  # waits for the summaries of the fixture's writes
    assert list(stats_folder(activity).iterdir())
    shutil.rmtree(activity.path)
    write_summary(activity._offline, "activity", "part-0.parquet", {"rows": 1})
    assert not activity.path.exists()
