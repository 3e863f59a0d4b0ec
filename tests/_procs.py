"""Subprocess helpers for the crash and concurrency tests.

Child processes come from a ``forkserver`` that has already imported polarstore, so starting
one costs ~10 ms instead of an interpreter start (~0.5 s): that is what makes dozens of
SIGKILLs per test affordable. Children report progress as lines in an append-only log file
(one ``os.write`` per line on an ``O_APPEND`` descriptor, so a SIGKILL never leaves half a
line and never loses a line that was written): ``ready`` once set up, then ``begin <n>`` /
``done <n> <result>`` around every operation. The parent reads the log after the kill to know
which operations were acknowledged (must be in the repository, whole), which one was in flight
(whole or absent) and which never started (absent).

The data model shared by the tests: a view ``events`` keyed by ``user_id`` whose rows carry
the id of the batch that wrote them and their row number within it, so "every batch is whole
or absent" is a group-by.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl
from polars.testing import assert_frame_equal

from polarstore import Entity, FeatureService, FeatureStore, FeatureView

CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["polarstore", "polars", "deltalake", "lmdb", "tests._procs"])

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
BATCH_ROWS = 24
USERS = 30
USER = Entity("user", join_keys="user_id")
EVENTS = FeatureView(
    "events",
    entities=[USER],
    schema={"batch": pl.Int64, "row": pl.Int64, "x": pl.Float64, "s": pl.String},
)
FEATURES = ["events:*"]


def batch_rows(batch: int) -> pl.DataFrame:
    """The rows batch ``batch`` writes: deterministic, so a retry writes the same rows.

    Users and event times overlap between batches (same user, same time in two batches), so
    the write order decides ties and online/offline parity depends on it.
    """
    rows = range(BATCH_ROWS)
    return pl.DataFrame(
        {
            "user_id": [(batch * 7 + r) % USERS for r in rows],
            "event_timestamp": [T0 + timedelta(minutes=(batch * 13 + r * 5) % 240) for r in rows],
            "batch": [batch] * BATCH_ROWS,
            "row": list(rows),
            "x": [batch * 100.0 + r for r in rows],
            "s": [f"b{batch}-r{r}-é" for r in rows],
        }
    )


def batch_key(batch: int) -> str | None:
    """Odd batches are written with an idempotency key, even ones without."""
    return f"batch-{batch}" if batch % 2 else None


# --- logs -----------------------------------------------------------------------------------


class Log:
    """An append-only line log that survives SIGKILL of the writer."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def write(self, *words: object) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (" ".join(map(str, words)) + "\n").encode())
        finally:
            os.close(fd)

    def lines(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        return [line.split(" ") for line in self.path.read_text().splitlines()]


@dataclass
class Progress:
    """What a child's log says: acknowledged operations, the one in flight, errors."""

    begun: list[int] = field(default_factory=list)
    done: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, log: Log) -> Progress:
        out = cls()
        for words in log.lines():
            if words[0] == "begin":
                out.begun.append(int(words[1]))
            elif words[0] == "done":
                out.done[int(words[1])] = " ".join(words[2:])
            elif words[0] == "error":
                out.errors.append(" ".join(words[1:]))
        return out

    @property
    def in_flight(self) -> list[int]:
        return [n for n in self.begun if n not in self.done]


@contextmanager
def reporting(log: Log) -> Iterator[None]:
    """Log an exception as an ``error`` line (with its traceback) and exit non-zero."""
    try:
        yield
    except BaseException:
        log.write("error", traceback.format_exc().replace("\n", " | "))
        sys.stderr.flush()
        os._exit(1)


# --- running children ------------------------------------------------------------------------


def start(target: Callable[..., None], *args: Any) -> multiprocessing.process.BaseProcess:
    proc = CTX.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def wait_for(log: Log, word: str, proc: multiprocessing.process.BaseProcess) -> None:
    """Wait until ``log`` has a line starting with ``word`` (fail if the child dies first)."""
    deadline = time.monotonic() + 120
    while not any(words[0] == word for words in log.lines()):
        if not proc.is_alive():
            proc.join()
            msg = f"child exited ({proc.exitcode}) before logging {word!r}: {log.lines()}"
            raise AssertionError(msg)
        if time.monotonic() > deadline:  # pragma: no cover - a hung child
            proc.kill()
            msg = f"child did not log {word!r} in time: {log.lines()}"
            raise AssertionError(msg)
        time.sleep(0.002)


def kill_after(
    target: Callable[..., None], args: tuple[Any, ...], log: Log, delay: float
) -> Progress:
    """Start ``target(*args)``, wait until it is ready, SIGKILL it ``delay`` seconds later."""
    proc = start(target, *args)
    wait_for(log, "ready", proc)
    time.sleep(delay)
    proc.kill()
    proc.join()
    progress = Progress.of(log)
    assert not progress.errors, progress.errors
    assert proc.exitcode == -signal.SIGKILL, (proc.exitcode, log.lines())
    return progress


def finish(procs: list[multiprocessing.process.BaseProcess], logs: list[Log]) -> None:
    """Join children that end on their own; fail with their logged errors if any failed."""
    for proc in procs:
        proc.join(timeout=120)
    errors = [e for log in logs for e in Progress.of(log).errors]
    assert not errors, errors
    assert [p.exitcode for p in procs] == [0] * len(procs)


def die_in(owner: Any, name: str) -> None:
    """Make ``owner.name`` SIGKILL the process when called: a crash at an exact point."""

    def crash(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(owner, name, crash)


# --- checks -----------------------------------------------------------------------------------


def batch_sizes(store: FeatureStore, **kw: Any) -> dict[int, int]:
    """Rows per batch id in the view; asserts every batch present has all of its rows."""
    rows = store.read("events", **kw).collect()
    sizes = rows.group_by("batch").agg(
        pl.len().alias("n"), (pl.col("row").sort() == pl.int_range(pl.len())).all().alias("ok")
    )
    broken = sizes.filter((pl.col("n") != BATCH_ROWS) | ~pl.col("ok"))
    assert broken.is_empty(), f"partial or duplicated batches:\n{broken}"
    return dict(zip(sizes["batch"].to_list(), sizes["n"].to_list(), strict=True))


def commit_versions(store: FeatureStore) -> dict[int, int]:
    """The Delta version that committed each batch, read from the write-sequence column.

    Read with ``pl.read_delta`` (delta-rs's own reader, not polarstore's scan): the table
    must make sense to other Delta readers too. Asserts a batch came from one commit.
    """
    if store.versions()["events"] < 0:
        return {}
    table = pl.read_delta(str(store.path / "views" / "events"))
    per_batch = table.group_by("batch").agg(
        (pl.col("_polarstore_seq") // (1 << 32)).unique().alias("versions")
    )
    out: dict[int, int] = {}
    for batch, versions in per_batch.iter_rows():
        assert len(versions) == 1, f"batch {batch} was committed by versions {versions}"
        out[batch] = versions[0]
    return out


def assert_online_matches_offline(
    store: FeatureStore, view: str = "events", keys: list[int] | None = None
) -> None:
    """SPEC's train/serve parity at ``now`` = the latest event time, for every entity (and
    for ``keys``: e.g. deleted entities, which must read as null)."""
    rows = store.read(view).collect()
    keys = sorted({*rows["user_id"].to_list(), *(keys or []), 10_000})  # and a missing entity
    now = rows["event_timestamp"].max() if rows.height else T0
    online = store.get_online_features({"user_id": keys}, [f"{view}:*"], now=now)  # type: ignore[arg-type]
    spine = pl.DataFrame({"user_id": keys, "event_timestamp": [now] * len(keys)})
    offline = store.get_historical_features(spine, [f"{view}:*"]).collect()
    assert_frame_equal(online, offline.drop("event_timestamp"))


# --- children ---------------------------------------------------------------------------------


def write_loop(repo: str, log_path: str, first: int, materialize: bool = False) -> None:
    """Write batches ``first``, ``first + 1``, ... until killed (optionally materializing)."""
    log = Log(log_path)
    with reporting(log):
        store = FeatureStore(repo)
        log.write("ready")
        batch = first
        while True:
            log.write("begin", batch)
            version = store.write("events", batch_rows(batch), idempotency_key=batch_key(batch))
            if materialize:
                store.materialize()
            log.write("done", batch, version)
            batch += 1


def generation(gen: int) -> list[Any]:
    """Definitions of generation ``gen``: each object says which generation it belongs to."""
    user = Entity("user", join_keys="user_id", description=f"gen {gen}")
    view = FeatureView(
        "evolving",
        entities=[user],
        schema={f"f{j}": pl.Int64 for j in range(gen % 7 + 1)},
        description=f"gen {gen}",
        tags={"gen": str(gen)},
        online=False,
    )
    service = FeatureService("svc", [f"evolving:f{gen % 7}"], description=f"gen {gen}")
    return [user, view, service]


def apply_loop(repo: str, log_path: str, first: int) -> None:
    log = Log(log_path)
    with reporting(log):
        store = FeatureStore(repo)
        log.write("ready")
        gen = first
        while True:
            log.write("begin", gen)
            store.apply(generation(gen))
            log.write("done", gen, "ok")
            gen += 1


def spine_of(gen: int) -> pl.DataFrame:
    """The training spine of generation ``gen``: ``gen % 5 + 1`` rows tagged with ``gen``."""
    n = gen % 5 + 1
    return pl.DataFrame(
        {
            "user_id": [(gen + i) % USERS for i in range(n)],
            "event_timestamp": [T0 + timedelta(hours=2 + i) for i in range(n)],
            "gen": [gen] * n,
        }
    )


def dataset_name(gen: int) -> str:
    """Even generations overwrite ``train``; odd ones save a dataset of their own."""
    return "train" if gen % 2 == 0 else f"ds_{gen}"


def save_loop(repo: str, log_path: str, first: int) -> None:
    log = Log(log_path)
    with reporting(log):
        store = FeatureStore(repo)
        log.write("ready")
        gen = first
        while True:
            log.write("begin", gen)
            store.save_dataset(dataset_name(gen), spine_of(gen), FEATURES, overwrite=gen % 2 == 0)
            log.write("done", gen, "ok")
            gen += 1


def crash_during(repo: str, log_path: str, what: str) -> None:
    """Run one operation with a SIGKILL injected at an exact point inside it."""
    log = Log(log_path)
    with reporting(log):
        from polarstore._offline import OfflineStore
        from polarstore._registry import Registry

        store = FeatureStore(repo)
        log.write("ready")
        if what == "write-after-commit":
            # The Delta commit is done; the job dies before it can record success.
            die_in(OfflineStore, "_committed_version")
            store.write("events", batch_rows(1), idempotency_key=batch_key(1))
        elif what == "delete-before-online":
            # The delete is committed offline; the job dies before the online delete.
            from polarstore._online import OnlineStore

            store.materialize()
            die_in(OnlineStore, "delete")
            store.delete_entities("events", {"user_id": [3, 4]})
        elif what == "save-before-registry":
            # The new spine file is written; the registry entry is not yet updated.
            die_in(Registry, "update")
            store.save_dataset("train", spine_of(2), FEATURES, overwrite=True)
        log.write("error", "the injected crash did not happen")


def deleted_users(batch: int) -> list[int]:
    """The users ``delete_loop`` deletes after writing batch ``batch``."""
    return [batch % USERS, (batch * 3 + 1) % USERS]


def delete_loop(repo: str, log_path: str, first: int) -> None:
    """Write batch n, materialize, delete two of its users; n = first, first + 1, ..."""
    log = Log(log_path)
    with reporting(log):
        store = FeatureStore(repo)
        log.write("ready")
        batch = first
        while True:
            log.write("begin", batch)
            store.write("events", batch_rows(batch))
            store.materialize()
            store.delete_entities("events", {"user_id": deleted_users(batch)})
            log.write("done", batch, "ok")
            batch += 1


def concurrent_writer(repo: str, log_path: str, batches: list[int], barrier: Any) -> None:
    log = Log(log_path)
    with reporting(log):
        store = FeatureStore(repo)
        barrier.wait(timeout=120)
        for batch in batches:
            log.write("begin", batch)
            version = store.write("events", batch_rows(batch), idempotency_key=batch_key(batch))
            log.write("done", batch, version)


def keyed_writer(repo: str, log_path: str, batches: list[int], barrier: Any) -> None:
    """Write every batch with the key ``job-<batch>``, as retries of one job would."""
    log = Log(log_path)
    with reporting(log):
        store = FeatureStore(repo)
        barrier.wait(timeout=120)
        for batch in batches:
            log.write("begin", batch)
            version = store.write("events", batch_rows(batch), idempotency_key=f"job-{batch}")
            log.write("done", batch, version)


def materializer(repo: str, log_path: str, stop_file: str, barrier: Any) -> None:
    """Materialize in a loop until ``stop_file`` exists, then once more."""
    log = Log(log_path)
    with reporting(log):
        store = FeatureStore(repo)
        barrier.wait(timeout=120)
        n = 0
        while not os.path.exists(stop_file):
            log.write("begin", n)
            summary = store.materialize()
            log.write("done", n, summary["events"]["version"])
            n += 1
        log.write("begin", n)
        summary = store.materialize()
        log.write("done", n, summary["events"]["version"])
