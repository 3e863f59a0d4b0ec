"""``FeatureStore``: the repository façade. It resolves names and delegates to the modules."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from polarstore._datasets import read_spine, store_dataset
from polarstore._definitions import (
    Entity,
    FeatureService,
    FeatureView,
    as_references,
    check_name,
)
from polarstore._errors import (
    NotFoundError,
    SchemaError,
    StorageError,
    ValidationError,
    did_you_mean,
)
from polarstore._frames import cast_keys, entity_frame, key_dtype, prepare_rows, to_polars
from polarstore._offline import OfflineStore
from polarstore._registry import ObjectRegistry, Registry, RegistryState
from polarstore._retrieval import (
    EMPTY_VERSION,
    historical_features,
    resolve_features,
    service_named,
)
from polarstore._storage import (
    Location,
    default_online_path,
    is_remote,
    open_location,
)
from polarstore._stream import sink_training_set
from polarstore._time import STORED_DTYPE, to_utc, utc_now
from polarstore._vacuum import vacuum_repository

__all__ = ["FeatureStore"]

Definition = Entity | FeatureView | FeatureService
AsOf = datetime | date | str | Mapping[str, int] | None


class FeatureStore:
    """A feature repository: a folder of Delta tables, an LMDB online store and a registry.

    Parameters
    ----------
    path
        The repository folder (created if missing), or an object-store URI
        (``s3://bucket/prefix``; also ``gs://``, ``az://``) holding the registry, the Delta
        tables and the saved datasets' spines.
    storage_options
        For an object store: credentials, endpoint, region (``{"AWS_ENDPOINT_URL": ...}``),
        over the ``AWS_*`` (``GOOGLE_*``, ``AZURE_*``) environment variables; passed to Delta
        Lake, Polars and the registry's client alike.
    online_path
        Where the LMDB environment lives (always a local folder); default ``<path>/online``,
        for a remote repository a cache folder derived from the URI (``$POLARSTORE_CACHE``,
        else ``~/.cache/polarstore``, ``/online/s3/<bucket>/<prefix>-<hash>``).

    Examples
    --------
    >>> import tempfile
    >>> from datetime import datetime
    >>> import polars as pl
    >>> from polarstore import Entity, FeatureStore, FeatureView
    >>> store = FeatureStore(tempfile.mkdtemp())
    >>> user = Entity("user", join_keys="user_id")
    >>> stats = FeatureView("stats", entities=[user], schema={"clicks": pl.Int64})
    >>> store.apply([user, stats])
    >>> store.write("stats", pl.DataFrame({"user_id": [1, 1], "clicks": [3, 5],
    ...     "event_timestamp": [datetime(2024, 1, 1), datetime(2024, 1, 3)]}))
    0
    >>> spine = pl.DataFrame({"user_id": [1, 1], "event_timestamp": [datetime(2024, 1, 2),
    ...                                                             datetime(2024, 1, 4)]})
    >>> store.get_historical_features(spine, ["stats:clicks"]).collect()["clicks"].to_list()
    [3, 5]
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        storage_options: dict[str, str] | None = None,
        online_path: str | os.PathLike[str] | None = None,
    ) -> None:
        text = os.fspath(path)
        online = os.fspath(online_path) if online_path else None
        if is_remote(text):
            self._init_remote(text, storage_options, online)
            return
        self.path: Path | str = Path(text.removeprefix("file://")).resolve()
        self._root: Path | Location = self.path
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            file = next((p for p in (self.path, *self.path.parents) if p.is_file()), self.path)
            msg = f"repository {text!r}: {file} is a file, not a folder."
            raise ValidationError(msg) from e
        except OSError as e:
            msg = f"repository {text!r}: cannot create the folder {self.path}: {e.strerror}."
            raise StorageError(e.errno, msg) from e
        _check_online_path(online)
        self.online_path = Path(online.removeprefix("file://")) if online else self.path / "online"
        self._registry: Registry | ObjectRegistry = Registry(self.path)
        self._offline = OfflineStore(str(self.path), storage_options)
        self._online_store: Any = None
        self._online_lock = threading.Lock()

    def _init_remote(
        self, uri: str, storage_options: dict[str, str] | None, online: str | None
    ) -> None:
        location = open_location(uri, storage_options)
        _check_online_path(online)
        self.path = location.uri
        self._root = location
        if online:
            self.online_path = Path(online.removeprefix("file://"))
        else:
            self.online_path = default_online_path(location)
        self._registry = ObjectRegistry(location)
        self._registry.load()  # an unreachable store, a missing bucket, bad credentials: now
        self._offline = OfflineStore(location.uri, location.options, location)
        self._online_store = None
        self._online_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r})"

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the online store's LMDB environment, if it was opened.

        The store stays usable: the environment is reopened on the next online call. Prefer
        ``with FeatureStore(path) as store:`` in scripts.

        Examples
        --------
        >>> import tempfile
        >>> with FeatureStore(tempfile.mkdtemp()) as store:
        ...     store.versions()
        {}
        """
        if self._online_store is not None:
            self._online_store.close()
            self._online_store = None

    # --- definitions ----------------------------------------------------------------------

    def apply(self, objects: Definition | Iterable[Definition]) -> None:
        """Register or update definitions; applying the same definitions again is a no-op.

        A view's entities are registered with it; a view may also name its entities
        (``entities=["user"]``) registered before or in the same call. Adding features is allowed;
        changing a feature's dtype, removing a feature, or changing a view's entities or
        timestamp fields raises ``SchemaError`` once the view has data.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> user = Entity("user", join_keys="user_id")
        >>> store.apply(FeatureView("stats", entities=user, schema={"clicks": pl.Int64}))
        >>> [e.name for e in store.list_entities()]
        ['user']
        >>> store.apply(FeatureView("more", entities=["user"], schema={"views": pl.Int64}))
        >>> store.get_feature_view("more").join_keys
        ('user_id',)
        """
        items = (
            [objects]
            if isinstance(objects, (Entity, FeatureView, FeatureService))
            else list(objects)
        )
        for item in items:
            if not isinstance(item, (Entity, FeatureView, FeatureService)):
                msg = f"apply() takes Entity, FeatureView and FeatureService objects, got {item!r}."
                raise ValidationError(msg)
        self._registry.update(lambda state: self._apply(state, items))

    def _apply(self, state: RegistryState, items: list[Definition]) -> None:
        entities = [i for i in items if isinstance(i, Entity)]
        views = [i for i in items if isinstance(i, FeatureView)]
        services = [i for i in items if isinstance(i, FeatureService)]
        declared = {n: v.key_dtypes for n, v in state.views.items()}
        entities += [e for v in views for e in v.entities if isinstance(e, Entity)]  # type: ignore[union-attr]
        for entity in entities:
            old = state.entities.get(entity.name)
            if old is not None and old.join_keys != entity.join_keys:
                users = [
                    v.name
                    for v in state.views.values()
                    if entity.name in v.entity_names
                    and self._offline.current_version(v.name) is not None
                ]
                if users:
                    msg = (
                        f"entity {entity.name!r}: cannot change join keys from "
                        f"{list(old.join_keys)} to {list(entity.join_keys)}; views {users} "
                        "already have data keyed by the old ones."
                    )
                    raise SchemaError(msg)
            state.entities[entity.name] = entity
        for view in views:
            view = view.resolve(state.entities)  # names of entities registered or in this apply
            old_view = state.views.get(view.name)
            if old_view is not None and self._offline.current_version(view.name) is not None:
                _check_evolution(old_view, view)
            state.views[view.name] = view
        # Rebuild views on re-applied entities so descriptions and tags stay in sync.
        for name, view in list(state.views.items()):
            rebuilt = _replace_entities(view, [state.entities[e] for e in view.entity_names])
            if rebuilt.key_dtypes and rebuilt.key_dtypes != declared.get(name):
                _check_key_dtypes(rebuilt, self._offline.table_schema(name))
            state.views[name] = rebuilt
        for service in services:
            resolve_features(state.views, service.features, full_feature_names=True)
            old_service = state.services.get(service.name)
            version = state.service_versions.get(service.name, 0)
            if old_service is None or old_service.features != service.features:
                version += 1
            state.services[service.name] = service
            state.service_versions[service.name] = version

    def _state(self) -> RegistryState:
        return self._registry.load()

    def get_feature_view(self, name: str) -> FeatureView:
        """The registered view called ``name``; ``NotFoundError`` with a hint if none.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> store.get_feature_view("stats").join_keys
        ('user_id',)
        >>> store.get_feature_view("stat")
        Traceback (most recent call last):
        ...
        polarstore._errors.NotFoundError: there is no feature view 'stat'. Did you mean 'stats'?
        """
        views = self._state().views
        if name not in views:
            msg = f"there is no feature view {name!r}." + did_you_mean(name, views)
            raise NotFoundError(msg)
        return views[name]

    def get_feature_service(self, name: str) -> FeatureService:
        """The registered feature service called ``name``; ``NotFoundError`` if none.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> store.apply(FeatureService("churn", features=["stats:clicks"]))
        >>> store.get_feature_service("churn").features
        ('stats:clicks',)
        """
        services = self._state().services
        if name not in services:
            msg = f"there is no feature service {name!r}." + did_you_mean(name, services)
            raise NotFoundError(msg)
        return services[name]

    def _view(self, view: str | FeatureView) -> FeatureView:
        if isinstance(view, FeatureView):
            registered = self.get_feature_view(view.name)
            if not view.resolved:  # entities given by name: compare what they name
                view = view.resolve(self._state().entities)
            if registered != view:
                msg = (
                    f"feature view {view.name!r} differs from the registered definition; "
                    "apply() it first."
                )
                raise SchemaError(msg)
            return registered
        if not isinstance(view, str):
            msg = f"view must be a name or a FeatureView, got {type(view).__name__}."
            raise ValidationError(msg)
        return self.get_feature_view(view)

    def list_entities(self) -> list[Entity]:
        """The registered entities, in the order they were first applied.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> [e.name for e in store.list_entities()]
        ['user']
        """
        return list(self._state().entities.values())

    def list_feature_views(self) -> list[FeatureView]:
        """The registered feature views, in the order they were first applied.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> [v.name for v in store.list_feature_views()]
        ['stats']
        """
        return list(self._state().views.values())

    def list_feature_services(self) -> list[FeatureService]:
        """The registered feature services, in the order they were first applied.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> store.apply(FeatureService("churn", features=["stats:*"]))
        >>> [s.name for s in store.list_feature_services()]
        ['churn']
        """
        return list(self._state().services.values())

    def search(self, text: str) -> list[Definition]:
        """Definitions whose name, description, owner, tags or feature names contain ``text``.

        Case-insensitive substring match.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> user = Entity("user", join_keys="user_id")
        >>> store.apply(FeatureView("stats", entities=user, schema={"clicks": pl.Int64},
        ...                         owner="growth-team", tags={"pii": "no"}))
        >>> [d.name for d in store.search("GROWTH")]
        ['stats']
        """
        if not isinstance(text, str):
            msg = f"search(text): text must be a str, got {type(text).__name__} {text!r}."
            raise ValidationError(msg)
        needle = text.lower()
        state = self._state()
        found: list[Definition] = []
        items: list[Definition] = [
            *state.entities.values(),
            *state.views.values(),
            *state.services.values(),
        ]
        for item in items:
            words = [item.name, item.description, getattr(item, "owner", "")]
            words += [f"{k}={v}" for k, v in (item.tags or {}).items()]
            if isinstance(item, FeatureView):
                words += list(item.schema)
            if isinstance(item, FeatureService):
                words += list(item.features)  # type: ignore[arg-type]
            if any(needle in w.lower() for w in words):
                found.append(item)
        return found

    def describe(self, view: str | FeatureView) -> dict[str, Any]:
        """Schema, description, owner, tags, rows, versions, latest event time, online state.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> store.write("stats", pl.DataFrame({"user_id": [1, 1, 2], "clicks": [3, 5, 1],
        ...     "event_timestamp": [datetime(2024, 1, 1), datetime(2024, 1, 3),
        ...                         datetime(2024, 1, 2)]}))
        0
        >>> info = store.describe("stats")
        >>> info["rows"], info["version"], info["materialized_version"]
        (3, 0, None)
        """
        v = self._view(view)
        version = self._offline.current_version(v.name)
        latest = None
        if version is not None:
            scan = self._offline.scan(v, columns=[v.timestamp_field])
            latest = scan.select(pl.col(v.timestamp_field).max()).collect().item()  # type: ignore[union-attr]
        online = self._online().state(v.name) if v.online else None
        return {
            "name": v.name,
            "entities": [e.name for e in v.entities],  # type: ignore[union-attr]
            "join_keys": list(v.join_keys),
            "schema": dict(v.schema),
            "timestamp_field": v.timestamp_field,
            "created_timestamp_field": v.created_timestamp_field,
            "ttl": v.ttl,
            "online": v.online,
            "description": v.description,
            "owner": v.owner,
            "tags": dict(v.tags or {}),
            "rows": self._offline.row_count(v) if version is not None else 0,
            "version": version,
            "versions": 0 if version is None else version + 1,
            "latest_event_time": latest,
            "materialized_version": online.get("version") if online else None,
            "materialized_at": online.get("materialized_at") if online else None,
        }

    # --- offline store ----------------------------------------------------------------------

    def write(
        self, view: str | FeatureView, data: Any, *, idempotency_key: str | None = None
    ) -> int:
        """Append rows to the view's Delta table in one commit; return the new table version.

        Everything is validated first: on any error nothing is written. ``data`` is a Polars
        DataFrame or LazyFrame, a pyarrow Table or a pandas DataFrame holding the join keys,
        the timestamp field(s) and exactly the declared features. With ``idempotency_key``, a
        retried job writing the same key again commits nothing (Delta app transactions).

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> rows = pl.DataFrame({"user_id": [7], "event_timestamp": [datetime(2024, 5, 1)],
        ...                      "clicks": [2]})
        >>> store.write("stats", rows), store.write("stats", rows)
        (0, 1)
        """
        v = self._view(view)
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not idempotency_key
        ):
            msg = f"idempotency_key must be a non-empty str, got {idempotency_key!r}."
            raise ValidationError(msg)
        stored = self._offline.table_schema(v.name)
        rows = prepare_rows(v, data, stored)
        if rows.is_empty() and stored is not None:
            return self._offline.current_version(v.name)  # type: ignore[return-value]
        return self._offline.append(v, rows, idempotency_key=idempotency_key)

    def read(self, view: str | FeatureView, *, as_of: AsOf = None) -> pl.LazyFrame:
        """The raw rows of a view (as of a version or time), in tie-breaking order.

        Rows come sorted by event time, then created time, then write order: for equal
        keys and times, the row that ``get_historical_features`` would pick comes last.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> store.write("stats", pl.DataFrame({"user_id": [1, 1, 2], "clicks": [3, 5, 1],
        ...     "event_timestamp": [datetime(2024, 1, 1), datetime(2024, 1, 3),
        ...                         datetime(2024, 1, 2)]}))
        0
        >>> store.read("stats").collect()["clicks"].to_list()  # by event time
        [3, 1, 5]
        >>> store.read("stats", as_of={"stats": 0}).collect().height
        3
        """
        v = self._view(view)
        version = self._pin(as_of, [v.name]).get(v.name)
        columns = [
            *v.join_keys,
            v.timestamp_field,
            *([v.created_timestamp_field] if v.created_timestamp_field else []),
            *v.feature_names,
        ]
        frame = None
        if version != EMPTY_VERSION:
            frame = self._offline.scan(v, version=version, ordered=True)
        if frame is None:
            schema = self._offline.table_schema(v.name) or {}
            return pl.LazyFrame(
                schema={c: schema.get(c) or v.schema.get(c, STORED_DTYPE) for c in columns}
            )
        return frame.select(columns)

    def history(self, view: str | FeatureView) -> pl.DataFrame:
        """One row per table version: version, commit time, operation, rows added.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> store.write("stats", pl.DataFrame({"user_id": [1, 1, 2], "clicks": [3, 5, 1],
        ...     "event_timestamp": [datetime(2024, 1, 1), datetime(2024, 1, 3),
        ...                         datetime(2024, 1, 2)]}))
        0
        >>> store.history("stats").select("version", "operation", "rows_added").rows()
        [(0, 'write', 3)]
        """
        return self._offline.history(self._view(view).name)

    def versions(self) -> dict[str, int]:
        """The current version of every view (-1 for a view with no data): a pin for as_of.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> store.versions()
        {'stats': -1}
        >>> store.write("stats", pl.DataFrame({"user_id": [1, 1, 2], "clicks": [3, 5, 1],
        ...     "event_timestamp": [datetime(2024, 1, 1), datetime(2024, 1, 3),
        ...                         datetime(2024, 1, 2)]}))
        0
        >>> store.versions()
        {'stats': 0}
        """
        return {
            name: v if (v := self._offline.current_version(name)) is not None else EMPTY_VERSION
            for name in self._state().views
        }

    def compact(self, view: str | FeatureView) -> int:
        """Rewrite the view's table into sorted, non-overlapping files; return the new version.

        Every row is kept with its write order, so answers are unchanged; retrieval gets
        faster because files no longer overlap in time.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> store.write("stats", pl.DataFrame({"user_id": [1, 1, 2], "clicks": [3, 5, 1],
        ...     "event_timestamp": [datetime(2024, 1, 1), datetime(2024, 1, 3),
        ...                         datetime(2024, 1, 2)]}))
        0
        >>> store.write("stats", pl.DataFrame({"user_id": [2], "clicks": [2],
        ...     "event_timestamp": [datetime(2024, 1, 1)]}))
        1
        >>> store.compact("stats")
        2
        >>> store.read("stats").collect()["clicks"].to_list()
        [3, 2, 1, 5]
        """
        v = self._view(view)
        return self._offline.compact(v)

    def delete_entities(self, view: str | FeatureView, keys: Any) -> int:
        """Remove every row of the given entities, offline (a new version) and online.

        For right-to-be-forgotten requests. ``keys`` is a dict, a list of dicts or a
        DataFrame of join keys. Older table versions still hold the rows until ``vacuum``
        removes their files; returns the new table version.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}, online=False))
        >>> _ = store.write("stats", pl.DataFrame({"user_id": [1, 2], "clicks": [3, 4],
        ...                    "event_timestamp": [datetime(2024, 1, 1)] * 2}))
        >>> store.delete_entities("stats", {"user_id": 1})
        1
        >>> store.read("stats").collect()["user_id"].to_list()
        [2]
        """
        v = self._view(view)
        stored = self._offline.table_schema(v.name) or {}
        where = f"delete_entities({v.name!r})"
        frame = entity_frame(keys, v.join_keys, where=where)
        frame = cast_keys(frame, v.join_keys, stored, where=where).drop_nulls()
        version = self._offline.rewrite(
            v,
            lambda rows: rows.join(
                frame.lazy(), on=list(v.join_keys), how="anti", maintain_order="left"
            ).collect(engine="in-memory"),
            "delete",
        )
        if v.online:
            self._online().delete(v, frame, version)
        return version

    def vacuum(
        self, *, retention: timedelta = timedelta(days=7), force: bool = False
    ) -> dict[str, list[str]]:
        """Delete data files no version newer than ``retention`` needs; return them per view.

        Files that a saved dataset's pinned version still needs are kept unless ``force``
        (those datasets can then no longer be loaded). ``retention`` is rounded up to whole
        hours, Delta Lake's unit. Returns the files this call deleted, relative to the
        repository. A view that cannot be vacuumed does not stop the others: the failures are
        raised together once every view was tried.

        ``vacuum(retention=timedelta(0), force=True)`` also *purges*, for the right to be
        forgotten after ``delete_entities``: each view's Delta log is reduced to a checkpoint
        of the current version (older versions can no longer be read, by ``as_of``, time
        travel or saved datasets, whose entries and spine files are removed), and the online
        store's file is rewritten without its free pages. Deleted values are then in no file
        of the repository. The online store can be compacted only while no other process has
        it open (a PolarstoreError says so; run it again once they are stopped); local
        repositories only.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> store.write("stats", pl.DataFrame({"user_id": [1, 1, 2], "clicks": [3, 5, 1],
        ...     "event_timestamp": [datetime(2024, 1, 1), datetime(2024, 1, 3),
        ...                         datetime(2024, 1, 2)]}))
        0
        >>> store.vacuum()  # nothing is older than the 7-day default retention
        {'stats': []}
        """
        return vacuum_repository(self, retention=retention, force=force)

    # --- retrieval ------------------------------------------------------------------------

    def _pin(self, as_of: AsOf, views: Iterable[str]) -> dict[str, int | None]:
        """Normalise ``as_of`` to a version per view (None: current; -1: no data then)."""
        names = list(dict.fromkeys(views))
        if as_of is None:
            return {}
        if isinstance(as_of, Mapping):
            known = self._state().views
            pins: dict[str, int | None] = {}
            for name, version in as_of.items():
                if name not in known:
                    msg = f"as_of names no feature view {name!r}." + did_you_mean(name, known)
                    raise NotFoundError(msg)
                if isinstance(version, bool) or not isinstance(version, int):
                    msg = f"as_of[{name!r}] must be a table version (int), got {version!r}."
                    raise ValidationError(msg)
                if version != EMPTY_VERSION:
                    self._offline.check_version(name, version)
                pins[name] = version
            return pins
        moment = to_utc(as_of, what="as_of")  # type: ignore[arg-type]
        return {
            name: v if (v := self._offline.version_at(name, moment)) is not None else EMPTY_VERSION
            for name in names
        }

    def get_historical_features(
        self,
        entity_df: Any,
        features: Any,
        *,
        timestamp_field: str = "event_timestamp",
        full_feature_names: bool = False,
        as_of: AsOf = None,
        bitemporal: bool = False,
    ) -> pl.LazyFrame:
        """Point-in-time join: for each spine row, each feature's latest value at that time.

        The rules are in ``docs/contract.md``, "Point-in-time semantics". One row per
        ``entity_df`` row, in input order, input columns unchanged, then the features in the
        requested order.
        ``features`` holds ``"view:feature"`` / ``"view:*"`` references or a
        ``FeatureService``; ``as_of`` is a datetime, or a dict of view name to table version.
        With ``bitemporal=True`` a row counts only once it was known at the spine time: its
        created time (if the view has one) and the commit that first wrote it are not later
        (docs/contract.md, "Leakage-proof retrieval").

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime, timedelta
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}, ttl=timedelta(days=1)))
        >>> store.write("stats", pl.DataFrame({"user_id": [1], "clicks": [4],
        ...                    "event_timestamp": [datetime(2024, 1, 1)]}))
        0
        >>> spine = pl.DataFrame({"user_id": [1, 1, 2], "event_timestamp": [
        ...     datetime(2024, 1, 1), datetime(2024, 1, 3), datetime(2024, 1, 1)]})
        >>> store.get_historical_features(spine, ["stats:*"]).collect()["clicks"].to_list()
        [4, None, None]
        """
        state = self._state()
        features = service_named(features, state.services)
        requested = resolve_features(state.views, features, full_feature_names=full_feature_names)
        versions = self._pin(as_of, [r.view.name for r in requested])
        where = "get_historical_features"
        if not isinstance(timestamp_field, str):
            msg = f"{where}: timestamp_field must be a column name, got {timestamp_field!r}."
            raise ValidationError(msg)
        if not isinstance(bitemporal, bool):
            msg = f"{where}: bitemporal must be True or False, got {bitemporal!r}."
            raise ValidationError(msg)
        return historical_features(
            self._offline,
            entity_df,
            requested,
            timestamp_field=timestamp_field,
            versions=versions,
            bitemporal=bitemporal,
        )

    def save_dataset(
        self,
        name: str,
        entity_df: Any,
        features: Any,
        *,
        timestamp_field: str = "event_timestamp",
        full_feature_names: bool = False,
        as_of: AsOf = None,
        overwrite: bool = False,
        bitemporal: bool = False,
        output: str | os.PathLike[str] | None = None,
    ) -> pl.LazyFrame:
        """Store a reproducible training set: the spine and the pinned view versions.

        ``load_dataset(name)`` later returns exactly the same rows, whatever was written since
        (until old versions are vacuumed); ``bitemporal`` is kept with the dataset. With
        ``output`` (a local path or an ``s3://`` URI) the training set is also written to
        that Parquet file, joined in time slices of the spine so that only one slice's view
        rows are in memory at a time: views larger than memory are fine.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> def clicks(n): return pl.DataFrame({"user_id": [1], "clicks": [n],
        ...                    "event_timestamp": [datetime(2024, 1, 1)]})
        >>> _ = store.write("stats", clicks(1))
        >>> spine = pl.DataFrame({"user_id": [1], "event_timestamp": [datetime(2024, 2, 1)]})
        >>> _ = store.save_dataset("train", spine, ["stats:clicks"])
        >>> _ = store.write("stats", clicks(2))  # a later correction
        >>> store.load_dataset("train").collect()["clicks"].to_list()
        [1]
        """
        check_name(name, what="dataset")
        if not isinstance(bitemporal, bool):
            msg = f"save_dataset {name!r}: bitemporal must be True or False, got {bitemporal!r}."
            raise ValidationError(msg)
        spine = to_polars(entity_df, what=f"save_dataset {name!r} entity_df")
        state = self._state()
        refs = list(
            as_references(service_named(features, state.services), where=f"save_dataset {name!r}")
        )
        requested = resolve_features(state.views, refs, full_feature_names=full_feature_names)
        pins = self._pin(as_of, [r.view.name for r in requested])
        versions: dict[str, int | None] = {}
        for r in requested:  # only the views it uses: another's damaged table must not block
            current = pins.get(r.view.name, self._offline.current_version(r.view.name))
            versions[r.view.name] = EMPTY_VERSION if current is None else current
        result = self.get_historical_features(
            spine,
            refs,
            timestamp_field=timestamp_field,
            full_feature_names=full_feature_names,
            as_of=versions,  # type: ignore[arg-type]
            bitemporal=bitemporal,
        )
        entry = {
            "features": refs,
            "versions": versions,
            "timestamp_field": timestamp_field,
            "full_feature_names": full_feature_names,
            "bitemporal": bitemporal,
            "rows": spine.height,
            "created_at": utc_now().isoformat(),
        }
        if output is not None:  # first: if it fails, no dataset was saved either
            sink_training_set(
                self,
                spine,
                refs,
                output,
                timestamp_field=timestamp_field,
                full_feature_names=full_feature_names,
                as_of=versions,
                bitemporal=bitemporal,
                what=f"save_dataset {name!r}",
            )
        store_dataset(self._root, self._registry, name, spine, entry, overwrite=overwrite)
        return result

    def load_dataset(self, name: str) -> pl.LazyFrame:
        """The training set saved under ``name``, rebuilt from its spine and pinned versions.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> store.write("stats", pl.DataFrame({"user_id": [1, 1, 2], "clicks": [3, 5, 1],
        ...     "event_timestamp": [datetime(2024, 1, 1), datetime(2024, 1, 3),
        ...                         datetime(2024, 1, 2)]}))
        0
        >>> spine = pl.DataFrame({"user_id": [1], "event_timestamp": [datetime(2024, 1, 2)]})
        >>> _ = store.save_dataset("train", spine, ["stats:clicks"])
        >>> store.write("stats", pl.DataFrame({"user_id": [1], "clicks": [9],
        ...     "event_timestamp": [datetime(2024, 1, 2)]}))  # a late row
        1
        >>> store.load_dataset("train").collect()["clicks"].to_list()  # as it was saved
        [3]
        """
        datasets = self._state().datasets
        spine = read_spine(self._root, name, datasets)
        entry = datasets[name]
        return self.get_historical_features(
            spine,
            entry["features"],
            timestamp_field=entry["timestamp_field"],
            full_feature_names=entry["full_feature_names"],
            as_of=entry["versions"],
            bitemporal=entry.get("bitemporal", False),  # absent in datasets saved before it
        )

    def list_datasets(self) -> dict[str, dict[str, Any]]:
        """The saved datasets by name: features, pinned versions, rows, spine file.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}))
        >>> store.write("stats", pl.DataFrame({"user_id": [1, 1, 2], "clicks": [3, 5, 1],
        ...     "event_timestamp": [datetime(2024, 1, 1), datetime(2024, 1, 3),
        ...                         datetime(2024, 1, 2)]}))
        0
        >>> spine = pl.DataFrame({"user_id": [1], "event_timestamp": [datetime(2024, 1, 2)]})
        >>> _ = store.save_dataset("train", spine, ["stats:clicks"])
        >>> entry = store.list_datasets()["train"]
        >>> entry["features"], entry["versions"], entry["rows"]
        (['stats:clicks'], {'stats': 0}, 1)
        """
        return dict(self._state().datasets)

    # --- online store -----------------------------------------------------------------------

    def _online(self) -> Any:
        if self._online_store is None:
            from polarstore._online import OnlineStore

            # Threads share one FeatureStore: two OnlineStores would open LMDB twice.
            with self._online_lock:
                if self._online_store is None:
                    self._online_store = OnlineStore(self.online_path)
        return self._online_store

    def materialize(
        self,
        views: str | FeatureView | Iterable[str | FeatureView] | None = None,
        *,
        end: datetime | date | str | None = None,
        progress: bool | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Sync the latest row per entity of each online view into LMDB, incrementally.

        Only rows committed since the last sync are read; ``end`` limits the sync to rows with
        event time at or before it (later rows are synced by a later call). All views sync in
        one LMDB transaction: a crash leaves the previous sync whole. Returns, per view: rows
        read, entities written, version synced, seconds.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime, timedelta
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}, ttl=timedelta(days=7)))
        >>> store.write("stats", pl.DataFrame({"user_id": [1, 1, 2], "clicks": [3, 5, 1],
        ...     "event_timestamp": [datetime(2024, 1, 1), datetime(2024, 1, 3),
        ...                         datetime(2024, 1, 2)]}))
        0
        >>> summary = store.materialize()
        >>> summary["stats"]["rows_read"], summary["stats"]["entities_written"]
        (3, 2)
        >>> store.materialize()["stats"]["rows_read"]  # incremental: nothing new
        0
        """
        state = self._state()
        if views is None:
            targets = [v for v in state.views.values() if v.online]
        else:
            items = [views] if isinstance(views, (str, FeatureView)) else views
            if not isinstance(items, Iterable) or isinstance(items, (bytes, Mapping)):
                msg = (
                    "materialize: views must be a view name, a FeatureView or a list of them, "
                    f"got {views!r}."
                )
                raise ValidationError(msg)
            targets = [self._view(v) for v in items]
            offline_only = [v.name for v in targets if not v.online]
            if offline_only:
                msg = f"views {offline_only} are not online (online=False); nothing to sync."
                raise ValidationError(msg)
        until = None if end is None else to_utc(end, what="end")
        # Views applied since with online=False stop being served: their online data goes.
        drop = [v.name for v in state.views.values() if not v.online]
        return self._online().materialize(  # type: ignore[no-any-return]
            self._offline, targets, end=until, progress=progress, drop=drop
        )

    def get_online_features(
        self,
        entity_rows: Any,
        features: Any,
        *,
        full_feature_names: bool = False,
        now: datetime | None = None,
    ) -> pl.DataFrame:
        """Latest feature values for a batch of entities, from one LMDB snapshot.

        ``entity_rows`` is a dict, a list of dicts, or a DataFrame of join keys. Missing
        entities give nulls. Values older than ``now - ttl`` read as null, as offline.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime, timedelta
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}, ttl=timedelta(days=7)))
        >>> store.write("stats", pl.DataFrame({"user_id": [1, 1, 2], "clicks": [3, 5, 1],
        ...     "event_timestamp": [datetime(2024, 1, 1), datetime(2024, 1, 3),
        ...                         datetime(2024, 1, 2)]}))
        0
        >>> _ = store.materialize()
        >>> now = datetime(2024, 1, 4)  # default: the current time, which the ttl counts from
        >>> store.get_online_features([{"user_id": 1}, {"user_id": 3}], ["stats:clicks"],
        ...                           now=now).rows()
        [(1, 5), (3, None)]
        """
        state = self._state()
        features = service_named(features, state.services)
        requested = resolve_features(state.views, features, full_feature_names=full_feature_names)
        moment = utc_now() if now is None else to_utc(now, what="now")
        return self._online().lookup(entity_rows, requested, moment)  # type: ignore[no-any-return]

    def get_feature_vector(
        self,
        entity: Mapping[str, Any],
        features: Any,
        *,
        full_feature_names: bool = False,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """One entity's feature values as a plain dict: the request-time path, no DataFrame.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime, timedelta
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64}, ttl=timedelta(days=7)))
        >>> store.write("stats", pl.DataFrame({"user_id": [1, 1, 2], "clicks": [3, 5, 1],
        ...     "event_timestamp": [datetime(2024, 1, 1), datetime(2024, 1, 3),
        ...                         datetime(2024, 1, 2)]}))
        0
        >>> _ = store.materialize()
        >>> store.get_feature_vector({"user_id": 1}, ["stats:clicks"], now=datetime(2024, 1, 4))
        {'clicks': 5}
        >>> store.get_feature_vector({"user_id": 1}, ["stats:clicks"], now=datetime(2024, 2, 1))
        {'clicks': None}
        """
        return self._online().vector(  # type: ignore[no-any-return]
            self, entity, features, full_feature_names=full_feature_names, now=now
        )


def _check_evolution(old: FeatureView, new: FeatureView) -> None:
    where = f"feature view {new.name!r} has data; "
    for attr in ("timestamp_field", "created_timestamp_field"):
        if getattr(old, attr) != getattr(new, attr):
            msg = (
                f"{where}cannot change {attr} from {getattr(old, attr)!r} to "
                f"{getattr(new, attr)!r}. Create a new view instead."
            )
            raise SchemaError(msg)
    if old.join_keys != new.join_keys:
        msg = (
            f"{where}cannot change its entities' join keys from {list(old.join_keys)} to "
            f"{list(new.join_keys)}. Create a new view instead."
        )
        raise SchemaError(msg)
    for name, dtype in old.schema.items():
        if name not in new.schema:
            msg = (
                f"{where}cannot remove feature {name!r} (its history is in the table). Keep it "
                "in the schema or create a new view."
            )
            raise SchemaError(msg)
        if new.schema[name] != dtype:
            msg = (
                f"{where}cannot change the dtype of feature {name!r} from {dtype} to "
                f"{new.schema[name]}. Add a new feature instead."
            )
            raise SchemaError(msg)


def _replace_entities(view: FeatureView, entities: list[Entity]) -> FeatureView:
    return view.with_entities(entities)


def _check_key_dtypes(view: FeatureView, stored: Mapping[str, pl.DataType] | None) -> None:
    """A declared key dtype must be of the kind (Int64 or String) the table already holds."""
    for key, dtype in view.key_dtypes.items():
        have = (stored or {}).get(key)
        if have is not None and key_dtype(dtype, where=view.name, column=key) != have:
            msg = (
                f"feature view {view.name!r} has data keyed by {key!r} as {have}; its entity "
                f"cannot declare {key!r} as {dtype}. Declare {have} or create a new view."
            )
            raise SchemaError(msg)


def _check_online_path(online: str | None) -> None:
    if online is not None and is_remote(online):
        msg = (
            f"online_path {online!r}: the online store is an LMDB file on a local disk; "
            "give a local folder."
        )
        raise ValidationError(msg)
