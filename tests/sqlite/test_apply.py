"""Apply: merge and write incoming batches atomically; conflicts logged; bad rows quarantined."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from tests.sqlite.util import App, hlc_now, new_id, ub, wire
from tidesync.errors import SchemaMismatchError
from tidesync.schemas.demo import REGISTRY
from tidesync.sqlite import SQLiteStore

PATIENTS, VITALS = REGISTRY["patients"], REGISTRY["vitals"]


def _parents(store: SQLiteStore, n_patients: int = 1) -> tuple[str, list[str], str]:
    """A facility, patients and an encounter of the first, applied from central."""
    fid, eid = new_id(), new_id()
    pids = [new_id() for _ in range(n_patients)]
    store.apply(
        {
            "facilities": wire(REGISTRY["facilities"], [{"id": fid, "code": "F", "name": "Clinic",
                                                          "is_sensitive": False}]),
            "patients": wire(PATIENTS, [{"id": p, "display_id": f"P{i}"} for i, p in enumerate(pids)]),
            "encounters": wire(REGISTRY["encounters"], [{"id": eid, "patient_id": pids[0], "facility_id": fid,
                                                         "encounter_type": "clinic",
                                                         "start_at": datetime(2024, 5, 1, tzinfo=UTC)}]),
        },
        peer="central",
    )  # fmt: skip
    return fid, pids, eid


def _vital(eid: str, pid: str, **kw: object) -> dict[str, object]:
    return {"id": new_id(), "encounter_id": eid, "patient_id": pid,
            "recorded_at": datetime(2024, 5, 1, 8, tzinfo=UTC), "temperature_c": 37.0, **kw}  # fmt: skip


def test_inserts_updates_and_tombstones(store: SQLiteStore, app: App) -> None:
    _, (pid,), eid = _parents(store)
    v = [_vital(eid, pid, heart_rate=60 + i) for i in range(3)]
    h = hlc_now()
    r1 = store.apply({"vitals": wire(VITALS, v, hlc=h)}, peer="central", cursor=("central", 7))
    assert (r1.tables["vitals"].inserted, r1.tables["vitals"].updated) == (3, 0)
    assert store.get_cursor("central") == 7
    row = app.row("vitals", str(v[0]["id"]))
    assert (row["heart_rate"], row["_hlc"], row["_node"], row["_origin"]) == (60, h, "central", "central")
    assert row["recorded_at"] == "2024-05-01T08:00:00.000000Z"
    # An update of v0, a tombstone of v1, an old version of v2 (loses: unchanged).
    batch = wire(VITALS, [
        {**v[0], "heart_rate": 99, "_hlc": h + 5},
        {"id": v[1]["id"], "_deleted": True, "_hlc": h + 5},
        {**v[2], "heart_rate": 1, "_hlc": h - 5},
    ])  # fmt: skip
    r2 = store.apply({"vitals": batch}, peer="central")
    s = r2.tables["vitals"]
    assert (s.inserted, s.updated, s.deleted, s.unchanged, s.quarantined) == (0, 1, 1, 1, 0)
    assert app.rows("SELECT heart_rate FROM vitals ORDER BY heart_rate") == [(62,), (99,)]
    assert app.rows("SELECT _hlc, _node, _origin FROM _tidesync_tomb_vitals") == [(h + 5, "central", "central")]
    # The tombstone travels on to other peers, not back to central.
    dead = store.read_window(0, peer="facility-b").tables["vitals"].filter(
        pa.compute.field("_deleted"))  # fmt: skip
    assert dead.column("id").to_pylist() == [ub(str(v[1]["id"]))]
    assert store.read_window(0, peer="central").tables["vitals"].num_rows == 0
    # A newer live version brings the row back and removes the tombstone.
    r3 = store.apply({"vitals": wire(VITALS, [{**v[1], "heart_rate": 5, "_hlc": h + 9}])}, peer="central")
    assert r3.tables["vitals"].inserted == 1
    assert app.rows("SELECT count(*) FROM _tidesync_tomb_vitals") == [(0,)]


def test_reapply_changes_nothing(store: SQLiteStore, app: App) -> None:
    _, (pid,), eid = _parents(store)
    batch = wire(VITALS, [_vital(eid, pid, heart_rate=i) for i in range(50)])
    store.apply({"vitals": batch}, peer="central")
    before = app.rows("SELECT * FROM vitals ORDER BY id")
    mark = store.read_window(0).watermark
    again = store.apply({"vitals": batch}, peer="central")
    s = again.tables["vitals"]
    assert (s.inserted, s.updated, s.deleted, s.unchanged) == (0, 0, 0, 50)
    assert app.rows("SELECT * FROM vitals ORDER BY id") == before
    assert store.read_window(mark).tables["vitals"].num_rows == 0


def test_field_wise_merge_of_a_concurrent_edit_logs_the_conflict(store: SQLiteStore, app: App) -> None:
    pid = new_id()
    h0 = hlc_now() - (10_000 << 16)
    store.apply({"patients": wire(PATIENTS, [{"id": pid, "display_id": "P1", "first_name": "Ann",
                                              "last_name": "Lee", "sex": "female"}], hlc=h0)}, peer="central")  # fmt: skip
    # Offline here: first name and sex edited. Meanwhile at central: first name and last name.
    app.run(("UPDATE patients SET first_name = 'Anna', sex = 'other' WHERE id = ?", (pid,)))
    local = app.row("patients", pid)
    h1 = local["_hlc"] + 1000  # central's edit is later
    theirs = wire(PATIENTS, [{"id": pid, "display_id": "P1", "first_name": "Annie", "last_name": "Li",
                              "sex": "female", "_base_hlc": h0, "_hlc": h1, "_hlc_first_name": h1,
                              "_hlc_last_name": h1, "_hlc_sex": h0, "_hlc_display_id": h0,
                              **{f"_hlc_{c}": h0 for c in ("middle_name", "date_of_birth", "village_id",
                                                            "deleted_at", "updated_at")}}])  # fmt: skip
    r = store.apply({"patients": theirs}, peer="central")
    assert r.tables["patients"].updated == 1 and r.tables["patients"].conflicts == 1
    row = app.row("patients", pid)
    # Each column from whoever wrote it last: first/last name from central, sex from here.
    assert (row["first_name"], row["last_name"], row["sex"]) == ("Annie", "Li", "other")
    assert row["_origin"] is None  # a mix central has not seen: it goes back up
    assert store.read_window(0, peer="central").tables["patients"].num_rows == 1
    log = store.conflicts().to_pylist()
    assert len(log) == 1
    c = log[0]
    assert (c["table_name"], c["key"], c["lost_columns"]) == ("patients", pid, ["first_name"])
    assert (c["loser_hlc"], c["loser_node"]) == (local["_hlc"], "device-a")
    assert (c["winner_hlc"], c["winner_node"], c["peer"]) == (h1, "central", "central")
    assert json.loads(c["loser_row"])["first_name"] == "Anna"
    assert store.conflicts("vitals").num_rows == 0


def test_bad_rows_go_to_quarantine_and_the_rest_applies(store: SQLiteStore, app: App) -> None:
    fid, (pid, other), eid = _parents(store, 2)
    good = [_vital(eid, pid, heart_rate=70 + i) for i in range(20)]
    hot = _vital(eid, pid, temperature_c=99.0)  # CHECK (temperature_c BETWEEN 25 AND 45)
    orphan = _vital(new_id(), pid)  # its encounter does not exist
    no_time = _vital(eid, pid, recorded_at=None)  # NOT NULL
    batch = wire(VITALS, [*good[:7], hot, *good[7:15], orphan, no_time, *good[15:]])
    # A tombstone of a patient who still has an encounter here cannot go through either.
    r = store.apply({"vitals": batch, "patients": wire(PATIENTS, [{"id": pid, "_deleted": True},
                                                                   {"id": other, "_deleted": True}])},
                    peer="central", cursor=("central", 3))  # fmt: skip
    assert (r.tables["vitals"].inserted, r.tables["vitals"].quarantined) == (20, 3)
    assert (r.tables["patients"].deleted, r.tables["patients"].quarantined) == (1, 1)
    assert store.get_cursor("central") == 3
    assert app.one("SELECT count(*) FROM vitals") == 20
    assert app.rows("SELECT id FROM patients") == [(pid,)]
    q = {row["key"]: row for row in store.quarantine().to_pylist()}
    assert set(q) == {hot["id"], orphan["id"], no_time["id"], pid}
    assert "CHECK constraint failed" in q[str(hot["id"])]["reason"]
    assert "FOREIGN KEY constraint failed" in q[str(orphan["id"])]["reason"]
    assert "NOT NULL constraint failed: vitals.recorded_at" in q[str(no_time["id"])]["reason"]
    assert "still referenced by encounters.patient_id" in q[pid]["reason"]
    assert json.loads(q[str(hot["id"])]["row_data"])["temperature_c"] == 99.0
    assert {row["peer"] for row in q.values()} == {"central"}
    assert store.quarantine("patients").num_rows == 1


def test_wrong_schema_or_unknown_table_applies_nothing(store: SQLiteStore, app: App) -> None:
    pid = new_id()
    good = wire(PATIENTS, [{"id": pid, "display_id": "P"}])
    with pytest.raises(SchemaMismatchError, match="missing columns \\['heart_rate'\\]"):
        store.apply({"patients": good, "vitals": wire(VITALS, []).drop_columns(["heart_rate"])}, peer="central",
                    cursor=("central", 9))  # fmt: skip
    bad_type = good.set_column(good.schema.get_field_index("display_id"), "display_id", pa.array([[1]]))
    with pytest.raises(SchemaMismatchError, match="display_id"):
        store.apply({"patients": bad_type}, peer="central")
    with pytest.raises(SchemaMismatchError, match="unknown table 'prescriptions'"):
        store.apply({"patients": good, "prescriptions": good}, peer="central")
    assert app.one("SELECT count(*) FROM patients") == 0
    assert store.get_cursor("central") == 0


def test_every_wire_type_round_trips(store: SQLiteStore, app: App) -> None:
    fid, pid = new_id(), new_id()
    ts = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC)
    batches = {
        "facilities": wire(REGISTRY["facilities"], [{"id": fid, "code": "F", "name": "Ünïcode ✓",
                                                     "is_sensitive": True, "updated_at": ts}]),
        "patients": wire(PATIENTS, [{"id": pid, "display_id": "P", "date_of_birth": date(1960, 1, 31)}]),
        "lab_requests": wire(REGISTRY["lab_requests"], [{"id": new_id(), "patient_id": pid, "status": "s",
                                                         "requested_at": ts, "result_value": -1.5e-300,
                                                         "sample_at": datetime(2024, 1, 1, 12, 0, 0, 1)}]),
        "audit_log": wire(REGISTRY["audit_log"], [{"id": new_id(), "action": "x", "at": ts,
                                                   "sequence": 2**62 + 1}]),
        "attachments": wire(REGISTRY["attachments"], [{"id": new_id(), "facility_id": fid, "kind": "k",
                                                       "size_bytes": 3, "data": b"\x00\xff\x10"}]),
    }  # fmt: skip
    store.apply(batches, peer="central")
    w = store.read_window(0, tables=batches)
    for name, sent in batches.items():
        assert w.tables[name].equals(sent), name
    assert app.row("facilities", fid)["is_sensitive"] == 1
    assert app.row("facilities", fid)["updated_at"] == "2024-02-29T23:59:58.123456Z"
    assert app.row("patients", pid)["date_of_birth"] == "1960-01-31"


_KILLED_APPLY = textwrap.dedent(
    """
    import sys, uuid
    import numpy as np, pyarrow as pa
    from tidesync.schemas.demo import REGISTRY
    from tidesync.sqlite import SQLiteStore
    n = int(sys.argv[2])
    spec = REGISTRY["reference_data"]
    ids = np.frombuffer(np.random.default_rng().bytes(16 * n), dtype=np.uint8)
    batch = pa.table({
        "id": pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(ids)]),
        "type": pa.array(["diagnosis"] * n), "code": pa.array([f"c{i}" for i in range(n)]),
        "name": pa.array([f"Diagnosis number {i} with a longer name" for i in range(n)]),
        "visibility": pa.array(["current"] * n),
        "_hlc": pa.array(np.full(n, 1 << 60)), "_node": pa.array(["central"] * n),
        "_base_hlc": pa.nulls(n, pa.int64()), "_deleted": pa.array(np.zeros(n, bool)),
    })
    store = SQLiteStore(sys.argv[1], REGISTRY)
    print("applying", flush=True)
    store.apply({"reference_data": batch}, peer="central", cursor=("central", 12345))
    print("done", flush=True)
    """
)


def test_apply_is_atomic_when_the_process_is_killed(db: Path, store: SQLiteStore, app: App) -> None:
    wal = Path(str(db) + "-wal")
    start = wal.stat().st_size if wal.exists() else 0
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_APPLY, str(db), "300000"], stdout=subprocess.PIPE,
                            text=True, env={**os.environ})  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "applying"
    # Wait until the apply is writing pages (the WAL grows past the cache), then kill it.
    deadline = time.monotonic() + 30
    while not wal.exists() or wal.stat().st_size < start + (4 << 20):
        assert time.monotonic() < deadline, "the apply never started writing"
        assert proc.poll() is None, "the apply finished before it could be killed; use a bigger batch"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert app.one("SELECT count(*) FROM reference_data") == 0
    assert store.get_cursor("central") == 0
    assert store.read_window(0).rows == 0
    # The same apply run to the end is complete: rows and cursor together.
    done = subprocess.run([sys.executable, "-c", _KILLED_APPLY, str(db), "1000"], capture_output=True, text=True,
                          check=True)  # fmt: skip
    assert done.stdout.split() == ["applying", "done"]
    assert app.one("SELECT count(*) FROM reference_data") == 1000
    assert store.get_cursor("central") == 12345
    assert uuid.UUID(app.one("SELECT id FROM reference_data LIMIT 1"))


def test_cursors(store: SQLiteStore) -> None:
    assert store.get_cursor("central") == 0
    store.set_cursor("central", 42)
    store.set_cursor("central", 43)
    assert store.get_cursor("central") == 43
    store.apply({}, peer="central", cursor=("central", 44))
    assert store.get_cursor("central") == 44
