"""apply() and the registry: idempotent, evolution rules, readable JSON, clear damage errors."""

from __future__ import annotations

import json
from datetime import timedelta

import polars as pl
import pytest

from polarstore import (
    Entity,
    FeatureService,
    FeatureStore,
    FeatureView,
    NotFoundError,
    PolarstoreError,
    SchemaError,
    ValidationError,
)

from .conftest import STATS, USER, stats_rows


def test_apply_is_idempotent(store: FeatureStore) -> None:
    store.apply([USER, STATS])
    text = (store.path / "registry.json").read_text()
    store.apply([USER, STATS])
    assert (store.path / "registry.json").read_text() == text
    assert json.loads(text)["feature_views"]["user_stats"]["schema"] == {
        "clicks": "Int64",
        "spend": "Float64",
    }


def test_registry_round_trips_definitions(store: FeatureStore) -> None:
    service = FeatureService("churn", ["user_stats:clicks"], owner="ml", tags={"m": "v1"})
    store.apply([STATS, service])
    fresh = FeatureStore(store.path)
    assert fresh.get_feature_view("user_stats") == STATS
    assert fresh.list_entities() == [USER]
    assert fresh.list_feature_services() == [service]


def test_registry_holds_no_pickle(stats_store: FeatureStore) -> None:
    raw = (stats_store.path / "registry.json").read_bytes()
    json.loads(raw)  # plain JSON throughout
    assert b"\x80" not in raw


def changed(**kw: object) -> FeatureView:
    fields = {
        "entities": STATS.entities,
        "schema": STATS.schema,
        "created_timestamp_field": STATS.created_timestamp_field,
        "ttl": STATS.ttl,
    }
    fields.update(kw)
    return FeatureView("user_stats", **fields)  # type: ignore[arg-type]


def test_adding_a_feature_keeps_history_readable(stats_store: FeatureStore) -> None:
    stats_store.apply(changed(schema={**STATS.schema, "visits": pl.Int32}))
    rows = stats_rows([3], [1]).with_columns(visits=pl.lit(4, pl.Int32))
    stats_store.write("user_stats", rows)
    got = stats_store.read("user_stats").sort("user_id").collect()
    assert got["visits"].to_list() == [None, None, 4]
    assert got.schema["visits"] == pl.Int32


@pytest.mark.parametrize(
    ("view", "match"),
    [
        (changed(schema={"clicks": pl.Float64, "spend": pl.Float64}), "dtype of feature 'clicks'"),
        (changed(schema={"clicks": pl.Int64}), "cannot remove feature 'spend'"),
        (changed(created_timestamp_field=None), "created_timestamp_field"),
        (
            changed(entities=[Entity("account", "account_id")]),
            r"join keys from \['user_id'\] to \['account_id'\]",
        ),
    ],
    ids=["dtype", "removed", "created-field", "entities"],
)
def test_incompatible_changes_need_an_empty_view(
    store: FeatureStore, view: FeatureView, match: str
) -> None:
    store.apply(STATS)
    store.apply(view)  # no data yet: anything goes
    store.apply(STATS)
    store.write("user_stats", stats_rows([1], [0]))
    with pytest.raises(SchemaError, match=match):
        store.apply(view)
    assert store.get_feature_view("user_stats") == STATS


def test_entity_join_keys_cannot_change_under_data(stats_store: FeatureStore) -> None:
    with pytest.raises(SchemaError, match=r"entity 'user'.*\['user_stats'\]"):
        stats_store.apply(Entity("user", join_keys="uid"))


def test_failed_apply_changes_nothing(store: FeatureStore) -> None:
    store.apply(STATS)
    store.write("user_stats", stats_rows([1], [0]))
    other = FeatureView("other", entities=USER, schema={"x": pl.Int64})
    with pytest.raises(SchemaError):
        store.apply([other, changed(schema={"clicks": pl.String, "spend": pl.Float64})])
    assert [v.name for v in store.list_feature_views()] == ["user_stats"]


def test_service_versions_bump_on_change(store: FeatureStore) -> None:
    store.apply([STATS, FeatureService("svc", ["user_stats:clicks"])])
    store.apply(FeatureService("svc", ["user_stats:clicks"]))
    store.apply(FeatureService("svc", ["user_stats:*"]))
    doc = json.loads((store.path / "registry.json").read_text())
    assert doc["feature_services"]["svc"]["version"] == 2


def test_service_with_unknown_feature_is_rejected(store: FeatureStore) -> None:
    store.apply(STATS)
    with pytest.raises(NotFoundError, match="Did you mean 'clicks'"):
        store.apply(FeatureService("svc", ["user_stats:clics"]))


@pytest.mark.parametrize("name", ["../x", "a/b", "a b", "1abc", "", "x.y", "_polarstore_x"])
def test_bad_names_are_rejected_before_disk(store: FeatureStore, name: str) -> None:
    with pytest.raises(ValidationError, match="name"):
        FeatureView(name, entities=USER, schema={"x": pl.Int64})
    with pytest.raises(ValidationError, match="name"):
        Entity(name, "k")
    assert not (store.path / "registry.json").exists()


def test_bad_definitions(store: FeatureStore) -> None:
    with pytest.raises(SchemaError, match="UInt8 is not supported"):
        FeatureView("v", entities=USER, schema={"x": pl.UInt8})
    with pytest.raises(SchemaError, match="must be a Polars dtype"):
        FeatureView("v", entities=USER, schema={"x": int})
    with pytest.raises(SchemaError, match="'user_id' is both a join key and a feature"):
        FeatureView("v", entities=USER, schema={"user_id": pl.Int64})
    with pytest.raises(ValidationError, match=r"ttl .* must not be negative"):
        FeatureView("v", entities=USER, schema={"x": pl.Int64}, ttl=timedelta(-1))
    with pytest.raises(ValidationError, match="apply"):
        store.apply(["not a definition"])  # type: ignore[list-item]


def test_damaged_registry_gives_a_clear_error(stats_store: FeatureStore) -> None:
    path = stats_store.path / "registry.json"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(PolarstoreError, match="not valid JSON"):
        FeatureStore(stats_store.path).list_feature_views()
    path.write_text(json.dumps({"format": "polarstore.registry", "format_version": 99}))
    with pytest.raises(PolarstoreError, match="format_version 99"):
        FeatureStore(stats_store.path).list_feature_views()
    path.write_text(json.dumps({"format": "polarstore.registry", "format_version": 1}))
    with pytest.raises(PolarstoreError, match="damaged"):
        FeatureStore(stats_store.path).list_feature_views()
    path.write_text("[1, 2]")
    with pytest.raises(PolarstoreError, match="not a polarstore registry"):
        FeatureStore(stats_store.path).list_feature_views()


def test_discovery(stats_store: FeatureStore) -> None:
    stats_store.apply(FeatureService("churn", ["user_stats:*"], description="Churn model"))
    assert [d.name for d in stats_store.search("growth")] == ["user_stats"]
    assert [d.name for d in stats_store.search("team=growth")] == ["user_stats"]
    assert [d.name for d in stats_store.search("shopper")] == ["user"]
    assert [d.name for d in stats_store.search("CHURN")] == ["churn"]
    assert stats_store.search("nothing-like-this") == []
    info = stats_store.describe("user_stats")
    assert info["rows"] == 2
    assert info["version"] == 0
    assert info["owner"] == "growth@example.com"
    assert info["latest_event_time"] is not None
    with pytest.raises(NotFoundError, match="Did you mean 'user_stats'"):
        stats_store.get_feature_view("user_stat")
