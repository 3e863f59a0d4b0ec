"""The registry: ``registry.json`` at the repository root, readable JSON written atomically."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from polarstore._aggregations import (
    AggregationView,
    aggregation_view_from_json,
    aggregation_view_to_json,
)
from polarstore._definitions import (
    Entity,
    FeatureService,
    FeatureView,
    check_name,
    dtype_from_str,
    dtype_to_str,
)
from polarstore._errors import ConflictError, PolarstoreError, SchemaError, StorageError
from polarstore._ondemand import OnDemandView, on_demand_from_json, on_demand_to_json
from polarstore._storage import PreconditionError

__all__ = ["REGISTRY_FILE", "ObjectRegistry", "Registry", "RegistryState", "file_lock"]

REGISTRY_FILE = "registry.json"
FORMAT = "polarstore.registry"
FORMAT_VERSION = 1

T = TypeVar("T")


@dataclass
class RegistryState:
    entities: dict[str, Entity] = field(default_factory=dict)
    views: dict[str, FeatureView] = field(default_factory=dict)
    services: dict[str, FeatureService] = field(default_factory=dict)
    service_versions: dict[str, int] = field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    on_demand: dict[str, OnDemandView] = field(default_factory=dict)
    aggregations: dict[str, AggregationView] = field(default_factory=dict)

    def resolvable(self) -> dict[str, FeatureView | AggregationView]:
        """Every view a feature reference may name: feature and aggregation views."""
        return {**self.views, **self.aggregations}


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock between processes (POSIX ``flock``), held for the block."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides who may share it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that readers see the old file or the new one, never a torn one.

    The file follows the umask like any other file (``mkstemp`` would make it 0600, which
    locks colleagues sharing the folder out). A failure leaves the old file as it was and is
    a :class:`StorageError` that says what happened (e.g. that the disk is full).
    """
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _write_all(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        cause = "the disk is full" if full else f"{e.strerror or e}"
        msg = f"could not write {path}: {cause}; it is unchanged."
        raise StorageError(e.errno, msg) from e
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _file_key(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


class Registry:
    """Reads and updates the registry file; updates are serialised by a lock file."""

    def __init__(self, root: Path) -> None:
        self.path = root / REGISTRY_FILE
        self._lock_path = root / ".polarstore" / "registry.lock"
        # (file key, open descriptor of that file, parsed state); the online store reads
        # ``_cache[2]`` to notice a new state.
        self._cache: tuple[tuple[int, int, int, int], int, RegistryState] | None = None
        # The cached file stays open: while it is, its inode number cannot be given to a new
        # file, so (device, inode) names that one file. Every update replaces the file, hence
        # a new inode; mtime and size alone miss a same-size change within one clock tick.
        self._pinned: list[int] = []
        self._pin_lock = threading.Lock()
        weakref.finalize(self, _close_all, self._pinned)

    def load(self) -> RegistryState:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return RegistryState()
        except OSError as e:
            msg = f"the registry {self.path} cannot be read: {e.strerror or e}."
            raise StorageError(e.errno, msg) from e
        # Re-parse only when the file changed: lookups resolve definitions on every call.
        if self._cache and self._cache[0] == _file_key(stat):
            return self._cache[2]
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return RegistryState()
        except OSError as e:
            msg = f"the registry {self.path} cannot be read: {e.strerror or e}."
            raise StorageError(e.errno, msg) from e
        try:
            key = _file_key(os.fstat(fd))  # of the file read, even if replaced meanwhile
            with open(fd, "rb", closefd=False) as f:
                raw = f.read()
            state = _decode(raw, self.path)
        except BaseException:
            os.close(fd)
            raise
        with self._pin_lock:  # threads of one store may load at once
            _close_all(self._pinned)
            self._pinned.append(fd)
            self._cache = (key, fd, state)
        return state

    def update(self, change: Callable[[RegistryState], T]) -> T:
        """Apply ``change`` to a fresh copy of the state under the lock, then save it."""
        with file_lock(self._lock_path):
            self._cache = None
            try:
                state = self.load()
                result = change(state)  # may raise half-way: then nothing is saved
                atomic_write_text(self.path, _encode(state))
            finally:
                self._cache = None  # the cached state may hold the mutated copy
            return result


def _close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError, IndexError):  # IndexError: emptied meanwhile
            os.close(fds.pop())


# --- JSON encoding --------------------------------------------------------------------------


def _encode(state: RegistryState) -> str:
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "entities": {n: _entity_to_json(e) for n, e in sorted(state.entities.items())},
        "feature_views": {n: _view_to_json(v) for n, v in sorted(state.views.items())},
        "feature_services": {
            n: {**_service_to_json(s), "version": state.service_versions.get(n, 1)}
            for n, s in sorted(state.services.items())
        },
        "datasets": dict(sorted(state.datasets.items())),
    }
    if state.on_demand:  # absent otherwise: registries stay as they were without them
        doc["on_demand_views"] = {
            n: on_demand_to_json(v) for n, v in sorted(state.on_demand.items())
        }
    if state.aggregations:  # absent otherwise: older registries read the same
        doc["aggregation_views"] = {
            n: aggregation_view_to_json(v) for n, v in sorted(state.aggregations.items())
        }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _decode(raw: bytes, path: Path | str) -> RegistryState:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        msg = (
            f"the registry {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
            "restore it from version control or a backup."
        )
        raise PolarstoreError(msg) from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        msg = (
            f"the registry {path} is not valid JSON ({e.msg} at line {e.lineno}, column "
            f"{e.colno}); restore it from version control or a backup."
        )
        raise PolarstoreError(msg) from e
    except (ValueError, RecursionError) as e:  # a 5000-digit number, nesting 100k deep
        msg = (
            f"the registry {path} is damaged: it is JSON that no registry holds "
            f"({type(e).__name__}: {str(e)[:120]}); restore it from version control or a backup."
        )
        raise PolarstoreError(msg) from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        msg = f"the file {path} is not a polarstore registry (expected 'format': {FORMAT!r})."
        raise PolarstoreError(msg)
    version = doc.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        msg = (
            f"the registry {path} has format_version {version!r}; this polarstore reads "
            f"version {FORMAT_VERSION}. Upgrade polarstore to open it."
        )
        raise PolarstoreError(msg)
    try:
        state = RegistryState()
        for name, ent in doc["entities"].items():
            state.entities[name] = _entity_from_json(name, ent)
        for name, v in doc["feature_views"].items():
            state.views[name] = _view_from_json(name, v, state.entities)
        for name, s in doc["feature_services"].items():
            state.services[name] = FeatureService(
                name, s["features"], description=s["description"], owner=s["owner"], tags=s["tags"]
            )
            state.service_versions[name] = int(s["version"])
        state.datasets = {n: _dataset_from_json(n, d) for n, d in doc["datasets"].items()}
        for name, o in doc.get("on_demand_views", {}).items():
            state.on_demand[name] = on_demand_from_json(name, o, where=f"the registry {path}")
        for name, a in doc.get("aggregation_views", {}).items():
            state.aggregations[name] = aggregation_view_from_json(name, a, state.views)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as err:
        detail = str(err) if isinstance(err, PolarstoreError) else f"{type(err).__name__}: {err}"
        msg = f"the registry {path} is damaged: {detail}."
        raise PolarstoreError(msg) from err
    return state


def _entity_to_json(entity: Entity) -> dict[str, Any]:
    return {
        "join_keys": list(entity.join_keys),
        # Only the declared keys; registries written before key dtypes existed have none.
        "key_dtypes": {k: dtype_to_str(t) for k, t in entity.key_dtypes.items()},
        "description": entity.description,
        "tags": entity.tags,
    }


def _entity_from_json(name: str, ent: dict[str, Any]) -> Entity:
    keys, declared = ent["join_keys"], ent.get("key_dtypes") or {}
    if not isinstance(keys, list) or not isinstance(declared, dict):
        msg = f"entity {name!r} has join_keys {keys!r} and key_dtypes {declared!r}"
        raise TypeError(msg)
    if declared and set(declared) != set(keys):
        msg = f"entity {name!r} declares dtypes for {list(declared)}, its join keys are {keys}"
        raise ValueError(msg)
    join_keys: Any = {k: dtype_from_str(declared[k]) for k in keys} if declared else keys
    return Entity(name, join_keys, description=ent["description"], tags=ent["tags"])


def _view_to_json(view: FeatureView) -> dict[str, Any]:
    return {
        "entities": list(view.entity_names),
        "schema": {n: dtype_to_str(t) for n, t in view.schema.items()},
        "timestamp_field": view.timestamp_field,
        "created_timestamp_field": view.created_timestamp_field,
        "ttl_microseconds": None if view.ttl is None else view.ttl // timedelta(microseconds=1),
        "online": view.online,
        "allow_exact_match": view.allow_exact_match,
        "description": view.description,
        "owner": view.owner,
        "tags": view.tags,
        **({"checks": dict(view.check_documents)} if view.check_documents else {}),
    }


def _view_from_json(name: str, v: dict[str, Any], entities: dict[str, Entity]) -> FeatureView:
    missing = [e for e in v["entities"] if e not in entities]
    if missing:
        msg = f"feature view {name!r} refers to unknown entities {missing}"
        raise SchemaError(msg)
    ttl = v["ttl_microseconds"]
    return FeatureView(
        name,
        entities=[entities[e] for e in v["entities"]],
        schema={f: dtype_from_str(t) for f, t in v["schema"].items()},
        timestamp_field=v["timestamp_field"],
        created_timestamp_field=v["created_timestamp_field"],
        ttl=None if ttl is None else timedelta(microseconds=ttl),
        online=v["online"],
        # Registries written before strict matching existed have no such key.
        allow_exact_match=v.get("allow_exact_match", True),
        description=v["description"],
        owner=v["owner"],
        tags=v["tags"],
        check_documents=v.get("checks"),  # absent in registries written before checks
    )


# A dataset's spine lives in the repository's datasets/ folder: nothing else may be read.
_SPINE = re.compile(r"datasets/[A-Za-z0-9_-]+\.parquet")


def _dataset_from_json(name: str, entry: Any) -> dict[str, Any]:
    check_name(name, what="dataset")
    if not isinstance(entry, dict):
        msg = f"dataset {name!r} is {type(entry).__name__}, not an object"
        raise TypeError(msg)
    spine, versions = entry["spine"], entry["versions"]
    if not isinstance(spine, str) or not _SPINE.fullmatch(spine):
        msg = f"dataset {name!r} names the spine file {spine!r}, not one in datasets/"
        raise ValueError(msg)
    if not isinstance(versions, dict) or not all(
        isinstance(k, str) and type(v) is int for k, v in versions.items()
    ):
        msg = f"dataset {name!r} has pinned versions {versions!r}, not view names to ints"
        raise TypeError(msg)
    if not isinstance(entry["features"], list) or not all(
        isinstance(f, str) for f in entry["features"]
    ):
        msg = f"dataset {name!r} has features {entry['features']!r}, not a list of str"
        raise TypeError(msg)
    if not isinstance(entry["timestamp_field"], str) or not isinstance(
        entry["full_feature_names"], bool
    ):
        msg = f"dataset {name!r} has a bad timestamp_field or full_feature_names"
        raise TypeError(msg)
    if not isinstance(entry.get("bitemporal", False), bool):
        msg = f"dataset {name!r} has bitemporal {entry['bitemporal']!r}, not a bool"
        raise TypeError(msg)
    return entry


def _service_to_json(service: FeatureService) -> dict[str, Any]:
    return {
        "features": list(service.features),
        "description": service.description,
        "owner": service.owner,
        "tags": service.tags,
    }


class ObjectRegistry:
    """``registry.json`` on an object store: updates are conditional puts, retried on a loss.

    An update reads the object and its ETag, applies the change, and puts the result only if
    the ETag is still the one read (``If-Match``; ``If-None-Match: *`` for the first one). A
    concurrent update from another process or machine makes the put fail: the change is then
    applied again to what that update wrote, so no ``apply`` is lost. Reads re-fetch the
    object only when its ETag changed.
    """

    _ATTEMPTS = 50

    def __init__(self, location: Any) -> None:
        self.location = location
        self.path = location.url(REGISTRY_FILE)
        # (ETag, unused, parsed state): the shape of Registry._cache the online store reads.
        self._cache: tuple[str | None, int, RegistryState] | None = None

    def _fetch(self) -> tuple[RegistryState, str | None]:
        got = self.location.get(REGISTRY_FILE)
        if got is None:
            return RegistryState(), None
        raw, etag = got
        if self._cache is not None and etag is not None and self._cache[0] == etag:
            return self._cache[2], etag
        return _decode(raw, self.path), etag

    def load(self) -> RegistryState:
        state, etag = self._fetch()
        self._cache = (etag, -1, state)
        return state

    def update(self, change: Callable[[RegistryState], T]) -> T:
        """Apply ``change`` to the current state and save it, unless someone saved first."""
        for attempt in range(self._ATTEMPTS):
            self._cache = None  # a fresh copy: change() mutates it
            state, etag = self._fetch()
            result = change(state)  # may raise half-way: then nothing is saved
            try:
                self.location.put(REGISTRY_FILE, _encode(state).encode("utf-8"), expect=etag)
            except PreconditionError:
                time.sleep(random.uniform(0, 0.01 * 2 ** min(attempt, 6)))
                continue
            finally:
                self._cache = None
            return result
        msg = (
            f"the registry {self.path} kept changing under this update ({self._ATTEMPTS} "
            "concurrent updates won first); nothing was saved. Try again."
        )
        raise ConflictError(msg)
