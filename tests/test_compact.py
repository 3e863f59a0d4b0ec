"""compact(): a rewrite into one sorted file that Delta readers see as no change of data.

The commit adds the new file and removes the old ones with ``dataChange=false`` (as Delta's
OPTIMIZE does), so a streaming consumer of the table does not read every row again; a
``delete_entities`` rewrite is a real change and stays ``dataChange=true``. Answers and the
tie order are unchanged (the property tests compact at random as well).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import deltalake
import polars as pl
import pyarrow.parquet as pq
from polars.testing import assert_frame_equal

from polarstore import FeatureStore, FeatureView

from .conftest import STATS, T0, USER, stats_rows


def last_commit(store: FeatureStore, view: str) -> list[dict[str, Any]]:
    log = sorted((Path(store.path) / "views" / view / "_delta_log").glob("*.json"))[-1]
    return [json.loads(line) for line in log.read_text().splitlines() if line]


def actions(commit: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [a[kind] for a in commit if kind in a]


def test_compact_commits_without_data_change(store: FeatureStore) -> None:
    store.apply([USER, STATS])
    store.write("user_stats", stats_rows([1, 2], [3, 1]))
    store.write("user_stats", stats_rows([1, 2], [2, 1], clicks=[7, 8]))
    before = store.read("user_stats").collect()
    version = store.compact("user_stats")
    commit = last_commit(store, "user_stats")
    (add,) = actions(commit, "add")
    removed = actions(commit, "remove")
    assert add["dataChange"] is False
    assert json.loads(add["stats"])["numRecords"] == 4
    assert len(removed) == 2
    assert all(r["dataChange"] is False for r in removed)
    assert store.history("user_stats")["operation"].to_list() == ["write", "write", "compact"]
    assert_frame_equal(store.read("user_stats").collect(), before)
    # Other Delta readers see the same rows in the new version, and the old one still reads.
    table = deltalake.DeltaTable(str(Path(store.path) / "views" / "user_stats"))
    assert table.version() == version
    assert pl.DataFrame(pl.from_arrow(table.to_pyarrow_table())).height == 4
    assert store.read("user_stats", as_of={"user_stats": 1}).collect().height == 4


def test_compact_keeps_only_the_tables_columns_and_cleans_up(store: FeatureStore) -> None:
    store.apply([USER, STATS])
    store.write("user_stats", stats_rows([1], [0]))
    # A feature added after the data was written: the rows do not hold it, nor does the file.
    grown = dataclasses.replace(STATS, schema={**STATS.schema, "extra": pl.String})
    store.apply(grown)
    staging = Path(store.path) / ".polarstore" / "staging" / "user_stats-left-by-a-crash"
    staging.mkdir(parents=True)
    store.compact("user_stats")
    assert not staging.exists()
    (add,) = actions(last_commit(store, "user_stats"), "add")
    assert "extra" not in json.loads(add["stats"])["nullCount"]
    assert store.read("user_stats").collect()["extra"].to_list() == [None]


def test_delete_entities_is_a_data_change(store: FeatureStore) -> None:
    store.apply([USER, STATS])
    store.write("user_stats", stats_rows([1, 2], [0, 0]))
    store.delete_entities("user_stats", {"user_id": 1})
    commit = last_commit(store, "user_stats")
    assert all(a["dataChange"] for a in actions(commit, "add") + actions(commit, "remove"))


def test_compact_with_line_separators_in_string_statistics(store: FeatureStore) -> None:
    # Delta statistics hold min/max strings verbatim in the JSON log: U+0085 and U+2028 are
    # line boundaries to str.splitlines(), not to the log's newline-delimited JSON.
    notes = FeatureView("notes", entities=[USER], schema={"note": pl.String})
    store.apply([USER, notes])
    times = [T0, T0 + timedelta(hours=1)]
    store.write(
        "notes",
        pl.DataFrame({"user_id": [1, 2], "event_timestamp": times, "note": ["\x85", "b\u2028"]}),
    )
    store.write("notes", pl.DataFrame({"user_id": [1], "event_timestamp": [T0], "note": ["c"]}))
    store.compact("notes")
    assert store.read("notes").collect()["note"].to_list() == ["\x85", "c", "b\u2028"]


def test_written_and_compacted_files_are_compressed(store: FeatureStore) -> None:
    store.apply([USER, STATS])
    store.write("user_stats", stats_rows([1, 2], [0, 1]))
    store.compact("user_stats")
    folder = Path(store.path) / "views" / "user_stats"
    for path in folder.glob("*.parquet"):
        meta = pq.ParquetFile(path).metadata
        codecs = {meta.row_group(0).column(i).compression for i in range(meta.num_columns)}
        assert codecs == {"SNAPPY"}, path.name
