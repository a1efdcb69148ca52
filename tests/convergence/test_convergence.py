"""Randomized convergence under faults: the network must end where the oracle says.

Hypothesis drives a real network (:mod:`tests.convergence.world`) with random
application writes on every node — inserts, field and whole-row updates, soft and hard
deletes, undeletes, marking and moving patients, writes racing a running sync — and
random syncs with faults: requests and responses dropped mid-page in both directions,
pages delivered twice, the central server SIGKILLed mid-session, a node dying between
fetching its pull and committing it, clocks days ahead or behind, long offline bursts,
and transactions that commit after a sync read past them. After a final quiet round:

- every node holds, for every row in its scope, exactly the oracle's version (the
  plain-Python merge of every version written anywhere), so every node also agrees
  with every other on shared rows;
- no node holds another facility's rows;
- every committed write is present, superseded by a later stamp, or in a conflict log;
- nothing was quarantined (every write here is valid).

A failure prints the shortest sequence of steps that reproduces it (Hypothesis
shrinks it) and the reproduction blob. ``pytest -m soak`` runs it long; ``.ci/run``
runs a bounded number of examples. Docs: docs/reliability.md.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from tidesync.registry import BASE_HLC, DELETED, HLC, NODE
from tests.conftest import PgServer
from tests.convergence.world import DAY_MS, App, Crash, World, stamp_literal

NODES = ["fac-a", "fac-b", "mob-a", "mob-b"]
WRITERS = ["central", *NODES]
NAMES = ["Ana", "Bo", "Cy", "Di", None]
REASONS = ["fever", "cough", "follow-up", "injury", None]
FAULTS = ["lose_request", "lose_response", "duplicate", "kill_central"]
PATIENT_FIELDS = {"first_name": NAMES, "last_name": ["Lee", "Ng", "Oduya", None], "sex": ["female", "male", None],
                  "middle_name": ["J", "K", None]}  # fmt: skip
PAD_FIELDS = {"phone": ["555-1", "555-2", None], "address": ["Hill", "River", None], "blood_type": ["A+", "O-", None]}

ROW_LEVEL = (HLC, NODE, BASE_HLC, DELETED)
#: Totals over a whole run, for docs/reliability.md (printed at the end with -s).
STATS: dict[str, int] = {}


def _count(what: str, n: int = 1) -> None:
    STATS[what] = STATS.get(what, 0) + n


def q(v: Any) -> str:
    return "NULL" if v is None else "'" + str(v).replace("'", "''") + "'"


class Convergence(RuleBasedStateMachine):
    server_dsn: str
    workdir: Path

    def __init__(self) -> None:
        super().__init__()
        self.world: World | None = None
        self.tick = 0
        #: Hard-deleted rows (node, table, id, patient) an application may write again.
        self.deleted: list[tuple[str, str, str, str]] = []

    @initialize()
    def start(self) -> None:
        n = STATS.get("examples", 0)
        _count("examples")
        path = self.workdir / f"ex{n}"
        path.mkdir(parents=True, exist_ok=True)
        self.world = World(self.server_dsn, path).start()
        self._seed()

    def _seed(self) -> None:
        """Every node starts with a few patients of its own (marked, with an encounter, a
        note and additional data) and has seen everyone else's: operations bite at once."""
        for node in WRITERS:
            for _ in range(2):
                pid = self.w.new_id()
                self.w.write(node, [f"INSERT INTO patients (id, display_id, first_name) "
                                    f"VALUES ('{pid}', 'S-{pid[-6:]}', 'Seed')"], [("patients", [pid])])  # fmt: skip
                if node == "central":
                    continue
                mid, eid, nid, rid = (self.w.new_id() for _ in range(4))
                fac = self.w.apps[node].facility
                self.w.write(node, [
                    f"INSERT INTO patient_facilities (id, patient_id, facility_id) VALUES ('{mid}', '{pid}', '{fac}')",
                    f"INSERT INTO encounters (id, patient_id, facility_id, encounter_type, start_at) "
                    f"VALUES ('{eid}', '{pid}', '{fac}', 'clinic', {q(self._now())})",
                    f"INSERT INTO notes (id, encounter_id, patient_id, note_type, content, recorded_at) "
                    f"VALUES ('{nid}', '{eid}', '{pid}', 'intake', 'seed', {q(self._now())})",
                    f"INSERT INTO patient_additional_data (id, patient_id, phone) VALUES ('{rid}', '{pid}', '555-0')",
                ], [("patient_facilities", [mid]), ("encounters", [eid]), ("notes", [nid]),
                    ("patient_additional_data", [rid])])  # fmt: skip
        for _ in range(2):
            for node in NODES:
                self.w.sync(node)

    @property
    def w(self) -> World:
        assert self.world is not None
        return self.world

    def teardown(self) -> None:
        if self.world is None:
            return
        try:
            check_converged(self.w)
        finally:
            self.w.close()

    # ------------------------------------------------------------------ helpers

    def _now(self) -> str:
        self.tick += 1
        return stamp_literal(self.tick)

    def _pick(self, data: st.DataObject, xs: list[str], label: str) -> str | None:
        """One of ``xs`` (None if empty). Always draws exactly one number, whatever the
        databases hold: what a step draws must not depend on timing (races, retries),
        or Hypothesis could not replay and shrink a failure."""
        i = data.draw(st.integers(0, 1 << 16), label=label)
        return xs[i % len(xs)] if xs else None

    def _facility_node(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(NODES), label="node")

    # ------------------------------------------------------------------ patients (global, field-wise)

    @rule(data=st.data(), node=st.sampled_from(WRITERS), name=st.sampled_from(NAMES))
    def new_patient(self, data: st.DataObject, node: str, name: str | None) -> None:
        pid = self.w.new_id()
        stmts = [f"INSERT INTO patients (id, display_id, first_name) VALUES ('{pid}', 'P-{pid[-6:]}', {q(name)})"]
        touched = [("patients", [pid])]
        if node != "central":
            mid = self.w.new_id()
            stmts.append(f"INSERT INTO patient_facilities (id, patient_id, facility_id) "
                         f"VALUES ('{mid}', '{pid}', '{self.w.apps[node].facility}')")  # fmt: skip
            touched.append(("patient_facilities", [mid]))
        self.w.write(node, stmts, touched)
        _count("ops.insert")

    @rule(data=st.data(), node=st.sampled_from(WRITERS))
    def edit_patient(self, data: st.DataObject, node: str) -> None:
        fields = data.draw(st.lists(st.sampled_from(sorted(PATIENT_FIELDS)), min_size=1, max_size=4, unique=True),
                           label="fields")  # fmt: skip
        sets = ", ".join(f"{f} = {q(data.draw(st.sampled_from(PATIENT_FIELDS[f]), label=f))}" for f in fields)
        pid = self._pick(data, self.w.ids(node, "SELECT id FROM patients"), "patient")
        if pid is None:
            return
        self.w.write(node, [f"UPDATE patients SET {sets} WHERE id = '{pid}'"], [("patients", [pid])])
        _count("ops.update_row" if len(fields) > 1 else "ops.update_field")

    @rule(data=st.data(), node=st.sampled_from(WRITERS), delete=st.booleans())
    def soft_delete_patient(self, data: st.DataObject, node: str, delete: bool) -> None:
        pid = self._pick(data, self.w.ids(node, "SELECT id FROM patients"), "patient")
        if pid is None:
            return
        value = q(self._now()) if delete else "NULL"
        self.w.write(node, [f"UPDATE patients SET deleted_at = {value} WHERE id = '{pid}'"], [("patients", [pid])])
        _count("ops.soft_delete" if delete else "ops.undelete")

    # ------------------------------------------------------------------ marks and moves

    @rule(data=st.data())
    def mark_patient(self, data: st.DataObject) -> None:
        node = self._facility_node(data)
        pid = self._pick(data, self.w.ids(node, "SELECT id FROM patients"), "patient")
        if pid is None:
            return
        mid = self.w.new_id()
        self.w.write(node, [f"INSERT INTO patient_facilities (id, patient_id, facility_id) "
                            f"VALUES ('{mid}', '{pid}', '{self.w.apps[node].facility}')"],
                     [("patient_facilities", [mid])])  # fmt: skip
        _count("ops.mark")

    @rule(data=st.data())
    def move_patient(self, data: st.DataObject) -> None:
        """A patient transferred: the old facility ends its mark, the new one marks the
        patient, each on its own node, with no sync in between."""
        src = self._facility_node(data)
        to = data.draw(st.integers(0, 1), label="to")
        pid = self._pick(data, self.w.marked_here(src), "patient")
        if pid is None:
            return
        fac = self.w.apps[src].facility
        marks = self.w.ids(src, f"SELECT id FROM patient_facilities WHERE patient_id = '{pid}' "
                                f"AND facility_id = '{fac}' AND deleted_at IS NULL")  # fmt: skip
        self.w.write(src, [f"UPDATE patient_facilities SET deleted_at = {q(self._now())} WHERE id IN "
                           f"({', '.join(q(m) for m in marks)})"], [("patient_facilities", marks)])  # fmt: skip
        dst = [n for n in NODES if self.w.apps[n].facility != fac][to]
        if pid in self.w.ids(dst, "SELECT id FROM patients"):
            mid = self.w.new_id()
            self.w.write(dst, [f"INSERT INTO patient_facilities (id, patient_id, facility_id) "
                               f"VALUES ('{mid}', '{pid}', '{self.w.apps[dst].facility}')"],
                         [("patient_facilities", [mid])])  # fmt: skip
        _count("ops.move")

    # ------------------------------------------------------------------ clinical rows (patient scope)

    @rule(data=st.data(), reason=st.sampled_from(REASONS))
    def new_encounter(self, data: st.DataObject, reason: str | None) -> None:
        node = self._facility_node(data)
        pid = self._pick(data, self.w.marked_here(node), "patient")
        if pid is None:
            return
        eid = self.w.new_id()
        self.w.write(node, [f"INSERT INTO encounters (id, patient_id, facility_id, encounter_type, reason, start_at) "
                            f"VALUES ('{eid}', '{pid}', '{self.w.apps[node].facility}', 'clinic', {q(reason)}, "
                            f"{q(self._now())})"], [("encounters", [eid])])  # fmt: skip
        _count("ops.insert")

    def _encounters_here(self, node: str) -> list[str]:
        marked = self.w.marked_here(node)
        if not marked:
            return []
        listed = ", ".join(q(p) for p in marked)
        return self.w.ids(node, f"SELECT id FROM encounters WHERE patient_id IN ({listed})")

    @rule(data=st.data(), reason=st.sampled_from(REASONS), soft=st.sampled_from([None, "delete", "undelete"]))
    def edit_encounter(self, data: st.DataObject, reason: str | None, soft: str | None) -> None:
        node = self._facility_node(data)
        eid = self._pick(data, self._encounters_here(node), "encounter")
        if eid is None:
            return
        sets = {None: f"reason = {q(reason)}, end_at = {q(self._now())}", "delete": f"deleted_at = {q(self._now())}",
                "undelete": "deleted_at = NULL"}[soft]  # fmt: skip
        self.w.write(node, [f"UPDATE encounters SET {sets} WHERE id = '{eid}'"], [("encounters", [eid])])
        _count({None: "ops.update_row", "delete": "ops.soft_delete", "undelete": "ops.undelete"}[soft])

    @rule(data=st.data(), content=st.sampled_from(["stable", "worse", "better"]))
    def new_note(self, data: st.DataObject, content: str) -> None:
        node = self._facility_node(data)
        eid = self._pick(data, self._encounters_here(node), "encounter")
        if eid is None:
            return
        pid = self.w.ids(node, f"SELECT patient_id FROM encounters WHERE id = '{eid}'")[0]
        nid = self.w.new_id()
        self.w.write(node, [f"INSERT INTO notes (id, encounter_id, patient_id, note_type, content, recorded_at) "
                            f"VALUES ('{nid}', '{eid}', '{pid}', 'progress', {q(content)}, {q(self._now())})"],
                     [("notes", [nid])])  # fmt: skip
        _count("ops.insert")

    def _leaf_here(self, node: str, table: str) -> list[str]:
        marked = self.w.marked_here(node)
        if not marked:
            return []
        listed = ", ".join(q(p) for p in marked)
        return self.w.ids(node, f"SELECT id FROM {table} WHERE patient_id IN ({listed})")

    @rule(data=st.data(), content=st.sampled_from(["amended", "corrected", "stable"]))
    def edit_note(self, data: st.DataObject, content: str) -> None:
        node = self._facility_node(data)
        nid = self._pick(data, self._leaf_here(node, "notes"), "note")
        if nid is None:
            return
        self.w.write(node, [f"UPDATE notes SET content = {q(content)} WHERE id = '{nid}'"], [("notes", [nid])])
        _count("ops.update_field")

    @rule(data=st.data(), table=st.sampled_from(["notes", "patient_additional_data"]))
    def hard_delete(self, data: st.DataObject, table: str) -> None:
        node = self._facility_node(data)
        rid = self._pick(data, self._leaf_here(node, table), "row")
        if rid is None:
            return
        pid = self.w.ids(node, f"SELECT patient_id FROM {table} WHERE id = '{rid}'")[0]
        self.w.write(node, [f"DELETE FROM {table} WHERE id = '{rid}'"], [(table, [rid])])
        self.deleted.append((node, table, rid, pid))
        _count("ops.hard_delete")

    @rule(data=st.data())
    def undelete_hard(self, data: st.DataObject) -> None:
        """The same record written again after a hard delete (an undo in the application)."""
        i = data.draw(st.integers(0, 1 << 16), label="deleted")
        if not self.deleted:
            return
        node, table, rid, pid = self.deleted[i % len(self.deleted)]
        if pid not in self.w.marked_here(node) or self.w.ids(node, f"SELECT id FROM {table} WHERE id = '{rid}'"):
            return
        if table == "notes":
            enc = self.w.ids(node, f"SELECT id FROM encounters WHERE patient_id = '{pid}'")
            if not enc:
                return
            stmt = (f"INSERT INTO notes (id, encounter_id, patient_id, note_type, content, recorded_at) "
                    f"VALUES ('{rid}', '{enc[0]}', '{pid}', 'progress', 'restored', {q(self._now())})")  # fmt: skip
        else:
            stmt = f"INSERT INTO patient_additional_data (id, patient_id, phone) VALUES ('{rid}', '{pid}', '555-9')"
        self.w.write(node, [stmt], [(table, [rid])])
        _count("ops.undelete")

    @rule(data=st.data())
    def edit_additional_data(self, data: st.DataObject) -> None:
        """Field-wise, patient-scoped: a new record, or single fields of an existing one."""
        node = self._facility_node(data)
        existing = data.draw(st.booleans(), label="existing")
        f = data.draw(st.sampled_from(sorted(PAD_FIELDS)), label="field")
        v = data.draw(st.sampled_from(PAD_FIELDS[f]), label="value")
        rid = self._pick(data, self._leaf_here(node, "patient_additional_data"), "row")
        pid = self._pick(data, self.w.marked_here(node), "patient")
        if existing and rid is not None:
            self.w.write(node, [f"UPDATE patient_additional_data SET {f} = {q(v)} WHERE id = '{rid}'"],
                         [("patient_additional_data", [str(rid)])])  # fmt: skip
            _count("ops.update_field")
            return
        if pid is None:
            return
        rid = self.w.new_id()
        self.w.write(node, [f"INSERT INTO patient_additional_data (id, patient_id, phone, address) "
                            f"VALUES ('{rid}', '{pid}', '555-0', 'Hill')"], [("patient_additional_data", [rid])])  # fmt: skip
        _count("ops.insert")

    # ------------------------------------------------------------------ bursts, clocks, races

    @rule(data=st.data(), n=st.integers(20, 400))
    def offline_burst(self, data: st.DataObject, n: int) -> None:
        """A node off the network for a long while: many patients registered and marked,
        every patient it holds edited, all before its next sync."""
        node = self._facility_node(data)
        fac = self.w.apps[node].facility
        pids = [self.w.new_id() for _ in range(n)]
        mids = [self.w.new_id() for _ in range(n)]
        stmts = [
            "INSERT INTO patients (id, display_id, first_name) VALUES "
            + ", ".join(f"('{p}', 'B-{p[-6:]}', 'Burst')" for p in pids),
            "INSERT INTO patient_facilities (id, patient_id, facility_id) VALUES "
            + ", ".join(f"('{m}', '{p}', '{fac}')" for m, p in zip(mids, pids, strict=True)),
        ]
        self.w.write(node, stmts, [("patients", pids), ("patient_facilities", mids)])
        everyone = self.w.ids(node, "SELECT id FROM patients")
        self.w.write(node, [f"UPDATE patients SET middle_name = {q('M' + str(n))}"], [("patients", everyone)])
        _count("ops.burst_rows", 2 * n + len(everyone))
        _count("ops.burst")

    @rule(node=st.sampled_from(["fac-a", "fac-b"]), days=st.sampled_from([0, 0, -3, 3]))
    def set_clock(self, node: str, days: int) -> None:
        """The facility server's clock jumps days ahead (clamped by central) or behind."""
        self.w.apps[node].set_clock(days * DAY_MS)
        _count("faults.clock_skew" if days else "faults.clock_fixed")

    @rule(data=st.data(), node=st.sampled_from(NODES))
    def race_sync(self, data: st.DataObject, node: str) -> None:
        """Application writes on a node while that node syncs."""
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.w.sync(node)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        for _ in range(data.draw(st.integers(1, 4), label="writes")):
            self.edit_patient(data, node)
            time.sleep(0.01)
        t.join(timeout=120)
        assert not t.is_alive(), "sync hung while the application wrote"
        if errors:
            raise errors[0]
        _count("faults.race")

    @rule(node=st.sampled_from(["fac-a", "fac-b"]), name=st.sampled_from(NAMES))
    def commit_after_sync(self, node: str, name: str | None) -> None:
        """A transaction that stamped before a sync read its window but commits after."""
        app = self.w.apps[node]
        late = App(node + "-late", app.kind, app.facility, app.db)
        late.open()
        if app.skew_ms:
            late.set_clock(app.skew_ms)
        try:
            pid = self.w.new_id()
            done = threading.Event()
            with late.transaction() as execute:
                execute(f"INSERT INTO patients (id, display_id, first_name) VALUES ('{pid}', 'L-{pid[-6:]}', {q(name)})")
                version = late.read_back(self.w.registry, "patients", [pid])
                t = threading.Thread(target=lambda: (self.w.sync(node), done.set()))
                t.start()
                t.join(timeout=60)
            t.join(timeout=60)
            assert done.is_set(), "the sync did not finish around an open transaction"
            self.w.oracle.record("patients", version, max_drift_ms=self.w.max_drift_ms)
        finally:
            late.close()
        _count("faults.out_of_order_commit")

    # ------------------------------------------------------------------ sync, with faults

    @rule(node=st.sampled_from(NODES))
    def sync(self, node: str) -> None:
        self.w.sync(node)
        _count("syncs")

    @rule(node=st.sampled_from(NODES), at=st.integers(0, 9), fault=st.sampled_from(FAULTS))
    def sync_with_fault(self, node: str, at: int, fault: str) -> None:
        self.w.sync(node, {at: fault})
        _count("syncs")
        _count(f"faults.{fault}")

    @rule(node=st.sampled_from(NODES), after=st.integers(0, 3))
    def crash_before_commit(self, node: str, after: int) -> None:
        """The node dies with its pull fetched, part way into applying it."""
        with pytest.raises(Crash):
            self.w.sync(node, crash_after_parts=after)
        _count("faults.node_crash")


# ----------------------------------------------------------------------------- the checks


def check_converged(w: World) -> None:
    for app in w.apps.values():
        if app.kind == "facility" and app.skew_ms:
            app.set_clock(0)  # a quiet round on fixed clocks, as after an operator's fix
    w.quiet_rounds()
    clamps = w.clamps()
    expected = w.oracle.expected(clamps)
    problems: list[str] = []
    for table, rows in expected.items():
        problems += _compare("central", w.net.central, table, rows)
    marks = expected.get("patient_facilities", {})
    for name, node in w.nodes.items():
        fac = bytes.fromhex(node.facility_id.replace("-", ""))
        marked = {m["patient_id"] for m in marks.values() if not m[DELETED] and m["facility_id"] == fac
                  and m["deleted_at"] is None}  # fmt: skip
        for table, rows in expected.items():
            spec = w.registry[table]
            if table == "patients":
                scoped = rows
            elif table == "patient_facilities":
                scoped = {k: r for k, r in rows.items() if r[DELETED] or r["facility_id"] == fac}
            else:
                scoped = {k: r for k, r in rows.items() if r[DELETED] or r[spec.scope.column or ""] in marked}
            problems += _compare(name, node.store, table, scoped)
        other = w.apps[name].rows(f"SELECT count(*) FROM patient_facilities WHERE facility_id <> '{node.facility_id}'")
        if other[0][0]:
            problems.append(f"{name} holds {other[0][0]} marks of another facility")
        quarantined = node.store.quarantine().num_rows
        if quarantined:
            problems.append(f"{name} quarantined {quarantined} rows: {node.store.quarantine().to_pylist()[:3]}")
    if w.net.central.quarantine().num_rows:
        problems.append(f"central quarantined rows: {w.net.central.quarantine().to_pylist()[:3]}")
    final = {t: _read(w.net.central, t, list(rows)) for t, rows in expected.items()}
    logged = w.conflict_log()
    counts, lost = w.oracle.lost_writes(final, logged, clamps)
    problems += lost
    for k, v in counts.items():
        _count(f"writes.{k}", v)
    _count("writes.total", len(w.oracle.writes))
    _count("conflicts_logged", len(logged))
    _count("faults.central_killed", w.central.kills)
    _count("faults.cycle_abandoned", w.abandoned)
    _count("clamped_versions", len(clamps))
    assert not problems, "\n".join(["diverged:", *problems[:30], "last syncs:", *w.log[-12:]])


def _read(store: Any, table: str, keys: list[bytes]) -> dict[bytes, dict[str, Any]]:
    import pyarrow as pa

    spec = store.registry[table]
    if not keys:
        return {}
    got = store.read_rows(table, pa.array(keys, spec.wire_schema().field(spec.key).type))
    return {r[spec.key]: r for r in got.to_pylist()}


def _compare(where: str, store: Any, table: str, rows: dict[bytes, dict[str, Any]]) -> list[str]:
    have = _read(store, table, list(rows))
    out = []
    for k, want in rows.items():
        got = have.get(k)
        if want[DELETED] and got is not None:
            # A store keeps a tombstone's stamps only; the merged row's field values
            # (semantics.md) matter only if an edit revives it, and that edit carries them.
            want = {c: v for c, v in want.items() if c in ROW_LEVEL or c == store.registry[table].key}
            got = {c: got[c] for c in want}
        if got != want:
            diff = {c: (got.get(c) if got else None, v) for c, v in want.items() if got is None or got.get(c) != v}
            out.append(f"{where} {table} {k.hex()}: (have, want) {diff}")
    return out


# ----------------------------------------------------------------------------- the tests


def _examples() -> tuple[int, int]:
    """(examples, steps per example) for the Hypothesis profile in use."""
    profile = os.environ.get("HYPOTHESIS_PROFILE", "dev")
    return {"dev": (3, 30), "ci": (8, 50), "soak": (int(os.environ.get("TIDESYNC_SOAK_EXAMPLES", "60")), 80)}.get(
        profile, (2, 25)
    )


def _run(pg_server: PgServer, tmp_path: Path, examples: int, steps: int) -> None:
    Convergence.server_dsn = pg_server.dsn
    Convergence.workdir = tmp_path
    STATS.clear()
    try:
        run_state_machine_as_test(
            Convergence,
            settings=settings(max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
                              print_blob=True, suppress_health_check=list(HealthCheck)),  # fmt: skip
        )
    finally:
        print("\nconvergence run:", dict(sorted(STATS.items())))


def test_converges_under_faults(pg_server: PgServer, tmp_path: Path) -> None:
    examples, steps = _examples()
    _run(pg_server, tmp_path, examples, steps)


@pytest.mark.soak
def test_converges_under_faults_soak(pg_server: PgServer, tmp_path: Path) -> None:
    _run(pg_server, tmp_path, int(os.environ.get("TIDESYNC_SOAK_EXAMPLES", "60")), 80)

