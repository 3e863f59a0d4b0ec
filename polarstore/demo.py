"""The ``polarstore demo`` story: e-commerce churn, from raw events to online serving.

A public module, for notebooks and tests as much as for the CLI::

    from polarstore.demo import definitions, make_data, run_demo

Everything is synthetic and seeded, so the figures are the same on every run:

1. ~20k users with a profile view (plan, country, age; plan changes over time), an orders
   view (~300k rows) and a sessions view (~200k rows, 30-day TTL);
2. late-arriving corrections to ~2% of orders, written as a second commit (same event
   times, later created timestamps);
3. a labelled spine (~50k rows: user, cutoff time, churned) and its point-in-time training
   set;
4. a leakage check (a naive "latest value per user" join against the point-in-time join), and
   the backfill case: a training set cut between the two commits, where the event-time join
   still uses the corrections and ``bitemporal=True`` does not;
5. time travel (the training set as it was before the corrections);
6. materialize, online lookups, and a train/serve parity check;
7. windowed aggregations over the orders and sessions events (spend and orders in the last 7
   and 30 days, distinct devices, ...) and the churn label as a forward aggregation ("did the
   user order in the next 30 days"), checked against the hand-written label; their online
   values at ``now`` against the offline ones.

Each step is a function in :data:`STEPS` sharing a :class:`DemoRun`; ``run_demo`` returns
the key figures as a dict so tests (and curious users) can check them. Run it with
``polarstore demo`` (or ``python -m polarstore._cli demo``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from rich.console import Console, RenderableType
from rich.padding import Padding
from rich.rule import Rule
from rich.table import Table

from polarstore._aggregations import Aggregation, AggregationView
from polarstore._definitions import Entity, FeatureService, FeatureView
from polarstore._errors import ValidationError
from polarstore._ondemand import OnDemandView
from polarstore._store import FeatureStore

__all__ = [
    "DEMO_MARKER",
    "NOW",
    "STEPS",
    "T0",
    "DemoData",
    "DemoRun",
    "Step",
    "aggregation_views",
    "definitions",
    "derived_view",
    "make_data",
    "prepare_demo_path",
    "run_demo",
]

#: The file that marks a folder as a demo repository (only such folders are ever wiped).
DEMO_MARKER = ".polarstore-demo"
#: The start of the simulated half year and the moment the demo "serves" at.
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
DAYS = 182
NOW = T0 + timedelta(days=DAYS)
#: A user churned if they place no order within this window after the cutoff.
CHURN_WINDOW = timedelta(days=30)

_STAMP = pl.Datetime("us", "UTC")
_PLANS = np.array(["free", "plus", "pro"])
_COUNTRIES = np.array(["US", "GB", "DE", "FR", "NL", "ES", "IT", "PL"])
_DEVICES = np.array(["mobile", "desktop", "tablet"])


# --- definitions ----------------------------------------------------------------------------


def definitions() -> list[Entity | FeatureView | FeatureService]:
    """The demo's entity, three feature views and one feature service.

    Examples
    --------
    >>> [d.name for d in definitions()]
    ['user', 'user_profile', 'orders', 'sessions', 'churn_model']
    """
    user = Entity("user", join_keys="user_id", description="a shopper")
    profile = FeatureView(
        "user_profile",
        entities=[user],
        schema={"plan": pl.String, "country": pl.String, "age": pl.Int64},
        description="account profile; a new row whenever the plan changes",
        owner="crm@example.com",
        tags={"domain": "account"},
    )
    orders = FeatureView(
        "orders",
        entities=[user],
        schema={"order_amount": pl.Float64, "items": pl.Int64, "order_count": pl.Int64},
        created_timestamp_field="created_at",
        description="one row per order: amount, items and the user's running order count",
        owner="commerce@example.com",
        tags={"domain": "commerce"},
    )
    sessions = FeatureView(
        "sessions",
        entities=[user],
        schema={"session_minutes": pl.Float64, "pages_viewed": pl.Int64, "device": pl.String},
        ttl=timedelta(days=30),
        description="the latest web/app session; stale after 30 days",
        owner="web@example.com",
        tags={"domain": "engagement"},
    )
    churn = FeatureService(
        "churn_model",
        features=["user_profile:*", "orders:*", "sessions:*"],
        description="features of the churn model, for training and serving alike",
        owner="ds@example.com",
    )
    return [user, profile, orders, sessions, churn]


# --- synthetic data -------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoData:
    """The demo's raw frames, ready for ``FeatureStore.write`` (and the labelled spine)."""

    profile: pl.DataFrame
    orders: pl.DataFrame
    corrections: pl.DataFrame
    sessions: pl.DataFrame
    spine: pl.DataFrame


def _stamp(days: np.ndarray) -> pl.Series:
    """Day offsets from ``T0`` to UTC timestamps, whole seconds."""
    seconds = np.floor(days * 86_400).astype(np.int64)
    micros = int(T0.timestamp()) * 1_000_000 + seconds * 1_000_000
    return pl.Series(micros).cast(_STAMP)


def make_data(n_users: int = 20_000, *, seed: int = 7) -> DemoData:
    """Generate the demo's users, orders, corrections, sessions and labelled spine.

    Sizes scale with ``n_users``: ~15 orders, ~10 sessions and 2.5 spine rows per user.

    Examples
    --------
    >>> data = make_data(200)
    >>> data.spine.columns
    ['user_id', 'event_timestamp', 'churned']
    >>> data.spine.height, data.profile["user_id"].n_unique()
    (500, 200)
    """
    if n_users < 1:
        msg = f"n_users must be at least 1, got {n_users}."
        raise ValidationError(msg)
    rng = np.random.default_rng(seed)
    users = np.arange(1, n_users + 1, dtype=np.int64)
    signup = rng.uniform(-300, 29, n_users)  # days from T0; everyone exists by day 29
    start = np.maximum(signup, 0.0)
    churner = rng.random(n_users) < 0.45
    stop = np.where(churner, rng.uniform(20, DAYS, n_users), float(DAYS))
    active = np.maximum(stop - start, 0.0)
    appetite = rng.gamma(2.0, 1.0, n_users)

    profile = _profile(rng, users, signup, start, stop, churner)
    orders = _events(rng, users, start, active, appetite, per_user=15)
    n = len(orders[0])
    items = rng.integers(1, 6, n)
    orders_df = (
        pl.DataFrame(
            {
                "user_id": orders[0],
                "event_timestamp": _stamp(orders[1]),
                "order_amount": np.round(items * rng.lognormal(2.8, 0.5, n), 2),
                "items": items,
            }
        )
        .sort("user_id", "event_timestamp")
        .with_columns(
            order_count=pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over("user_id"),
            created_at=pl.col("event_timestamp") + pl.duration(minutes=5),
        )
    )
    # Late-arriving corrections: partial refunds restate ~2% of orders days later.
    fix = np.sort(rng.choice(n, size=max(1, n // 50), replace=False))
    refund = pl.Series(rng.uniform(0.5, 0.95, len(fix)))
    delay = pl.Series(rng.integers(24, 24 * 14, len(fix)) * 3_600_000_000).cast(pl.Duration("us"))
    corrections = orders_df[fix].with_columns(
        order_amount=(pl.col("order_amount") * refund).round(2),
        created_at=pl.col("created_at") + delay,
    )
    browse_stop = np.minimum(stop + 14.0, float(DAYS))  # churners browse a little longer
    sessions = _events(
        rng, users, start, np.maximum(browse_stop - start, 0.0), appetite, per_user=10
    )
    m = len(sessions[0])
    sessions_df = pl.DataFrame(
        {
            "user_id": sessions[0],
            "event_timestamp": _stamp(sessions[1]),
            "session_minutes": np.round(rng.lognormal(2.0, 0.8, m), 1),
            "pages_viewed": rng.poisson(6, m) + 1,
            "device": rng.choice(_DEVICES, m, p=[0.6, 0.3, 0.1]),
        }
    ).sort("event_timestamp", "user_id")
    spine = _spine(rng, users, orders_df)
    return DemoData(profile, orders_df, corrections, sessions_df, spine)


def _profile(
    rng: np.random.Generator,
    users: np.ndarray,
    signup: np.ndarray,
    start: np.ndarray,
    stop: np.ndarray,
    churner: np.ndarray,
) -> pl.DataFrame:
    n = len(users)
    plan = rng.choice(_PLANS, n, p=[0.6, 0.3, 0.1])
    first = pl.DataFrame(
        {
            "user_id": users,
            "event_timestamp": _stamp(signup),
            "plan": plan,
            "country": rng.choice(_COUNTRIES, n),
            "age": rng.integers(18, 76, n),
        }
    )
    # Most churners downgrade to "free" shortly before they leave; some others upgrade.
    downgrade = churner & (rng.random(n) < 0.6)
    upgrade = ~churner & (rng.random(n) < 0.2)
    change = downgrade | upgrade
    when = np.where(
        downgrade,
        np.maximum(stop - rng.uniform(0, 10, n), start),
        rng.uniform(start, DAYS),
    )
    new_plan = np.where(downgrade, "free", np.where(plan == "free", "plus", "pro"))
    changes = first.filter(pl.Series(change)).with_columns(
        event_timestamp=_stamp(when[change]), plan=pl.Series(new_plan[change])
    )
    return pl.concat([first, changes]).sort("event_timestamp", "user_id")


def _events(
    rng: np.random.Generator,
    users: np.ndarray,
    start: np.ndarray,
    active: np.ndarray,
    appetite: np.ndarray,
    *,
    per_user: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Poisson event times per user within their active days; ~``per_user`` on average."""
    weight = (appetite * active).sum()
    rate = appetite * per_user * len(users) / weight if weight > 0 else appetite * 0
    counts = rng.poisson(rate * active)
    who = np.repeat(users, counts)
    when = np.repeat(start, counts) + rng.random(counts.sum()) * np.repeat(active, counts)
    return who, when


def _spine(rng: np.random.Generator, users: np.ndarray, orders: pl.DataFrame) -> pl.DataFrame:
    """Users at midnight cutoffs, labelled churned when no order follows within 30 days."""
    size = len(users) * 5 // 2
    cutoff = np.floor(rng.uniform(30, DAYS - 32, size))
    spine = pl.DataFrame(
        {"user_id": rng.choice(users, size), "event_timestamp": _stamp(cutoff)}
    ).sort("event_timestamp", "user_id")
    following = orders.select("user_id", next_order=pl.col("event_timestamp")).sort("next_order")
    nxt = spine.join_asof(
        following,
        left_on="event_timestamp",
        right_on="next_order",
        by="user_id",
        strategy="forward",
        allow_exact_matches=False,
        check_sortedness=False,  # sorted above; polars cannot check it per group
    )
    churned = nxt["next_order"].is_null() | (
        nxt["next_order"] > nxt["event_timestamp"] + CHURN_WINDOW
    )
    return spine.with_columns(churned=churned)


# --- the story ------------------------------------------------------------------------------


def prepare_demo_path(path: str | os.PathLike[str]) -> Path:
    """Make ``path`` an empty demo folder; wipe it only if it is empty or a previous demo.

    Anything else (a file, a symlink, a folder with other content) is refused with a
    ``ValidationError``, so a mistyped path can never destroy data.

    Examples
    --------
    >>> import tempfile
    >>> folder = prepare_demo_path(Path(tempfile.mkdtemp()) / "demo")
    >>> sorted(p.name for p in folder.iterdir())
    ['.polarstore-demo']
    """
    target = Path(path)
    if target.is_symlink():
        msg = f"refusing to use {str(target)!r} for the demo: it is a symbolic link."
        raise ValidationError(msg)
    if target.exists():
        if not target.is_dir():
            msg = f"refusing to use {str(target)!r} for the demo: it is not a folder."
            raise ValidationError(msg)
        if (target / DEMO_MARKER).is_file():
            shutil.rmtree(target)
        elif any(target.iterdir()):
            msg = (
                f"refusing to use {str(target)!r} for the demo: the folder is not empty and "
                "is not a previous polarstore demo. Pick a new or empty folder."
            )
            raise ValidationError(msg)
    target.mkdir(parents=True, exist_ok=True)
    (target / DEMO_MARKER).write_text(
        "This folder was made by `polarstore demo`; the next demo run may delete it.\n",
        encoding="utf-8",
    )
    return target.resolve()


class _Steps:
    """Numbered, timed steps printed to a rich console, each with indented notes."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.total = total
        self.number = 0
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, key: str, title: str) -> Iterator[list[RenderableType]]:
        """Time the block; then print the title, its duration and the notes it collected."""
        self.number += 1
        notes: list[RenderableType] = []
        began = time.perf_counter()
        with self.console.status(f"{title}…"):
            yield notes
        took = time.perf_counter() - began
        self.seconds[key] = round(took, 3)
        head = f"[bold cyan]{self.number:>2}/{self.total}[/] [bold]{title}[/]"
        self.console.print(f"{head} [dim]({took:.2f} s)[/]")
        for note in notes:
            self.console.print(Padding(note, (0, 0, 0, 6), expand=False))


def _frame_table(frame: pl.DataFrame, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for name in frame.columns:
        table.add_column(name, overflow="fold")
    for row in frame.iter_rows():
        table.add_row(*("∅" if v is None else _short(v) for v in row))
    return table


def _short(value: Any) -> str:
    if isinstance(value, datetime):
        midnight = (value.hour, value.minute, value.second) == (0, 0, 0)
        return value.strftime("%Y-%m-%d" if midnight else "%Y-%m-%d %H:%M")
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)


@dataclass
class DemoRun:
    """What the demo's steps share: the console, the store, the data and the figures so far.

    A step reads what earlier steps left here and adds its own results; fields without a
    default are set by the step that makes them (``data`` by ``generate``, …).
    """

    console: Console
    store: FeatureStore
    n_users: int
    seed: int
    figures: dict[str, Any]
    data: DemoData = field(init=False)
    service: FeatureService = field(init=False)
    features: list[str] = field(init=False)
    before: dict[str, int] = field(init=False)
    written_at: datetime = field(init=False)  # after the first writes, before the corrections
    training: pl.DataFrame = field(init=False)

    @property
    def user_id(self) -> int:
        """The user the online steps look up: the spine's first."""
        return int(self.data.spine["user_id"][0])


#: A step adds notes (text or tables) to print under its title.
Notes = list[RenderableType]


@dataclass(frozen=True)
class Step:
    """One numbered step of the story: a key for its timing, a title and what it does."""

    key: str
    title: str | Callable[[DemoRun], str]
    run: Callable[[DemoRun, Notes], None]


def _generate(run: DemoRun, notes: Notes) -> None:
    run.data = data = make_data(run.n_users, seed=run.seed)
    churn_rate = float(data.spine["churned"].mean())  # type: ignore[arg-type]
    run.figures.update(
        profile_rows=data.profile.height,
        orders_rows=data.orders.height,
        corrections_rows=data.corrections.height,
        sessions_rows=data.sessions.height,
        spine_rows=data.spine.height,
        churn_rate=round(churn_rate, 4),
    )
    notes.append(
        f"{run.n_users:,} users · {data.profile.height:,} profile rows · "
        f"{data.orders.height:,} orders · {data.sessions.height:,} sessions · "
        f"spine of {data.spine.height:,} labelled rows (churn rate {churn_rate:.1%})"
    )


def _apply(run: DemoRun, notes: Notes) -> None:
    defs = definitions()
    run.store.apply(defs)
    notes.append(", ".join(f"{type(d).__name__} [green]{d.name}[/]" for d in defs))
    run.service = run.store.get_feature_service("churn_model")
    run.features = service_features(run.store, run.service)


def _write(run: DemoRun, notes: Notes) -> None:
    data = run.data
    for view, frame in (
        ("user_profile", data.profile),
        ("orders", data.orders),
        ("sessions", data.sessions),
    ):
        version = run.store.write(view, frame)
        notes.append(f"{view}: {frame.height:,} rows → version {version}")
    run.before = run.store.versions()
    run.store.save_dataset("churn_training", data.spine, run.service)
    run.figures["versions_before_corrections"] = dict(run.before)
    notes.append(f"saved dataset [green]churn_training[/] pinned at {run.before}")
    run.written_at = datetime.now(timezone.utc)
    # Commit times are milliseconds: the corrections must commit in a later one.
    time.sleep(0.002)


def _corrections(run: DemoRun, notes: Notes) -> None:
    version = run.store.write("orders", run.data.corrections)
    run.figures["versions_after_corrections"] = run.store.versions()
    notes.append(
        f"orders: {run.data.corrections.height:,} amounts restated (same event times, "
        f"later created_at) → version {version}"
    )
    # Freshness and drift come from the summaries every write keeps: no data is read.
    info = run.store.describe("orders")
    amount = run.store.drift("orders", reference=run.before["orders"]).row(0, named=True)
    run.figures["orders_drift"] = {k: amount[k] for k in ("psi", "ks", "drifted")}
    notes.append(
        f"orders: latest event {_short(info['latest_event_time'])}, "
        f"{info['freshness_lag'].days} days behind now; order_amount since version "
        f"{run.before['orders']}: PSI {amount['psi']:.3f}, KS {amount['ks']:.3f} → "
        + ("[red]drifted[/]" if amount["drifted"] else "stable")
    )


def _training(run: DemoRun, notes: Notes) -> None:
    run.training = training = run.store.get_historical_features(
        run.data.spine, run.service
    ).collect()
    run.figures.update(training_rows=training.height, training_columns=training.columns)
    notes.append(f"{training.height:,} rows × {len(run.features)} features; the first rows:")
    sample = training.head(5).select(
        "user_id",
        pl.col("event_timestamp").alias("cutoff"),
        "churned",
        "plan",
        "order_count",
        "order_amount",
        "session_minutes",
        "device",
    )
    notes.append(_frame_table(sample))


def _leakage_step(run: DemoRun, notes: Notes) -> None:
    leaks = _leakage(run.store, run.data.spine)
    run.figures.update(leaks)
    by_view = ", ".join(f"{v} {n:,}" for v, n in leaks["leaky_rows_by_view"].items())
    notes.append(
        f"a naive join of each user's latest values uses data from after the cutoff in "
        f"[bold red]{leaks['leaky_rows']:,}[/] of {run.data.spine.height:,} spine rows "
        f"({leaks['leaky_fraction']:.1%}; by view: {by_view})"
    )
    notes.append(
        f"e.g. the plan differs in {leaks['plan_differs']:,} rows (downgrades that "
        "precede churn); the point-in-time join uses no future data"
    )
    backfill = _backfill(run)
    run.figures.update(backfill)
    notes.append(
        f"but a training set cut at {run.written_at:%H:%M:%S.%f} (after the first writes, before "
        f"the corrections were committed) still gets the corrected amounts in "
        f"[bold red]{backfill['backfill_leaky_rows']:,}[/] rows with the event-time join: "
        "they were not known then. bitemporal=True uses only rows committed (and created) by "
        f"each cutoff; equal to the store as_of that moment: {backfill['bitemporal_equals_as_of']}"
    )


def _time_travel(run: DemoRun, notes: Notes) -> None:
    store, spine = run.store, run.data.spine
    old = store.get_historical_features(spine, run.service, as_of=run.before).collect()
    changed = _changed_rows(run.training, old, run.features)
    reproduced = store.load_dataset("churn_training").collect().equals(old)
    run.figures.update(time_travel_changed_rows=changed, saved_dataset_reproduced=reproduced)
    notes.append(
        f"as_of={run.before}: [bold]{changed:,}[/] rows differ from today's training set "
        "(the corrected order amounts)"
    )
    notes.append(f"load_dataset('churn_training') returns exactly that old set: {reproduced}")


def _materialize(run: DemoRun, notes: Notes) -> None:
    summary = run.store.materialize()
    run.figures["materialize"] = summary
    notes.append(_summary_table(summary))


def _online(run: DemoRun, notes: Notes) -> None:
    store, service, key = run.store, run.service, {"user_id": run.user_id}
    row = store.get_online_features(key, service, now=NOW)
    vector = store.get_feature_vector(key, service, now=NOW)
    per_call = _time_per_call(lambda: store.get_feature_vector(key, service, now=NOW))
    run.figures.update(
        online_user=run.user_id,
        online_vector=vector,
        vector_matches_online=_vector_matches(vector, row),
        feature_vector_us=round(per_call * 1e6, 1),
    )
    notes.append(_vector_table(vector))
    notes.append(
        f"get_feature_vector: {per_call * 1e6:,.0f} µs per call; the same values as "
        f"get_online_features: {run.figures['vector_matches_online']}"
    )


def _parity_step(run: DemoRun, notes: Notes) -> None:
    checked = min(1_000, run.n_users)
    keys = np.random.default_rng(run.seed + 1).choice(
        np.arange(1, run.n_users + 1), checked, replace=False
    )
    mismatches = _parity(run.store, run.service, keys, run.features)
    run.figures.update(parity_checked=checked, parity_mismatches=mismatches)
    status = "[bold green]OK[/]" if mismatches == 0 else "[bold red]MISMATCH[/]"
    notes.append(f"{checked:,} users checked, {mismatches} mismatching rows {status}")


# --- windowed aggregations --------------------------------------------------------------------


def aggregation_views() -> list[AggregationView]:
    """Aggregates of the orders and sessions events, and the churn label as a forward one.

    Examples
    --------
    >>> [v.name for v in aggregation_views()]
    ['order_windows', 'session_windows']
    >>> aggregation_views()[0].feature_names[-1]
    'orders_next_30d'
    """
    orders = AggregationView(
        "order_windows",
        "orders",
        [
            Aggregation("order_amount", "sum", "7d"),
            Aggregation("order_amount", "sum", "30d"),
            Aggregation(None, "count", "30d", name="orders_30d"),
            Aggregation("items", "mean", "30d"),
            Aggregation("order_amount", "max", "90d"),
            # The label: did the user order in (cutoff, cutoff + 30 days]? Offline only.
            Aggregation(None, "count", CHURN_WINDOW, forward=True, name="orders_next_30d"),
        ],
        description="spend and orders over sliding windows; orders_next_30d is a label",
        owner="ds@example.com",
    )
    sessions = AggregationView(
        "session_windows",
        "sessions",
        [
            Aggregation("session_minutes", "sum", "7d"),
            Aggregation(None, "count", "7d", name="sessions_7d"),
            Aggregation("device", "count_distinct", "30d", name="devices_30d"),
            Aggregation("pages_viewed", "last", "30d"),
        ],
        description="engagement over sliding windows",
        owner="ds@example.com",
    )
    return [orders, sessions]


_WINDOWED = [
    "order_windows:order_amount_sum_7d",
    "order_windows:order_amount_sum_30d",
    "order_windows:orders_30d",
    "order_windows:items_mean_30d",
    "order_windows:order_amount_max_90d",
    "session_windows:*",
]


def _aggregations_step(run: DemoRun, notes: Notes) -> None:
    store, spine = run.store, run.data.spine
    store.apply(aggregation_views())
    started = time.perf_counter()
    training = store.get_historical_features(
        spine, [*run.service.features, *_WINDOWED, "order_windows:orders_next_30d"]
    ).collect()
    took = time.perf_counter() - started
    # The forward label replaces the hand-written one: no order in the next 30 days = churned.
    label = training["orders_next_30d"] == 0
    mismatches = int((label != training["churned"]).sum())
    run.figures.update(
        aggregation_training_seconds=round(took, 3),
        aggregation_columns=training.width - spine.width,
        forward_label_mismatches=mismatches,
    )
    notes.append(
        f"{training.height:,} rows × {training.width - spine.width} features (plain and windowed) "
        f"in {took:.2f} s; the forward label orders_next_30d == 0 differs from the hand-written "
        f"churn label in [bold]{mismatches}[/] rows"
    )
    sample = training.head(5).select(
        "user_id",
        pl.col("event_timestamp").alias("cutoff"),
        "churned",
        "orders_next_30d",
        "orders_30d",
        "order_amount_sum_30d",
        "sessions_7d",
        "devices_30d",
    )
    notes.append(_frame_table(sample))


def _aggregations_online(run: DemoRun, notes: Notes) -> None:
    store = run.store
    summary = store.materialize(["order_windows", "session_windows"])
    checked = min(1_000, run.n_users)
    keys = np.random.default_rng(run.seed + 2).choice(
        np.arange(1, run.n_users + 1), checked, replace=False
    )
    entities = pl.DataFrame({"user_id": keys})
    online = store.get_online_features(entities, _WINDOWED, now=NOW)
    offline = store.get_historical_features(
        entities.with_columns(event_timestamp=pl.lit(NOW, dtype=_STAMP)), _WINDOWED
    ).collect()
    names = [c for c in online.columns if c != "user_id"]
    mismatches = 0
    for name in names:
        a, b = online[name], offline[name]
        if a.dtype.is_float():
            close = (a - b).abs() <= 1e-9 * pl.max_horizontal(a.abs(), b.abs(), pl.lit(1.0))
            bad = pl.select(close.fill_null(a.is_null() & b.is_null()).not_()).to_series()
        else:
            bad = a.ne_missing(b)
        mismatches += int(bad.sum())
    key = {"user_id": run.user_id}
    vector = store.get_feature_vector(key, _WINDOWED, now=NOW)
    per_call = _time_per_call(lambda: store.get_feature_vector(key, _WINDOWED, now=NOW))
    run.figures.update(
        aggregation_materialize=summary,
        aggregation_parity_checked=checked,
        aggregation_parity_mismatches=mismatches,
        aggregation_vector=vector,
        aggregation_vector_us=round(per_call * 1e6, 1),
    )
    notes.append(_summary_table(summary))
    notes.append(_vector_table(vector))
    status = "[bold green]OK[/]" if mismatches == 0 else "[bold red]MISMATCH[/]"
    notes.append(
        f"get_feature_vector of {len(vector)} windowed features: {per_call * 1e6:,.0f} µs per "
        f"call; {checked:,} users online at now == offline at now: {mismatches} "
        f"mismatching values {status}"
    )


#: The story, in order. A new step (aggregations, …) is a
#: function ``(run, notes)`` and one entry here.
STEPS: tuple[Step, ...] = (
    Step("generate", "Generate users, orders and sessions (seeded)", _generate),
    Step("apply", "Register the definitions", _apply),
    Step("write", "Write the offline history (one Delta table per view)", _write),
    Step("corrections", "Late-arriving corrections (a second write)", _corrections),
    Step("training", "Point-in-time training set", _training),
    Step(
        "leakage",
        "Leakage check: naive latest-value join vs point-in-time vs bitemporal",
        _leakage_step,
    ),
    Step("time_travel", "Time travel: the training set before the corrections", _time_travel),
    Step("materialize", "Materialize the latest values into LMDB", _materialize),
    Step(
        "online", lambda run: f"Online lookup for user {run.user_id} (now={NOW:%Y-%m-%d})", _online
    ),
    Step("parity", "Train/serve parity: online at now == offline at now", _parity_step),
    Step("aggregations", "Windowed aggregations and a forward label", _aggregations_step),
    Step("aggregations_online", "Aggregations online: exact at now", _aggregations_online),
    Step(
        "derived",
        "Derived features: one Polars expression, offline and at request time",
        lambda run, notes: _derived_step(run, notes),  # defined below, with its view
    ),
)


def _rule(console: Console, title: str) -> None:
    # A rule spans the console, and the CLI's piped console never wraps (10,000 columns):
    # there a rule gets the width of the help text.
    console.print(Rule(title), width=console.width if console.width < 1_000 else 100)


def run_demo(
    path: str | os.PathLike[str] = "demo_repo",
    console: Console | None = None,
    *,
    n_users: int = 20_000,
    seed: int = 7,
    steps: Sequence[Step] = STEPS,
) -> dict[str, Any]:
    """Build the demo repository at ``path`` and walk through the churn story.

    ``path`` must be new, empty, or a previous demo (which is wiped). ``steps`` are run in
    order (default: :data:`STEPS`). Returns the key figures: sizes, the leakage count,
    time-travel differences, the materialize summary, the online vector of one user, the
    parity mismatches and per-step timings.

    Examples
    --------
    >>> import io, tempfile
    >>> quiet = Console(file=io.StringIO())
    >>> figures = run_demo(Path(tempfile.mkdtemp()) / "demo", quiet, n_users=300)
    >>> figures["parity_mismatches"], figures["training_rows"]
    (0, 750)
    """
    console = console or Console()
    began = time.perf_counter()
    root = prepare_demo_path(path)
    printer = _Steps(console, total=len(steps))
    figures: dict[str, Any] = {"path": str(root), "n_users": n_users, "seed": seed}
    _rule(console, "[bold]polarstore demo: e-commerce churn[/]")
    console.print(f"repository: [green]{root}[/]\n")
    with FeatureStore(root) as store:
        run = DemoRun(console, store, n_users, seed, figures)
        for step in steps:
            title = step.title(run) if callable(step.title) else step.title
            with printer.step(step.key, title) as notes:
                step.run(run, notes)
    figures["seconds"] = printer.seconds
    figures["total_seconds"] = round(time.perf_counter() - began, 3)
    _rule(console, f"[bold]done in {figures['total_seconds']:.1f} s[/]")
    user = figures.get("online_user", 1)
    console.print(
        f"try: [cyan]polarstore --repo {root} ls[/]\n"
        f"     [cyan]polarstore --repo {root} get churn_model --key user_id={user} "
        f"--now {NOW:%Y-%m-%d}[/]"
    )
    return figures


def _time_per_call(call: Callable[[], object], *, budget: float = 0.2, most: int = 5_000) -> float:
    """Seconds per call of ``call``, measured for about ``budget`` seconds."""
    calls = 0
    began = time.perf_counter()
    while calls < most and (calls < 10 or time.perf_counter() - began < budget):
        call()
        calls += 1
    return (time.perf_counter() - began) / calls


def service_features(store: FeatureStore, service: FeatureService) -> list[str]:
    """The output column names of a service's features (``view:*`` expanded)."""
    names: list[str] = []
    for ref in service.features:
        view, _, feature = str(ref).partition(":")
        if feature == "*":
            names.extend(store.get_feature_view(view).feature_names)
        else:
            names.append(feature)
    return names


def _leakage(store: FeatureStore, spine: pl.DataFrame) -> dict[str, Any]:
    """Join every view's *latest* row per user, ignoring time; count rows that see the future."""
    cutoff = pl.col("event_timestamp")
    flags: list[pl.Expr] = []
    joined = spine.with_row_index("_row")
    for view in ("user_profile", "orders", "sessions"):
        # read() returns rows in tie-breaking order, so last() is the value a naive
        # "current state" table would hold.
        latest = store.read(view).group_by("user_id", maintain_order=True).last().collect()
        latest = latest.select(
            "user_id",
            pl.col("event_timestamp").alias(f"{view}_seen"),
            *(pl.col(f).alias(f"naive_{f}") for f in store.get_feature_view(view).feature_names),
        )
        joined = joined.join(latest, on="user_id", how="left")
        flags.append(pl.col(f"{view}_seen") > cutoff)
    pit = store.get_historical_features(spine, ["user_profile:plan"]).collect()
    joined = joined.sort("_row").with_columns(pit_plan=pit["plan"])
    by_view = {
        view: int(joined.select(flag.sum()).item())
        for view, flag in zip(("user_profile", "orders", "sessions"), flags, strict=True)
    }
    leaky = int(joined.select(pl.any_horizontal(flags).sum()).item())
    differs = int(joined.select(pl.col("naive_plan").ne_missing(pl.col("pit_plan")).sum()).item())
    return {
        "leaky_rows": leaky,
        "leaky_fraction": round(leaky / max(spine.height, 1), 4),
        "leaky_rows_by_view": by_view,
        "plan_differs": differs,
    }


def _backfill(run: DemoRun) -> dict[str, Any]:
    """A spine cut at ``run.written_at``: how many rows the known-at rule changes."""
    spine = run.data.spine.with_columns(pl.lit(run.written_at, _STAMP).alias("event_timestamp"))
    store, service = run.store, run.service
    plain = store.get_historical_features(spine, service).collect()
    known = store.get_historical_features(spine, service, bitemporal=True).collect()
    then = store.get_historical_features(spine, service, as_of=run.written_at).collect()
    return {
        "backfill_leaky_rows": _changed_rows(plain, known, run.features),
        "bitemporal_equals_as_of": known.equals(then),
    }


def _changed_rows(new: pl.DataFrame, old: pl.DataFrame, features: list[str]) -> int:
    """How many rows differ between two frames of the same shape in any of ``features``."""
    differs = pl.Series([False] * new.height)
    for name in features:
        differs = differs | new[name].ne_missing(old[name])
    return int(differs.sum())


def _vector_matches(vector: dict[str, Any], row: pl.DataFrame) -> bool:
    """Whether ``get_feature_vector``'s dict equals the one-row ``get_online_features`` frame."""
    online = row.row(0, named=True)
    return set(vector) <= set(online) and all(online[k] == v for k, v in vector.items())


def _parity(
    store: FeatureStore, service: FeatureService, keys: np.ndarray, features: list[str]
) -> int:
    entities = pl.DataFrame({"user_id": keys})
    online = store.get_online_features(entities, service, now=NOW)
    offline = store.get_historical_features(
        entities.with_columns(event_timestamp=pl.lit(NOW, dtype=_STAMP)), service
    ).collect()
    return _changed_rows(online.select(features), offline.select(features), features)


def _vector_table(vector: dict[str, Any]) -> Table:
    table = Table(header_style="bold")
    table.add_column("feature")
    table.add_column("value", justify="right")
    for name, value in vector.items():
        table.add_row(name, "∅" if value is None else _short(value))
    return table


def _summary_table(summary: dict[str, dict[str, Any]]) -> Table:
    columns: list[str] = []
    for info in summary.values():
        columns.extend(k for k in info if k not in columns)
    table = Table(header_style="bold")
    table.add_column("view")
    for name in columns:
        table.add_column(name, justify="right")
    for view, info in summary.items():
        table.add_row(view, *(_short(info.get(c, "")) for c in columns))
    return table


# --- derived features (OnDemandView) -------------------------------------------------------


def derived_view() -> OnDemandView:
    """The demo's derived features: ratios of the last order and of the basket being scored.

    Examples
    --------
    >>> derived_view().references
    ('orders:order_amount', 'orders:items')
    """
    amount, items = pl.col("orders:order_amount"), pl.col("orders:items")
    return OnDemandView(
        "basket",
        features={
            "amount_per_item": amount / items,
            # The basket being scored, against the user's last order: a request value.
            "basket_vs_last_order": pl.when(amount > 0)
            .then(pl.col("basket_amount") / amount)
            .otherwise(None),
        },
        request_schema={"basket_amount": pl.Float64},
        description="the last order's amount per item; the current basket against it",
        owner="ds@example.com",
    )


def _derived_step(run: DemoRun, notes: Notes) -> None:
    store, basket = run.store, 42.0
    store.apply(derived_view())
    features = ["basket:*"]
    entity = {"user_id": run.user_id, "basket_amount": basket}
    vector = store.get_feature_vector(entity, features, now=NOW)
    per_call = _time_per_call(lambda: store.get_feature_vector(entity, features, now=NOW))
    spine = pl.DataFrame(
        {"user_id": [run.user_id], "event_timestamp": [NOW], "basket_amount": [basket]}
    )
    offline = store.get_historical_features(spine, features).collect()
    matches = str(offline.select(list(vector)).row(0, named=True)) == str(vector)  # NaN == NaN
    run.figures.update(
        derived_vector=vector,
        derived_matches_offline=matches,
        derived_vector_us=round(per_call * 1e6, 1),
    )
    notes.append(_vector_table(vector))
    notes.append(
        f"basket_amount={basket} comes with the request; get_feature_vector with the derived "
        f"features: {per_call * 1e6:,.0f} µs per call; equal to get_historical_features at "
        f"now: {matches}"
    )
