"""Training sets larger than memory: the point-in-time join in time slices of the spine.

A plain ``get_historical_features(...).sink_parquet(path)`` streams the spine side, but Polars'
as-of join holds the right side — every view row in ``[min spine time - ttl, max spine time]``
— in memory. Here the spine is cut into slices of consecutive spine times; each slice's join
reads only the view rows of its own window (the files outside it are not opened, see
``OfflineStore.scan``), so memory is bounded by one slice's window, not by the views. Each
slice goes to a temporary Parquet part; the parts are then merged back into the input order
and streamed into the target file. Every slice reads the same pinned table versions, taken
once before the first: a write landing meanwhile changes nothing.

A view without a ttl needs every earlier row for every slice: there memory is bounded by the
rows before the slice's end, which is at most the view.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import polars as pl

from polarstore._frames import to_polars
from polarstore._retrieval import EMPTY_VERSION, resolve_features, service_named
from polarstore._storage import sink_parquet

__all__ = ["SLICE_ROWS", "sink_dataset", "sink_training_set"]

# Spine rows per slice. At 100M rows per view (a 10M spine, 4 slices) 2.5M gave 77 s and
# 5.1 GiB, 1M 112 s and 3.7 GiB, one query 74 s and 8.5 GiB (benchmarks/README.md): each
# slice re-reads the files its window (slice + ttl) touches.
SLICE_ROWS = 2_500_000
_ROW = "__polarstore_out_row"


def sink_training_set(
    store: Any,
    entity_df: Any,
    features: Any,
    output: str | os.PathLike[str],
    *,
    timestamp_field: str = "event_timestamp",
    full_feature_names: bool = False,
    as_of: Any = None,
    bitemporal: bool = False,
    slice_rows: int = SLICE_ROWS,
    what: str = "training set",
) -> str:
    """Write ``get_historical_features(entity_df, features, ...)`` to ``output`` in slices.

    The rows and their order are exactly those of ``get_historical_features``; returns where
    the file went.
    """
    spine = to_polars(entity_df, what=f"{what} entity_df")
    state = store._state()
    requested = resolve_features(
        state.views,
        service_named(features, state.services),
        full_feature_names=full_feature_names,
    )
    pins = store._pin(as_of, [r.view.name for r in requested])
    versions: dict[str, int] = {}
    for r in requested:
        name = r.view.name
        current = pins.get(name, store._offline.current_version(name))
        versions[name] = EMPTY_VERSION if current is None else current

    def join(frame: pl.DataFrame) -> pl.LazyFrame:
        return store.get_historical_features(  # type: ignore[no-any-return]
            frame,
            features,
            timestamp_field=timestamp_field,
            full_feature_names=full_feature_names,
            as_of=versions,
            bitemporal=bitemporal,
        )

    if spine.height <= slice_rows or timestamp_field not in spine.columns or _ROW in spine.columns:
        return sink_parquet(join(spine), output, what)  # one slice (or its error, as usual)
    parts = Path(tempfile.mkdtemp(prefix=".polarstore-slices-"))
    try:
        indexed = spine.with_row_index(_ROW).sort(timestamp_field, nulls_last=True)
        for k, start in enumerate(range(0, indexed.height, slice_rows)):
            piece = indexed.slice(start, slice_rows)
            join(piece).sink_parquet(parts / f"{k:06}.parquet")
            del piece
        del indexed
        merged = pl.scan_parquet(parts / "*.parquet").sort(_ROW).drop(_ROW)
        return sink_parquet(merged, output, what)
    finally:
        shutil.rmtree(parts, ignore_errors=True)


def sink_dataset(store: Any, name: str, output: str | os.PathLike[str]) -> str:
    """Rebuild saved dataset ``name`` into ``output``, slice by slice (``load_dataset``'s rows)."""
    from polarstore._datasets import read_spine

    datasets = store._state().datasets
    spine = read_spine(store._root, name, datasets)
    entry = datasets[name]
    return sink_training_set(
        store,
        spine,
        entry["features"],
        output,
        timestamp_field=entry["timestamp_field"],
        full_feature_names=entry["full_feature_names"],
        as_of=entry["versions"],
        bitemporal=entry.get("bitemporal", False),
        what=f"dataset {name!r}",
    )
