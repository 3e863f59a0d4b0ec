"""Derived features (``OnDemandView``): row-wise Polars expressions over stored features and
request columns, evaluated after the join offline, after the lookup online.

A request that names on-demand features becomes a :class:`Plan`: the stored features asked
for, plus one hidden stored column per input reference (``__polarstore_in_<i>``), and the
derived features as expressions over those hidden columns and the cast request columns
(``__polarstore_req_<name>``). Inputs are resolved by the resolver the caller passes
(``_retrieval.resolve_features``: this module sits below retrieval, beside the definitions, so
the registry can read it), so any reference the store resolves can feed an expression.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

from polarstore._definitions import (
    FeatureService,
    FeatureView,
    as_references,
    check_column,
    check_name,
    dtype_from_str,
    dtype_to_str,
)
from polarstore._errors import (
    NotFoundError,
    PolarstoreError,
    SchemaError,
    ValidationError,
    did_you_mean,
)
from polarstore._expressions import (
    check_row_wise,
    compile_scalar,
    expression_from_json,
    expression_to_json,
    input_names,
)
from polarstore._frames import lossless_cast, to_polars

if TYPE_CHECKING:  # _aggregations imports the registry side of this module's callers
    from polarstore._aggregations import AggregationView

__all__ = [
    "OnDemandView",
    "Plan",
    "describe_on_demand",
    "evaluate_frame",
    "on_demand_from_json",
    "on_demand_to_json",
    "plan_features",
    "request_frame",
    "resolve_on_demand",
]

# ``resolve(views, refs, full_feature_names=...)`` -> a list of resolved features, each with
# ``view``, ``feature`` and ``output`` (``_retrieval.Requested``).
Resolve = Callable[..., list[Any]]
Requested = Any

_IN = "__polarstore_in_"
_REQ = "__polarstore_req_"


@dataclass(frozen=True, eq=False)
class OnDemandView:
    """Derived features: row-wise Polars expressions over feature references and request columns.

    Parameters
    ----------
    name
        Identifier-like name; its features are referenced as ``"name:feature"``.
    features
        Feature name to a row-wise Polars expression. Inputs are columns named by feature
        references (``pl.col("user_stats:spend")``) or by request columns.
    request_schema
        Values the caller supplies with each request (the amount of the transaction being
        scored): column name to Polars dtype. Offline they come from the spine, online from
        the entity rows.
    description, owner, tags
        Free text and string labels, searchable with ``FeatureStore.search``.

    Examples
    --------
    >>> ratio = OnDemandView("ratios", features={
    ...     "spend_per_click": pl.col("user_stats:spend") / pl.col("user_stats:clicks"),
    ...     "share": pl.col("amount") / pl.col("user_stats:spend")},
    ...     request_schema={"amount": pl.Float64})
    >>> ratio.feature_names, ratio.references
    (('spend_per_click', 'share'), ('user_stats:spend', 'user_stats:clicks'))
    """

    name: str
    features: Mapping[str, pl.Expr]
    request_schema: Mapping[str, Any] | None = None
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] | None = None
    # Output dtypes, inferred at ``apply`` from the inputs' dtypes ({} until then).
    schema: dict[str, pl.DataType] = field(default_factory=dict, compare=False)
    # The registry form of each expression ({"polars_version", "expr"}).
    documents: dict[str, dict[str, Any]] = field(init=False, default_factory=dict)
    # Why the stored expressions cannot be used (a Polars that cannot read them), or "".
    broken: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        check_name(self.name, what="on-demand view")
        where = f"on-demand view {self.name!r}"
        request = {
            check_column(n, what=f"request column of {where}"): _dtype(t, where=f"{where}, {n}")
            for n, t in (self.request_schema or {}).items()
        }
        if self.request_schema is not None and not isinstance(self.request_schema, Mapping):
            msg = f"{where}: request_schema must be a dict of column name to Polars dtype."
            raise SchemaError(msg)
        object.__setattr__(self, "request_schema", request)
        if not isinstance(self.features, Mapping) or (not self.features and not self.broken):
            msg = f"{where}: features must be a non-empty dict of feature name to pl.Expr."
            raise SchemaError(msg)
        documents: dict[str, dict[str, Any]] = {}
        for feature, expr in self.features.items():
            check_column(feature, what=f"feature of {where}")
            here = f"{where}, feature {feature!r}"
            check_row_wise(expr, where=here)
            for column in input_names(expr):
                if ":" not in column and column not in request:
                    msg = (
                        f"{here}: the expression reads column {column!r}, which is neither a "
                        "feature reference ('view:feature') nor a request column declared in "
                        "request_schema." + did_you_mean(column, request)
                    )
                    raise NotFoundError(msg)
            documents[feature] = expression_to_json(expr, where=here)
        object.__setattr__(self, "features", dict(self.features))
        object.__setattr__(self, "documents", documents)
        for text, what in ((self.description, "description"), (self.owner, "owner")):
            if not isinstance(text, str):
                msg = f"{what} of {where} must be a str, got {type(text).__name__}."
                raise ValidationError(msg)
        tags = self.tags or {}
        if not isinstance(tags, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
        ):
            msg = f"tags of {where} must be a dict of str to str, got {self.tags!r}."
            raise ValidationError(msg)
        object.__setattr__(self, "tags", dict(tags))

    def _key(self) -> tuple[Any, ...]:
        return (
            self.name,
            json.dumps({f: d["expr"] for f, d in self.documents.items()}, sort_keys=True),
            tuple((n, str(t)) for n, t in self.request_schema.items()),  # type: ignore[union-attr]
            self.description,
            self.owner,
            tuple(sorted((self.tags or {}).items())),
        )

    def __repr__(self) -> str:
        exprs = ", ".join(f"{f!r}: {e}" for f, e in self.features.items())
        request = {n: str(t) for n, t in (self.request_schema or {}).items()}
        return f"OnDemandView({self.name!r}, features={{{exprs}}}, request_schema={request})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OnDemandView) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.features) if not self.broken else tuple(self.schema)

    @property
    def references(self) -> tuple[str, ...]:
        """The feature references the expressions read, in first-use order."""
        refs: dict[str, None] = {}
        for expr in self.expressions().values():
            refs.update(dict.fromkeys(c for c in input_names(expr) if ":" in c))
        return tuple(refs)

    def expressions(self) -> dict[str, pl.Expr]:
        """The expressions; a ``PolarstoreError`` if the installed Polars cannot read them."""
        if self.broken:
            raise PolarstoreError(self.broken)
        return dict(self.features)


def _dtype(dtype: Any, *, where: str) -> pl.DataType:
    if isinstance(dtype, type) and issubclass(dtype, pl.DataType):
        dtype = dtype()
    if not isinstance(dtype, pl.DataType):
        msg = f"{where}: dtype must be a Polars dtype such as pl.Float64, got {dtype!r}."
        raise SchemaError(msg)
    dtype_to_str(dtype)  # only what the rest of polarstore stores and casts to
    return dtype


# --- apply ----------------------------------------------------------------------------------


def resolve_on_demand(
    view: OnDemandView, views: Mapping[str, FeatureView | AggregationView], resolve: Resolve
) -> OnDemandView:
    """``view`` with its output dtypes inferred from the registered inputs (at ``apply``).

    An unknown reference is a ``NotFoundError`` with a close-match hint; an output dtype that
    polarstore does not handle (unsigned, durations, structs) a ``SchemaError`` asking for a
    cast.
    """
    where = f"on-demand view {view.name!r}"
    if view.name in views:
        msg = f"{where}: there is already a feature view named {view.name!r}; rename one."
        raise ValidationError(msg)
    inputs = _input_schema(view, views, resolve, where=where)
    schema: dict[str, pl.DataType] = {}
    for feature, expr in view.expressions().items():
        try:
            dtype = pl.DataFrame(schema=inputs).select(expr).to_series().dtype
        except pl.exceptions.PolarsError as e:
            msg = (
                f"{where}, feature {feature!r}: Polars cannot evaluate the expression on "
                f"inputs of dtypes { {n: str(t) for n, t in inputs.items()} }: "
                f"{str(e).splitlines()[0]}"
            )
            raise SchemaError(msg) from e
        try:
            dtype_to_str(dtype)
        except SchemaError as e:
            msg = (
                f"{where}, feature {feature!r}: the expression gives {dtype}, which polarstore "
                "does not handle; end it with a .cast() to one of the supported dtypes (e.g. "
                "pl.Int64 for an unsigned count)."
            )
            raise SchemaError(msg) from e
        schema[feature] = dtype
    return dataclasses.replace(view, schema=schema)


def _input_schema(
    view: OnDemandView,
    views: Mapping[str, FeatureView | AggregationView],
    resolve: Resolve,
    *,
    where: str,
) -> dict[str, pl.DataType]:
    refs = view.references
    dtypes: dict[str, pl.DataType] = {}
    for ref in refs:
        name = ref.partition(":")[0]
        if name not in views:
            msg = (
                f"{where} reads {ref!r}: there is no feature view {name!r} (on-demand inputs "
                "are stored features)." + did_you_mean(name, views)
            )
            raise NotFoundError(msg)
        try:
            (r,) = resolve(views, [ref], full_feature_names=True)
        except (NotFoundError, ValidationError) as e:
            msg = f"{where} reads {ref!r}: {e}"
            raise type(e)(msg) from e
        dtypes[ref] = _input_dtype(r)
    dtypes.update(view.request_schema or {})
    return dtypes


def _input_dtype(r: Requested) -> pl.DataType:
    """The dtype of one resolved input (the one place to teach other kinds of features)."""
    return r.view.schema[r.feature]  # type: ignore[no-any-return]


# --- registry -------------------------------------------------------------------------------


def on_demand_to_json(view: OnDemandView) -> dict[str, Any]:
    return {
        "features": {
            f: {"expression": view.documents[f], "dtype": dtype_to_str(view.schema[f])}
            for f in view.documents
        },
        "request_schema": {n: dtype_to_str(t) for n, t in view.request_schema.items()},  # type: ignore[union-attr]
        "description": view.description,
        "owner": view.owner,
        "tags": view.tags,
    }


def on_demand_from_json(name: str, doc: dict[str, Any], *, where: str) -> OnDemandView:
    """The view stored by :func:`on_demand_to_json`.

    Expressions this Polars cannot read do not stop the registry from loading (that would
    also stop the ``apply`` that fixes them): the view is kept with the error, raised by any
    use of it.
    """
    features = doc["features"]
    if not isinstance(features, dict):
        msg = f"on-demand view {name!r} has features {features!r}, not an object"
        raise TypeError(msg)
    request = {n: dtype_from_str(t) for n, t in doc["request_schema"].items()}
    schema = {f: dtype_from_str(d["dtype"]) for f, d in features.items()}
    exprs: dict[str, pl.Expr] = {}
    broken = ""
    for feature, entry in features.items():
        try:
            here = f"{where}: on-demand view {name!r}, feature {feature!r}"
            exprs[feature] = expression_from_json(entry["expression"], where=here)
        except PolarstoreError as e:
            broken = str(e)
            break
    view = OnDemandView(
        name,
        features={} if broken else exprs,
        request_schema=request,
        description=doc["description"],
        owner=doc["owner"],
        tags=doc["tags"],
        schema=schema,
        broken=broken,
    )
    if broken:  # keep what was stored, so that saving the registry again loses nothing
        object.__setattr__(view, "documents", {f: d["expression"] for f, d in features.items()})
    return view


def describe_on_demand(view: OnDemandView) -> dict[str, Any]:
    return {
        "name": view.name,
        "kind": "on_demand",
        "schema": dict(view.schema),
        "inputs": list(view.references) if not view.broken else [],
        "request_schema": dict(view.request_schema or {}),
        "expressions": {f: str(e) for f, e in view.features.items()},
        "description": view.description,
        "owner": view.owner,
        "tags": dict(view.tags or {}),
        "polars_version": {f: d.get("polars_version") for f, d in view.documents.items()},
    }


# --- planning -------------------------------------------------------------------------------


@dataclass
class Derived:
    """One derived feature of a plan: its output name and how to compute it."""

    output: str
    dtype: pl.DataType
    expr: pl.Expr  # over the hidden input and request columns
    # Slots of the scalar evaluator's argument tuple: input outputs, then request columns.
    scalar: Callable[[Sequence[Any]], Any] | None
    fallback: pl.Expr  # over columns named like the references and request columns


@dataclass
class Plan:
    """What a request reads (``stored``, hidden inputs included) and what it computes."""

    stored: list[Requested]
    outputs: list[str]
    derived: list[Derived] = field(default_factory=list)
    request: dict[str, pl.DataType] = field(default_factory=dict)
    # (reference, hidden column) of each input, in slot order.
    inputs: list[tuple[str, str]] = field(default_factory=list)
    input_dtypes: dict[str, pl.DataType] = field(default_factory=dict)


def plan_features(
    views: Mapping[str, FeatureView | AggregationView],
    on_demand: Mapping[str, OnDemandView],
    features: object,
    *,
    full_feature_names: bool,
    resolve: Resolve,
) -> Plan:
    """Resolve references, on-demand ones included, into a :class:`Plan` (before any I/O).

    Without on-demand references this is ``resolve`` as it is.
    """
    if isinstance(features, OnDemandView):
        features = f"{features.name}:*"
    elif isinstance(features, Iterable) and not isinstance(features, (str, FeatureService)):
        features = [f"{f.name}:*" if isinstance(f, OnDemandView) else f for f in features]
    refs = as_references(features, where="features")
    if not any(ref.partition(":")[0] in on_demand for ref in refs):
        stored = resolve(views, refs, full_feature_names=full_feature_names)
        return Plan(stored, [r.output for r in stored])
    entries: list[Any] = []  # resolved stored features, (view, feature, output) derived ones
    for ref in refs:
        name, _, feature = ref.partition(":")
        if name not in on_demand:
            if name not in views:
                msg = f"feature reference {ref!r}: there is no feature view {name!r}."
                raise NotFoundError(msg + did_you_mean(name, [*views, *on_demand]))
            entries.extend(resolve(views, [ref], full_feature_names=full_feature_names))
            continue
        odv = on_demand[name]
        for f in odv.feature_names if feature == "*" else (feature,):
            if f not in odv.schema:
                msg = f"feature reference {ref!r}: on-demand view {name!r} has no feature {f!r}."
                raise NotFoundError(msg + did_you_mean(f, odv.schema))
            entries.append((odv, f, f"{name}__{f}" if full_feature_names else f))
    seen: dict[str, str] = {}
    for entry in entries:
        output, ref = (
            (entry.output, f"{entry.view.name}:{entry.feature}")
            if not isinstance(entry, tuple)
            else (entry[2], f"{entry[0].name}:{entry[1]}")
        )
        if output in seen:
            hint = "" if full_feature_names else " Pass full_feature_names=True to keep both."
            msg = (
                f"features {seen[output]!r} and {ref!r} both produce the output column "
                f"{output!r}.{hint}"
            )
            raise ValidationError(msg)
        seen[output] = ref
    plan = Plan([e for e in entries if not isinstance(e, tuple)], list(seen))
    hidden: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, tuple):
            continue
        odv, feature, output = entry
        where = f"on-demand view {odv.name!r}"
        expr = odv.expressions()[feature]
        for column in input_names(expr):
            if ":" in column:
                if column not in hidden:
                    hidden[column] = f"{_IN}{len(hidden)}"
                continue
            dtype = odv.request_schema[column]  # type: ignore[index]
            if plan.request.setdefault(column, dtype) != dtype:
                msg = (
                    f"{where} declares the request column {column!r} as {dtype}, another "
                    f"requested on-demand view as {plan.request[column]}; they cannot be "
                    "requested together."
                )
                raise ValidationError(msg)
        plan.derived.append(_derived(odv, feature, output, expr))
    for ref, column in hidden.items():
        try:
            (r,) = resolve(views, [ref], full_feature_names=True)
        except (NotFoundError, ValidationError) as e:
            msg = f"an on-demand feature reads {ref!r}: {e} Re-apply the on-demand view."
            raise type(e)(msg) from e
        plan.stored.append(dataclasses.replace(r, output=column))
        plan.inputs.append((ref, column))
        plan.input_dtypes[ref] = _input_dtype(r)
    names = {ref: col for ref, col in plan.inputs} | {c: _REQ + c for c in plan.request}
    dtypes = {**plan.input_dtypes, **plan.request}
    slots = [ref for ref, _ in plan.inputs] + list(plan.request)
    for d in plan.derived:
        d.expr = _renamed(d.fallback, names).cast(d.dtype).alias(d.output)
        d.scalar = compile_scalar(d.fallback, dtypes, slots, d.dtype)
    return plan


def _derived(odv: OnDemandView, feature: str, output: str, expr: pl.Expr) -> Derived:
    return Derived(output, odv.schema[feature], expr, None, expr)


def _renamed(expr: pl.Expr, names: Mapping[str, str]) -> pl.Expr:
    """``expr`` reading ``names[c]`` wherever it reads column ``c`` (on the serialised tree)."""
    doc = expression_to_json(expr)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"Column"} and isinstance(node["Column"], str):
                return {"Column": names.get(node["Column"], node["Column"])}
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return expression_from_json({**doc, "expr": walk(doc["expr"])}, where="an on-demand feature")


# --- evaluation on frames -------------------------------------------------------------------


def request_frame(rows: Any, plan: Plan, *, where: str) -> pl.DataFrame:
    """The plan's request columns of ``rows`` (a frame, a dict, or a list of dicts), cast.

    A missing request column is a ``ValidationError`` naming it; values must fit the
    declared dtype exactly (as join keys do).
    """
    if isinstance(rows, list) and not rows:
        return pl.DataFrame(
            schema={_REQ: pl.Int64, **{_REQ + c: t for c, t in plan.request.items()}}
        )
    if not isinstance(rows, pl.DataFrame):
        if isinstance(rows, Mapping):
            columnar = any(isinstance(v, (list, tuple)) for v in rows.values())
            rows = dict(rows) if columnar else [rows]
        try:
            if isinstance(rows, dict):
                rows = pl.DataFrame(rows, strict=False)
            elif isinstance(rows, list):
                names = list(dict.fromkeys(k for r in rows if isinstance(r, Mapping) for k in r))
                columns = {n: [r.get(n) for r in rows] for n in names if n in plan.request}
                # The row number gives the frame its height when no request column is read.
                rows = pl.DataFrame({_REQ: range(len(rows)), **columns}, strict=False)
            else:
                rows = to_polars(rows, what=where)
        except (pl.exceptions.PolarsError, TypeError, ValueError) as e:
            msg = f"{where}: could not read the request columns: {e}"
            raise ValidationError(msg) from e
    missing = [c for c in plan.request if c not in rows.columns]
    if missing:
        msg = (
            f"{where}: missing request column(s) {missing} that the requested on-demand "
            f"features read (declared in their request_schema: "
            f"{ {c: str(plan.request[c]) for c in missing} })."
            + did_you_mean(missing[0], [c for c in rows.columns if c != _REQ])
        )
        raise ValidationError(msg)
    return rows.select(
        pl.int_range(pl.len()).alias(_REQ),
        *(
            lossless_cast(rows, c, t, where=f"{where}, request column").alias(_REQ + c)
            for c, t in plan.request.items()
        ),
    )


def evaluate_frame(frame: pl.LazyFrame, plan: Plan, *, keep: Sequence[str]) -> pl.LazyFrame:
    """``frame`` (stored outputs, hidden inputs, request columns) with the derived features,
    selected as ``keep`` then the plan's outputs."""
    return frame.with_columns(d.expr for d in plan.derived).select(*keep, *plan.outputs)


def online_with_derived(
    lookup: Callable[[Any, Sequence[Any], Any], pl.DataFrame],
    entity_rows: Any,
    plan: Plan,
    now: Any,
) -> pl.DataFrame:
    """``lookup`` (the batch online path) of the plan's stored features, then its derived
    ones; request columns come from the entity rows and are not echoed."""
    if not plan.derived:
        return lookup(entity_rows, plan.stored, now)
    where = "get_online_features"
    request = request_frame(entity_rows, plan, where=where)
    if not plan.stored:  # only request columns: no entity to look up
        return _collect(evaluate_frame(request.lazy(), plan, keep=[]), plan, where)
    found = lookup(entity_rows, plan.stored, now)
    stored = {r.output for r in plan.stored}
    keys = [c for c in found.columns if c not in stored]
    frame = pl.concat([found, request], how="horizontal").lazy()
    return _collect(evaluate_frame(frame, plan, keep=keys), plan, where)


def _collect(frame: pl.LazyFrame, plan: Plan, where: str) -> pl.DataFrame:
    """Collect the derived features; an expression Polars fails on is a ``ValidationError``."""
    try:
        return frame.collect()
    except pl.exceptions.PolarsError as e:
        names = [d.output for d in plan.derived]
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = f"{where}: Polars could not evaluate the derived features {names}: {detail}"
        raise ValidationError(msg) from e


# --- the request-time path ------------------------------------------------------------------


def _scalar_cast(name: str, dtype: pl.DataType) -> Callable[[Any], Any]:
    """One request value cast to ``dtype`` as :func:`request_frame` casts a column."""
    where = "get_feature_vector"

    def by_polars(value: Any) -> Any:
        try:
            frame = pl.DataFrame({name: [value]}, strict=False)
        except (pl.exceptions.PolarsError, TypeError, ValueError) as e:
            msg = f"{where}: could not read the request column {name!r} = {value!r}: {e}"
            raise ValidationError(msg) from e
        return frame.select(lossless_cast(frame, name, dtype, where=f"{where}, request")).item()

    if dtype == pl.Float64:

        def cast(value: Any) -> Any:
            if type(value) is float or value is None:
                return value
            if type(value) is int and -(2**53) <= value <= 2**53:  # exact as a float
                return float(value)
            return by_polars(value)

    elif dtype == pl.Int64:

        def cast(value: Any) -> Any:
            if (type(value) is int and -(2**63) <= value < 2**63) or value is None:
                return value
            return by_polars(value)

    elif dtype in (pl.String(), pl.Boolean()):
        kind = str if dtype == pl.String else bool

        def cast(value: Any) -> Any:
            return value if type(value) is kind or value is None else by_polars(value)

    else:
        cast = by_polars
    return cast


class VectorDerived:
    """The derived features of a cached ``get_feature_vector`` plan, a part of that plan.

    It runs after the stored parts have put every input into ``out`` (under its hidden name):
    it takes them out, adds the cast request values and computes each derived feature with
    its compiled scalar function; the rest (and any value the scalar function cannot handle)
    are computed by Polars on a one-row frame, the reference.
    """

    def __init__(self, plan: Plan) -> None:
        self.hidden = [column for _, column in plan.inputs]
        self.casts = [(name, _scalar_cast(name, t)) for name, t in plan.request.items()]
        self.fast = [(d.output, d.scalar, d) for d in plan.derived if d.scalar is not None]
        self.slow = [d for d in plan.derived if d.scalar is None]
        self.columns = [
            *((ref, plan.input_dtypes[ref]) for ref, _ in plan.inputs),
            *plan.request.items(),
        ]
        self.outputs = plan.outputs  # the requested order, as get_online_features gives it
        self.plan = plan
        self.env: Any = None
        self.snapshot = -1

    def check_layout(self, txn: Any, env: Any, snapshot: int) -> None:
        self.env, self.snapshot = env, snapshot

    def fetch(self, txn: Any, entity: Mapping[str, Any], now_us: int, out: dict) -> None:
        args = [out.pop(h) for h in self.hidden]
        for name, cast in self.casts:
            try:
                value = entity[name]
            except KeyError:
                msg = (
                    f"get_feature_vector: missing request column {name!r} that the requested "
                    f"on-demand features read; got {sorted(entity)}."
                )
                raise ValidationError(msg) from None
            args.append(cast(value))
        for output, scalar, derived in self.fast:
            try:
                out[output] = scalar(args)  # type: ignore[misc]
            except Exception:  # Polars decides: it gives the value, or raises its own error
                out.update(self._by_polars(args, [derived]))
        if self.slow:
            out.update(self._by_polars(args, self.slow))
        ordered = [(o, out[o]) for o in self.outputs]
        out.clear()
        out.update(ordered)

    _absent = fetch  # no online store yet: the inputs are nulls, the request values are not

    def _by_polars(self, args: Sequence[Any], derived: Sequence[Derived]) -> dict[str, Any]:
        frame = pl.DataFrame(
            [pl.Series(n, [v], dtype=t) for (n, t), v in zip(self.columns, args, strict=True)]
        )
        exprs = [d.fallback.cast(d.dtype).alias(d.output) for d in derived]
        return _collect(frame.lazy().select(exprs), self.plan, "get_feature_vector").row(
            0, named=True
        )
