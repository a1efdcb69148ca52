"""Change capture: the triggers that stamp application writes, and reading windows.

The application writes plain SQL; three AFTER triggers per synced table stamp its
writes (SQLite cannot assign to NEW in a BEFORE trigger, so each trigger updates the
row it fired for by rowid; ``recursive_triggers`` is off by default, and the WHEN
clauses below stop the recursion even when it is on):

- ``AFTER INSERT ... WHEN NEW._cursor IS NULL``: a new cursor, ``_hlc = now_ms << 16``
  (above the key's tombstone if it had one, which the insert removes), this node,
  ``_base_hlc = _hlc`` (a new record is its own base), no origin; field stamps = ``_hlc``.
- ``AFTER UPDATE ... WHEN NEW._cursor IS OLD._cursor``: a new cursor,
  ``_hlc = max(now_ms << 16, OLD._hlc + 1)``, ``_base_hlc`` kept if the old version was
  ours, else the old ``_hlc``; a field stamp moves only where ``NEW.c IS NOT OLD.c``.
- ``AFTER DELETE``: upserts the key's tombstone with the same stamping rules.

Sync apply writes ``_cursor`` itself, which is how the triggers tell its writes from
the application's: an application never sets ``_cursor``, so its inserts carry NULL
and its updates leave it as it was. No lookup of any "applying" flag is needed.

The cursor is a counter in the one-row table ``_tidesync_clock``: a SQLite database
has one writer at a time, so counter values are handed out in commit order and a
window ``[cursor, counter + 1)`` read in one read transaction never misses a write.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from tidesync.changes import Window, tombstone_rows
from tidesync.registry import BASE_HLC, DELETED, HLC, NODE, Registry, TableSpec, stamp_column
from tidesync.sqlite import names
from tidesync.sqlite.conn import Connection, literal, quote
from tidesync.sqlite.types import from_storage

#: ``now_ms << 16``. julianday('now') is fixed for the duration of one statement, so
#: every use within a trigger step gives the same value. (unixepoch('subsec') would be
#: neater but needs SQLite 3.42; phones ship older.)
NOW_HLC = "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) << 16)"


def _row(spec: TableSpec, rowid: bool, alias: str = "NEW") -> str:
    if rowid:
        return f"rowid = {alias}.rowid"
    return f"{quote(spec.key)} = {alias}.{quote(spec.key)}"


def trigger_ddl(spec: TableSpec, node_id: str, rowid: bool = True) -> list[str]:
    """CREATE TRIGGER statements for one table (node id baked in)."""
    t, k = quote(spec.name), quote(spec.key)
    tomb = quote(names.tombstones(spec.name))
    me = literal(node_id)
    clock = quote(names.CLOCK)
    bump = f"UPDATE {clock} SET value = value + 1;"
    cursor = f"(SELECT value FROM {clock})"
    next_hlc = f"max({NOW_HLC}, coalesce(OLD._hlc, 0) + 1)"
    base = f"CASE WHEN OLD._node = {me} THEN OLD._base_hlc ELSE OLD._hlc END"

    # Insert: above the key's tombstone (delete and re-insert within one millisecond
    # must order after the delete), and the tombstone goes.
    ins_hlc = f"max({NOW_HLC}, coalesce((SELECT _hlc + 1 FROM {tomb} WHERE {k} = NEW.{k}), 0))"
    ins_sets = [f"_cursor = {cursor}", f"_hlc = {ins_hlc}", f"_node = {me}", f"_base_hlc = {ins_hlc}", "_origin = NULL"]
    upd_sets = [f"_cursor = {cursor}", f"_hlc = {next_hlc}", f"_node = {me}", f"_base_hlc = {base}", "_origin = NULL"]
    if spec.field_wise:
        for c in spec.data_columns:
            s, v = quote(stamp_column(c.name)), quote(c.name)
            ins_sets.append(f"{s} = {ins_hlc}")
            upd_sets.append(f"{s} = CASE WHEN NEW.{v} IS NOT OLD.{v} THEN {next_hlc} ELSE OLD.{s} END")
    sep = ",\n        "
    return [
        f"""CREATE TRIGGER {quote(names.trigger(spec.name, "ins"))} AFTER INSERT ON {t}
WHEN NEW._cursor IS NULL BEGIN
    {bump}
    UPDATE {t} SET {sep.join(ins_sets)}
    WHERE {_row(spec, rowid)};
    DELETE FROM {tomb} WHERE {k} = NEW.{k};
END""",
        f"""CREATE TRIGGER {quote(names.trigger(spec.name, "upd"))} AFTER UPDATE ON {t}
WHEN NEW._cursor IS OLD._cursor BEGIN
    {bump}
    UPDATE {t} SET {sep.join(upd_sets)}
    WHERE {_row(spec, rowid)};
END""",
        f"""CREATE TRIGGER {quote(names.trigger(spec.name, "del"))} AFTER DELETE ON {t}
BEGIN
    {bump}
    INSERT INTO {tomb} ({k}, _cursor, _hlc, _node, _base_hlc, _origin)
    VALUES (OLD.{k}, {cursor}, {next_hlc}, {me}, {base}, NULL)
    ON CONFLICT ({k}) DO UPDATE SET _cursor = excluded._cursor, _hlc = excluded._hlc,
        _node = excluded._node, _base_hlc = excluded._base_hlc, _origin = NULL;
END""",
    ]


def select_columns(spec: TableSpec) -> list[str]:
    """The stored columns that make up a wire row (all but ``_deleted``), in wire order."""
    cols = [c.name for c in spec.columns] + [HLC, NODE, BASE_HLC]
    if spec.field_wise:
        cols += [stamp_column(c.name) for c in spec.data_columns]
    return cols


def to_wire(spec: TableSpec, stored: pa.Table, deleted: bool = False) -> pa.Table:
    """Rows as read from the table (``select_columns``) -> the wire schema."""
    wire = spec.wire_schema()
    n = stored.num_rows
    arrays = []
    for f in wire:
        if f.name == DELETED:
            arrays.append(pa.repeat(pa.scalar(deleted), n))
            continue
        col = stored.column(f.name)
        if f.name in (HLC, NODE, BASE_HLC) or f.name.startswith("_hlc_"):
            arrays.append(_meta(col, f.type, n))
        else:
            arrays.append(from_storage(col, spec.column(f.name).type, f"{spec.name}.{f.name}"))
    return pa.Table.from_arrays(arrays, schema=wire)


def _meta(col: pa.ChunkedArray, target: pa.DataType, n: int) -> pa.Array | pa.ChunkedArray:
    if col.null_count == n:
        return pa.nulls(n, target)
    return col if col.type == target else col.cast(target)


def tombstones_to_wire(spec: TableSpec, stored: pa.Table) -> pa.Table:
    """Tombstone rows (key, ``_hlc``, ``_node``, ``_base_hlc``) as read -> wire rows."""
    n = stored.num_rows
    key = from_storage(stored.column(spec.key), spec.column(spec.key).type, f"{spec.name}.{spec.key}")
    meta = pa.table(
        {
            spec.key: key,
            HLC: _meta(stored.column(HLC), pa.int64(), n),
            NODE: _meta(stored.column(NODE), pa.string(), n),
            BASE_HLC: _meta(stored.column(BASE_HLC), pa.int64(), n),
        }
    )
    return tombstone_rows(spec, meta)


def read_window(
    conn: Connection, registry: Registry, cursor: int, peer: str | None, tables: Iterable[str] | None
) -> Window:
    """Every change with ``cursor <= _cursor < watermark``, in one read transaction."""
    specs = registry.ordered(tables) if tables is not None else list(registry)
    out: dict[str, pa.Table] = {}
    with conn.transaction("DEFERRED"):
        # The first read fixes the snapshot: the counter and the rows agree.
        watermark = int(conn.scalar(f"SELECT value + 1 FROM {quote(names.CLOCK)}"))
        # From the start of time a scan beats walking the cursor index (`+` disables it).
        col = "+_cursor" if cursor <= 0 else "_cursor"
        where = f"{col} >= ? AND {col} < ?"
        params: list[object] = [cursor, watermark]
        if peer is not None:
            where += " AND _origin IS NOT ?"
            params.append(peer)
        for spec in specs:
            cols = ", ".join(quote(c) for c in select_columns(spec))
            live = conn.arrow(f"SELECT {cols} FROM {quote(spec.name)} WHERE {where}", params)
            meta = ", ".join(quote(c) for c in (spec.key, HLC, NODE, BASE_HLC))
            dead = conn.arrow(f"SELECT {meta} FROM {quote(names.tombstones(spec.name))} WHERE {where}", params)
            parts = [to_wire(spec, live)]
            if dead.num_rows:
                parts.append(tombstones_to_wire(spec, dead))
            out[spec.name] = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    return Window(cursor, watermark, out)
