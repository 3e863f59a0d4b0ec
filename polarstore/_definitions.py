"""Immutable, validated definitions: Entity, FeatureView, FeatureService."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import polars as pl

from polarstore._checks import check_columns, normalise
from polarstore._errors import NotFoundError, SchemaError, ValidationError, did_you_mean
from polarstore._time import as_ttl

__all__ = [
    "KEY_DTYPES",
    "MAX_NAME_LENGTH",
    "SEQ_COLUMN",
    "Entity",
    "FeatureService",
    "FeatureView",
    "check_column",
    "check_name",
    "dtype_from_str",
    "dtype_to_str",
]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# The write-order column stored beside every view's rows; the final tie-breaker.
SEQ_COLUMN = "_polarstore_seq"
_RESERVED_PREFIX = "_polarstore"
# The join and the online codec add working columns (``__polarstore_ts``, ``__row``,
# ``__code``, ...) beside the user's columns: a user column of the same name would collide
# with them, so the whole double-underscore namespace is kept for internal columns.
_INTERNAL_PREFIX = "__"
# Names become folder and file names (``views/<view>``, ``locks/<view>.lock``,
# ``datasets/<name>-<16 hex>.parquet.tmp``): 128 leaves room for those affixes within the
# 255-byte file-name limit of common file systems, and names are ASCII, so bytes = chars.
MAX_NAME_LENGTH = 128
# Declarable join-key dtypes. Keys are stored as Int64 or String whatever the declared width
# (spines, tables and the online key codec then agree on one encoding per kind); a narrower
# integer declaration is checked value by value on every write, spine and lookup.
KEY_DTYPES: tuple[pl.DataType, ...] = (pl.Int8(), pl.Int16(), pl.Int32(), pl.Int64(), pl.String())


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
    if len(name) > MAX_NAME_LENGTH:
        msg = (
            f"{what} name {name[:20]!r}... is {len(name)} characters long; names are limited "
            f"to {MAX_NAME_LENGTH} (they become file names)."
        )
        raise ValidationError(msg)
    if name.startswith(_RESERVED_PREFIX):
        msg = f"{what} name {name!r} is invalid: the prefix {_RESERVED_PREFIX!r} is reserved."
        raise ValidationError(msg)
    return name


def check_column(name: object, *, what: str) -> str:
    """:func:`check_name` for a column (key, timestamp, feature): internal names are refused.

    >>> check_column("clicks", what="feature")
    'clicks'
    >>> check_column("__polarstore_ts", what="feature")
    Traceback (most recent call last):
    ...
    polarstore._errors.ValidationError: feature name '__polarstore_ts' is reserved: ...
    """
    check_name(name, what=what)
    assert isinstance(name, str)
    if name.startswith(_INTERNAL_PREFIX):
        msg = (
            f"{what} name {name!r} is reserved: names starting with {_INTERNAL_PREFIX!r} are "
            "polarstore's internal columns (used by the point-in-time join and the online "
            "store). Rename the column."
        )
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
        The key column(s): a str, a list of str (a compound key), or a dict of key name to
        Polars dtype (``pl.String`` or ``pl.Int8``-``pl.Int64``) that declares the key types;
        then every write, spine and lookup is cast losslessly to them (``"0042"`` stays a
        string). Undeclared key types are fixed by the first write.
    description, tags
        Free text and string labels, searchable with ``FeatureStore.search``.

    Examples
    --------
    >>> Entity("user", join_keys="user_id").join_keys
    ('user_id',)
    >>> Entity("pair", join_keys=["user_id", "item_id"]).join_keys
    ('user_id', 'item_id')
    >>> Entity("account", join_keys={"account_code": pl.String}).key_dtypes
    {'account_code': String}
    """

    name: str
    join_keys: tuple[str, ...] | str | Sequence[str] | Mapping[str, Any]
    description: str = ""
    tags: Mapping[str, str] | None = field(default=None, compare=True)
    key_dtypes: dict[str, pl.DataType] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.name, what="entity")
        where = f"entity {self.name!r}"
        given = self.join_keys
        declared: dict[str, pl.DataType] = {}
        if isinstance(given, str):
            keys: tuple[Any, ...] = (given,)
        elif isinstance(given, Mapping):
            keys = tuple(given)
            declared = {
                k: _key_dtype(t, where=f"{where}, join key {k!r}") for k, t in given.items()
            }
        elif isinstance(given, Iterable) and not isinstance(given, (bytes, bytearray)):
            keys = tuple(given)
        else:
            msg = (
                f"{where}: join_keys must be a str, a list of str or a dict of key name to "
                f"Polars dtype, got {type(given).__name__} {given!r}."
            )
            raise ValidationError(msg)
        if not keys:
            msg = f"{where} needs at least one join key."
            raise ValidationError(msg)
        for key in keys:
            check_column(key, what=f"join key of {where}")
        if len(set(keys)) != len(keys):
            msg = f"{where} names a join key twice: {list(keys)}."
            raise ValidationError(msg)
        object.__setattr__(self, "join_keys", keys)
        object.__setattr__(self, "key_dtypes", declared)
        _check_text(self.description, what=f"description of {where}")
        object.__setattr__(self, "tags", _check_tags(self.tags, owner=where))


def _key_dtype(dtype: Any, *, where: str) -> pl.DataType:
    if isinstance(dtype, type) and issubclass(dtype, pl.DataType):
        dtype = dtype()
    if not isinstance(dtype, pl.DataType) or dtype not in KEY_DTYPES:
        allowed = ", ".join(f"pl.{t}" for t in KEY_DTYPES)
        msg = f"{where}: a join key's dtype must be one of {allowed}, got {dtype!r}."
        raise SchemaError(msg)
    return dtype


@dataclass(frozen=True)
class FeatureView:
    """A named group of features observed at one event time per row.

    Parameters
    ----------
    name
        Identifier-like name; also the name of the view's Delta table folder.
    entities
        The entities (one or several) whose join keys identify a row: ``Entity`` objects, or
        the names of entities registered before or in the same ``apply``.
    schema
        Feature name to Polars dtype, in the order features are returned by ``view:*``.
    timestamp_field
        The event-time column of the written data.
    created_timestamp_field
        Optional column recording when a row was produced; breaks ties in event time.
    ttl
        How long a value stays valid after its event time (positive); ``None`` means forever.
    online
        Whether ``materialize`` syncs this view to the online store.
    allow_exact_match
        Whether a row whose event time equals the spine time (or ``now`` online) counts.
        ``False`` makes rule 2 strict (``event_time < t``), for features that are only
        available after the instant they describe.

    Examples
    --------
    >>> from datetime import timedelta
    >>> user = Entity("user", join_keys="user_id")
    >>> view = FeatureView("user_stats", entities=[user],
    ...                    schema={"clicks": pl.Int64, "spend": pl.Float64},
    ...                    ttl=timedelta(days=7))
    >>> view.join_keys, view.feature_names
    (('user_id',), ('clicks', 'spend'))
    >>> by_name = FeatureView("user_stats", entities=["user"], schema={"clicks": pl.Int64})
    >>> by_name.resolve({"user": user}).join_keys
    ('user_id',)
    """

    name: str
    entities: Sequence[Entity | str] | Entity | str
    schema: Mapping[str, Any]
    timestamp_field: str = "event_timestamp"
    created_timestamp_field: str | None = None
    ttl: timedelta | None = None
    online: bool = True
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] | None = None
    allow_exact_match: bool = True
    # Row-level boolean expressions write checks (polarstore._checks). Compared by their JSON
    # (``_check_key``): the registry keeps the documents, decoded when a write needs them.
    checks: Mapping[str, Any] | None = field(default=None, compare=False)
    check_documents: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    _check_key: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        check_name(self.name, what="feature view")
        where = f"feature view {self.name!r}"
        given = self.entities
        entities = (
            (given,)
            if isinstance(given, (Entity, str))
            else tuple(given)
            if isinstance(given, Iterable)
            else ()
        )
        if not entities or not all(isinstance(e, (Entity, str)) for e in entities):
            msg = (
                f"{where}: entities must be a non-empty list of Entity objects or entity "
                f"names, got {given!r}."
            )
            raise ValidationError(msg)
        for entity in entities:
            if isinstance(entity, str):
                check_name(entity, what=f"entity of {where}")
        names = [e if isinstance(e, str) else e.name for e in entities]
        if len(set(names)) != len(names):
            msg = f"{where} names an entity twice: {names}."
            raise ValidationError(msg)
        object.__setattr__(self, "entities", entities)
        if not isinstance(self.schema, Mapping) or not self.schema:
            msg = f"{where}: schema must be a non-empty dict of feature name to Polars dtype."
            raise SchemaError(msg)
        schema = {
            check_column(n, what=f"feature of {where}"): _normalise_dtype(t, where=f"{where}, {n}")
            for n, t in self.schema.items()
        }
        object.__setattr__(self, "schema", schema)
        check_column(self.timestamp_field, what=f"timestamp field of {where}")
        if self.created_timestamp_field is not None:
            check_column(self.created_timestamp_field, what=f"created timestamp field of {where}")
        object.__setattr__(self, "ttl", as_ttl(self.ttl, what=f"ttl of {where}"))
        if not isinstance(self.online, bool):
            msg = f"{where}: online must be True or False, got {self.online!r}."
            raise ValidationError(msg)
        if not isinstance(self.allow_exact_match, bool):
            got = self.allow_exact_match
            msg = f"{where}: allow_exact_match must be True or False, got {got!r}."
            raise ValidationError(msg)
        _check_text(self.description, what=f"description of {where}")
        _check_text(self.owner, what=f"owner of {where}")
        object.__setattr__(self, "tags", _check_tags(self.tags, owner=where))
        checks = normalise(self.checks, self.check_documents, where=where, check_name=check_name)
        for attr, value in zip(("checks", "check_documents", "_check_key"), checks, strict=True):
            object.__setattr__(self, attr, value)
        if self.resolved:
            self._check_columns()
            check_columns(self)

    def _check_columns(self) -> None:
        """Every column plays one role, and entities sharing a key agree on its dtype."""
        where = f"feature view {self.name!r}"
        declared: dict[str, tuple[str, pl.DataType]] = {}
        for entity in self._entities():
            for key, dtype in entity.key_dtypes.items():
                other = declared.setdefault(key, (entity.name, dtype))
                if other[1] != dtype:
                    msg = (
                        f"{where}: join key {key!r} is declared {other[1]} by entity "
                        f"{other[0]!r} and {dtype} by entity {entity.name!r}."
                    )
                    raise SchemaError(msg)
        seen: dict[str, str] = {}
        for role, names in (
            ("join key", self.join_keys),
            ("timestamp field", (self.timestamp_field,)),
            ("created timestamp field", (self.created_timestamp_field,)),
            ("feature", tuple(self.schema)),
        ):
            for column in names:
                if column is None:
                    continue
                if column in seen:
                    msg = f"{where}: column {column!r} is both a {seen[column]} and a {role}."
                    raise SchemaError(msg)
                seen[column] = role

    @property
    def resolved(self) -> bool:
        """False while some entity is only named; ``FeatureStore.apply`` resolves the names."""
        return all(isinstance(e, Entity) for e in self.entities)  # type: ignore[union-attr]

    def _entities(self) -> tuple[Entity, ...]:
        if not self.resolved:
            named = [e for e in self.entities if isinstance(e, str)]  # type: ignore[union-attr]
            msg = (
                f"feature view {self.name!r} names its entities {named} by name: their join "
                "keys are known once it is applied (FeatureStore.apply) or resolved against "
                "the entities (view.resolve({name: entity}))."
            )
            raise ValidationError(msg)
        return self.entities  # type: ignore[return-value]

    def resolve(self, entities: Mapping[str, Entity]) -> FeatureView:
        """This view with every entity given by name replaced by the entity of that name.

        ``NotFoundError`` with a close-match hint for a name not in ``entities``.
        """
        found: list[Entity] = []
        for entity in self.entities:  # type: ignore[union-attr]
            if isinstance(entity, str):
                if entity not in entities:
                    msg = (
                        f"feature view {self.name!r} names the entity {entity!r}, which is "
                        "neither registered nor in this apply." + did_you_mean(entity, entities)
                    )
                    raise NotFoundError(msg)
                found.append(entities[entity])
            else:
                found.append(entity)
        return self.with_entities(found)

    def with_entities(self, entities: Sequence[Entity]) -> FeatureView:
        """This view over ``entities`` (the same names, possibly re-applied definitions)."""
        if list(self.entities) == list(entities):  # type: ignore[arg-type]
            return self
        return dataclasses.replace(self, entities=tuple(entities))

    @property
    def entity_names(self) -> tuple[str, ...]:
        """The names of the view's entities (given as objects or as names)."""
        return tuple(e if isinstance(e, str) else e.name for e in self.entities)  # type: ignore[union-attr]

    @property
    def join_keys(self) -> tuple[str, ...]:
        """Every join key of the view's entities, in order, without repeats."""
        keys: dict[str, None] = {}
        for entity in self._entities():
            keys.update(dict.fromkeys(entity.join_keys))
        return tuple(keys)

    @property
    def key_dtypes(self) -> dict[str, pl.DataType]:
        """The declared dtypes of the view's join keys (``{}`` when none is declared)."""
        declared: dict[str, pl.DataType] = {}
        for entity in self._entities():
            declared.update(entity.key_dtypes)
        return declared

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
