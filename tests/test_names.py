"""Names at definition time: internal column names are reserved, and names have a length limit."""

from __future__ import annotations

from datetime import datetime

import polars as pl
import pytest

from polarstore import Entity, FeatureStore, FeatureView, ValidationError

# The working columns of the point-in-time join (_retrieval), the write sequence (_offline)
# and the online codec (_online), plus anything else in their namespaces.
RESERVED = [
    "__row",
    "__code",
    "__polarstore_ts",
    "__polarstore_row",
    "__polarstore_key_user_id_Int64",
    "__polarstore_key_user_id_String",
    "__polarstore_anything",
    "_polarstore_seq",
    "_polarstore_other",
]
ROLES = ["feature", "join key", "timestamp field", "created timestamp field"]


def view_with(name: str, role: str) -> FeatureView:
    keys = name if role == "join key" else "user_id"
    schema = {name: pl.Int64} if role == "feature" else {"clicks": pl.Int64}
    return FeatureView(
        "stats",
        entities=[Entity("user", join_keys=keys)],
        schema=schema,
        timestamp_field=name if role == "timestamp field" else "event_timestamp",
        created_timestamp_field=name if role == "created timestamp field" else None,
    )


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name", RESERVED)
def test_internal_column_names_are_refused_in_every_role(name: str, role: str) -> None:
    with pytest.raises(ValidationError, match=rf"{role} .*name '{name}' is .*reserved"):
        view_with(name, role)


@pytest.mark.parametrize("name", RESERVED)
def test_internal_names_are_refused_as_declared_keys(name: str) -> None:
    with pytest.raises(ValidationError, match=rf"'{name}' is .*reserved"):
        Entity("user", join_keys={name: pl.Int64})


def test_names_next_to_the_internal_ones_work_end_to_end(store: FeatureStore) -> None:
    user = Entity("user", join_keys="_row")
    view = FeatureView(
        "v",
        entities=[user],
        schema={"row__": pl.Int64, "polarstore_ts": pl.Int64, "_code": pl.Int64},
        timestamp_field="_polarstor_ts",
    )
    store.apply(view)
    t = datetime(2024, 1, 1)
    store.write(
        "v",
        pl.DataFrame(
            {"_row": [1], "_polarstor_ts": [t], "row__": [1], "polarstore_ts": [2], "_code": [3]}
        ),
    )
    spine = pl.DataFrame({"_row": [1], "event_timestamp": [t]})
    assert store.get_historical_features(spine, ["v:*"]).collect().row(0)[2:] == (1, 2, 3)
    store.materialize()
    assert store.get_feature_vector({"_row": 1}, ["v:*"], now=t) == {
        "row__": 1,
        "polarstore_ts": 2,
        "_code": 3,
    }


@pytest.mark.parametrize(
    "make",
    [
        lambda n: Entity(n, "k"),
        lambda n: Entity("e", n),
        lambda n: FeatureView(n, entities=Entity("e", "k"), schema={"x": pl.Int64}),
        lambda n: FeatureView("v", entities=Entity("e", "k"), schema={n: pl.Int64}),
    ],
    ids=["entity", "key", "view", "feature"],
)
def test_names_are_limited_to_128_characters(make: object) -> None:
    make("a" * 128)  # type: ignore[operator]
    with pytest.raises(ValidationError, match=r"is 251 characters long; names are limited to 128"):
        make("a" * 251)  # type: ignore[operator]


def test_the_longest_view_name_can_be_written(store: FeatureStore) -> None:
    name = "v" * 128
    store.apply(FeatureView(name, entities=Entity("e", "k"), schema={"x": pl.Int64}))
    frame = pl.DataFrame({"k": [1], "event_timestamp": [datetime(2024, 1, 1)], "x": [1]})
    assert store.write(name, frame) == 0
    store.materialize()
    spine = frame.select("k", "event_timestamp")
    assert store.save_dataset("d" * 128, spine, [f"{name}:x"]).collect()["x"].to_list() == [1]
