"""Reading windows of changes out of PostgreSQL, as Arrow.

Every row carries ``_cursor``, the id of the transaction that last wrote it
(``pg_current_xact_id()``, stamped by the capture trigger). A window is
``[cursor, watermark)`` where the watermark is ``pg_snapshot_xmin`` of the very
snapshot the rows are read in: every transaction below it has finished, so nothing
can still appear there; a transaction that started earlier but commits later has
an id at or above the watermark and lands in a later window; a long-running writer
holds the watermark back instead of being skipped. The next window starts at the
watermark, so every committed version is handed out exactly once.

Rows travel as Arrow all the way: ADBC runs the query with binary ``COPY`` and
builds Arrow arrays in C; no row becomes a Python object.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from tidesync.changes import Window, conform
from tidesync.pg.conn import transaction
from tidesync.pg.install import qi, ql, tomb_table
from tidesync.registry import DELETED, Registry, TableSpec, stamp_column


def wire_columns(spec: TableSpec, alias: str, *, tombstone: bool) -> str:
    """The select list that gives a table's rows (or its tombstones) the wire schema.

    ``alias`` qualifies the columns read; a tombstone reads only the key and the
    row-level stamps, and its data columns and field stamps are typed NULLs.
    """

    def read(name: str) -> str:
        return f"{alias}.{qi(name)}"

    cols = [
        read(c.name) if not tombstone or c.name == spec.key else f"NULL::{c.type.pg} AS {qi(c.name)}"
        for c in spec.columns
    ]
    meta = [read("_hlc"), read("_node"), read("_base_hlc"), f"{str(tombstone).lower()} AS {DELETED}"]
    stamps = [stamp_column(c.name) for c in spec.data_columns] if spec.field_wise else []
    fields = [f"NULL::bigint AS {qi(s)}" if tombstone else read(s) for s in stamps]
    return ", ".join([*cols, *meta, *fields])


def window_sql(spec: TableSpec, cursor: int, watermark: int, peer: str | None) -> str:
    """The query of one table's window: live rows, then tombstones, in the wire schema."""
    where = f"_cursor >= '{cursor}'::xid8 AND _cursor < '{watermark}'::xid8"
    if peer is not None:
        where += f" AND _origin IS DISTINCT FROM {ql(peer)}"
    return (
        f"SELECT {wire_columns(spec, 't', tombstone=False)} FROM {qi(spec.name)} t WHERE {where}\n"
        f"UNION ALL\nSELECT {wire_columns(spec, 't', tombstone=True)} FROM {tomb_table(spec)} t WHERE {where}"
    )


def snapshot_watermark(cur: Any) -> int:
    """The oldest transaction still running in this transaction's snapshot."""
    cur.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
    return int(cur.fetchone()[0])


def read_window(
    conn: Any, registry: Registry, cursor: int, *, peer: str | None = None, tables: Iterable[str] | None = None
) -> Window:
    """Every change in ``[cursor, watermark)``, per table in foreign-key order.

    Runs in one REPEATABLE READ, READ ONLY transaction on ``conn`` (an autocommit
    ADBC connection), so the watermark and all tables come from one snapshot.
    """
    specs = registry.ordered(tables) if tables is not None else list(registry)
    out: dict[str, pa.Table] = {}
    with transaction(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY") as cur:
        watermark = snapshot_watermark(cur)
        for spec in specs:
            if watermark <= cursor:
                out[spec.name] = spec.wire_schema().empty_table()
                continue
            cur.execute(window_sql(spec, cursor, watermark, peer))
            out[spec.name] = conform(cur.fetch_arrow_table(), spec, "window")
    return Window(cursor=cursor, watermark=max(watermark, cursor), tables=out)
