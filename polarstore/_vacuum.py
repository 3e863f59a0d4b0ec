"""``vacuum``: deleting the files old table versions needed, view by view, and the purge.

One view whose table cannot be vacuumed (a damaged log, say) does not stop the others: every
view is tried, and the failures are raised together at the end, with what was deleted.

The purge (``vacuum(retention=timedelta(0), force=True)``) is for the right to be forgotten:
after ``delete_entities``, the deleted values are still in the files old versions need (the
vacuum deletes those), in the Delta log's min/max statistics of every file ever written (the
purge leaves only a checkpoint of the current version), in the free pages of the LMDB file
(compacted), and in the spines of saved datasets, which can no longer be loaded once the log
of their versions is gone (removed, entries and files).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl

from polarstore._errors import PolarstoreError, ValidationError
from polarstore._offline import OfflineStore
from polarstore._registry import Registry, RegistryState
from polarstore._retrieval import EMPTY_VERSION

__all__ = ["vacuum_repository"]

# Commits that change no rows: a dataset pinned before them reads what the current version does.
_NO_DATA_CHANGE = ["vacuum start", "vacuum end"]


def vacuum_repository(store: Any, *, retention: timedelta, force: bool) -> dict[str, list[str]]:
    """``FeatureStore.vacuum``: validate, vacuum every view, purge on retention 0 + force."""
    if not isinstance(force, bool):
        msg = f"vacuum: force must be True or False, got {force!r}."
        raise ValidationError(msg)
    if not isinstance(retention, timedelta) or retention < timedelta(0):
        msg = f"vacuum: retention must be a timedelta of 0 or more, got {retention!r}."
        raise ValidationError(msg)
    if force and retention == timedelta(0) and store._offline.location is not None:
        msg = (  # refused before anything is vacuumed, not half-way
            f"vacuum(retention=timedelta(0), force=True) purges the Delta logs, which needs a "
            f"local repository, not {store._offline.root}; vacuum with a retention instead."
        )
        raise ValidationError(msg)
    state = store._state()
    pinned: dict[str, set[int]] = {}
    if not force:
        for entry in state.datasets.values():
            for name, version in entry["versions"].items():
                if version != EMPTY_VERSION:
                    pinned.setdefault(name, set()).add(version)
    # delta-rs counts whole hours: round up, so vacuum never removes more than asked.
    hours = math.ceil(retention / timedelta(hours=1))
    views = list(state.views)
    deleted = vacuum_views(store._offline, views, hours=hours, pinned=pinned)
    if force and retention == timedelta(0):
        online = store._online()
        synced = [*state.views.values(), *state.aggregations.values()]
        online.settle_deletes(store._offline, [v for v in synced if v.online])
        purge(store._offline, views, online, store._registry, store.path)
    return deleted


def vacuum_views(
    offline: OfflineStore,
    views: Sequence[str],
    *,
    hours: int,
    pinned: Mapping[str, set[int]],
) -> dict[str, list[str]]:
    """Vacuum each view; the files deleted per view, relative to the repository."""
    deleted: dict[str, list[str]] = {}
    failed: dict[str, PolarstoreError] = {}
    for name in views:
        try:
            deleted[name] = offline.vacuum(
                name, retention_hours=hours, keep_versions=sorted(pinned.get(name, ()))
            )
        except PolarstoreError as e:
            failed[name] = e
    if failed:
        problems = "; ".join(f"{name!r}: {e}" for name, e in failed.items())
        msg = (
            f"vacuum: {len(failed)} view(s) could not be vacuumed ({problems}). The other "
            f"views were: deleted {deleted}."
        )
        raise PolarstoreError(msg)
    return deleted


def purge(
    offline: OfflineStore, views: Sequence[str], online: Any, registry: Registry, root: Path
) -> None:
    """Leave only the current version of every view, anywhere in the repository."""
    failed: dict[str, PolarstoreError] = {}
    same_data: dict[str, tuple[int, int]] = {}  # view -> (first, last) versions of its data
    for name in views:
        try:
            history = offline.history(name)
            changes = history.filter(~pl.col("operation").is_in(_NO_DATA_CHANGE))
            if history.height:
                first = int(changes["version"].max()) if changes.height else 0  # type: ignore[arg-type]
                same_data[name] = (first, int(history["version"].max()))  # type: ignore[arg-type]
            offline.purge(name)
        except PolarstoreError as e:
            failed[name] = e
            same_data.pop(name, None)
    _repin_datasets(registry, root, same_data)
    online.compact()  # raises if another process has it open: the rest is done by then
    if failed:
        problems = "; ".join(f"{name!r}: {e}" for name, e in failed.items())
        msg = f"vacuum: the log of {len(failed)} view(s) could not be purged ({problems})."
        raise PolarstoreError(msg)


def _repin_datasets(
    registry: Registry, root: Path, same_data: Mapping[str, tuple[int, int]]
) -> None:
    """Datasets pinned to a version whose data is the current one (only vacuum committed
    since) are pinned to the current version; the others can no longer be loaded, and are
    removed with their spines (which hold the entity keys they were saved with)."""
    spines: list[str] = []

    def change(state: RegistryState) -> None:
        for name, entry in list(state.datasets.items()):
            pins = entry["versions"]
            for view, version in list(pins.items()):
                if version < 0 or view not in same_data:
                    continue
                first, last = same_data[view]
                if version < first:
                    spines.append(entry["spine"])
                    del state.datasets[name]
                    break
                pins[view] = last

    registry.update(change)
    for spine in spines:
        with contextlib.suppress(FileNotFoundError):
            (root / spine).unlink()
