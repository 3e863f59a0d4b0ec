"""Training sets written in time slices of the spine (polarstore/_stream.py).

The slices must give exactly ``get_historical_features``'s rows, in input order (itself held
to the brute-force reference elsewhere), whatever the slice size, with null spine times,
ties and microsecond neighbours, and every slice must read the same pinned versions.
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from polarstore import Entity, FeatureStore, FeatureView
from polarstore._stream import sink_training_set

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
USER = Entity("user", join_keys="user_id")
STATS = FeatureView(
    "stats",
    entities=[USER],
    schema={"x": pl.Int64},
    created_timestamp_field="created",
    ttl=timedelta(microseconds=1500),
)
FOREVER = FeatureView("forever", entities=[USER], schema={"y": pl.Float64})
OFFSETS = st.sampled_from([0, 1, 499, 500, 999, 1000, 1001, 1499, 1500, 1501, 3000])


def _times(offsets: list[int]) -> list[datetime]:
    return [T0 + timedelta(microseconds=o) for o in offsets]


@pytest.fixture(scope="module")
def store() -> FeatureStore:
    s = FeatureStore(tempfile.mkdtemp())
    s.apply([USER, STATS, FOREVER])
    for batch in range(3):  # overlapping files, ties across writes
        offsets = [0, 500, 999, 1000, 1000, 1500, 2500][batch:]
        s.write(
            "stats",
            pl.DataFrame(
                {
                    "user_id": [i % 3 for i in range(len(offsets))],
                    "event_timestamp": _times(offsets),
                    "created": _times([o + (batch % 2) for o in offsets]),
                    "x": [batch * 100 + i for i in range(len(offsets))],
                }
            ),
        )
        s.write(
            "forever",
            pl.DataFrame(
                {
                    "user_id": [0, 1, 2],
                    "event_timestamp": _times([batch * 700, 1000, 1000]),
                    "y": [batch + 0.5, None, float(batch)],
                }
            ),
        )
    return s


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 3), st.one_of(st.none(), OFFSETS)), min_size=0, max_size=12
    ),
    slice_rows=st.integers(2, 5),
    bitemporal=st.booleans(),
)
def test_slices_give_the_rows_of_the_plain_join_in_input_order(
    store: FeatureStore,
    tmp_path_factory: pytest.TempPathFactory,
    rows: list[tuple[int, int | None]],
    slice_rows: int,
    bitemporal: bool,
) -> None:
    spine = pl.DataFrame(
        {
            "user_id": [u for u, _ in rows],
            "event_timestamp": [
                None if o is None else T0 + timedelta(microseconds=o) for _, o in rows
            ],
            "tag": list(range(len(rows))),
        },
        schema={"user_id": pl.Int64, "event_timestamp": pl.Datetime("us", "UTC"), "tag": pl.Int64},
    )
    features = ["stats:x", "forever:y"]
    want = store.get_historical_features(spine, features, bitemporal=bitemporal).collect()
    out = tmp_path_factory.mktemp("out") / "t.parquet"
    sink_training_set(store, spine, features, out, slice_rows=slice_rows, bitemporal=bitemporal)
    assert_frame_equal(pl.read_parquet(out), want)


def test_every_slice_reads_the_versions_pinned_before_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FeatureStore(tmp_path / "repo")
    store.apply([USER, FOREVER])
    rows = pl.DataFrame({"user_id": [0, 1], "event_timestamp": _times([0, 0]), "y": [1.0, 2.0]})
    store.write("forever", rows)
    spine = pl.DataFrame({"user_id": [0, 1, 0, 1], "event_timestamp": _times([5, 6, 7, 8])})
    want = store.get_historical_features(spine, ["forever:y"]).collect()
    plain = store.get_historical_features
    calls = []

    def racing(*args: object, **kwargs: object) -> pl.LazyFrame:
        calls.append(kwargs.get("as_of"))
        store.write("forever", rows.with_columns(pl.col("y") * 10))  # lands between slices
        return plain(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "get_historical_features", racing)
    sink_training_set(store, spine, ["forever:y"], tmp_path / "t.parquet", slice_rows=1)
    assert len(calls) == 4
    assert all(c == {"forever": 0} for c in calls)
    assert_frame_equal(pl.read_parquet(tmp_path / "t.parquet"), want)
