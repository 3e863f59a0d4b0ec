"""FeatureView(checks=): row-level checks on write, held to a plain-Python reference.

A row fails a check where the expression is False (null passes). By default a failing row
refuses the whole batch (nothing is written, the version is unchanged); ``"warn"`` writes it
with a ``CheckWarning``; ``"drop"`` writes exactly the passing rows. Checks are validated at
``apply`` (row-wise, known columns, boolean) and survive the registry as JSON.
"""

from __future__ import annotations

import json
import struct
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polarstore import (
    CheckWarning,
    Entity,
    FeatureStore,
    FeatureView,
    NotFoundError,
    SchemaError,
    ValidationError,
)

USER = Entity("user", join_keys="user_id")
T0 = datetime(2024, 1, 1)
CHECKS = {
    "age_range": pl.col("age").is_between(0, 130),
    "tier_known": pl.col("tier").is_in(["gold", "silver"]),
    "spend_sane": (pl.col("spend") >= 0) | (pl.col("age") < 18),
}


def reference(row: dict[str, Any]) -> dict[str, bool]:
    """Whether ``row`` passes each check, by hand: Kleene logic, null passes; on the row as
    stored (spend is a Float32: rounded first, so a tiny negative becomes -0.0 >= 0)."""
    age, tier, spend = row["age"], row["tier"], row["spend"]
    if spend is not None:
        spend = struct.unpack("<f", struct.pack("<f", spend))[0]
    age_ok = None if age is None else 0 <= age <= 130
    tier_ok = None if tier is None else tier in ("gold", "silver")
    left = None if spend is None else spend >= 0
    right = None if age is None else age < 18
    if left is True or right is True:
        spend_ok: bool | None = True
    elif left is None or right is None:
        spend_ok = None
    else:
        spend_ok = False
    return {
        "age_range": age_ok is not False,
        "tier_known": tier_ok is not False,
        "spend_sane": spend_ok is not False,
    }


def view(**kw: Any) -> FeatureView:
    schema = {"age": pl.Int32, "tier": pl.String, "spend": pl.Float32}
    return FeatureView("people", entities=[USER], schema=schema, **kw)


def frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": list(range(len(rows))),
            "event_timestamp": [T0 + timedelta(microseconds=i) for i in range(len(rows))],
            "age": [r["age"] for r in rows],
            "tier": [r["tier"] for r in rows],
            "spend": [r["spend"] for r in rows],
        },
        schema={
            "user_id": pl.Int64,
            "event_timestamp": pl.Datetime("us"),
            "age": pl.Int64,
            "tier": pl.String,
            "spend": pl.Float64,
        },
    )


people = st.fixed_dictionaries(
    {
        "age": st.one_of(st.none(), st.integers(-5, 140), st.sampled_from([0, 130, 131, -1])),
        "tier": st.one_of(st.none(), st.sampled_from(["gold", "silver", "bronze"])),
        "spend": st.one_of(st.none(), st.floats(-10, 10, allow_nan=False)),
    }
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(people, min_size=1, max_size=20), mode=st.sampled_from(["error", "warn", "drop"])
)
def test_writes_follow_the_reference(
    tmp_path_factory: pytest.TempPathFactory, rows: list[dict[str, Any]], mode: str
) -> None:
    store = FeatureStore(tmp_path_factory.mktemp("repo"))
    store.apply([USER, view(checks=CHECKS)])
    store.write("people", frame([{"age": 30, "tier": "gold", "spend": 1.0}]))
    verdicts = [reference(r) for r in rows]
    passing = [r for r, v in zip(rows, verdicts, strict=True) if all(v.values())]
    failing = {name: sum(not v[name] for v in verdicts) for name in CHECKS}
    if len(passing) == len(rows):
        assert store.write("people", frame(rows), on_check_failure=mode) == 1
        assert store.read("people").collect().height == 1 + len(rows)
        return
    if mode == "error":
        with pytest.raises(ValidationError) as info:
            store.write("people", frame(rows))
        for name, n in failing.items():
            assert (f"check {name!r} failed for {n} of {len(rows)} rows" in str(info.value)) == (
                n > 0
            )
        assert store.versions() == {"people": 0}
        return
    with pytest.warns(CheckWarning, match=r"failed for \d+ of"):
        version = store.write("people", frame(rows), on_check_failure=mode)
    written = store.read("people").collect().height - 1
    if mode == "warn":
        assert (version, written) == (1, len(rows))
    elif passing:
        assert (version, written) == (1, len(passing))
    else:
        assert (version, written) == (0, 0)  # every row dropped: nothing committed


def test_the_error_names_the_check_the_count_and_five_examples(store: FeatureStore) -> None:
    store.apply([USER, view(checks={"age_range": pl.col("age").is_between(0, 130)})])
    rows = frame([{"age": 200 + i, "tier": "gold", "spend": 1.0} for i in range(8)])
    with pytest.raises(ValidationError, match="check 'age_range' failed for 8 of 8 rows") as info:
        store.write("people", rows)
    text = str(info.value)
    assert text.count("'age': ") == 5
    assert "'age': 204" in text
    assert "'age': 205" not in text
    assert "2024-01-01T00:00:00.000004+00:00" in text  # times in ISO form
    assert store.versions() == {"people": -1}


def test_checks_see_the_rows_as_stored(store: FeatureStore) -> None:
    # spend is Float32: 0.1 + 1e-9 (Float64 input) rounds to Float32's 0.1 before the check.
    stored = float(pl.Series([0.1], dtype=pl.Float32)[0])
    store.apply([USER, view(checks={"exact": pl.col("spend") == stored})])
    rows = frame([{"age": 1, "tier": "gold", "spend": 0.1 + 1e-9}])
    assert store.write("people", rows) == 0


def test_every_row_dropped_on_a_new_view_commits_nothing(store: FeatureStore) -> None:
    store.apply([USER, view(checks={"never": pl.col("age") < 0})])
    with pytest.warns(CheckWarning, match="1 row"):
        assert (
            store.write(
                "people", frame([{"age": 1, "tier": None, "spend": None}]), on_check_failure="drop"
            )
            == -1
        )
    assert store.versions() == {"people": -1}


def test_a_bad_mode_is_refused(store: FeatureStore) -> None:
    store.apply([USER, view(checks=CHECKS)])
    with pytest.raises(ValidationError, match="on_check_failure must be one of"):
        store.write("people", frame([]), on_check_failure="ignore")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("check", "error", "fragment"),
    [
        (pl.col("age") > pl.col("age").mean(), SchemaError, "mean is refused"),
        (pl.col("age").shift(1) > 0, SchemaError, "refused"),
        (pl.col("agee") > 0, NotFoundError, "Did you mean 'age'"),
        (pl.col("age") + 1, SchemaError, "must give a boolean per row, this one gives Int32"),
        ("age > 0", SchemaError, "a check is a boolean pl.Expr"),
    ],
)
def test_apply_refuses_bad_checks(
    store: FeatureStore, check: Any, error: type, fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        store.apply([USER, view(checks={"c": check})])


def test_a_bad_check_name_is_refused() -> None:
    with pytest.raises(ValidationError, match="check"):
        view(checks={"no spaces": pl.col("age") > 0})


def test_checks_round_trip_the_registry(store: FeatureStore, tmp_path: Path) -> None:
    definition = view(checks=CHECKS)
    store.apply([USER, definition])
    again = FeatureStore(store.path).get_feature_view("people")
    assert again == definition
    assert list(again.check_documents or {}) == list(CHECKS)
    registry = json.loads((store.path / "registry.json").read_text())
    assert set(registry["feature_views"]["people"]["checks"]) == set(CHECKS)
    assert view(checks={"age_range": pl.col("age") > 1}) != definition
    store.write(
        "people", frame([{"age": 30, "tier": "gold", "spend": 1.0}]), on_check_failure="error"
    )
    with pytest.raises(ValidationError, match="tier_known"):
        FeatureStore(store.path).write("people", frame([{"age": 30, "tier": "x", "spend": 1.0}]))


def test_a_view_without_checks_keeps_its_registry_entry(store: FeatureStore) -> None:
    store.apply([USER, view()])
    registry = json.loads((store.path / "registry.json").read_text())
    assert "checks" not in registry["feature_views"]["people"]
