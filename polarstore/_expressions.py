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
        shown = _user_name(name if name and family in ("Boolean", "StringExpr") else family)
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
    min/max/sum/mean, and the common ``str`` functions. Refused with the reason:
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
            f"{where}: {e.what} is refused: {e.reason or _UNKNOWN}. A derived value must "
            "depend on its own row alone, so that it is the same in a training set, a batch "
            "lookup and a one-row request."
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
    gives their Polars dtypes, ``dtype`` the expression's. The function returns exactly what
    Polars returns for a one-row frame of those values (None for null).
    """
    return None
