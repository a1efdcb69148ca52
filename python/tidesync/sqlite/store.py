"""``SQLiteStore``: the :class:`tidesync.store.Store` of a mobile device's SQLite file."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa

from tidesync.changes import (
    NO_OPTIONS,
    ApplyOptions,
    ApplyPlan,
    ApplyResult,
    TableApplyStats,
    Window,
    conform,
    key_texts,
)
from tidesync.errors import NotInstalledError
from tidesync.quarantine import RetryOutcome, discard_in, retry_in
from tidesync.registry import LogicalType, Registry
from tidesync.sqlite import apply as _apply
from tidesync.sqlite import capture, install, names
from tidesync.sqlite.conn import Connection, quote
from tidesync.sqlite.install import TableInfo
from tidesync.sqlite.types import from_storage

CONFLICTS_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("table_name", pa.string()),
        ("key", pa.string()),
        ("loser_hlc", pa.int64()),
        ("loser_node", pa.string()),
        ("winner_hlc", pa.int64()),
        ("winner_node", pa.string()),
        ("lost_columns", pa.list_(pa.string())),
        ("loser_row", pa.string()),
        ("peer", pa.string()),
        ("recorded_at", pa.timestamp("us", "UTC")),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("table_name", pa.string()),
        ("key", pa.string()),
        ("hlc", pa.int64()),
        ("node", pa.string()),
        ("row_data", pa.string()),
        ("reason", pa.string()),
        ("peer", pa.string()),
        ("recorded_at", pa.timestamp("us", "UTC")),
        ("status", pa.string()),
        ("attempts", pa.int32()),
        ("resolved_at", pa.timestamp("us", "UTC")),
        ("note", pa.string()),
        ("version", pa.binary()),
    ]
)


class SQLiteStore:
    """A node database in one SQLite file (a phone or tablet: one writer at a time).

    The application keeps using the file with any SQLite library; the store holds its
    own connection (ADBC, so data moves as Arrow). See docs/sqlite.md.
    """

    def __init__(self, path: str | Path, registry: Registry, *, busy_timeout_ms: int = 30_000) -> None:
        self.registry = registry
        self.path = Path(path)
        self._conn = Connection(self.path, busy_timeout_ms)
        self._infos: dict[str, install.TableInfo] | None = None

    # -------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def connection(self) -> Connection:
        """The store's own connection (one SQLite library per process: read through it)."""
        return self._conn

    def create_app_tables(self) -> None:
        """Create the demo application's tables from its shipped DDL (demo schema only)."""
        from tidesync.errors import SyncError
        from tidesync.pg.conn import split_sql
        from tidesync.schemas.demo import app_ddl

        if self.registry.name != "demo":
            raise SyncError(f"no shipped DDL for registry {self.registry.name!r}: create the tables yourself")
        # Through the store's own connection: a second SQLite library in this process
        # (the stdlib's) would break the file's locks (see docs/sqlite.md).
        with self._conn.transaction("IMMEDIATE"):
            for statement in split_sql(app_ddl("sqlite")):
                self._conn.execute(statement)

    def install(self, node_id: str) -> None:
        """Add metadata columns, triggers, tombstones and bookkeeping. Idempotent."""
        install.install(self._conn, self.registry, node_id)
        self._infos = None

    def uninstall(self) -> None:
        """Remove everything ``install`` added; application data stays as it is."""
        install.uninstall(self._conn, self.registry)
        self._infos = None

    def node_id(self) -> str:
        node = install.installed_node(self._conn)
        if node is None:
            raise NotInstalledError(f"tidesync is not installed in {self.path}: run `tidesync schema install` first")
        return node

    # -------------------------------------------------------------------- changes

    def read_window(self, cursor: int, *, peer: str | None = None, tables: Iterable[str] | None = None) -> Window:
        """Every change in ``[cursor, watermark)``, per table in foreign-key order."""
        return capture.read_window(self._conn, self.registry, cursor, peer, tables)

    def apply(
        self,
        batches: Mapping[str, pa.Table],
        *,
        peer: str | None,
        cursor: tuple[str, int] | None = None,
        options: ApplyOptions = NO_OPTIONS,
    ) -> ApplyResult:
        """Merge and write incoming change batches in one transaction."""
        return _apply.apply(self._conn, self.registry, self._table_infos(), batches, peer, cursor, options)

    def _table_infos(self) -> dict[str, TableInfo]:
        if self._infos is None:
            self._infos = {s.name: install.inspect(self._conn, s) for s in self.registry}
        return self._infos

    def apply_parts(
        self,
        parts: Iterable[tuple[str, pa.Table]],
        *,
        peer: str | None,
        cursor: tuple[str, int] | None = None,
        options: ApplyOptions = NO_OPTIONS,
    ) -> ApplyResult:
        """Apply a stream of ``(table, batch)`` parts in one transaction.

        The parts are gathered per table first: SQLite writes all upserts parents first
        and all deletes children first, which needs every table's plan at once. A
        mobile device's scope is small by design; large networks of rows live on
        PostgreSQL facility servers, which stream.
        """
        gathered: dict[str, list[pa.Table]] = {}
        for name, batch in parts:  # an unknown table raises SchemaMismatchError (the registry's)
            gathered.setdefault(name, []).append(conform(batch, self.registry[name], "incoming batch"))
        batches = {name: pa.concat_tables(ts) if len(ts) > 1 else ts[0] for name, ts in gathered.items()}
        return self.apply(batches, peer=peer, cursor=cursor, options=options)

    def read_rows(self, table: str, keys: pa.Array | list[object]) -> pa.Table:
        """The current versions of ``keys`` (live rows, else tombstones), wire schema."""
        spec = self.registry[table]
        keys = keys if isinstance(keys, (pa.Array, pa.ChunkedArray)) else pa.array(keys)
        return _apply.read_local(self._conn, spec, pa.table({spec.key: keys}))

    def forget(self, table: str, keys: pa.Array | list[object], *, below: int) -> int:
        """Delete rows of ``table`` by key without leaving tombstones (push-then-delete).

        Only rows last written before cursor ``below`` go: a row changed since it was
        pushed stays until its new version has been pushed too.
        """
        spec = self.registry[table]
        texts = key_texts(spec, keys if isinstance(keys, (pa.Array, pa.ChunkedArray)) else pa.array(keys))
        if not texts:
            return 0
        t, k = quote(spec.name), quote(spec.key)
        tomb = quote(names.tombstones(spec.name))
        gone = 0
        with self._conn.transaction("IMMEDIATE"):
            for i in range(0, len(texts), 500):
                part = texts[i : i + 500]
                marks = ", ".join("?" * len(part))
                doomed = f"SELECT {k} FROM main.{t} WHERE {k} IN ({marks}) AND {quote(names.CURSOR)} < ?"
                keys_here = [r[0] for r in self._conn.rows(doomed, [*part, int(below)])]
                if not keys_here:
                    continue
                marks = ", ".join("?" * len(keys_here))
                self._conn.execute(f"DELETE FROM main.{t} WHERE {k} IN ({marks})", keys_here)
                # The delete trigger left tombstones; forgetting is not deleting.
                self._conn.execute(f"DELETE FROM main.{tomb} WHERE {k} IN ({marks})", keys_here)
                gone += len(keys_here)
        return gone

    def get_setting(self, name: str) -> str | None:
        v = self._conn.scalar(f"SELECT value FROM {quote(names.SETTINGS)} WHERE name = ?", [name])
        return None if v is None else str(v)

    def set_setting(self, name: str, value: str) -> None:
        with self._conn.transaction("IMMEDIATE"):
            self._conn.execute(
                f"INSERT INTO {quote(names.SETTINGS)} (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                [name, value],
            )

    # -------------------------------------------------------------------- bookkeeping

    def get_cursor(self, name: str) -> int:
        v = self._conn.scalar(f"SELECT value FROM {quote(names.CURSORS)} WHERE name = ?", [name])
        return 0 if v is None else int(v)

    def set_cursor(self, name: str, value: int) -> None:
        with self._conn.transaction("IMMEDIATE"):
            _apply.set_cursor(self._conn, name, value)

    def conflicts(self, table: str | None = None, *, conflict_id: int | None = None) -> pa.Table:
        """The conflict log (of ``table``, or the one entry ``conflict_id``): table, key,
        loser and winner stamps, lost columns, losing row (JSON)."""
        return self._log(names.CONFLICTS, CONFLICTS_SCHEMA, table, conflict_id)

    def quarantine(
        self, table: str | None = None, *, status: str | None = None, entry_id: int | None = None
    ) -> pa.Table:
        """Versions that could not be written (of ``table``, with ``status``, or the one
        entry ``entry_id``): see :meth:`tidesync.store.Store.quarantine`."""
        install.upgrade_quarantine(self._conn)
        return self._log(names.QUARANTINE, QUARANTINE_SCHEMA, table, entry_id, status)

    def retry_quarantined(
        self, ids: Sequence[int] | None = None, *, table: str | None = None
    ) -> list[RetryOutcome]:
        """Apply held quarantine entries again, in one transaction (:func:`tidesync.quarantine.retry_in`)."""
        with _apply.quarantine_transaction(self._conn, self._table_infos()) as txn:
            return retry_in(txn, self.registry, ids, table)

    def discard_quarantined(self, ids: Sequence[int], note: str) -> list[int]:
        """Mark held quarantine entries discarded, with ``note`` saying who decided and why."""
        with _apply.quarantine_transaction(self._conn, self._table_infos()) as txn:
            return discard_in(txn, ids, note)

    def _log(
        self, log: str, schema: pa.Schema, table: str | None, entry: int | None = None, status: str | None = None
    ) -> pa.Table:
        conds: list[str] = []
        params: list[object] = []
        for cond, value in (("table_name = ?", table), ("id = ?", entry), ("status = ?", status)):
            if value is not None:
                conds.append(cond)
                params.append(value)
        where = f" WHERE {' AND '.join(conds)}" if conds else ""
        raw = self._conn.arrow(f"SELECT {', '.join(quote(f.name) for f in schema)} FROM {quote(log)}{where} ORDER BY id",
                               params)  # fmt: skip
        arrays = []
        for f, col in zip(schema, raw.columns, strict=True):
            if f.name in ("recorded_at", "resolved_at"):
                arrays.append(from_storage(col, LogicalType.TIMESTAMPTZ, f"{log}.{f.name}"))
            elif f.name == "lost_columns":
                lists = [json.loads(v) for v in col.to_pylist()]
                arrays.append(pa.array(lists, f.type))
            elif col.null_count == len(col):
                arrays.append(pa.nulls(len(col), f.type))
            else:
                arrays.append(col.cast(f.type))
        return pa.Table.from_arrays(arrays, schema=schema)

    def clock_ms(self) -> int:
        """SQLite's ``julianday('now')`` in Unix ms: the clock the capture triggers stamp
        with (``capture.NOW_HLC`` without its shift)."""
        return int(self._conn.scalar("SELECT CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)"))

    @contextlib.contextmanager
    def write_verbatim(self, origin: str) -> Iterator[SQLiteVerbatimWrite]:
        """One ``BEGIN IMMEDIATE`` transaction writing versions as they are
        (:class:`tidesync.store.VerbatimWrite`) with the writers of
        :mod:`tidesync.sqlite.apply`; rows carry a fresh change counter, which keeps the
        capture triggers out. Refused versions reach the quarantine before the commit."""
        infos = self._table_infos()
        with self._conn.transaction("IMMEDIATE"):
            writer = SQLiteVerbatimWrite(self._conn, self.registry, infos, origin)
            yield writer
            _apply._log_quarantine(self._conn, writer.refused)


class SQLiteVerbatimWrite:
    """The statements of :meth:`SQLiteStore.write_verbatim`, inside its transaction."""

    def __init__(self, conn: Connection, registry: Registry, infos: Mapping[str, TableInfo], origin: str) -> None:
        self.conn, self.registry, self.infos, self.origin = conn, registry, infos, origin
        conn.execute("PRAGMA defer_foreign_keys = ON")
        conn.execute(f"UPDATE {quote(names.CLOCK)} SET value = value + 1")
        self.change = int(conn.scalar(f"SELECT value FROM {quote(names.CLOCK)}"))
        self.refused = _apply._Quarantined(origin, NO_OPTIONS)
        self._children: dict[str, Any] | None = None

    def current(self, table: str, keys: pa.Array) -> pa.Table:
        spec = self.registry[table]
        return _apply.read_local(self.conn, spec, pa.table({spec.key: keys}))

    def set_aside(self, table: str, rows: pa.Table, reason: str) -> list[int]:
        spec = self.registry[table]
        if rows.num_rows == 0:
            return []
        mark = int(self.conn.scalar(f"SELECT coalesce(max(id), 0) FROM {quote(names.QUARANTINE)}"))
        kept = _apply._Quarantined(None, NO_OPTIONS)
        kept.add(spec, rows, [reason] * rows.num_rows)
        _apply._log_quarantine(self.conn, kept)
        texts = key_texts(spec, rows.column(spec.key))
        t, k, tomb = quote(spec.name), quote(spec.key), quote(names.tombstones(spec.name))
        for i in range(0, len(texts), 500):
            part = texts[i : i + 500]
            marks = ", ".join("?" * len(part))
            self.conn.execute(f"DELETE FROM main.{t} WHERE {k} IN ({marks})", part)
            # The delete trigger left tombstones: setting a row aside is not a deletion to sync.
            self.conn.execute(f"DELETE FROM main.{tomb} WHERE {k} IN ({marks})", part)
        got = self.conn.rows(f"SELECT id FROM {quote(names.QUARANTINE)} WHERE id > ? AND table_name = ? ORDER BY id",
                             [mark, spec.name])  # fmt: skip
        return [int(r[0]) for r in got]

    def upsert(self, plan: ApplyPlan, stats: TableApplyStats) -> None:
        if plan.inserts.num_rows or plan.updates.num_rows:
            _apply._write_upserts(self.conn, plan, self.infos[plan.spec.name], self.change, stats, self.refused)

    def delete(self, plan: ApplyPlan, stats: TableApplyStats) -> None:
        if not plan.deletes.num_rows:
            return
        if self._children is None:
            self._children = _apply._referencing(self.conn)
        _apply._write_deletes(self.conn, plan, self._children, self.change, stats, self.refused)
