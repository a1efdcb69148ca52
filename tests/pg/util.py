"""Small helpers for talking SQL to a test database."""

from __future__ import annotations

import uuid
from typing import Any

from tidesync.pg.conn import connect


def run(dsn: str, *statements: str) -> None:
    """Run statements in one committed transaction (as the application would)."""
    with connect(dsn, autocommit=False) as conn:
        with conn.cursor() as cur:
            for s in statements:
                cur.execute(s)
        conn.commit()


def rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(query)
        return list(cur.fetchall())


def one(dsn: str, query: str) -> Any:
    return rows(dsn, query)[0][0]


def new_id() -> str:
    return str(uuid.uuid4())


def seed_patient(dsn: str, first_name: str = "Ann", pid: str | None = None) -> str:
    """Insert a village and a patient in it; returns the patient id."""
    pid = pid or new_id()
    vid = new_id()
    run(
        dsn,
        f"INSERT INTO reference_data (id, type, code, name) VALUES ('{vid}', 'village', 'v-{vid[:8]}', 'Village')",
        f"INSERT INTO patients (id, display_id, first_name, last_name, village_id) "
        f"VALUES ('{pid}', 'P-{pid[:6]}', '{first_name}', 'Lee', '{vid}')",
    )
    return pid


def seed_encounter(dsn: str, pid: str, vitals: int = 3) -> str:
    """A facility, an encounter of patient ``pid`` there, and ``vitals`` vitals; returns the encounter id."""
    fid, eid = new_id(), new_id()
    stmts = [
        f"INSERT INTO facilities (id, code, name) VALUES ('{fid}', 'f-{fid[:8]}', 'Clinic')",
        f"INSERT INTO encounters (id, patient_id, facility_id, encounter_type, start_at) "
        f"VALUES ('{eid}', '{pid}', '{fid}', 'clinic', now())",
    ]
    for i in range(vitals):
        stmts.append(
            f"INSERT INTO vitals (id, encounter_id, patient_id, recorded_at, temperature_c, heart_rate) "
            f"VALUES ('{new_id()}', '{eid}', '{pid}', now(), {36.5 + i / 10}, {70 + i})"
        )
    run(dsn, *stmts)
    return eid
