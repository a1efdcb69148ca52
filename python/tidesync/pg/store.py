"""``PostgresStore``: a facility or central server's database as a sync store."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

from tidesync.changes import NO_OPTIONS, ApplyOptions, ApplyPlan, ApplyResult, TableApplyStats, Window
from tidesync.errors import NotInstalledError, SyncError
from tidesync.pg import apply as _apply
from tidesync.pg import capture, install
from tidesync.pg.conn import connect
from tidesync.pg.install import SCHEMA, qi, ql, tomb_table
from tidesync.quarantine import RetryOutcome, discard_in, retry_in
from tidesync.registry import Registry


#: Session memory for apply's staging tables (allocated only as they are used).
TEMP_BUFFERS = "512MB"


class PostgresStore:
    """One PostgreSQL database holding synced tables (see :class:`tidesync.store.Store`).

    Holds one ADBC connection; not for use from several threads at once.
    """

    def __init__(self, dsn: str, registry: Registry) -> None:
        self.dsn = dsn
        self.registry = registry
        self._conn: Any = connect(dsn)
        with self._conn.cursor() as cur:
            # Apply stages incoming rows in temporary tables, which live in per-session
            # buffers (8MB by default): a bulk apply would spill them to disk. Only
            # settable before the session first touches a temporary table.
            cur.execute(f"SET temp_buffers = '{TEMP_BUFFERS}'")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connection(self) -> Any:
        """The ADBC connection (autocommit; transactions are explicit SQL)."""
        return self._conn

    def create_app_tables(self) -> None:
        """Create the registry's application tables from its shipped DDL (demo schema only)."""
        from tidesync.pg.conn import execute_script
        from tidesync.schemas.demo import app_ddl

        if self.registry.name != "demo":
            raise SyncError(f"no shipped DDL for registry {self.registry.name!r}: create the tables yourself")
        with self._conn.cursor() as cur:
            execute_script(cur, app_ddl("postgres"))

    def install(self, node_id: str) -> None:
        install.install(self._conn, self.registry, node_id)

    def uninstall(self) -> None:
        install.uninstall(self._conn, self.registry)

    def node_id(self) -> str:
        with self._conn.cursor() as cur:
            node = install.installed_node(cur)
        if node is None:
            raise NotInstalledError(f"tidesync is not installed in {self.dsn}: run `tidesync schema install`")
        return node

    def read_window(self, cursor: int, *, peer: str | None = None, tables: Iterable[str] | None = None) -> Window:
        return capture.read_window(self._conn, self.registry, cursor, peer=peer, tables=tables)

    def apply(
        self,
        batches: Mapping[str, Any],
        *,
        peer: str | None,
        cursor: tuple[str, int] | None = None,
        options: ApplyOptions = NO_OPTIONS,
    ) -> ApplyResult:
        return _apply.apply_changes(self._conn, self.registry, batches, peer=peer, cursor=cursor, options=options)

    def apply_parts(
        self,
        parts: Iterable[tuple[str, Any]],
        *,
        peer: str | None,
        cursor: tuple[str, int] | None = None,
        options: ApplyOptions = NO_OPTIONS,
    ) -> ApplyResult:
        """Apply a stream of ``(table, batch)`` parts in one transaction, one part in memory at a time."""
        return _apply.apply_parts(self._conn, self.registry, parts, peer=peer, cursor=cursor, options=options)

    def read_rows(self, table: str, keys: Any) -> pa.Table:
        """The current versions of ``keys`` (live rows, else tombstones), wire schema."""
        from tidesync.pg.conn import transaction

        spec = self.registry[table]
        keys = pa.array(keys) if not isinstance(keys, (pa.Array, pa.ChunkedArray)) else keys
        with transaction(self._conn, "BEGIN ISOLATION LEVEL REPEATABLE READ") as cur:
            return _apply.read_local(cur, spec, pa.chunked_array([keys]) if isinstance(keys, pa.Array) else keys,
                                     lock=False)  # fmt: skip

    def forget(self, table: str, keys: Any, *, below: int) -> int:
        """Delete rows of ``table`` by key without leaving tombstones (push-then-delete).

        Only rows last written before cursor ``below`` go: a row changed since it was
        pushed stays until its new version has been pushed too.
        """
        spec = self.registry[table]
        keys = pa.array(keys) if not isinstance(keys, (pa.Array, pa.ChunkedArray)) else keys
        if len(keys) == 0:
            return 0
        from tidesync.pg.conn import transaction

        with transaction(self._conn) as cur:
            cur.execute(f"SET LOCAL {install.APPLYING_GUC} = 'on'")
            _apply._stage(cur, spec, pa.table({spec.key: keys}), key_only=True)
            k = qi(spec.key)
            cur.execute(
                f"DELETE FROM {qi(spec.name)} t USING {_apply.KEYS} s "
                f"WHERE t.{k} = s.{k} AND t._cursor < '{int(below)}'::xid8"
            )
            return int(cur.rowcount)

    def get_setting(self, name: str) -> str | None:
        rows = self._query(f"SELECT value FROM {SCHEMA}.settings WHERE name = {ql(name)}")
        return str(rows.column(0)[0].as_py()) if rows.num_rows else None

    def set_setting(self, name: str, value: str) -> None:
        with self._conn.cursor() as cur:
            cur.execute(
                f"INSERT INTO {SCHEMA}.settings (name, value) VALUES ({ql(name)}, {ql(value)}) "
                "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()"
            )

    def get_cursor(self, name: str) -> int:
        rows = self._query(f"SELECT value FROM {SCHEMA}.cursors WHERE name = {ql(name)}")
        return int(rows.column(0)[0].as_py()) if rows.num_rows else 0

    def set_cursor(self, name: str, value: int) -> None:
        with self._conn.cursor() as cur:
            _apply._save_cursor(cur, name, value)

    def conflicts(self, table: str | None = None, *, conflict_id: int | None = None) -> pa.Table:
        conds = ([] if table is None else [f"table_name = {ql(table)}"]) + (
            [] if conflict_id is None else [f"id = {int(conflict_id)}"]
        )
        where = f" WHERE {' AND '.join(conds)}" if conds else ""
        return self._query(
            "SELECT id, table_name, key, loser_hlc, loser_node, winner_hlc, winner_node, lost_columns, "
            f"loser_row::text AS loser_row, peer, recorded_at FROM {SCHEMA}.conflicts{where} ORDER BY id"
        )

    def quarantine(
        self, table: str | None = None, *, status: str | None = None, entry_id: int | None = None
    ) -> pa.Table:
        conds = [f"{col} = {value}" for col, value in
                 (("table_name", None if table is None else ql(table)),
                  ("status", None if status is None else ql(status)),
                  ("id", None if entry_id is None else str(int(entry_id)))) if value is not None]  # fmt: skip
        where = f" WHERE {' AND '.join(conds)}" if conds else ""
        with self._conn.cursor() as cur:
            install.upgrade_quarantine(cur)
        return self._query(
            "SELECT id, table_name, key, hlc, node, row_data::text AS row_data, reason, peer, recorded_at, status, "
            f"attempts, resolved_at, note, version FROM {SCHEMA}.quarantine{where} ORDER BY id"
        )

    def retry_quarantined(
        self, ids: Sequence[int] | None = None, *, table: str | None = None
    ) -> list[RetryOutcome]:
        """Apply held quarantine entries again, in one transaction (:func:`tidesync.quarantine.retry_in`)."""
        with _apply.quarantine_transaction(self._conn) as txn:
            return retry_in(txn, self.registry, ids, table)

    def discard_quarantined(self, ids: Sequence[int], note: str) -> list[int]:
        """Mark held quarantine entries discarded, with ``note`` saying who decided and why."""
        with _apply.quarantine_transaction(self._conn) as txn:
            return discard_in(txn, ids, note)

    def _query(self, sql: str) -> pa.Table:
        with self._conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetch_arrow_table()

    def clock_ms(self) -> int:
        """``clock_timestamp()`` in Unix ms: the clock the capture triggers stamp with
        (``install.NOW_HLC``), read the same way so a skewed clock shows as it stamps."""
        with self._conn.cursor() as cur:
            cur.execute("SELECT (date_part('epoch', clock_timestamp()) * 1000)::bigint")
            return int(cur.fetchone()[0])

    @contextlib.contextmanager
    def write_verbatim(self, origin: str) -> Iterator[PostgresVerbatimWrite]:
        """One transaction writing versions as they are (:class:`tidesync.store.VerbatimWrite`).

        It runs as an apply does (``tidesync.applying`` on: the capture triggers stand
        aside, a delete leaves no tombstone of its own; constraints deferred to the end)
        with the writers of :mod:`tidesync.pg.apply`."""
        from tidesync.pg.conn import transaction

        with transaction(self._conn) as cur:
            _apply._apply_settings(cur)
            yield PostgresVerbatimWrite(cur, self.registry, origin)
            cur.execute("SET CONSTRAINTS ALL IMMEDIATE")


class PostgresVerbatimWrite:
    """The statements of :meth:`PostgresStore.write_verbatim`, on its transaction's cursor."""

    def __init__(self, cur: Any, registry: Registry, origin: str) -> None:
        self.cur, self.registry, self.origin = cur, registry, origin

    def current(self, table: str, keys: pa.Array) -> pa.Table:
        return _apply.read_local(self.cur, self.registry[table], pa.chunked_array([keys]), lock=True)

    def set_aside(self, table: str, rows: pa.Table, reason: str) -> list[int]:
        spec, cur = self.registry[table], self.cur
        if rows.num_rows == 0:
            return []
        cur.execute(f"SELECT coalesce(max(id), 0) FROM {SCHEMA}.quarantine")
        mark = int(cur.fetchone()[0])
        _apply._quarantine(cur, spec, rows, [(reason, i) for i in range(rows.num_rows)], None, NO_OPTIONS)
        _apply._stage(cur, spec, pa.table({spec.key: rows.column(spec.key)}), key_only=True)
        k = qi(spec.key)
        cur.execute(f"DELETE FROM {qi(spec.name)} t USING {_apply.KEYS} s WHERE t.{k} = s.{k}")
        # A row still referenced fails here, by name, rather than in a later write.
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cur.execute("SET CONSTRAINTS ALL DEFERRED")
        cur.execute(f"SELECT id FROM {SCHEMA}.quarantine WHERE id > {mark} AND table_name = {ql(spec.name)} "
                    f"AND reason = {ql(reason)} ORDER BY id")  # fmt: skip
        return [int(r[0]) for r in cur.fetchall()]

    def upsert(self, plan: ApplyPlan, stats: TableApplyStats) -> None:
        spec, cur, write = plan.spec, self.cur, _apply._write
        stats.inserted += write(cur, spec, plan.inserts, self.origin, NO_OPTIONS, stats, _apply._insert_rows)
        if len(plan.revived):
            _apply._stage(cur, spec, pa.table({spec.key: plan.revived}), key_only=True)
            k = qi(spec.key)
            cur.execute(f"DELETE FROM {tomb_table(spec)} t USING {_apply.KEYS} s WHERE t.{k} = s.{k}")
        stats.updated += write(cur, spec, plan.updates, self.origin, NO_OPTIONS, stats, _apply._update_rows)

    def delete(self, plan: ApplyPlan, stats: TableApplyStats) -> None:
        stats.deleted += _apply._write(self.cur, plan.spec, plan.deletes, self.origin, NO_OPTIONS, stats,
                                       _apply._delete_rows)  # fmt: skip
