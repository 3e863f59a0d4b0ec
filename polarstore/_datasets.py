"""Saved training sets: the spine file under ``datasets/`` and the registry entry naming it.

The repository root is a local folder (a ``Path``) or an object-store ``Location``; there a
put of the finished file is atomic, so no temporary file is needed.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from pathlib import Path
from typing import Any

import polars as pl

from polarstore._errors import NotFoundError, PolarstoreError, ValidationError, did_you_mean
from polarstore._registry import ObjectRegistry, Registry, RegistryState
from polarstore._storage import Location

__all__ = ["read_spine", "store_dataset"]


def store_dataset(
    root: Path | Location,
    registry: Registry | ObjectRegistry,
    name: str,
    spine: pl.DataFrame,
    entry: dict[str, Any],
    *,
    overwrite: bool,
) -> None:
    """Write ``spine`` to a file of its own, then register ``entry`` (with ``"spine"`` added).

    Each save writes a new spine file named in its registry entry: a crash between the two
    writes leaves the previous dataset whole (its spine untouched), and the replaced spine is
    removed only once the new entry is in the registry.
    """
    if name in registry.load().datasets and not overwrite:
        raise _exists(name)
    relative = f"datasets/{name}-{uuid.uuid4().hex[:16]}.parquet"
    if isinstance(root, Location):
        _put_spine(root, relative, name, spine)
    else:
        spine_path = root / relative
        spine_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = spine_path.with_suffix(".tmp")
        try:
            spine.write_parquet(tmp)
        except (pl.exceptions.PolarsError, OSError) as e:
            tmp.unlink(missing_ok=True)
            msg = f"save_dataset {name!r}: the entity_df cannot be stored as Parquet: {e}"
            raise ValidationError(msg) from e
        os.replace(tmp, spine_path)
    entry = {**entry, "spine": relative}

    def register(state: RegistryState) -> dict[str, Any] | None:
        old = state.datasets.get(name)
        if old is not None and not overwrite:  # saved by someone else meanwhile
            raise _exists(name)
        state.datasets[name] = entry
        return old

    try:
        replaced = registry.update(register)
    except BaseException:
        _remove(root, relative)
        raise
    if replaced is not None and replaced["spine"] != relative:
        _remove(root, replaced["spine"])


def _put_spine(root: Location, relative: str, name: str, spine: pl.DataFrame) -> None:
    buffer = io.BytesIO()
    try:
        spine.write_parquet(buffer)
    except (pl.exceptions.PolarsError, OSError) as e:
        msg = f"save_dataset {name!r}: the entity_df cannot be stored as Parquet: {e}"
        raise ValidationError(msg) from e
    root.put(relative, buffer.getvalue(), expect=None)


def _remove(root: Path | Location, relative: str) -> None:
    with contextlib.suppress(OSError):
        if isinstance(root, Location):
            root.delete(relative)
        else:
            (root / relative).unlink(missing_ok=True)


def read_spine(
    root: Path | Location, name: str, datasets: dict[str, dict[str, Any]]
) -> pl.DataFrame:
    """The stored spine of dataset ``name``; NotFoundError if it or its file is missing."""
    if name not in datasets:
        msg = f"there is no dataset {name!r}." + did_you_mean(name, datasets)
        raise NotFoundError(msg)
    relative = datasets[name]["spine"]
    try:
        if isinstance(root, Location):
            got = root.get(relative)
            if got is None:
                raise FileNotFoundError(root.url(relative))
            return pl.read_parquet(io.BytesIO(got[0]))
        return pl.read_parquet(root / relative)
    except PolarstoreError:  # the object store failed: its own message says how
        raise
    except (pl.exceptions.PolarsError, OSError) as e:
        msg = (
            f"dataset {name!r}: its spine file {relative!r} cannot be read ({e}); "
            "save the dataset again."
        )
        raise NotFoundError(msg) from e


def _exists(name: str) -> ValidationError:
    return ValidationError(f"dataset {name!r} already exists; pass overwrite=True to replace it.")
