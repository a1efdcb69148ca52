"""Fixtures shared by every test: a real PostgreSQL server and fresh databases.

The server is a throwaway cluster started once per test session
(:mod:`tidesync.pg.cluster`), or an existing server named by ``TIDESYNC_TEST_DSN``
(then each test gets its own database on it, dropped after).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest

from tidesync.pg.cluster import TempCluster
from tidesync.pg import PostgresStore
from tidesync.pg.conn import connect, create_database, drop_database

_counter = itertools.count()


class PgServer:
    """The test server: databases are created on it and dropped after each test."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def create_database(self, name: str) -> str:
        return create_database(self.dsn, name, replace=True)

    def drop_database(self, name: str) -> None:
        drop_database(self.dsn, name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for the whole session (throwaway unless TIDESYNC_TEST_DSN is set)."""
    if dsn := os.environ.get("TIDESYNC_TEST_DSN"):
        yield PgServer(dsn)
        return
    with TempCluster() as cluster:
        yield PgServer(cluster.dsn)


@pytest.fixture
def pg_db(pg_server: PgServer) -> Iterator[str]:
    """The DSN of a fresh, empty database, dropped after the test."""
    name = f"ts_test_{os.getpid()}_{next(_counter)}"
    dsn = pg_server.create_database(name)
    yield dsn
    pg_server.drop_database(name)


def create_demo_tables(dsn: str) -> None:
    """Create the demo EMR application's own tables in a database."""
    from tidesync.pg.conn import execute_script
    from tidesync.schemas.demo import app_ddl

    with connect(dsn) as conn, conn.cursor() as cur:
        execute_script(cur, app_ddl("postgres"))


@pytest.fixture
def demo_db(pg_db: str) -> str:
    """A fresh database with the demo EMR application's tables, tidesync not installed."""
    create_demo_tables(pg_db)
    return pg_db


@pytest.fixture
def demo_store(demo_db: str) -> Iterator[PostgresStore]:
    """A PostgresStore on a fresh demo database, installed as node ``facility-a``."""
    from tidesync.schemas.demo import REGISTRY

    store = PostgresStore(demo_db, REGISTRY)
    store.install("facility-a")
    yield store
    store.close()


@pytest.fixture
def make_demo_store(pg_server: PgServer) -> Iterator[Callable[[str], PostgresStore]]:
    """Factory of more installed demo stores (one database each), closed and dropped after."""
    from tidesync.schemas.demo import REGISTRY

    made: list[tuple[str, PostgresStore]] = []

    def make(node_id: str) -> PostgresStore:
        name = f"ts_test_{os.getpid()}_{next(_counter)}"
        dsn = pg_server.create_database(name)
        create_demo_tables(dsn)
        store = PostgresStore(dsn, REGISTRY)
        store.install(node_id)
        made.append((name, store))
        return store

    yield make
    for name, store in made:
        store.close()
        pg_server.drop_database(name)
