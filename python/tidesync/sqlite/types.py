"""How wire (Arrow) values are stored in SQLite, and back, column at a time.

SQLite has five storage classes; a mobile developer expects readable values in them:

=============  ======================  =============================================
logical type   Arrow wire type         SQLite storage
=============  ======================  =============================================
uuid           fixed_size_binary(16)   TEXT, canonical lowercase ``8-4-4-4-12``
text           utf8                    TEXT
int32, int64   int32, int64            INTEGER
float64        float64                 REAL
bool           bool                    INTEGER 0 / 1
date           date32                  TEXT ``YYYY-MM-DD``
timestamptz    timestamp[us, UTC]      TEXT ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC)
timestamp      timestamp[us]           TEXT ``YYYY-MM-DDTHH:MM:SS.ffffff``
bytes          binary                  BLOB
=============  ======================  =============================================

Sync always writes the canonical form (fixed width, so text order is time order, and
microseconds survive the round trip to PostgreSQL). Reading is lenient about what the
application wrote itself: uppercase uuids, ``YYYY-MM-DD HH:MM:SS`` (SQLite's
``CURRENT_TIMESTAMP``), milliseconds, ``Z`` or ``+00:00``; timestamps without a zone
in a timestamptz column are taken as UTC. Every conversion is vectorized (numpy over
the Arrow buffers, pyarrow.compute casts); only values outside the fast paths (say,
a ``+02:00`` offset) go through Python one by one.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tidesync.errors import SchemaMismatchError
from tidesync.registry import LogicalType

#: The SQLite storage class of each logical type (for DDL of bookkeeping tables and checks).
STORAGE: dict[LogicalType, str] = {
    LogicalType.UUID: "TEXT",
    LogicalType.TEXT: "TEXT",
    LogicalType.INT32: "INTEGER",
    LogicalType.INT64: "INTEGER",
    LogicalType.FLOAT64: "REAL",
    LogicalType.BOOL: "INTEGER",
    LogicalType.DATE: "TEXT",
    LogicalType.TIMESTAMPTZ: "TEXT",
    LogicalType.TIMESTAMP: "TEXT",
    LogicalType.BYTES: "BLOB",
}

#: Column affinities (https://sqlite.org/datatype3.html#type_affinity) a declared column
#: of each logical type may have. NUMERIC (any unknown type name) keeps ISO text as text.
ACCEPTED_AFFINITY: dict[LogicalType, frozenset[str]] = {
    LogicalType.UUID: frozenset({"TEXT", "NUMERIC", "BLOB"}),
    LogicalType.TEXT: frozenset({"TEXT", "NUMERIC", "BLOB"}),
    LogicalType.INT32: frozenset({"INTEGER", "NUMERIC", "REAL"}),
    LogicalType.INT64: frozenset({"INTEGER", "NUMERIC", "REAL"}),
    LogicalType.FLOAT64: frozenset({"REAL", "NUMERIC", "INTEGER"}),
    LogicalType.BOOL: frozenset({"INTEGER", "NUMERIC"}),
    LogicalType.DATE: frozenset({"TEXT", "NUMERIC", "BLOB"}),
    LogicalType.TIMESTAMPTZ: frozenset({"TEXT", "NUMERIC", "BLOB"}),
    LogicalType.TIMESTAMP: frozenset({"TEXT", "NUMERIC", "BLOB"}),
    LogicalType.BYTES: frozenset({"BLOB"}),
}


_STORAGE_ARROW = {"TEXT": pa.string(), "INTEGER": pa.int64(), "REAL": pa.float64(), "BLOB": pa.binary()}


def affinity(declared: str) -> str:
    """SQLite's column affinity for a declared type name (rules of section 3.1)."""
    t = declared.upper()
    if "INT" in t:
        return "INTEGER"
    if any(s in t for s in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if t == "" or "BLOB" in t:
        return "BLOB"
    if any(s in t for s in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_UNHEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _UNHEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _UNHEX[_c] = 10 + _i
# Positions of the 32 hex digits in the 36-character canonical form.
_HEX_POS = np.array([i for i in range(36) if i not in (8, 13, 18, 23)], dtype=np.intp)
_DASH_POS = np.array([8, 13, 18, 23], dtype=np.intp)
_NIL_UUID = "00000000-0000-0000-0000-000000000000"


def _flat(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    return arr


def _validity_buffer(arr: pa.Array) -> pa.Buffer | None:
    if arr.null_count == 0:
        return None
    valid = np.asarray(pc.is_valid(arr).to_numpy(zero_copy_only=False), dtype=bool)
    return pa.py_buffer(np.packbits(valid, bitorder="little"))


def uuid_to_text(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """fixed_size_binary(16) -> canonical lowercase uuid strings (nulls stay null)."""
    arr = _flat(arr)
    n = len(arr)
    if n == 0:
        return pa.array([], pa.string())
    data = arr.buffers()[1]
    raw = np.frombuffer(data, dtype=np.uint8, count=(arr.offset + n) * 16)[arr.offset * 16 :].reshape(n, 16)
    digits = np.empty((n, 32), dtype=np.uint8)
    digits[:, 0::2] = _HEX[raw >> 4]
    digits[:, 1::2] = _HEX[raw & 0x0F]
    out = np.empty((n, 36), dtype=np.uint8)
    out[:, _HEX_POS] = digits
    out[:, _DASH_POS] = ord("-")
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    return pa.StringArray.from_buffers(
        n, pa.py_buffer(offsets), pa.py_buffer(out), _validity_buffer(arr), arr.null_count
    )


def text_to_uuid(arr: pa.Array | pa.ChunkedArray, what: str) -> pa.Array:
    """uuid strings (any case; canonical 36-character form on the fast path) -> fixed_size_binary(16)."""
    arr = _flat(arr)
    n = len(arr)
    if arr.null_count == n:
        return pa.nulls(n, pa.binary(16))
    if pa.types.is_binary(arr.type) and all(v is None or len(v) == 16 for v in _sample(arr)):
        try:
            return arr.cast(pa.binary(16))  # an application that stores uuids as 16-byte BLOBs
        except pa.ArrowInvalid:
            pass
    if not pa.types.is_string(arr.type):
        arr = arr.cast(pa.string())
    filled = pc.fill_null(arr, _NIL_UUID)
    lengths = pc.binary_length(filled)
    if pc.all(pc.equal(lengths, 36)).as_py():
        offsets = np.frombuffer(filled.buffers()[1], dtype=np.int32, count=filled.offset + n + 1)[filled.offset :]
        start = int(offsets[0])
        chars = np.frombuffer(filled.buffers()[2], dtype=np.uint8, count=start + 36 * n)[start:].reshape(n, 36)
        nibbles = _UNHEX[chars[:, _HEX_POS]]
        if not (nibbles == 255).any() and (chars[:, _DASH_POS] == ord("-")).all():
            raw = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
            return pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(16), n, [_validity_buffer(arr), pa.py_buffer(np.ascontiguousarray(raw))], arr.null_count
            )
    # Rare: braces, no dashes, garbage. Go value by value for a clear error.
    out: list[bytes | None] = []
    for v in arr.to_pylist():
        if v is None:
            out.append(None)
            continue
        try:
            out.append(uuid.UUID(v).bytes)
        except ValueError:
            raise SchemaMismatchError(f"{what}: {v!r} is not a uuid") from None
    return pa.array(out, pa.binary(16))


def _sample(arr: pa.Array) -> list[Any]:
    return list(arr.slice(0, 16).to_pylist())


def _strip_utc(arr: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(arr, pattern=r"(Z|[+-]00:?00)$", replacement="")


def _parse_timestamps(arr: pa.Array, tz: bool, what: str) -> pa.Array:
    target = pa.timestamp("us", "UTC") if tz else pa.timestamp("us")
    try:
        return arr.cast(target)  # canonical, zone included (timestamptz) or absent (timestamp)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    try:
        return _strip_utc(arr).cast(pa.timestamp("us")).cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    out: list[datetime | None] = []
    for v in arr.to_pylist():
        if v is None:
            out.append(None)
            continue
        try:
            d = datetime.fromisoformat(v)
        except (TypeError, ValueError):
            raise SchemaMismatchError(f"{what}: {v!r} is not an ISO-8601 timestamp") from None
        if d.tzinfo is None:
            d = d.replace(tzinfo=UTC)
        d = d.astimezone(UTC)
        out.append(d if tz else d.replace(tzinfo=None))
    return pa.array(out, target)


def to_storage(arr: pa.Array | pa.ChunkedArray, ltype: LogicalType) -> pa.Array:
    """A wire column -> the Arrow array whose values SQLite stores (see the table above)."""
    arr = _flat(arr)
    if arr.null_count == len(arr):
        return pa.nulls(len(arr), _STORAGE_ARROW[STORAGE[ltype]])
    if ltype is LogicalType.UUID:
        return uuid_to_text(arr)
    if ltype is LogicalType.BOOL:
        return arr.cast(pa.int64())
    if ltype is LogicalType.DATE:
        return arr.cast(pa.string())
    if ltype is LogicalType.TIMESTAMPTZ:
        return pc.strftime(arr, format="%Y-%m-%dT%H:%M:%SZ")
    if ltype is LogicalType.TIMESTAMP:
        return pc.strftime(arr, format="%Y-%m-%dT%H:%M:%S")
    if ltype is LogicalType.INT32:
        return arr.cast(pa.int64())
    return arr


def from_storage(arr: pa.Array | pa.ChunkedArray, ltype: LogicalType, what: str) -> pa.Array:
    """A column read from SQLite (whatever Arrow type the reader inferred) -> its wire type."""
    arr = _flat(arr)
    target = ltype.arrow
    n = len(arr)
    if arr.null_count == n:
        return pa.nulls(n, target)
    if arr.type == target:
        return arr
    try:
        if ltype is LogicalType.UUID:
            return text_to_uuid(arr, what)
        if ltype in (LogicalType.TIMESTAMPTZ, LogicalType.TIMESTAMP):
            if pa.types.is_string(arr.type):
                return _parse_timestamps(arr, ltype is LogicalType.TIMESTAMPTZ, what)
        if ltype is LogicalType.DATE and pa.types.is_string(arr.type):
            try:
                return arr.cast(target)
            except pa.ArrowInvalid:
                return pc.cast(_parse_timestamps(arr, False, what), pa.date32())
        if ltype is LogicalType.BOOL and pa.types.is_string(arr.type):
            return pc.is_in(pc.utf8_lower(arr), value_set=pa.array(["1", "true", "t"])).cast(pa.bool_())
        return arr.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SchemaMismatchError(f"{what}: stored values of type {arr.type} do not convert to {target} ({exc})") from None


def python_value(v: Any) -> Any:
    """One Python value in storage form (for the few statements bound value by value)."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, datetime):
        if v.tzinfo is not None:
            return v.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return v.strftime("%Y-%m-%dT%H:%M:%S.%f")
    if isinstance(v, date):
        return v.isoformat()
    return v
