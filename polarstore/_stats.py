"""Statistics that time-travel: a mergeable summary per data file, merged for any version.

Every Delta data file polarstore writes is immutable and named by a UUID, so a summary of the
rows of one file never goes stale; the statistics of a table version are the merge of the
summaries of the files live at that version (read from the Delta log). A write summarises its
batch (the one file it commits), ``delete_entities`` summarises the rows it keeps (one new
file), ``compact`` merges the summaries of the files it replaces (no data is read). A file with
no summary (written before statistics existed, or by a process killed between the commit and
the summary) is read and summarised once, on demand: only that file, never the whole history.

A feature's summary holds exact counts, moments (Chan's parallel mean / M2), min and max, a
HyperLogLog of 2^14 registers for distinct counts (Ertl's estimator: standard error 0.8%), for
strings and booleans the value counts (exact up to ``_TOP`` values), and for numbers and times
KLL quantile sketches (Apache DataSketches, ``k=800``) of at most ``_SAMPLE`` values drawn at
random from the batch. Sketches of batches small enough to be kept whole are merged as KLL
sketches; sampled ones stay separate parts, weighted by their true counts at query time.

Summaries are JSON (sketches as base64 of their own serialisation); every read and write of
them goes through ``read_summary`` / ``write_summary`` / ``prune_summaries``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasketches as ds
import numpy as np
import polars as pl

from polarstore._definitions import FeatureView, dtype_to_str
from polarstore._errors import PolarstoreError
from polarstore._offline import OfflineStore, data_files, read_files
from polarstore._registry import atomic_write_text

__all__ = [
    "QUANTILE_RANK_ERROR",
    "Summary",
    "after_compact",
    "prune_summaries",
    "read_summary",
    "record_rows",
    "statistics",
    "summarize",
    "summary_at",
    "write_summary",
]

_FORMAT = 1
_K = 800  # KLL: normalised rank error 0.35% (99% confidence) on what it is fed
_SAMPLE = 1 << 17  # values fed to KLL per batch: sampling error 0.45% (DKW, 99% confidence)
_P = 14  # HyperLogLog: 2^14 registers, relative standard error 1.04 / 2^7 = 0.8%
_Q = 64 - _P
_TOP = 1000  # categories counted exactly per summary; beyond them, an "other" count
_SHOWN = 10  # top_values listed by statistics()
_GRID = np.linspace(0.0, 1.0, 1001)
# The stated bound on the rank error of p25/p50/p75 (and of the CDFs drift compares):
# KLL's 0.35% plus the sampling's 0.45%, each at 99% confidence.
QUANTILE_RANK_ERROR = 0.008

_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_MASK = np.uint64((1 << _P) - 1)
_CHUNK = 1 << 15
_NAN = 0x7FF8000000000000  # the bits every NaN is hashed as


def _kind(dtype: pl.DataType) -> str:
    if dtype.is_numeric():
        return "numeric"
    if dtype.is_temporal():
        return "temporal"
    if dtype in (pl.String, pl.Boolean, pl.Categorical) or isinstance(dtype, pl.Enum):
        return "categorical"
    return "other"


# --- HyperLogLog ----------------------------------------------------------------------------


def _registers(values: np.ndarray, *, mix: bool = True) -> np.ndarray:
    """HyperLogLog registers of 64-bit ``values`` (hashed first unless ``mix`` is False).

    uint64 values are hashed as they are, float64 ones by their bits, -0.0 as 0.0 (one value).

    The hash is stable (Polars' own changes between versions): MurmurHash3's 64-bit
    finaliser, whose avalanche structured values need (a cheaper two-multiply hash
    overcounted quarter steps by 5% and powers of two by 7%). The low ``_P`` bits pick a
    register, which keeps the greatest rank (leading zeros + 1, capped at _Q + 1) of its
    hashes: the rank of the smallest one. So the passes over the values only compare
    integers, and ranks are taken once per register, not per value (the float conversion
    that gave them per value was half the time). Chunks that stay in the CPU cache make
    these memory-bound passes about twice as fast.
    """
    top = np.uint64(np.iinfo(np.uint64).max)  # also marks a register no hash reached
    lowest = np.full(1 << _P, top, dtype=np.uint64)
    for h, scratch in _hashed(values, mix):
        # Indices as int64 (the same bits, all below 2^_P): uint64 ones would be cast first.
        np.minimum.at(lowest, np.bitwise_and(h, _MASK, out=scratch).view(np.int64), h)
    rank = np.minimum(65 - _bit_length(lowest), _Q + 1).astype(np.uint8)
    rank[lowest == top] = 0
    # The hash 2^64 - 1 lands in the last register; it alone there reads as no hash at all.
    if lowest[-1] == top and any(bool((h == top).any()) for h, _ in _hashed(values, mix)):
        rank[-1] = 1
    return rank


def _hashed(values: np.ndarray, mix: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The hashes of ``values`` a cache-sized chunk at a time, each with a scratch buffer."""
    step = max(1, min(_CHUNK, values.size))
    h, scratch = np.empty(step, np.uint64), np.empty(step, np.uint64)
    for i in range(0, values.size, step):
        part = values[i : i + step]
        hh, tt = h[: part.size], scratch[: part.size]
        if values.dtype == np.float64:  # here, not in a copy of all the values: in the cache
            np.add(part, 0.0, out=hh.view(np.float64))
            part = hh
        if mix:  # MurmurHash3's fmix64
            np.bitwise_xor(part, np.right_shift(part, _S33, out=tt), out=hh)
            np.multiply(hh, _C1, out=hh)
            np.bitwise_xor(hh, np.right_shift(hh, _S33, out=tt), out=hh)
            np.multiply(hh, _C2, out=hh)
            np.bitwise_xor(hh, np.right_shift(hh, _S33, out=tt), out=hh)
        else:
            np.copyto(hh, part)
        yield hh, tt


def _bit_length(x: np.ndarray) -> np.ndarray:
    """``int.bit_length`` of each uint64, exactly: each 32-bit half is a float without rounding."""
    high = np.frexp(np.right_shift(x, np.uint64(32)).astype(np.float64))[1]
    low = np.frexp(np.bitwise_and(x, np.uint64(0xFFFFFFFF)).astype(np.float64))[1]
    return np.where(high > 0, high + 32, low).astype(np.int64)


def _string_hashes(values: Iterable[str]) -> np.ndarray:
    digests = b"".join(hashlib.blake2b(v.encode(), digest_size=8).digest() for v in values)
    return np.frombuffer(digests, dtype="<u8")


def _hll_estimate(registers: np.ndarray) -> float:
    """Ertl's improved raw estimator (arXiv:1702.01284): unbiased from 0 to 2^64, no tables."""
    m = registers.size
    counts = np.bincount(registers, minlength=_Q + 2).astype(np.float64)
    if counts[0] == m:
        return 0.0
    z = m * _tau(1.0 - counts[_Q + 1] / m)
    for k in range(_Q, 0, -1):
        z = 0.5 * (z + counts[k])
    z += m * _sigma(counts[0] / m)
    return float(m * m / (2.0 * math.log(2.0)) / z)


def _sigma(x: float) -> float:
    if x == 1.0:
        return math.inf
    y, z = 1.0, x
    while True:
        x *= x
        previous = z
        z += x * y
        y += y
        if z == previous:
            return z


def _tau(x: float) -> float:
    if x in (0.0, 1.0):
        return 0.0
    y, z = 1.0, 1.0 - x
    while True:
        x = math.sqrt(x)
        previous = z
        y *= 0.5
        z -= (1.0 - x) ** 2 * y
        if z == previous:
            return z / 3.0


# --- one feature's summary ------------------------------------------------------------------


@dataclass
class _Part:
    """A KLL sketch of a batch's values (or of a random sample of them) and their true count."""

    n: int
    sketch: ds.kll_doubles_sketch
    sampled: bool


@dataclass
class FeatureSummary:
    """What statistics and drift need of one feature, mergeable across files."""

    kind: str
    count: int = 0  # non-null values (NaN included)
    null_count: int = 0
    n: int = 0  # values in the moments, min/max and sketches (non-null, non-NaN)
    mean: float = 0.0
    m2: float = 0.0
    min: float | None = None
    max: float | None = None
    parts: list[_Part] = field(default_factory=list)
    registers: np.ndarray | None = None
    values: dict[str, int] = field(default_factory=dict)
    other: int = 0  # categorical values beyond the ones counted in ``values``

    def merge(self, b: FeatureSummary) -> FeatureSummary:
        out = FeatureSummary(self.kind, self.count + b.count, self.null_count + b.null_count)
        out.n = self.n + b.n
        if out.n:
            delta = b.mean - self.mean
            out.mean = self.mean + delta * b.n / out.n
            out.m2 = self.m2 + b.m2 + delta * delta * self.n * b.n / out.n
        out.min = _pick(min, self.min, b.min)
        out.max = _pick(max, self.max, b.max)
        whole = [p for p in (*self.parts, *b.parts) if not p.sampled]
        out.parts = [p for p in (*self.parts, *b.parts) if p.sampled]
        if whole:
            merged = ds.kll_doubles_sketch(_K)
            for p in whole:
                merged.merge(p.sketch)
            out.parts.append(_Part(sum(p.n for p in whole), merged, False))
        if self.registers is None or b.registers is None:
            out.registers = self.registers if b.registers is None else b.registers
        else:
            out.registers = np.maximum(self.registers, b.registers)
        values = dict(self.values)
        for k, c in b.values.items():
            values[k] = values.get(k, 0) + c
        out.other = self.other + b.other
        if len(values) > _TOP:
            kept = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
            out.other += sum(c for _, c in kept[_TOP:])
            values = dict(kept[:_TOP])
        out.values = values
        return out

    # --- derived figures ------------------------------------------------------------------

    def n_unique(self) -> int | None:
        if self.kind == "categorical" and self.other == 0:
            return len(self.values)
        if self.registers is None:
            return None
        return round(_hll_estimate(self.registers))

    def std(self) -> float | None:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else None

    def cdf(self, points: np.ndarray) -> np.ndarray:
        """P(X <= x) at each of the sorted, distinct ``points``, mixing the parts by count."""
        total = sum(p.n for p in self.parts)
        out = np.zeros(points.size)
        for p in self.parts:
            out += p.n / total * np.asarray(p.sketch.get_cdf(points.tolist(), True)[:-1])
        return out

    def candidates(self) -> np.ndarray:
        """Points where the mixed CDF is known within a part's rank error: each part's grid."""
        points = [np.asarray(p.sketch.get_quantiles(_GRID.tolist(), True)) for p in self.parts]
        return np.unique(np.concatenate(points)) if points else np.empty(0)

    def quantiles(self, ranks: Sequence[float]) -> list[float | None]:
        if not self.parts:
            return [None] * len(ranks)
        if len(self.parts) == 1:
            return [float(q) for q in self.parts[0].sketch.get_quantiles(list(ranks), True)]
        points = self.candidates()
        cdf = self.cdf(points)
        found = np.searchsorted(cdf, np.asarray(ranks) - 1e-12, side="left")
        return [float(points[min(i, points.size - 1)]) for i in found]

    # --- JSON -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "count": self.count, "null": self.null_count}
        if self.kind in ("numeric", "temporal"):
            doc |= {"n": self.n, "mean": self.mean, "m2": self.m2, "min": self.min}
            doc |= {"max": self.max}
            doc["parts"] = [[p.n, _b64(p.sketch.serialize()), p.sampled] for p in self.parts]
        if self.kind == "categorical":
            doc |= {"values": self.values, "other": self.other}
        if self.registers is not None:
            doc["hll"] = _b64(zlib.compress(self.registers.tobytes(), 1))
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> FeatureSummary:
        out = cls(doc["kind"], int(doc["count"]), int(doc["null"]))
        if out.kind in ("numeric", "temporal"):
            out.n, out.mean, out.m2 = int(doc["n"]), float(doc["mean"]), float(doc["m2"])
            out.min, out.max = doc["min"], doc["max"]
            out.parts = [
                _Part(int(n), ds.kll_doubles_sketch.deserialize(_unb64(s)), bool(sampled))
                for n, s, sampled in doc["parts"]
            ]
        if out.kind == "categorical":
            out.values, out.other = {str(k): int(c) for k, c in doc["values"].items()}, doc["other"]
        if "hll" in doc:
            raw = zlib.decompress(_unb64(doc["hll"]))
            out.registers = np.frombuffer(raw, dtype=np.uint8).copy()
        return out


def _pick(f: Callable[[float, float], float], a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else f(a, b)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def _summarize_column(column: pl.Series, kind: str) -> FeatureSummary:
    nulls = column.null_count()
    out = FeatureSummary(kind, column.len() - nulls, nulls)
    values = column.drop_nulls()
    if kind == "categorical":
        counts = values.cast(pl.String).value_counts(sort=True, name="n")
        keys, ns = counts[values.name].to_list(), counts["n"].to_list()
        out.values = dict(zip(keys[:_TOP], ns[:_TOP], strict=True))
        out.other = sum(ns[_TOP:])
        out.registers = _registers(_string_hashes(keys), mix=False)
        return out
    if kind == "other":
        return out
    nan = values.dtype.is_float() and bool(values.is_nan().any())
    if nan:  # counted, and one distinct value, but left out of moments and quantiles
        values = values.filter(values.is_not_nan())
    # The values as they are (no copy for a column of one chunk): int64 or float64 ones, whose
    # -0.0 is hashed as 0.0 by _registers and turned into it in the sketch's input below.
    if kind == "temporal" or values.dtype.is_integer() or values.dtype == pl.Boolean:
        raw = values.to_physical().cast(pl.Int64).to_numpy().view(np.uint64)
        real = raw.view(np.int64)
    else:
        raw = real = values.cast(pl.Float64).to_numpy()
    out.n = raw.size
    if out.n:
        as_float = values.to_physical().cast(pl.Float64)
        out.mean, out.m2 = float(as_float.mean()), float(as_float.var(ddof=0)) * out.n  # type: ignore[arg-type]
        out.min, out.max = float(as_float.min()), float(as_float.max())  # type: ignore[arg-type]
        sketch = ds.kll_doubles_sketch(_K)
        sampled = out.n > _SAMPLE
        # A sample iid with replacement (the DKW bound holds for it) of a large batch.
        pick = np.random.default_rng(out.n).integers(0, out.n, _SAMPLE) if sampled else None
        chosen = real if pick is None else real[pick]
        sketch.update(np.add(chosen, 0.0, dtype=np.float64))  # a float64 copy, -0.0 as 0.0
        out.parts = [_Part(out.n, sketch, sampled)]
    out.registers = _registers(raw)
    if nan:
        out.registers = np.maximum(out.registers, _registers(np.array([_NAN], np.uint64)))
    return out


# --- a summary of rows ----------------------------------------------------------------------


@dataclass
class Summary:
    """The summaries of every feature of some rows (a file, a set of files, a version)."""

    rows: int
    features: dict[str, FeatureSummary]

    def merge(self, b: Summary, view: FeatureView) -> Summary:
        out: dict[str, FeatureSummary] = {}
        for name, dtype in view.schema.items():
            kind = _kind(dtype)
            # A feature added after a file was written is null in every row of that file.
            x = self.features.get(name) or FeatureSummary(kind, 0, self.rows)
            y = b.features.get(name) or FeatureSummary(kind, 0, b.rows)
            out[name] = x.merge(y)
        return Summary(self.rows + b.rows, out)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "rows": self.rows,
            "features": {n: f.to_json() for n, f in self.features.items()},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Summary:
        features = {n: FeatureSummary.from_json(f) for n, f in doc["features"].items()}
        return cls(int(doc["rows"]), features)


def summarize(frame: pl.DataFrame, view: FeatureView) -> Summary:
    """Summaries of the features of ``frame`` (rows as stored: one file's, or any batch)."""
    return Summary(
        frame.height,
        {
            name: _summarize_column(
                frame[name] if name in frame.columns else pl.Series(name, [None] * frame.height),
                _kind(dtype),
            )
            for name, dtype in view.schema.items()
        },
    )


def _empty(view: FeatureView) -> Summary:
    return summarize(pl.DataFrame(schema=dict(view.schema)), view)


def _merged(summaries: Iterable[Summary], view: FeatureView) -> Summary:
    out = _empty(view)
    for s in summaries:
        out = out.merge(s, view)
    return out


# --- where summaries live -------------------------------------------------------------------


def _folder(offline: OfflineStore, view: str) -> Path:
    return Path(offline.root.removeprefix("file://"), ".polarstore", "stats", view)


def _file_name(path: str) -> str:
    return path.replace("/", "~") + ".json"


def _relative(view: str, path: str) -> str:
    return f".polarstore/stats/{view}/{_file_name(path)}"


def read_summary(offline: OfflineStore, view: str, path: str) -> dict[str, Any] | None:
    """The stored summary of data file ``path`` of ``view``, or None if there is none."""
    try:
        if offline.location is not None:  # an object store
            got = offline.location.get(_relative(view, path))
            if got is None:
                return None
            text = got[0].decode()
        else:
            text = (_folder(offline, view) / _file_name(path)).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        msg = f"view {view!r}: the statistics of data file {path!r} cannot be read: {e}"
        raise PolarstoreError(msg) from e
    try:
        doc = json.loads(text)
    except ValueError:
        return None  # damaged: summarised again from the file itself
    return doc if isinstance(doc, dict) and doc.get("format") == _FORMAT else None


def write_summary(offline: OfflineStore, view: str, path: str, doc: Mapping[str, Any]) -> None:
    """Store the summary of data file ``path`` of ``view`` (replacing any)."""
    text = json.dumps(doc, separators=(",", ":"))
    if offline.location is not None:
        offline.location.put(_relative(view, path), text.encode(), expect=True)
        return
    folder = _folder(offline, view)
    if not folder.parent.parent.is_dir():  # the repository was deleted meanwhile
        return
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / _file_name(path), text)


def prune_summaries(offline: OfflineStore, views: Iterable[FeatureView]) -> None:
    """Delete every summary but those of the current data files of each view.

    For the purge: summaries hold values (min, max, sketch samples, category names), so the
    summaries of files gone with deleted rows must go too. (Purges are local: see _vacuum.)
    """
    settle()
    for view in views:
        folder = _folder(offline, view.name)
        if not folder.is_dir():
            continue
        with contextlib.suppress(PolarstoreError):  # a damaged table: keep what it had
            wanted = {_file_name(f[0]) for f in data_files(offline, view)}
            for entry in folder.iterdir():
                if entry.name not in wanted:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()


# --- hooks of the writing verbs -------------------------------------------------------------


def record_rows(offline: OfflineStore, view: FeatureView) -> _Recorder:
    """A callback for ``OfflineStore.append``/``rewrite``: store the summary of the rows it
    committed.

    Given the rows before the commit (``start``, the ``on_sorted`` of an append), they are
    summarised at once on another thread while this one encodes and commits them: the commit
    keeps one core busy, the summary the other (started before the sort, it slowed the sort,
    which keeps every core busy). Else the callback summarises the rows it is given. The
    callback gets the version the rows were committed as and stores the summary on a
    background thread (``settle`` waits for it); their file is the one whose rows carry that
    version's write sequence (append), or the only file of the version (rewrite). A failure
    there loses nothing: the file is summarised from its own rows when statistics need it (so
    does another process that reads the statistics before the summary is stored).
    """
    return _Recorder(offline, view)


class _Recorder:
    def __init__(self, offline: OfflineStore, view: FeatureView) -> None:
        self.offline, self.view = offline, view
        self.early: list[Summary | BaseException] = []
        self.worker: threading.Thread | None = None

    def start(self, rows: pl.DataFrame) -> None:
        """Summarise ``rows`` (the ones about to be committed) on another thread, now."""

        def work() -> None:
            try:
                self.early.append(summarize(rows, self.view))
            except BaseException as e:  # kept for the callback, which falls back
                self.early.append(e)

        self.worker = threading.Thread(target=work, name="polarstore-statistics", daemon=True)
        self.worker.start()

    def __call__(self, version: int, committed: pl.DataFrame) -> None:
        # Stored after the write returns (the rows are committed and the file is immutable):
        # the write pays for the summary only where it overlaps the commit.
        _in_background(lambda: self._store(version, committed))

    def _store(self, version: int, committed: pl.DataFrame) -> None:
        offline, view = self.offline, self.view
        summary = None
        if self.worker is not None:
            self.worker.join()
            summary = self.early[0] if isinstance(self.early[0], Summary) else None
        # The rows are committed: no failure here may turn the write into an error (a retry
        # would write them twice). statistics() summarises the file again, and raises there.
        with contextlib.suppress(Exception):
            files = data_files(offline, view, version)
            ours = [f for f in files if f[2] is not None and f[2] >> 32 == version]
            if len(files) == 1:
                ours = files
            if len(ours) == 1 and ours[0][1] == committed.height:
                summary = summary or summarize(committed, view)
                write_summary(offline, view.name, ours[0][0], summary.to_json())


# Summaries still being stored by this process, oldest first. Each runs on its own non-daemon
# thread (the interpreter waits for them at exit; a thread pool would not survive a fork),
# after the one before it; every reader of summaries waits for them first (``settle``).
_PENDING: list[threading.Thread] = []
_PENDING_LOCK = threading.Lock()
_MAX_PENDING = 2  # bounds the batches held in memory when writes outpace their summaries


def _in_background(job: Callable[[], None]) -> None:
    with _PENDING_LOCK:
        _PENDING[:] = [t for t in _PENDING if t.is_alive()]
        before = _PENDING[-1] if _PENDING else None
        oldest = _PENDING[0] if len(_PENDING) >= _MAX_PENDING else None

        def run() -> None:
            if before is not None:
                before.join()
            job()

        thread = threading.Thread(target=run, name="polarstore-statistics")
        _PENDING.append(thread)
        thread.start()
    if oldest is not None:
        oldest.join()


def settle() -> None:
    """Wait until every summary this process started storing is stored."""
    with _PENDING_LOCK:
        pending = list(_PENDING)
    for thread in pending:
        thread.join()


def after_compact(offline: OfflineStore, view: FeatureView, version: int) -> None:
    """After ``compact`` committed ``version``: its file holds the rows of ``version - 1``,
    so its summary is the merge of theirs (no data is read). Failures are left to
    statistics(), as in ``record_rows``."""
    with contextlib.suppress(Exception):
        history = offline.history(view.name)
        op = history.filter(pl.col("version") == version)["operation"].to_list()
        files = data_files(offline, view, version)
        if op == ["compact"] and len(files) == 1 and version > 0:
            merged = summary_at(offline, view, version - 1)
            write_summary(offline, view.name, files[0][0], merged.to_json())


# --- reading --------------------------------------------------------------------------------


def summary_at(offline: OfflineStore, view: FeatureView, version: int | None) -> Summary:
    """The merged summary of the table at ``version`` (None: current; -1: no data)."""
    settle()
    if version == -1:
        return _empty(view)
    files = data_files(offline, view, version)
    found: list[Summary] = []
    missing: list[tuple[str, int, int | None]] = []
    for f in files:
        doc = read_summary(offline, view.name, f[0])
        if doc is None:
            missing.append(f)
        else:
            found.append(Summary.from_json(doc))
    for path, _, _ in missing:  # summarise each once, from its own rows
        summary = summarize(read_files(offline, view, [path], version), view)
        with contextlib.suppress(OSError, PolarstoreError):
            write_summary(offline, view.name, path, summary.to_json())
        found.append(summary)
    return _merged(found, view)


_COLUMNS: dict[str, pl.DataType] = {
    "feature": pl.String(),
    "dtype": pl.String(),
    "count": pl.Int64(),
    "null_count": pl.Int64(),
    "mean": pl.Float64(),
    "std": pl.Float64(),
    "min": pl.Float64(),
    "p25": pl.Float64(),
    "p50": pl.Float64(),
    "p75": pl.Float64(),
    "max": pl.Float64(),
    "n_unique": pl.Int64(),
    "top_values": pl.List(pl.Struct({"value": pl.String(), "count": pl.Int64()})),
}


def statistics_frame(summary: Summary, view: FeatureView) -> pl.DataFrame:
    """One row per feature of ``view``, the columns of ``FeatureStore.statistics``."""
    rows = []
    for name, dtype in view.schema.items():
        f = summary.features[name]
        numeric = f.kind == "numeric" and f.n > 0
        p25, p50, p75 = f.quantiles([0.25, 0.5, 0.75]) if numeric else (None, None, None)
        top = None
        if f.kind == "categorical":
            ranked = sorted(f.values.items(), key=lambda kv: (-kv[1], kv[0]))[:_SHOWN]
            top = [{"value": k, "count": c} for k, c in ranked]
        rows.append(
            {
                "feature": name,
                "dtype": dtype_to_str(dtype),
                "count": f.count,
                "null_count": f.null_count,
                "mean": f.mean if numeric else None,
                "std": f.std() if numeric else None,
                "min": f.min if numeric else None,
                "p25": p25,
                "p50": p50,
                "p75": p75,
                "max": f.max if numeric else None,
                "n_unique": f.n_unique(),
                "top_values": top,
            }
        )
    return pl.DataFrame(rows, schema=_COLUMNS)


def statistics(offline: OfflineStore, view: FeatureView, version: int | None) -> pl.DataFrame:
    """``FeatureStore.statistics`` of ``view`` at ``version`` (None: current; -1: no data)."""
    return statistics_frame(summary_at(offline, view, version), view)
