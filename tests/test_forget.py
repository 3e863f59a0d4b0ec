"""The right to be forgotten: ``delete_entities`` + ``vacuum(retention=timedelta(0), force=True)``
leaves the deleted values in no file of the repository.

Checked by reading every byte of every file under the repository folder (Delta data files, the
Delta log and its checkpoints, the LMDB file with its free pages, the registry, dataset
spines) for the deleted strings: a string join key and a string feature value, each unique
enough to appear nowhere else, written in several versions (so old commit files, old
statistics and old online values all held them), with a dataset saved over them.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest

from polarstore import Entity, FeatureStore, FeatureView, NotFoundError, PolarstoreError

UTC = timezone.utc
T = datetime(2024, 1, 1, tzinfo=UTC)
KEY = "forget-me-key-7f3a9c"
VALUE = "forget-me-value-b41d2e"
ACCOUNT = Entity("account", join_keys="account")
PROFILE = FeatureView(
    "profile", entities=[ACCOUNT], schema={"email": pl.String, "visits": pl.Int64}
)
# The deleted key as a feature value of another entity's view is a different matter (not an
# entity delete); this view only checks that unrelated views survive the purge.
OTHER = FeatureView(
    "other", entities=[Entity("user", join_keys="user_id")], schema={"x": pl.Float64}
)


def profile_rows(accounts: list[str], emails: list[str], hours: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "account": accounts,
            "event_timestamp": [T + timedelta(hours=hours)] * len(accounts),
            "email": emails,
            "visits": list(range(len(accounts))),
        }
    )


def files_holding(root: Path, needle: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle`` (UTF-8), relative to root."""
    raw = needle.encode()
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and raw in p.read_bytes()
    )


def build(repo: Path) -> FeatureStore:
    store = FeatureStore(repo)
    store.apply([ACCOUNT, PROFILE, OTHER])
    # Several versions hold the key and value: file statistics (min/max of a one-row file
    # are the value itself), commit files, online values overwritten by later syncs.
    store.write("profile", profile_rows([KEY, "aaa"], [VALUE, "a@x"], 0))
    store.materialize()
    store.write("profile", profile_rows([KEY], [VALUE + "-2"], 1))
    store.write("profile", profile_rows(["zzz"], ["z@x"], 1))
    store.materialize()
    store.compact("profile")
    store.write("other", pl.DataFrame({"user_id": [1], "event_timestamp": [T], "x": [1.0]}))
    spine = pl.DataFrame({"account": [KEY, "aaa"], "event_timestamp": [T + timedelta(hours=2)] * 2})
    store.save_dataset("train", spine, ["profile:email"])
    return store


def test_delete_then_purge_leaves_the_value_in_no_file(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with build(repo) as store:
        assert files_holding(repo, KEY)  # the scan finds what is there
        store.delete_entities("profile", {"account": KEY})
        leftover = repo / "online" / ".compact-killed"  # as a compaction killed midway leaves
        leftover.mkdir()
        (leftover / "data.mdb").write_bytes(KEY.encode())
        store.vacuum(retention=timedelta(0), force=True)
        assert files_holding(repo, KEY) == []
        assert files_holding(repo, VALUE) == []
        assert not leftover.exists()
        assert store.materialize()["profile"]["rows_read"] == 0  # incremental still
        # What remains is whole and served.
        now = T + timedelta(hours=2)
        online = store.get_online_features({"account": ["aaa", "zzz", KEY]}, ["profile:email"])
        assert online["email"].to_list() == ["a@x", "z@x", None]
        spine = pl.DataFrame({"account": ["aaa", "zzz", KEY], "event_timestamp": [now] * 3})
        offline = store.get_historical_features(spine, ["profile:email"]).collect()
        assert offline["email"].to_list() == ["a@x", "z@x", None]
        assert store.read("other").collect()["x"].to_list() == [1.0]
        # Older versions are gone for good, and so is the dataset pinned to one.
        with pytest.raises(NotFoundError):
            store.read("profile", as_of={"profile": 0}).collect()
        assert store.list_datasets() == {}
        # The store goes on: writes, syncs and a later purge work.
        store.write("profile", profile_rows(["bbb"], ["b@x"], 3))
        store.materialize()
        assert store.get_feature_vector({"account": "bbb"}, ["profile:email"]) == {"email": "b@x"}
        store.vacuum(retention=timedelta(0), force=True)
    with FeatureStore(repo) as store:
        assert store.get_feature_vector({"account": "bbb"}, ["profile:email"]) == {"email": "b@x"}
        assert store.read("profile").collect().height == 3


def test_a_purge_after_an_interrupted_online_delete_leaves_nothing_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import polarstore._online

    repo = tmp_path / "repo"
    with build(repo) as store:
        with monkeypatch.context() as patch:
            patch.setattr(polarstore._online, "delete_synced", _fail)
            with pytest.raises(PolarstoreError, match="not yet online"):
                store.delete_entities("profile", {"account": KEY})
        assert store.get_feature_vector({"account": KEY}, ["profile:email"])["email"]
        store.vacuum(retention=timedelta(0), force=True)
        assert files_holding(repo, KEY) == []
        assert files_holding(repo, VALUE) == []
        store.materialize()
        online = store.get_online_features({"account": ["aaa", KEY]}, ["profile:email"])
        assert online["email"].to_list() == ["a@x", None]


def _fail(*args: object) -> int:
    raise OSError("injected: the online delete failed")


def test_an_ordinary_vacuum_keeps_the_history(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with build(repo) as store:
        store.delete_entities("profile", {"account": KEY})
        store.vacuum(retention=timedelta(0))  # not forced: the dataset's files are kept
        assert store.load_dataset("train").collect()["email"].to_list() == [VALUE + "-2", "a@x"]
        assert files_holding(repo, KEY)


_HOLD_OPEN = """
import sys, time
from polarstore import FeatureStore
store = FeatureStore(sys.argv[1])
store.get_online_features({"account": ["aaa"]}, ["profile:email"])
print("open", flush=True)
time.sleep(60)
"""


def test_the_online_store_is_not_compacted_under_another_process(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with build(repo) as store:
        store.delete_entities("profile", {"account": KEY})
        other = subprocess.Popen(
            [sys.executable, "-c", _HOLD_OPEN, str(repo)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert other.stdout is not None
            assert other.stdout.readline().strip() == "open"
            with pytest.raises(PolarstoreError, match="open in another process"):
                store.vacuum(retention=timedelta(0), force=True)
            # The Delta side was purged; the online store still works, here and there.
            assert files_holding(repo / "views", KEY) == []
            assert store.get_feature_vector({"account": "aaa"}, ["profile:email"]) == {
                "email": "a@x"
            }
        finally:
            other.kill()
            other.wait()
            if other.stdout is not None:
                other.stdout.close()
        store.vacuum(retention=timedelta(0), force=True)
        assert files_holding(repo, KEY) == []


def test_time_travel_into_purged_history_is_an_error_not_an_empty_view(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "repo")
    store.apply(FeatureView("f", entities=Entity("k", "k"), schema={"x": pl.Int64}))
    for i in range(3):
        store.write(
            "f", pl.DataFrame({"k": [i], "event_timestamp": [datetime(2024, 1, 1)], "x": [i]})
        )
    before_purge = store.history("f")["timestamp"].max()
    store.delete_entities("f", pl.DataFrame({"k": [0]}))
    store.vacuum(retention=timedelta(0), force=True)
    oldest = store.history("f")["version"].min()
    assert store.read("f").collect()["x"].sort().to_list() == [1, 2]
    with pytest.raises(NotFoundError, match=rf"version 1 was purged.*versions {oldest} to"):
        store.read("f", as_of={"f": 1})
    # A moment when the view had 3 rows: an empty answer would be a silent wrong one.
    with pytest.raises(NotFoundError, match=r"history before version .* was purged"):
        store.read("f", as_of=before_purge)
    spine = pl.DataFrame({"k": [1], "event_timestamp": [datetime(2024, 1, 2)]})
    with pytest.raises(NotFoundError, match="was purged"):
        store.get_historical_features(spine, ["f:x"], as_of=before_purge)
