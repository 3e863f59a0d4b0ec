"""The expression JSON round trip, the row-wise check and input names (polarstore._expressions)."""

from __future__ import annotations

import json

import polars as pl
import pytest

from polarstore import PolarstoreError, SchemaError
from polarstore._expressions import (
    POLARS_VERSION,
    check_row_wise,
    expression_from_json,
    expression_to_json,
    input_names,
)

ROW_WISE = [
    pl.col("v:a") / pl.col("v:b"),
    (pl.col("a") + 1).log(),
    pl.when(pl.col("a") > 1).then(pl.lit("big")).otherwise(pl.lit("small")),
    pl.col("a").fill_null(0).abs().sqrt().clip(0, 10).round(2),
    pl.col("a").cast(pl.Int32, strict=False).is_null() | pl.col("b").is_nan(),
    pl.col("s").str.to_lowercase().str.contains("x") & pl.col("s").str.starts_with("a"),
    pl.col("s").str.len_chars() + pl.col("a").exp(),
    pl.col("a").is_in([1, 2]) ^ pl.col("a").is_between(0, 3),
    pl.max_horizontal("a", "b") - pl.coalesce("a", "b") // 2 % 3,
    pl.lit("nan").cast(pl.Float64) * pl.col("a").alias("renamed"),
]
REFUSED = {
    "sum": pl.col("a").sum(),
    "mean": pl.col("a") - pl.col("a").mean(),
    "shift": pl.col("a").shift(1),
    "over": pl.col("a").over("b"),
    "rank": pl.col("a").rank(),
    "cum_sum": pl.col("a").cum_sum(),
    "diff": pl.col("a").diff(),
    "sort": pl.col("a").sort(),
    "filter": pl.col("a").filter(pl.col("a") > 0),
    "len": pl.len(),
    "rolling": pl.col("a").rolling_mean(3),
    "fill_null_with_strategy": pl.col("a").fill_null(strategy="forward"),
    "is_in over a column": pl.col("a").is_in(pl.col("b")),
    "multi-column": pl.col("^a.*$"),
    "Series literal": pl.col("a") + pl.lit(pl.Series([1, 2])),
    "Python function": pl.col("a").map_elements(lambda x: x, return_dtype=pl.Int64),
    "Python function ": pl.col("a").map_batches(lambda s: s),
}


@pytest.mark.parametrize("expr", ROW_WISE, ids=str)
def test_row_wise_expressions_pass_and_round_trip(expr: pl.Expr) -> None:
    check_row_wise(expr, where="f")
    doc = expression_to_json(expr)
    assert doc["polars_version"] == POLARS_VERSION
    # Stored as JSON text in the registry: the round trip goes through json.dumps/loads.
    back = expression_from_json(json.loads(json.dumps(doc)), where="f")
    assert back.meta.serialize(format="json") == expr.meta.serialize(format="json")


@pytest.mark.parametrize(("what", "expr"), REFUSED.items(), ids=list(REFUSED))
def test_non_row_wise_expressions_are_refused_saying_why(what: str, expr: pl.Expr) -> None:
    with pytest.raises(SchemaError, match=r"^feature 'x': ") as info:
        check_row_wise(expr, where="feature 'x'")
    text = str(info.value)
    assert what.strip().split()[0] in text
    assert "pickle" in text if what.startswith("Python") else "row" in text


def test_nan_literals_cannot_be_stored_and_the_hint_works() -> None:
    with pytest.raises(SchemaError, match=r"NaN or infinite literal.*pl\.lit\('nan'\)"):
        expression_to_json(pl.col("a") + float("nan"))
    doc = expression_to_json(pl.col("a") + pl.lit("nan").cast(pl.Float64))
    out = pl.DataFrame({"a": [1.0]}).select(expression_from_json(doc, where="f"))
    assert out.item() != out.item()  # NaN


def test_unreadable_expression_names_both_versions_and_how_to_reapply() -> None:
    doc = expression_to_json(pl.col("a") + 1)
    doc = {"polars_version": "0.19.0", "expr": {"NoSuchNode": doc["expr"]}}
    with pytest.raises(PolarstoreError, match=r"view 'v'.*Polars 0\.19\.0.*Polars 2\..*re-apply"):
        expression_from_json(doc, where="on-demand view 'v'")


def test_not_an_expression_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match=r"expected a Polars expression"):
        check_row_wise("a + 1", where="f")  # type: ignore[arg-type]


def test_input_names_in_first_use_order_without_repeats() -> None:
    expr = pl.col("v:b") / (pl.col("amount") + pl.col("v:b")) + pl.col("v:a")
    assert input_names(expr) == ["v:b", "amount", "v:a"]
