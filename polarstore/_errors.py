"""The error hierarchy: one base class, a few precise subclasses that are also builtins."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ConflictError",
    "NanosecondWarning",
    "NotFoundError",
    "PolarstoreError",
    "SchemaError",
    "StorageError",
    "ValidationError",
    "did_you_mean",
]


class PolarstoreError(Exception):
    """Base class of every error polarstore raises on purpose."""


class ValidationError(ValueError, PolarstoreError):
    """Input data or arguments do not have the expected shape, type or values."""


class SchemaError(ValueError, PolarstoreError):
    """A definition change or a dtype is incompatible with what is stored."""


class NotFoundError(KeyError, PolarstoreError):
    """A named entity, view, feature, service, dataset or version does not exist."""

    def __str__(self) -> str:
        # KeyError repr-quotes its message; show it as written.
        return str(self.args[0]) if self.args else ""


class ConflictError(PolarstoreError):
    """A concurrent operation made this one impossible to complete safely."""


class StorageError(OSError, PolarstoreError):
    """The file system failed (a full disk, no permission); what was being written is unchanged.

    Raised as ``StorageError(errno, message)``: ``errno`` is the system's, the text polarstore's.
    """

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


class NanosecondWarning(UserWarning):
    """Nanosecond input was truncated to microseconds, polarstore's time resolution."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A hint naming the closest candidates, or the full list when nothing is close."""
    options = sorted(set(candidates))
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
    if close:
        return f" Did you mean {' or '.join(repr(c) for c in close)}?"
    if not options:
        return " There are none defined yet."
    shown = ", ".join(repr(c) for c in options[:10])
    more = f" (and {len(options) - 10} more)" if len(options) > 10 else ""
    return f" Known: {shown}{more}."
