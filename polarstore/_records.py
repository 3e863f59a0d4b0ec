"""The record codec of the online store: how keys and values are laid out as bytes.

No LMDB here: this module turns frames and dicts into key and value bytes and back; the store
(``_online``) and the sync (``_sync``) move the bytes.

Keys. Each view's entries live under a 4-byte id prefix (metadata under the prefix 0). A single
integer key is 8 bytes big-endian with the sign bit flipped (numeric order is byte order, which
keeps ``getmulti`` over sorted keys walking the B-tree forwards); a single string key is
``b"s"`` + UTF-8 (LMDB refuses empty keys); compound keys concatenate the parts, each string but
the last prefixed with its 4-byte length, so no separator byte can collide. Keys of 507 bytes or
more (LMDB's limit less the prefix) are stored as 475 ``0xff`` bytes + a 32-byte BLAKE2b
digest: exactly 507 bytes, a length no plain key has.

Values. A fixed-width record — event time, created time, write sequence (int64 µs / int64), one
validity byte per feature, then one slot per feature (the feature's own width; a 4-byte length
for strings, binaries and lists) — followed by the variable-width payloads. Fixed-width views
(the common all-numeric case) decode a whole batch with one ``numpy.frombuffer``; the single
lookup decodes with one ``struct.unpack_from``. List values are msgpack (msgspec). No pickle.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, timedelta, timezone
from typing import Any

import msgspec
import numpy as np
import polars as pl

from polarstore._definitions import SEQ_COLUMN, FeatureView, dtype_from_str, dtype_to_str
from polarstore._errors import SchemaError, ValidationError
from polarstore._frames import key_dtype

__all__ = ["META", "Layout", "cast_keys", "key_check", "stored_layout"]

META = b"\x00\x00\x00\x00"
_MAX_KEY = 511 - len(META)
_HASHED_PREFIX = b"\xff" * (_MAX_KEY - 32)
_SIGN = np.uint64(1 << 63)
_OFFSET = 1 << 63
_NO_CREATED = -(1 << 63)
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH = datetime(1970, 1, 1)
_EPOCH_DATE = date(1970, 1, 1)


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

    def key_encoder(
        self, where: str, declared: Mapping[str, pl.DataType] | None = None
    ) -> Callable[[Mapping[str, Any]], bytes | None]:
        """Key of one entity dict (None when a key is null): the lean request-time path.

        ``declared``: the entities' key dtypes. An integer outside a narrower declared dtype
        is a ``ValidationError``, as in the batch lookup, not an entity that is never found.
        """
        kinds = self.keys
        prefix = self.prefix
        bounds = {
            name: (int(np.iinfo(str(dtype).lower()).min), int(np.iinfo(str(dtype).lower()).max))
            for name, dtype in (declared or {}).items()
            if dtype.is_integer() and dtype not in (pl.Int64, pl.UInt64)
        }

        def part(name: str, kind: str, value: Any) -> bytes:
            if kind == "Int64":
                if isinstance(value, bool) or not isinstance(value, int):
                    value = _as_int(value, name, where)
                if name in bounds and not bounds[name][0] <= value <= bounds[name][1]:
                    dtype = (declared or {})[name]
                    msg = f"{where}: join key {name!r} = {value} does not fit its dtype {dtype}."
                    raise ValidationError(msg)
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
            low, high = bounds.get(name, (-_OFFSET, _OFFSET - 1))

            def single_int(entity: Mapping[str, Any]) -> bytes | None:
                try:
                    value = entity[name]
                    if type(value) is int and low <= value <= high:
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


def stored_layout(raw: bytes, view: FeatureView, where: str) -> Layout:
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


def key_check(view: FeatureView, entity: Mapping[str, Any]) -> None:
    for key in view.join_keys:
        _key_value(entity, key, "get_feature_vector")


def cast_keys(frame: pl.DataFrame, layout: Layout, where: str) -> pl.DataFrame:
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
