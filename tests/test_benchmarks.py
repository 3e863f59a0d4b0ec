"""The benchmark scripts still run and still agree with polarstore, at a tiny size.

Nothing here times anything: a missed target only prints; the scripts exit 1 when an answer
differs from polarstore's, and that is what these tests hold.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = "5000"


def run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def table_rows(output: str, first_cell: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith(f"| {first_cell}")
    ]


def test_pit_join_peers_give_polarstore_answer(tmp_path: Path) -> None:
    out = run(
        "benchmarks.pit_join",
        *("--size", TINY, "--repeat", "1", "--workdir", str(tmp_path), "--bitemporal"),
    )
    assert out.count("| bitemporal=True (current) |") == 3
    for layout in ("bulk", "appends", "compacted"):
        rows = table_rows(out, layout)
        contenders = {r[1] for r in rows}
        assert {"polarstore", "naive_polars", "duckdb_asof", "pandas_merge_asof"} <= contenders
        assert all(r[-1].startswith(("reference", "equal")) for r in rows), rows


def test_online_benchmark_answers_match(tmp_path: Path) -> None:
    out = run(
        "benchmarks.online",
        *("--size", TINY, "--repeat", "1", "--calls", "200", "--warmup", "20"),
        *("--batch-rows", "1000", "--batch-repeat", "1", "--check", "50"),
        *("--workdir", str(tmp_path)),
    )
    assert table_rows(out, "full, 5,000 rows")
    assert table_rows(out, "get_feature_vector p50")
    assert "answers: get_feature_vector == get_online_features == get_historical_features" in out


def test_write_benchmark_stores_every_row(tmp_path: Path) -> None:
    out = run("benchmarks.write", "--size", TINY, "--repeat", "1", "--workdir", str(tmp_path))
    rows = table_rows(out, "new table") + table_rows(out, "existing table")
    rows += table_rows(out, "back to back")
    assert len(rows) == 9  # polarstore, write_deltalake, polarstore_no_stats
    assert all(r[-1] == "ok" for r in rows), rows
    assert out.count("keeping statistics costs") == 3


@pytest.mark.parametrize("step", ["build", "join"])
def test_scale_steps(tmp_path_factory: pytest.TempPathFactory, step: str) -> None:
    repo = tmp_path_factory.getbasetemp() / "scale_repo"
    if step == "join" and not repo.exists():
        run("benchmarks.scale", "build", str(repo), "--size", TINY)
    out = run("benchmarks.scale", step, str(repo), "--size", TINY)
    assert out.strip()


def test_bitemporal_benchmark_runs(tmp_path: Path) -> None:
    out = run("benchmarks.bitemporal", "--size", TINY, "--repeat", "1", "--days", "6")
    layouts = ("daily", "daily+backfill", "bulk", "appends")
    assert [[r[0] for r in table_rows(out, "")].count(layout) for layout in layouts] == [1] * 4


def test_aggregations_benchmark_answers_match(tmp_path: Path) -> None:
    out = run(
        "benchmarks.aggregations",
        *("--size", "20000", "--repeat", "1", "--calls", "500", "--workdir", str(tmp_path)),
    )
    rows = table_rows(out, "duckdb") + table_rows(out, "pandas")
    assert [r[0] for r in rows] == ["duckdb", "duckdb_parquet", "pandas"]
    assert all(r[-1] == "equal" for r in rows), rows
    assert "p50 / raw plain get+decode" in out


def test_spark_benchmark_answers_match() -> None:
    """Both engines on the pit_join workload (bulk and appends), derived features and an
    aggregation view: the script exits 1 if Spark's answer differs from Polars'."""
    pytest.importorskip("pyspark", reason="pyspark is not installed (polarstore[spark])")
    if shutil.which("java") is None:
        pytest.skip("Spark needs Java (17 or later); no java on PATH")
    out = run("benchmarks.spark", "--size", "tiny", "--repeat", "1")
    assert [r[0] for r in table_rows(out, "bulk") + table_rows(out, "appends")] == [
        "bulk",
        "appends",
    ]
    assert [r[-1] for r in table_rows(out, "derived")] == ["identical"]
    assert [r[-1] for r in table_rows(out, "aggregation")] == ["equal (floats within 1e-9)"]
