"""Row-level checks on write: ``FeatureView(checks={name: pl.Expr})``.

A check is a row-wise boolean Polars expression over the view's columns. ``write`` evaluates
every check on the rows as they will be stored (after type normalisation): a row fails a check
where it is False (null passes). By default a batch with a failing row is refused before
anything is written; ``on_check_failure="warn"`` writes it with a ``CheckWarning``, ``"drop"``
writes the passing rows only (and warns). Checks are stored in the registry as JSON, with the
code derived features use (``_expressions``): never pickle. They are decoded at write time, so
a registry written by another Polars still loads.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import polars as pl

from polarstore._errors import NotFoundError, SchemaError, ValidationError, did_you_mean
from polarstore._expressions import (
    check_row_wise,
    expression_from_json,
    expression_to_json,
    input_names,
)

if TYPE_CHECKING:
    from polarstore._definitions import FeatureView

__all__ = ["CheckWarning", "OnCheckFailure", "check_columns", "enforce", "normalise"]

OnCheckFailure = Literal["error", "warn", "drop"]
_MODES = ("error", "warn", "drop")
_EXAMPLES = 5


class CheckWarning(UserWarning):
    """Rows failed a view's checks and were written anyway (``"warn"``) or dropped."""


def normalise(
    checks: Mapping[str, Any] | None,
    documents: Mapping[str, Any] | None,
    *,
    where: str,
    check_name: Any,
) -> tuple[dict[str, pl.Expr] | None, dict[str, Any], str]:
    """(checks, their registry documents, a comparison key) of a view definition.

    From expressions (a user's definition): each must be a ``pl.Expr`` and row-wise, and is
    serialised now. From documents (the registry): kept as they are, decoded when a write needs
    them. The key is the expressions' JSON, so both forms of one definition compare equal.
    """
    if checks is not None:
        if not isinstance(checks, Mapping):
            msg = f"{where}: checks must be a dict of check name to a boolean pl.Expr."
            raise SchemaError(msg)
        exprs: dict[str, pl.Expr] = {}
        documents = {}
        for name, expr in checks.items():
            check_name(name, what=f"check of {where}")
            here = f"{where}, check {name!r}"
            if not isinstance(expr, pl.Expr):
                msg = f"{here}: a check is a boolean pl.Expr, got {type(expr).__name__} {expr!r}."
                raise SchemaError(msg)
            check_row_wise(expr, where=here)
            documents[name] = expression_to_json(expr, where=here)
            exprs[name] = expr
        result: dict[str, pl.Expr] | None = exprs or None
    else:
        result, documents = None, dict(documents or {})
    key = json.dumps({n: d.get("expr") for n, d in documents.items()}, sort_keys=True)
    return result, dict(documents), key if documents else ""


def _expressions(view: FeatureView) -> dict[str, pl.Expr]:
    if view.checks:
        return dict(view.checks)
    return {
        name: expression_from_json(doc, where=f"feature view {view.name!r}, check {name!r}")
        for name, doc in (view.check_documents or {}).items()
    }


def check_columns(view: FeatureView) -> None:
    """At apply: every check reads columns of the view and gives a boolean."""
    if not view.checks:
        return
    known = [*view.join_keys, view.timestamp_field, *view.schema]
    if view.created_timestamp_field:
        known.append(view.created_timestamp_field)
    for name, expr in view.checks.items():
        here = f"feature view {view.name!r}, check {name!r}"
        for column in input_names(expr):
            if column not in known:
                msg = (
                    f"{here}: the expression reads column {column!r}, which the view does not "
                    f"have (its columns: {known})." + did_you_mean(column, known)
                )
                raise NotFoundError(msg)
        if set(input_names(expr)) & set(view.join_keys) - set(view.key_dtypes):
            continue  # an undeclared key's dtype is known at the first write only
        schema = {
            **dict.fromkeys(view.join_keys, pl.Int64()),
            **view.key_dtypes,
            view.timestamp_field: pl.Datetime("us", "UTC"),
            **(
                {view.created_timestamp_field: pl.Datetime("us", "UTC")}
                if view.created_timestamp_field
                else {}
            ),
            **view.schema,
        }
        _boolean(pl.DataFrame(schema=schema).lazy().select(expr.alias(name)), here, SchemaError)


def _boolean(frame: pl.LazyFrame, where: str, error: type[Exception]) -> None:
    try:
        dtype = frame.collect_schema().dtypes()[0]
    except pl.exceptions.PolarsError as e:
        msg = f"{where}: the expression cannot be evaluated on the view's columns: {e}"
        raise error(msg) from e
    if dtype != pl.Boolean:
        msg = f"{where}: a check must give a boolean per row, this one gives {dtype}."
        raise error(msg)


def enforce(view: FeatureView, rows: pl.DataFrame, mode: Any) -> pl.DataFrame:
    """The rows ``write`` commits: all (no check fails, or ``"warn"``), the passing ones
    (``"drop"``), or a ``ValidationError`` naming each failing check (``"error"``)."""
    if mode not in _MODES:
        msg = f"write: on_check_failure must be one of {list(_MODES)}, got {mode!r}."
        raise ValidationError(msg)
    exprs = _expressions(view)
    if not exprs or rows.is_empty():
        return rows
    where = f"write to view {view.name!r}"
    try:
        results = rows.select(
            [expr.alias(name).fill_null(True) for name, expr in exprs.items()]  # null passes
        )
    except pl.exceptions.PolarsError as e:
        msg = f"{where}: the checks cannot be evaluated on the rows: {e}"
        raise ValidationError(msg) from e
    for name, dtype in results.schema.items():
        if dtype != pl.Boolean:
            msg = f"{where}: check {name!r} gives {dtype}, not a boolean per row."
            raise ValidationError(msg)
    failing = {name: int((~results[name]).sum()) for name in results.columns}
    failing = {name: n for name, n in failing.items() if n}
    if not failing:
        return rows
    parts = []
    for name, n in failing.items():
        shown = [*view.join_keys, view.timestamp_field]
        shown += [c for c in input_names(exprs[name]) if c not in shown]
        examples = [
            {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}
            for row in rows.filter(~results[name]).head(_EXAMPLES).select(shown).to_dicts()
        ]
        parts.append(f"check {name!r} failed for {n} of {rows.height} rows, e.g. {examples}")
    report = "; ".join(parts)
    if mode == "error":
        msg = (
            f"{where}: {report}. Nothing was written; fix the rows, or pass "
            "on_check_failure='drop' (write the passing rows) or 'warn' (write them all)."
        )
        raise ValidationError(msg)
    if mode == "warn":
        warnings.warn(f"{where}: {report}; written anyway.", CheckWarning, stacklevel=3)
        return rows
    passing = results.select(pl.all_horizontal(pl.all())).to_series()
    kept = rows.filter(passing)
    warnings.warn(
        f"{where}: {report}; {rows.height - kept.height} row(s) dropped, {kept.height} written.",
        CheckWarning,
        stacklevel=3,
    )
    return kept
