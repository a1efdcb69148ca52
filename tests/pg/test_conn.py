"""`ingest`: Arrow rows into a table with binary COPY, fed to the driver in small batches."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tidesync.pg import conn as pg_conn
from tidesync.pg.conn import connect, ingest, transaction

from .util import rows, run


def _people(n: int, start: int = 0) -> pa.Table:
    ids = pa.array(range(start, start + n), pa.int64())
    names = pa.array([None if i % 7 == 0 else f"name-{i}" for i in range(start, start + n)], pa.string())
    return pa.table({"id": ids, "name": names})


def test_every_row_arrives_once_across_many_batches(pg_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches of about 1 KiB: the 5,000 rows go to the driver as several batches.
    monkeypatch.setattr(pg_conn, "INGEST_BATCH_BYTES", 1024)
    run(pg_db, "CREATE TABLE people (id bigint PRIMARY KEY, name text)")
    table = pa.concat_tables([_people(3000), _people(2000, start=3000)])  # two chunks
    assert len(table.to_batches(max_chunksize=1024)) > 2
    with connect(pg_db) as conn, transaction(conn) as cur:
        ingest(cur, "people", table)
    got = rows(pg_db, "SELECT count(*), count(DISTINCT id), count(name), min(id), max(id) FROM people")
    assert got == [(5000, 5000, 5000 - len(range(0, 5000, 7)), 0, 4999)]
    assert rows(pg_db, "SELECT name FROM people WHERE id IN (6, 7) ORDER BY id") == [("name-6",), (None,)]


def test_a_bad_row_in_a_late_batch_fails_the_whole_copy_with_its_sqlstate(
    pg_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Apply's quarantine bisects on this error, so it must carry the database's SQLSTATE,
    # and none of the batches sent before the bad one may stay behind.
    monkeypatch.setattr(pg_conn, "INGEST_BATCH_BYTES", 1024)
    run(pg_db, "CREATE TABLE people (id bigint PRIMARY KEY, name text)", "INSERT INTO people VALUES (4321, 'old')")
    with connect(pg_db) as conn, transaction(conn) as cur:
        cur.execute("SAVEPOINT before")
        with pytest.raises(Exception) as err:
            ingest(cur, "people", _people(5000))
        assert getattr(err.value, "sqlstate", None) == "23505"  # unique_violation
        cur.execute("ROLLBACK TO SAVEPOINT before")
        ingest(cur, "people", _people(10, start=10_000))
    assert rows(pg_db, "SELECT count(*), min(id) FROM people") == [(11, 4321)]


def test_an_empty_table_ingests_nothing(pg_db: str) -> None:
    run(pg_db, "CREATE TABLE people (id bigint PRIMARY KEY, name text)")
    with connect(pg_db) as conn, transaction(conn) as cur:
        ingest(cur, "people", _people(0))
    assert rows(pg_db, "SELECT count(*) FROM people") == [(0,)]
