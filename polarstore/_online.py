"""The online store: the latest row per entity of each online view, in one LMDB environment.

Layout. One database: each view's entries live under a 4-byte id prefix, metadata under the
prefix 0: per view, its *layout* (id, key and feature dtypes the values were encoded with) and
its *sync state* (which Delta versions and event times are synced). A sync writes values and
state in one write transaction, so readers and crashes only ever see whole syncs. (Named LMDB
databases were tried: opening one needs a write transaction, or a read transaction whose handle
py-lmdb drops when it ends, so a reader would wait on a running sync.)

Keys. A single integer key is 8 bytes big-endian with the sign bit flipped (numeric order is
byte order, which keeps ``getmulti`` over sorted keys walking the B-tree forwards); a single
string key is ``b"s"`` + UTF-8 (LMDB refuses empty keys); compound keys concatenate the parts,
each string but the last prefixed with its 4-byte length, so no separator byte can collide.
Keys of 507 bytes or more (LMDB's limit less the prefix) are stored as 475 ``0xff`` bytes + a
32-byte BLAKE2b digest: exactly 507 bytes, a length no plain key has.

Values. A fixed-width record — event time, created time, write sequence (int64 µs / int64), one
validity byte per feature, then one slot per feature (the feature's own width; a 4-byte length
for strings, binaries and lists) — followed by the variable-width payloads. Fixed-width views
(the common all-numeric case) decode a whole batch with one ``numpy.frombuffer``; the single
lookup decodes with one ``struct.unpack_from``. List values are msgpack (msgspec). No pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from itertools import compress
from pathlib import Path
from typing import Any

import lmdb
import msgspec
import numpy as np
import polars as pl

from polarstore._definitions import (
    SEQ_COLUMN,
    FeatureService,
    FeatureView,
    dtype_from_str,
    dtype_to_str,
)
from polarstore._errors import PolarstoreError, SchemaError, ValidationError
from polarstore._frames import entity_frame, key_dtype
from polarstore._offline import OfflineStore, seq_floor
from polarstore._retrieval import Requested, resolve_features, service_named
from polarstore._time import to_utc

__all__ = ["OnlineStore"]

_META = b"\x00\x00\x00\x00"
_NEXT_ID = _META + b"next_id"
_INITIAL_MAP_SIZE = 1 << 30  # virtual address space only; the file grows as pages are used
_MAX_KEY = 511 - len(_META)
_HASHED_PREFIX = b"\xff" * (_MAX_KEY - 32)
_SIGN = np.uint64(1 << 63)
_OFFSET = 1 << 63
_NO_CREATED = -(1 << 63)
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH = datetime(1970, 1, 1)
_EPOCH_DATE = date(1970, 1, 1)
_US = timedelta(microseconds=1)
_HEADER = ("ts", "created", "seq")
_PROGRESS_ROWS = 1_000_000

# numpy dtype, struct code and physical Polars dtype of each fixed-width feature dtype.
_FIXED: dict[str, tuple[str, str, pl.DataType]] = {
    "Boolean": ("u1", "B", pl.UInt8()),
    "Int8": ("i1", "b", pl.Int8()),
    "Int16": ("<i2", "h", pl.Int16()),
    "Int32": ("<i4", "i", pl.Int32()),
    "Int64": ("<i8", "q", pl.Int64()),
    "Float32": ("<f4", "f", pl.Float32()),
    "Float64": ("<f8", "d", pl.Float64()),
    "Date": ("<i4", "i", pl.Int32()),
    "Datetime(us)": ("<i8", "q", pl.Int64()),
    "Datetime(us, UTC)": ("<i8", "q", pl.Int64()),
}

# py-lmdb's stubs type values as ``bytes | memoryview``; transactions here never use buffers=True,
# so values are bytes.
_Txn = Any

_generation = 0
# LMDB forbids opening one environment twice in a process (py-lmdb refuses to), so every
# OnlineStore on a folder shares one: folder -> (environment, ids of the stores using it).
# The last store to close it closes it.
_SHARED: dict[str, tuple[lmdb.Environment, set[int]]] = {}
_SHARED_LOCK = threading.Lock()


def _acquire(path: Path, owner: object) -> lmdb.Environment:
    with _SHARED_LOCK:
        shared = _SHARED.get(os.path.realpath(path))
        if shared is None:
            path.mkdir(parents=True, exist_ok=True)
            env = lmdb.open(
                str(path), map_size=_INITIAL_MAP_SIZE, max_readers=1024, readahead=False
            )
            shared = _SHARED[os.path.realpath(path)] = (env, set())
        shared[1].add(id(owner))
        return shared[0]


def _release(path: Path, owner: object) -> None:
    with _SHARED_LOCK:
        shared = _SHARED.get(os.path.realpath(path))
        if shared is not None:
            shared[1].discard(id(owner))
            if not shared[1]:
                del _SHARED[os.path.realpath(path)]
                shared[0].close()


def _forked() -> None:
    global _generation, _SHARED_LOCK
    _generation += 1
    _SHARED_LOCK = threading.Lock()  # another thread may have held it at the fork
    # The inherited environments must be closed before the child can open its own. That is
    # safe when no other thread of the parent was inside a lookup at the fork: mdb_env_close
    # clears only the reader slots of the child's pid (the parent's slots and locks stay).
    for env, _ in _SHARED.values():
        with contextlib.suppress(lmdb.Error):
            env.close()
    _SHARED.clear()


# An LMDB environment must not be used in a child after fork(): reopen there.
os.register_at_fork(after_in_child=_forked)


# --- encoding -------------------------------------------------------------------------------


def _physical(dtype: pl.DataType) -> pl.DataType:
    """The dtype list values are msgpack-encoded as (temporal types as integers)."""
    if isinstance(dtype, pl.List):
        return pl.List(_physical(dtype.inner))  # type: ignore[arg-type]
    if isinstance(dtype, pl.Datetime):
        return pl.Int64()
    if isinstance(dtype, pl.Date):
        return pl.Int32()
    return dtype


def _python_converter(text: str) -> Callable[[Any], Any] | None:
    if text == "Boolean":
        return bool
    if text == "Date":
        return lambda days: _EPOCH_DATE + timedelta(days=days)
    if text == "Datetime(us, UTC)":
        return lambda us: _EPOCH_UTC + timedelta(microseconds=us)
    if text == "Datetime(us)":
        return lambda us: _EPOCH + timedelta(microseconds=us)
    if text in ("String", "Binary") or text.startswith("List("):
        return None  # decoded from the payload by Layout.decode_one
    return None


class Layout:
    """How one view's keys and values are encoded; stored with the values it describes."""

    def __init__(
        self, view_id: int, keys: Sequence[tuple[str, str]], features: Sequence[tuple[str, str]]
    ) -> None:
        self.view_id = view_id
        self.prefix = view_id.to_bytes(4, "big")
        self.keys = tuple((k, t) for k, t in keys)
        self.features = tuple((f, t) for f, t in features)
        self.key_names = tuple(k for k, _ in self.keys)
        self.names = tuple(f for f, _ in self.features)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.dtypes = {f: dtype_from_str(t) for f, t in self.features}
        self.var = tuple(i for i, (_, t) in enumerate(self.features) if t not in _FIXED)
        fields = [("ts", "<i8"), ("created", "<i8"), ("seq", "<i8")]
        fields += [(f"v{i}", "u1") for i in range(len(self.features))]
        codes = "<qqq" + "B" * len(self.features)
        for i, (_, t) in enumerate(self.features):
            np_code, code, _ = _FIXED.get(t, ("<u4", "I", pl.UInt32()))
            fields.append((f"f{i}", np_code))
            codes += code
        self.record = np.dtype(fields)
        self.width = self.record.itemsize
        self.struct = struct.Struct(codes)
        self.converters = [_python_converter(t) for _, t in self.features]
        self.list_decoders = {
            i: msgspec.msgpack.Decoder()
            for i, (_, t) in enumerate(self.features)
            if t.startswith("List(")
        }
        self.signature = json.dumps({"keys": self.keys, "features": self.features})
        doc = {"id": view_id, "keys": self.keys, "features": self.features}
        self.json = json.dumps(doc).encode()

    @classmethod
    def of(cls, view_id: int, view: FeatureView, schema: Mapping[str, pl.DataType]) -> Layout:
        keys = [
            (k, dtype_to_str(key_dtype(schema[k], where=view.name, column=k)))
            for k in view.join_keys
        ]
        return cls(view_id, keys, [(f, dtype_to_str(t)) for f, t in view.schema.items()])

    @classmethod
    def from_json(cls, raw: bytes) -> Layout:
        doc = json.loads(raw)
        keys = [tuple(k) for k in doc["keys"]]
        return cls(doc["id"], keys, [tuple(f) for f in doc["features"]])

    # --- keys ------------------------------------------------------------------------------

    def encode_keys(self, frame: pl.DataFrame) -> list[bytes]:
        """Keys of a frame of join-key columns, none null, already cast to the key dtypes."""
        prefix = self.prefix
        if self.keys == ((self.keys[0][0], "Int64"),):
            records = np.empty(frame.height, dtype=[("prefix", "V4"), ("key", ">u8")])
            records["prefix"] = prefix
            records["key"] = frame[self.keys[0][0]].to_numpy().view(np.uint64) ^ _SIGN
            return np.frombuffer(records.tobytes(), dtype="V12").tolist()
        parts: list[list[bytes]] = []
        last = len(self.keys) - 1
        for i, (name, kind) in enumerate(self.keys):
            column = frame[name]
            if kind == "Int64":
                flipped = (column.to_numpy().view(np.uint64) ^ _SIGN).astype(">u8")
                parts.append(np.frombuffer(flipped.tobytes(), dtype="V8").tolist())
            elif last == 0:
                return [prefix + _limit_one(b"s" + b) for b in column.cast(pl.Binary).to_list()]
            elif i < last:
                parts.append([len(b).to_bytes(4, "big") + b for b in column.cast(pl.Binary)])
            else:
                parts.append(column.cast(pl.Binary).to_list())
        return [prefix + _limit_one(b"".join(p)) for p in zip(*parts, strict=True)]

    def key_encoder(self, where: str) -> Callable[[Mapping[str, Any]], bytes | None]:
        """Key of one entity dict (None when a key is null): the lean request-time path."""
        kinds = self.keys
        prefix = self.prefix

        def part(name: str, kind: str, value: Any) -> bytes:
            if kind == "Int64":
                if isinstance(value, bool) or not isinstance(value, int):
                    value = _as_int(value, name, where)
                try:
                    return (value + _OFFSET).to_bytes(8, "big")
                except OverflowError:
                    msg = f"{where}: join key {name!r} = {value} is outside the Int64 range."
                    raise ValidationError(msg) from None
            if not isinstance(value, str):
                msg = f"{where}: join key {name!r} must be a string, got {value!r}."
                raise ValidationError(msg)
            return value.encode()

        if len(kinds) == 1 and kinds[0][1] == "Int64":
            name = kinds[0][0]

            def single_int(entity: Mapping[str, Any]) -> bytes | None:
                try:
                    value = entity[name]
                    if type(value) is int and -_OFFSET <= value < _OFFSET:
                        return prefix + (value + _OFFSET).to_bytes(8, "big")
                except KeyError:
                    _key_value(entity, name, where)
                return None if value is None else prefix + part(name, "Int64", value)

            return single_int

        if len(kinds) == 1:
            (name, kind) = kinds[0]

            def single(entity: Mapping[str, Any]) -> bytes | None:
                value = _key_value(entity, name, where)
                if value is None:
                    return None
                raw = part(name, kind, value)
                return prefix + (raw if kind == "Int64" else _limit_one(b"s" + raw))

            return single

        def compound(entity: Mapping[str, Any]) -> bytes | None:
            out = []
            for i, (name, kind) in enumerate(kinds):
                value = _key_value(entity, name, where)
                if value is None:
                    return None
                raw = part(name, kind, value)
                if kind != "Int64" and i < len(kinds) - 1:
                    raw = len(raw).to_bytes(4, "big") + raw
                out.append(raw)
            return prefix + _limit_one(b"".join(out))

        return compound

    # --- values ----------------------------------------------------------------------------

    def encode_values(self, frame: pl.DataFrame, view: FeatureView) -> list[bytes]:
        records = np.zeros(frame.height, dtype=self.record)
        records["ts"] = frame[view.timestamp_field].cast(pl.Int64).to_numpy()
        if view.created_timestamp_field:
            created = frame[view.created_timestamp_field].cast(pl.Int64).fill_null(_NO_CREATED)
            records["created"] = created.to_numpy()
        else:
            records["created"] = _NO_CREATED
        records["seq"] = frame[SEQ_COLUMN].to_numpy()
        payloads: list[list[bytes]] = []
        for i, (name, text) in enumerate(self.features):
            column = (
                frame[name] if name in frame.columns else pl.Series(name, [None] * frame.height)
            )
            records[f"v{i}"] = column.is_not_null().to_numpy()
            if text in _FIXED:
                physical = _FIXED[text][2]
                records[f"f{i}"] = column.cast(physical).fill_null(0).to_numpy()
                continue
            if text in ("String", "Binary"):
                payload = [b or b"" for b in column.cast(pl.Binary).to_list()]
            else:
                physical_list = column.cast(_physical(self.dtypes[name])).to_list()
                payload = [b"" if v is None else msgspec.msgpack.encode(v) for v in physical_list]
            records[f"f{i}"] = [len(b) for b in payload]
            payloads.append(payload)
        fixed = records.tobytes()
        if not payloads:
            return np.frombuffer(fixed, dtype=f"V{self.width}").tolist()
        width = self.width
        return [
            fixed[j * width : (j + 1) * width] + b"".join(row)
            for j, row in enumerate(zip(*payloads, strict=True))
        ]

    def decode_headers(self, values: Sequence[bytes]) -> np.ndarray:
        """(ts, created, seq) of each value, as an (n, 3) int64 array."""
        if not self.var:
            records = np.frombuffer(b"".join(values), dtype=self.record)
        else:
            records = np.frombuffer(b"".join(v[: self.width] for v in values), dtype=self.record)
        return np.column_stack([records["ts"], records["created"], records["seq"]])

    def decode_values(self, values: Sequence[bytes]) -> tuple[np.ndarray, dict[int, list[Any]]]:
        """Fixed records of a batch, and the payloads of its variable-width features."""
        if not self.var:
            return np.frombuffer(b"".join(values), dtype=self.record), {}
        width = self.width
        records = np.frombuffer(b"".join(v[:width] for v in values), dtype=self.record)
        lengths = [records[f"f{i}"].tolist() for i in self.var]
        payloads: dict[int, list[Any]] = {i: [] for i in self.var}
        for j, value in enumerate(values):
            offset = width
            for i, sizes in zip(self.var, lengths, strict=True):
                end = offset + sizes[j]
                payloads[i].append(value[offset:end])
                offset = end
        return records, payloads

    def column(
        self, i: int, records: np.ndarray, payloads: dict[int, list[Any]], declared: pl.DataType
    ) -> pl.Series:
        """Feature ``i`` of decoded records as a Series of the declared dtype (nulls unset)."""
        name, text = self.features[i]
        if text in _FIXED:
            series = pl.Series(name, np.ascontiguousarray(records[f"f{i}"]))
            if text == "Boolean":
                series = series.cast(pl.Boolean)
        elif text == "String":
            series = pl.Series(name, payloads[i], dtype=pl.Binary).cast(pl.String)
        elif text == "Binary":
            series = pl.Series(name, payloads[i], dtype=pl.Binary)
        else:
            decode = self.list_decoders[i].decode
            raw = [decode(b) if b else None for b in payloads[i]]
            series = pl.Series(name, raw, dtype=_physical(self.dtypes[name]))
        return series.cast(declared)

    def decode_one(self, value: bytes) -> list[Any]:
        """Every feature of one value as Python objects (None for nulls)."""
        fields = self.struct.unpack_from(value)
        n = len(self.features)
        out: list[Any] = []
        offset = self.width
        for i in range(n):
            raw = fields[3 + n + i]
            if i in self.list_decoders or self.features[i][1] in ("String", "Binary"):
                payload = value[offset : offset + raw]
                offset += raw
                if not fields[3 + i]:
                    out.append(None)
                elif i in self.list_decoders:
                    series = pl.Series([self.list_decoders[i].decode(payload)])
                    out.append(series.cast(self.dtypes[self.names[i]]).to_list()[0])
                elif self.features[i][1] == "String":
                    out.append(bytes(payload).decode())
                else:
                    out.append(bytes(payload))
                continue
            convert = self.converters[i]
            out.append(None if not fields[3 + i] else raw if convert is None else convert(raw))
        return out


def _limit_one(key: bytes) -> bytes:
    if len(key) < _MAX_KEY:
        return key
    return _HASHED_PREFIX + hashlib.blake2b(key, digest_size=32).digest()


def _key_value(entity: Mapping[str, Any], name: str, where: str) -> Any:
    try:
        return entity[name]
    except KeyError:
        msg = f"{where}: missing join key {name!r}; got {sorted(entity)}."
        raise ValidationError(msg) from None


def _as_int(value: Any, name: str, where: str) -> int:
    if not isinstance(value, bool) and hasattr(value, "__index__"):
        return int(value.__index__())  # numpy integers
    msg = f"{where}: join key {name!r} must be an integer, got {value!r}."
    raise ValidationError(msg)


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


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH_UTC) // _US


# --- the store ------------------------------------------------------------------------------


def _meta_key(kind: str, view: str) -> bytes:
    return _META + f"{kind}/{view}".encode()


class _VectorView:
    """One view of a cached ``get_feature_vector`` plan; adopts the stored layout lazily."""

    def __init__(self, view: FeatureView, wanted: list[Requested]) -> None:
        self.view = view
        self.layout_key = _meta_key("layout", view.name)
        self.wanted = [(r.feature, r.output) for r in wanted]
        self.nulls = {output: None for _, output in self.wanted}
        self.layout_raw: bytes | None = None
        self.fetch: Callable[[_Txn, Mapping[str, Any], int, dict[str, Any]], None] = self._absent
        self.env: Any = None  # the environment and snapshot id the layout was last checked in
        self.snapshot = -1

    def check_layout(self, txn: _Txn, env: Any, snapshot: int) -> None:
        raw = txn.get(self.layout_key)
        if raw is None:
            self.layout_raw, self.fetch = None, self._absent
        elif raw != self.layout_raw:
            self.adopt(raw)
        self.env, self.snapshot = env, snapshot

    def _absent(self, txn: _Txn, entity: Mapping[str, Any], now_us: int, out: dict) -> None:
        _key_check(self.view, entity)
        out.update(self.nulls)

    def adopt(self, raw: bytes) -> None:
        """Compile the lookup for the layout the values were stored with."""
        layout = _stored_layout(raw, self.view, "get_feature_vector")
        self.layout_raw = raw
        encode = layout.key_encoder("get_feature_vector")
        nulls = self.nulls
        ttl = None if self.view.ttl is None else self.view.ttl // _US
        n = len(layout.features)
        wanted = [(output, layout.index.get(f)) for f, output in self.wanted]
        picks = [
            (output, 3 + i, 3 + n + i, layout.converters[i])
            for output, i in wanted
            if i is not None
        ]
        variable = any(i in layout.var for _, i in wanted if i is not None)
        picked = [(output, i) for output, i in wanted if i is not None]
        unpack = layout.struct.unpack_from

        def fetch(txn: _Txn, entity: Mapping[str, Any], now_us: int, out: dict) -> None:
            key = encode(entity)
            value = None if key is None else txn.get(key)
            if value is None:
                out.update(nulls)
                return
            fields = unpack(value)
            if ttl is not None and fields[0] < now_us - ttl:
                out.update(nulls)
                return
            if variable:
                decoded = layout.decode_one(value)
                out.update(nulls)
                for output, i in picked:
                    out[output] = decoded[i]
                return
            if len(picks) != len(nulls):
                out.update(nulls)  # features added after the last sync
            for output, valid, slot, convert in picks:
                x = fields[slot]
                out[output] = None if not fields[valid] else x if convert is None else convert(x)

        self.fetch = fetch


class OnlineStore:
    """The LMDB environment of one repository, opened lazily and reopened after ``fork()``.

    One ``OnlineStore`` may be shared by threads: lookups each use their own read transaction,
    and syncs and deletes are serialised by a lock (and, across processes, by LMDB's writer lock).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._env: lmdb.Environment | None = None
        self._generation = _generation
        self._lock = threading.RLock()
        self._plans: dict[Any, list[_VectorView]] = {}
        self._plans_state: Any = None
        self._plans_checked = 0.0

    def __repr__(self) -> str:
        return f"OnlineStore({str(self.path)!r})"

    # --- environment -----------------------------------------------------------------------

    def _environment(self, *, create: bool) -> lmdb.Environment | None:
        if self._generation != _generation:
            # Inherited from the parent process (and closed by _forked): open our own.
            self._env, self._plans = None, {}
            self._lock = threading.RLock()  # another thread may have held it at the fork
            self._generation = _generation
        if self._env is None:
            if not create and not (self.path / "data.mdb").exists():
                return None
            with self._lock:
                if self._env is None:
                    try:
                        self._env = _acquire(self.path, self)
                    except (lmdb.Error, OSError) as e:
                        msg = f"cannot open the online store at {self.path}: {e}"
                        raise PolarstoreError(msg) from e
        return self._env

    @contextmanager
    def _read(self) -> Iterator[_Txn | None]:
        env = self._environment(create=False)
        if env is None:
            yield None
            return
        try:
            txn = env.begin()
        except lmdb.MapResizedError:
            env.set_mapsize(0)  # another process grew the map: adopt its size
            txn = env.begin()
        try:
            yield txn
        finally:
            txn.abort()

    def close(self) -> None:
        with self._lock:
            if self._env is not None and self._generation == _generation:
                _release(self.path, self)
            self._env, self._plans = None, {}

    def state(self, view: str) -> dict[str, Any]:
        """The view's sync state: version, end and time of the last sync ({} if never)."""
        with self._read() as txn:
            raw = None if txn is None else txn.get(_meta_key("state", view))
        return {} if raw is None else json.loads(raw)

    # --- materialize -----------------------------------------------------------------------

    def materialize(
        self,
        offline: OfflineStore,
        views: Sequence[FeatureView],
        *,
        end: datetime | None,
        progress: bool | None,
    ) -> dict[str, dict[str, Any]]:
        """Sync every view in one write transaction; retried with a larger map when full."""
        end_us = None if end is None else _micros(end)
        env = self._environment(create=True)
        assert env is not None
        if progress is None:
            progress = sys.stderr.isatty() and (
                sum(offline.row_count(v) for v in views) >= _PROGRESS_ROWS
            )
        with self._lock:
            while True:
                try:
                    return self._materialize(env, offline, views, end_us, progress)
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)

    def _materialize(
        self,
        env: lmdb.Environment,
        offline: OfflineStore,
        views: Sequence[FeatureView],
        end_us: int | None,
        show: bool,
    ) -> dict[str, dict[str, Any]]:
        summary: dict[str, dict[str, Any]] = {}
        # The write transaction is taken first: it is also the lock that serialises syncs
        # from several processes, so each one reads the state the previous one committed.
        with env.begin(write=True) as txn, _Progress(show) as report:
            for view in views:
                started = time.perf_counter()
                report(f"{view.name}: reading new rows")
                read, written, version = self._sync(txn, offline, view, end_us, report)
                summary[view.name] = {
                    "rows_read": read,
                    "entities_written": written,
                    "version": version,
                    "seconds": round(time.perf_counter() - started, 3),
                }
                report(f"{view.name}: {read:,} rows read, {written:,} entities written")
        return summary

    def _sync(
        self,
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
        state_key, layout_key = _meta_key("state", view.name), _meta_key("layout", view.name)
        raw_layout = txn.get(layout_key)
        old = None if raw_layout is None else Layout.from_json(raw_layout)
        view_id = old.view_id if old else _next_id(txn)
        layout = Layout.of(view_id, view, schema)
        raw_state = txn.get(state_key)
        state = _SyncState(None if raw_state is None else json.loads(raw_state))
        rebuild = old is None or old.signature != layout.signature or current < state.version
        if rebuild:
            # New or changed layout, or a table older than what was synced: start over.
            _delete_prefix(txn, layout.prefix)
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
        state.advance(current, end_us)
        if latest_event is not None:
            known = state.max_event
            state.max_event = latest_event if known is None else max(known, latest_event)
        txn.put(state_key, state.to_json())
        return read, written, current

    # --- deletes ---------------------------------------------------------------------------

    def delete(self, view: FeatureView, keys: pl.DataFrame) -> int:
        """Remove entities of a view; returns how many were online."""
        env = self._environment(create=False)
        if env is None:
            return 0
        with self._lock, env.begin(write=True) as txn:
            raw = txn.get(_meta_key("layout", view.name))
            if raw is None:
                return 0
            layout = Layout.from_json(raw)
            if list(layout.key_names) != list(view.join_keys):
                # Stored under other keys: drop all of the view's online data (materialize
                # rebuilds it) rather than risk keeping a deleted entity servable.
                _delete_prefix(txn, layout.prefix)
                txn.delete(_meta_key("layout", view.name))
                txn.delete(_meta_key("state", view.name))
                return 0
            frame = _cast_keys(keys.drop_nulls().unique(), layout, "delete_entities")
            return sum(txn.delete(k) for k in layout.encode_keys(frame))

    # --- lookups ---------------------------------------------------------------------------

    def lookup(
        self, entity_rows: Any, requested: Sequence[Requested], now: datetime
    ) -> pl.DataFrame:
        """Features for a batch of entities, from one read transaction."""
        where = "get_online_features"
        by_view: dict[str, list[Requested]] = {}
        join_keys: list[str] = []
        for r in requested:
            by_view.setdefault(r.view.name, []).append(r)
            join_keys += [k for k in r.view.join_keys if k not in join_keys]
        frame = entity_frame(entity_rows, join_keys, where=where)
        now_us = _micros(now)
        columns: dict[str, pl.Series] = {}
        with self._read() as txn:
            for wanted in by_view.values():
                view = wanted[0].view
                raw = None if txn is None else txn.get(_meta_key("layout", view.name))
                if txn is None or raw is None:
                    for r in wanted:
                        columns[r.output] = pl.Series(r.output, [None] * frame.height)
                    continue
                layout = _stored_layout(raw, view, where)
                columns.update(_lookup_view(txn, layout, frame, wanted, now_us, where))
        return frame.with_columns(
            columns[r.output].cast(r.view.schema[r.feature]).alias(r.output) for r in requested
        )

    def vector(
        self,
        store: Any,
        entity: Mapping[str, Any],
        features: Any,
        *,
        full_feature_names: bool,
        now: datetime | None,
    ) -> dict[str, Any]:
        """One entity's features as a dict, with the resolved plan cached per request shape."""
        if type(entity) is not dict and not isinstance(entity, Mapping):
            msg = f"get_feature_vector: entity must be a dict of join keys, got {entity!r}."
            raise ValidationError(msg)
        plan = self._plan(store, features, full_feature_names)
        now_us = time.time_ns() // 1000 if now is None else _micros(to_utc(now, what="now"))
        out: dict[str, Any] = {}
        env = self._env if self._generation == _generation else None
        if env is None:
            env = self._environment(create=False)
            if env is None:
                for part in plan:
                    part._absent(None, entity, now_us, out)
                return out
        try:
            txn = env.begin()
        except lmdb.MapResizedError:
            env.set_mapsize(0)
            txn = env.begin()
        try:
            snapshot = txn.id()
            for part in plan:
                # Layouts change only in a sync, which also moves the snapshot id: re-read the
                # layout once per snapshot, not on every call.
                if part.snapshot != snapshot or part.env is not env:
                    part.check_layout(txn, env, snapshot)
                part.fetch(txn, entity, now_us, out)
        finally:
            txn.abort()
        return out

    def _plan(self, store: Any, features: Any, full_feature_names: bool) -> list[_VectorView]:
        clock = time.monotonic()
        cached = store._registry._cache  # None right after an apply() by this process
        stale = cached is None or cached[2] is not self._plans_state
        if stale or clock - self._plans_checked > 1.0:
            # Re-reading the registry costs a stat(); once a second is enough to see re-applies
            # by other processes (this process's own apply() resets the registry's cache).
            state = store._state()
            if state is not self._plans_state:
                self._plans, self._plans_state = {}, state
            self._plans_checked = clock
        try:
            cache_key: Any = (_hashable(features), full_feature_names)
            plan = self._plans.get(cache_key)
        except TypeError:
            cache_key, plan = None, None
        if plan is None:
            state = store._state()
            requested = resolve_features(
                state.views,
                service_named(features, state.services),
                full_feature_names=full_feature_names,
            )
            groups: dict[str, list[Requested]] = {}
            for r in requested:
                groups.setdefault(r.view.name, []).append(r)
            plan = [_VectorView(rs[0].view, rs) for rs in groups.values()]
            if cache_key is not None:
                self._plans[cache_key] = plan
        return plan


_HEAD = struct.Struct("<q")


def _next_id(txn: _Txn) -> int:
    raw = txn.get(_NEXT_ID)
    view_id = 1 if raw is None else int(raw)
    txn.put(_NEXT_ID, str(view_id + 1).encode())
    return view_id


def _delete_prefix(txn: _Txn, prefix: bytes) -> None:
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


def _hashable(features: Any) -> Any:
    """A cache key for a features argument (plans are dropped whenever the registry changes)."""
    if type(features) is list:  # the hot path: a list of "view:feature" strings
        return tuple(features)
    if isinstance(features, FeatureService):  # its tags (a dict) make it unhashable as is
        features = ("service", features.name, *features.features)
    if isinstance(features, (list, tuple)):
        return tuple(("view", f.name) if isinstance(f, FeatureView) else f for f in features)
    hash(features)
    return features


def _stored_layout(raw: bytes, view: FeatureView, where: str) -> Layout:
    """The layout the online values of ``view`` were encoded with, if it still fits its keys."""
    layout = Layout.from_json(raw)
    if list(layout.key_names) != list(view.join_keys):
        msg = (
            f"{where}: the online data of {view.name!r} was materialized with join keys "
            f"{list(layout.key_names)}, but the registry now says {list(view.join_keys)}; "
            "run materialize() to rebuild it."
        )
        raise SchemaError(msg)
    return layout


def _key_check(view: FeatureView, entity: Mapping[str, Any]) -> None:
    for key in view.join_keys:
        _key_value(entity, key, "get_feature_vector")


def _cast_keys(frame: pl.DataFrame, layout: Layout, where: str) -> pl.DataFrame:
    casts = []
    for name, kind in layout.keys:
        got = key_dtype(frame.schema[name], where=where, column=name)
        if got != pl.Null and dtype_to_str(got) != kind:
            msg = f"{where}: join key {name!r} holds {kind} values, got {frame.schema[name]}."
            raise ValidationError(msg)
        casts.append(pl.col(name).cast(dtype_from_str(kind)))
    try:
        return frame.select(casts)
    except pl.exceptions.InvalidOperationError as e:  # e.g. a UInt64 key beyond Int64's range
        msg = f"{where}: join key values do not fit the stored key dtypes {dict(layout.keys)}: {e}"
        raise ValidationError(msg) from e


def _lookup_view(
    txn: _Txn,
    layout: Layout,
    frame: pl.DataFrame,
    wanted: Sequence[Requested],
    now_us: int,
    where: str,
) -> dict[str, pl.Series]:
    """One view's features for every row of ``frame``: each distinct key is read once."""
    keys = _cast_keys(frame, layout, where)
    names = list(layout.key_names)
    distinct = keys.drop_nulls().unique().sort(names)
    codes = keys.join(
        distinct.with_row_index("__code"), on=names, how="left", maintain_order="left"
    ).get_column("__code")
    encoded = layout.encode_keys(distinct)
    with txn.cursor() as cursor:
        found = cursor.getmulti(encoded)
    values = [v for _, v in found]
    if len(found) == len(encoded):
        positions = codes
    else:
        index = {k: i for i, (k, _) in enumerate(found)}
        slots = pl.Series([index.get(k) for k in encoded], dtype=pl.UInt32)
        positions = slots.gather(codes)
    if not values:
        return {r.output: pl.Series(r.output, [None] * frame.height) for r in wanted}
    records, payloads = layout.decode_values(values)
    live = np.ones(len(values), dtype=bool)
    ttl = wanted[0].view.ttl
    if ttl is not None:
        live = records["ts"] >= now_us - ttl // _US
    out: dict[str, pl.Series] = {}
    for r in wanted:
        i = layout.index.get(r.feature)
        if i is None:  # added to the view after the last sync
            out[r.output] = pl.Series(r.output, [None] * frame.height)
            continue
        column = layout.column(i, records, payloads, r.view.schema[r.feature])
        valid = pl.Series(live & records[f"v{i}"].astype(bool))
        column = pl.select(pl.when(valid).then(column)).to_series()
        out[r.output] = column.gather(positions).alias(r.output)
    return out


class _Progress:
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
