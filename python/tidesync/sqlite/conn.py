"""One SQLite connection through ADBC: SQL statements, Arrow in and Arrow out.

ADBC's SQLite driver reads query results straight into Arrow and ingests Arrow
tables into (temporary) tables with a C loop, so record data never becomes Python
objects. The connection runs in autocommit mode and the store issues its own
``BEGIN IMMEDIATE`` / ``SAVEPOINT`` / ``COMMIT``: an apply must take the write lock
before it reads, and every statement of it must run on this one connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import adbc_driver_manager
import adbc_driver_sqlite
import adbc_driver_sqlite.dbapi as adbc
import pyarrow as pa

#: Constraint failures (NOT NULL, CHECK, UNIQUE, FOREIGN KEY): the row is at fault.
IntegrityError = adbc_driver_manager.IntegrityError
#: Anything else the database reports.
DatabaseError = adbc_driver_manager.DatabaseError

# The driver infers each result column's Arrow type from the first batch of rows. One
# batch per result means the type is inferred from every row (a column that is null in
# its first thousand rows and text later would otherwise fail the read).
_ONE_BATCH = str(1 << 30)


def quote(name: str) -> str:
    """An SQL identifier, double-quoted."""
    return '"' + name.replace('"', '""') + '"'


def literal(value: str) -> str:
    """An SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


class Connection:
    """A thin wrapper over an ADBC SQLite connection in autocommit mode."""

    def __init__(self, path: str | Path, busy_timeout_ms: int = 30_000) -> None:
        self.path = str(path)
        self._db = adbc.connect(self.path, autocommit=True)
        self._cur = self._new_cursor()
        self.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # Foreign keys are checked on this connection (SQLite's default is off); sync
        # apply defers them to commit with PRAGMA defer_foreign_keys.
        self.execute("PRAGMA foreign_keys = ON")
        self.in_transaction = False

    def _new_cursor(self) -> adbc.Cursor:
        cur = self._db.cursor()
        cur.adbc_statement.set_options(**{adbc_driver_sqlite.StatementOptions.BATCH_ROWS.value: _ONE_BATCH})
        return cur

    def _run(self, sql: str, params: Sequence[Any] | None) -> None:
        try:
            self._cur.execute(sql, params)
        except BaseException:
            # A failed statement leaves its parameters bound to the cursor's statement;
            # start over with a fresh one.
            with contextlib.suppress(Exception):
                self._cur.close()
            self._cur = self._new_cursor()
            raise

    def close(self) -> None:
        self._cur.close()
        self._db.close()

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        self._run(sql, params)

    def rows(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        self._run(sql, params)
        return list(self._cur.fetchall())

    def scalar(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        rows = self.rows(sql, params)
        return rows[0][0] if rows else None

    def arrow(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        self._run(sql, params)
        return self._cur.fetch_arrow_table()

    def ingest(self, name: str, table: pa.Table) -> None:
        """Replace the temporary table ``temp.<name>`` with the rows of ``table``."""
        self._cur.adbc_ingest(name, table, mode="replace", temporary=True)

    def executemany(self, sql: str, table: pa.Table) -> None:
        """Run ``sql`` once per row of ``table``, bound by position (a C loop in the driver)."""
        if table.num_rows:
            self._cur.executemany(sql, table)

    @contextlib.contextmanager
    def transaction(self, mode: str = "IMMEDIATE") -> Iterator[None]:
        """``BEGIN <mode>`` ... ``COMMIT``, or ``ROLLBACK`` if the block raises."""
        if self.in_transaction:
            raise RuntimeError("a transaction is already open on this connection")
        self.execute(f"BEGIN {mode}")
        self.in_transaction = True
        try:
            yield
        except BaseException:
            self.in_transaction = False
            with contextlib.suppress(DatabaseError, adbc_driver_manager.Error):
                self.execute("ROLLBACK")
            raise
        self.in_transaction = False
        try:
            self.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(DatabaseError, adbc_driver_manager.Error):
                self.execute("ROLLBACK")
            raise

    def savepoint(self, name: str) -> _Savepoint:
        return _Savepoint(self, name)


class _Savepoint:
    def __init__(self, conn: Connection, name: str) -> None:
        self.conn, self.name = conn, quote(name)

    def __enter__(self) -> _Savepoint:
        self.conn.execute(f"SAVEPOINT {self.name}")
        return self

    def rollback(self) -> None:
        self.conn.execute(f"ROLLBACK TO {self.name}")

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.rollback()
        self.conn.execute(f"RELEASE {self.name}")
