"""The online store across processes: killed syncs and readers racing syncs (SPEC, "Online
semantics": ``materialize`` is atomic; readers in other processes never see a half-applied
sync; each call reads one consistent snapshot).

Children come from the preloaded fork server of ``tests/_procs.py``; their code is in
``tests/_online_procs.py``.

- A child running a large ``materialize`` (300k rows, 50k entities) is SIGKILLed at a random
  moment, several times. After each kill the online store is the previous sync or the whole new
  one — never a mix: every entity carries the generation of one version, and the lookups equal
  ``get_historical_features`` pinned (``as_of``) to the version ``describe`` reports as
  materialized. Finally a ``materialize`` completes and parity holds with the current data.
- A reader looks two views up in a loop while a writer writes the same generation to both and
  syncs them with one ``materialize()``: no lookup ever sees two generations.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from polarstore import FeatureStore

from . import _online_procs as procs
from ._procs import T0, USER, Log, Progress, finish, kill_after, start, wait_for

KILLS = 5
SEED = 20240607


def check_synced_state(store: FeatureStore, version: int) -> None:
    """The online store is exactly the sync of ``version``: one generation, and parity with
    ``get_historical_features`` pinned to that version."""
    users = pl.DataFrame({"user_id": [*range(procs.BIG_USERS), -1]})
    now = procs.big_latest(version)
    online = store.get_online_features(users, ["big:*"], now=now)
    assert online["gen"].head(procs.BIG_USERS).unique().to_list() == [version]
    spine = users.with_columns(event_timestamp=pl.lit(now))
    offline = store.get_historical_features(spine, ["big:*"], as_of={"big": version}).collect()
    assert_frame_equal(online, offline.drop("event_timestamp"))
    for user in (0, procs.BIG_USERS // 2, procs.BIG_USERS - 1):
        vector = store.get_feature_vector({"user_id": user}, ["big:*"], now=now)
        assert vector == online.filter(pl.col("user_id") == user).drop("user_id").row(0, named=True)


def test_materialize_killed_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    repo = tmp_path / "repo"
    with FeatureStore(repo) as store:
        store.apply([USER, procs.BIG])
        store.write("big", procs.big_batch(0))
        started = time.perf_counter()
        store.materialize()
        took = time.perf_counter() - started  # how long a sync of one batch takes here
        check_synced_state(store, 0)
    for kill in range(1, KILLS + 1):
        with FeatureStore(repo) as store:
            before = store.describe("big")["materialized_version"]
            assert store.write("big", procs.big_batch(kill)) == kill
        log = Log(tmp_path / f"materialize-{kill}.log")
        # Kills spread over the sync of every batch not synced yet (and a bit after it).
        delay = rng.uniform(0.0, 1.5 * took * (kill - before))
        progress = kill_after(procs.materialize_then_wait, (str(repo), str(log.path)), log, delay)
        with FeatureStore(repo) as store:
            synced = store.describe("big")["materialized_version"]
            assert synced in {before, kill}
            if progress.done:
                assert synced == kill, "an acknowledged sync was lost"
            check_synced_state(store, synced)
    with FeatureStore(repo) as store:
        summary = store.materialize()["big"]
        assert summary["version"] == KILLS
        assert store.describe("big")["materialized_version"] == KILLS
        check_synced_state(store, KILLS)
        assert store.materialize()["big"]["rows_read"] == 0


def test_readers_never_see_two_syncs_in_one_lookup(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with FeatureStore(repo) as store:
        store.apply([USER, procs.GEN_A, procs.GEN_B])
        store.write("gen_a", procs.gen_rows("gen_a", 0))
        store.write("gen_b", procs.gen_rows("gen_b", 0))
        store.materialize()
    stop = tmp_path / "stop"
    writer_log, reader_log = Log(tmp_path / "writer.log"), Log(tmp_path / "reader.log")
    writer = start(procs.lockstep_writer, str(repo), str(writer_log.path), str(stop), 1)
    reader = start(procs.lockstep_reader, str(repo), str(reader_log.path), str(stop))
    try:
        wait_for(writer_log, "ready", writer)
        wait_for(reader_log, "ready", reader)
        # Run until the reader has seen a dozen syncs (or ~15 s pass on a slow machine).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and reader.is_alive() and writer.is_alive():
            if sum(words[0] == "seen" for words in reader_log.lines()) >= 12:
                break
            time.sleep(0.05)
    finally:
        stop.touch()
        finish([writer, reader], [writer_log, reader_log])
    seen = [int(words[1]) for words in reader_log.lines() if words[0] == "seen"]
    assert len(seen) >= 2, "the reader saw no sync happen: nothing was tested"
    # Generations only move forward: each lookup reads a later (or the same) snapshot.
    assert seen == sorted(seen)
    done = Progress.of(writer_log).done
    assert max(seen) <= max(done)
    with FeatureStore(repo) as store:
        got = store.get_online_features(
            {"user_id": [0, 1]}, procs.GEN_FEATURES, full_feature_names=True
        )
        assert got["gen_a__gen"].to_list() == got["gen_b__gen"].to_list() == [max(done)] * 2


def test_a_map_grown_by_another_process_is_adopted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process grew the LMDB map past this one's size: this process's next
    transactions (delete_entities, materialize, lookups) adopt the new size."""
    import polarstore._online

    from ._procs import EVENTS, assert_online_matches_offline, batch_rows

    monkeypatch.setattr(polarstore._online, "_INITIAL_MAP_SIZE", 64 << 10)  # this process only
    with FeatureStore(tmp_path / "repo") as store:
        store.apply([USER, EVENTS])
        store.write("events", batch_rows(0))
        store.materialize()  # this process opens the map, tiny
        for batch in (1, 2, 3):
            log = Log(tmp_path / f"grow-{batch}.log")
            proc = start(procs.grow_map, str(tmp_path / "repo"), str(log.path), batch)
            finish([proc], [log])
            if batch == 1:
                store.delete_entities("events", {"user_id": [3, 1_000]})
            elif batch == 2:
                store.write("events", batch_rows(3))
                store.materialize()
            else:
                got = store.get_online_features({"user_id": [1_001]}, ["events:batch"], now=T0)
                assert got["batch"].to_list() == [None]  # written at T0 + 3 min
                vector = store.get_feature_vector({"user_id": 1_002}, ["events:batch"])
                assert vector == {"batch": 3}
        assert_online_matches_offline(store, keys=[3, 1_000])
