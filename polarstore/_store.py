"""``FeatureStore``: the repository façade. It resolves names and delegates to the modules."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import polars as pl

from polarstore import _spark
from polarstore._aggregations import AggregationView, describe_aggregation, table_of
from polarstore._checks import OnCheckFailure, enforce
from polarstore._datasets import read_spine, store_dataset
from polarstore._definitions import (
    Entity,
    FeatureService,
    FeatureView,
    as_references,
    check_name,
)
from polarstore._drift import drift
from polarstore._errors import (
    NotFoundError,
    SchemaError,
    StorageError,
    ValidationError,
    did_you_mean,
)
from polarstore._frames import cast_keys, entity_frame, key_dtype, prepare_rows, to_polars
from polarstore._offline import OfflineStore
from polarstore._ondemand import (
    OnDemandView,
    describe_on_demand,
    on_demand_from_json,
    on_demand_to_json,
    online_with_derived,
    resolve_on_demand,
)
from polarstore._registry import ObjectRegistry, Registry, RegistryState
from polarstore._retrieval import (
    EMPTY_VERSION,
    historical_with_derived,
    plan_requested,
    resolve_features,
    service_named,
)
from polarstore._stats import after_compact, prune_summaries, record_rows, settle, statistics
from polarstore._storage import (
    Location,
    default_online_path,
    is_remote,
    open_location,
)
from polarstore._stream import sink_training_set
from polarstore._time import STORED_DTYPE, to_utc, utc_now
from polarstore._vacuum import vacuum_repository

if TYPE_CHECKING:
    from polarstore._spark import SparkDataFrame

__all__ = ["FeatureStore"]

Definition = Entity | FeatureView | FeatureService | OnDemandView | AggregationView
_DEFINITIONS = (Entity, FeatureView, FeatureService, OnDemandView, AggregationView)
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
        """Close the online store's LMDB environment, if it was opened, once the statistics
        of the last writes are stored (they are stored in the background after each write).

        The store stays usable: the environment is reopened on the next online call. Prefer
        ``with FeatureStore(path) as store:`` in scripts.

        Examples
        --------
        >>> import tempfile
        >>> with FeatureStore(tempfile.mkdtemp()) as store:
        ...     store.versions()
        {}
        """
        settle()
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
        items = [objects] if isinstance(objects, _DEFINITIONS) else list(objects)
        for item in items:
            if not isinstance(item, _DEFINITIONS):
                msg = (
                    "apply() takes Entity, FeatureView, AggregationView, OnDemandView and "
                    "FeatureService "
                    f"objects, got {item!r}."
                )
                raise ValidationError(msg)
        self._registry.update(lambda state: self._apply(state, items))

    def _apply(self, state: RegistryState, items: list[Definition]) -> None:
        entities = [i for i in items if isinstance(i, Entity)]
        views = [i for i in items if isinstance(i, FeatureView)]
        services = [i for i in items if isinstance(i, FeatureService)]
        aggregations = [i for i in items if isinstance(i, AggregationView)]
        views += [a.source for a in aggregations if isinstance(a.source, FeatureView)]
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
            if view.name in state.on_demand:
                msg = f"feature view {view.name!r}: there is an on-demand view of that name."
                raise ValidationError(msg)
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
        _apply_aggregations(state, aggregations)
        resolvable = state.resolvable()  # on-demand inputs may be aggregation features
        for odv in [i for i in items if isinstance(i, OnDemandView)]:
            state.on_demand[odv.name] = resolve_on_demand(odv, resolvable, resolve_features)
        clash = [n for n in state.on_demand if n in resolvable]
        if clash:
            msg = (
                f"view {clash[0]!r}: there is an on-demand view of that name; names are shared "
                "by feature, aggregation and on-demand views."
            )
            raise ValidationError(msg)
        for service in services:
            plan_requested(resolvable, state.on_demand, service.features, full_feature_names=True)
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

    def list_on_demand_views(self) -> list[OnDemandView]:
        """The registered on-demand (derived-feature) views, in the order first applied.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from polarstore import OnDemandView
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply([FeatureView("stats", entities=Entity("user", "user_id"),
        ...                          schema={"clicks": pl.Int64}),
        ...              OnDemandView("derived", {"double": pl.col("stats:clicks") * 2})])
        >>> [(v.name, v.schema) for v in store.list_on_demand_views()]
        [('derived', {'double': Int64})]
        """
        return list(self._state().on_demand.values())

    def list_aggregation_views(self) -> list[AggregationView]:
        """The registered aggregation views, in the order they were first applied.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from polarstore import Aggregation, AggregationView
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> orders = FeatureView("orders", entities=Entity("user", "user_id"),
        ...                      schema={"amount": pl.Float64})
        >>> store.apply(AggregationView("spend", orders, [Aggregation("amount", "sum", "7d")]))
        >>> [(v.name, v.feature_names) for v in store.list_aggregation_views()]
        [('spend', ('amount_sum_7d',))]
        """
        return list(self._state().aggregations.values())

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
            *state.aggregations.values(),
            *state.on_demand.values(),
        ]
        for item in items:
            words = [item.name, item.description, getattr(item, "owner", "")]
            words += [f"{k}={v}" for k, v in (item.tags or {}).items()]
            if isinstance(item, (FeatureView, AggregationView)):
                words += list(item.feature_names)
            if isinstance(item, FeatureService):
                words += list(item.features)  # type: ignore[arg-type]
            if isinstance(item, OnDemandView):
                words += list(item.feature_names)
            if any(needle in w.lower() for w in words):
                found.append(item)
        return found

    def describe(self, view: str | FeatureView | AggregationView) -> dict[str, Any]:
        """Schema, description, owner, tags, rows, versions, freshness, online state.

        Freshness: ``latest_event_time``, ``freshness_lag`` (how far it is behind now, a
        ``timedelta``), ``materialized_version`` and ``materialized_at``.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime, timedelta
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
        >>> info["latest_event_time"].isoformat(), info["freshness_lag"] > timedelta(days=300)
        ('2024-01-03T00:00:00+00:00', True)
        """
        if isinstance(view, str) and view in (on_demand := self._state().on_demand):
            return describe_on_demand(on_demand[view])
        name = view.name if isinstance(view, AggregationView) else view
        aggregations = self._state().aggregations
        if isinstance(name, str) and name in aggregations:
            agg = aggregations[name]
            online = self._online().state(agg.name) if agg.online else {}
            return describe_aggregation(agg, online)
        v = self._view(view)  # type: ignore[arg-type]
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
            "freshness_lag": None if latest is None else utc_now() - latest,
            "materialized_version": online.get("version") if online else None,
            "materialized_at": online.get("materialized_at") if online else None,
        }

    # --- offline store ----------------------------------------------------------------------

    def write(
        self,
        view: str | FeatureView,
        data: Any,
        *,
        idempotency_key: str | None = None,
        on_check_failure: OnCheckFailure = "error",
    ) -> int:
        """Append rows to the view's Delta table in one commit; return the new table version.

        Everything is validated first: on any error nothing is written. ``data`` is a Polars
        DataFrame or LazyFrame, a pyarrow Table or a pandas DataFrame holding the join keys,
        the timestamp field(s) and exactly the declared features. With ``idempotency_key``, a
        retried job writing the same key again commits nothing (Delta app transactions).
        The view's ``checks`` run on the rows as stored (a row fails where a check is False;
        null passes): a failing row refuses the batch with a ``ValidationError`` naming the
        check, the count and up to 5 example rows, unless ``on_check_failure`` is ``"warn"``
        (written, with a ``CheckWarning``) or ``"drop"`` (only the passing rows are written,
        with a ``CheckWarning``; when none pass, nothing is committed and the current version,
        or -1 for a view without data, is returned).

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
        checked = enforce(v, rows, on_check_failure)
        if checked.height < rows.height and checked.is_empty():  # every row dropped
            return EMPTY_VERSION if stored is None else self._offline.current_version(v.name)  # type: ignore[return-value]
        rows = checked
        if rows.is_empty() and stored is not None:
            return self._offline.current_version(v.name)  # type: ignore[return-value]
        record = record_rows(self._offline, v)
        return self._offline.append(
            v, rows, idempotency_key=idempotency_key, on_sorted=record.start, on_commit=record
        )

    def read(self, view: str | FeatureView, *, as_of: AsOf | int = None) -> pl.LazyFrame:
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
        if isinstance(as_of, int) and not isinstance(as_of, bool):  # a bare version
            as_of = {v.name: as_of}
        version = self._pin(as_of, [v.name]).get(v.name)  # type: ignore[arg-type]
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
        version = self._offline.compact(v)
        after_compact(self._offline, v, version)
        return version

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
            on_commit=record_rows(self._offline, v),
        )
        if v.online:
            self._online().delete(v, frame, version)
        for agg in self._state().aggregations.values():  # their window state holds the rows
            if agg.online and agg.source_name == v.name:
                self._online().delete(agg, frame, version)
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
        try:
            return vacuum_repository(self, retention=retention, force=force)
        finally:
            if force is True and retention == timedelta(0):  # summaries hold values too
                prune_summaries(self._offline, self._state().views.values())

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

    @overload
    def get_historical_features(
        self,
        entity_df: Any,
        features: Any,
        *,
        timestamp_field: str = ...,
        full_feature_names: bool = ...,
        as_of: AsOf = ...,
        bitemporal: bool = ...,
        engine: Literal["polars"] = ...,
        spark: None = ...,
    ) -> pl.LazyFrame: ...

    @overload
    def get_historical_features(
        self,
        entity_df: Any,
        features: Any,
        *,
        timestamp_field: str = ...,
        full_feature_names: bool = ...,
        as_of: AsOf = ...,
        bitemporal: bool = ...,
        engine: Literal["spark"],
        spark: Any = ...,
    ) -> SparkDataFrame: ...

    def get_historical_features(
        self,
        entity_df: Any,
        features: Any,
        *,
        timestamp_field: str = "event_timestamp",
        full_feature_names: bool = False,
        as_of: AsOf = None,
        bitemporal: bool = False,
        engine: str = "polars",
        spark: Any = None,
    ) -> pl.LazyFrame | SparkDataFrame:
        """Point-in-time join: for each spine row, each feature's latest value at that time.

        The rules are in ``docs/contract.md``, "Point-in-time semantics". One row per
        ``entity_df`` row, in input order, input columns unchanged, then the features in the
        requested order.
        ``features`` holds ``"view:feature"`` / ``"view:*"`` references or a
        ``FeatureService``; ``as_of`` is a datetime, or a dict of view name to table version.
        With ``bitemporal=True`` a row counts only once it was known at the spine time: its
        created time (if the view has one) and the commit that first wrote it are not later
        (docs/contract.md, "Leakage-proof retrieval").
        ``engine="spark"`` runs the same join on Spark and returns a ``pyspark.sql.DataFrame``
        (``spark`` a ``SparkSession``; ``entity_df`` may be a Spark DataFrame; needs the
        ``polarstore[spark]`` extra; docs/contract.md, "The Spark engine").

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
        _spark.check_engine(engine, spark)
        return self._historical(
            entity_df,
            features,
            timestamp_field=timestamp_field,
            full_feature_names=full_feature_names,
            as_of=as_of,
            bitemporal=bitemporal,
            engine=engine,
            spark=spark,
        )

    def _historical(
        self,
        entity_df: Any,
        features: Any,
        *,
        timestamp_field: str,
        full_feature_names: bool,
        as_of: AsOf,
        bitemporal: bool,
        on_demand: Mapping[str, OnDemandView] | None = None,
        engine: str = "polars",
        spark: Any = None,
    ) -> Any:
        """``get_historical_features``, with ``on_demand`` definitions (a saved dataset's)
        in place of the registered ones."""
        state = self._state()
        features = service_named(features, state.services)
        plan = plan_requested(
            state.resolvable(),
            state.on_demand if on_demand is None else on_demand,
            features,
            full_feature_names=full_feature_names,
        )
        versions = self._pin(as_of, [table_of(r.view) for r in plan.stored])
        where = "get_historical_features"
        if not isinstance(timestamp_field, str):
            msg = f"{where}: timestamp_field must be a column name, got {timestamp_field!r}."
            raise ValidationError(msg)
        if not isinstance(bitemporal, bool):
            msg = f"{where}: bitemporal must be True or False, got {bitemporal!r}."
            raise ValidationError(msg)
        if engine == "spark":
            return _spark.historical_features(
                self._offline,
                entity_df,
                plan,
                timestamp_field=timestamp_field,
                versions=versions,
                bitemporal=bitemporal,
                spark=spark,
            )
        return historical_with_derived(
            self._offline,
            entity_df,
            plan,
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
        plan = plan_requested(
            state.resolvable(), state.on_demand, refs, full_feature_names=full_feature_names
        )
        requested = plan.stored
        pins = self._pin(as_of, [table_of(r.view) for r in requested])
        versions: dict[str, int | None] = {}
        for table in map(table_of, (r.view for r in requested)):
            # Only the tables it uses: another's damaged table must not block.
            current = pins.get(table, self._offline.current_version(table))
            versions[table] = EMPTY_VERSION if current is None else current
        result = self.get_historical_features(
            spine,
            refs,
            timestamp_field=timestamp_field,
            full_feature_names=full_feature_names,
            as_of=versions,  # type: ignore[arg-type]
            bitemporal=bitemporal,
        )
        names = {ref.partition(":")[0] for ref in refs}
        used = {n: v for n, v in state.on_demand.items() if n in names}
        entry = {
            "features": refs,
            "versions": versions,
            "timestamp_field": timestamp_field,
            "full_feature_names": full_feature_names,
            "bitemporal": bitemporal,
            # The definitions of the derived features, so that loading recomputes them as saved.
            **({"on_demand": {n: on_demand_to_json(v) for n, v in used.items()}} if used else {}),
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
        saved = {  # absent in datasets saved without derived features
            n: on_demand_from_json(n, d, where=f"dataset {name!r}")
            for n, d in entry.get("on_demand", {}).items()
        }
        return self._historical(
            spine,
            entry["features"],
            timestamp_field=entry["timestamp_field"],
            full_feature_names=entry["full_feature_names"],
            as_of=entry["versions"],
            bitemporal=entry.get("bitemporal", False),  # absent in datasets saved before it
            on_demand={**self._state().on_demand, **saved},
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
        views: str | FeatureView | AggregationView | Iterable[Any] | None = None,
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
        targets: list[FeatureView | AggregationView]
        if views is None:
            targets = [v for v in state.views.values() if v.online]
            targets += [a for a in state.aggregations.values() if a.online]
        else:
            items = [views] if isinstance(views, (str, FeatureView, AggregationView)) else views
            if not isinstance(items, Iterable) or isinstance(items, (bytes, Mapping)):
                msg = (
                    "materialize: views must be a view name, a FeatureView or a list of them, "
                    f"got {views!r}."
                )
                raise ValidationError(msg)
            names = [v.name if isinstance(v, AggregationView) else v for v in items]
            targets = [
                state.aggregations[n]
                if isinstance(n, str) and n in state.aggregations
                else self._view(n)
                for n in names
            ]
            offline_only = [v.name for v in targets if not v.online]
            if offline_only:
                msg = f"views {offline_only} are not online (online=False); nothing to sync."
                raise ValidationError(msg)
        until = None if end is None else to_utc(end, what="end")
        # Views applied since with online=False stop being served: their online data goes.
        drop = [v.name for v in state.views.values() if not v.online]
        drop += [a.name for a in state.aggregations.values() if not a.online]
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
        plan = plan_requested(
            state.resolvable(), state.on_demand, features, full_feature_names=full_feature_names
        )
        moment = utc_now() if now is None else to_utc(now, what="now")
        return online_with_derived(self._online().lookup, entity_rows, plan, moment)

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

    # --- feature quality --------------------------------------------------------------------

    def _version(self, v: FeatureView, as_of: AsOf | int, where: str) -> int | None:
        """``as_of`` of a verb about one view (a bare int is its version) as a version."""
        if isinstance(as_of, int) and not isinstance(as_of, bool):
            as_of = {v.name: as_of}
        if isinstance(as_of, Mapping) and v.name not in as_of:
            msg = f"{where}: as_of {dict(as_of)!r} pins no version of view {v.name!r}."
            raise ValidationError(msg)
        return self._pin(as_of, [v.name]).get(v.name)  # type: ignore[arg-type]

    def statistics(self, view: str | FeatureView, *, as_of: AsOf | int = None) -> pl.DataFrame:
        """Per-feature statistics of the view as of a version or moment (default: now).

        One row per feature: ``feature``, ``dtype``, ``count`` (non-null values), ``null_count``,
        ``mean``, ``std`` (ddof=1), ``min``, ``p25``, ``p50``, ``p75``, ``max`` (numbers only),
        ``n_unique`` (nulls not counted) and ``top_values`` (strings and booleans: the 10 most
        frequent ``{value, count}``). ``as_of`` is a version (``int``), a ``{view: version}``
        pin or a moment. Computed from per-file summaries kept by every write, delete and
        compaction, never by rescanning the history. Counts, mean, std, min and max are exact
        (NaN values are counted in ``count`` and left out of the rest); ``p25``/``p50``/``p75``
        have a rank error of at most 0.8% (0.35% from the KLL sketches, 0.45% from sampling
        batches above 131,072 values, each with 99% confidence); ``n_unique`` is exact for
        strings and booleans with up to 1,000 values, else a HyperLogLog estimate (standard
        error 0.8%: within 2% with 99% confidence); ``top_values`` counts are exact then too.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"clicks": pl.Int64, "tier": pl.String}))
        >>> store.write("stats", pl.DataFrame({"user_id": [1, 2, 3], "clicks": [3, 5, None],
        ...     "tier": ["a", "b", "a"], "event_timestamp": [datetime(2024, 1, 1)] * 3}))
        0
        >>> store.write("stats", pl.DataFrame({"user_id": [1], "clicks": [10], "tier": ["a"],
        ...     "event_timestamp": [datetime(2024, 1, 2)]}))
        1
        >>> store.statistics("stats").select("feature", "count", "null_count", "max").rows()
        [('clicks', 3, 1, 10.0), ('tier', 4, 0, None)]
        >>> store.statistics("stats", as_of=0)["mean"].to_list()
        [4.0, None]
        >>> store.statistics("stats")["top_values"][1].to_list()
        [{'value': 'a', 'count': 3}, {'value': 'b', 'count': 1}]
        """
        v = self._view(view)
        return statistics(self._offline, v, self._version(v, as_of, "statistics"))

    def drift(self, view: str | FeatureView, reference: Any, current: Any = None) -> pl.DataFrame:
        """How far each feature's distribution moved from ``reference`` to ``current``.

        Each side is a version (``int``), a ``{view: version}`` pin or a moment (the whole
        table as of it), or an event-time range ``(start, end)`` of the current table (start
        inclusive, end exclusive); ``current=None`` is the current table. One row per feature:
        ``kind`` (``numeric`` for numbers and times, ``categorical`` for strings and booleans),
        ``reference_count``, ``current_count``, ``psi`` (over the reference's deciles, or the
        categories), ``ks`` (numeric: the largest CDF gap), ``chi2`` and ``cramers_v``
        (categorical), ``p_value`` (of KS or chi-square), ``drifted`` and ``new_categories``.
        ``drifted`` is True when PSI >= 0.2, KS >= 0.1 or Cramér's V >= 0.1 **and** p < 0.01
        (an effect worth a look that is not sampling noise); null for features that are not
        compared (lists, binaries) or have no values on a side. Versions and moments use the
        summaries ``statistics`` keeps (no data is read); a range reads its rows.

        Examples
        --------
        >>> import tempfile, polars as pl
        >>> from datetime import datetime, timedelta
        >>> store = FeatureStore(tempfile.mkdtemp())
        >>> store.apply(FeatureView("stats", entities=Entity("user", "user_id"),
        ...                         schema={"amount": pl.Float64, "tier": pl.String}))
        >>> def day(d, amounts, tiers): return pl.DataFrame({"user_id": range(len(amounts)),
        ...     "amount": amounts, "tier": tiers, "event_timestamp": [datetime(2024, 1, d)]
        ...     * len(amounts)})
        >>> store.write("stats", day(1, [float(i % 100) for i in range(1000)], ["a", "b"] * 500))
        0
        >>> store.write("stats", day(2, [float(i % 100) + 50 for i in range(1000)], ["c"] * 1000))
        1
        >>> table = store.drift("stats", reference=0)  # version 0 against the current table
        >>> table.select("feature", "kind", "drifted").rows()
        [('amount', 'numeric', True), ('tier', 'categorical', True)]
        >>> table["new_categories"][1].to_list()
        ['c']
        >>> by_day = (datetime(2024, 1, 1), datetime(2024, 1, 2))
        >>> store.drift("stats", reference=by_day, current=0)["drifted"].to_list()  # the same rows
        [False, False]
        """
        v = self._view(view)
        ref = self._side(v, reference, "reference")
        return drift(self._offline, v, ref, self._side(v, current, "current"))

    def _side(self, v: FeatureView, side: Any, what: str) -> Any:
        """A side of ``drift``: a version (None: current) or a UTC event-time range."""
        where = f"drift({v.name!r}) {what}"
        if isinstance(side, (tuple, list)):
            if len(side) != 2:
                msg = f"{where}: an event-time range is (start, end), got {side!r}."
                raise ValidationError(msg)
            start = to_utc(side[0], what=f"{where} start")
            end = to_utc(side[1], what=f"{where} end")
            if not start < end:
                msg = f"{where}: the range ({start}, {end}) is empty; start must be before end."
                raise ValidationError(msg)
            return (start, end)
        if side is None and what == "reference":
            msg = f"{where}: give a version, a moment or an event-time range (start, end)."
            raise ValidationError(msg)
        return self._version(v, side, where)


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


def _apply_aggregations(state: RegistryState, aggregations: list[AggregationView]) -> None:
    """Register aggregation views against their sources, and re-resolve the registered ones
    (a re-applied source must be the one they read)."""
    for agg in aggregations:
        if agg.name in state.views:
            msg = (
                f"aggregation view {agg.name!r}: there is a feature view of that name; "
                "names are shared by feature views and aggregation views."
            )
            raise ValidationError(msg)
        state.aggregations[agg.name] = agg
    clash = [n for n in state.aggregations if n in state.views]
    if clash:
        msg = (
            f"feature view {clash[0]!r}: there is an aggregation view of that name; names are "
            "shared by feature views and aggregation views."
        )
        raise ValidationError(msg)
    for name, agg in list(state.aggregations.items()):
        state.aggregations[name] = agg.resolve(state.views)


def _check_online_path(online: str | None) -> None:
    if online is not None and is_remote(online):
        msg = (
            f"online_path {online!r}: the online store is an LMDB file on a local disk; "
            "give a local folder."
        )
        raise ValidationError(msg)
