"""What every store (PostgreSQL, SQLite) shares: change batches, windows, apply plans.

A *change batch* of a table is an Arrow table in the table's wire schema
(:meth:`TableSpec.wire_schema`): the application's columns, ``_hlc``, ``_node``,
``_base_hlc``, ``_deleted`` and, in field mode, ``_hlc_<col>`` per data column. A
tombstone (a hard delete) is a row with ``_deleted`` true and every data column and
stamp null.

Applying a batch is the same everywhere: read the local versions of the incoming
keys (live rows and tombstones), merge them with the incoming versions in the Rust
core, and turn the result into a plan — rows to insert, rows to update, keys to
delete, conflicts to log. The stores only differ in how they read and write.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tidesync.core import merge
from tidesync.errors import SchemaMismatchError
from tidesync.registry import BASE_HLC, DELETED, HLC, NODE, LogicalType, TableSpec

#: Column a store adds to written rows: the peer a version arrived from (None = written
#: here). A window read for a peer skips versions that came from that same peer.
ORIGIN = "_origin"


@dataclass
class Window:
    """The changes of a node in ``[cursor, watermark)``, per table in foreign-key order."""

    cursor: int
    watermark: int
    tables: dict[str, pa.Table]

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.tables.values())


@dataclass
class TableApplyStats:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    conflicts: int = 0
    quarantined: int = 0


@dataclass
class ApplyResult:
    """What one atomic apply did, per table."""

    tables: dict[str, TableApplyStats] = field(default_factory=dict)

    def total(self, what: str) -> int:
        return sum(getattr(s, what) for s in self.tables.values())


def _storage(arr: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Drop extension types (ADBC reads uuid as ``arrow.uuid``) down to their storage."""
    if isinstance(arr.type, pa.ExtensionType):
        if isinstance(arr, pa.ChunkedArray):
            return pa.chunked_array([c.storage for c in arr.chunks], type=arr.type.storage_type)
        return arr.storage
    return arr


def conform(
    table: pa.Table | pa.RecordBatch, spec: TableSpec, what: str = "batch", *, schema: pa.Schema | None = None
) -> pa.Table:
    """Cast a batch to ``spec``'s wire schema (or ``schema``, a part of it), or raise a
    clear SchemaMismatchError.

    Columns are matched by name (order does not matter); a missing or unknown column,
    or a type that does not cast safely, is an error for the whole batch.
    """
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    wire = spec.wire_schema() if schema is None else schema
    have = set(table.column_names)
    missing = [f.name for f in wire if f.name not in have]
    extra = sorted(have - set(wire.names))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if extra:
            parts.append(f"unknown columns {extra}")
        raise SchemaMismatchError(f"{what} for table {spec.name!r} does not match its registry entry: {'; '.join(parts)}")
    cols = []
    for f in wire:
        col = _storage(table.column(f.name))
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaMismatchError(
                    f"{what} for table {spec.name!r}: column {f.name!r} is {col.type}, expected {f.type} ({exc})"
                ) from None
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=wire)


def with_origin(table: pa.Table, origin: pa.Array | str | None) -> pa.Table:
    """Append the ``_origin`` column (one value for all rows, or an array)."""
    if not isinstance(origin, (pa.Array, pa.ChunkedArray)):
        origin = pa.repeat(pa.scalar(origin, pa.string()), table.num_rows)
    return table.append_column(pa.field(ORIGIN, pa.string()), origin)


@dataclass
class ApplyPlan:
    """What to write for one table so that it holds the merge of local and incoming."""

    spec: TableSpec
    #: Live rows whose key has no live local row (wire columns but ``_deleted``, plus ``_origin``).
    inserts: pa.Table
    #: Live rows replacing a live local row.
    updates: pa.Table
    #: Tombstones to record (key, ``_hlc``, ``_node``, ``_base_hlc``, ``_origin``); the live row goes.
    deletes: pa.Table
    #: Keys whose tombstone must go because the key is live again (resurrected).
    revived: pa.Array
    #: The merge's conflict batch (losing versions with ``_winner_hlc``/``_winner_node``/``_lost_columns``).
    conflicts: pa.Table
    unchanged: int


@dataclass(frozen=True)
class ApplyOptions:
    """The two ways the hub and its nodes bend the plain apply (see docs/protocol.md, clocks).

    ``restamped``: keys (per table) whose incoming version the receiver re-stamped
    before applying (the central server clamps stamps too far ahead of its clock).
    What gets written is then not the peer's version, so it goes back to the peer.

    ``own_node``: set by a node applying what the hub sent. Where the hub holds one of
    this node's own versions under a *lower* stamp than the local copy, the hub
    clamped that stamp: the node takes the hub's version, so both converge. If the
    local copy had changed since, its values go to the conflict log.
    """

    restamped: Mapping[str, pa.Array] = field(default_factory=dict)
    own_node: str | None = None


NO_OPTIONS = ApplyOptions()


def plan_apply(
    spec: TableSpec, local: pa.Table, incoming: pa.Table, peer: str | None, options: ApplyOptions = NO_OPTIONS
) -> ApplyPlan:
    """Merge ``incoming`` (wire schema) into ``local`` (wire schema: live rows and tombstones).

    Rows that end up exactly as a version the peer sent are marked as coming from the
    peer, so they are never sent back to it; a field-wise mix of local and incoming
    values is a new version (``_origin`` null) that the peer has not seen yet.
    """
    key = spec.key
    full_local = local
    adopted = _no_conflicts(incoming.schema)
    if options.own_node is not None and local.num_rows:
        local, adopted = _adopt_restamped(spec, local, incoming, options.own_node)
    # Merge also says, per row, which local row its key had and which incoming row it
    # copies: enough to sort rows into inserts and updates and to mark their origin
    # without looking keys up again.
    result = merge(local, incoming, key, spec.merge)
    rows, conflicts = result.rows, result.conflicts
    unique = result.keys == incoming.num_rows
    if adopted.num_rows:
        conflicts = pa.concat_tables([conflicts, adopted.cast(conflicts.schema)])
    origin = _origins(spec, rows, result.source, peer, unique=unique)
    restamped = options.restamped.get(spec.name)
    if restamped is not None and len(restamped) and rows.num_rows:
        mine = pc.is_in(_storage(rows.column(key)), value_set=_storage(restamped))
        origin = pc.if_else(mine, pa.scalar(None, pa.string()), origin)
    if local is full_local:
        # The local row's `_deleted`: null where the key had none.
        local_deleted = local.column(DELETED).combine_chunks().take(result.local_row)
        was_live = pc.fill_null(pc.invert(local_deleted), False)
        was_dead = pc.fill_null(local_deleted, False)
    else:
        # Some local rows were set aside (adopted): they are still in the table.
        local_live = full_local.filter(pc.invert(full_local.column(DELETED))).column(key).combine_chunks()
        local_dead = full_local.filter(full_local.column(DELETED)).column(key).combine_chunks()
        was_live = pc.is_in(rows.column(key), value_set=local_live)
        was_dead = pc.is_in(rows.column(key), value_set=local_dead)
    deleted = rows.column(DELETED)
    live_mask = pc.invert(deleted)
    new_mask = pc.and_(live_mask, pc.invert(was_live))

    out = with_origin(rows.drop_columns([DELETED]), origin)
    inserts = out.filter(new_mask)
    updates = out.filter(pc.and_(live_mask, was_live))
    meta = [key, HLC, NODE, BASE_HLC, ORIGIN]
    deletes = out.filter(deleted).select(meta)
    revived = pc.filter(rows.column(key), pc.and_(new_mask, was_dead)).combine_chunks()
    unchanged = result.keys - rows.num_rows
    return ApplyPlan(spec, inserts, updates, deletes, revived, conflicts, max(unchanged, 0))


def new_rows(spec: TableSpec, incoming: pa.Table, peer: str | None, options: ApplyOptions = NO_OPTIONS) -> pa.Table:
    """The rows to insert for live versions of keys that exist nowhere locally, one per
    key: what :func:`plan_apply` plans for them, without looking for duplicates (the
    caller's primary key does that) or for local rows (there are none). A bulk load."""
    n = incoming.num_rows
    origin: pa.Array = pa.nulls(n, pa.string()) if peer is None else pa.repeat(pa.scalar(peer, pa.string()), n)
    restamped = options.restamped.get(spec.name)
    if peer is not None and restamped is not None and len(restamped) and n:
        mine = pc.is_in(_storage(incoming.column(spec.key)), value_set=_storage(restamped))
        origin = pc.if_else(mine, pa.scalar(None, pa.string()), origin)
    return with_origin(incoming.drop_columns([DELETED]), origin)


def _adopt_restamped(spec: TableSpec, local: pa.Table, incoming: pa.Table, own: str) -> tuple[pa.Table, pa.Table]:
    """Drop from ``local`` our own versions that the hub sent back under a lower stamp.

    Returns the remaining local rows and, for dropped rows whose values differ from the
    hub's, conflict rows (the local version loses) so that nothing is lost silently.
    """
    key = spec.key
    theirs = incoming.filter(pc.equal(incoming.column(NODE), own))
    if theirs.num_rows == 0:
        return local, _no_conflicts(incoming.schema)
    mine = local.filter(
        pc.and_(pc.equal(local.column(NODE), own), pc.is_in(local.column(key), value_set=_storage(theirs.column(key))))
    )
    if mine.num_rows == 0:
        return local, _no_conflicts(incoming.schema)
    joined = mine.select([key, HLC]).join(
        theirs.select([key, HLC]).rename_columns([key, "_hub_hlc"]), key, join_type="inner"
    )
    lower = joined.filter(pc.less(joined.column("_hub_hlc"), joined.column(HLC))).column(key).combine_chunks()
    if len(lower) == 0:
        return local, _no_conflicts(incoming.schema)
    drop = pc.is_in(local.column(key), value_set=lower)
    kept = local.filter(pc.invert(drop))
    losers = local.filter(drop)
    hub = theirs.filter(pc.is_in(theirs.column(key), value_set=lower))
    hub = hub.take(pc.index_in(losers.column(key), value_set=_storage(hub.column(key))))
    lost: list[list[str]] = [[] for _ in range(losers.num_rows)]
    for c in spec.data_columns:
        a, b = losers.column(c.name), hub.column(c.name)
        differ = pc.fill_null(pc.not_equal(a, b), True)
        both_null = pc.and_(pc.is_null(a), pc.is_null(b))
        for i, d in enumerate(pc.and_(differ, pc.invert(both_null)).to_pylist()):
            if d:
                lost[i].append(c.name)
    keep = pa.array([bool(x) for x in lost])
    conflicts = losers.append_column("_winner_hlc", hub.column(HLC)).append_column("_winner_node", hub.column(NODE))
    conflicts = conflicts.append_column("_lost_columns", pa.array(lost, pa.list_(pa.string()))).filter(keep)
    return kept, conflicts


def _no_conflicts(schema: pa.Schema) -> pa.Table:
    """An empty conflict batch (the schema merge gives conflicts)."""
    extra = [
        pa.field("_winner_hlc", pa.int64(), nullable=False),
        pa.field("_winner_node", pa.string(), nullable=False),
        pa.field("_lost_columns", pa.list_(pa.string()), nullable=False),
    ]
    return pa.schema([*schema, *extra]).empty_table()


def _origins(spec: TableSpec, rows: pa.Table, source: pa.Array, peer: str | None, *, unique: bool) -> pa.Array:
    """``peer`` for rows identical to a version the peer sent (merge's ``source``), null
    for the rest: a field-wise mix of local and incoming values is a new version."""
    n = rows.num_rows
    if peer is None or n == 0:
        return pa.nulls(n, pa.string())
    if not spec.field_wise:
        # Record mode: a merged row that differs from the local row is an incoming version.
        return pa.repeat(pa.scalar(peer, pa.string()), n)
    if not unique:
        # Several versions of a key in one batch (rare): echoing is harmless, skip the check.
        return pa.nulls(n, pa.string())
    return pc.if_else(pc.is_valid(source), pa.scalar(peer, pa.string()), pa.scalar(None, pa.string()))


def tombstone_rows(spec: TableSpec, meta: pa.Table) -> pa.Table:
    """Wire rows for tombstones given ``key, _hlc, _node, _base_hlc``: data and stamps null."""
    wire = spec.wire_schema()
    n = meta.num_rows
    cols = []
    for f in wire:
        if f.name in (spec.key, HLC, NODE, BASE_HLC):
            cols.append(_storage(meta.column(f.name)).cast(f.type))
        elif f.name == DELETED:
            cols.append(pa.repeat(pa.scalar(True), n))
        else:
            cols.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(cols, schema=wire)


# ----------------------------------------------------------------------------- rare paths


def key_texts(spec: TableSpec, keys: pa.Array | pa.ChunkedArray) -> list[str]:
    """Keys as text (uuid in canonical form) for the conflict log and quarantine."""
    values = _storage(keys).to_pylist()
    if spec.column(spec.key).type is LogicalType.UUID:
        return [str(uuid.UUID(bytes=v)) for v in values]
    return [str(v) for v in values]


def keys_from_texts(spec: TableSpec, texts: list[str]) -> pa.Array:
    """The inverse of :func:`key_texts`: keys as the conflict log and quarantine write
    them, back in the key column's wire type. A text that is no such key raises
    :class:`SchemaMismatchError` naming it."""
    ltype = spec.column(spec.key).type
    try:
        if ltype is LogicalType.UUID:
            return pa.array([uuid.UUID(t).bytes for t in texts], ltype.arrow)
        if ltype in (LogicalType.INT32, LogicalType.INT64):
            return pa.array([int(t) for t in texts], ltype.arrow)
        return pa.array(texts, pa.string()).cast(ltype.arrow)
    except (ValueError, pa.ArrowInvalid) as exc:
        raise SchemaMismatchError(f"not a key of table {spec.name!r} ({ltype.value}): {exc}") from None


def _json_default(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    raise TypeError(type(v))


def rows_as_json(spec: TableSpec, table: pa.Table) -> list[str]:
    """Each row as a JSON object of its application columns (uuid as text, bytes as hex).

    For the conflict log and quarantine only: they hold a few rows, for people to read.
    """
    cols = [c.name for c in spec.columns if c.name in table.column_names]
    out: list[str] = []
    uuid_cols = {c.name for c in spec.columns if c.type is LogicalType.UUID}
    float_cols = {c.name for c in spec.columns if c.type is LogicalType.FLOAT64}
    for row in table.select(cols).to_pylist():
        for c in uuid_cols & row.keys():
            if row[c] is not None:
                row[c] = str(uuid.UUID(bytes=row[c]))
        for c in float_cols & row.keys():
            # JSON has no NaN or infinity (PostgreSQL's jsonb refuses them): as text.
            if row[c] is not None and not math.isfinite(row[c]):
                row[c] = str(row[c])
        out.append(json.dumps(row, default=_json_default, sort_keys=False, allow_nan=False))
    return out


def quarantine_bisect(rows: pa.Table, attempt: Callable[[pa.Table], str | None]) -> list[tuple[int, str]]:
    """Write ``rows`` with ``attempt``; isolate the rows that fail, by halving.

    ``attempt(batch)`` writes a batch inside a savepoint and returns None on success or
    the error text after rolling the savepoint back. Returns ``(row index, reason)`` for
    each row that cannot be written on its own; every other row is written. With k bad
    rows out of n this costs O(k log n) attempts, and one attempt when all is well.
    """
    bad: list[tuple[int, str]] = []

    def go(offset: int, batch: pa.Table) -> None:
        err = attempt(batch)
        if err is None:
            return
        if batch.num_rows == 1:
            bad.append((offset, err))
            return
        mid = batch.num_rows // 2
        go(offset, batch.slice(0, mid))
        go(offset + mid, batch.slice(mid))

    if rows.num_rows:
        go(0, rows)
    return bad

