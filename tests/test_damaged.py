"""A view whose data files were damaged or removed behind polarstore's back.

Reading such a view raised raw Polars errors at ``collect()`` ("Invalid thrift", "No such
file"), naming neither the view nor the file. Now the scan checks, for local repositories,
that every data file it needs exists with the size the Delta log recorded and ends like a
Parquet file: a missing file of the current version is a ``NotFoundError``, a damaged one a
``PolarstoreError``, each naming the view, the file and what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from polarstore import FeatureStore, NotFoundError, PolarstoreError

from .conftest import STATS, T0, USER, stats_rows

SPINE = pl.DataFrame({"user_id": [1, 2], "event_timestamp": [T0 + timedelta(days=3)] * 2})


@pytest.fixture
def two_files(store: FeatureStore) -> tuple[FeatureStore, Path]:
    """``user_stats`` with two writes; returns the store and the second write's data file."""
    store.apply([USER, STATS])
    store.write("user_stats", stats_rows([1, 2], [0, 0]))
    folder = Path(store.path) / "views" / "user_stats"
    first = set(folder.glob("*.parquet"))
    store.write("user_stats", stats_rows([1], [1]))
    (second,) = set(folder.glob("*.parquet")) - first
    return store, second


READERS: dict[str, Callable[[FeatureStore], object]] = {
    "read": lambda s: s.read("user_stats").collect(),
    "join": lambda s: s.get_historical_features(SPINE, ["user_stats:clicks"]).collect(),
    "compact": lambda s: s.compact("user_stats"),
    "materialize": lambda s: s.materialize(),
}


@pytest.mark.parametrize("reader", READERS)
def test_missing_data_file_of_the_current_version(
    two_files: tuple[FeatureStore, Path], reader: str
) -> None:
    store, second = two_files
    second.unlink()
    with pytest.raises(NotFoundError, match=r"'user_stats'.*current version 1 .*missing") as e:
        READERS[reader](store)
    assert second.name in str(e.value)
    assert "repair()" in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "footer overwritten"])
@pytest.mark.parametrize("reader", READERS)
def test_damaged_data_file(two_files: tuple[FeatureStore, Path], reader: str, damage: str) -> None:
    store, second = two_files
    data = second.read_bytes()
    if damage == "truncated":
        second.write_bytes(data[: len(data) // 2])
    else:
        second.write_bytes(data[:-12] + b"\0" * 12)
    with pytest.raises(PolarstoreError, match=r"'user_stats'.*is damaged.*backup") as e:
        READERS[reader](store)
    assert second.name in str(e.value)


def test_a_damaged_older_file_does_not_block_a_pinned_read_that_skips_it(
    two_files: tuple[FeatureStore, Path],
) -> None:
    store, second = two_files
    second.unlink()
    # Version 0 does not need the second file: time travel still works.
    got = store.get_historical_features(SPINE, ["user_stats:clicks"], as_of={"user_stats": 0})
    assert got.collect()["clicks"].to_list() == [0, 1]


def test_damage_inside_a_data_file_is_reported_by_compact(
    two_files: tuple[FeatureStore, Path],
) -> None:
    # Same size and a sound footer: only reading the pages finds it. compact() (and
    # delete_entities) read the rows themselves, so they can say what failed.
    store, second = two_files
    data = bytearray(second.read_bytes())
    data[4 : len(data) // 2] = b"\xff" * (len(data) // 2 - 4)
    second.write_bytes(bytes(data))
    with pytest.raises(PolarstoreError, match=r"view 'user_stats' failed.*may be damaged"):
        store.compact("user_stats")
