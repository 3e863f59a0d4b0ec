"""``vacuum``: deleting the files old table versions needed, view by view.

One view whose table cannot be vacuumed (a damaged log, say) does not stop the others: every
view is tried, and the failures are raised together at the end, with what was deleted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from polarstore._errors import PolarstoreError
from polarstore._offline import OfflineStore

__all__ = ["vacuum_views"]


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
