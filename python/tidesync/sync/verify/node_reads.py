"""What a verify reads on the node: its cursors, its pending keys and the row hashes of
its copy, all in one consistent snapshot of its database (one REPEATABLE READ
transaction on PostgreSQL, shared with helper connections for large tables; one read
transaction on SQLite)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from tidesync.errors import SyncError
from tidesync.pg.capture import wire_columns
from tidesync.pg.install import SCHEMA, qi, ql, tomb_table
from tidesync.registry import TableSpec
from tidesync.sync.protocol import CENTRAL_PEER
from tidesync.sync.verify import pg_scan
from tidesync.sync.verify.hashing import as_keys, empty_hashes, empty_keys, hash_rows, hashed_select

if TYPE_CHECKING:
    from tidesync.pg.store import PostgresStore
    from tidesync.sqlite.store import SQLiteStore
    from tidesync.store import Store


class NodeSnapshot(Protocol):
    """Reads of one consistent snapshot of the node's database."""

    def cursors(self) -> tuple[int, int]:
        """(push cursor, pull cursor)."""

    def pending(self, spec: TableSpec, push: int) -> pa.Array:
        """Keys (live or deleted) changed here at or after ``push`` and not pulled from central."""

    def row_hashes(self, spec: TableSpec, leave_out: pa.Array) -> pa.Table:
        """``{key, bucket, hash}`` of every live row of the table but the ``leave_out`` keys."""


@contextlib.contextmanager
def node_snapshot(store: Store) -> Iterator[NodeSnapshot]:
    from tidesync.pg.store import PostgresStore
    from tidesync.sqlite.store import SQLiteStore

    if isinstance(store, PostgresStore):
        with _pg_snapshot(store) as pg:
            yield pg
    elif isinstance(store, SQLiteStore):
        with store.connection.transaction("DEFERRED"):
            yield _SqliteSnapshot(store)
    else:
        raise SyncError(f"verify works on PostgreSQL and SQLite nodes, not {type(store).__name__}")


@contextlib.contextmanager
def _pg_snapshot(store: PostgresStore) -> Iterator[NodeSnapshot]:
    from tidesync.pg.conn import transaction

    with transaction(store.connection, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY") as cur:
        shared = pg_scan.SharedSnapshot(cur, store.dsn)
        try:
            yield _PgSnapshot(cur, shared)
        finally:
            shared.close()


class _PgSnapshot:
    def __init__(self, cur: Any, shared: pg_scan.SharedSnapshot) -> None:
        self.cur, self.shared = cur, shared

    def cursors(self) -> tuple[int, int]:
        from tidesync.sync.client import PULL_CURSOR, PUSH_CURSOR

        names = f"{ql(PUSH_CURSOR)}, {ql(PULL_CURSOR)}"
        self.cur.execute(f"SELECT name, value FROM {SCHEMA}.cursors WHERE name IN ({names})")
        got = {str(n): int(v) for n, v in self.cur.fetchall()}
        return got.get(PUSH_CURSOR, 0), got.get(PULL_CURSOR, 0)

    def pending(self, spec: TableSpec, push: int) -> pa.Array:
        where = f"t._cursor >= '{int(push)}'::xid8 AND t._origin IS DISTINCT FROM {ql(CENTRAL_PEER)}"
        k = qi(spec.key)
        self.cur.execute(f"SELECT t.{k} FROM {qi(spec.name)} t WHERE {where} "
                         f"UNION SELECT t.{k} FROM {tomb_table(spec)} t WHERE {where}")  # fmt: skip
        col = self.cur.fetch_arrow_table().column(0)
        return as_keys(spec, col) if len(col) else empty_keys(spec)

    def row_hashes(self, spec: TableSpec, leave_out: pa.Array) -> pa.Table:
        select = f"SELECT {wire_columns(spec, 't', tombstone=False)} FROM {qi(spec.name)} t"
        return pg_scan.scan_hashes(self.cur, self.shared, spec, lambda blocks: hashed_select(
            spec, f"{select} WHERE {blocks}"), leave_out=leave_out, what="local rows")  # fmt: skip


class _SqliteSnapshot:
    def __init__(self, store: SQLiteStore) -> None:
        self.conn = store.connection  # the store's own: one SQLite library per process

    def cursors(self) -> tuple[int, int]:
        from tidesync.sqlite import names
        from tidesync.sqlite.conn import quote
        from tidesync.sync.client import PULL_CURSOR, PUSH_CURSOR

        got = {str(n): int(v) for n, v in self.conn.rows(f"SELECT name, value FROM {quote(names.CURSORS)}")}
        return got.get(PUSH_CURSOR, 0), got.get(PULL_CURSOR, 0)

    def pending(self, spec: TableSpec, push: int) -> pa.Array:
        from tidesync.sqlite import names
        from tidesync.sqlite.conn import quote
        from tidesync.sqlite.types import from_storage

        k = quote(spec.key)
        where = "_cursor >= ? AND _origin IS NOT ?"
        got = self.conn.arrow(f"SELECT {k} FROM {quote(spec.name)} WHERE {where} UNION "
                              f"SELECT {k} FROM {quote(names.tombstones(spec.name))} WHERE {where}",
                              [int(push), CENTRAL_PEER, int(push), CENTRAL_PEER])  # fmt: skip
        if got.num_rows == 0:
            return empty_keys(spec)
        return from_storage(got.column(0), spec.column(spec.key).type, f"{spec.name}.{spec.key}")

    def row_hashes(self, spec: TableSpec, leave_out: pa.Array) -> pa.Table:
        from tidesync.sqlite.capture import select_columns, to_wire
        from tidesync.sqlite.conn import quote

        stored = self.conn.arrow(f"SELECT {', '.join(quote(c) for c in select_columns(spec))} FROM {quote(spec.name)}")
        if stored.num_rows == 0:
            return empty_hashes(spec)
        rows = to_wire(spec, stored)
        if len(leave_out):
            rows = rows.filter(pc.invert(pc.is_in(rows.column(spec.key), value_set=leave_out)))
        return hash_rows(spec, rows)
