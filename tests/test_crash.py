"""Crash safety: a process SIGKILLed at any moment loses nothing that was committed.

Children (from a preloaded fork server, see ``tests/_procs.py``) loop doing one operation —
``write``, ``apply``, ``save_dataset``, ``write`` + ``materialize`` — and are SIGKILLed after a
random delay drawn from a seeded generator (the same delays on every run; where in an
operation each kill lands still varies with the machine's speed). After every kill the
repository is reopened and checked against the child's log:

- an acknowledged operation is in the repository, whole; an unacknowledged one is whole or
  absent (every written batch carries its id: a batch appears with all of its rows or none);
- the registry is the last acknowledged state or the one in flight, never a mix or a torn file;
- every listed dataset loads, and gives exactly the training set it was saved with;
- a retried keyed write whose first attempt may have committed does not duplicate rows;
- finally a ``materialize`` brings the online store to parity with the offline store.

Some tests inject the kill at an exact point instead (after the Delta commit of a write; after
a new dataset spine is written but before the registry names it; after the offline commit of
``delete_entities`` and before its online delete).
"""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from polarstore import FeatureStore
from polarstore._offline import seq_floor

from . import _procs
from ._procs import (
    EVENTS,
    FEATURES,
    USER,
    Log,
    Progress,
    assert_online_matches_offline,
    batch_key,
    batch_rows,
    batch_sizes,
    commit_versions,
    dataset_name,
    generation,
    kill_after,
    spine_of,
)

KILLS = 12
SEED = 20240105


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    with FeatureStore(path) as store:
        store.apply([USER, EVENTS])
    return path


def test_write_killed_at_random_moments(repo: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    present: set[int] = set()
    lost_in_flight = 0
    batch = 0
    for kill in range(KILLS):
        log = Log(tmp_path / f"write-{kill}.log")
        progress = kill_after(
            _procs.write_loop, (str(repo), str(log.path), batch), log, _delay(rng)
        )
        with FeatureStore(repo) as store:
            sizes = batch_sizes(store)  # every batch whole
            assert set(progress.done) <= set(sizes), "an acknowledged write was lost"
            assert set(sizes) <= present | set(progress.begun), "a batch that never ran appeared"
            for flying in progress.in_flight:
                lost_in_flight += flying not in sizes
                if batch_key(flying) is not None:
                    # The job retries with its key: whether or not the killed attempt had
                    # committed, the batch ends up there exactly once.
                    version = store.versions()["events"]
                    again = store.write(
                        "events", batch_rows(flying), idempotency_key=batch_key(flying)
                    )
                    assert again == version + (flying not in sizes)
            present = set(batch_sizes(store))
            versions = commit_versions(store)
            # One commit per batch, versions without gaps: no empty or duplicate commits.
            assert sorted(versions.values()) == list(range(store.versions()["events"] + 1))
            for b, v in progress.done.items():
                assert int(v) == versions[b]
        batch = max(progress.begun, default=batch - 1) + 1
    # Most kills land before a commit: if none did, this test did not test anything.
    assert lost_in_flight >= 1
    with FeatureStore(repo) as store:
        history = store.history("events")
        assert history["version"].to_list() == list(range(history.height))
        assert set(history["rows_added"].to_list()) == {_procs.BATCH_ROWS}
        assert store.write("events", batch_rows(batch)) == history.height  # not wedged
        store.materialize()
        assert_online_matches_offline(store)


def test_write_and_materialize_killed_at_random_moments(repo: Path, tmp_path: Path) -> None:
    """A light version (the online tests kill materialize harder): a crash mid-sync leaves
    the online store at its last sync, and the next materialize catches up."""
    rng = random.Random(SEED + 1)
    batch = 0
    for kill in range(KILLS // 2):
        log = Log(tmp_path / f"mat-{kill}.log")
        args = (str(repo), str(log.path), batch, True)
        progress = kill_after(_procs.write_loop, args, log, _delay(rng))
        with FeatureStore(repo) as store:
            batch_sizes(store)
            synced = store.describe("events")["materialized_version"]
            if synced is not None:
                # The online store is the whole of one earlier sync: parity with that version.
                now = store.read("events", as_of={"events": synced}).collect()
                keys = sorted(set(now["user_id"].to_list()))
                at = now["event_timestamp"].max()
                online = store.get_online_features({"user_id": keys}, FEATURES, now=at)  # type: ignore[arg-type]
                spine = pl.DataFrame({"user_id": keys, "event_timestamp": [at] * len(keys)})
                offline = store.get_historical_features(
                    spine, FEATURES, as_of={"events": synced}
                ).collect()
                assert_frame_equal(online, offline.drop("event_timestamp"))
        batch = max(progress.begun, default=batch - 1) + 1
    with FeatureStore(repo) as store:
        store.materialize()
        assert_online_matches_offline(store)


def test_apply_killed_at_random_moments(repo: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED + 2)
    gen = 0
    last_done = -1
    for kill in range(KILLS):
        log = Log(tmp_path / f"apply-{kill}.log")
        progress = kill_after(_procs.apply_loop, (str(repo), str(log.path), gen), log, _delay(rng))
        with FeatureStore(repo) as store:
            view = store.get_feature_view("evolving")
            got = int(view.description.split()[1])
            last_done = max(progress.done, default=last_done)
            assert got in {last_done, *progress.in_flight}
            # Every definition in the file is from the same generation: one whole file.
            user, expected, service = generation(got)
            assert view == store.get_feature_view("evolving") == expected
            assert store.get_feature_service("svc") == service
            assert {e.name: e for e in store.list_entities()}["user"] == user
            # Definitions the loop never touched are intact.
            assert store.get_feature_view("events").schema == EVENTS.schema
            last_done = got
        gen = max(progress.begun, default=gen - 1) + 1
    with FeatureStore(repo) as store:
        store.apply(generation(gen))  # the registry lock was released by the dead children
        assert store.get_feature_view("evolving").description == f"gen {gen}"


def test_save_dataset_killed_at_random_moments(repo: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED + 3)
    gen = 0
    train_gens: set[int] = set()
    batch = 0
    with FeatureStore(repo) as store:
        store.write("events", batch_rows(batch))
    for kill in range(KILLS):
        log = Log(tmp_path / f"save-{kill}.log")
        progress = kill_after(_procs.save_loop, (str(repo), str(log.path), gen), log, _delay(rng))
        with FeatureStore(repo) as store:
            datasets = store.list_datasets()
            for g in progress.done:
                assert dataset_name(g) in datasets, "an acknowledged dataset was lost"
            for name, entry in datasets.items():
                loaded = store.load_dataset(name).collect()
                g = loaded["gen"][0]
                assert dataset_name(g) == name
                assert loaded.height == entry["rows"] == spine_of(g).height
                expected = store.get_historical_features(
                    spine_of(g), FEATURES, as_of=entry["versions"]
                ).collect()
                assert_frame_equal(loaded, expected)
            if "train" in datasets:
                g = store.load_dataset("train").collect()["gen"][0]
                done_train = [d for d in progress.done if dataset_name(d) == "train"]
                assert g in {max(done_train, default=-1), *progress.in_flight, *train_gens}
                train_gens = {g}
            # New data between kills, so each generation pins a different version.
            batch += 1
            store.write("events", batch_rows(batch))
        gen = max(progress.begun, default=gen - 1) + 1
    with FeatureStore(repo) as store:
        store.materialize()
        assert_online_matches_offline(store)


def test_retry_after_a_kill_right_after_commit_writes_nothing(repo: Path, tmp_path: Path) -> None:
    with FeatureStore(repo) as store:
        store.write("events", batch_rows(0))
    log = Log(tmp_path / "crash.log")
    proc = _procs.start(_procs.crash_during, str(repo), str(log.path), "write-after-commit")
    proc.join()
    assert proc.exitcode == -9, Progress.of(log).errors
    with FeatureStore(repo) as store:
        assert store.versions()["events"] == 1  # the killed write did commit
        again = store.write("events", batch_rows(1), idempotency_key=batch_key(1))
        assert again == 1
        assert batch_sizes(store) == {0: _procs.BATCH_ROWS, 1: _procs.BATCH_ROWS}
        assert store.history("events").height == 2
        # A different key is a different job: it writes.
        assert store.write("events", batch_rows(3), idempotency_key="batch-3-rerun") == 2
        # The committed rows carry the version that committed them.
        seq = pl.read_delta(str(repo / "views" / "events"))["_polarstore_seq"]
        assert seq.filter(seq >= seq_floor(1)).len() == 2 * _procs.BATCH_ROWS


def test_kill_between_spine_and_registry_keeps_the_old_dataset(repo: Path, tmp_path: Path) -> None:
    with FeatureStore(repo) as store:
        store.write("events", batch_rows(0))
        saved = store.save_dataset("train", spine_of(0), FEATURES).collect()
        store.write("events", batch_rows(1))
    log = Log(tmp_path / "crash.log")
    proc = _procs.start(_procs.crash_during, str(repo), str(log.path), "save-before-registry")
    proc.join()
    assert proc.exitcode == -9, Progress.of(log).errors
    with FeatureStore(repo) as store:
        assert_frame_equal(store.load_dataset("train").collect(), saved)
        # And saving again works and replaces it whole.
        new = store.save_dataset("train", spine_of(2), FEATURES, overwrite=True).collect()
        assert_frame_equal(store.load_dataset("train").collect(), new)
        assert new.height == spine_of(2).height != saved.height


def test_a_kill_between_the_offline_and_online_delete_is_repaired_by_materialize(
    repo: Path, tmp_path: Path
) -> None:
    with FeatureStore(repo) as store:
        store.write("events", batch_rows(0))
    log = Log(tmp_path / "crash.log")
    proc = _procs.start(_procs.crash_during, str(repo), str(log.path), "delete-before-online")
    proc.join()
    assert proc.exitcode == -9, Progress.of(log).errors
    with FeatureStore(repo) as store:
        assert store.read("events").filter(pl.col("user_id").is_in([3, 4])).collect().is_empty()
        store.materialize()
        got = store.get_online_features({"user_id": [3, 4]}, ["events:x"], now=_procs.T0)
        assert got["x"].to_list() == [None, None]
        assert_online_matches_offline(store, keys=[3, 4])
        # Repaired once: the next sync has nothing to do.
        assert store.materialize()["events"]["rows_read"] == 0


def test_delete_entities_killed_at_random_moments(repo: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED + 4)
    batch = 0
    for kill in range(6):
        log = Log(tmp_path / f"delete-{kill}.log")
        progress = kill_after(
            _procs.delete_loop, (str(repo), str(log.path), batch), log, _delay(rng)
        )
        with FeatureStore(repo) as store:
            store.materialize()
            deleted = {u for b in progress.done for u in _procs.deleted_users(b)}
            assert_online_matches_offline(store, keys=sorted(deleted))
        batch = max(progress.begun, default=batch - 1) + 1


def _delay(rng: random.Random) -> float:
    # A child's first operation is slower (lazy initialisation in polars and delta-rs), so
    # this range covers first and later operations, and several per child.
    return rng.uniform(0.0, 0.6)
