"""Train/serve parity (SPEC, "Online semantics"), as a hypothesis property.

Each example builds a fresh repository with one or two random views (int, string or compound
int+string keys; with or without a created timestamp; with or without a TTL, including 0),
writes a few batches (ties on event and created time are common; some writes are followed by
``compact``), and calls ``materialize`` at random points in between — for all views or one,
with or without an ``end`` (on the time grid or a microsecond either side of it).

After every intermediate ``materialize`` the online store must hold exactly the rows synced so
far: a row is synced once a ``materialize`` of its view ran after its write with no ``end`` or
an ``end`` at or after its event time (rows beyond an ``end`` are synced by a later call, even
when newer versions were synced in between). That is checked against the brute-force reference
at ``now`` = the latest synced event time.

After the final ``materialize()`` every committed row is synced, and for ``now`` at or after
the latest event time ``T`` — exactly ``T``, later grid points, and ``event + ttl`` of written
rows and a microsecond either side — ``get_online_features`` must equal
``get_historical_features`` of the same keys at ``now``, frame for frame (columns, dtypes,
row order, values), and ``get_feature_vector`` must equal each row.

For ``now`` before ``T`` (drawn at microsecond resolution: event times ±1 µs and anywhere in
between), the online store, which holds only the latest row of each entity, must give the
reference's answer at ``now`` where that latest row's event time is at or before ``now``, and
null where it is after: never a value from the future of ``now``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from polarstore import FeatureStore
from tests.reference import RefView, pick_row, point_in_time, resolve_features
from tests.test_pit_properties import (
    GRID,
    KEY_DTYPES,
    KEY_VALUES,
    STEP,
    UTC,
    Case,
    cases,
    define_views,
    grid,
    write_data,
)

US = timedelta(microseconds=1)
MISSING: dict[str, Any] = {"user_id": 99, "item_id": "missing"}


@dataclass(frozen=True)
class Sync:
    """A ``materialize`` call made right after write number ``after``."""

    after: int
    views: tuple[str, ...] | None  # None: every view (``materialize()``)
    end: datetime | None  # aware UTC; passed naive (meaning UTC) when ``naive``
    naive: bool = False


@st.composite
def syncs(draw: st.DrawFn, case: Case) -> list[Sync]:
    out: list[Sync] = []
    for i in range(len(case.writes)):
        for _ in range(draw(st.integers(0, 2))):
            views = draw(st.sampled_from([None, *((name,) for name in case.views)]))
            end = None
            if draw(st.booleans()):
                end = grid(draw(st.integers(-1, GRID))) + draw(st.sampled_from([-US, 0 * US, US]))
            out.append(Sync(i, views, end, naive=draw(st.booleans())))
    return out


def build(path: str, case: Case) -> FeatureStore:
    store = FeatureStore(path)
    define_views(store, case)
    return store


def join_keys(case: Case) -> list[str]:
    """The entity columns the lookups take: each requested view's keys, first seen first."""
    resolved = resolve_features(case.views, case.features, full_feature_names=True)
    keys: list[str] = []
    for view_name, _, _ in resolved:
        keys += [k for k in case.views[view_name].join_keys if k not in keys]
    return keys


def entity_rows(case: Case, keys: list[str], data: st.DataObject) -> list[dict[str, Any]]:
    """Every combination of the known key values, a missing entity, null keys, duplicates."""
    combos: list[dict[str, Any]] = [{}]
    for key in keys:
        combos = [{**c, key: v} for c in combos for v in KEY_VALUES[key]]
    combos.append(dict(MISSING) if len(keys) == 2 else {keys[0]: MISSING[keys[0]]})
    for key in keys:
        combos.append({**combos[0], key: None})
    rows = [{k: row[k] for k in keys} for row in combos]
    rows += data.draw(st.lists(st.sampled_from(rows), max_size=3), label="duplicates")
    return list(data.draw(st.permutations(rows), label="entity order"))


def entity_frame(rows: list[dict[str, Any]], keys: list[str]) -> pl.DataFrame:
    return pl.DataFrame({k: pl.Series(k, [r[k] for r in rows], dtype=KEY_DTYPES[k]) for k in keys})


def check_online(
    store: FeatureStore,
    case: Case,
    keys: list[str],
    rows: list[dict[str, Any]],
    expected: pl.DataFrame,
    now: datetime,
) -> None:
    """Online lookups at ``now`` equal ``expected`` (keys then features), and the vectors."""
    frame = entity_frame(rows, keys)
    fnn = case.full_feature_names
    got = store.get_online_features(frame, case.features, full_feature_names=fnn, now=now)
    assert_frame_equal(got, expected, check_exact=True)
    outputs = [c for c in expected.columns if c not in keys]
    for entity, want in zip(rows, expected.select(outputs).iter_rows(named=True), strict=True):
        vector = store.get_feature_vector(entity, case.features, full_feature_names=fnn, now=now)
        assert vector == want, (entity, now)


def expected_from_reference(
    case: Case,
    keys: list[str],
    rows: list[dict[str, Any]],
    synced: dict[str, list[dict[str, Any]]],
    now: datetime,
) -> pl.DataFrame:
    """The reference's answer at ``now`` over the ``synced`` rows, as the online frame."""
    spine = [{**row, "event_timestamp": now} for row in rows]
    values = point_in_time(
        spine, case.features, case.views, synced, full_feature_names=case.full_feature_names
    )
    resolved = resolve_features(
        case.views, case.features, full_feature_names=case.full_feature_names
    )
    columns = [entity_frame(rows, keys)[k] for k in keys]
    for view_name, feature, output in resolved:
        dtype = case.dtypes[view_name][feature]
        columns.append(pl.Series(output, [v[output] for v in values], dtype=dtype))
    return pl.DataFrame(columns)


def expected_before_latest(
    case: Case,
    keys: list[str],
    rows: list[dict[str, Any]],
    synced: dict[str, list[dict[str, Any]]],
    now: datetime,
) -> pl.DataFrame:
    """The online answer at ``now``: the reference's, but null where the entity's latest
    synced row (the one online) has an event time after ``now``."""
    expected = expected_from_reference(case, keys, rows, synced, now)
    return hide_unseen(case, rows, synced, now, expected)


def hide_unseen(
    case: Case,
    rows: list[dict[str, Any]],
    synced: dict[str, list[dict[str, Any]]],
    now: datetime,
    expected: pl.DataFrame,
) -> pl.DataFrame:
    """``expected`` with null where the entity's latest synced row (the one online) does not
    count at ``now``: its event time is after ``now``, or equals it in a strict view
    (``allow_exact_match=False``)."""
    never = datetime.max.replace(tzinfo=UTC)
    resolved = resolve_features(
        case.views, case.features, full_feature_names=case.full_feature_names
    )
    for view_name, _, output in resolved:
        view = dataclasses.replace(case.views[view_name], ttl=None, allow_exact_match=True)
        strict = not case.views[view_name].allow_exact_match
        future = []
        for row in rows:
            latest = pick_row(view, synced[view_name], [row[k] for k in view.join_keys], never)
            ts = None if latest is None else latest[view.timestamp_field]
            future.append(ts is not None and (ts > now or (strict and ts == now)))
        column = expected[output]
        expected = expected.with_columns(
            pl.when(pl.Series(future)).then(None).otherwise(column).cast(column.dtype).alias(output)
        )
    return expected


def all_synced(case: Case) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in case.views}
    for write in case.writes:
        out[write.view] += write.rows
    return out


def synced_rows(case: Case, done: list[Sync], upto: int) -> dict[str, list[dict[str, Any]]]:
    """Rows of the first ``upto + 1`` writes that the syncs in ``done`` have brought online."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in case.views}
    for i, write in enumerate(case.writes[: upto + 1]):
        view: RefView = case.views[write.view]
        ends = [s.end for s in done if s.after >= i and (s.views is None or write.view in s.views)]
        for row in write.rows:
            ts = row[view.timestamp_field]
            if any(end is None or ts <= end for end in ends):
                out[write.view].append(row)
    return out


def now_candidates(case: Case, latest: datetime) -> list[datetime]:
    """``latest``, later grid points, and TTL boundaries (±1 µs) at or after ``latest``."""
    out = {latest, latest + US, latest + STEP, grid(GRID + 4)}
    for write in case.writes:
        view = case.views[write.view]
        if view.ttl is None:
            continue
        for row in write.rows:
            edge = row[view.timestamp_field] + view.ttl
            out |= {t for t in (edge - US, edge, edge + US) if t >= latest}
    return sorted(out)


@settings(
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases(n_views=2) | cases(n_views=1), data=st.data())
def test_online_equals_historical_at_and_after_the_latest_event(
    case: Case, data: st.DataObject
) -> None:
    plan = data.draw(syncs(case), label="syncs")
    keys = join_keys(case)
    rows = entity_rows(case, keys, data)
    with tempfile.TemporaryDirectory() as path, build(path, case) as store:
        done: list[Sync] = []
        for i, write in enumerate(case.writes):
            store.write(write.view, write_data(case, write))
            if write.compact:
                store.compact(write.view)
            for sync in (s for s in plan if s.after == i):
                end = sync.end
                if end is not None and sync.naive:
                    end = end.astimezone(UTC).replace(tzinfo=None)
                summary = store.materialize(list(sync.views) if sync.views else None, end=end)
                assert set(summary) == set(sync.views or case.views)
                done.append(sync)
            if done and done[-1].after == i:
                # The online store holds exactly the rows synced so far.
                synced = synced_rows(case, done, i)
                times = [
                    r[case.views[name].timestamp_field] for name, rs in synced.items() for r in rs
                ]
                if times:
                    now = max(times)
                    expected = expected_before_latest(case, keys, rows, synced, now)
                    check_online(store, case, keys, rows, expected, now)

        summary = store.materialize()
        versions = store.versions()
        for name in case.views:
            assert summary[name]["version"] == versions[name]
            assert store.describe(name)["materialized_version"] == versions[name]
        latest = max(r[case.views[w.view].timestamp_field] for w in case.writes for r in w.rows)
        candidates = now_candidates(case, latest)
        picks = {latest, *data.draw(st.lists(st.sampled_from(candidates), max_size=3))}
        for now in sorted(picks):
            spine = entity_frame(rows, keys).with_columns(
                pl.lit(now, pl.Datetime("us", "UTC")).alias("event_timestamp")
            )
            offline = store.get_historical_features(
                spine, case.features, full_feature_names=case.full_feature_names
            ).collect()
            # Equal for now > T; at now == T a strict view's latest row is not seen online
            # (the one before it, which the offline join takes, is not kept online).
            everything = all_synced(case)
            expected = hide_unseen(case, rows, everything, now, offline.drop("event_timestamp"))
            check_online(store, case, keys, rows, expected, now)

        # Before the latest event: never a value from the future of ``now``.
        synced = synced_rows(case, [*done, Sync(len(case.writes), None, None)], len(case.writes))
        times = sorted(r[case.views[w.view].timestamp_field] for w in case.writes for r in w.rows)
        edges = sorted({t + d for t in times for d in (-US, 0 * US, US) if t + d < latest})
        span = (latest - times[0]) // US + 1
        earlier = data.draw(st.lists(st.sampled_from(edges), max_size=3)) if edges else []
        earlier += [latest - US * data.draw(st.integers(1, span)) for _ in range(2)]
        for now in sorted(set(earlier)):
            expected = expected_before_latest(case, keys, rows, synced, now)
            check_online(store, case, keys, rows, expected, now)
