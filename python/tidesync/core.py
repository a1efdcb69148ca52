"""Typed Python face of the Rust core: HLC, diff, merge and digests over Arrow.

Inputs are anything that speaks the Arrow PyCapsule interface (a pyarrow Table or
RecordBatch, a polars DataFrame, a duckdb relation's Arrow result, ...). Outputs are
pyarrow objects imported zero-copy from the native results, so polars
(``pl.from_arrow``) and duckdb read them without another copy. Every heavy call
releases the GIL inside the native module. The semantics are in docs/semantics.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from tidesync import _core

MergeMode = Literal["record", "field"]

#: Default tolerance for clocks running ahead of ours: five minutes.
DEFAULT_MAX_DRIFT_MS = 5 * 60 * 1000

#: Default names of the metadata columns hashed into a digest besides the key.
DEFAULT_DIGEST_COLUMNS = ("_hlc", "_node")


def now_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def hlc_pack(ms: int, counter: int = 0) -> int:
    """Build a stamp from milliseconds (high 48 bits) and a counter (low 16 bits)."""
    return _core.hlc_pack(ms, counter)


def hlc_unpack(hlc: int) -> tuple[int, int]:
    """Split a stamp into (milliseconds, counter)."""
    return _core.hlc_unpack(hlc)


class HybridClock:
    """A node's hybrid logical clock: never goes backwards, always above what it saw.

    ``tick`` stamps a local event; ``observe`` folds in a stamp received from
    another node. A received stamp further ahead of our wall clock than
    ``max_drift_ms`` raises :class:`~tidesync.ClockSkewError`, or is clamped to
    the tolerance when ``clamp=True``.
    """

    def __init__(self, max_drift_ms: int = DEFAULT_MAX_DRIFT_MS, last: int = 0) -> None:
        self._clock = _core.HybridClock(max_drift_ms, last)

    @property
    def last(self) -> int:
        """The last stamp this clock handed out or observed."""
        return self._clock.last

    @property
    def max_drift_ms(self) -> int:
        return self._clock.max_drift_ms

    def tick(self, now: int | None = None) -> int:
        """Stamp a local event at wall time ``now`` (ms; default: the system clock)."""
        return self._clock.tick(now_ms() if now is None else now)

    def observe(self, remote: int, now: int | None = None, *, clamp: bool = False) -> int:
        """Fold in a received stamp; returns the new local stamp, above ``remote``."""
        return self._clock.observe(remote, now_ms() if now is None else now, clamp)

    def __repr__(self) -> str:
        return f"HybridClock(last={self.last}, max_drift_ms={self.max_drift_ms})"


def max_hlc(values: Any) -> int | None:
    """The greatest stamp of an int64/uint64 Arrow column (None if empty or all null)."""
    return _core.max_hlc(_as_array(values))


def clamp_hlcs(values: Any, now: int, max_drift_ms: int = DEFAULT_MAX_DRIFT_MS) -> tuple[pa.Array, pa.Array]:
    """Bound stamps to ``now + max_drift_ms``: returns (clamped stamps, mask of clamped)."""
    clamped, mask = _core.clamp_hlcs(_as_array(values), now, max_drift_ms)
    return pa.array(clamped), pa.array(mask)


def logical_order(batch: Any, by: Sequence[str] = ("_hlc", "_node", "_table")) -> pa.Array:
    """Indices (uint32) that put a batch of changes in logical-clock order.

    ``by`` names the sort columns, most significant first: typically
    ``("_hlc", "_node", "_table", <key>)``. Nulls sort first.
    """
    return pa.array(_core.logical_order(batch, list(by)))


@dataclass(frozen=True)
class Diff:
    """What changed between two versions of a table (see docs/semantics.md)."""

    inserted: pa.Table
    deleted: pa.Table
    updated: pa.Table


def diff(old: Any, new: Any, key: str) -> Diff:
    """Compare two batches with the same schema by ``key``."""
    inserted, deleted, updated = _core.diff(old, new, key)
    return Diff(pa.table(inserted), pa.table(deleted), pa.table(updated))


@dataclass(frozen=True)
class MergeResult:
    """Rows to write, which of them are new, and the losing side of every concurrent edit.

    ``local_row`` and ``source`` (uint32, one per row of ``rows``) say where each row
    stands: the local row of its key (null: none, the row is new), and the incoming row
    it is a copy of in every column (null: it mixes versions or keeps local parts, as
    field-wise merges can). ``keys`` counts the distinct keys of ``incoming``.
    """

    rows: pa.Table
    inserted: pa.Array
    conflicts: pa.Table
    local_row: pa.Array
    source: pa.Array
    keys: int


def merge(local: Any, incoming: Any, key: str, mode: MergeMode = "record") -> MergeResult:
    """Merge incoming versions into the local rows of one table (see docs/semantics.md)."""
    rows, inserted, local_row, source, conflicts, keys = _core.merge(local, incoming, key, mode)
    return MergeResult(pa.table(rows), pa.array(inserted), pa.table(conflicts), pa.array(local_row),
                       pa.array(source), int(keys))  # fmt: skip


def digest(
    batch: Any, key: str, buckets: int = 1024, columns: Sequence[str] = DEFAULT_DIGEST_COLUMNS
) -> pa.Table:
    """Range digest: one ``{bucket, rows, hash}`` row per bucket of the key-hash space."""
    return pa.table(_core.digest(batch, key, buckets, list(columns)))


def row_hashes(
    batch: Any, key: str, buckets: int = 1024, columns: Sequence[str] = DEFAULT_DIGEST_COLUMNS
) -> pa.Table:
    """Per-row ``{key, bucket, hash}``: narrows a differing bucket down to rows."""
    return pa.table(_core.row_hashes(batch, key, buckets, list(columns)))


def differing_buckets(a: pa.Table, b: pa.Table) -> list[int]:
    """Buckets whose row count or hash differ between two digests of equal size."""
    if a.num_rows != b.num_rows:
        raise _core.InvalidInputError(
            f"digests have {a.num_rows} and {b.num_rows} buckets; compute both with the same `buckets`"
        )
    differ = pc.or_(
        pc.not_equal(a.column("rows"), b.column("rows")),
        pc.not_equal(a.column("hash"), b.column("hash")),
    )
    return [int(i) for i in a.column("bucket").filter(differ).to_pylist()]


def set_max_threads(n: int) -> None:
    """Cap the threads a core call may use; 0 (the default) means one per core.

    Large merges and digests spread over cores; a facility server shared with the
    hospital's applications may want to leave some free.
    """
    if n < 0:
        raise _core.InvalidInputError(f"max threads must be 0 (one per core) or more, got {n}")
    _core.set_max_threads(n)


def max_threads() -> int:
    """The current cap on core threads (0 = one per core)."""
    return _core.max_threads()


def _as_array(values: Any) -> Any:
    """Accept pyarrow ChunkedArrays (and polars Series) where the core wants one array."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    return values
