"""The online store: the latest row per entity of each online view, in one LMDB environment.

This is the only module that imports ``lmdb``. One database: each view's entries live under a
4-byte id prefix (the record codec, ``_records``), metadata under the prefix 0 (the sync,
``_sync``). (Named LMDB databases were tried: opening one needs a write transaction, or a read
transaction whose handle py-lmdb drops when it ends, so a reader would wait on a running sync.)
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import polars as pl

from polarstore._definitions import FeatureService, FeatureView
from polarstore._errors import PolarstoreError, ValidationError
from polarstore._frames import entity_frame
from polarstore._offline import OfflineStore
from polarstore._records import Layout, cast_keys, key_check, stored_layout
from polarstore._retrieval import Requested, resolve_features, service_named
from polarstore._sync import Progress, delete_prefix, meta_key, micros, sync_view
from polarstore._time import to_utc

__all__ = ["OnlineStore"]

_INITIAL_MAP_SIZE = 1 << 30  # virtual address space only; the file grows as pages are used
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
_PROGRESS_ROWS = 1_000_000
_FOREVER = 1 << 80  # µs, more than any two representable times are apart

# py-lmdb's stubs type values as ``bytes | memoryview``; transactions here never use buffers=True,
# so values are bytes.
_Txn = Any

_generation = 0
# LMDB forbids opening one environment twice in a process (py-lmdb refuses to), so every
# OnlineStore on a folder shares one: folder -> (environment, ids of the stores using it).
# The last store to close it closes it.
_SHARED: dict[str, tuple[lmdb.Environment, set[int]]] = {}
_SHARED_LOCK = threading.Lock()


def _acquire(path: Path, owner: object) -> lmdb.Environment:
    with _SHARED_LOCK:
        shared = _SHARED.get(os.path.realpath(path))
        if shared is None:
            path.mkdir(parents=True, exist_ok=True)
            env = lmdb.open(
                str(path), map_size=_INITIAL_MAP_SIZE, max_readers=1024, readahead=False
            )
            shared = _SHARED[os.path.realpath(path)] = (env, set())
        shared[1].add(id(owner))
        return shared[0]


def _release(path: Path, owner: object) -> None:
    with _SHARED_LOCK:
        shared = _SHARED.get(os.path.realpath(path))
        if shared is not None:
            shared[1].discard(id(owner))
            if not shared[1]:
                del _SHARED[os.path.realpath(path)]
                shared[0].close()


def _forked() -> None:
    global _generation, _SHARED_LOCK
    _generation += 1
    _SHARED_LOCK = threading.Lock()  # another thread may have held it at the fork
    # The inherited environments must be closed before the child can open its own. That is
    # safe when no other thread of the parent was inside a lookup at the fork: mdb_env_close
    # clears only the reader slots of the child's pid (the parent's slots and locks stay).
    for env, _ in _SHARED.values():
        with contextlib.suppress(lmdb.Error):
            env.close()
    _SHARED.clear()


# An LMDB environment must not be used in a child after fork(): reopen there.
os.register_at_fork(after_in_child=_forked)


# --- the store ------------------------------------------------------------------------------


class _VectorView:
    """One view of a cached ``get_feature_vector`` plan; adopts the stored layout lazily."""

    def __init__(self, view: FeatureView, wanted: list[Requested]) -> None:
        self.view = view
        self.layout_key = meta_key("layout", view.name)
        self.wanted = [(r.feature, r.output) for r in wanted]
        self.nulls = {output: None for _, output in self.wanted}
        self.layout_raw: bytes | None = None
        self.fetch: Callable[[_Txn, Mapping[str, Any], int, dict[str, Any]], None] = self._absent
        self.env: Any = None  # the environment and snapshot id the layout was last checked in
        self.snapshot = -1

    def check_layout(self, txn: _Txn, env: Any, snapshot: int) -> None:
        raw = txn.get(self.layout_key)
        if raw is None:
            self.layout_raw, self.fetch = None, self._absent
        elif raw != self.layout_raw:
            self.adopt(raw)
        self.env, self.snapshot = env, snapshot

    def _absent(self, txn: _Txn, entity: Mapping[str, Any], now_us: int, out: dict) -> None:
        key_check(self.view, entity)
        out.update(self.nulls)

    def adopt(self, raw: bytes) -> None:
        """Compile the lookup for the layout the values were stored with."""
        layout = stored_layout(raw, self.view, "get_feature_vector")
        self.layout_raw = raw
        encode = layout.key_encoder("get_feature_vector")
        nulls = self.nulls
        # No ttl: a span no event time can be outside of, so one chained comparison serves.
        ttl = _FOREVER if self.view.ttl is None else self.view.ttl // _US
        n = len(layout.features)
        wanted = [(output, layout.index.get(f)) for f, output in self.wanted]
        picks = [
            (output, 3 + i, 3 + n + i, layout.converters[i])
            for output, i in wanted
            if i is not None
        ]
        variable = any(i in layout.var for _, i in wanted if i is not None)
        picked = [(output, i) for output, i in wanted if i is not None]
        unpack = layout.struct.unpack_from

        def fetch(txn: _Txn, entity: Mapping[str, Any], now_us: int, out: dict) -> None:
            key = encode(entity)
            value = None if key is None else txn.get(key)
            if value is None:
                out.update(nulls)
                return
            fields = unpack(value)
            # Outside the ttl, or from the future of ``now`` (the latest row is all there is).
            if not now_us - ttl <= fields[0] <= now_us:
                out.update(nulls)
                return
            if variable:
                decoded = layout.decode_one(value)
                out.update(nulls)
                for output, i in picked:
                    out[output] = decoded[i]
                return
            if len(picks) != len(nulls):
                out.update(nulls)  # features added after the last sync
            for output, valid, slot, convert in picks:
                x = fields[slot]
                out[output] = None if not fields[valid] else x if convert is None else convert(x)

        self.fetch = fetch


class OnlineStore:
    """The LMDB environment of one repository, opened lazily and reopened after ``fork()``.

    One ``OnlineStore`` may be shared by threads: lookups each use their own read transaction,
    and syncs and deletes are serialised by a lock (and, across processes, by LMDB's writer lock).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._env: lmdb.Environment | None = None
        self._generation = _generation
        self._lock = threading.RLock()
        self._plans: dict[Any, list[_VectorView]] = {}
        self._plans_state: Any = None
        self._plans_checked = 0.0

    def __repr__(self) -> str:
        return f"OnlineStore({str(self.path)!r})"

    # --- environment -----------------------------------------------------------------------

    def _environment(self, *, create: bool) -> lmdb.Environment | None:
        if self._generation != _generation:
            # Inherited from the parent process (and closed by _forked): open our own.
            self._env, self._plans = None, {}
            self._lock = threading.RLock()  # another thread may have held it at the fork
            self._generation = _generation
        if self._env is None:
            if not create and not (self.path / "data.mdb").exists():
                return None
            with self._lock:
                if self._env is None:
                    try:
                        self._env = _acquire(self.path, self)
                    except (lmdb.Error, OSError) as e:
                        msg = f"cannot open the online store at {self.path}: {e}"
                        raise PolarstoreError(msg) from e
        return self._env

    @contextmanager
    def _read(self) -> Iterator[_Txn | None]:
        env = self._environment(create=False)
        if env is None:
            yield None
            return
        try:
            txn = env.begin()
        except lmdb.MapResizedError:
            env.set_mapsize(0)  # another process grew the map: adopt its size
            txn = env.begin()
        try:
            yield txn
        finally:
            txn.abort()

    def close(self) -> None:
        with self._lock:
            if self._env is not None and self._generation == _generation:
                _release(self.path, self)
            self._env, self._plans = None, {}

    def state(self, view: str) -> dict[str, Any]:
        """The view's sync state: version, end and time of the last sync ({} if never)."""
        with self._read() as txn:
            raw = None if txn is None else txn.get(meta_key("state", view))
        return {} if raw is None else json.loads(raw)

    # --- materialize -----------------------------------------------------------------------

    def materialize(
        self,
        offline: OfflineStore,
        views: Sequence[FeatureView],
        *,
        end: datetime | None,
        progress: bool | None,
    ) -> dict[str, dict[str, Any]]:
        """Sync every view in one write transaction; retried with a larger map when full."""
        end_us = None if end is None else micros(end)
        env = self._environment(create=True)
        assert env is not None
        if progress is None:
            progress = sys.stderr.isatty() and (
                sum(offline.row_count(v) for v in views) >= _PROGRESS_ROWS
            )
        with self._lock:
            while True:
                try:
                    return self._materialize(env, offline, views, end_us, progress)
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)

    def _materialize(
        self,
        env: lmdb.Environment,
        offline: OfflineStore,
        views: Sequence[FeatureView],
        end_us: int | None,
        show: bool,
    ) -> dict[str, dict[str, Any]]:
        summary: dict[str, dict[str, Any]] = {}
        # The write transaction is taken first: it is also the lock that serialises syncs
        # from several processes, so each one reads the state the previous one committed.
        with env.begin(write=True) as txn, Progress(show) as report:
            for view in views:
                started = time.perf_counter()
                report(f"{view.name}: reading new rows")
                read, written, version = sync_view(txn, offline, view, end_us, report)
                summary[view.name] = {
                    "rows_read": read,
                    "entities_written": written,
                    "version": version,
                    "seconds": round(time.perf_counter() - started, 3),
                }
                report(f"{view.name}: {read:,} rows read, {written:,} entities written")
        return summary

    # --- deletes ---------------------------------------------------------------------------

    def delete(self, view: FeatureView, keys: pl.DataFrame) -> int:
        """Remove entities of a view; returns how many were online."""
        env = self._environment(create=False)
        if env is None:
            return 0
        with self._lock, env.begin(write=True) as txn:
            raw = txn.get(meta_key("layout", view.name))
            if raw is None:
                return 0
            layout = Layout.from_json(raw)
            if list(layout.key_names) != list(view.join_keys):
                # Stored under other keys: drop all of the view's online data (materialize
                # rebuilds it) rather than risk keeping a deleted entity servable.
                delete_prefix(txn, layout.prefix)
                txn.delete(meta_key("layout", view.name))
                txn.delete(meta_key("state", view.name))
                return 0
            frame = cast_keys(keys.drop_nulls().unique(), layout, "delete_entities")
            return sum(txn.delete(k) for k in layout.encode_keys(frame))

    # --- lookups ---------------------------------------------------------------------------

    def lookup(
        self, entity_rows: Any, requested: Sequence[Requested], now: datetime
    ) -> pl.DataFrame:
        """Features for a batch of entities, from one read transaction."""
        where = "get_online_features"
        by_view: dict[str, list[Requested]] = {}
        join_keys: list[str] = []
        for r in requested:
            by_view.setdefault(r.view.name, []).append(r)
            join_keys += [k for k in r.view.join_keys if k not in join_keys]
        frame = entity_frame(entity_rows, join_keys, where=where)
        now_us = micros(now)
        columns: dict[str, pl.Series] = {}
        with self._read() as txn:
            for wanted in by_view.values():
                view = wanted[0].view
                raw = None if txn is None else txn.get(meta_key("layout", view.name))
                if txn is None or raw is None:
                    for r in wanted:
                        columns[r.output] = pl.Series(r.output, [None] * frame.height)
                    continue
                layout = stored_layout(raw, view, where)
                columns.update(_lookup_view(txn, layout, frame, wanted, now_us, where))
        return frame.with_columns(
            columns[r.output].cast(r.view.schema[r.feature]).alias(r.output) for r in requested
        )

    def vector(
        self,
        store: Any,
        entity: Mapping[str, Any],
        features: Any,
        *,
        full_feature_names: bool,
        now: datetime | None,
    ) -> dict[str, Any]:
        """One entity's features as a dict, with the resolved plan cached per request shape."""
        if type(entity) is not dict and not isinstance(entity, Mapping):
            msg = f"get_feature_vector: entity must be a dict of join keys, got {entity!r}."
            raise ValidationError(msg)
        plan = self._plan(store, features, full_feature_names)
        now_us = time.time_ns() // 1000 if now is None else micros(to_utc(now, what="now"))
        out: dict[str, Any] = {}
        env = self._env if self._generation == _generation else None
        if env is None:
            env = self._environment(create=False)
            if env is None:
                for part in plan:
                    part._absent(None, entity, now_us, out)
                return out
        try:
            txn = env.begin()
        except lmdb.MapResizedError:
            env.set_mapsize(0)
            txn = env.begin()
        try:
            snapshot = txn.id()
            for part in plan:
                # Layouts change only in a sync, which also moves the snapshot id: re-read the
                # layout once per snapshot, not on every call.
                if part.snapshot != snapshot or part.env is not env:
                    part.check_layout(txn, env, snapshot)
                part.fetch(txn, entity, now_us, out)
        finally:
            txn.abort()
        return out

    def _plan(self, store: Any, features: Any, full_feature_names: bool) -> list[_VectorView]:
        clock = time.monotonic()
        cached = store._registry._cache  # None right after an apply() by this process
        stale = cached is None or cached[2] is not self._plans_state
        if stale or clock - self._plans_checked > 1.0:
            # Re-reading the registry costs a stat(); once a second is enough to see re-applies
            # by other processes (this process's own apply() resets the registry's cache).
            state = store._state()
            if state is not self._plans_state:
                self._plans, self._plans_state = {}, state
            self._plans_checked = clock
        try:
            cache_key: Any = (_hashable(features), full_feature_names)
            plan = self._plans.get(cache_key)
        except TypeError:
            cache_key, plan = None, None
        if plan is None:
            state = store._state()
            requested = resolve_features(
                state.views,
                service_named(features, state.services),
                full_feature_names=full_feature_names,
            )
            groups: dict[str, list[Requested]] = {}
            for r in requested:
                groups.setdefault(r.view.name, []).append(r)
            plan = [_VectorView(rs[0].view, rs) for rs in groups.values()]
            if cache_key is not None:
                self._plans[cache_key] = plan
        return plan


def _hashable(features: Any) -> Any:
    """A cache key for a features argument (plans are dropped whenever the registry changes)."""
    if type(features) is list:  # the hot path: a list of "view:feature" strings
        return tuple(features)
    if isinstance(features, FeatureService):  # its tags (a dict) make it unhashable as is
        features = ("service", features.name, *features.features)
    if isinstance(features, (list, tuple)):
        return tuple(("view", f.name) if isinstance(f, FeatureView) else f for f in features)
    hash(features)
    return features


def _lookup_view(
    txn: _Txn,
    layout: Layout,
    frame: pl.DataFrame,
    wanted: Sequence[Requested],
    now_us: int,
    where: str,
) -> dict[str, pl.Series]:
    """One view's features for every row of ``frame``: each distinct key is read once."""
    keys = cast_keys(frame, layout, where)
    names = list(layout.key_names)
    distinct = keys.drop_nulls().unique().sort(names)
    codes = keys.join(
        distinct.with_row_index("__code"), on=names, how="left", maintain_order="left"
    ).get_column("__code")
    encoded = layout.encode_keys(distinct)
    with txn.cursor() as cursor:
        found = cursor.getmulti(encoded)
    values = [v for _, v in found]
    if len(found) == len(encoded):
        positions = codes
    else:
        index = {k: i for i, (k, _) in enumerate(found)}
        slots = pl.Series([index.get(k) for k in encoded], dtype=pl.UInt32)
        positions = slots.gather(codes)
    if not values:
        return {r.output: pl.Series(r.output, [None] * frame.height) for r in wanted}
    records, payloads = layout.decode_values(values)
    # Online holds only the latest row: one from the future of ``now`` cannot answer for it.
    live = records["ts"] <= now_us
    ttl = wanted[0].view.ttl
    if ttl is not None:
        live &= records["ts"] >= now_us - ttl // _US
    out: dict[str, pl.Series] = {}
    for r in wanted:
        i = layout.index.get(r.feature)
        if i is None:  # added to the view after the last sync
            out[r.output] = pl.Series(r.output, [None] * frame.height)
            continue
        column = layout.column(i, records, payloads, r.view.schema[r.feature])
        valid = pl.Series(live & records[f"v{i}"].astype(bool))
        column = pl.select(pl.when(valid).then(column)).to_series()
        out[r.output] = column.gather(positions).alias(r.output)
    return out
