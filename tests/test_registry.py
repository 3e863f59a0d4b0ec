"""registry.json: declared key dtypes round-trip, changes are seen whatever the clock,
damage and a full disk give clear errors and leave the registry as it was."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

import polarstore._registry as registry_module
from polarstore import (
    Entity,
    FeatureService,
    FeatureStore,
    FeatureView,
    PolarstoreError,
    StorageError,
)

from .conftest import STATS, USER

ACCOUNT = Entity("account", join_keys={"account_code": pl.String, "branch": pl.Int16})


def test_declared_key_dtypes_round_trip(store: FeatureStore) -> None:
    view = FeatureView("balance", entities=["account"], schema={"amount": pl.Int64})
    store.apply([ACCOUNT, view])
    doc = json.loads((store.path / "registry.json").read_text())
    assert doc["entities"]["account"]["key_dtypes"] == {"account_code": "String", "branch": "Int16"}
    assert doc["feature_views"]["balance"]["entities"] == ["account"]
    again = FeatureStore(store.path)
    assert again.list_entities() == [ACCOUNT]
    assert again.get_feature_view("balance").key_dtypes == {
        "account_code": pl.String(),
        "branch": pl.Int16(),
    }


def test_a_registry_written_without_key_dtypes_stays_readable(stats_store: FeatureStore) -> None:
    path = stats_store.path / "registry.json"
    doc = json.loads(path.read_text())
    for entity in doc["entities"].values():
        entity.pop("key_dtypes")
    path.write_text(json.dumps(doc))
    again = FeatureStore(stats_store.path)
    assert again.get_feature_view("user_stats").key_dtypes == {}
    assert again.list_entities() == [USER]


def test_key_dtypes_of_unknown_keys_are_damage(stats_store: FeatureStore) -> None:
    path = stats_store.path / "registry.json"
    doc = json.loads(path.read_text())
    doc["entities"]["user"]["key_dtypes"] = {"other": "String"}
    path.write_text(json.dumps(doc))
    with pytest.raises(PolarstoreError, match=r"registry .* is damaged.*declares dtypes"):
        FeatureStore(stats_store.path).list_entities()


def swap(store: FeatureStore, ttl_days: int) -> None:
    store.apply(dataclasses.replace(STATS, ttl=timedelta(days=ttl_days)))


def test_a_same_size_change_within_one_clock_tick_is_seen(stats_store: FeatureStore) -> None:
    """File systems with coarse timestamps: every replace must still be noticed."""
    path = stats_store.path / "registry.json"
    reader = FeatureStore(stats_store.path)
    stamp = path.stat().st_mtime_ns
    size = path.stat().st_size
    for days in [2, 3, 4, 5, 6, 8, 9, 2, 3]:  # ttl_microseconds: always 12 digits
        swap(stats_store, days)
        os.utime(path, ns=(stamp, stamp))  # as if the clock had not moved
        assert path.stat().st_size == size
        assert reader.get_feature_view("user_stats").ttl == timedelta(days=days)


def test_a_service_swapped_for_another_feature_is_seen(store: FeatureStore) -> None:
    path = store.path / "registry.json"
    store.apply(FeatureView("v", entities=[USER], schema={"f1": pl.Int64, "f2": pl.Int64}))
    store.apply(FeatureService("churn", ["v:f1"]))
    reader = FeatureStore(store.path)
    assert reader.get_feature_service("churn").features == ("v:f1",)
    stamp, size = path.stat().st_mtime_ns, path.stat().st_size
    store.apply(FeatureService("churn", ["v:f2"]))
    os.utime(path, ns=(stamp, stamp))
    assert path.stat().st_size == size
    assert reader.get_feature_service("churn").features == ("v:f2",)


def test_an_unchanged_registry_is_parsed_once(stats_store: FeatureStore) -> None:
    reader = FeatureStore(stats_store.path)
    first = reader._state()
    assert reader._state() is first
    swap(stats_store, 3)
    assert reader._state() is not first


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[" * 100_000 + "]" * 100_000, "RecursionError"),
        ('{"format": "polarstore.registry", "format_version": ' + "1" * 5000 + "}", "ValueError"),
    ],
    ids=["deeply-nested", "huge-number"],
)
def test_unreadable_json_names_the_file(stats_store: FeatureStore, text: str, why: str) -> None:
    path = stats_store.path / "registry.json"
    path.write_text(text)
    with pytest.raises(PolarstoreError, match=rf"registry {path} is damaged.*{why}"):
        FeatureStore(stats_store.path).list_feature_views()


def test_a_huge_number_inside_a_definition_is_damage(stats_store: FeatureStore) -> None:
    path = stats_store.path / "registry.json"
    doc = json.loads(path.read_text())
    doc["feature_views"]["user_stats"]["ttl_microseconds"] = 10**300
    path.write_text(json.dumps(doc))
    with pytest.raises(PolarstoreError, match=rf"registry {path} is damaged"):
        FeatureStore(stats_store.path).list_feature_views()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("step", ["write", "fsync"])
def test_a_full_disk_during_apply_says_so_and_changes_nothing(
    stats_store: FeatureStore, monkeypatch: pytest.MonkeyPatch, code: int, step: str
) -> None:
    """The disk fills while the new registry is written: an ENOSPC (or EDQUOT) injected into
    write(2) after a partial write, or into fsync(2) (delayed allocation, NFS)."""
    path = stats_store.path / "registry.json"
    before = path.read_bytes()

    def partial_write(fd: int, data: bytes) -> None:
        os.write(fd, bytes(data[:10]))
        raise OSError(code, os.strerror(code))

    def failed_fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    if step == "write":
        monkeypatch.setattr(registry_module, "_write_all", partial_write)
    else:
        monkeypatch.setattr(os, "fsync", failed_fsync)
    with pytest.raises(
        StorageError, match=rf"could not write {path}: the disk is full; it is unchanged"
    ):
        swap(stats_store, 3)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert FeatureStore(stats_store.path).get_feature_view("user_stats").ttl == STATS.ttl
    swap(stats_store, 3)
    assert FeatureStore(stats_store.path).get_feature_view("user_stats").ttl == timedelta(days=3)


def test_a_storage_error_is_an_os_error(tmp_path: Path) -> None:
    assert issubclass(StorageError, OSError)
    assert issubclass(StorageError, PolarstoreError)
    err = StorageError(errno.ENOSPC, "could not write x: the disk is full")
    assert err.errno == errno.ENOSPC
    assert str(err) == "could not write x: the disk is full"
