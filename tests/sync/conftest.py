"""A live network for the sync tests: central + two facilities (PostgreSQL) + one mobile
(SQLite), talking real HTTP over 127.0.0.1."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tidesync.schemas.demo import REGISTRY
from tidesync.sqlite.conn import Connection
from tidesync.sync import central
from tidesync.sync.local import LocalNetwork, LocalNode
from tests.conftest import PgServer
from tests.pg.util import rows as pg_rows
from tests.pg.util import run as pg_run

FACILITY_A = "0a000000-0000-4000-8000-00000000000a"
FACILITY_B = "0b000000-0000-4000-8000-00000000000b"


def sql(node: LocalNode | LocalNetwork, *statements: str) -> None:
    """Run statements as the application would, on a node's (or central's) own database."""
    if isinstance(node, LocalNetwork):
        pg_run(node.central_dsn, *statements)
    elif node.kind == "facility":
        pg_run(node.db, *statements)
    else:
        # The store's SQLite (ADBC), not the stdlib's: see docs/sqlite.md, one library per process.
        db = Connection(node.db)
        try:
            db.execute("PRAGMA foreign_keys = ON")
            with db.transaction("IMMEDIATE"):
                for s in statements:
                    db.execute(s)
        finally:
            db.close()


def query(node: LocalNode | LocalNetwork, q: str) -> list[tuple[Any, ...]]:
    if isinstance(node, LocalNetwork):
        return pg_rows(node.central_dsn, q)
    if node.kind == "facility":
        return pg_rows(node.db, q)
    db = Connection(node.db)
    try:
        return db.rows(q)
    finally:
        db.close()


def ids(node: LocalNode | LocalNetwork, table: str) -> set[str]:
    return {str(r[0]) for r in query(node, f"SELECT id FROM {table}")}


@dataclass
class Net:
    net: LocalNetwork
    a: LocalNode
    b: LocalNode
    mobile: LocalNode

    def new_patient(self, at: LocalNode, name: str = "Ana", *, mark: bool = True) -> str:
        """A patient created at ``at`` (and marked for its facility), with one encounter."""
        pid = str(uuid.uuid4())
        stmts = [f"INSERT INTO patients (id, display_id, first_name) VALUES ('{pid}', 'P-{pid[:6]}', '{name}')"]
        if mark:
            stmts.append(f"INSERT INTO patient_facilities (id, patient_id, facility_id) "
                         f"VALUES ('{uuid.uuid4()}', '{pid}', '{at.facility_id}')")  # fmt: skip
            stmts.append(self.encounter_sql(at, pid))
        sql(at, *stmts)
        return pid

    @staticmethod
    def encounter_sql(at: LocalNode, pid: str, eid: str | None = None) -> str:
        eid = eid or str(uuid.uuid4())
        now = "'2026-11-21T10:00:00.000000Z'" if at.kind == "mobile" else "now()"
        return (f"INSERT INTO encounters (id, patient_id, facility_id, encounter_type, start_at) "
                f"VALUES ('{eid}', '{pid}', '{at.facility_id}', 'clinic', {now})")  # fmt: skip

    def share(self, pid: str) -> None:
        """A patient created at A becomes known at B and is marked there, everyone synced."""
        self.a.sync(), self.b.sync()
        self.mark(self.b, pid)
        self.b.sync(), self.a.sync()

    def mark(self, at: LocalNode, pid: str) -> None:
        sql(at, f"INSERT INTO patient_facilities (id, patient_id, facility_id) "
                f"VALUES ('{uuid.uuid4()}', '{pid}', '{at.facility_id}')")  # fmt: skip


@pytest.fixture
def network(pg_server: PgServer, tmp_path: Path) -> Iterator[Net]:
    settings = central.Settings(max_page_bytes=4 * 1024 * 1024)
    with LocalNetwork(pg_server.dsn, REGISTRY, tmp_path, settings=settings) as net:
        sql(net, f"INSERT INTO facilities (id, code, name) VALUES ('{FACILITY_A}', 'A', 'Clinic A'), "
                 f"('{FACILITY_B}', 'B', 'Hospital B')")  # fmt: skip
        a = net.add_node("fac-a", "facility", FACILITY_A)
        b = net.add_node("fac-b", "facility", FACILITY_B)
        m = net.add_node("mob-a", "mobile", FACILITY_A)
        for n in (a, b, m):
            n.sync()
        yield Net(net, a, b, m)
