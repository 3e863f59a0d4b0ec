"""Bitemporal retrieval (SPEC, "Leakage-proof retrieval") against the brute-force reference.

Each example writes a few batches to one view with real commits, so commit times are whatever
the clock said (milliseconds, as Delta records them). Event and created times are drawn in
microseconds around the moment the example starts — from 30 ms before to 300 ms after (past
every commit), mostly inside a few "hot" milliseconds — so later writes often backfill events
older than earlier commits, some events come after their commit (the event time decides), and
rows of different writes share a millisecond. Between writes the view may be compacted, have
entities deleted, or have its log purged (``vacuum(retention=0, force=True)``):
none of that may change when a row became known. Commit times are then read back from
``history()`` and handed to the reference; spine times are drawn at commit times (and 1 µs,
999 µs or 1 ms either side), at event times ±1 µs, at TTL edges and at created times.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polarstore import Entity, FeatureStore, FeatureView, PolarstoreError, ValidationError
from tests.reference import RefView, point_in_time

UTC = timezone.utc
US = timedelta(microseconds=1)
MS = timedelta(milliseconds=1)
KEYS = [0, 1, 2]
TTLS = [None, US, 5 * MS, 40 * MS]


@dataclass
class Step:
    kind: str  # "write", "compact", "delete", "purge"
    rows: list[dict[str, Any]]  # write: times as µs offsets from the example's start
    key: int = 0  # delete: the entity removed


@st.composite
def offsets(draw: st.DrawFn) -> int:
    hot = draw(st.sampled_from([0, 1000, 20_000, 250_000, 250_000]))
    spread = st.integers(-30_000, 300_000)
    near = st.sampled_from([0, 1, 999, 1000]).map(lambda us: hot + us)
    return draw(near | spread)


@st.composite
def steps(draw: st.DrawFn, created: bool) -> list[Step]:
    out: list[Step] = []
    serial = 0
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["write", "write", "write", "compact", "delete", "purge"]))
        if kind != "write" and not any(s.kind == "write" for s in out):
            kind = "write"
        if kind == "write":
            rows = []
            for _ in range(draw(st.integers(1, 4))):
                serial += 1
                row = {"user_id": draw(st.sampled_from(KEYS)), "ts": draw(offsets()), "x": serial}
                if created:
                    row["created"] = draw(offsets())
                rows.append(row)
            if rows and draw(st.booleans()):  # a correction: same key and times, a new value
                serial += 1
                rows.append({**rows[0], "x": serial})
            out.append(Step("write", rows))
        else:
            out.append(Step(kind, [], draw(st.sampled_from(KEYS))))
    return out


SETTINGS = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])


def bitemporal_view(created: bool, ttl: timedelta | None, exact: bool) -> FeatureView:
    """The view the bitemporal properties write to: ``x`` per ``user_id`` at ``ts``."""
    return FeatureView(
        "v",
        entities=Entity("user", "user_id"),
        schema={"x": pl.Int64},
        timestamp_field="ts",
        created_timestamp_field="created" if created else None,
        ttl=ttl,
        allow_exact_match=exact,
    )


def play(
    store: FeatureStore, plan: Sequence[Any], start: datetime, created: bool
) -> tuple[dict[int, list[tuple[dict[str, Any], int]]], dict[int, datetime], bool]:
    """Run the steps (times in µs after ``start``) against view ``v``. Returns the live rows
    after each version (with the version that wrote each), the commit times read from the
    log before each purge, and whether a purge ran."""
    live: list[tuple[dict[str, Any], int]] = []
    states: dict[int, list[tuple[dict[str, Any], int]]] = {}
    logged: dict[int, datetime] = {}
    purged = False
    for step in plan:
        if step.kind == "write":
            rows = [
                {
                    **r,
                    "ts": start + r["ts"] * US,
                    **({"created": start + r["created"] * US} if created else {}),
                }
                for r in step.rows
            ]
            version = store.write("v", pl.DataFrame(rows).with_columns(_utc("ts", created)))
            live += [(r, version) for r in rows]
        elif step.kind == "compact":
            version = store.compact("v")
        elif step.kind == "delete":
            version = store.delete_entities("v", {"user_id": step.key})
            live = [(r, v) for r, v in live if r["user_id"] != step.key]
        else:
            logged |= _log(store)
            store.vacuum(retention=timedelta(0), force=True)
            purged = True
            continue
        states[version] = list(live)
    return states, logged, purged


@settings(SETTINGS)
@given(
    created=st.booleans(),
    ttl=st.sampled_from(TTLS),
    exact=st.booleans(),
    data=st.data(),
)
def test_bitemporal_matches_reference(
    created: bool, ttl: timedelta | None, exact: bool, data: st.DataObject
) -> None:
    plan = data.draw(steps(created), label="steps")
    view = bitemporal_view(created, ttl, exact)
    ref = RefView(
        "v",
        join_keys=("user_id",),
        features=("x",),
        timestamp_field="ts",
        created_timestamp_field="created" if created else None,
        ttl=ttl,
        allow_exact_match=exact,
    )
    with tempfile.TemporaryDirectory() as path, FeatureStore(path) as store:
        store.apply(view)
        start = datetime.now(UTC)
        states, logged, purged = play(store, plan, start, created)
        logged |= _log(store)
        assert set(states) <= set(logged)
        pin = None
        if not purged and data.draw(st.booleans(), label="pin"):
            pin = data.draw(st.sampled_from(sorted(states)), label="version")
        chosen = states[max(states) if pin is None else pin]
        at = logged
        # (key, time): times at a row's edges come with its key; None: any key.
        candidates: list[tuple[int | None, datetime]] = [
            (None, start - 40 * MS),
            (None, start + 400 * MS),
        ]
        for stamp in at.values():
            candidates += [(None, stamp + d) for d in (-MS, -US, 0 * US, US, 999 * US, MS)]
        for r, _ in chosen:
            edges = [r["ts"] + d for d in (-US, 0 * US, US)]
            if ttl is not None:
                edges += [r["ts"] + ttl + d for d in (-US, 0 * US, US)]
            if created:
                edges += [r["created"] + d for d in (-US, 0 * US, US)]
            candidates += [(r["user_id"], t) for t in edges]
        picks = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=12))
        keys = [
            key if key is not None else data.draw(st.sampled_from([*KEYS, None]))
            for key, _ in picks
        ]
        times = [t for _, t in picks]
        spine = pl.DataFrame(
            {"user_id": keys, "ts": times},
            schema={"user_id": pl.Int64, "ts": pl.Datetime("us", "UTC")},
        )
        got = store.get_historical_features(
            spine,
            ["v:x"],
            timestamp_field="ts",
            bitemporal=True,
            as_of=None if pin is None else {"v": pin},
        ).collect()
        want = point_in_time(
            spine.to_dicts(),
            ["v:x"],
            {"v": ref},
            {"v": [r for r, _ in chosen]},
            timestamp_field="ts",
            commit_times={"v": [at[v] for _, v in chosen]},
        )
        assert got["x"].to_list() == [w["x"] for w in want]
        # Without bitemporal, the commit times play no part.
        plain = store.get_historical_features(
            spine, ["v:x"], timestamp_field="ts", as_of=None if pin is None else {"v": pin}
        ).collect()
        want = point_in_time(
            spine.to_dicts(),
            ["v:x"],
            {"v": ref},
            {"v": [r for r, _ in chosen]},
            timestamp_field="ts",
        )
        assert plain["x"].to_list() == [w["x"] for w in want]


def _log(store: FeatureStore) -> dict[int, datetime]:
    history = store.history("v").select("version", "timestamp")
    return {int(v): t for v, t in history.iter_rows()}


def _utc(ts: str, created: bool) -> list[pl.Expr]:
    return [pl.col(c).dt.cast_time_unit("us") for c in (ts, *(["created"] if created else []))]


def _stats(**kw: Any) -> FeatureView:
    return FeatureView("stats", entities=Entity("user", "user_id"), schema={"x": pl.Int64}, **kw)


def _rows(x: int, at: datetime, user: int = 1) -> pl.DataFrame:
    return pl.DataFrame({"user_id": [user], "x": [x], "event_timestamp": [at]})


def test_a_backfill_after_a_saved_bitemporal_dataset_changes_nothing(tmp_path: Any) -> None:
    store = FeatureStore(tmp_path)
    store.apply(_stats())
    past = datetime.now(UTC) - timedelta(days=30)
    store.write("stats", _rows(1, past))
    spine = pl.DataFrame({"user_id": [1, 1], "event_timestamp": [past, datetime.now(UTC)]})
    saved = store.save_dataset("train", spine, ["stats:x"], bitemporal=True).collect()
    assert store.list_datasets()["train"]["bitemporal"] is True
    # A correction of last month's value, written now: known only from now on.
    store.write("stats", _rows(2, past))
    store.compact("stats")
    assert saved["x"].to_list() == [None, 1]  # at `past` the first write was not known yet
    assert store.load_dataset("train").collect().equals(saved)
    # As of now, the event-time join takes the correction for both rows; bitemporal does not.
    assert store.get_historical_features(spine, ["stats:x"]).collect()["x"].to_list() == [2, 2]
    later = spine.with_columns(pl.lit(datetime.now(UTC)).alias("event_timestamp"))
    got = store.get_historical_features(later, ["stats:x"], bitemporal=True).collect()
    assert got["x"].to_list() == [2, 2]


def test_a_dataset_saved_before_bitemporal_existed_loads_as_plain(tmp_path: Any) -> None:
    store = FeatureStore(tmp_path)
    store.apply(_stats())
    past = datetime.now(UTC) - timedelta(days=1)
    store.write("stats", _rows(1, past))
    spine = pl.DataFrame({"user_id": [1], "event_timestamp": [past]})
    store.save_dataset("train", spine, ["stats:x"])
    path = store.path / "registry.json"
    doc = json.loads(path.read_text())
    del doc["datasets"]["train"]["bitemporal"]
    path.write_text(json.dumps(doc))
    assert FeatureStore(tmp_path).load_dataset("train").collect()["x"].to_list() == [1]


def test_allow_exact_match_round_trips_and_old_registries_read_as_true(tmp_path: Any) -> None:
    store = FeatureStore(tmp_path)
    store.apply(_stats(allow_exact_match=False))
    assert FeatureStore(tmp_path).get_feature_view("stats").allow_exact_match is False
    path = store.path / "registry.json"
    doc = json.loads(path.read_text())
    del doc["feature_views"]["stats"]["allow_exact_match"]
    path.write_text(json.dumps(doc))
    assert FeatureStore(tmp_path).get_feature_view("stats").allow_exact_match is True


def test_strict_matching_online_hides_a_row_at_now(tmp_path: Any) -> None:
    store = FeatureStore(tmp_path)
    loose = FeatureView("loose", entities=Entity("user", "user_id"), schema={"x": pl.Int64})
    store.apply([_stats(allow_exact_match=False), loose])
    at = datetime(2024, 1, 1, tzinfo=UTC)
    store.write("stats", _rows(1, at))
    store.write("loose", _rows(1, at))
    store.materialize()
    entity = pl.DataFrame({"user_id": [1]})
    refs = ["stats:x", "loose:x"]
    now = store.get_online_features(entity, refs, full_feature_names=True, now=at)
    assert now.row(0) == (1, None, 1)
    assert store.get_feature_vector({"user_id": 1}, refs, full_feature_names=True, now=at) == {
        "stats__x": None,
        "loose__x": 1,
    }
    after = store.get_feature_vector({"user_id": 1}, refs, now=at + US, full_feature_names=True)
    assert after == {"stats__x": 1, "loose__x": 1}


@pytest.mark.parametrize("value", [1, "yes", None])
def test_bitemporal_and_allow_exact_match_must_be_bools(tmp_path: Any, value: Any) -> None:
    store = FeatureStore(tmp_path)
    store.apply(_stats())
    spine = pl.DataFrame({"user_id": [1], "event_timestamp": [datetime(2024, 1, 1)]})
    with pytest.raises(ValidationError, match="bitemporal must be True or False"):
        store.get_historical_features(spine, ["stats:x"], bitemporal=value)
    with pytest.raises(ValidationError, match="bitemporal must be True or False"):
        store.save_dataset("train", spine, ["stats:x"], bitemporal=value)
    assert "train" not in store.list_datasets()
    with pytest.raises(ValidationError, match="allow_exact_match must be True or False"):
        _stats(allow_exact_match=value)


def test_bitemporal_without_a_known_commit_time_is_an_error(tmp_path: Any) -> None:
    store = FeatureStore(tmp_path)
    store.apply(_stats())
    store.write("stats", _rows(1, datetime(2024, 1, 1, tzinfo=UTC)))
    store.write("stats", _rows(2, datetime(2024, 1, 1, tzinfo=UTC)))
    store.vacuum(retention=timedelta(0), force=True)
    (store.path / ".polarstore" / "commit_times" / "stats.json").unlink()
    spine = pl.DataFrame({"user_id": [1], "event_timestamp": [datetime.now(UTC)]})
    with pytest.raises(PolarstoreError, match="commits whose time is no longer known"):
        store.get_historical_features(spine, ["stats:x"], bitemporal=True).collect()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0, 1, 2, 3, None]), st.sampled_from(["a", "b"]), st.integers(0, 6)
        ),
        min_size=1,
        max_size=60,
    )
)
def test_suffix_min_per_key_matches_a_loop(rows: list[tuple[Any, str, int]]) -> None:
    """The per-key suffix minimum behind bitemporal joins: both its paths (the window over the
    few keys that own out-of-order rows, and over every key) against a plain loop. Few distinct
    values, so ties and runs of equal values are common; null keys form a key of their own."""
    from polarstore._retrieval import _TS, _suffix_min

    keys = pl.DataFrame({"k": [r[0] for r in rows], "s": [r[1] for r in rows]}, strict=False)
    known = pl.Series(_TS, [r[2] for r in rows], dtype=pl.Int64).cast(pl.Datetime("us", "UTC"))
    expected = [
        min(rows[j][2] for j in range(i, len(rows)) if rows[j][:2] == rows[i][:2])
        for i in range(len(rows))
    ]
    got = _suffix_min(known, keys)
    assert got.dtype == known.dtype
    assert got.to_physical().to_list() == expected
