"""The online store: the latest row per entity of each online view, in one LMDB environment.

This is the only module that imports ``lmdb``. One database: each view's entries live under a
4-byte id prefix (the record codec, ``_records``), metadata under the prefix 0 (the sync,
``_sync``). (Named LMDB databases were tried: opening one needs a write transaction, or a read
transaction whose handle py-lmdb drops when it ends, so a reader would wait on a running sync.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import polars as pl

from polarstore._aggregations import AggregationView
from polarstore._definitions import FeatureService, FeatureView, dtype_from_str
from polarstore._errors import PolarstoreError, ValidationError
from polarstore._frames import check_declared_keys, entity_frame
from polarstore._offline import OfflineStore
from polarstore._ondemand import VectorDerived
from polarstore._records import Layout, cast_keys, key_check, stored_layout
from polarstore._retrieval import Requested, plan_requested, service_named
from polarstore._sync import (
    Progress,
    delete_synced,
    drop_view,
    meta_key,
    micros,
    settle_deletes,
    sync_view,
)
from polarstore._time import to_utc
from polarstore._windows import WindowVector, check_online, lookup_windows, sync_windows

__all__ = ["OnlineStore"]

_INITIAL_MAP_SIZE = 1 << 30  # virtual address space only; the file grows as pages are used
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
_ZERO = timedelta(0)
_PROGRESS_ROWS = 1_000_000
_FOREVER = 1 << 80  # µs, more than any two representable times are apart

# py-lmdb's stubs type values as ``bytes | memoryview``; transactions here never use buffers=True,
# so values are bytes.
_Txn = Any
_T = TypeVar("_T")

_generation = 0
# LMDB forbids opening one environment twice in a process (py-lmdb refuses to), so every
# OnlineStore on a folder shares one: folder -> (environment, ids of the stores using it, its
# gate). The last store to close it closes it.
_SHARED: dict[str, tuple[lmdb.Environment, set[int], _Gate]] = {}
_SHARED_LOCK = threading.Lock()


class _Gate:
    """Keeps ``set_mapsize`` away from this process's open transactions, without a lock per read.

    LMDB allows a map resize only while the process has no transaction open, and py-lmdb
    invalidates every open transaction of the environment when it resizes, so a lookup in
    another thread would fail with "closed/deleted/dropped object". Each transaction enters
    and leaves the gate; a resize closes it, waits until no transaction is inside and runs
    alone. Entering costs two ``next()`` calls on ``itertools.count`` (atomic under the GIL)
    and a flag test; the resize, which happens a few times in a store's life, does the waiting.
    """

    def __init__(self) -> None:
        # Bound ``__next__`` of the two counters: the cheapest atomic step there is.
        self.inc = itertools.count().__next__
        self.dec = itertools.count().__next__
        self.closed = False
        self._lock = threading.Lock()  # held by the resizer while the gate is closed
        self.retired = False  # the environment was closed (replaced by a compacted copy)

    def enter(self) -> None:
        while True:
            self.inc()
            if not self.closed:
                return
            self.dec()  # back out, and wait for the resize to finish
            if self.retired:
                raise _RetiredError
            with self._lock:
                pass

    def leave(self) -> None:
        self.dec()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            self.closed = True
            try:
                # Read ``dec`` before ``inc``: the difference then never undercounts the
                # transactions inside (each call here moves both counters by one).
                while self.dec() != self.inc():
                    time.sleep(0.0002)
                yield
            finally:
                self.closed = self.retired  # a retired gate stays closed


class _RetiredError(Exception):
    """The environment was closed by a compaction: reopen it and try again."""


def _acquire(path: Path, owner: object) -> tuple[lmdb.Environment, _Gate]:
    with _SHARED_LOCK:
        shared = _SHARED.get(os.path.realpath(path))
        if shared is None:
            _refuse_links(path)
            try:
                path.mkdir(parents=True, exist_ok=True)
                _refuse_links(path)
                # mode: data.mdb and lock.mdb follow the umask like every other file
                # (py-lmdb's default, 0o755, made them executable).
                env = lmdb.open(
                    str(path),
                    map_size=_INITIAL_MAP_SIZE,
                    max_readers=1024,
                    readahead=False,
                    mode=0o666,
                )
            except (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError) as e:
                raise _damaged(path, e) from e
            except (lmdb.Error, OSError) as e:
                msg = f"cannot open the online store at {path}: {e}"
                raise PolarstoreError(msg) from e
            shared = _SHARED[os.path.realpath(path)] = (env, set(), _Gate())
        shared[1].add(id(owner))
        return shared[0], shared[2]


def _release(path: Path, owner: object) -> None:
    with _SHARED_LOCK:
        shared = _SHARED.get(os.path.realpath(path))
        if shared is not None:
            shared[1].discard(id(owner))
            if not shared[1]:
                del _SHARED[os.path.realpath(path)]
                shared[0].close()


def _refuse_links(path: Path) -> None:
    """Refuse an online folder, data.mdb or lock.mdb that is a link (or not a plain file).

    LMDB opens and writes its files wherever a symlink points: a link planted in a shared
    repository would make the next ``materialize`` overwrite a file outside it. Checked
    before opening; a link planted while this process has the environment open is not seen
    (LMDB opens the files once, at ``lmdb.open``).
    """
    for candidate, kind in (
        (path, stat.S_ISDIR),
        (path / "data.mdb", stat.S_ISREG),
        (path / "lock.mdb", stat.S_ISREG),
    ):
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            continue
        except OSError as e:
            msg = f"cannot open the online store at {path}: {e}"
            raise PolarstoreError(msg) from e
        if stat.S_ISLNK(mode) or not kind(mode):
            what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file or folder"
            msg = (
                f"the online store's {candidate} is {what}; polarstore never follows links out "
                f"of the repository. Remove it (the online store is rebuilt by materialize())."
            )
            raise PolarstoreError(msg)


def _damaged(path: Path, e: Exception) -> PolarstoreError:
    msg = (
        f"the online store file {path / 'data.mdb'} is damaged ({e}). It holds only a copy of "
        f"the offline tables: delete the folder {path} and run materialize() to rebuild it."
    )
    return PolarstoreError(msg)


_DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.PanicError)
_LOW_DISK = 16 << 20  # bytes: below this, a failed commit is taken for a full disk


def _write_failed(path: Path, e: Exception) -> PolarstoreError:
    """The error for a write transaction LMDB could not commit (nothing of it was applied).

    A full disk shows as ENOSPC, or as LMDB's EIO for a short write: tell by the free space.
    """
    try:
        free: int | None = shutil.disk_usage(path).free
    except OSError:
        free = None
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space" in str(e)
    if full or (free is not None and free < _LOW_DISK):
        msg = (
            f"the disk holding the online store {path} is full ({free or 0:,} bytes free): "
            f"{e}. The online store is unchanged; free some space and run materialize() again."
        )
    else:
        msg = f"updating the online store at {path} failed: {e}. The online store is unchanged."
    return PolarstoreError(msg)


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _busy(data: Path) -> PolarstoreError:
    msg = (
        f"the online store {data} is open in another process, so it was not compacted: the "
        "bytes of deleted values may remain in its free pages. Stop the other processes using "
        "this repository and run vacuum(retention=timedelta(0), force=True) again."
    )
    return PolarstoreError(msg)


def _forked() -> None:
    global _generation, _SHARED_LOCK
    _generation += 1
    _SHARED_LOCK = threading.Lock()  # another thread may have held it at the fork
    # The inherited environments must be closed before the child can open its own. That is
    # safe when no other thread of the parent was inside a lookup at the fork: mdb_env_close
    # clears only the reader slots of the child's pid (the parent's slots and locks stay).
    for env, _, _ in _SHARED.values():
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
        encode = layout.key_encoder("get_feature_vector", self.view.key_dtypes)
        nulls = self.nulls
        # No ttl: a span no event time can be outside of, so one chained comparison serves.
        ttl = _FOREVER if self.view.ttl is None else self.view.ttl // _US
        strict = 0 if self.view.allow_exact_match else 1  # event time < now, not <=
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
            if not now_us - ttl <= fields[0] <= now_us - strict:
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


def _begin(env: lmdb.Environment, gate: _Gate, path: Path) -> _Txn:
    """A read transaction, inside the gate (the caller leaves it after ``abort``)."""
    while True:
        gate.enter()
        try:
            return env.begin()
        except lmdb.MapResizedError:
            pass  # another process grew the map: adopt its size, with no transaction open
        except _DAMAGE as e:
            gate.leave()
            raise _damaged(path, e) from e
        except BaseException:
            gate.leave()
            raise
        gate.leave()
        with gate.exclusive():
            env.set_mapsize(0)


def _materialize(
    txn: _Txn,
    offline: OfflineStore,
    views: Sequence[FeatureView | AggregationView],
    end_us: int | None,
    show: bool,
) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    # The write transaction is taken first: it is also the lock that serialises syncs from
    # several processes, so each one reads the state the previous one committed.
    with Progress(show) as report:
        for view in views:
            started = time.perf_counter()
            report(f"{view.name}: reading new rows")
            if isinstance(view, AggregationView):
                read, written, version = sync_windows(txn, offline, view, end_us, report)
            else:
                read, written, version = sync_view(txn, offline, view, end_us, report)
            summary[view.name] = {
                "rows_read": read,
                "entities_written": written,
                "version": version,
                "seconds": round(time.perf_counter() - started, 3),
            }
            report(f"{view.name}: {read:,} rows read, {written:,} entities written")
    return summary


class OnlineStore:
    """The LMDB environment of one repository, opened lazily and reopened after ``fork()``.

    One ``OnlineStore`` may be shared by threads: lookups each use their own read transaction,
    and syncs and deletes are serialised by a lock (and, across processes, by LMDB's writer lock).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._env: lmdb.Environment | None = None
        self._gate = _Gate()  # replaced by the shared environment's own when opened
        self._generation = _generation
        self._lock = threading.RLock()
        # _VectorView / WindowVector parts, then a VectorDerived
        self._plans: dict[Any, list[Any]] = {}
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
                _refuse_links(self.path)  # a dangling link is refused, not taken for "empty"
                return None
            with self._lock:
                if self._env is None:
                    self._env, self._gate = _acquire(self.path, self)
        return self._env

    @contextmanager
    def _read(self) -> Iterator[_Txn | None]:
        env = self._environment(create=False)
        if env is None:
            yield None
            return
        try:
            txn = _begin(env, self._gate, self.path)
        except _RetiredError:
            self._env = None
            env = self._environment(create=False)
            if env is None:
                yield None
                return
            txn = _begin(env, self._gate, self.path)
        try:
            yield txn
        except _DAMAGE as e:
            raise _damaged(self.path, e) from e
        finally:
            txn.abort()
            self._gate.leave()

    def _write(self, work: Callable[[_Txn], _T]) -> _T:
        """``work(txn)`` in one write transaction, retried after adopting or growing the map.

        Another process may have grown the map (MapResizedError: adopt its size) or this
        transaction may not fit (MapFullError: double it); either way nothing was committed
        and ``work`` runs again from the start.
        """
        with self._lock:
            while True:
                env = self._environment(create=True)
                assert env is not None
                gate = self._gate
                try:
                    gate.enter()
                except _RetiredError:
                    self._env = None
                    continue
                try:
                    with env.begin(write=True) as txn:
                        return work(txn)
                except lmdb.MapResizedError:
                    size = 0  # adopt the size the other process set
                except lmdb.MapFullError:
                    size = env.info()["map_size"] * 2
                except _DAMAGE as e:
                    raise _damaged(self.path, e) from e
                except (lmdb.Error, OSError) as e:
                    raise _write_failed(self.path, e) from e
                finally:
                    gate.leave()
                with gate.exclusive():
                    env.set_mapsize(size)

    def settle_deletes(
        self, offline: OfflineStore, views: Sequence[FeatureView | AggregationView]
    ) -> None:
        """Before a purge of the Delta logs: record the deletes already reflected online."""
        if self._environment(create=False) is None:
            return

        def work(txn: _Txn) -> None:
            for view in views:
                settle_deletes(txn, offline, view)

        self._write(work)

    def compact(self) -> str | None:
        """Replace data.mdb by a compacted copy, without the free pages that still hold the
        bytes of deleted values; returns the file's path relative to the folder (None if no
        online store).

        Only when no other process has the online store open (their mappings would keep the
        old file, and their writes would go to it): otherwise nothing is replaced and a
        PolarstoreError says so. Threads of this process wait, then reopen the new file.
        """
        env = self._environment(create=False)
        if env is None:
            return None
        data, lock = self.path / "data.mdb", self.path / "lock.mdb"
        with self._lock, _SHARED_LOCK, self._gate.exclusive():
            before = _stamp(data)
            tmp = Path(tempfile.mkdtemp(prefix=".compact-", dir=self.path))
            try:
                env.copy(str(tmp), compact=True)
                # Closing the environment drops this process's locks on lock.mdb (POSIX
                # closes all of a process's fcntl locks on a file with any descriptor of it),
                # so the exclusive lock below can only be taken once it is closed.
                self._gate.retired = True
                env.close()
                _SHARED.pop(os.path.realpath(self.path), None)
                self._env = None
                fd = os.open(lock, os.O_RDWR)
                try:
                    try:
                        # What every LMDB process holds a shared lock on while it has the
                        # environment open; holding it exclusively keeps new openers waiting.
                        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
                    except OSError as e:
                        raise _busy(data) from e
                    if _stamp(data) != before:  # written by a process since the copy
                        raise _busy(data)
                    for stale in self.path.glob(".compact-*"):  # left by a killed compaction
                        if stale != tmp:
                            shutil.rmtree(stale, ignore_errors=True)
                    copy = tmp / "data.mdb"
                    with copy.open("rb+") as f:
                        os.fsync(f.fileno())
                    os.replace(copy, data)
                    _fsync_dir(self.path)
                finally:
                    os.close(fd)  # releases the lock: the next opener starts from the copy
            except lmdb.Error as e:
                msg = f"compacting the online store {data} failed: {e}; it is unchanged."
                raise PolarstoreError(msg) from e
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return "data.mdb"

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
        views: Sequence[FeatureView | AggregationView],
        *,
        end: datetime | None,
        progress: bool | None,
        drop: Sequence[str] = (),
    ) -> dict[str, dict[str, Any]]:
        """Sync every view in one write transaction; the online data of ``drop`` (views that
        are no longer online) goes in the same transaction."""
        end_us = None if end is None else micros(end)
        if progress is None:
            progress = sys.stderr.isatty() and (
                sum(
                    offline.row_count(v.source_view if isinstance(v, AggregationView) else v)
                    for v in views
                )
                >= _PROGRESS_ROWS
            )

        def work(txn: _Txn) -> dict[str, dict[str, Any]]:
            for name in drop:
                drop_view(txn, name)
            return _materialize(txn, offline, views, end_us, bool(progress))

        return self._write(work)

    # --- deletes ---------------------------------------------------------------------------

    def delete(self, view: FeatureView | AggregationView, keys: pl.DataFrame, version: int) -> int:
        """Remove entities deleted offline by table ``version``; returns how many were online.

        Should this fail or the process die first, the next ``materialize`` repairs it.
        """
        if self._environment(create=False) is None:
            return 0
        try:
            return self._write(lambda txn: delete_synced(txn, view, keys, version))
        except PolarstoreError as e:
            msg = (
                f"delete_entities({view.name!r}): the rows are deleted offline (version "
                f"{version}), but not yet online: {e} The next materialize() removes them."
            )
            raise PolarstoreError(msg) from e

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
        _refuse_offline_only([wanted[0].view for wanted in by_view.values()], where)
        for wanted in by_view.values():
            if isinstance(wanted[0].view, AggregationView):
                check_online(wanted[0].view, [r.feature for r in wanted], where)
        now_us = micros(now)
        columns: dict[str, pl.Series] = {}
        with self._read() as txn:
            layouts = {
                name: None if txn is None else txn.get(meta_key("layout", name)) for name in by_view
            }
            if isinstance(entity_rows, list) and not entity_rows:
                entity_rows = _no_entities(join_keys, layouts)
            frame = entity_frame(entity_rows, join_keys, where=where)
            declared = {k: t for w in by_view.values() for k, t in w[0].view.key_dtypes.items()}
            check_declared_keys(frame, declared, where=where)
            for name, wanted in by_view.items():
                view = wanted[0].view
                raw = layouts[name]
                if isinstance(view, AggregationView):
                    pairs = [(r.feature, r.output) for r in wanted]
                    columns.update(lookup_windows(txn, raw, view, frame, pairs, now_us, where))
                    continue
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
        if type(now) is datetime and now.utcoffset() == _ZERO:  # UTC already: no to_utc
            now_us = (now - _EPOCH_UTC) // _US
        else:
            now_us = time.time_ns() // 1000 if now is None else micros(to_utc(now, what="now"))
        out: dict[str, Any] = {}
        env = self._env if self._generation == _generation else None
        if env is None:
            env = self._environment(create=False)
            if env is None:
                for part in plan:
                    part._absent(None, entity, now_us, out)
                return out
        gate = self._gate
        gate.inc()  # _begin inlined: this is the request-time path
        try:
            txn = None if gate.closed else env.begin()
        except lmdb.Error:
            txn = None
        if txn is None:  # a resize, a compaction, another process's larger map, damage
            gate.dec()
            try:
                txn = _begin(env, gate, self.path)
            except _RetiredError:  # compacted by vacuum meanwhile: reopen
                self._env = None
                return self.vector(
                    store, entity, features, full_feature_names=full_feature_names, now=now
                )
        try:
            snapshot = txn.id()
            for part in plan:
                # Layouts change only in a sync, which also moves the snapshot id: re-read the
                # layout once per snapshot, not on every call.
                if part.snapshot != snapshot or part.env is not env:
                    part.check_layout(txn, env, snapshot)
                part.fetch(txn, entity, now_us, out)
        except _DAMAGE as e:
            raise _damaged(self.path, e) from e
        finally:
            txn.abort()
            gate.dec()
        return out

    def _plan(self, store: Any, features: Any, full_feature_names: bool) -> list[Any]:
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
            resolved = plan_requested(
                state.resolvable(),
                state.on_demand,
                service_named(features, state.services),
                full_feature_names=full_feature_names,
            )
            requested = resolved.stored
            groups: dict[str, list[Requested]] = {}
            for r in requested:
                groups.setdefault(r.view.name, []).append(r)
            _refuse_offline_only([rs[0].view for rs in groups.values()], "get_feature_vector")
            plan = [_vector_view(rs) for rs in groups.values()]
            if resolved.derived:
                plan.append(VectorDerived(resolved))
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


def _refuse_offline_only(views: Sequence[FeatureView | AggregationView], where: str) -> None:
    offline_only = [v.name for v in views if not v.online]
    if offline_only:
        msg = (
            f"{where}: feature view(s) {offline_only} are not online (online=False): they have "
            "no online values. Use get_historical_features, or apply the view with online=True "
            "and run materialize()."
        )
        raise ValidationError(msg)


def _no_entities(join_keys: Sequence[str], layouts: Mapping[str, bytes | None]) -> pl.DataFrame:
    """The entity frame of an empty list: key columns in the dtypes they were synced with."""
    dtypes: dict[str, pl.DataType] = {}
    for raw in layouts.values():
        if raw is not None:
            for name, kind in Layout.from_json(raw).keys:
                dtypes.setdefault(name, dtype_from_str(kind))
    return pl.DataFrame([pl.Series(k, [], dtype=dtypes.get(k, pl.Null())) for k in join_keys])


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
    view = wanted[0].view
    assert isinstance(view, FeatureView)
    # Online holds only the latest row: one from the future of ``now`` cannot answer for it.
    strict = not view.allow_exact_match  # event time < now, not <=
    live = records["ts"] <= now_us - strict
    ttl = view.ttl
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


def _vector_view(wanted: list[Requested]) -> _VectorView | WindowVector:
    view = wanted[0].view
    if isinstance(view, AggregationView):
        check_online(view, [r.feature for r in wanted], "get_feature_vector")
        return WindowVector(view, [(r.feature, r.output) for r in wanted])
    return _VectorView(view, wanted)
