"""The order a write stores its rows in: by event time, then created time, then write order.

``write_order`` packs the event time and the row number into one integer and sorts
that, then sorts the runs of rows the packed time cannot tell apart by every key. Checked
against sorting the row numbers by (event time, created time, row number) one row at a time,
on times that reach microseconds, many rows inside one millisecond, exact ties, spans that
force a shift (times near both ends of the int64 range) and batches that are all ties.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from polarstore._offline import write_order

from .conftest import T0

EDGE = 2**63 - 1  # the widest int64 span: the packed time is shifted by the row bits
micros = st.one_of(
    st.integers(0, 3),  # exact ties, a microsecond apart
    st.integers(0, 1_999),  # inside two milliseconds
    st.integers(-(2**40), 2**40),
    st.sampled_from([-EDGE - 1, -EDGE, EDGE - 1, EDGE]),
    st.integers(EDGE - 64, EDGE),  # close together at an edge: one packed value after a shift
)


def reference(ts: list[int], created: list[int] | None) -> list[int]:
    """Row numbers in (event time, created time, row number) order, by Python's sort."""
    key = (lambda i: (ts[i], created[i], i)) if created else (lambda i: (ts[i], i))  # type: ignore[index]
    return sorted(range(len(ts)), key=key)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.tuples(micros, micros), max_size=60),
    with_created=st.booleans(),
    dtype=st.sampled_from([pl.Int64, pl.Datetime("us"), pl.Datetime("us", "UTC")]),
)
def test_rows_come_in_time_then_write_order(
    rows: list[tuple[int, int]], with_created: bool, dtype: Any
) -> None:
    ts, created = [r[0] for r in rows], [r[1] for r in rows]
    times = ["ts", "created"] if with_created else ["ts"]
    frame = pl.DataFrame(
        {"ts": ts, "created": created, "row": range(len(rows))},
        schema={"ts": pl.Int64, "created": pl.Int64, "row": pl.Int64},
    ).with_columns(pl.col("ts", "created").cast(dtype))
    got = write_order(frame, times)
    assert got.dtype == np.int64
    assert got.tolist() == reference(ts, created if with_created else None)


def test_a_large_batch_with_few_and_with_many_ties() -> None:
    rng = np.random.default_rng(5)
    n = 300_000
    spread = rng.integers(0, 90 * 86_400_000_000, n)  # 90 days: no shift at this size
    spread[::50] = spread[1::50]  # 2% tied, in any created order
    for ts in (spread, rng.integers(0, 1_000, n)):  # then: nearly every row tied
        created = rng.integers(0, 5, n)
        frame = pl.DataFrame({"ts": ts, "created": created, "row": np.arange(n)})
        got = write_order(frame, ["ts", "created"])
        assert (got == np.lexsort((np.arange(n), created, ts))).all()


def test_a_written_batch_is_stored_in_that_order(tmp_path: Any) -> None:
    from polarstore import Entity, FeatureStore, FeatureView

    user = Entity("user", join_keys="user_id")
    view = FeatureView(
        "v", entities=[user], schema={"x": pl.Int64}, created_timestamp_field="created"
    )
    store = FeatureStore(tmp_path / "repo")
    store.apply([user, view])
    at = [T0 + timedelta(microseconds=us) for us in (5, 1, 5, 1, 5)]
    made = [datetime(2024, 2, 1) + timedelta(microseconds=us) for us in (1, 0, 0, 0, 1)]
    store.write(
        "v",
        pl.DataFrame({"user_id": [1] * 5, "event_timestamp": at, "created": made, "x": range(5)}),
    )
    assert store.read("v").collect()["x"].to_list() == [1, 3, 2, 0, 4]
