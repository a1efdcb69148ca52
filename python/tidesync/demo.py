"""`tidesync demo`: a whole sync network on this machine, doing what a health system does.

A throwaway PostgreSQL cluster holds the central server's database and one database per
facility server; an outreach worker's mobile device is a SQLite file. The central server
speaks the real sync protocol over HTTP on 127.0.0.1, and every node syncs through it
exactly as it would across a country. The walkthrough:

1. **setup**: central, K facilities and a mobile device; the demo schema everywhere;
   facilities, staff and villages authored centrally.
2. **generate**: N synthetic patients with encounters and vitals at central (set-based
   SQL), each marked for a home facility (some for two).
3. **initial sync**: every node pulls its scope: all patients, and the history of the
   patients marked for its facility.
4. **field-wise merge**: facilities A and B edit the same patients offline, in different
   columns (both edits survive) and, for a few, in the same column (the later stamp
   wins, the loser is in the conflict log).
5. **offline catch-up**: B is offline while A registers new patients and B has a busy
   clinic day; B comes back and pushes and pulls its backlog in one cycle.
6. **patient moves**: B marks patients of A's; their whole history arrives at B in the
   same cycle, and B's new encounters for them go up.
7. **outreach**: the mobile device records visits and vitals offline and syncs; A sees them.
8. **verify**: after a final round, every node holds exactly what its scope says.

Data is written the way an application writes it: plain SQL on each node's own
database; tidesync's triggers capture it.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import adbc_driver_sqlite.dbapi as sqlite_dbapi
import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from tidesync.errors import SyncError
from tidesync.pg.conn import transaction
from tidesync.pg.store import PostgresStore
from tidesync.schemas.demo import REGISTRY
from tidesync.sync.client import CycleReport
from tidesync.sync.local import LocalNetwork, LocalNode

#: Default size: the whole walkthrough runs in well under a minute on two cores.
DEFAULT_PATIENTS = 5_000
DEFAULT_FACILITIES = 2

_NS = uuid.UUID("6f1f3a52-9d4e-4c61-b1a4-5d0e0c1a7e21")
FIRST = ["Amina", "Kofi", "Sione", "Mele", "Tavita", "Leilani", "Nour", "Bao", "Ana", "Joon", "Sela", "Tevita"]
LAST = ["Fifita", "Mensah", "Tupou", "Nguyen", "Haddad", "Kaufana", "Lee", "Silva", "Otieno", "Vake", "Moala"]
VILLAGES = ["Nuku'alofa", "Neiafu", "Pangai", "Ohonua", "Kolonga", "Hihifo", "Vaini", "Haveluloto",
            "Kolofo'ou", "Ha'ateiho", "Fua'amotu", "Houma", "Mu'a", "Talafo'ou", "Nukunuku", "Pea"]  # fmt: skip
PLACES = ["Vaiola", "Prince Ngu", "Niu'ui", "Niu'eiki", "Mu'a", "Ha'apai", "Eua", "Vava'u"]
#: Tables a node holds only for patients marked for its facility.
PATIENT_TABLES = ("patient_additional_data", "encounters", "vitals")
#: What the verification compares of each patient on every node (as text on both engines).
PATIENT_COLUMNS = ("id", "display_id", "first_name", "middle_name", "last_name", "sex", "date_of_birth", "village_id")


def _id(*parts: object) -> str:
    """A stable uuid for a demo object (facility, user, village)."""
    return str(uuid.uuid5(_NS, "/".join(str(p) for p in parts)))


@contextlib.contextmanager
def _device_db(path: str) -> Iterator[Any]:
    """The mobile application's own connection to its SQLite file (a cursor; commits on success).

    Through the ADBC driver, i.e. the same SQLite library the store uses. Not Python's
    ``sqlite3``: that is a second copy of SQLite in this process, and two copies do not
    see each other's POSIX locks, so closing a ``sqlite3`` connection checkpoints and
    deletes the WAL file under the store's open connection, whose later writes are lost.
    """
    with contextlib.closing(sqlite_dbapi.connect(path)) as conn, contextlib.closing(conn.cursor()) as cur:
        cur.execute("PRAGMA foreign_keys = ON")
        yield cur
        conn.commit()


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_list(values: list[str]) -> str:
    return ", ".join(_sql_text(v) for v in values)


def _sql_array(values: list[str], cast: str = "text") -> str:
    return f"ARRAY[{', '.join(_sql_text(v) for v in values)}]::{cast}[]"


class DemoCheckFailed(SyncError):
    """The demo ran, but a node does not hold what its scope says (``summary`` has the details)."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


# ----------------------------------------------------------------------------- records


@dataclass
class Cycle:
    """One sync cycle of one node, as the summary table shows it."""

    node: str
    pushed: int
    pulled: int
    conflicts: int
    seconds: float
    phases: dict[str, float]
    pages: int

    @property
    def rows_per_s(self) -> float:
        return (self.pushed + self.pulled) / max(self.seconds, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "pushed_rows": self.pushed, "pulled_rows": self.pulled,
                "conflicts": self.conflicts, "pages": self.pages, "seconds": round(self.seconds, 4),
                "rows_per_s": round(self.rows_per_s), "phases": self.phases}  # fmt: skip


@dataclass
class Step:
    name: str
    detail: str = ""
    seconds: float = 0.0
    #: Rows written by SQL in this step (generation, application edits).
    written: int = 0
    #: Show rows written per second (bulk generation, not a handful of edits).
    rate: bool = False
    cycles: list[Cycle] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "detail": self.detail, "seconds": round(self.seconds, 4),
                "rows_written": self.written, "cycles": [c.as_dict() for c in self.cycles]}  # fmt: skip


# ----------------------------------------------------------------------------- data (set-based SQL)


def _population_sql(tag: str, count: int, first: int, facilities: list[str], users: list[str],
                    *, second_marks: bool) -> list[str]:  # fmt: skip
    """Statements (one PostgreSQL transaction) creating ``count`` patients with their
    details, marks, encounters (1-5 each) and vitals (2 per encounter).

    Patient ``g`` (``first`` <= g < ``first + count``) is at home at facility
    ``(g - 1) % K``; with ``second_marks`` every 20th is also marked at the next one.
    Ids are md5-derived from ``tag`` and ``g``, so they look random but are stable.
    """
    k = len(facilities)
    fac, usr = _sql_array(facilities, "uuid"), _sql_array(users, "uuid")
    firsts, lasts = _sql_array(FIRST), _sql_array(LAST)
    villages = _sql_array([_id("village", v) for v in VILLAGES], "uuid")
    t = _sql_text(tag)
    return [
        "CREATE TEMP TABLE _demo_new ON COMMIT DROP AS "
        f"SELECT g, md5({t} || ':p:' || g)::uuid AS pid, ({fac})[1 + (g - 1) % {k}] AS fid, "
        f"({usr})[1 + (g - 1) % {k}] AS uid, ({fac})[1 + g % {k}] AS fid2 "
        f"FROM generate_series({first}, {first + count - 1}) g",
        "INSERT INTO patients (id, display_id, first_name, last_name, sex, date_of_birth, village_id) "
        f"SELECT pid, {t} || '-' || lpad(g::text, 7, '0'), ({firsts})[1 + (g * 7) % {len(FIRST)}], "
        f"({lasts})[1 + (g * 13) % {len(LAST)}], (ARRAY['female', 'male'])[1 + g % 2], "
        f"date '1940-01-01' + (g * 37) % 30000, ({villages})[1 + g % {len(VILLAGES)}] FROM _demo_new",
        "INSERT INTO patient_additional_data (id, patient_id, phone, blood_type, height_cm) "
        f"SELECT md5({t} || ':d:' || g)::uuid, pid, '+676 ' || lpad(((g * 7919) % 10000000)::text, 7, '0'), "
        "(ARRAY['A+', 'B+', 'O+', 'AB+', 'O-'])[1 + g % 5], 140 + (g * 31) % 60 FROM _demo_new",
        "INSERT INTO patient_facilities (id, patient_id, facility_id) "
        f"SELECT md5({t} || ':m:' || g)::uuid, pid, fid FROM _demo_new"
        + (f" UNION ALL SELECT md5({t} || ':m2:' || g)::uuid, pid, fid2 FROM _demo_new WHERE g % 20 = 0"
           if second_marks and k > 1 else ""),
        "INSERT INTO encounters (id, patient_id, facility_id, examiner_id, encounter_type, reason, start_at, end_at) "
        f"SELECT md5({t} || ':e:' || g || ':' || e)::uuid, pid, fid, uid, "
        "(ARRAY['clinic', 'clinic', 'admission', 'triage'])[1 + (g + e) % 4], "
        "(ARRAY['cough', 'fever', 'check-up', 'injury', 'antenatal', 'diabetes review'])[1 + (g * e) % 6], "
        "timestamptz '2024-01-01 08:00Z' + ((g * 17 + e * 101) % 700) * interval '1 day' "
        "+ (g % 480) * interval '1 minute', "
        "timestamptz '2024-01-01 08:30Z' + ((g * 17 + e * 101) % 700) * interval '1 day' "
        "+ (g % 480) * interval '1 minute' "
        "FROM _demo_new CROSS JOIN LATERAL generate_series(1, 1 + g % 5) e",
        "INSERT INTO vitals (id, encounter_id, patient_id, recorded_at, temperature_c, heart_rate, systolic, "
        "diastolic, spo2, weight_kg) "
        "SELECT md5(e.id::text || ':v:' || v)::uuid, e.id, e.patient_id, e.start_at + v * interval '5 minutes', "
        "36 + (h % 30) / 10.0, 55 + h % 50, 100 + h % 50, 60 + h % 30, 92 + h % 9, 45 + (h % 600) / 10.0 "
        "FROM encounters e JOIN _demo_new n ON n.pid = e.patient_id "
        "CROSS JOIN LATERAL (SELECT v, abs(hashtext(e.id::text || v)) AS h FROM generate_series(1, 2) v) x",
    ]


def _clinic_day_sql(tag: str, facility: str, user: str) -> list[str]:
    """A busy day at a facility: a visit with two vitals for every patient marked there,
    and updated phone numbers for a third of them."""
    t, f = _sql_text(tag), _sql_text(facility)
    marked = f"SELECT patient_id FROM patient_facilities WHERE facility_id = {f}::uuid AND deleted_at IS NULL"
    return [
        "INSERT INTO encounters (id, patient_id, facility_id, examiner_id, encounter_type, reason, start_at) "
        f"SELECT md5({t} || ':e:' || p.patient_id)::uuid, p.patient_id, {f}::uuid, {_sql_text(user)}::uuid, "
        f"'clinic', 'follow-up', now() - interval '2 hours' FROM ({marked}) p",
        "INSERT INTO vitals (id, encounter_id, patient_id, recorded_at, temperature_c, heart_rate, systolic, "
        "diastolic, spo2, weight_kg) "
        f"SELECT md5({t} || ':v:' || p.patient_id || v)::uuid, md5({t} || ':e:' || p.patient_id)::uuid, "
        "p.patient_id, now() - interval '2 hours' + v * interval '10 minutes', 37.0, 70 + v, 120, 80, 98, 62.5 "
        f"FROM ({marked}) p CROSS JOIN generate_series(1, 2) v",
        f"UPDATE patient_additional_data SET phone = '+676 8' || right(md5({t} || id::text), 6) "
        f"WHERE patient_id IN ({marked}) AND abs(hashtext(id::text)) % 3 = 0",
    ]


# ----------------------------------------------------------------------------- the walkthrough


class Demo:
    def __init__(self, net: LocalNetwork, patients: int, facilities: int, console: Console) -> None:
        self.net = net
        self.n = patients
        self.k = facilities
        self.console = console
        self.steps: list[Step] = []
        self.verified: dict[str, bool] = {}
        self.facility_ids = [_id("facility", i) for i in range(1, facilities + 1)]
        self.user_ids = [_id("user", i) for i in range(1, facilities + 1)]
        self.facilities: list[LocalNode] = []
        self.mobile: LocalNode | None = None
        self.conflict_log: list[dict[str, Any]] = []

    # ---- plumbing

    @contextlib.contextmanager
    def step(self, name: str, detail: str) -> Iterator[Step]:
        step = Step(name, detail)
        self.console.rule(f"[bold]{name}")
        self.console.print(detail, style="dim")
        start = time.perf_counter()
        yield step
        step.seconds = time.perf_counter() - start
        self.steps.append(step)

    @contextlib.contextmanager
    def working(self, description: str) -> Iterator[Callable[[str, int, int], None]]:
        """A transient progress display for a long operation; yields a ``(what, done, total)`` callback."""
        if not self.console.is_terminal:
            yield lambda what, done, total: None
            return
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())  # fmt: skip
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(description, total=None)

            def update(what: str, done: int, total: int) -> None:
                progress.update(task, description=f"{description}: {what} pages", completed=done, total=total)

            yield update

    def sql(self, where: LocalNode | None, statements: list[str], step: Step | None = None,
            what: str = "writing") -> int:  # fmt: skip
        """Run statements in one transaction as the application would; returns rows written."""
        conn = self.net.central.connection if where is None else _pg(where).connection
        written = 0
        with self.working(f"{'central' if where is None else where.name}: {what}"), transaction(conn) as cur:
            for s in statements:
                cur.execute(s)
                if s.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
                    written += max(int(cur.rowcount or 0), 0)
        if step is not None:
            step.written += written
        return written

    def query(self, where: LocalNode | None, sql: str) -> pa.Table:
        conn = self.net.central.connection if where is None else _pg(where).connection
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetch_arrow_table()

    def texts(self, where: LocalNode | None, sql: str) -> list[tuple[Any, ...]]:
        """Rows of a query at central or on any node (the device through its own connection)."""
        if where is not None and where.kind == "mobile":
            with _device_db(where.db) as cur:
                cur.execute(sql)
                return [tuple(r) for r in cur.fetchall()]
        table = self.query(where, sql)
        return list(zip(*(table.column(i).to_pylist() for i in range(table.num_columns)), strict=True))

    def ids(self, where: LocalNode | None, table: str, condition: str = "true") -> set[str]:
        """The keys of ``table`` (as text) on a node, or at central; SQL that both engines read."""
        return {str(r[0]) for r in self.texts(where, f"SELECT CAST(id AS TEXT) FROM {table} WHERE {condition}")}

    def sync(self, step: Step, node: LocalNode, note: str = "") -> CycleReport:
        start = time.perf_counter()
        with self.working(f"{node.name} ⇄ central") as update:
            report = node.sync(progress=update)
        seconds = time.perf_counter() - start
        cycle = Cycle(node.name, report.pushed_rows, report.pulled_rows, report.conflicts, seconds,
                      dict(report.phases), report.pushed_pages + report.pulled_pages)  # fmt: skip
        step.cycles.append(cycle)
        extra = f", {report.conflicts} conflicts logged" if report.conflicts else ""
        self.console.print(
            f"  {node.name:<12} ↑ {report.pushed_rows:>7,} ↓ {report.pulled_rows:>7,} rows  "
            f"{seconds:6.2f} s  {cycle.rows_per_s:>9,.0f} rows/s{extra}{note}"
        )
        return report

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.verified[name] = ok
        mark = "[green]✓[/]" if ok else "[red]✗[/]"
        self.console.print(f"  {mark} {name}" + (f" [dim]({detail})[/]" if detail else ""))
        return ok

    def patients_of(self, where: LocalNode | None) -> list[tuple[Any, ...]]:
        cols = ", ".join(f"CAST({c} AS TEXT)" for c in PATIENT_COLUMNS)
        return sorted(self.texts(where, f"SELECT {cols} FROM patients"), key=lambda r: str(r[0]))

    # ---- steps

    def setup(self) -> None:
        detail = (f"central server, {self.k} facility servers (PostgreSQL) and an outreach "
                  "device (SQLite); facilities, staff and villages authored centrally")
        with self.step("setup", detail) as step:
            names = [f"{PLACES[i % len(PLACES)]} {'Hospital' if i == 0 else 'Clinic'}"
                     + (f" {i + 1}" if i >= len(PLACES) else "") for i in range(self.k)]  # fmt: skip
            pairs = list(enumerate(zip(self.facility_ids, names, self.user_ids, strict=True), start=1))
            facs = ", ".join(f"({_sql_text(f)}, 'F{i}', {_sql_text(n)})" for i, (f, n, _) in pairs)
            users = ", ".join(f"({_sql_text(u)}, 'nurse{i}@health.example', 'Nurse {i}', 'nurse', {_sql_text(f)})"
                              for i, (f, _, u) in pairs)  # fmt: skip
            villages = ", ".join(f"({_sql_text(_id('village', v))}, 'village', 'V{i}', {_sql_text(v)})"
                                 for i, v in enumerate(VILLAGES))  # fmt: skip
            self.sql(None, [f"INSERT INTO facilities (id, code, name) VALUES {facs}",
                            f"INSERT INTO users (id, email, display_name, role, facility_id) VALUES {users}",
                            f"INSERT INTO reference_data (id, type, code, name) VALUES {villages}"], step)  # fmt: skip
            with self.working("registering nodes"):
                for i, fid in enumerate(self.facility_ids):
                    self.facilities.append(self.net.add_node(f"facility-{i + 1}", "facility", fid))
                self.mobile = self.net.add_node("outreach-1", "mobile", self.facility_ids[0])
            for node in [*self.facilities, self.mobile]:
                where = "PostgreSQL" if node.kind == "facility" else f"SQLite {node.db}"
                home = names[self.facility_ids.index(node.facility_id)]
                self.console.print(f"  {node.name:<12} {node.kind:<8} {home} [dim]({where})[/]")
            self.console.print(f"  central      {self.net.url}")

    def generate(self) -> None:
        detail = (f"{self.n:,} patients with details, encounters and vitals at central "
                  "(set-based SQL), each marked for a home facility, every 20th for two")
        with self.step("generate", detail) as step:
            step.rate = True
            start = time.perf_counter()
            population = _population_sql("P", self.n, 1, self.facility_ids, self.user_ids, second_marks=True)
            rows = self.sql(None, population, step, "generating patients")
            s = time.perf_counter() - start
            self.console.print(f"  {rows:,} rows written in {s:.2f} s ({rows / max(s, 1e-9):,.0f} rows/s)")
            # As after any bulk load: fresh statistics, or the planner takes the new
            # tables for empty ones until autovacuum gets to them.
            with self.working("central: ANALYZE"), self.net.central.connection.cursor() as cur:
                cur.execute("ANALYZE")

    def initial_sync(self) -> None:
        assert self.mobile is not None
        detail = ("each node pulls all patients, and the history of those marked "
                  "for its facility")
        with self.step("initial sync", detail) as step:
            for node in [*self.facilities, self.mobile]:
                self.sync(step, node)

    def field_merge(self) -> None:
        a, b = self.facilities[0], self.facilities[1]
        m = max(10, self.n // 50)
        same = max(2, m // 10)
        picked = [f"P-{g:07d}" for g in range(1, self.n + 1, max(1, self.n // m))][:m]
        both = picked[:same]
        self.merge_ids = (picked, both)
        detail = (f"{a.name} and {b.name} both offline edit the same {len(picked)} "
                  f"patients: A records middle names, B corrects birth dates; for "
                  f"{len(both)} both also fix the first name")
        with self.step("field-wise merge", detail) as step:
            sel, sel_both = _sql_array(picked), _sql_array(both)
            self.sql(a, [f"UPDATE patients SET middle_name = 'Losa' WHERE display_id = ANY({sel})",
                         f"UPDATE patients SET first_name = first_name || ' (A)' WHERE display_id = ANY({sel_both})"],
                     step)  # fmt: skip
            self.sql(b, [f"UPDATE patients SET date_of_birth = date '1990-06-15' WHERE display_id = ANY({sel})",
                         f"UPDATE patients SET first_name = first_name || ' (B)' WHERE display_id = ANY({sel_both})"],
                     step)  # fmt: skip
            before = self.net.central.conflicts("patients").num_rows
            self.sync(step, a, "  (A's edits up)")
            self.sync(step, b, "  (B's up, merged with A's)")
            self.sync(step, a, "  (A gets B's)")
            log = self.net.central.conflicts("patients").slice(before)
            self.conflict_log = log.select(["key", "loser_node", "winner_node", "lost_columns"]).to_pylist()
            self.show_conflicts(log)

    def show_conflicts(self, log: pa.Table) -> None:
        table = Table(title=f"conflict log at central: {log.num_rows} same-column edits (patients)",
                      title_justify="left")  # fmt: skip
        for col in ("patient", "loser", "winner", "lost columns", "lost value"):
            table.add_column(col)
        for row in log.to_pylist()[:3]:
            lost = row["lost_columns"]
            loser = json.loads(row["loser_row"]) if row.get("loser_row") else {}
            cols = lost if isinstance(lost, list) else ([lost] if lost else [])
            value = ", ".join(f"{c}={loser.get(c)!r}" for c in cols if c in loser)
            table.add_row(str(row["key"])[:13] + "…", str(row["loser_node"]), str(row["winner_node"]),
                          ", ".join(map(str, cols)) if cols else str(lost), value)  # fmt: skip
        if log.num_rows > 3:
            table.add_row("…", "", "", "", "")
        self.console.print(table)

    def offline_catch_up(self) -> None:
        a, b = self.facilities[0], self.facilities[1]
        new = max(10, self.n // 5)
        detail = (f"{b.name} is offline: meanwhile {a.name} registers {new:,} patients "
                  f"with their history, and {b.name} has a busy clinic day (a visit and "
                  f"vitals for each of its patients); then {b.name} comes back")
        with self.step("offline catch-up", detail) as step:
            registered = _population_sql("A", new, 1, [a.facility_id], [self.user_ids[0]], second_marks=False)
            rows_a = self.sql(a, registered, step, "registering patients")
            rows_b = self.sql(b, _clinic_day_sql("day-b", b.facility_id, self.user_ids[1]), step, "clinic day")
            self.console.print(f"  {a.name} wrote {rows_a:,} rows; {b.name} wrote {rows_b:,} rows offline")
            self.sync(step, a)
            self.sync(step, b, "  (its backlog up, everything it missed down)")

    def patient_moves(self) -> None:
        a, b = self.facilities[0], self.facilities[1]
        k = self.k
        moving = max(3, self.n // 100)
        # Patients at home at A (g ≡ 1 mod K) and marked nowhere else (g not a multiple of 20).
        picked = [f"P-{g:07d}" for g in range(1, self.n + 1, k) if g % 20 != 0][-moving:]
        self.moved = picked
        detail = (f"{len(picked)} patients of {a.name} move to {b.name}: {b.name} marks "
                  "them and records a first visit; their whole history arrives in "
                  "the same cycle")
        with self.step("patient moves", detail) as step:
            sel, fid, uid = _sql_array(picked), _sql_text(b.facility_id), _sql_text(self.user_ids[1])
            self.sql(b, [
                "INSERT INTO patient_facilities (id, patient_id, facility_id) "
                f"SELECT md5('move:' || id)::uuid, id, {fid}::uuid FROM patients WHERE display_id = ANY({sel})",
                "INSERT INTO encounters (id, patient_id, facility_id, examiner_id, encounter_type, reason, start_at) "
                f"SELECT md5('move:e:' || id)::uuid, id, {fid}::uuid, {uid}::uuid, 'admission', 'transfer', now() "
                f"FROM patients WHERE display_id = ANY({sel})",
            ], step)  # fmt: skip
            self.sync(step, b)
            self.sync(step, a, "  (B's first visits reach A: the patients are still marked there)")
            moved = f"patient_id IN (SELECT id FROM patients WHERE display_id = ANY({sel}))"
            for table in PATIENT_TABLES:
                want = self.ids(None, table, moved)
                self.check(f"moved patients' {table} at {b.name} = central's", self.ids(b, table, moved) == want,
                           f"{len(want):,} rows")  # fmt: skip

    def outreach(self) -> None:
        a, m = self.facilities[0], self.mobile
        assert m is not None
        visits = max(5, self.n // 100)
        detail = (f"{m.name} visits {visits} villagers offline, recording an encounter and "
                  f"vitals for each in its SQLite database, then syncs; {a.name} sees them")
        with self.step("outreach", detail) as step:
            with _device_db(m.db) as db:
                db.execute("SELECT patient_id FROM patient_facilities WHERE facility_id = ? AND deleted_at IS NULL "
                           "ORDER BY patient_id LIMIT ?", (m.facility_id, visits))
                patients = [str(r[0]) for r in db.fetchall()]
                if not patients:
                    raise SyncError(f"{m.name} holds no patients of its facility after its initial sync")
                now = time.time()

                def stamp(ago_s: float) -> str:  # the canonical timestamptz text of docs/sqlite.md
                    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - ago_s)) + ".000000Z"

                encounters: list[tuple[Any, ...]] = []
                vitals: list[tuple[Any, ...]] = []
                for i, pid in enumerate(patients):
                    eid = str(uuid.uuid4())
                    encounters.append((eid, pid, m.facility_id, self.user_ids[0], "outreach", "home visit",
                                       stamp(3600 - i * 30)))  # fmt: skip
                    vitals.append((str(uuid.uuid4()), eid, pid, stamp(3600 - i * 30 - 60), 36.4 + (i % 10) / 10,
                                   60 + i % 40, 110 + i % 30, 70 + i % 20, 95 + i % 5, 50.0 + i % 40))  # fmt: skip
                db.executemany("INSERT INTO encounters (id, patient_id, facility_id, examiner_id, encounter_type, "
                               "reason, start_at) VALUES (?, ?, ?, ?, ?, ?, ?)", encounters)  # fmt: skip
                db.executemany("INSERT INTO vitals (id, encounter_id, patient_id, recorded_at, temperature_c, "
                               "heart_rate, systolic, diastolic, spo2, weight_kg) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", vitals)  # fmt: skip
            step.written += len(encounters) + len(vitals)
            self.outreach_vitals = {v[0] for v in vitals}
            self.console.print(f"  {m.name} recorded {len(encounters)} encounters and {len(vitals)} vitals offline")
            self.sync(step, m, "  (its visits up, what it missed down)")
            self.sync(step, a)
            cond = f"id IN ({_sql_list(sorted(self.outreach_vitals))})"
            self.check(f"outreach vitals reached central and {a.name}",
                       self.ids(None, "vitals", cond) == self.outreach_vitals == self.ids(a, "vitals", cond),
                       f"{len(self.outreach_vitals)} rows")  # fmt: skip

    def final_round(self) -> None:
        assert self.mobile is not None
        with self.step("final round", "every node syncs twice, so each has what the others sent") as step:
            for _ in range(2):
                for node in [*self.facilities, self.mobile]:
                    self.sync(step, node)

    def verify(self) -> None:
        assert self.mobile is not None
        nodes = [*self.facilities, self.mobile]
        with self.step("verify", "every node holds exactly what its scope says"):
            patients = self.patients_of(None)
            for node in nodes:
                fac = _sql_text(node.facility_id)
                marked = f"SELECT patient_id FROM patient_facilities WHERE facility_id = {fac} AND deleted_at IS NULL"
                self.check(f"{node.name}: patients identical to central's", self.patients_of(node) == patients,
                           f"{len(patients):,} patients")  # fmt: skip
                for table in ("facilities", "users", "reference_data"):
                    self.check(f"{node.name}: {table} = central's", self.ids(node, table) == self.ids(None, table))
                want = self.ids(None, "patient_facilities", f"facility_id = {fac}")
                self.check(f"{node.name}: marks = central's for its facility",
                           self.ids(node, "patient_facilities") == want, f"{len(want):,} marks")  # fmt: skip
                for table in PATIENT_TABLES:
                    want = self.ids(None, table, f"patient_id IN ({marked})")
                    self.check(f"{node.name}: {table} = central's for patients marked there",
                               self.ids(node, table) == want, f"{len(want):,} rows")  # fmt: skip
                outside = self.ids(node, "encounters", "patient_id NOT IN (SELECT patient_id FROM patient_facilities)")
                self.check(f"{node.name}: no encounters of patients not marked there", not outside)
                self.check(f"{node.name}: nothing quarantined", node.store.quarantine().num_rows == 0)
            picked, both = self.merge_ids
            edited = (f"SELECT count(*) FROM patients WHERE display_id IN ({_sql_list(picked)}) "
                      "AND middle_name = 'Losa' AND CAST(date_of_birth AS TEXT) = '1990-06-15'")  # fmt: skip
            same = f"SELECT first_name FROM patients WHERE display_id IN ({_sql_list(both)})"
            for where in [None, *nodes]:
                name = "central" if where is None else where.name
                kept = int(self.texts(where, edited)[0][0])
                firsts = [str(r[0]) for r in self.texts(where, same)]
                self.check(f"{name}: both offline edits kept, B's later same-column edit won",
                           kept == len(picked) and len(firsts) == len(both)
                           and all(f.endswith(" (B)") for f in firsts),
                           f"{kept} of {len(picked)} patients")  # fmt: skip
            logged = sum(1 for r in self.conflict_log if "first_name" in str(r["lost_columns"]))
            self.check("same-column edits are in central's conflict log", logged == len(both), f"{logged} entries")
            cond = f"id IN ({_sql_list(sorted(self.outreach_vitals))})"
            self.check(f"{self.mobile.name}: its offline vitals are at central and {self.facilities[0].name}",
                       self.ids(self.mobile, "vitals", cond) == self.ids(None, "vitals", cond)
                       == self.ids(self.facilities[0], "vitals", cond) == self.outreach_vitals)  # fmt: skip

    def summary(self, total_s: float) -> dict[str, Any]:
        table = Table(title=f"tidesync demo: {self.n:,} patients, {self.k} facilities + 1 mobile, {total_s:.1f} s",
                      title_justify="left")  # fmt: skip
        for col, right in (("step", False), ("node", False), ("pushed", True), ("pulled", True), ("written", True),
                           ("seconds", True), ("rows/s", True)):  # fmt: skip
            table.add_column(col, justify="right" if right else "left", no_wrap=True)
        for step in self.steps:
            first = True
            if step.written or not step.cycles:
                rate = f"{step.written / max(step.seconds, 1e-9):,.0f}" if step.rate else ""
                table.add_row(step.name, "(SQL)" if step.written else "", "", "",
                              f"{step.written:,}" if step.written else "", f"{step.seconds:.2f}", rate)  # fmt: skip
                first = False
            for c in step.cycles:
                table.add_row(step.name if first else "", c.node, f"{c.pushed:,}", f"{c.pulled:,}", "",
                              f"{c.seconds:.2f}", f"{c.rows_per_s:,.0f}")  # fmt: skip
                first = False
            table.add_section()
        self.console.print(table)
        failed = [k for k, ok in self.verified.items() if not ok]
        if failed:
            self.console.print(f"[red bold]{len(failed)} of {len(self.verified)} checks failed[/]")
        else:
            self.console.print(f"[green bold]all {len(self.verified)} checks passed[/]: every node holds what its "
                               "scope says")  # fmt: skip
        cycles = [c for s in self.steps for c in s.cycles]
        return {
            "patients": self.n,
            "facilities": self.k,
            "nodes": [n.name for n in [*self.facilities, *([self.mobile] if self.mobile else [])]],
            "seconds": round(total_s, 3),
            "rows_synced": sum(c.pushed + c.pulled for c in cycles),
            "sync_seconds": round(sum(c.seconds for c in cycles), 3),
            "conflicts_logged": len(self.conflict_log),
            "steps": [s.as_dict() for s in self.steps],
            "verified": dict(self.verified),
            "ok": not failed,
        }


def _pg(node: LocalNode) -> PostgresStore:
    if not isinstance(node.store, PostgresStore):
        raise SyncError(f"{node.name} is not a PostgreSQL node")
    return node.store


def run_demo(
    patients: int = DEFAULT_PATIENTS,
    facilities: int = DEFAULT_FACILITIES,
    workdir: str | Path | None = None,
    json_output: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Start the network, walk through the scenarios, verify every node, clean up.

    Human output goes to ``console`` (stderr when ``json_output``). Returns the summary
    (steps with per-cycle timings, ``verified`` checks); raises :class:`DemoCheckFailed`
    (a :class:`SyncError`) when a check fails.
    """
    if facilities < 2:
        raise SyncError("the demo needs at least 2 facilities")
    if patients < 50:
        raise SyncError("the demo needs at least 50 patients")
    console = console or Console(stderr=json_output)
    try:
        summary = _run(patients, facilities, workdir, console)
    except Exception as exc:
        if _interrupted(exc):  # Ctrl-C during a database call arrives as a cancelled query
            raise KeyboardInterrupt from exc
        raise
    if not summary["ok"]:
        failed = [k for k, ok in summary["verified"].items() if not ok]
        raise DemoCheckFailed(f"{len(failed)} demo check(s) failed: {'; '.join(failed)}", summary)
    return summary


def _interrupted(exc: BaseException | None) -> bool:
    """Whether an error is ADBC's translation of SIGINT (it cancels the running query)."""
    seen = 0
    while exc is not None and seen < 10:
        text = str(exc)
        if "canceling statement due to user request" in text or text.startswith("CANCELLED"):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _run(patients: int, facilities: int, workdir: str | Path | None, console: Console) -> dict[str, Any]:
    """Everything started here is stopped on the way out, however the way out is taken."""
    from tidesync.pg.cluster import TempCluster

    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tidesync-demo-")))
        else:
            root = Path(workdir)
            root.mkdir(parents=True, exist_ok=True)
        console.rule("[bold]tidesync demo")
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console, transient=True) as p:
            p.add_task("starting PostgreSQL and the central server", total=None)
            t0 = time.perf_counter()
            cluster = stack.enter_context(TempCluster())
            net = stack.enter_context(LocalNetwork(cluster.dsn, REGISTRY, root))
        console.print(f"PostgreSQL on 127.0.0.1:{cluster.port} and the central server at {net.url} "
                      f"up in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        demo = Demo(net, patients, facilities, console)
        demo.setup()
        demo.generate()
        demo.initial_sync()
        demo.field_merge()
        demo.offline_catch_up()
        demo.patient_moves()
        demo.outreach()
        demo.final_round()
        demo.verify()
        summary = demo.summary(time.perf_counter() - started)
    if workdir is not None:
        summary["workdir"] = str(workdir)
        console.print(f"the outreach device's SQLite file is kept in {workdir}")
    return summary
