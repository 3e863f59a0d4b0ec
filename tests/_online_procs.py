"""Children for ``test_online_processes.py``, started from the fork server of ``_procs``.

Two data models:

- ``big``: batches of ``BIG_ROWS`` rows over ``BIG_USERS`` users; in batch ``g`` every user's
  latest row carries ``gen = g``, so a whole sync of batch ``g`` sets every user to ``g`` and a
  half-applied one would show two generations at once;
- ``gen_a`` and ``gen_b``: two views written in lockstep, generation ``g`` in both, then synced
  by one ``materialize()``: a lookup over both views must never see two generations.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import polars as pl

from polarstore import FeatureStore, FeatureView

from ._procs import T0, USER, Log, reporting

BIG_USERS = 50_000
BIG_ROWS = 300_000
BIG = FeatureView("big", entities=[USER], schema={"gen": pl.Int64, "x": pl.Float64, "s": pl.String})
GEN_USERS = 300
GEN_A = FeatureView("gen_a", entities=[USER], schema={"gen": pl.Int64, "x": pl.Float64})
GEN_B = FeatureView("gen_b", entities=[USER], schema={"gen": pl.Int64, "s": pl.String})
GEN_FEATURES = ["gen_a:gen", "gen_a:x", "gen_b:gen", "gen_b:s"]


def big_batch(gen: int) -> pl.DataFrame:
    """Batch ``gen``: every user has several rows, the latest at ``big_latest(gen)``."""
    i = pl.int_range(BIG_ROWS)
    return pl.select(
        user_id=i % BIG_USERS,
        event_timestamp=pl.lit(T0 + timedelta(hours=gen)) + pl.duration(seconds=i // BIG_USERS),
        gen=pl.lit(gen, pl.Int64),
        x=i.cast(pl.Float64) + gen * 1e6,
        s=pl.format("g{}-{}", pl.lit(gen), i),
    )


def big_latest(gen: int) -> Any:
    """The latest event time of batch ``gen`` (and of every version up to it)."""
    return T0 + timedelta(hours=gen, seconds=(BIG_ROWS - 1) // BIG_USERS)


def gen_rows(view: str, gen: int) -> pl.DataFrame:
    users = list(range(GEN_USERS))
    rows = {"user_id": users, "event_timestamp": [T0 + timedelta(minutes=gen)] * GEN_USERS}
    rows["gen"] = [gen] * GEN_USERS
    if view == "gen_a":
        rows["x"] = [gen + u / 1000 for u in users]
    else:
        rows["s"] = [f"{gen}:{u}" for u in users]
    return pl.DataFrame(rows)


def materialize_then_wait(repo: str, log_path: str) -> None:
    """One ``materialize()``; then wait to be killed (the kill may land before or after)."""
    log = Log(log_path)
    with reporting(log):
        store = FeatureStore(repo)
        log.write("ready")
        log.write("begin", 0)
        summary = store.materialize()
        log.write("done", 0, summary["big"]["version"])
        time.sleep(600)


def lockstep_writer(repo: str, log_path: str, stop_file: str, first: int) -> None:
    """Write generation g to both views, sync them in one call; g = first, first + 1, ..."""
    log = Log(log_path)
    with reporting(log):
        store = FeatureStore(repo)
        log.write("ready")
        gen = first
        while not os.path.exists(stop_file):
            store.write("gen_a", gen_rows("gen_a", gen))
            store.write("gen_b", gen_rows("gen_b", gen))
            log.write("begin", gen)
            store.materialize()
            log.write("done", gen, "ok")
            gen += 1


def lockstep_reader(repo: str, log_path: str, stop_file: str) -> None:
    """Look both views up in a loop; every answer must carry one generation only."""
    log = Log(log_path)
    with reporting(log):
        store = FeatureStore(repo)
        users = list(range(GEN_USERS))
        log.write("ready")
        seen: set[int] = set()
        n = 0
        while not os.path.exists(stop_file):
            got = store.get_online_features(
                {"user_id": users}, GEN_FEATURES, full_feature_names=True
            )
            gens = set(got["gen_a__gen"].to_list()) | set(got["gen_b__gen"].to_list())
            assert len(gens) == 1, f"one lookup saw generations {sorted(gens)}"
            (gen,) = gens
            assert got["gen_a__x"].to_list() == [gen + u / 1000 for u in users]
            assert got["gen_b__s"].to_list() == [f"{gen}:{u}" for u in users]
            user = n % GEN_USERS
            vector = store.get_feature_vector(
                {"user_id": user}, GEN_FEATURES, full_feature_names=True
            )
            assert vector["gen_a__gen"] == vector["gen_b__gen"], vector
            assert vector["gen_b__s"] == f"{vector['gen_b__gen']}:{user}", vector
            if gen not in seen:
                seen.add(gen)
                log.write("seen", gen)
            n += 1
        log.write("calls", n)


def grow_map(repo: str, log_path: str, batch: int) -> None:
    """Write and sync ~1.5 MB of rows (batch ``batch``, users 1000 and up): past the map of a
    process that opened the store with a tiny map, which must adopt the size LMDB records."""
    log = Log(log_path)
    with reporting(log):
        store = FeatureStore(repo)
        log.write("begin", batch)
        n = 5_000
        store.write(
            "events",
            pl.DataFrame(
                {
                    "user_id": range(1_000, 1_000 + n),
                    "event_timestamp": [T0 + timedelta(minutes=batch)] * n,
                    "batch": [batch] * n,
                    "row": range(n),
                    "x": [float(batch)] * n,
                    "s": ["s" * 250] * n,
                }
            ),
        )
        store.materialize()
        log.write("done", batch, "ok")
