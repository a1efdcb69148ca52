"""The quarantine on SQLite: whole versions kept, retried through the normal apply in one
transaction, discarded with a note; never a duplicate entry, never a lost write."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pytest

from tests.sqlite.util import App, hlc_now, new_id, ub, wire
from tidesync.changes import ApplyOptions
from tidesync.errors import SyncError
from tidesync.quarantine import NO_VERSION, decode_version, list_entries, show_entry
from tidesync.schemas.demo import REGISTRY
from tidesync.sqlite import SQLiteStore
from tidesync.sqlite.apply import SQLiteQuarantineTxn

PATIENTS, VITALS, ENCOUNTERS = REGISTRY["patients"], REGISTRY["vitals"], REGISTRY["encounters"]


def _entries(store: SQLiteStore, **kw: Any) -> list[dict[str, Any]]:
    return store.quarantine(**kw).to_pylist()


def _refuse(app: App, table: str, when: str = "1") -> None:
    """The application refuses some writes to ``table`` (and its tombstones) with a trigger."""
    for target, ops in ((table, ("INSERT", "UPDATE")), (f"_tidesync_tomb_{table}", ("INSERT", "UPDATE"))):
        for op in ops:
            app.run(f"CREATE TRIGGER refuse_{target}_{op.lower()} BEFORE {op} ON {target} WHEN {when} "
                    "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")  # fmt: skip


def _allow(app: App, table: str) -> None:
    for target in (table, f"_tidesync_tomb_{table}"):
        for op in ("insert", "update"):
            app.run(f"DROP TRIGGER IF EXISTS refuse_{target}_{op}")


def _facility_and_patient(store: SQLiteStore) -> tuple[str, str, str]:
    """A facility, a patient and an encounter of the patient, applied from central."""
    fid, pid, eid = new_id(), new_id(), new_id()
    store.apply({
        "facilities": wire(REGISTRY["facilities"], [{"id": fid, "code": "F", "name": "Clinic", "is_sensitive": False}]),
        "patients": wire(PATIENTS, [{"id": pid, "display_id": "P1", "first_name": "Ann", "last_name": "Lee"}]),
        "encounters": wire(ENCOUNTERS, [{"id": eid, "patient_id": pid, "facility_id": fid, "encounter_type": "clinic",
                                         "start_at": datetime(2024, 5, 1, tzinfo=UTC)}]),
    }, peer="central")  # fmt: skip
    return fid, pid, eid


def _vital(eid: str, pid: str, **kw: object) -> dict[str, object]:
    return {"id": new_id(), "encounter_id": eid, "patient_id": pid,
            "recorded_at": datetime(2024, 5, 1, 8, tzinfo=UTC), "temperature_c": 37.0, **kw}  # fmt: skip


def test_the_stored_version_round_trips_every_type_stamp_and_tombstone(store: SQLiteStore, app: App) -> None:
    h = hlc_now()
    ts = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC)
    fid, pid = new_id(), new_id()
    stamps = {f"_hlc_{c.name}": h - 3 * (i + 1) for i, c in enumerate(PATIENTS.data_columns)}
    batches = {
        "facilities": wire(REGISTRY["facilities"], [{"id": fid, "code": "F", "name": "Ünïcode ✓", "is_sensitive": True,
                                                     "updated_at": ts}]),
        "patients": wire(PATIENTS, [{"id": pid, "display_id": "P", "date_of_birth": date(1960, 1, 31),
                                     "_base_hlc": h - 99, **stamps}], hlc=h),
        "lab_requests": wire(REGISTRY["lab_requests"], [{"id": new_id(), "patient_id": pid, "status": "s",
                                                         "requested_at": ts, "result_value": -1.5e-300,
                                                         "sample_at": datetime(2024, 1, 1, 12, 0, 0, 1)}]),
        "vitals": wire(VITALS, [{"id": new_id(), "encounter_id": new_id(), "patient_id": pid, "recorded_at": ts,
                                 "heart_rate": 2**31 - 1}]),  # its encounter never arrives
        "audit_log": wire(REGISTRY["audit_log"], [{"id": new_id(), "action": "x", "at": ts, "sequence": -(2**62)}]),
        "attachments": wire(REGISTRY["attachments"], [{"id": new_id(), "facility_id": fid, "kind": "k",
                                                       "size_bytes": 3, "data": b"\x00\xff\x10"}]),
    }  # fmt: skip
    for name in batches:
        _refuse(app, name)
    assert store.apply(batches, peer="central").total("quarantined") == 6
    # And tombstones: a field-wise one whose live row is here (refused, its tombstone kept whole).
    _allow(app, "patients")
    other = new_id()
    store.apply({"patients": wire(PATIENTS, [{"id": other, "display_id": "Q"}], hlc=h - 50)}, peer="central")
    _refuse(app, "patients")
    tomb = wire(PATIENTS, [{"id": other, "_deleted": True, "_base_hlc": h - 50}], hlc=h)
    assert store.apply({"patients": tomb}, peer="central").total("quarantined") == 1
    batches["patients"] = pa.concat_tables([batches["patients"], tomb])
    for e in _entries(store):
        spec = REGISTRY[e["table_name"]]
        sent = batches[spec.name]
        expected = sent.filter(pa.compute.equal(sent.column(spec.key), pa.scalar(ub(e["key"]), pa.binary(16))))
        stored = decode_version(spec, e["version"], e["id"])
        assert stored.rows.equals(expected), spec.name
        assert (e["status"], e["attempts"], e["peer"]) == ("held", 1, "central")
        # As apply marked it: the peer's own version, unless merging with a local row made it new here.
        assert stored.from_peer == (e["key"] != other)
    # Once the application lets them in, the retried rows read back exactly as sent
    # (parents first: the attachment's facility is retried with it), but for the orphan.
    for name in batches:
        _allow(app, name)
    outcomes = store.retry_quarantined()
    assert [o.table for o in outcomes if not o.applied] == ["vitals"], outcomes
    del batches["vitals"]
    w = store.read_window(0, tables=batches)
    for name, sent in batches.items():
        assert w.tables[name].sort_by("id").equals(sent.sort_by("id")), name


def test_retry_after_the_cause_is_fixed_applies_and_a_second_apply_changes_nothing(
    store: SQLiteStore, app: App
) -> None:
    fid, pid, eid = _facility_and_patient(store)
    other = new_id()  # an encounter that has not arrived yet
    batch = wire(VITALS, [_vital(eid, pid, heart_rate=70), _vital(other, pid, heart_rate=71),
                          _vital(other, pid, heart_rate=72)])  # fmt: skip
    r = store.apply({"vitals": batch}, peer="central", cursor=("central", 5))
    assert (r.tables["vitals"].inserted, r.tables["vitals"].quarantined) == (1, 2)
    held = list_entries(store)
    assert len(held) == 2 and all("FOREIGN KEY constraint failed: encounter_id" in e["reason"] for e in held)
    # Still missing: refused again, still two entries.
    assert [(o.applied, o.attempts) for o in store.retry_quarantined()] == [(False, 2), (False, 2)]
    assert [e["attempts"] for e in _entries(store)] == [2, 2] and len(_entries(store)) == 2
    store.apply({"encounters": wire(ENCOUNTERS, [{"id": other, "patient_id": pid, "facility_id": fid,
                                                  "encounter_type": "clinic",
                                                  "start_at": datetime(2024, 5, 2, tzinfo=UTC)}])},
                peer="central")  # fmt: skip
    outcomes = store.retry_quarantined()
    assert [(o.applied, o.note, o.attempts) for o in outcomes] == [(True, "applied", 3)] * 2
    assert app.rows("SELECT heart_rate, _origin FROM vitals ORDER BY heart_rate") == [
        (70, "central"), (71, "central"), (72, "central")]  # fmt: skip
    assert store.read_window(0, peer="central").tables["vitals"].num_rows == 0  # no echo
    assert [e["status"] for e in _entries(store)] == ["retried", "retried"]
    assert all(e["resolved_at"] is not None for e in _entries(store))
    again = store.apply({"vitals": batch}, peer="central")
    s = again.tables["vitals"]
    assert (s.inserted, s.updated, s.quarantined, s.unchanged) == (0, 0, 0, 3)
    assert len(_entries(store)) == 2


def test_a_refused_tombstone_is_retried_once_its_children_are_gone(store: SQLiteStore, app: App) -> None:
    fid, pid, eid = _facility_and_patient(store)
    h = hlc_now()
    r = store.apply({"patients": wire(PATIENTS, [{"id": pid, "_deleted": True}], hlc=h)}, peer="central")
    assert r.tables["patients"].quarantined == 1
    (e,) = _entries(store)
    assert "still referenced by encounters.patient_id" in e["reason"]
    app.run(("DELETE FROM encounters WHERE id = ?", (eid,)))
    (o,) = store.retry_quarantined([e["id"]])
    assert (o.applied, o.note) == (True, "applied: the row is deleted")
    assert app.rows("SELECT count(*) FROM patients") == [(0,)]
    assert app.rows("SELECT _hlc, _node FROM _tidesync_tomb_patients WHERE id = ?", (pid,)) == [(h, "central")]


def test_retry_while_the_cause_persists_keeps_one_entry(store: SQLiteStore, app: App) -> None:
    _facility_and_patient(store)
    _refuse(app, "reference_data")
    drug = {"id": new_id(), "type": "drug", "code": "c", "name": "n", "visibility": "current"}
    store.apply({"reference_data": wire(REGISTRY["reference_data"], [drug])}, peer="central")
    (first,) = _entries(store)
    for attempt in (2, 3):
        (o,) = store.retry_quarantined()
        assert (o.applied, o.attempts, o.note, o.reason) == (False, attempt, "rejected again on retry",
                                                             first["reason"])  # fmt: skip
        (e,) = _entries(store)
        assert (e["id"], e["status"], e["attempts"], e["note"]) == (first["id"], "held", attempt, o.note)
    assert store.conflicts().num_rows == 0


def test_a_field_wise_mix_retried_goes_back_to_the_peer(store: SQLiteStore, app: App) -> None:
    # The refused row was a mix of the peer's edit and a local one: once written, the
    # peer has not seen it, so it must not be marked as the peer's (no echo suppression).
    _, pid, _ = _facility_and_patient(store)
    app.run(("UPDATE patients SET last_name = 'Li' WHERE id = ?", (pid,)))
    local = app.row("patients", pid)
    store.read_window(0)
    _refuse(app, "patients", "NEW.first_name = 'Robot'")
    h = local["_hlc"] + 1000
    theirs = {"id": pid, "display_id": "P1", "first_name": "Robot", "last_name": "Lee", "_hlc": h,
              "_base_hlc": local["_base_hlc"], **{f"_hlc_{c.name}": local[f"_hlc_{c.name}"] - 1
                                                   for c in PATIENTS.data_columns}, "_hlc_first_name": h}  # fmt: skip
    theirs["_hlc_last_name"] = local["_hlc_last_name"] - 1
    assert store.apply({"patients": wire(PATIENTS, [theirs])}, peer="central").total("quarantined") == 1
    (e,) = _entries(store)
    assert not decode_version(PATIENTS, e["version"], e["id"]).from_peer
    _allow(app, "patients")
    (o,) = store.retry_quarantined()
    assert o.applied and o.note == "applied"
    row = app.row("patients", pid)
    assert (row["first_name"], row["last_name"], row["_origin"]) == ("Robot", "Li", None)
    assert store.read_window(0, peer="central").tables["patients"].num_rows == 1


def test_retry_of_a_version_superseded_by_a_local_edit_keeps_the_edit_and_logs_the_conflict(
    store: SQLiteStore, app: App
) -> None:
    _, pid, _ = _facility_and_patient(store)
    base = app.row("patients", pid)
    _refuse(app, "patients", "NEW.first_name = 'Robot'")
    h = hlc_now() + (1 << 16)
    theirs = {"id": pid, "display_id": "P1", "first_name": "Robot", "last_name": "Lee", "_hlc": h,
              "_base_hlc": base["_hlc"], **{f"_hlc_{c.name}": base[f"_hlc_{c.name}"] for c in PATIENTS.data_columns},
              "_hlc_first_name": h}  # fmt: skip
    # As a node's pull applies: adopting the hub's re-stamped versions of its own rows.
    pulled = store.apply({"patients": wire(PATIENTS, [theirs])}, peer="central",
                         options=ApplyOptions(own_node="device-a"))
    assert pulled.total("quarantined") == 1
    (e,) = _entries(store)
    assert decode_version(PATIENTS, e["version"], e["id"]).own_node == "device-a"
    while app.row("patients", pid)["_hlc"] <= h:  # a later local edit of the same field, concurrent
        app.run(("UPDATE patients SET first_name = 'Anna' WHERE id = ?", (pid,)))
    mine = app.row("patients", pid)
    _allow(app, "patients")
    (o,) = store.retry_quarantined()
    assert o.applied and o.note.startswith("merged field by field with a newer version here") and "device-a" in o.note
    assert app.row("patients", pid) == mine  # the newer edit stays, untouched
    (c,) = store.conflicts("patients").to_pylist()
    assert (c["loser_hlc"], c["loser_node"], c["lost_columns"], c["peer"]) == (h, "central", ["first_name"], "central")
    assert o.note.endswith(f"conflict logged (#{c['id']})")
    assert _entries(store)[0]["status"] == "retried" and e["id"] == o.id


def test_discard_is_recorded_listed_and_final(store: SQLiteStore, app: App) -> None:
    _, pid, _ = _facility_and_patient(store)
    orphans = wire(VITALS, [_vital(new_id(), pid), _vital(new_id(), pid)])
    store.apply({"vitals": orphans}, peer="central")
    first, second = (e["id"] for e in _entries(store))
    with pytest.raises(SyncError, match="needs a note"):
        store.discard_quarantined([first], "")
    assert store.discard_quarantined([first], "duplicate of P-123, confirmed with ward") == [first]
    (d,) = list_entries(store, status="discarded")
    assert (d["id"], d["note"]) == (first, "duplicate of P-123, confirmed with ward")
    assert isinstance(d["resolved_at"], datetime)
    assert [e["id"] for e in list_entries(store)] == [second]
    assert [e["id"] for e in list_entries(store, status="all")] == [second, first]
    with pytest.raises(SyncError, match=f"quarantine entry {first} was discarded .* never retried"):
        store.retry_quarantined([first])
    with pytest.raises(SyncError, match="no quarantine entry with id 424242"):
        store.discard_quarantined([second, 424242], "x")
    assert [(e["status"], e["attempts"]) for e in _entries(store)] == [("discarded", 1), ("held", 1)]
    history = show_entry(store, first)["history"]
    assert [h["event"] for h in history] == ["quarantined (from central)", "discarded"]


def test_an_entry_from_an_older_install_is_listed_and_discarded_but_not_retried(
    store: SQLiteStore, app: App
) -> None:
    # The quarantine as an older install made it, holding one entry.
    app.run("DROP TABLE _tidesync_quarantine",
            "CREATE TABLE _tidesync_quarantine (id INTEGER PRIMARY KEY, table_name TEXT NOT NULL, key TEXT, "
            "hlc INTEGER, node TEXT, row_data TEXT NOT NULL, reason TEXT NOT NULL, peer TEXT, recorded_at TEXT "
            "NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'))",
            ("INSERT INTO _tidesync_quarantine (table_name, key, hlc, node, row_data, reason, peer) "
             "VALUES ('vitals', ?, 1, 'central', '{}', 'old reason', 'central')", (new_id(),)))  # fmt: skip
    _, pid, _ = _facility_and_patient(store)
    store.apply({"vitals": wire(VITALS, [_vital(new_id(), pid)])}, peer="central")  # upgrades, then logs
    store.install("device-a")  # idempotent
    old, new = _entries(store)
    assert (old["version"], old["status"], old["attempts"]) == (None, "held", 1)
    assert new["version"] is not None and not list_entries(store, status="all")[1]["retryable"]
    outcomes = {o.id: o for o in store.retry_quarantined()}
    assert (outcomes[old["id"]].applied, outcomes[old["id"]].note) == (False, NO_VERSION)
    assert outcomes[new["id"]].attempts == 2  # still an orphan
    assert _entries(store)[0]["attempts"] == 1
    store.discard_quarantined([old["id"]], "re-entered by hand")
    assert [e["status"] for e in _entries(store)] == ["discarded", "held"]


def test_a_retry_is_atomic(store: SQLiteStore, app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    fid, pid, eid = _facility_and_patient(store)
    other = new_id()
    store.apply({"vitals": wire(VITALS, [_vital(other, pid), _vital(other, pid)])}, peer="central")
    first, second = _entries(store)
    store.apply({"encounters": wire(ENCOUNTERS, [{"id": other, "patient_id": pid, "facility_id": fid,
                                                  "encounter_type": "clinic",
                                                  "start_at": datetime(2024, 5, 2, tzinfo=UTC)}])},
                peer="central")  # fmt: skip
    app.run(("UPDATE _tidesync_quarantine SET version = x'00ff' WHERE id = ?", (second["id"],)))

    def unchanged() -> None:
        assert [(e["status"], e["attempts"]) for e in _entries(store)] == [("held", 1), ("held", 1)]
        assert app.one("SELECT count(*) FROM vitals") == 0

    with pytest.raises(SyncError, match=f"quarantine entry {second['id']}: its stored version does not decode"):
        store.retry_quarantined()
    unchanged()
    assert "does not decode" in show_entry(store, second["id"])["version_error"]  # shown, not raised
    app.run(("UPDATE _tidesync_quarantine SET version = ? WHERE id = ?", (second["version"], second["id"])))

    def fail(self: SQLiteQuarantineTxn, outcomes: object) -> None:
        raise RuntimeError("the battery died")

    monkeypatch.setattr(SQLiteQuarantineTxn, "settle", fail)
    with pytest.raises(RuntimeError, match="the battery died"):
        store.retry_quarantined()
    unchanged()
    monkeypatch.undo()
    assert [o.applied for o in store.retry_quarantined()] == [True, True]
    assert app.one("SELECT count(*) FROM vitals") == 2
    assert uuid.UUID(app.one("SELECT encounter_id FROM vitals LIMIT 1")) == uuid.UUID(other)
