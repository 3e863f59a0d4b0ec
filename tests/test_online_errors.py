"""The online store and vacuum under bad input, damage, a full disk, links and re-applies.

Each test is a case an audit found answered with a raw error, a silent wrong answer or a
surprise: ``materialize(5)``, ``get_online_features([])``, a damaged ``data.mdb``, a full disk
during ``materialize``, ``vacuum(force="no")``, one damaged view blocking ``vacuum`` and
``save_dataset`` of the others, a second ``vacuum`` reporting old files, a symlinked
``lock.mdb`` overwriting a file outside the repository, a view re-applied with
``online=False`` still served, and LMDB files not following the umask.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from polarstore import (
    Entity,
    FeatureStore,
    FeatureView,
    NotFoundError,
    PolarstoreError,
    ValidationError,
)

UTC = timezone.utc
T = datetime(2024, 1, 1, tzinfo=UTC)
USER = Entity("user", join_keys="user_id")
ITEM = Entity("item", join_keys="item_id")
CLICKS = FeatureView("clicks", entities=[USER], schema={"n": pl.Int64, "tag": pl.String})
ITEMS = FeatureView("items", entities=[ITEM], schema={"price": pl.Float64})


def clicks(users: list[int], n: list[int], *, hours: int = 0, tag: str = "t") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": users,
            "event_timestamp": [T + timedelta(hours=hours)] * len(users),
            "n": n,
            "tag": [tag] * len(users),
        }
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeatureStore]:
    with FeatureStore(tmp_path / "repo") as s:
        s.apply([USER, ITEM, CLICKS, ITEMS])
        s.write("clicks", clicks([1, 2], [10, 20]))
        s.write("items", pl.DataFrame({"item_id": ["a"], "event_timestamp": [T], "price": [1.5]}))
        yield s


def n_online(store: FeatureStore, users: list[int]) -> list[Any]:
    return store.get_online_features({"user_id": users}, ["clicks:n"], now=T)["n"].to_list()


# --- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize("views", [5, [5], b"clicks", {"clicks": 1}])
def test_materialize_rejects_views_that_are_not_names(store: FeatureStore, views: Any) -> None:
    with pytest.raises(ValidationError, match="view"):
        store.materialize(views)


def test_an_empty_list_of_entities_gives_an_empty_frame_in_the_declared_dtypes(
    store: FeatureStore,
) -> None:
    store.materialize()
    got = store.get_online_features([], ["clicks:n", "clicks:tag", "items:price"])
    want = pl.DataFrame(
        schema={
            "user_id": pl.Int64,
            "item_id": pl.String,
            "n": pl.Int64,
            "tag": pl.String,
            "price": pl.Float64,
        }
    )
    assert_frame_equal(got, want)


@pytest.mark.parametrize("force", ["no", 0, None, "False"])
def test_vacuum_force_must_be_a_bool(store: FeatureStore, force: Any) -> None:
    store.write("clicks", clicks([1], [11]))
    with pytest.raises(ValidationError, match="force"):
        store.vacuum(retention=timedelta(0), force=force)
    assert store.read("clicks", as_of={"clicks": 0}).collect().height == 2  # nothing deleted


# --- vacuum ---------------------------------------------------------------------------------


def test_vacuum_reports_each_deleted_file_once_relative_to_the_repository(
    store: FeatureStore,
) -> None:
    store.delete_entities("clicks", {"user_id": 1})
    first = store.vacuum(retention=timedelta(0), force=True)
    assert first["items"] == []
    assert len(first["clicks"]) == 1
    (deleted,) = first["clicks"]
    assert deleted.startswith("views/clicks/")
    assert not Path(deleted).is_absolute()
    assert not (store.path / deleted).exists()
    assert store.vacuum(retention=timedelta(0), force=True) == {"clicks": [], "items": []}


def test_a_damaged_view_blocks_neither_vacuum_nor_save_dataset_of_the_others(
    store: FeatureStore,
) -> None:
    store.write("clicks", clicks([1], [11], hours=1))
    store.delete_entities("clicks", {"user_id": 2})
    (store.path / "views" / "items" / "_delta_log" / "00000000000000000000.json").write_text("{")
    with pytest.raises(PolarstoreError, match=r"'items'") as raised:
        store.vacuum(retention=timedelta(0), force=True)
    assert "views/clicks/" in str(raised.value)  # what was vacuumed is reported too
    with pytest.raises(NotFoundError, match="vacuum"):  # the clicks files did go
        store.read("clicks", as_of={"clicks": 0}).collect()
    spine = pl.DataFrame({"user_id": [1], "event_timestamp": [T + timedelta(hours=2)]})
    saved = store.save_dataset("train", spine, ["clicks:n"]).collect()
    assert saved["n"].to_list() == [11]
    current = store.history("clicks")["version"].max()  # vacuum commits versions too
    assert store.list_datasets()["train"]["versions"] == {"clicks": current}


# --- the LMDB files -------------------------------------------------------------------------


def test_a_damaged_data_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with FeatureStore(tmp_path / "repo") as store:
        store.apply([USER, CLICKS])
        store.write("clicks", clicks([1], [10]))
        store.materialize()
    data = tmp_path / "repo" / "online" / "data.mdb"
    data.write_bytes(b"\x00not an lmdb file\x00" * 1000)
    with FeatureStore(tmp_path / "repo") as store:
        for call in (
            lambda: store.get_online_features({"user_id": [1]}, ["clicks:n"]),
            lambda: store.get_feature_vector({"user_id": 1}, ["clicks:n"]),
            store.materialize,
        ):
            with pytest.raises(PolarstoreError, match="damaged") as raised:
                call()
            assert str(data) in str(raised.value)
            assert "delete the folder" in str(raised.value)
            assert "materialize()" in str(raised.value)
    # The fix the message gives works.
    for name in ("data.mdb", "lock.mdb"):
        (tmp_path / "repo" / "online" / name).unlink(missing_ok=True)
    with FeatureStore(tmp_path / "repo") as store:
        store.materialize()
        assert n_online(store, [1]) == [10]


def test_a_full_disk_during_materialize_says_so_and_changes_nothing(
    store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected: the sync's write fails with ENOSPC (a real full disk: the tmpfs test below)."""
    import polarstore._online

    store.materialize()
    store.write("clicks", clicks([1, 3], [11, 30], hours=1))

    def full(*args: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(polarstore._online, "sync_view", full)
        with pytest.raises(PolarstoreError, match=r"disk .* is full") as raised:
            store.materialize()
    assert "unchanged" in str(raised.value)
    assert n_online(store, [1, 2, 3]) == [10, 20, None]
    store.materialize()
    assert store.get_online_features({"user_id": [1, 3]}, ["clicks:n"])["n"].to_list() == [11, 30]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (needs root and mount; skipped otherwise)."""
    mount = tmp_path / f"tiny-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_during_materialize(tmp_path: Path, tiny_disk: Path) -> None:
    with FeatureStore(tmp_path / "repo", online_path=tiny_disk / "online") as store:
        store.apply([USER, CLICKS])
        store.write("clicks", clicks([1, 2], [10, 20]))
        store.materialize()
        many = list(range(100, 4_100))
        store.write("clicks", clicks(many, many, hours=1, tag="x" * 200))  # ~1 MB online
        with pytest.raises(PolarstoreError, match=r"disk .* is full"):
            store.materialize()
        assert n_online(store, [1, 2, 100]) == [10, 20, None]
        assert store.describe("clicks")["materialized_version"] == 0


@pytest.mark.parametrize("name", ["lock.mdb", "data.mdb", "folder"])
def test_links_out_of_the_repository_are_refused(tmp_path: Path, name: str) -> None:
    repo = tmp_path / "repo"
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "precious.txt"
    victim.write_text("keep me")
    with FeatureStore(repo) as store:
        store.apply([USER, CLICKS])
        store.write("clicks", clicks([1], [10]))
    online = repo / "online"
    if name == "folder":
        online.symlink_to(outside, target_is_directory=True)
    else:
        online.mkdir()
        (online / name).symlink_to(victim)
    with FeatureStore(repo) as store:
        with pytest.raises(PolarstoreError, match="symbolic link"):
            store.materialize()
        with pytest.raises(PolarstoreError, match="symbolic link"):
            store.get_online_features({"user_id": [1]}, ["clicks:n"])
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_lmdb_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with FeatureStore(tmp_path / "repo") as store:
            store.apply([USER, CLICKS])
            store.write("clicks", clicks([1], [10]))
            store.materialize()
    finally:
        os.umask(old)
    online = tmp_path / "repo" / "online"
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE((online / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(online.stat().st_mode) == 0o777 & ~umask


# --- views that are not online --------------------------------------------------------------


def test_a_view_that_is_not_online_cannot_be_looked_up_and_stops_being_served(
    store: FeatureStore,
) -> None:
    store.materialize()
    assert n_online(store, [1]) == [10]
    offline = FeatureView(
        "clicks", entities=[USER], schema={"n": pl.Int64, "tag": pl.String}, online=False
    )
    store.apply(offline)
    with pytest.raises(ValidationError, match=r"'clicks'.*not online"):
        store.get_online_features({"user_id": [1]}, ["clicks:n", "items:price"])
    with pytest.raises(ValidationError, match=r"'clicks'.*not online"):
        store.get_feature_vector({"user_id": 1}, ["clicks:n"])
    with pytest.raises(ValidationError, match=r"'clicks'.*not online"):
        store.materialize("clicks")
    # The next materialize drops its online values: re-applied online, it starts empty.
    store.materialize()
    store.apply(CLICKS)
    assert n_online(store, [1]) == [None]
    assert store.get_feature_vector({"user_id": 1}, ["clicks:n"], now=T) == {"n": None}
    store.materialize()
    assert n_online(store, [1, 2]) == [10, 20]


def test_a_key_outside_its_declared_integer_dtype_is_refused_by_every_lookup(
    store: FeatureStore,
) -> None:
    """A declared Int8 key of 1000 can't name an entity: the batch lookup said so, while the
    one-entity path answered "not found"; both paths, plain and aggregation views, and a
    compound key now refuse it, and in-range keys still answer."""
    from polarstore import Aggregation, AggregationView

    small = Entity("small", join_keys={"k": pl.Int8})
    pair = Entity("pair", join_keys={"a": pl.Int16, "b": pl.String})
    view = FeatureView("v", entities=[small], schema={"x": pl.Int64})
    pairs = FeatureView("p", entities=[pair], schema={"x": pl.Int64})
    counts = AggregationView("c", "v", [Aggregation(None, "count", "1d", name="n")])
    store.apply([small, pair, view, pairs, counts])
    store.write("v", pl.DataFrame({"k": [1], "event_timestamp": [T], "x": [5]}))
    store.write("p", pl.DataFrame({"a": [-2], "b": ["z"], "event_timestamp": [T], "x": [6]}))
    store.materialize()
    now = T + timedelta(hours=1)
    assert store.get_feature_vector({"k": 1}, ["v:x", "c:n"], now=now) == {"x": 5, "n": 1}
    assert store.get_feature_vector({"k": -128}, ["v:x", "c:n"], now=now) == {"x": None, "n": 0}
    assert store.get_feature_vector({"a": -2, "b": "z"}, ["p:x"]) == {"x": 6}
    for entity, features in [
        ({"k": 1000}, ["v:x"]),
        ({"k": -129}, ["c:n"]),
        ({"a": 40_000, "b": "z"}, ["p:x"]),
    ]:
        with pytest.raises(ValidationError, match=r"does not fit its dtype Int(8|16)"):
            store.get_feature_vector(entity, features, now=now)
        with pytest.raises(ValidationError, match=r"do not fit Int(8|16)"):
            store.get_online_features([entity], features, now=now)
