"""Concurrency: several processes, or several threads of one process, on one repository.

Processes (from the preloaded fork server in ``tests/_procs.py``) start together on a barrier.

What is supported, and held here:

- several processes writing to the same view (and creating its table) at once: writes to one
  view are serialised by a per-view ``flock``; each write is one Delta commit, lands exactly
  once, and gets its own version; versions are strictly increasing in every process;
- several processes retrying the same keyed writes at once: each key commits once;
- several processes running ``materialize`` at once, while another writes: syncs are
  serialised by LMDB's writer lock and each reads the state the previous one committed, so no
  sync is lost and the final state has train/serve parity;
- threads sharing one ``FeatureStore``: ``write``, ``get_historical_features``, ``read``,
  ``materialize``, ``get_online_features`` and ``get_feature_vector`` from several threads at
  once. Each read sees one committed version (no partial write), and each online lookup one
  whole sync.

Not supported (not tested as working): ``apply`` racing with a ``write`` to the view it
changes (the write validates against whichever definition it read); ``vacuum`` while a
``LazyFrame`` from ``get_historical_features``/``read`` is not collected yet (it may delete the
files the plan reads); object stores, where only delta-rs's optimistic commit guards writers.
"""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from polarstore import FeatureStore

from . import _procs
from ._procs import (
    BATCH_ROWS,
    EVENTS,
    FEATURES,
    T0,
    USER,
    USERS,
    Log,
    Progress,
    assert_online_matches_offline,
    batch_rows,
    batch_sizes,
    commit_versions,
)

WRITERS = 3
BATCHES_EACH = 6


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    with FeatureStore(path) as store:
        store.apply([USER, EVENTS])
    return path


def test_processes_writing_one_view_at_once(repo: Path, tmp_path: Path) -> None:
    # The table does not exist yet: the first commits race to create it too.
    barrier = _procs.CTX.Barrier(WRITERS)
    logs = [Log(tmp_path / f"writer-{w}.log") for w in range(WRITERS)]
    plans = [[w * 100 + i for i in range(BATCHES_EACH)] for w in range(WRITERS)]
    procs = [
        _procs.start(_procs.concurrent_writer, str(repo), str(log.path), plan, barrier)
        for log, plan in zip(logs, plans, strict=True)
    ]
    _procs.finish(procs, logs)
    total = WRITERS * BATCHES_EACH
    with FeatureStore(repo) as store:
        sizes = batch_sizes(store)
        assert sorted(sizes) == sorted(b for plan in plans for b in plan)  # each exactly once
        returned: dict[int, int] = {}
        for log in logs:
            done = {b: int(v) for b, v in Progress.of(log).done.items()}
            mine = [done[b] for b in sorted(done)]
            assert mine == sorted(mine)  # increasing...
            assert len(set(mine)) == len(mine)  # ... strictly
            returned.update(done)
        assert sorted(returned.values()) == list(range(total))
        assert commit_versions(store) == returned  # the version returned is the one committed
        history = store.history("events")
        assert history["version"].to_list() == list(range(total))
        assert history["rows_added"].to_list() == [BATCH_ROWS] * total
        assert set(history["operation"]) == {"write"}
        assert history["timestamp"].is_sorted()
        # Each version holds exactly the batches committed up to it.
        middle = total // 2
        assert len(batch_sizes(store, as_of={"events": middle})) == middle + 1


def test_processes_retrying_the_same_keyed_writes_at_once(repo: Path, tmp_path: Path) -> None:
    barrier = _procs.CTX.Barrier(WRITERS)
    rng = random.Random(7)
    batches = list(range(BATCHES_EACH))
    logs = [Log(tmp_path / f"keyed-{w}.log") for w in range(WRITERS)]
    procs = [
        _procs.start(
            _procs.keyed_writer,
            str(repo),
            str(log.path),
            rng.sample(batches, len(batches)),
            barrier,
        )
        for log in logs
    ]
    _procs.finish(procs, logs)
    with FeatureStore(repo) as store:
        assert batch_sizes(store) == dict.fromkeys(batches, BATCH_ROWS)
        assert store.history("events").height == BATCHES_EACH
        assert sorted(commit_versions(store).values()) == list(range(BATCHES_EACH))


def test_two_processes_materializing_while_a_third_writes(repo: Path, tmp_path: Path) -> None:
    barrier = _procs.CTX.Barrier(3)
    stop = tmp_path / "writer-finished"
    writer_log = Log(tmp_path / "writer.log")
    mat_logs = [Log(tmp_path / f"materializer-{m}.log") for m in range(2)]
    writer = _procs.start(
        _procs.concurrent_writer, str(repo), str(writer_log.path), list(range(10)), barrier
    )
    mats = [
        _procs.start(_procs.materializer, str(repo), str(log.path), str(stop), barrier)
        for log in mat_logs
    ]
    _procs.finish([writer], [writer_log])
    stop.touch()
    _procs.finish(mats, mat_logs)
    with FeatureStore(repo) as store:
        # No materialize here: the two last syncs, after the last write, must be complete.
        current = store.versions()["events"]
        assert store.describe("events")["materialized_version"] == current
        for log in mat_logs:
            synced = [int(v) for v in Progress.of(log).done.values() if v != "None"]
            assert synced == sorted(synced)  # never went backwards
            assert synced[-1] == current
        assert_online_matches_offline(store)
        batch_sizes(store)


def test_threads_sharing_one_store(tmp_path: Path) -> None:
    """Two writer threads, a materializer, and readers checking what they see is whole.

    Every batch writes every user at one event time, later for later batch ids; so at any
    moment the latest value of *all* users is from the same batch (the newest committed), as
    long as reads see whole commits (offline) and whole syncs (online). Readers check that,
    and that what they see never goes back in time.
    """
    rounds = 8
    with FeatureStore(tmp_path / "repo") as store:
        store.apply([USER, EVENTS])
        users = list(range(USERS))
        spine = pl.DataFrame(
            {"user_id": users, "event_timestamp": [T0 + timedelta(days=9)] * USERS}
        )
        errors: list[BaseException] = []
        writing = threading.Event()
        writing.set()

        def all_users_rows(batch: int) -> pl.DataFrame:
            return pl.DataFrame(
                {
                    "user_id": users,
                    "event_timestamp": [T0 + timedelta(minutes=batch)] * USERS,
                    "batch": [batch] * USERS,
                    "row": users,
                    "x": [float(batch)] * USERS,
                    "s": [str(batch)] * USERS,
                }
            )

        def writer(first: int) -> None:
            for batch in range(first, 2 * rounds, 2):  # the two writers interleave batch ids
                store.write("events", all_users_rows(batch))

        def materializer() -> None:
            while writing.is_set():
                store.materialize()

        def one_batch(values: list[object], seen: list[int]) -> None:
            distinct = set(values)
            assert len(distinct) == 1, f"a torn read: users see batches {distinct}"
            (batch,) = distinct
            if batch is not None:
                assert seen[-1] <= batch, f"went back in time: {seen[-1]} then {batch}"  # type: ignore[operator]
                seen.append(batch)  # type: ignore[arg-type]

        def historical_reader() -> None:
            seen = [-1]
            while writing.is_set():
                got = store.get_historical_features(spine, ["events:batch"]).collect()
                one_batch(got["batch"].to_list(), seen)
                rows = store.read("events").collect()
                assert rows.height % USERS == 0

        def online_reader() -> None:
            seen, seen_one = [-1], [-1]
            while writing.is_set():
                got = store.get_online_features({"user_id": users}, ["events:batch"])
                one_batch(got["batch"].to_list(), seen)
                vector = store.get_feature_vector({"user_id": 3}, FEATURES)
                one_batch([vector["batch"]], seen_one)
                assert vector["row"] in (None, 3)

        def guarded(target: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                try:
                    target()
                except BaseException as e:  # reported by the main thread
                    errors.append(e)
                    writing.clear()

            return run

        writers = [threading.Thread(target=guarded(lambda w=w: writer(w))) for w in range(2)]  # type: ignore[misc]
        others = [
            threading.Thread(target=guarded(f))
            for f in (materializer, historical_reader, online_reader)
        ]
        for t in others + writers:
            t.start()
        for t in writers:
            t.join()
        writing.clear()
        for t in others:
            t.join()
        if errors:
            raise errors[0]
        rows = store.read("events").collect()
        assert sorted(set(rows["batch"])) == list(range(2 * rounds))
        assert rows.height == 2 * rounds * USERS
        store.materialize()
        assert_online_matches_offline(store)
        online = store.get_online_features({"user_id": users}, ["events:batch"])
        assert set(online["batch"]) == {2 * rounds - 1}


def test_threads_first_using_the_online_store_at_once(repo: Path) -> None:
    """The online store is opened lazily, on first use: threads racing to open it must share
    one LMDB environment (LMDB refuses a second open of one environment in a process)."""
    with FeatureStore(repo) as store:
        store.write("events", batch_rows(0))
        store.materialize()
    # polars imports numpy lazily through a proxy whose first use is not thread-safe (two
    # threads loading it at once can fail in polars/_dependencies.py): load it here, so this
    # test is about polarstore's own lazy opening.
    pl.Series(np.zeros(1))
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: widen any race
    try:
        for _ in range(20):
            errors = _first_lookups_at_once(repo, threads=6)
            if errors:
                raise errors[0]
    finally:
        sys.setswitchinterval(old)


def _first_lookups_at_once(repo: Path, *, threads: int) -> list[BaseException]:
    """A fresh FeatureStore whose first online lookups come from ``threads`` threads at once."""
    errors: list[BaseException] = []
    with FeatureStore(repo) as store:
        barrier = threading.Barrier(threads)

        def lookup() -> None:
            barrier.wait()
            try:
                got = store.get_online_features({"user_id": [0]}, ["events:batch"])
                assert got["batch"].to_list() == [0]
            except BaseException as e:  # reported by the caller
                errors.append(e)

        running = [threading.Thread(target=lookup) for _ in range(threads)]
        for t in running:
            t.start()
        for t in running:
            t.join()
    return errors


def test_lookups_in_threads_while_materialize_grows_the_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync that outgrows the LMDB map resizes it, which invalidates every open transaction
    of the process: lookups in other threads must wait for the resize, never fail."""
    import polarstore._online

    monkeypatch.setattr(polarstore._online, "_INITIAL_MAP_SIZE", 64 << 10)  # grows often
    users = 4_000
    with FeatureStore(tmp_path / "repo") as store:
        store.apply([USER, EVENTS])
        errors: list[BaseException] = []
        syncing = threading.Event()
        syncing.set()

        def rows(batch: int) -> pl.DataFrame:
            return pl.DataFrame(
                {
                    "user_id": range(batch * users, (batch + 1) * users),
                    "event_timestamp": [T0] * users,
                    "batch": [batch] * users,
                    "row": range(users),
                    "x": [float(batch)] * users,
                    "s": ["s" * 200] * users,  # ~1 MB a batch: several doublings
                }
            )

        def reader() -> None:
            try:
                while syncing.is_set():
                    store.get_online_features({"user_id": [0, 1, users]}, ["events:batch"])
                    store.get_feature_vector({"user_id": 1}, FEATURES)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        store.write("events", rows(0))
        store.materialize()
        readers = [threading.Thread(target=reader) for _ in range(3)]
        for t in readers:
            t.start()
        try:
            for batch in range(1, 6):
                store.write("events", rows(batch))
                store.materialize()
        finally:
            syncing.clear()
            for t in readers:
                t.join()
        if errors:
            raise errors[0]
        got = store.get_online_features({"user_id": [0, 5 * users]}, ["events:batch"])
        assert got["batch"].to_list() == [0, 5]
