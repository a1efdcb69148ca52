"""Row hashes and bucket digests, as both sides compute them.

A row's hash covers its key and every wire column but ``_deleted`` (data, ``_hlc``,
``_node``, ``_base_hlc``, field stamps); the Rust core computes it (``row_hashes``) on
rows conformed to the wire types, so a facility, a mobile and the central server hash
the same content alike. Its bucket is a prefix of the key's hash: computed once at
:data:`HASH_BUCKETS`, then shifted down to the bucket count a digest uses.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from tidesync.changes import _storage, conform
from tidesync.core import row_hashes
from tidesync.registry import DELETED, TableSpec

#: Rows per bucket central aims for. Bytes moved are about ``10 B × rows / this`` down
#: (the digest) plus ``24 B × this`` per differing row (its bucket's row hashes).
ROWS_PER_BUCKET = 256
#: At most this many buckets (about 1.2 MB of digest, compressed).
MAX_BUCKETS = 1 << 17
#: Row hashes are computed once at this resolution; coarser buckets are prefixes.
HASH_BUCKETS = 1 << 31


def verifiable(spec: TableSpec) -> bool:
    """Tables central sends to nodes; push-only logs and attachments leave the node, so
    there is no copy of them to compare."""
    return spec.direction.pulls


def digest_columns(spec: TableSpec) -> list[str]:
    """The columns folded into a row hash besides the key: every wire column (data,
    ``_hlc``, ``_node``, ``_base_hlc``, field stamps) but ``_deleted`` (always false on
    a live row). A value changed behind the engine's back with its stamps untouched
    changes the hash."""
    return [f.name for f in spec.wire_schema() if f.name not in (spec.key, DELETED)]


def hashed_schema(spec: TableSpec) -> pa.Schema:
    """The wire schema without ``_deleted``: what is read to be hashed (live rows only)."""
    wire = spec.wire_schema()
    return pa.schema([f for f in wire if f.name != DELETED])


def hashed_select(spec: TableSpec, query: str) -> str:
    """SQL: the columns of :func:`hashed_schema` out of ``query`` (which gives wire rows):
    the constant ``_deleted`` column is not sent."""
    cols = ", ".join(f's."{f.name}"' for f in hashed_schema(spec))
    return f"SELECT {cols} FROM ({query}) s"


def conform_hashed(batch: pa.RecordBatch | pa.Table, spec: TableSpec, what: str) -> pa.Table:
    """``batch`` (the columns of :func:`hashed_schema`, as a database gave them) in the
    wire types, so both sides hash identical Arrow values for identical content."""
    return conform(batch, spec, what, schema=hashed_schema(spec))


def hash_rows(spec: TableSpec, rows: pa.Table) -> pa.Table:
    """``{key, bucket (of HASH_BUCKETS), hash}`` of live rows in the wire types (with or
    without ``_deleted``)."""
    return row_hashes(rows, spec.key, HASH_BUCKETS, digest_columns(spec))


def key_buckets(spec: TableSpec, keys: pa.Array | pa.ChunkedArray) -> np.ndarray[Any, Any]:
    """The bucket (of :data:`HASH_BUCKETS`) of each key: what :func:`hash_rows` gives."""
    return np.asarray(row_hashes(pa.table({spec.key: keys}), spec.key, HASH_BUCKETS, []).column("bucket").to_numpy())


def empty_hashes(spec: TableSpec) -> pa.Table:
    return hash_rows(spec, hashed_schema(spec).empty_table())


def choose_buckets(rows: int) -> int:
    """A power of two giving about :data:`ROWS_PER_BUCKET` rows per bucket."""
    want = max(1, math.ceil(rows / ROWS_PER_BUCKET))
    return min(MAX_BUCKETS, 1 << (want - 1).bit_length())


def coarse(buckets: np.ndarray[Any, Any], n: int) -> np.ndarray[Any, Any]:
    """Buckets of :data:`HASH_BUCKETS` as buckets of ``n`` (a power of two): a prefix."""
    return buckets >> np.uint32(31 - (n.bit_length() - 1))


def bucket_sums(buckets: np.ndarray[Any, Any], hashes: np.ndarray[Any, Any], n: int) -> tuple[
        np.ndarray[Any, Any], np.ndarray[Any, Any]]:  # fmt: skip
    """Rows and wrapping hash sums per bucket (what ``tidesync.digest`` computes), from
    row hashes already at hand; ``buckets`` are already of ``n``."""
    rows = np.bincount(buckets.astype(np.intp, copy=False), minlength=n).astype(np.uint32)
    sums = np.zeros(n, dtype=np.uint64)
    np.add.at(sums, buckets, hashes)  # uint64 wraps: the same sums as the core's
    return rows, sums


def in_buckets(buckets: np.ndarray[Any, Any], n: int, chosen: Any) -> np.ndarray[Any, Any]:
    """Which rows (buckets of :data:`HASH_BUCKETS`) fall in the ``chosen`` buckets of ``n``."""
    wanted = np.zeros(n, dtype=bool)
    wanted[np.asarray(chosen, dtype=np.int64)] = True
    picked: np.ndarray[Any, Any] = wanted[coarse(buckets, n)]
    return picked


def as_keys(spec: TableSpec, col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A key column as read (ADBC gives uuids an extension type) in the key's wire type."""
    arr = _storage(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    want = spec.column(spec.key).type.arrow
    return arr if arr.type == want else arr.cast(want)


def empty_keys(spec: TableSpec) -> pa.Array:
    return pa.array([], spec.column(spec.key).type.arrow)
