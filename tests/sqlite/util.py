"""Helpers for the SQLite store tests: the application's SQL and wire batches."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from tidesync.core import hlc_pack, now_ms
from tidesync.registry import DELETED, TableSpec, stamp_column


def new_id() -> str:
    return str(uuid.uuid4())


def ub(text: str) -> bytes:
    """uuid text -> the 16 wire bytes."""
    return uuid.UUID(text).bytes


class App:
    """The application: plain SQL with the standard library, as a phone app would write it."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.conn.execute("PRAGMA foreign_keys = ON")

    def close(self) -> None:
        self.conn.close()

    def run(self, *statements: str | tuple[str, tuple[Any, ...]]) -> None:
        """Statements in one committed transaction."""
        self.conn.execute("BEGIN")
        for s in statements:
            if isinstance(s, tuple):
                self.conn.execute(s[0], s[1])
            else:
                self.conn.execute(s)
        self.conn.execute("COMMIT")

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(sql, params).fetchall())

    def one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self.rows(sql, params)[0][0]

    def row(self, table: str, key: str) -> dict[str, Any]:
        cur = self.conn.execute(f"SELECT * FROM {table} WHERE id = ?", (key,))
        names = [d[0] for d in cur.description]
        r = cur.fetchone()
        assert r is not None, f"no row {key} in {table}"
        return dict(zip(names, r, strict=True))

    def seed_patient(self, first_name: str = "Ann", pid: str | None = None) -> str:
        pid = pid or new_id()
        vid = new_id()
        self.run(
            ("INSERT INTO reference_data (id, type, code, name) VALUES (?, 'village', ?, 'Village')", (vid, vid[:8])),
            ("INSERT INTO patients (id, display_id, first_name, last_name, village_id) VALUES (?, ?, ?, 'Lee', ?)",
             (pid, "P-" + pid[:6], first_name, vid)),
        )  # fmt: skip
        return pid

    def seed_encounter(self, pid: str, vitals: int = 3) -> str:
        fid, eid = new_id(), new_id()
        stmts: list[str | tuple[str, tuple[Any, ...]]] = [
            ("INSERT INTO facilities (id, code, name) VALUES (?, ?, 'Clinic')", (fid, "f-" + fid[:8])),
            ("INSERT INTO encounters (id, patient_id, facility_id, encounter_type, start_at) "
             "VALUES (?, ?, ?, 'clinic', '2024-05-01T08:00:00.000000Z')", (eid, pid, fid)),
        ]  # fmt: skip
        for i in range(vitals):
            stmts.append(
                ("INSERT INTO vitals (id, encounter_id, patient_id, recorded_at, temperature_c, heart_rate) "
                 "VALUES (?, ?, ?, '2024-05-01T08:05:00.000000Z', ?, ?)", (new_id(), eid, pid, 36.5 + i / 10, 70 + i))
            )  # fmt: skip
        self.run(*stmts)
        return eid


def hlc_now() -> int:
    return hlc_pack(now_ms())


def wire(spec: TableSpec, rows: list[dict[str, Any]], *, hlc: int | None = None, node: str = "central") -> pa.Table:
    """A change batch of ``spec`` from dicts of application values (uuid as text).

    Missing columns are null; ``_hlc`` defaults to now, ``_node`` to ``node``, field
    stamps to the row's ``_hlc``.
    """
    schema = spec.wire_schema()
    uuid_cols = {c.name for c in spec.columns if c.type.value == "uuid"}
    out: dict[str, list[Any]] = {f.name: [] for f in schema}
    for r in rows:
        h = r.get("_hlc", hlc if hlc is not None else hlc_now())
        for f in schema:
            if f.name == "_hlc":
                v: Any = h
            elif f.name == "_node":
                v = r.get("_node", node)
            elif f.name == DELETED:
                v = r.get(DELETED, False)
            elif f.name.startswith("_hlc_"):
                v = r.get(f.name, None if r.get(DELETED) else h)
            else:
                v = r.get(f.name)
                if f.name in uuid_cols and v is not None:
                    v = ub(v)
            out[f.name].append(v)
    return pa.table({f.name: pa.array(out[f.name], f.type) for f in schema}, schema=schema)


def stamps(spec: TableSpec, row: dict[str, Any]) -> dict[str, Any]:
    return {c.name: row[stamp_column(c.name)] for c in spec.data_columns}
