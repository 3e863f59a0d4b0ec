"""Polars expressions as registry JSON: the round trip, the row-wise check, the input names.

Derived features (``OnDemandView``) and row-level ``checks`` store Polars expressions in
``registry.json``. An expression is kept as the JSON Polars itself writes
(``Expr.meta.serialize(format="json")``) beside the Polars version that wrote it: never
pickle. The JSON format is Polars's own and may change between versions, hence the version.

Row-wise is decided on the serialised tree with a whitelist of elementwise nodes: a node
polarstore does not know is refused, so a new Polars function is never taken for row-wise by
mistake.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import polars as pl

from polarstore._errors import PolarstoreError, SchemaError

__all__ = [
    "POLARS_VERSION",
    "check_row_wise",
    "compile_scalar",
    "expression_from_json",
    "expression_to_json",
    "expression_tree",
    "input_names",
]

POLARS_VERSION = pl.__version__

# --- the round trip -------------------------------------------------------------------------


def expression_tree(expr: pl.Expr, *, where: str = "expression") -> Any:
    """The expression as Polars serialises it to JSON, parsed (dicts, lists, scalars).

    >>> expression_tree(pl.col("a").abs())
    {'Function': {'input': [{'Column': 'a'}], 'function': 'Abs'}}
    """
    if not isinstance(expr, pl.Expr):
        msg = (
            f"{where}: expected a Polars expression (pl.Expr), got {type(expr).__name__} {expr!r}."
        )
        raise SchemaError(msg)
    try:
        text = expr.meta.serialize(format="json")
    except Exception as e:
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if "pickle" in detail or "python" in detail.lower():
            msg = (
                f"{where}: the expression calls a Python function (map_elements, map_batches "
                "or a UDF), which can only be stored with pickle; polarstore never pickles. "
                f"Write it with Polars expressions instead ({detail})."
            )
        else:
            msg = f"{where}: Polars cannot serialise this expression to JSON ({detail})."
        raise SchemaError(msg) from e
    return json.loads(text)


def expression_to_json(expr: pl.Expr, *, where: str = "expression") -> dict[str, Any]:
    """The registry form of ``expr``: its Polars JSON and the Polars version that wrote it.

    A literal JSON cannot hold (NaN and infinities serialise as ``null`` in Polars's JSON) is
    refused with a ``SchemaError``: reading it back would fail or change the value.

    >>> doc = expression_to_json(pl.col("spend") / pl.col("clicks"))
    >>> sorted(doc)
    ['expr', 'polars_version']
    >>> expression_from_json(doc, where="example").meta.root_names()
    ['spend', 'clicks']
    """
    tree = expression_tree(expr, where=where)
    text = json.dumps(tree)
    try:
        back = pl.Expr.deserialize(io.StringIO(text), format="json")
        same = json.loads(back.meta.serialize(format="json")) == tree
    except Exception:
        same = False
    if not same:
        msg = (
            f"{where}: the expression does not survive Polars's JSON round trip (a NaN or "
            "infinite literal is written as null): write such a literal as "
            "pl.lit('nan').cast(pl.Float64) or pl.lit('inf').cast(pl.Float64)."
        )
        raise SchemaError(msg)
    return {"polars_version": POLARS_VERSION, "expr": tree}


def expression_from_json(doc: dict[str, Any], *, where: str) -> pl.Expr:
    """The expression stored by :func:`expression_to_json`.

    A document this Polars cannot read is a ``PolarstoreError`` naming the Polars version that
    wrote it, the one running, and how to re-apply the definition.

    >>> doc = expression_to_json(pl.col("a").abs())
    >>> expression_from_json(doc, where="example").meta.root_names()
    ['a']
    """
    written = doc.get("polars_version") if isinstance(doc, dict) else None
    try:
        if not isinstance(doc, dict) or "expr" not in doc:
            msg = f"not an expression document: {str(doc)[:80]}"
            raise ValueError(msg)
        return pl.Expr.deserialize(io.StringIO(json.dumps(doc["expr"])), format="json")
    except Exception as e:
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        msg = (
            f"{where}: the stored expression was written by Polars {written} and cannot be "
            f"read by the installed Polars {POLARS_VERSION} ({detail}). Install Polars "
            f"{written}, or re-apply the definition with this Polars "
            "(FeatureStore.apply([...]) with the same Python definitions) to store it anew."
        )
        raise PolarstoreError(msg) from e


def input_names(expr: pl.Expr) -> list[str]:
    """The columns ``expr`` reads, in first-use order, without repeats.

    >>> input_names(pl.col("user_stats:spend") / (pl.col("amount") + pl.col("user_stats:spend")))
    ['user_stats:spend', 'amount']
    """
    return list(dict.fromkeys(expr.meta.root_names()))


# --- the row-wise check ---------------------------------------------------------------------

_BINARY_OPS = frozenset(
    [
        "Eq",
        "EqValidity",
        "NotEq",
        "NotEqValidity",
        "Lt",
        "LtEq",
        "Gt",
        "GtEq",
        "Plus",
        "Minus",
        "Multiply",
        "Divide",
        "TrueDivide",
        "FloorDivide",
        "Modulus",
        "And",
        "Or",
        "Xor",
        "LogicalAnd",
        "LogicalOr",
    ]
)
# Function nodes that compute each row from that row alone: ``{"Function": {"function": F}}``
# where F is one of these names or a one-key dict whose key is in _FAMILIES and value in it.
_FUNCTIONS = frozenset(
    [
        "Abs",
        "Negate",
        "Log",
        "Log1p",
        "Exp",
        "Sign",
        "Floor",
        "Ceil",
        "FillNull",
        "Coalesce",
        "MaxHorizontal",
        "MinHorizontal",
        "SumHorizontal",
        "MeanHorizontal",
        "Round",
        "Clip",
    ]
)
_FAMILIES: dict[str, frozenset[str] | None] = {
    "Pow": frozenset({"Generic", "Sqrt", "Cbrt"}),
    "Round": None,  # {"decimals": .., "mode": ..}: any options
    "Clip": None,
    "Trigonometry": None,  # every trigonometric function is elementwise
    "Boolean": frozenset(
        [
            "IsNull",
            "IsNotNull",
            "IsNan",
            "IsNotNan",
            "IsFinite",
            "IsInfinite",
            "Not",
            "IsBetween",
            "IsIn",
        ]
    ),
    "TemporalExpr": frozenset(
        [
            "Year",
            "Quarter",
            "Month",
            "Week",
            "WeekDay",
            "Day",
            "OrdinalDay",
            "Hour",
            "Minute",
            "Second",
            "Millisecond",
            "Microsecond",
            "Truncate",
        ]
    ),
    "StringExpr": frozenset(
        [
            "Lowercase",
            "Uppercase",
            "LenChars",
            "LenBytes",
            "Contains",
            "StartsWith",
            "EndsWith",
            "StripChars",
            "StripCharsStart",
            "StripCharsEnd",
            "StripPrefix",
            "StripSuffix",
            "Replace",
            "ConcatHorizontal",
            "Slice",
            "Head",
            "Tail",
            "ZFill",
            "PadStart",
            "PadEnd",
            "Reverse",
            "Find",
            "CountMatches",
        ]
    ),
}
# What is refused, and why: the user's words for the reason.
_AGGREGATE = "it is an aggregation (its value depends on every row of the frame)"
_NEIGHBOURS = "its value for a row depends on other rows (before, after or around it)"
_RESHAPE = "it changes the number or the order of the rows"
_WINDOW = "it is a window (its value depends on the other rows of its group)"
_UNKNOWN = "it is not in the row-wise subset polarstore accepts (see check_row_wise)"
_NODE_REASONS = {
    "Agg": _AGGREGATE,
    "Len": _AGGREGATE,
    "Over": _WINDOW,
    "Rolling": _WINDOW,
    "Sort": _RESHAPE,
    "SortBy": _RESHAPE,
    "Filter": _RESHAPE,
    "Slice": _RESHAPE,
    "Gather": _RESHAPE,
    "Explode": _RESHAPE,
}
_FUNCTION_REASONS = {
    name: _NEIGHBOURS
    for name in [
        "Shift",
        "ShiftAndFill",
        "Diff",
        "PctChange",
        "CumSum",
        "CumProd",
        "CumMin",
        "CumMax",
        "CumCount",
        "CumReduce",
        "Rank",
        "RollingExpr",
        "RollingExprBy",
        "Reverse",
        "Interpolate",
        "FillNullWithStrategy",
        "ForwardFill",
        "BackwardFill",
        "Rle",
        "RleId",
    ]
} | {
    name: _RESHAPE
    for name in [
        "Unique",
        "TopK",
        "TopKBy",
        "Random",
        "Sort",
        "ArgSort",
        "Repeat",
        "Explode",
        "DropNulls",
        "DropNans",
    ]
}
_PICKLE = (
    "it calls a Python function (map_elements, map_batches or a UDF), which can only be "
    "stored with pickle; polarstore never pickles"
)


def _user_name(name: str) -> str:
    """``CumSum`` -> ``cum_sum``: the method name a user wrote, near enough."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class _NotRowWiseError(Exception):
    def __init__(self, what: str, reason: str) -> None:
        super().__init__(what, reason)
        self.what, self.reason = what, reason


def _function_name(function: Any) -> tuple[str, str | None]:
    """A serialised function's family and name: ``("Boolean", "IsNull")``, ``("Abs", None)``."""
    if isinstance(function, str):
        return function, None
    if isinstance(function, dict) and len(function) == 1:
        family, value = next(iter(function.items()))
        if isinstance(value, str):
            return family, value
        if isinstance(value, dict) and len(value) == 1:
            return family, next(iter(value))
        return family, None
    return repr(function)[:40], None


def _walk(node: Any) -> None:
    if isinstance(node, str):  # a unit variant: "Len", "Wildcard", ...
        raise _NotRowWiseError(_user_name(node), _NODE_REASONS.get(node, ""))
    if not isinstance(node, dict) or len(node) != 1:
        raise _NotRowWiseError(repr(node)[:40], "")
    kind, body = next(iter(node.items()))
    if kind == "Column":
        return
    if kind == "Literal":
        if isinstance(body, dict) and set(body) <= {"Dyn", "Scalar"}:
            return
        raise _NotRowWiseError("a Series literal", _RESHAPE)
    if kind == "Selector":
        raise _NotRowWiseError(
            "a multi-column selection (pl.col with a pattern, several names or a dtype, "
            "pl.all, pl.nth, selectors)",
            "one expression makes one feature: name each input column",
        )
    if kind == "BinaryExpr":
        if body.get("op") not in _BINARY_OPS:
            raise _NotRowWiseError(f"the operator {body.get('op')}", "")
        _walk(body["left"])
        _walk(body["right"])
        return
    if kind == "Ternary":
        for part in ("predicate", "truthy", "falsy"):
            _walk(body[part])
        return
    if kind == "Cast":
        _walk(body["expr"])
        return
    if kind == "Alias":
        _walk(body[0])
        return
    if kind == "Function":
        family, name = _function_name(body.get("function"))
        named = ("Boolean", "StringExpr", "TemporalExpr")
        shown = _user_name(name if name and family in named else family)
        if family in _FAMILIES:
            allowed = _FAMILIES[family]
            if allowed is not None and name not in allowed:
                reason = _FUNCTION_REASONS.get(name or "", "")
                raise _NotRowWiseError(_user_name(name or family), reason)
        elif family not in _FUNCTIONS:
            reason = _FUNCTION_REASONS.get(family, "")
            if "Python" in family or "Anonymous" in family:
                reason = _PICKLE
            raise _NotRowWiseError(shown, reason)
        inputs = body.get("input", [])
        if (family, name) == ("Boolean", "IsIn") and not (
            len(inputs) == 2 and isinstance(inputs[1], dict) and "Literal" in inputs[1]
        ):
            raise _NotRowWiseError("is_in over a column", "the set it tests is the whole column")
        for child in inputs:
            _walk(child)
        return
    reason = _NODE_REASONS.get(kind, "")
    if kind == "Agg" and isinstance(body, dict) and len(body) == 1:
        kind = next(iter(body))  # the aggregation's own name: sum, mean, first, ...
    if "Python" in kind or "Anonymous" in kind:
        reason = _PICKLE
    raise _NotRowWiseError(_user_name(kind), reason)


def check_row_wise(expr: pl.Expr, *, where: str) -> None:
    """Raise ``SchemaError`` unless ``expr`` is row-wise: each row computed from itself alone.

    Accepted (a whitelist, checked on the serialised tree): columns, scalar literals,
    arithmetic, comparisons, boolean logic, ``when/then/otherwise``, casts, aliases,
    ``fill_null`` (with a value), ``is_null``/``is_nan``/``is_finite``/``is_between``/
    ``is_in`` (a literal set), ``abs``, ``log``, ``exp``, ``sqrt``, ``pow``, ``clip``,
    ``round``, ``floor``, ``ceil``, ``sign``, trigonometry, ``coalesce``, the horizontal
    min/max/sum/mean, the common ``str`` functions, and the ``dt`` components (``year`` to
    ``microsecond``, ``weekday``, ``truncate``). Refused with the reason:
    aggregations, windows (``over``, rolling), ``shift``/``diff``/cumulative functions/
    ``rank``, anything that sorts, filters or reshapes, multi-column selections, and Python
    functions (``map_elements``, ``map_batches``), which cannot be stored without pickle.

    >>> check_row_wise(pl.when(pl.col("a") > 0).then(pl.col("a").log()), where="f")
    >>> check_row_wise(pl.col("a") - pl.col("a").mean(), where="feature 'x'")
    Traceback (most recent call last):
    ...
    polarstore._errors.SchemaError: feature 'x': mean is refused: it is an aggregation ...
    """
    tree = expression_tree(expr, where=where)
    try:
        _walk(tree)
    except _NotRowWiseError as e:
        msg = (
            f"{where}: {e.what} is refused: {e.reason or _UNKNOWN}. The expression must "
            "depend on its own row alone, so that it gives the same answer in a training set, "
            "a batch lookup and a one-row request."
        )
        raise SchemaError(msg) from None


# --- the scalar evaluator -------------------------------------------------------------------


def compile_scalar(
    expr: pl.Expr,
    dtypes: Mapping[str, pl.DataType],
    slots: Sequence[str],
    dtype: pl.DataType,
) -> Callable[[Sequence[Any]], Any] | None:
    """A plain-Python function computing ``expr`` for one row, or None outside the subset.

    ``slots`` names the columns in the order of the function's argument sequence; ``dtypes``
    gives their Polars dtypes, ``dtype`` the expression's (as Polars infers it). The function
    returns what Polars returns for a one-row frame of those values (None for null); it may
    raise for a value it does not handle (then ask Polars). The subset: Float64, Int64,
    Boolean and String values; arithmetic (Int64 wraps around as in Polars), comparisons (NaN
    equal to itself and above every number), Kleene logic, ``when/then/otherwise``,
    ``fill_null``, ``coalesce``, ``is_null``/``is_nan``/``is_finite``, ``abs``, ``log``,
    ``log1p``, ``exp``, ``sqrt``, ``floor``, ``ceil``, casts between those dtypes, ``+`` on
    strings, ASCII case changes, ``starts_with``/``ends_with``. Held equal to Polars by
    ``tests/test_expressions.py``.

    >>> f = compile_scalar(pl.col("a") / pl.col("b"), {"a": pl.Int64, "b": pl.Int64},
    ...                    ["a", "b"], pl.Float64)
    >>> f([1, 0]), f([-1, 0]), f([None, 2])
    (inf, -inf, None)
    """
    try:
        tree = expression_tree(expr)
        fn, kind = _Compiler(dtypes, slots).node(tree)
    except (_UnsupportedError, SchemaError):
        return None
    if kind != _KINDS.get(dtype):
        return None
    return fn


class _UnsupportedError(Exception):
    """Outside the scalar subset: Polars evaluates it."""


_Fn = Callable[[Sequence[Any]], Any]
_KINDS: dict[Any, str] = {
    pl.Float64(): "Float64",
    pl.Int64(): "Int64",
    pl.Boolean(): "Boolean",
    pl.String(): "String",
}
_NUMERIC = ("Int64", "Float64")
_INF = float("inf")


def _wrap(x: int) -> int:
    """Int64 arithmetic as Polars does it: two's complement, wrapping around."""
    return ((x + (1 << 63)) & ((1 << 64) - 1)) - (1 << 63)


def _none(_: Sequence[Any]) -> Any:
    return None


def _float_key(x: float) -> tuple[int, float]:
    """Polars's float order: NaN equals NaN and sorts above +inf; -0.0 equals 0.0."""
    return (1, 0.0) if x != x else (0, x)


def _true_divide(a: float, b: float) -> float:
    if b == 0.0:
        if a == 0.0 or a != a:
            return float("nan")
        return math.copysign(_INF, a) * math.copysign(1.0, b)
    return a / b


def _log(x: float, base: float) -> float:
    if x != x or base != base:
        return float("nan")
    if x < 0:
        return float("nan")
    if x == 0:
        return -_INF * math.copysign(1.0, math.log(base)) if base not in (0.0, 1.0) else _nan()
    if x == _INF:
        return _INF if base > 1 else _nan()
    return math.log(x) / math.log(base)


def _nan() -> float:
    raise _UnsupportedError  # an edge Polars decides


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return _INF


def _sqrt(x: float) -> float:
    if x != x or x < 0:
        return float("nan")
    return math.sqrt(x)


def _log1p(x: float) -> float:
    if x != x or x < -1:
        return float("nan")
    if x == -1:
        return -_INF
    return math.log1p(x)


def _floor(x: float) -> float:
    if x != x or x in (_INF, -_INF) or x == 0:
        return x
    return float(math.floor(x))


def _ceil(x: float) -> float:
    if x != x or x in (_INF, -_INF) or x == 0:
        return x
    r = float(math.ceil(x))
    return -0.0 if r == 0 and x < 0 else r


def _ascii(fn: Callable[[str], str]) -> Callable[[str], str]:
    def apply(x: str) -> str:
        if not x.isascii():
            raise _UnsupportedError  # Unicode case mapping may differ from Rust's
        return fn(x)

    return apply


_FLOAT_FUNCTIONS: dict[Any, Callable[[float], float]] = {
    "Exp": _exp,
    ("Pow", "Sqrt"): _sqrt,
    "Log1p": _log1p,
    "Floor": _floor,
    "Ceil": _ceil,
}


def _unary(inner: _Fn, op: Callable[[Any], Any]) -> _Fn:
    def fn(a: Sequence[Any]) -> Any:
        x = inner(a)
        return None if x is None else op(x)

    return fn


def _binary(left: _Fn, right: _Fn, op: Callable[[Any, Any], Any]) -> _Fn:
    def fn(a: Sequence[Any]) -> Any:
        x = left(a)
        if x is None:
            return None
        y = right(a)
        return None if y is None else op(x, y)

    return fn


class _Compiler:
    def __init__(self, dtypes: Mapping[str, pl.DataType], slots: Sequence[str]) -> None:
        self.dtypes = dtypes
        self.slots = {name: i for i, name in enumerate(slots)}

    # ``node`` returns (function, kind): kind is a dtype name, "Null", or "DynInt"/"DynFloat"
    # for a literal whose dtype comes from what it meets (``pl.col("x") + 1``).
    def node(self, node: Any) -> tuple[_Fn, str]:
        if not isinstance(node, dict) or len(node) != 1:
            raise _UnsupportedError
        kind, body = next(iter(node.items()))
        method = getattr(self, f"_{kind}", None)
        if method is None:
            raise _UnsupportedError
        return method(body)  # type: ignore[no-any-return]

    def _Column(self, name: str) -> tuple[_Fn, str]:  # noqa: N802 - named after the node
        kind = _KINDS.get(self.dtypes.get(name))
        if kind is None or name not in self.slots:
            raise _UnsupportedError
        i = self.slots[name]
        return (lambda a: a[i]), kind

    def _Alias(self, body: Any) -> tuple[_Fn, str]:  # noqa: N802
        return self.node(body[0])

    def _Literal(self, body: Any) -> tuple[_Fn, str]:  # noqa: N802
        ((form, value),) = body.items()
        ((kind, x),) = value.items()
        if form == "Dyn" and kind == "Int" and type(x) is int and -(1 << 63) <= x < (1 << 63):
            return (lambda a: x), "DynInt"
        if form == "Dyn" and kind == "Float" and type(x) is float:
            return (lambda a: x), "DynFloat"
        if form == "Scalar" and kind == "Null":
            return _none, "Null"
        if form == "Scalar" and kind in ("Float64", "Int64", "Boolean", "String") and x is not None:
            if kind == "Float64":
                x = float(x)
            return (lambda a: x), kind
        raise _UnsupportedError

    def _coerce(self, fn: _Fn, kind: str, target: str) -> _Fn:
        if kind in (target, "Null") or (kind == "DynFloat" and target == "Float64"):
            return fn
        if kind == "DynInt" and target == "Int64":
            return fn
        if kind in ("Int64", "DynInt") and target == "Float64":
            return _unary(fn, float)
        raise _UnsupportedError

    def _super(self, a: str, b: str) -> str:
        if a == b and a not in ("DynInt", "DynFloat", "Null"):
            return a
        pair = {a, b}
        if pair <= {"Int64", "DynInt"} and "Int64" in pair:
            return "Int64"
        if pair <= {"Int64", "Float64", "DynInt", "DynFloat"} and pair & {"Int64", "Float64"}:
            return "Float64"
        if "Null" in pair and len(pair) == 2:
            (other,) = pair - {"Null"}
            if other in _KINDS.values():
                return other
        raise _UnsupportedError

    def _both(self, body: Any, left: str, right: str) -> tuple[_Fn, _Fn, str]:
        lf, lk = self.node(body[left])
        rf, rk = self.node(body[right])
        kind = self._super(lk, rk)
        return self._coerce(lf, lk, kind), self._coerce(rf, rk, kind), kind

    def _BinaryExpr(self, body: Any) -> tuple[_Fn, str]:  # noqa: N802
        op = body["op"]
        lf, rf, kind = self._both(body, "left", "right")
        if op in ("Plus", "Minus", "Multiply"):
            if kind == "Int64":
                f = {"Plus": int.__add__, "Minus": int.__sub__, "Multiply": int.__mul__}[op]
                return _binary(lf, rf, lambda x, y: _wrap(f(x, y))), kind
            if kind == "Float64":
                g = {"Plus": float.__add__, "Minus": float.__sub__, "Multiply": float.__mul__}
                return _binary(lf, rf, g[op]), kind
            if kind == "String" and op == "Plus":
                return _binary(lf, rf, str.__add__), kind
            raise _UnsupportedError
        if op == "TrueDivide" and kind in _NUMERIC:
            lf, rf = self._coerce(lf, kind, "Float64"), self._coerce(rf, kind, "Float64")
            return _binary(lf, rf, _true_divide), "Float64"
        if op in ("FloorDivide", "Modulus") and kind == "Int64":
            div = op == "FloorDivide"

            def int_op(x: int, y: int) -> int | None:
                if y == 0:
                    return None
                return _wrap(x // y) if div else x % y

            return _binary(lf, rf, int_op), kind
        if op in ("Eq", "NotEq", "Lt", "LtEq", "Gt", "GtEq", "EqValidity", "NotEqValidity"):
            return self._compare(op, lf, rf, kind), "Boolean"
        if op in ("And", "Or", "Xor", "LogicalAnd", "LogicalOr") and kind == "Boolean":
            return self._logic(op, lf, rf), kind
        raise _UnsupportedError

    def _compare(self, op: str, lf: _Fn, rf: _Fn, kind: str) -> _Fn:
        key: Callable[[Any], Any] = _float_key if kind == "Float64" else (lambda x: x)
        test = {
            "Eq": lambda x, y: x == y,
            "NotEq": lambda x, y: x != y,
            "Lt": lambda x, y: x < y,
            "LtEq": lambda x, y: x <= y,
            "Gt": lambda x, y: x > y,
            "GtEq": lambda x, y: x >= y,
            "EqValidity": lambda x, y: x == y,
            "NotEqValidity": lambda x, y: x != y,
        }[op]
        if op.endswith("Validity"):  # eq_missing: null equals null, and nothing else

            def missing(a: Sequence[Any]) -> bool:
                x, y = lf(a), rf(a)
                if x is None or y is None:
                    return test(x is None, y is None)  # type: ignore[no-any-return]
                return test(key(x), key(y))  # type: ignore[no-any-return]

            return missing
        return _binary(lf, rf, lambda x, y: test(key(x), key(y)))

    def _logic(self, op: str, lf: _Fn, rf: _Fn) -> _Fn:
        if op in ("Xor",):
            return _binary(lf, rf, lambda x, y: x != y)
        absorbing = op in ("Or", "LogicalOr")  # True absorbs in Or, False in And

        def kleene(a: Sequence[Any]) -> Any:
            x, y = lf(a), rf(a)
            if x is absorbing or y is absorbing:
                return absorbing
            if x is None or y is None:
                return None
            return not absorbing

        return kleene

    def _Ternary(self, body: Any) -> tuple[_Fn, str]:  # noqa: N802
        pf, pk = self.node(body["predicate"])
        if pk != "Boolean":
            raise _UnsupportedError
        tf, ff, kind = self._both(body, "truthy", "falsy")

        def choose(a: Sequence[Any]) -> Any:
            return tf(a) if pf(a) is True else ff(a)  # a null predicate: otherwise

        return choose, kind

    def _Cast(self, body: Any) -> tuple[_Fn, str]:  # noqa: N802
        fn, kind = self.node(body["expr"])
        target = body["dtype"].get("Literal") if isinstance(body["dtype"], dict) else None
        strict = body["options"] == "Strict"
        if not isinstance(target, str) or target not in _KINDS.values():
            raise _UnsupportedError
        if kind == target or kind == "Null":
            return fn, target
        if kind in ("DynInt", "DynFloat"):
            kind = "Int64" if kind == "DynInt" else "Float64"
        if kind == target:
            return fn, target
        if kind == "Int64" and target == "Float64":
            return _unary(fn, float), target
        if kind == "Float64" and target == "Int64":

            def to_int(x: float) -> int | None:
                if x != x or x in (_INF, -_INF) or not -(2.0**63) <= x < 2.0**63:
                    if strict:
                        raise _UnsupportedError  # Polars raises its own error
                    return None
                return int(x)

            return _unary(fn, to_int), target
        if kind == "Boolean" and target in _NUMERIC:
            return _unary(fn, int if target == "Int64" else float), target
        if kind == "Int64" and target == "Boolean":
            return _unary(fn, bool), target
        if kind == "Int64" and target == "String":
            return _unary(fn, str), target
        raise _UnsupportedError

    def _Function(self, body: Any) -> tuple[_Fn, str]:  # noqa: N802
        family, name = _function_name(body["function"])
        inputs = [self.node(child) for child in body["input"]]
        key: Any = family if name is None else (family, name)
        if key in _FLOAT_FUNCTIONS and len(inputs) == 1:
            fn, kind = inputs[0]
            if kind not in _NUMERIC:
                raise _UnsupportedError
            return _unary(self._coerce(fn, kind, "Float64"), _FLOAT_FUNCTIONS[key]), "Float64"
        if family == "Log" and len(inputs) == 2:
            (fn, kind), (bf, bk) = inputs
            if kind not in _NUMERIC or bk not in ("DynFloat", "Float64", "DynInt"):
                raise _UnsupportedError
            xf, basef = self._coerce(fn, kind, "Float64"), self._coerce(bf, bk, "Float64")
            return _binary(xf, basef, _log), "Float64"
        if family in ("Abs", "Negate") and len(inputs) == 1:
            fn, kind = inputs[0]
            if kind == "Int64":
                op = abs if family == "Abs" else int.__neg__
                return _unary(fn, lambda x: _wrap(op(x))), kind
            if kind == "Float64":
                return _unary(fn, abs if family == "Abs" else float.__neg__), kind
            raise _UnsupportedError
        if family in ("FillNull", "Coalesce") and len(inputs) >= 2:
            kind = inputs[0][1]
            for _, other in inputs[1:]:
                kind = self._super(kind, other)
            fns = [self._coerce(f, k, kind) for f, k in inputs]

            def first(a: Sequence[Any]) -> Any:
                for f in fns:
                    x = f(a)
                    if x is not None:
                        return x
                return None

            return first, kind
        if family == "Boolean" and len(inputs) == 1:
            fn, kind = inputs[0]
            if name in ("IsNull", "IsNotNull") and kind in _KINDS.values():
                null = name == "IsNull"
                return (lambda a: (fn(a) is None) is null), "Boolean"
            if name == "Not" and kind == "Boolean":
                return _unary(fn, lambda x: not x), kind
            tests: dict[str, Callable[[float], bool]] = {
                "IsNan": lambda x: x != x,
                "IsNotNan": lambda x: x == x,
                "IsFinite": math.isfinite,
                "IsInfinite": math.isinf,
            }
            if name in tests and kind == "Float64":
                return _unary(fn, tests[name]), "Boolean"
        if family == "StringExpr" and inputs and inputs[0][1] == "String":
            fn = inputs[0][0]
            if name in ("Lowercase", "Uppercase") and len(inputs) == 1:
                return _unary(fn, _ascii(str.lower if name == "Lowercase" else str.upper)), "String"
            if name in ("StartsWith", "EndsWith") and len(inputs) == 2 and inputs[1][1] == "String":
                test = str.startswith if name == "StartsWith" else str.endswith
                return _binary(fn, inputs[1][0], test), "Boolean"
        raise _UnsupportedError
