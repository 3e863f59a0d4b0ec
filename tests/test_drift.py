"""drift(view, reference, current=): false alarms are rare, real shifts are caught.

The measures are checked against brute-force references (``reference.ks_statistic``,
``reference.chi_square``) on the raw values; the flag over many random seeds: samples of one
distribution are flagged at most a few percent of the time, a shifted mean or a new category
every time. Sides: versions, pins, moments and event-time ranges of a real store.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
import pytest

from polarstore import Entity, FeatureStore, FeatureView, NotFoundError, ValidationError
from polarstore._drift import compare
from polarstore._stats import summarize

from .reference import chi_square, ks_statistic

USER = Entity("user", join_keys="user_id")
SCHEMA: dict[str, Any] = {
    "amount": pl.Float64,
    "visits": pl.Int64,
    "tier": pl.String,
    "active": pl.Boolean,
    "seen": pl.Datetime("us", "UTC"),
}
VIEW = FeatureView("shop", entities=[USER], schema=SCHEMA)
TIERS = ["bronze", "silver", "gold", "platinum", "none"]
SHARES = [0.4, 0.3, 0.15, 0.1, 0.05]
T0 = datetime(2024, 1, 1)


def sample(
    rng: np.random.Generator,
    n: int,
    *,
    shift: float = 0.0,
    tiers: list[str] = TIERS,
    shares: list[float] = SHARES,
) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "amount": rng.normal(10 + shift, 2, n),
            "visits": rng.poisson(3, n),
            "tier": rng.choice(tiers, n, p=shares),
            "active": rng.random(n) < 0.3,
            "seen": pl.Series(
                [T0 + timedelta(seconds=float(s)) for s in rng.exponential(3600, n)],
                dtype=pl.Datetime("us", "UTC"),
            ),
        }
    )


def test_identical_distributions_are_rarely_flagged() -> None:
    rng = np.random.default_rng(2024)
    alarms = dict.fromkeys(SCHEMA, 0)
    seeds = 200
    for i in range(seeds):
        n_ref, n_cur = [(150, 150), (1_000, 400), (5_000, 5_000)][i % 3]
        table = compare(
            summarize(sample(rng, n_ref), VIEW), summarize(sample(rng, n_cur), VIEW), VIEW
        )
        for row in table.iter_rows(named=True):
            alarms[row["feature"]] += bool(row["drifted"])
    rates = {name: count / seeds for name, count in alarms.items()}
    assert max(rates.values()) <= 0.03, rates


@pytest.mark.parametrize("n", [300, 5_000])
def test_a_shifted_mean_is_flagged(n: int) -> None:
    rng = np.random.default_rng(n)
    for _ in range(20):
        table = compare(
            summarize(sample(rng, n), VIEW), summarize(sample(rng, n, shift=1.5), VIEW), VIEW
        )
        row = table.row(0, named=True)
        assert row["feature"] == "amount"
        assert row["drifted"] is True, row
        assert table.filter(pl.col("feature") != "amount")["drifted"].sum() <= 1


def test_a_new_category_is_flagged_and_named() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        shifted = sample(rng, 2_000, tiers=[*TIERS, "diamond"], shares=[*SHARES[:-1], 0.0, 0.05])
        table = compare(summarize(sample(rng, 2_000), VIEW), summarize(shifted, VIEW), VIEW)
        row = table.filter(pl.col("feature") == "tier").row(0, named=True)
        assert row["drifted"] is True, row
        assert row["new_categories"] == ["diamond"]


def test_measures_match_the_brute_force_reference() -> None:
    rng = np.random.default_rng(11)
    a, b = sample(rng, 3_000), sample(rng, 2_000, shift=0.4)
    table = {
        r["feature"]: r
        for r in compare(summarize(a, VIEW), summarize(b, VIEW), VIEW).rows(named=True)
    }
    for name in ("amount", "visits"):
        want = ks_statistic(a[name].to_list(), b[name].to_list())
        assert table[name]["ks"] == pytest.approx(want, abs=0.016)  # both sides' rank errors
    for name in ("tier", "active"):
        want = chi_square([str(v) for v in a[name]], [str(v) for v in b[name]])
        assert table[name]["chi2"] == pytest.approx(want, rel=1e-9)
    assert table["amount"]["kind"] == "numeric"
    assert table["seen"]["kind"] == "numeric"
    assert table["tier"]["kind"] == "categorical"


def test_psi_is_zero_for_the_same_rows_and_large_for_disjoint_ones() -> None:
    rng = np.random.default_rng(5)
    a = sample(rng, 4_000)
    summary = summarize(a, VIEW)
    same = compare(summary, summary, VIEW)
    assert same["psi"].max() == pytest.approx(0.0, abs=1e-12)
    assert same["ks"].drop_nulls().max() == pytest.approx(0.0, abs=1e-12)
    assert not same["drifted"].any()
    # KLL compacts at random: two sketches of the same rows differ by their rank error only.
    again = compare(summary, summarize(a, VIEW), VIEW)
    assert again["psi"].max() < 0.01
    assert again["ks"].drop_nulls().max() < 0.016
    far = compare(summarize(a, VIEW), summarize(sample(rng, 4_000, shift=50), VIEW), VIEW)
    assert far.row(0, named=True)["psi"] > 5
    assert far.row(0, named=True)["ks"] == pytest.approx(1.0)


# --- the store verb ---------------------------------------------------------------------------


@pytest.fixture
def shop(store: FeatureStore) -> FeatureStore:
    store.apply([USER, VIEW])
    rng = np.random.default_rng(1)
    for day, shift in [(1, 0.0), (2, 0.0), (3, 3.0)]:
        rows = sample(rng, 2_000, shift=shift).with_columns(
            user_id=pl.int_range(pl.len()), event_timestamp=pl.lit(T0 + timedelta(days=day))
        )
        store.write("shop", rows)
    return store


def test_sides_as_versions_pins_moments_and_ranges(shop: FeatureStore) -> None:
    def amount(**kw: Any) -> bool:
        return shop.drift("shop", **kw).row(0, named=True)["drifted"]

    assert amount(reference=0, current=1) is False
    assert amount(reference={"shop": 0}, current={"shop": 1}) is False
    assert amount(reference=1) is True  # the current table holds day 3's shifted rows
    commits = shop.history("shop")["timestamp"]
    assert amount(reference=commits[0], current=commits[1]) is False
    day = [(T0 + timedelta(days=d), T0 + timedelta(days=d + 1)) for d in range(4)]
    assert amount(reference=day[1], current=day[2]) is False
    assert amount(reference=day[1], current=day[3]) is True
    by_range = shop.drift("shop", reference=day[1], current=(T0, T0 + timedelta(days=3)))
    by_version = shop.drift("shop", reference=0, current=1)
    assert by_range.drop("psi", "ks", "p_value").equals(by_version.drop("psi", "ks", "p_value"))


def test_an_empty_side_measures_nothing(shop: FeatureStore) -> None:
    table = shop.drift("shop", reference=(T0, T0 + timedelta(hours=1)))
    assert table["reference_count"].to_list() == [0] * 5
    assert table["drifted"].null_count() == 5


def test_bad_sides_are_refused(shop: FeatureStore) -> None:
    with pytest.raises(ValidationError, match=r"the range .* is empty"):
        shop.drift("shop", reference=(T0, T0))
    with pytest.raises(ValidationError, match=r"an event-time range is \(start, end\)"):
        shop.drift("shop", reference=(T0,))
    with pytest.raises(ValidationError, match="give a version, a moment or an event-time range"):
        shop.drift("shop", reference=None)
    with pytest.raises(NotFoundError, match="no version 9"):
        shop.drift("shop", reference=9)
    with pytest.raises(ValidationError, match="pins no version of view 'shop'"):
        shop.drift("shop", reference={"other": 0})


def test_cli_drift_prints_the_table(shop: FeatureStore) -> None:
    from click.testing import CliRunner

    from polarstore._cli import cli

    def run(*args: str) -> Any:
        return CliRunner(env={"COLUMNS": "250"}).invoke(cli, ["--repo", str(shop.path), *args])

    out = run("drift", "shop", "--reference", "0", "--current", "1")
    assert out.exit_code == 0, out.output
    assert "Drift of shop" in out.stdout
    assert "amount" in out.stdout
    by_range = run("drift", "shop", "--reference", "2024-01-02..2024-01-03", "--current", "2")
    assert by_range.exit_code == 0, by_range.output
    assert "True" in by_range.stdout  # day 3 is shifted
    bad = run("drift", "shop", "--reference", "9")
    assert bad.exit_code == 1
    assert "no version 9" in bad.stderr
