"""Deterministic workload for the benchmarks: two feature views of one entity and a spine.

Everything is generated with numpy from a fixed seed, so every run, every process and every
contender sees exactly the same rows. Nothing here imports polarstore at module level: the peer
implementations and their self-check run without the library.

The workload (``generate(n)``):

- 100k entities, ``user_id`` Int64 in ``[0, 100_000)``;
- ``user_stats``: ``n`` rows, features ``f0..f4`` Float64, a ``created`` timestamp
  (event time + uniform 0..3600 s), ttl 7 days. About 1% of the rows copy the
  ``(user_id, event_timestamp)`` of another row, and half of those also copy its ``created``:
  those ties can only be broken by write order;
- ``user_profile``: ``n`` rows, ``score`` Float64, ``segment`` String (20 values), ``count``
  Int64, no created timestamp, ttl 30 days. About 1% of the rows copy the
  ``(user_id, event_timestamp)`` of another row too (ties broken by write order alone);
- event times uniform over 90 days from 2024-01-01 UTC, microsecond precision,
  ``Datetime("us", "UTC")``;
- a spine of ``n // 10`` rows in random order: ``user_id`` (about 1% ids that exist in no view),
  ``event_timestamp`` uniform over the same 90 days, and a ``label``. About 1% of the spine
  rows are placed on purpose on the edges of the contract: half exactly at the event time of a
  ``user_stats`` row of the same user (rule 2, ``<=``), half exactly ``ttl`` after one (rule 3,
  inclusive).

Write order: a ``WritePlan`` says how the rows reach the store (one bulk write per view, or
20 appends of shuffled rows). ``plan.frames[view]`` is the concatenation of the written chunks
**in write order**: the row order of that frame is the write order, which decides the last
tie-break rule. No column is added for it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import numpy as np
import polars as pl

__all__ = [
    "ENTITY_KEY",
    "N_ENTITIES",
    "SEED",
    "SIZES",
    "TIMESTAMP",
    "ViewData",
    "Workload",
    "WritePlan",
    "define_store",
    "generate",
    "parse_size",
    "plan_writes",
    "user_stats",
    "view_definitions",
    "write_plan",
]

SEED = 20_240_101
N_ENTITIES = 100_000
ENTITY_KEY = "user_id"
TIMESTAMP = "event_timestamp"
START = datetime(2024, 1, 1, tzinfo=timezone.utc)
SPAN = timedelta(days=90)
SEGMENTS = tuple(f"seg_{i:02d}" for i in range(20))
N_APPENDS = 20
TS_DTYPE = pl.Datetime("us", "UTC")

SIZES = {"tiny": 20_000, "2M": 2_000_000, "10M": 10_000_000}

_US_PER_S = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_size(text: str) -> int:
    """``tiny`` / ``2M`` / ``10M`` or a raw integer (``500000``, ``500_000``, ``3M``, ``50k``)."""
    if text in SIZES:
        return SIZES[text]
    t = text.strip().replace("_", "")
    mult = 1
    if t[-1:].lower() == "k":
        mult, t = 1_000, t[:-1]
    elif t[-1:].lower() == "m":
        mult, t = 1_000_000, t[:-1]
    try:
        n = int(float(t) * mult)
    except ValueError:
        msg = f"size {text!r}: expected tiny, 2M, 10M or a number of rows"
        raise ValueError(msg) from None
    if n < 10:
        msg = f"size {text!r}: at least 10 rows per view"
        raise ValueError(msg)
    return n


def _us(dt: datetime) -> int:
    return (dt - _EPOCH) // timedelta(microseconds=1)


def _ts(values: np.ndarray, name: str = TIMESTAMP) -> pl.Series:
    return pl.Series(name, values, dtype=pl.Int64).cast(TS_DTYPE)


@dataclass(frozen=True)
class ViewData:
    """One feature view's definition (the parts the peers need) and its rows.

    ``frame`` columns: ``user_id``, ``event_timestamp``, [``created``], features.
    """

    name: str
    frame: pl.DataFrame
    features: tuple[str, ...]
    dtypes: Mapping[str, Any]
    ttl: timedelta | None
    created_field: str | None = None
    join_key: str = ENTITY_KEY
    timestamp_field: str = TIMESTAMP

    def with_frame(self, frame: pl.DataFrame) -> ViewData:
        return ViewData(
            name=self.name,
            frame=frame,
            features=self.features,
            dtypes=self.dtypes,
            ttl=self.ttl,
            created_field=self.created_field,
            join_key=self.join_key,
            timestamp_field=self.timestamp_field,
        )

    @property
    def references(self) -> list[str]:
        return [f"{self.name}:{f}" for f in self.features]


@dataclass(frozen=True)
class Workload:
    n: int
    seed: int
    spine: pl.DataFrame
    views: tuple[ViewData, ...]

    @property
    def features(self) -> list[str]:
        """Every feature reference, in output order (``user_stats`` then ``user_profile``)."""
        return [ref for v in self.views for ref in v.references]

    def view(self, name: str) -> ViewData:
        return next(v for v in self.views if v.name == name)


def _duplicate_keys(
    rng: np.random.Generator, uid: np.ndarray, ts: np.ndarray, frac: float
) -> tuple[np.ndarray, np.ndarray]:
    """Make ``frac`` of the rows copy the (user_id, event_timestamp) of another row.

    Returns (targets, sources): disjoint index arrays, ``targets[i]`` now ties with ``sources[i]``.
    """
    n = len(uid)
    k = int(n * frac)
    if k == 0 or n < 2 * k:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    perm = rng.permutation(n)[: 2 * k]
    targets, sources = perm[:k], perm[k:]
    uid[targets] = uid[sources]
    ts[targets] = ts[sources]
    return targets, sources


def _user_stats(n: int, seed: int, n_entities: int, dup_frac: float) -> pl.DataFrame:
    rng = np.random.default_rng([seed, 1])
    start, span = _us(START), SPAN // timedelta(microseconds=1)
    uid = rng.integers(0, n_entities, n, dtype=np.int64)
    ts = start + rng.integers(0, span, n, dtype=np.int64)
    targets, sources = _duplicate_keys(rng, uid, ts, dup_frac)
    created = ts + rng.integers(0, 3600 * _US_PER_S + 1, n, dtype=np.int64)
    # Half of the duplicated rows also share `created`: only write order can break those ties.
    half = len(targets) // 2
    created[targets[:half]] = created[sources[:half]]
    feats = rng.standard_normal((5, n))
    return pl.DataFrame(
        [
            pl.Series(ENTITY_KEY, uid, dtype=pl.Int64),
            _ts(ts),
            _ts(created, "created"),
            *(pl.Series(f"f{i}", feats[i], dtype=pl.Float64) for i in range(5)),
        ]
    )


def _user_profile(n: int, seed: int, n_entities: int, dup_frac: float) -> pl.DataFrame:
    rng = np.random.default_rng([seed, 2])
    start, span = _us(START), SPAN // timedelta(microseconds=1)
    uid = rng.integers(0, n_entities, n, dtype=np.int64)
    ts = start + rng.integers(0, span, n, dtype=np.int64)
    _duplicate_keys(rng, uid, ts, dup_frac)
    score = rng.standard_normal(n)
    segment = np.asarray(SEGMENTS, dtype=object)[rng.integers(0, len(SEGMENTS), n)]
    count = rng.integers(0, 10_000, n, dtype=np.int64)
    return pl.DataFrame(
        [
            pl.Series(ENTITY_KEY, uid, dtype=pl.Int64),
            _ts(ts),
            pl.Series("score", score, dtype=pl.Float64),
            pl.Series("segment", segment, dtype=pl.String),
            pl.Series("count", count, dtype=pl.Int64),
        ]
    )


def _spine(
    m: int,
    seed: int,
    n_entities: int,
    stats: pl.DataFrame,
    stats_ttl: timedelta,
    missing_frac: float,
    edge_frac: float,
) -> pl.DataFrame:
    rng = np.random.default_rng([seed, 3])
    start, span = _us(START), SPAN // timedelta(microseconds=1)
    uid = rng.integers(0, n_entities, m, dtype=np.int64)
    ts = start + rng.integers(0, span, m, dtype=np.int64)
    # Edge rows: exactly at a feature row's event time, or exactly `ttl` after it.
    k = int(m * edge_frac)
    if k:
        rows = rng.permutation(m)[:k]
        src = rng.integers(0, stats.height, k)
        s_uid = stats[ENTITY_KEY].to_numpy()[src]
        s_ts = stats[TIMESTAMP].cast(pl.Int64).to_numpy()[src].copy()
        s_ts[k // 2 :] += stats_ttl // timedelta(microseconds=1)
        uid[rows], ts[rows] = s_uid, s_ts
    # Ids that exist in no view (drawn after the edge rows, so they may overwrite a few).
    k_missing = int(m * missing_frac)
    if k_missing:
        rows = rng.permutation(m)[:k_missing]
        uid[rows] = n_entities + rng.integers(0, n_entities, k_missing, dtype=np.int64)
    label = rng.integers(0, 2, m, dtype=np.int64)
    return pl.DataFrame(
        [
            pl.Series(ENTITY_KEY, uid, dtype=pl.Int64),
            _ts(ts),
            pl.Series("label", label, dtype=pl.Int64),
        ]
    )


STATS_TTL = timedelta(days=7)
PROFILE_TTL = timedelta(days=30)


def view_definitions() -> tuple[ViewData, ViewData]:
    """The two views' definitions, with empty frames (for a process that loads the rows)."""
    return (
        ViewData(
            name="user_stats",
            frame=pl.DataFrame(),
            features=tuple(f"f{i}" for i in range(5)),
            dtypes={f"f{i}": pl.Float64 for i in range(5)},
            ttl=STATS_TTL,
            created_field="created",
        ),
        ViewData(
            name="user_profile",
            frame=pl.DataFrame(),
            features=("score", "segment", "count"),
            dtypes={"score": pl.Float64, "segment": pl.String, "count": pl.Int64},
            ttl=PROFILE_TTL,
        ),
    )


def generate(
    n: int,
    *,
    seed: int = SEED,
    n_entities: int = N_ENTITIES,
    spine_rows: int | None = None,
    dup_frac: float = 0.01,
    missing_frac: float = 0.01,
    edge_frac: float = 0.01,
) -> Workload:
    """The benchmark workload with ``n`` rows per view and ``n // 10`` spine rows.

    ``views[i].frame`` is in generation order, which is the write order of a bulk write.
    """
    stats = _user_stats(n, seed, n_entities, dup_frac)
    profile = _user_profile(n, seed, n_entities, dup_frac)
    m = spine_rows if spine_rows is not None else max(n // 10, 1)
    spine = _spine(m, seed, n_entities, stats, STATS_TTL, missing_frac, edge_frac)
    stats_def, profile_def = view_definitions()
    views = (stats_def.with_frame(stats), profile_def.with_frame(profile))
    return Workload(n=n, seed=seed, spine=spine, views=views)


def user_stats(n: int, *, seed: int = SEED, n_entities: int = N_ENTITIES) -> ViewData:
    """Only the ``user_stats`` view of ``generate(n)``: the same rows, without generating the
    other view and the spine (for the single-view benchmarks ``online`` and ``write``)."""
    return view_definitions()[0].with_frame(_user_stats(n, seed, n_entities, 0.01))


# --- writing ------------------------------------------------------------------------------

Layout = Literal["bulk", "appends"]


@dataclass
class WritePlan:
    """How the rows reach the store: ``chunks[view]`` written in order.

    ``frames[view]`` is the concatenation of those chunks, i.e. the rows **in write order**.
    ``versions[view]`` is filled by ``write_plan``: the Delta version returned by each write.
    """

    layout: Layout
    chunks: dict[str, list[pl.DataFrame]]
    frames: dict[str, pl.DataFrame]
    versions: dict[str, list[int]] = field(default_factory=dict)

    def workload_views(self, workload: Workload) -> tuple[ViewData, ...]:
        """The workload's views with their frames replaced by the write-order frames."""
        return tuple(v.with_frame(self.frames[v.name]) for v in workload.views)

    def prefix_views(self, workload: Workload, n_writes: int) -> tuple[ViewData, ...]:
        """The rows of the first ``n_writes`` writes of each view, in write order."""
        return tuple(
            v.with_frame(pl.concat(self.chunks[v.name][:n_writes], rechunk=True))
            for v in workload.views
        )


def plan_writes(
    workload: Workload, layout: Layout, *, n_appends: int = N_APPENDS, seed: int | None = None
) -> WritePlan:
    """``bulk``: one write per view in generation order; ``appends``: the rows shuffled (a fixed
    permutation per view) then written as ``n_appends`` consecutive slices."""
    seed = workload.seed if seed is None else seed
    chunks: dict[str, list[pl.DataFrame]] = {}
    frames: dict[str, pl.DataFrame] = {}
    for i, view in enumerate(workload.views):
        frame = view.frame
        if layout == "bulk":
            chunks[view.name] = [frame]
            frames[view.name] = frame
        elif layout == "appends":
            perm = np.random.default_rng([seed, 100 + i]).permutation(frame.height)
            shuffled = frame[perm]
            bounds = np.linspace(0, frame.height, n_appends + 1).astype(np.int64)
            chunks[view.name] = [
                shuffled.slice(int(a), int(b - a)) for a, b in itertools.pairwise(bounds)
            ]
            frames[view.name] = shuffled
        else:
            msg = f"unknown layout {layout!r}"
            raise ValueError(msg)
    return WritePlan(layout=layout, chunks=chunks, frames=frames)


def define_store(store: Any, workload: Workload) -> None:
    """Register the entity and the workload's views in a polarstore ``FeatureStore``."""
    import polarstore as ps

    user = ps.Entity("user", join_keys=ENTITY_KEY)
    views = [
        ps.FeatureView(
            v.name,
            entities=[user],
            schema=dict(v.dtypes),
            timestamp_field=v.timestamp_field,
            created_timestamp_field=v.created_field,
            ttl=v.ttl,
        )
        for v in workload.views
    ]
    store.apply([user, *views])


def write_plan(store: Any, plan: WritePlan, view_names: Sequence[str] | None = None) -> WritePlan:
    """Write every chunk of ``plan`` into ``store`` in order; records the returned versions."""
    names = list(plan.chunks) if view_names is None else list(view_names)
    for name in names:
        plan.versions[name] = [int(store.write(name, chunk)) for chunk in plan.chunks[name]]
    return plan
