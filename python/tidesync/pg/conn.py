"""Connections to PostgreSQL through ADBC: Arrow in, Arrow out, over libpq.

ADBC's PostgreSQL driver reads query results into Arrow with binary ``COPY`` and
ingests Arrow with binary ``COPY``, so rows never become Python objects. One
connection carries a whole apply transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import adbc_driver_postgresql.dbapi as pg_dbapi
import pyarrow as pa

#: Size of the record batches :func:`ingest` hands to ADBC's COPY writer.
INGEST_BATCH_BYTES = 2 << 20


def connect(dsn: str, *, autocommit: bool = True) -> Any:
    """Open an ADBC DB-API connection (a context manager; closes on exit).

    Autocommit by default: use :func:`transaction` for explicit transactions.
    """
    return pg_dbapi.connect(dsn, autocommit=autocommit)


def ingest(cur: Any, table_name: str, rows: pa.Table, *, temporary: bool = False) -> None:
    """Append ``rows`` to ``table_name`` with binary ``COPY`` (ADBC's ``adbc_ingest``).

    Fed in batches of about :data:`INGEST_BATCH_BYTES`: the driver encodes a whole
    batch before it sends any of it, so one large batch leaves the server idle while
    the client encodes and the client idle while the server inserts. In small batches
    the two overlap: 500k demo patients (100 MB) go into a temporary table in 0.85 s
    instead of 1.75 s, as fast as ``psql`` sends a prepared file.
    """
    if rows.num_rows == 0:
        cur.adbc_ingest(table_name, rows, mode="append", temporary=temporary)
        return
    per_row = max(1, rows.nbytes // rows.num_rows)
    batches = rows.to_batches(max_chunksize=max(1024, INGEST_BATCH_BYTES // per_row))
    reader = pa.RecordBatchReader.from_batches(rows.schema, batches)
    cur.adbc_ingest(table_name, reader, mode="append", temporary=temporary)


def with_database(dsn: str, database: str) -> str:
    """The same libpq URI pointing at another database (query options kept)."""
    base, query = (dsn.split("?", 1) + [""])[:2]
    return f"{base.rsplit('/', 1)[0]}/{database}" + (f"?{query}" if query else "")


def create_database(server_dsn: str, name: str, *, replace: bool = False) -> str:
    """Create database ``name`` on the server of ``server_dsn``; returns its DSN."""
    with connect(server_dsn) as conn, conn.cursor() as cur:
        if replace:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    return with_database(server_dsn, name)


def drop_database(server_dsn: str, name: str) -> None:
    """Drop database ``name`` (closing its sessions) if it exists."""
    with connect(server_dsn) as conn, conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def split_sql(script: str) -> list[str]:
    """Split a SQL script into statements.

    ADBC prepares every statement, and PostgreSQL refuses several commands in one
    prepared statement, so scripts (DDL files, install) run one statement at a time.
    Semicolons inside quotes, dollar-quoted bodies and comments do not split.
    """
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(script)
    while i < n:
        ch = script[i]
        if ch == "-" and script.startswith("--", i):
            j = script.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if ch == "/" and script.startswith("/*", i):
            j = script.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if ch in ("'", '"'):
            j = i + 1
            while j < n:
                if script[j] == ch:
                    if j + 1 < n and script[j + 1] == ch:  # doubled quote
                        j += 2
                        continue
                    break
                j += 1
            buf.append(script[i : j + 1])
            i = j + 1
            continue
        if ch == "$":
            j = script.find("$", i + 1)
            tag = script[i : j + 1] if j > 0 else ""
            if tag and (tag == "$$" or tag[1:-1].replace("_", "a").isalnum()):
                end = script.find(tag, j + 1)
                end = n if end < 0 else end + len(tag)
                buf.append(script[i:end])
                i = end
                continue
        if ch == ";":
            stmt = "".join(buf).strip()
            if stmt:
                out.append(stmt)
            buf = []
            i += 1
            continue
        buf.append(ch)
        i += 1
    stmt = "".join(buf).strip()
    if stmt:
        out.append(stmt)
    return out


def execute_script(cur: Any, script: str) -> None:
    """Run every statement of ``script`` on an ADBC cursor, in order."""
    for stmt in split_sql(script):
        cur.execute(stmt)


@contextlib.contextmanager
def transaction(conn: Any, begin: str = "BEGIN") -> Iterator[Any]:
    """A transaction on an autocommit ADBC connection, driven by plain SQL.

    ADBC's own transaction mode refuses every statement after an error until a full
    rollback, which rules out savepoints; so stores keep the connection in autocommit
    and send ``BEGIN`` / ``SAVEPOINT`` / ``COMMIT`` themselves. Yields a cursor;
    commits on success, rolls back on any exception (including KeyboardInterrupt).
    """
    with conn.cursor() as cur:
        cur.execute(begin)
        try:
            yield cur
        except BaseException:
            with contextlib.suppress(Exception):
                cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")
