"""The sync of one view into the online store, inside a write transaction it is given.

Per view, the metadata (under ``META``) holds its *layout* (id, key and feature dtypes the
values were encoded with) and its *sync state* (which Delta versions and event times are
synced). A sync writes values and state in the transaction of ``materialize``, so readers and
crashes only ever see whole syncs. Only ``_online`` imports lmdb: this module receives
transactions and uses nothing but their ``get``/``put``/``delete``/``cursor``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import compress
from typing import Any

import numpy as np
import polars as pl

from polarstore._aggregations import AggregationView
from polarstore._definitions import SEQ_COLUMN, FeatureView
from polarstore._offline import OfflineStore, seq_floor
from polarstore._records import META, Layout, cast_keys

__all__ = [
    "Progress",
    "delete_synced",
    "drop_view",
    "extra_prefixes",
    "meta_key",
    "micros",
    "must_rebuild",
    "settle_deletes",
    "sync_view",
]

_NEXT_ID = META + b"next_id"
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)

# py-lmdb's stubs type values as ``bytes | memoryview``; transactions here never use buffers=True,
# so values are bytes.
_Txn = Any

# --- sync state -----------------------------------------------------------------------------


class _SyncState:
    """What of a view is online: Delta versions up to ``segments[i][0]`` (from the previous
    segment's version, exclusive) are synced for event times up to ``segments[i][1]`` µs
    (None: all of them). Several segments exist only after syncs with an ``end``."""

    def __init__(self, doc: dict[str, Any] | None) -> None:
        doc = doc or {}
        self.segments: list[list[int | None]] = [list(s) for s in doc.get("segments", [])]
        self.materialized_at: str | None = doc.get("materialized_at")
        # The latest event time online: rows after it need no comparison with what is online.
        self.max_event: int | None = doc.get("max_event_us")
        # Deletes are applied online by delete_entities after its offline commit; a crash in
        # between would leave the entity served. Every delete commit up to ``deletes_through``
        # is reflected online, and so are those listed in ``deletes_applied``; any other is
        # repaired by the next sync. (A state written before this field existed checks the
        # whole log once.)
        self.deletes_through: int = doc.get("deletes_through", -1)
        self.deletes_applied: list[int] = list(doc.get("deletes_applied", []))

    @property
    def version(self) -> int:
        return int(self.segments[-1][0]) if self.segments else -1  # type: ignore[arg-type]

    def to_json(self) -> bytes:
        end = self.segments[-1][1] if self.segments else None
        doc = {
            "segments": self.segments,
            "version": self.version if self.segments else None,
            "end": None if end is None else _iso(int(end)),
            "materialized_at": self.materialized_at,
            "max_event_us": self.max_event,
            "deletes_through": self.deletes_through,
            "deletes_applied": self.deletes_applied,
        }
        return json.dumps(doc).encode()

    def pending(self, view: FeatureView, current: int, end: int | None) -> _Pending | None:
        """Rows of versions ≤ ``current`` with event time ≤ ``end`` not yet synced."""
        ts = pl.col(view.timestamp_field).cast(pl.Int64)
        seq = pl.col(SEQ_COLUMN)
        parts = []
        lowest_seq: int | None = None
        since: int | None = None
        low = -1
        for high, synced_to in self.segments:
            assert high is not None
            if synced_to is not None and (end is None or synced_to < end):
                parts.append(
                    (seq >= seq_floor(low + 1)) & (seq < seq_floor(high + 1)) & (ts > synced_to)
                )
                lowest_seq = seq_floor(low + 1) if lowest_seq is None else lowest_seq
                since = synced_to if since is None else min(since, synced_to)
            low = high
        if current > low:
            parts.append(seq >= seq_floor(low + 1))
            lowest_seq = seq_floor(low + 1) if lowest_seq is None else lowest_seq
            since = None  # new versions: rows of any event time
        elif not parts:
            return None
        rows = pl.any_horizontal(parts)
        if end is not None:
            rows = rows & (ts <= end)
        return _Pending(rows, lowest_seq, None if since is None else _datetime(since))

    def advance(self, current: int, end: int | None) -> None:
        def later(a: int | None, b: int | None) -> int | None:
            return None if a is None or b is None else max(a, b)

        segments = [[high, later(synced_to, end)] for high, synced_to in self.segments]
        if current > self.version:
            segments.append([current, end])
        merged: list[list[int | None]] = []
        for segment in segments:
            if merged and merged[-1][1] == segment[1]:
                merged[-1][0] = segment[0]
            else:
                merged.append(segment)
        self.segments = merged
        self.materialized_at = datetime.now(timezone.utc).isoformat()

    def synced(self, current: int, end: int | None, latest_event: int | None) -> None:
        """Record a sync through version ``current`` (up to ``end``): its deletes are
        applied, and ``latest_event`` (the newest event time it read) raises the high mark."""
        self.advance(current, end)
        self.deletes_through = current
        self.deletes_applied = [v for v in self.deletes_applied if v > current]
        if latest_event is not None:
            known = self.max_event
            self.max_event = latest_event if known is None else max(known, latest_event)


@dataclass(frozen=True)
class _Pending:
    """The rows a sync must read: a filter, plus bounds that let the scan skip whole files."""

    rows: pl.Expr
    min_seq: int | None
    since: datetime | None


def _datetime(us: int) -> datetime:
    return _EPOCH_UTC + timedelta(microseconds=us)


def _iso(us: int) -> str:
    return (_EPOCH_UTC + timedelta(microseconds=us)).isoformat()


def micros(moment: datetime) -> int:
    return (moment - _EPOCH_UTC) // _US


def meta_key(kind: str, view: str) -> bytes:
    return META + f"{kind}/{view}".encode()


def _next_id(txn: _Txn) -> int:
    raw = txn.get(_NEXT_ID)
    view_id = 1 if raw is None else int(raw)
    txn.put(_NEXT_ID, str(view_id + 1).encode())
    return view_id


def delete_prefix(txn: _Txn, prefix: bytes) -> None:
    with txn.cursor() as cursor:
        if not cursor.set_range(prefix):
            return
        while cursor.key().startswith(prefix):
            if not cursor.delete():
                break


def _latest(
    offline: OfflineStore, view: FeatureView, version: int, pending: _Pending
) -> tuple[pl.DataFrame, int]:
    """The last pending row of each entity by the tie-breaking order, and the rows read."""
    order = [view.timestamp_field]
    if view.created_timestamp_field:
        order.append(view.created_timestamp_field)
    columns = [*view.join_keys, *order, SEQ_COLUMN, *view.feature_names]
    scan = offline.scan(
        view,
        version=version,
        columns=columns,
        ordered=True,
        since=pending.since,
        min_seq=pending.min_seq,
    )
    assert scan is not None
    # Rows come in (event time, created time, write order), so the last one of each key is
    # the one the point-in-time join would pick. Finding the positions of those rows first
    # (keys only) and then reading just them is about twice as fast as aggregating every column.
    rows = scan.filter(pending.rows).with_row_index("__row")
    last = rows.group_by(list(view.join_keys)).agg(pl.col("__row").last(), pl.len()).collect()
    if last.is_empty():
        return pl.DataFrame(), 0
    latest = rows.filter(pl.col("__row").is_in(last["__row"].implode())).drop("__row").collect()
    # In key order, LMDB reads and writes walk the B-tree forwards instead of jumping around.
    latest = latest.sort(list(view.join_keys))
    return latest, int(last["len"].sum())


class Progress:
    """Progress lines on stderr for long syncs (rich, imported only when shown)."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Callable[[str], None]:
        if self.show:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("materialize {task.description}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._progress.start()
            self._task = self._progress.add_task("", total=None)
        return self.report

    def report(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _newer_only(
    txn: _Txn, layout: Layout, keys: list[bytes], values: list[bytes], max_event: int | None
) -> tuple[list[bytes], list[bytes]]:
    """Drop the incoming values that are not newer than the one online (by ts, created, seq)."""
    if max_event is None:
        return keys, values
    # Only values no later than the latest event online can lose to what is online.
    headers = layout.decode_headers(values)
    late = headers[:, 0] <= max_event
    if not late.any():  # the usual incremental sync: everything is newer than what is online
        return keys, values
    doubtful = list(compress(keys, late.tolist()))
    with txn.cursor() as cursor:
        existing = dict(cursor.getmulti(doubtful))
    if not existing:
        return keys, values
    present = np.fromiter((k in existing for k in keys), dtype=bool, count=len(keys))
    old = layout.decode_headers([existing[k] for k in compress(keys, present.tolist())])
    new = headers[present]
    newer = (new[:, 0] > old[:, 0]) | (
        (new[:, 0] == old[:, 0])
        & ((new[:, 1] > old[:, 1]) | ((new[:, 1] == old[:, 1]) & (new[:, 2] > old[:, 2])))
    )
    keep = np.ones(len(keys), dtype=bool)
    keep[np.flatnonzero(present)] = newer
    return (
        list(compress(keys, keep.tolist())),
        list(compress(values, keep.tolist())),
    )


def sync_view(
    txn: _Txn,
    offline: OfflineStore,
    view: FeatureView,
    end_us: int | None,
    report: Callable[[str], None],
) -> tuple[int, int, int | None]:
    current = offline.current_version(view.name)
    schema = offline.table_schema(view.name)
    if current is None or schema is None:
        return 0, 0, None
    state_key, layout_key = meta_key("state", view.name), meta_key("layout", view.name)
    raw_layout = txn.get(layout_key)
    old = None if raw_layout is None else Layout.from_json(raw_layout)
    view_id = old.view_id if old else _next_id(txn)
    layout = Layout.of(view_id, view, schema)
    raw_state = txn.get(state_key)
    state = _SyncState(None if raw_state is None else json.loads(raw_state))
    rebuild = must_rebuild(
        offline, view, view.name, old and old.signature, layout.signature, state, current, report
    )
    if rebuild:
        # New or changed layout, a table older than what was synced, or a delete that never
        # reached the online store: start over from the current table.
        delete_prefix(txn, layout.prefix)
        for prefix in extra_prefixes(raw_layout) if raw_layout else ():
            delete_prefix(txn, prefix)
        state = _SyncState(None)
        txn.put(layout_key, layout.json)
    pending = state.pending(view, current, end_us)
    read = written = 0
    latest_event = None
    if pending is not None:
        latest, read = _latest(offline, view, current, pending)
        if latest.height:
            latest_event = int(latest[view.timestamp_field].cast(pl.Int64).max())  # type: ignore[arg-type]
            report(f"{view.name}: writing {latest.height:,} entities")
            keys = layout.encode_keys(latest)
            values = layout.encode_values(latest, view)
            if not rebuild:
                keys, values = _newer_only(txn, layout, keys, values, state.max_event)
            with txn.cursor() as cursor:
                _, written = cursor.putmulti(zip(keys, values, strict=True))
    state.synced(current, end_us, latest_event)
    txn.put(state_key, state.to_json())
    return read, written, current


def must_rebuild(
    offline: OfflineStore,
    source: FeatureView,
    name: str,
    stored: object,
    signature: object,
    state: _SyncState,
    current: int,
    report: Callable[[str], None],
) -> bool:
    """Whether the sync of ``name`` (whose rows come from ``source``) must start over: no
    stored layout or a changed one (``stored`` vs ``signature``), a table older than what was
    synced, or a delete that may never have reached the online store."""
    if stored is None or stored != signature or current < state.version:
        return True
    if _unapplied_deletes(offline, source, state, current):
        report(f"{name}: repairing after an interrupted delete_entities")
        return True
    return False


def _unapplied_deletes(
    offline: OfflineStore, view: FeatureView, state: _SyncState, current: int
) -> bool:
    """Whether a delete commit up to ``current`` may not be reflected online."""
    deletes = offline.deletes_after(view.name, state.deletes_through)
    if deletes is None:  # the log was purged past what this state knows: cannot tell
        return True
    return any(v <= current and v not in state.deletes_applied for v in deletes)


def settle_deletes(txn: _Txn, offline: OfflineStore, view: FeatureView | AggregationView) -> None:
    """Before the Delta log is purged: record that every delete commit so far is reflected
    online (the next sync could not tell any more, and would rebuild), or, where one is not
    (an interrupted delete_entities), drop the view's online data, which still holds the
    deleted entities: the next materialize rebuilds it. An aggregation view's deletes are
    its source's."""
    source = view.source_view if isinstance(view, AggregationView) else view
    raw_state = txn.get(meta_key("state", view.name))
    current = offline.current_version(source.name)
    if raw_state is None or current is None:
        return
    state = _SyncState(json.loads(raw_state))
    if state.deletes_through >= current:
        return
    if _unapplied_deletes(offline, source, state, current):
        drop_view(txn, view.name)
        return
    state.deletes_through = current
    state.deletes_applied = [v for v in state.deletes_applied if v > current]
    txn.put(meta_key("state", view.name), state.to_json())


def delete_synced(
    txn: _Txn, view: FeatureView | AggregationView, keys: pl.DataFrame, version: int
) -> int:
    """Remove entities of a view deleted offline by table ``version``; returns how many were
    online. Records the delete as applied, so the next sync need not repair it."""
    raw = txn.get(meta_key("layout", view.name))
    raw_state = txn.get(meta_key("state", view.name))
    if raw is None or raw_state is None:
        return 0
    layout = Layout.from_json(raw)
    if list(layout.key_names) != list(view.join_keys):
        # Stored under other keys: drop all of the view's online data (materialize
        # rebuilds it) rather than risk keeping a deleted entity servable.
        drop_view(txn, view.name)
        return 0
    state = _SyncState(json.loads(raw_state))
    if state.deletes_through >= version:
        # A sync already rebuilt from a table holding this delete (and maybe rows written
        # since for the same entities): deleting now would remove those.
        return 0
    frame = cast_keys(keys.drop_nulls().unique(), layout, "delete_entities")
    extra = extra_prefixes(raw)
    removed = 0
    for k in layout.encode_keys(frame):
        gone = txn.delete(k)
        for prefix in extra:
            gone = txn.delete(prefix + k[4:]) or gone
        removed += gone
    state.deletes_applied.append(version)
    txn.put(meta_key("state", view.name), state.to_json())
    return removed


def drop_view(txn: _Txn, name: str) -> bool:
    """Remove a view's online values, layout and state; whether there were any."""
    raw = txn.get(meta_key("layout", name))
    if raw is None:
        return False
    for prefix in (Layout.from_json(raw).prefix, *extra_prefixes(raw)):
        delete_prefix(txn, prefix)
    txn.delete(meta_key("layout", name))
    txn.delete(meta_key("state", name))
    return True


def extra_prefixes(raw_layout: bytes) -> list[bytes]:
    """The other id prefixes a layout's entries live under, keyed like its values (the
    tails of an aggregation view, ``_windows``): they go with the view and its entities."""
    return [i.to_bytes(4, "big") for i in json.loads(raw_layout).get("extra_ids", [])]
