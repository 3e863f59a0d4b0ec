"""Immutable, validated definitions: Entity, FeatureView, FeatureService."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import polars as pl

from polarstore._errors import SchemaError, ValidationError
from polarstore._time import as_timedelta

__all__ = [
    "SEQ_COLUMN",
    "Entity",
    "FeatureService",
    "FeatureView",
    "check_name",
    "dtype_from_str",
    "dtype_to_str",
]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# The write-order column stored beside every view's rows; the final tie-breaker.
SEQ_COLUMN = "_polarstore_seq"
_RESERVED_PREFIX = "_polarstore"


def check_name(name: object, *, what: str) -> str:
    """Return ``name`` if it is a valid identifier-like name, else raise ``ValidationError``.

    Names become folder names and column names, so the rule is strict: no separators, no
    dots, no spaces — nothing that could point a path outside the repository.

    >>> check_name("user_stats", what="feature view")
    'user_stats'
    >>> check_name("../etc", what="feature view")
    Traceback (most recent call last):
    ...
    polarstore._errors.ValidationError: feature view name '../etc' is invalid: ...
    """
    if not isinstance(name, str) or not _NAME.match(name):
        msg = (
            f"{what} name {name!r} is invalid: names must match [A-Za-z_][A-Za-z0-9_]* "
            "(letters, digits and underscores, not starting with a digit)."
        )
        raise ValidationError(msg)
    if name.startswith(_RESERVED_PREFIX):
        msg = f"{what} name {name!r} is invalid: the prefix {_RESERVED_PREFIX!r} is reserved."
        raise ValidationError(msg)
    return name


def _check_tags(tags: Mapping[str, str] | None, *, owner: str) -> dict[str, str]:
    if tags is None:
        return {}
    if not isinstance(tags, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        msg = f"tags of {owner} must be a dict of str to str, got {tags!r}."
        raise ValidationError(msg)
    return dict(tags)


def _check_text(value: object, *, what: str) -> str:
    if not isinstance(value, str):
        msg = f"{what} must be a str, got {type(value).__name__}."
        raise ValidationError(msg)
    return value


# --- dtypes <-> JSON text -------------------------------------------------------------------

_SIMPLE: dict[str, pl.DataType] = {
    str(t): t
    for t in (
        pl.Boolean(),
        pl.Int8(),
        pl.Int16(),
        pl.Int32(),
        pl.Int64(),
        pl.Float32(),
        pl.Float64(),
        pl.String(),
        pl.Binary(),
        pl.Date(),
    )
}


def dtype_to_str(dtype: pl.DataType) -> str:
    """Text for a supported Polars dtype, the inverse of :func:`dtype_from_str`.

    >>> dtype_to_str(pl.List(pl.Float32))
    'List(Float32)'
    >>> dtype_from_str(dtype_to_str(pl.Datetime("us", "UTC")))
    Datetime(time_unit='us', time_zone='UTC')
    """
    # Only what a Delta table stores as it is: Delta has no unsigned ints, no durations, and
    # timestamps in µs only (naive, or UTC).
    if (
        isinstance(dtype, pl.Datetime)
        and dtype.time_unit == "us"
        and dtype.time_zone in (None, "UTC")
    ):
        return "Datetime(us, UTC)" if dtype.time_zone else "Datetime(us)"
    if isinstance(dtype, pl.List):
        return f"List({dtype_to_str(dtype.inner)})"  # type: ignore[arg-type]
    text = str(dtype)
    if text in _SIMPLE:
        return text
    msg = (
        f"dtype {dtype} is not supported for features; use Boolean, Int8-Int64, Float32, "
        "Float64, String, Binary, Date, Datetime('us') or Datetime('us', 'UTC'), or a List "
        "of those (Delta Lake has no unsigned integers or durations)."
    )
    raise SchemaError(msg)


def dtype_from_str(text: str) -> pl.DataType:
    if text in _SIMPLE:
        return _SIMPLE[text]
    match = re.fullmatch(r"(\w+)\((.*)\)", text)
    if match:
        kind, args = match.groups()
        if kind == "List":
            return pl.List(dtype_from_str(args))
        if kind == "Datetime" and args in ("us", "us, UTC"):
            return pl.Datetime("us", "UTC" if "UTC" in args else None)
    msg = f"unknown dtype {text!r} in the registry."
    raise SchemaError(msg)


def _normalise_dtype(dtype: Any, *, where: str) -> pl.DataType:
    if isinstance(dtype, type) and issubclass(dtype, pl.DataType):
        dtype = dtype()
    if not isinstance(dtype, pl.DataType):
        msg = f"{where}: dtype must be a Polars dtype such as pl.Float64, got {dtype!r}."
        raise SchemaError(msg)
    dtype_to_str(dtype)  # raises for unsupported dtypes
    return dtype


# --- the definitions ------------------------------------------------------------------------


@dataclass(frozen=True)
class Entity:
    """The thing features describe, identified by one or more join keys.

    Parameters
    ----------
    name
        Identifier-like name, unique in the repository.
    join_keys
        The key column(s); a list makes a compound key.
    description, tags
        Free text and string labels, searchable with ``FeatureStore.search``.

    Examples
    --------
    >>> Entity("user", join_keys="user_id").join_keys
    ('user_id',)
    >>> Entity("pair", join_keys=["user_id", "item_id"]).join_keys
    ('user_id', 'item_id')
    """

    name: str
    join_keys: tuple[str, ...] | str | Sequence[str]
    description: str = ""
    tags: Mapping[str, str] | None = field(default=None, compare=True)

    def __post_init__(self) -> None:
        check_name(self.name, what="entity")
        keys = (self.join_keys,) if isinstance(self.join_keys, str) else tuple(self.join_keys)
        if not keys:
            msg = f"entity {self.name!r} needs at least one join key."
            raise ValidationError(msg)
        for key in keys:
            check_name(key, what=f"join key of entity {self.name!r}")
        if len(set(keys)) != len(keys):
            msg = f"entity {self.name!r} names a join key twice: {list(keys)}."
            raise ValidationError(msg)
        object.__setattr__(self, "join_keys", keys)
        _check_text(self.description, what=f"description of entity {self.name!r}")
        object.__setattr__(self, "tags", _check_tags(self.tags, owner=f"entity {self.name!r}"))


@dataclass(frozen=True)
class FeatureView:
    """A named group of features observed at one event time per row.

    Parameters
    ----------
    name
        Identifier-like name; also the name of the view's Delta table folder.
    entities
        The entities (one or several) whose join keys identify a row.
    schema
        Feature name to Polars dtype, in the order features are returned by ``view:*``.
    timestamp_field
        The event-time column of the written data.
    created_timestamp_field
        Optional column recording when a row was produced; breaks ties in event time.
    ttl
        How long a value stays valid after its event time; ``None`` means forever.
    online
        Whether ``materialize`` syncs this view to the online store.

    Examples
    --------
    >>> from datetime import timedelta
    >>> user = Entity("user", join_keys="user_id")
    >>> view = FeatureView("user_stats", entities=[user],
    ...                    schema={"clicks": pl.Int64, "spend": pl.Float64},
    ...                    ttl=timedelta(days=7))
    >>> view.join_keys, view.feature_names
    (('user_id',), ('clicks', 'spend'))
    """

    name: str
    entities: Sequence[Entity] | Entity
    schema: Mapping[str, Any]
    timestamp_field: str = "event_timestamp"
    created_timestamp_field: str | None = None
    ttl: timedelta | None = None
    online: bool = True
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        check_name(self.name, what="feature view")
        where = f"feature view {self.name!r}"
        entities = (self.entities,) if isinstance(self.entities, Entity) else tuple(self.entities)
        if not entities or not all(isinstance(e, Entity) for e in entities):
            msg = f"{where}: entities must be a non-empty list of Entity objects."
            raise ValidationError(msg)
        object.__setattr__(self, "entities", entities)
        if not isinstance(self.schema, Mapping) or not self.schema:
            msg = f"{where}: schema must be a non-empty dict of feature name to Polars dtype."
            raise SchemaError(msg)
        schema = {
            check_name(n, what=f"feature of {where}"): _normalise_dtype(t, where=f"{where}, {n}")
            for n, t in self.schema.items()
        }
        object.__setattr__(self, "schema", schema)
        check_name(self.timestamp_field, what=f"timestamp field of {where}")
        if self.created_timestamp_field is not None:
            check_name(self.created_timestamp_field, what=f"created timestamp field of {where}")
        object.__setattr__(self, "ttl", as_timedelta(self.ttl, what=f"ttl of {where}"))
        if not isinstance(self.online, bool):
            msg = f"{where}: online must be True or False, got {self.online!r}."
            raise ValidationError(msg)
        _check_text(self.description, what=f"description of {where}")
        _check_text(self.owner, what=f"owner of {where}")
        object.__setattr__(self, "tags", _check_tags(self.tags, owner=where))
        seen: dict[str, str] = {}
        for role, names in (
            ("join key", self.join_keys),
            ("timestamp field", (self.timestamp_field,)),
            ("created timestamp field", (self.created_timestamp_field,)),
            ("feature", tuple(schema)),
        ):
            for column in names:
                if column is None:
                    continue
                if column in seen:
                    msg = f"{where}: column {column!r} is both a {seen[column]} and a {role}."
                    raise SchemaError(msg)
                seen[column] = role

    @property
    def join_keys(self) -> tuple[str, ...]:
        """Every join key of the view's entities, in order, without repeats."""
        keys: dict[str, None] = {}
        for entity in self.entities:  # type: ignore[union-attr]
            keys.update(dict.fromkeys(entity.join_keys))
        return tuple(keys)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.schema)

    @property
    def features(self) -> dict[str, pl.DataType]:
        return dict(self.schema)


@dataclass(frozen=True)
class FeatureService:
    """A named list of feature references for one model, shared by training and serving.

    ``features`` holds ``"view:feature"`` / ``"view:*"`` strings or whole ``FeatureView``
    objects (meaning all their features).

    Examples
    --------
    >>> FeatureService("churn_v1", features=["user_stats:clicks", "user_profile:*"]).features
    ('user_stats:clicks', 'user_profile:*')
    """

    name: str
    features: Sequence[str | FeatureView]
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        check_name(self.name, what="feature service")
        refs = as_references(self.features, where=f"feature service {self.name!r}")
        object.__setattr__(self, "features", refs)
        _check_text(self.description, what=f"description of feature service {self.name!r}")
        _check_text(self.owner, what=f"owner of feature service {self.name!r}")
        tags = _check_tags(self.tags, owner=f"feature service {self.name!r}")
        object.__setattr__(self, "tags", tags)


def as_references(features: object, *, where: str) -> tuple[str, ...]:
    """Flatten feature arguments (refs, views, services, or a list of them) into ref strings."""
    items: Iterable[object]
    if isinstance(features, (str, FeatureView, FeatureService)):
        items = [features]
    elif isinstance(features, Iterable):
        items = list(features)
    else:
        items = [features]
    refs: list[str] = []
    for item in items:
        if isinstance(item, str):
            view, sep, feature = item.partition(":")
            if not sep or not view or not feature:
                msg = (
                    f"{where}: feature reference {item!r} must look like 'view:feature' "
                    "or 'view:*'."
                )
                raise ValidationError(msg)
            refs.append(item)
        elif isinstance(item, FeatureView):
            refs.append(f"{item.name}:*")
        elif isinstance(item, FeatureService):
            refs.extend(item.features)  # type: ignore[arg-type]
        else:
            msg = (
                f"{where}: features must be 'view:feature' strings, FeatureView or "
                f"FeatureService objects, got {type(item).__name__}."
            )
            raise ValidationError(msg)
    if not refs:
        msg = f"{where}: no features requested."
        raise ValidationError(msg)
    return tuple(refs)
