"""The quarantine on PostgreSQL: whole versions kept, retried through the normal apply in
one transaction, discarded with a note; never a duplicate entry, never a lost write."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pytest

from tests.sqlite.util import hlc_now, new_id, wire
from tidesync.errors import SyncError
from tidesync.pg import PostgresStore
from tidesync.pg.apply import PgQuarantineTxn
from tidesync.quarantine import NO_VERSION, decode_version, list_entries, show_entry
from tidesync.schemas.demo import REGISTRY

from .util import one, rows, run, seed_encounter, seed_patient

REFUSE = ("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
          "$$ BEGIN RAISE EXCEPTION 'refused by the test' USING ERRCODE = 'check_violation'; END $$")  # fmt: skip


def _refuse_all(dsn: str, tables: list[str]) -> None:
    """Every write to ``tables`` (rows and tombstones) fails as a constraint would."""
    stmts = [REFUSE]
    for t in tables:
        for target in (t, f'tidesync."{t}__tombstones"'):
            stmts.append(f"CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON {target} FOR EACH ROW "
                         "EXECUTE FUNCTION refuse()")  # fmt: skip
    run(dsn, *stmts)


def _entries(store: PostgresStore, **kw: Any) -> list[dict[str, Any]]:
    return store.quarantine(**kw).to_pylist()


def _synced_with_hr_cap(make_demo_store: Any, cap: str = "heart_rate < 71") -> tuple[PostgresStore, PostgresStore, Any]:
    """Facility A's patient, encounter and vitals (heart rates 70, 71, 72) applied at
    central, where a CHECK the application added refuses two of the vitals."""
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    pid = seed_patient(a.dsn)
    seed_encounter(a.dsn, pid, vitals=3)
    w = a.read_window(0)
    run(central.dsn, f"ALTER TABLE vitals ADD CONSTRAINT hr_cap CHECK ({cap})")
    r = central.apply(w.tables, peer="facility-a", cursor=("facility-a", w.watermark))
    assert r.tables["vitals"].quarantined == 2 and r.tables["vitals"].inserted == 1
    return a, central, w


def test_the_stored_version_round_trips_every_type_stamp_and_tombstone(demo_store: PostgresStore) -> None:
    h = hlc_now()
    ts = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC)
    fid, pid, pid2 = new_id(), new_id(), new_id()
    field_stamps = {f"_hlc_{c.name}": h - 7 * (i + 1) for i, c in enumerate(REGISTRY["patients"].data_columns)}
    batches = {
        "facilities": wire(REGISTRY["facilities"], [{"id": fid, "code": "F", "name": "Ünïcode ✓", "is_sensitive": True,
                                                     "updated_at": ts}]),
        "patients": wire(REGISTRY["patients"], [
            {"id": pid, "display_id": "P", "first_name": "Ann", "date_of_birth": date(1960, 1, 31),
             "village_id": new_id(), "_base_hlc": h - 1000, **field_stamps},
            {"id": pid2, "_deleted": True, "_base_hlc": h - 5},  # a tombstone of a field-wise table
        ], hlc=h),
        "lab_requests": wire(REGISTRY["lab_requests"], [{"id": new_id(), "patient_id": pid, "status": "s",
                                                         "requested_at": ts, "result_value": -1.5e-300,
                                                         "sample_at": datetime(2024, 1, 1, 12, 0, 0, 1)}]),
        "vitals": wire(REGISTRY["vitals"], [{"id": new_id(), "encounter_id": new_id(), "patient_id": pid,
                                             "recorded_at": ts, "heart_rate": -2**31, "weight_kg": 1e308},
                                            {"id": new_id(), "_deleted": True}]),
        "audit_log": wire(REGISTRY["audit_log"], [{"id": new_id(), "action": "x", "at": ts, "sequence": 2**62 + 1}]),
        "attachments": wire(REGISTRY["attachments"], [{"id": new_id(), "facility_id": fid, "kind": "k",
                                                       "size_bytes": 3, "data": b"\x00\xff\x10"}]),
    }  # fmt: skip
    _refuse_all(demo_store.dsn, list(batches))
    result = demo_store.apply(batches, peer="central")
    assert result.total("quarantined") == sum(t.num_rows for t in batches.values()) == 8
    entries = _entries(demo_store)
    assert {e["status"] for e in entries} == {"held"} and {e["attempts"] for e in entries} == {1}
    for e in entries:
        spec = REGISTRY[e["table_name"]]
        sent = batches[spec.name]
        key = uuid.UUID(e["key"]).bytes
        expected = sent.filter(pa.compute.equal(sent.column(spec.key), pa.scalar(key, pa.binary(16))))
        stored = decode_version(spec, e["version"], e["id"])
        assert stored.rows.equals(expected), spec.name
        assert stored.from_peer and stored.own_node is None
        assert (e["hlc"], e["node"]) == (expected.column("_hlc")[0].as_py(), "central")
    # show puts the stamps in front of people, field stamps included.
    (patient,) = [e for e in entries if e["key"] == pid]
    shown = show_entry(demo_store, patient["id"])
    assert shown["version"]["fields"]["first_name"]["hlc"] == field_stamps["_hlc_first_name"]
    assert shown["version"]["base_hlc"] == h - 1000 and shown["row"]["first_name"] == "Ann"
    assert shown["now"] is None and "refused by the test" in shown["reason"]


def test_retry_after_the_cause_is_fixed_applies_and_a_second_apply_changes_nothing(  # type: ignore[no-untyped-def]
    make_demo_store,
) -> None:
    a, central, w = _synced_with_hr_cap(make_demo_store)
    held = list_entries(central)
    assert [e["status"] for e in held] == ["held", "held"] and all("hr_cap" in e["reason"] for e in held)
    run(central.dsn, "ALTER TABLE vitals DROP CONSTRAINT hr_cap")
    outcomes = central.retry_quarantined()
    assert [(o.applied, o.note, o.attempts) for o in outcomes] == [(True, "applied", 2)] * 2
    assert one(central.dsn, "SELECT count(*) FROM vitals") == 3
    # The rows are the peer's versions, stamps and all, and marked as from it: no echo.
    q = "SELECT id, _hlc, _node FROM vitals ORDER BY heart_rate"
    assert rows(central.dsn, q) == rows(a.dsn, q)
    assert rows(central.dsn, "SELECT DISTINCT _origin FROM vitals") == [("facility-a",)]
    assert central.read_window(0, peer="facility-a").tables["vitals"].num_rows == 0
    assert central.read_window(0, peer="facility-b").tables["vitals"].num_rows == 3
    log = _entries(central, status="retried")
    assert [(e["status"], e["attempts"], e["note"]) for e in log] == [("retried", 2, "applied")] * 2
    assert all(e["resolved_at"] is not None for e in log)
    assert list_entries(central) == [] and len(list_entries(central, status="all")) == 2
    again = central.apply(w.tables, peer="facility-a")
    assert again.total("inserted") == again.total("updated") == again.total("quarantined") == 0
    assert again.tables["vitals"].unchanged == 3 and len(_entries(central)) == 2
    with pytest.raises(SyncError, match="already retried .* nothing to retry"):
        central.retry_quarantined([outcomes[0].id])


def test_a_refused_tombstone_is_retried_once_its_children_are_gone(make_demo_store) -> None:  # type: ignore[no-untyped-def]
    # A node hard-deletes a patient with its encounter and vitals, but the central
    # server holds a note of that patient the node never had: the patient's tombstone is
    # refused (the children the node deleted go, children first) and waits in the
    # quarantine; once the note is gone, the retry deletes the patient.
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    pid = seed_patient(a.dsn)
    seed_encounter(a.dsn, pid, vitals=2)
    w = a.read_window(0)
    central.apply(w.tables, peer="facility-a")
    run(central.dsn, f"INSERT INTO notes (id, patient_id, note_type, content, recorded_at) "
        f"VALUES ('{new_id()}', '{pid}', 'admin', 'seen at central', now())")  # fmt: skip
    run(a.dsn, "DELETE FROM vitals", "DELETE FROM encounters", f"DELETE FROM patients WHERE id = '{pid}'")
    r = central.apply(a.read_window(w.watermark).tables, peer="facility-a")
    assert (r.tables["vitals"].deleted, r.tables["encounters"].deleted) == (2, 1)
    held = {e["table_name"]: e for e in _entries(central, status="held")}
    assert set(held) == {"patients"} and "foreign key" in held["patients"]["reason"]
    run(central.dsn, f"DELETE FROM notes WHERE patient_id = '{pid}'")
    outcomes = central.retry_quarantined()
    assert {o.note for o in outcomes} == {"applied: the row is deleted"}
    assert one(central.dsn, f"SELECT count(*) FROM patients WHERE id = '{pid}'") == 0
    assert one(central.dsn, f"SELECT _node FROM tidesync.patients__tombstones WHERE id = '{pid}'") == "facility-a"
    assert show_entry(central, held["patients"]["id"])["now"]["deleted"] is True


def test_retry_while_the_cause_persists_keeps_one_entry_with_the_new_reason(  # type: ignore[no-untyped-def]
    make_demo_store,
) -> None:
    a, central, _ = _synced_with_hr_cap(make_demo_store)
    first = _entries(central)
    conflicts = central.conflicts().num_rows
    # The application replaces its rule with a stricter one: still refused, another reason.
    run(central.dsn, "ALTER TABLE vitals DROP CONSTRAINT hr_cap",
        "ALTER TABLE vitals ADD CONSTRAINT hr_cap_strict CHECK (heart_rate <= 70)")  # fmt: skip
    outcomes = central.retry_quarantined([first[0]["id"]])
    (o,) = outcomes
    assert not o.applied and o.attempts == 2 and "hr_cap_strict" in o.reason
    assert o.note.startswith("rejected again on retry (before: ") and "hr_cap" in o.note
    after = _entries(central)
    assert [e["id"] for e in after] == [e["id"] for e in first]  # no new entry
    assert (after[0]["status"], after[0]["attempts"], after[0]["reason"]) == ("held", 2, o.reason)
    assert after[1]["attempts"] == 1 and after[1]["reason"] == first[1]["reason"]  # not selected: untouched
    assert central.conflicts().num_rows == conflicts
    # And again: still one entry, attempts 3.
    (o3,) = central.retry_quarantined([first[0]["id"]])
    assert (o3.attempts, o3.note) == (3, "rejected again on retry")
    assert len(_entries(central)) == 2 and _entries(central)[0]["attempts"] == 3


def test_a_version_without_stamps_is_kept_and_refused_again_as_one_entry(demo_store: PostgresStore) -> None:
    spec = REGISTRY["reference_data"]
    batch = wire(spec, [{"id": new_id(), "type": "t", "code": "c", "name": "n", "visibility": "current"}])
    batch = batch.set_column(batch.schema.get_field_index("_hlc"), batch.schema.field("_hlc"),
                             pa.nulls(1, pa.int64()))  # fmt: skip
    assert demo_store.apply({"reference_data": batch}, peer="central").total("quarantined") == 1
    (e,) = _entries(demo_store)
    assert e["hlc"] is None and decode_version(spec, e["version"], e["id"]).rows.equals(batch)
    (o,) = demo_store.retry_quarantined()
    assert (o.applied, o.attempts, o.reason) == (False, 2, "a version needs a key, _hlc and _node")
    assert [(x["id"], x["attempts"]) for x in _entries(demo_store)] == [(e["id"], 2)]


def test_retry_of_a_version_superseded_by_a_local_edit_keeps_the_edit_and_logs_the_conflict(  # type: ignore[no-untyped-def]
    make_demo_store,
) -> None:
    central: PostgresStore = make_demo_store("central")
    a: PostgresStore = make_demo_store("facility-a")
    pid = seed_patient(central.dsn)
    seed_encounter(central.dsn, pid, vitals=1)
    w = central.read_window(0)
    a.apply(w.tables, peer="central")
    run(a.dsn, "ALTER TABLE vitals ADD CONSTRAINT hr_cap CHECK (heart_rate < 100)")
    run(central.dsn, "UPDATE vitals SET heart_rate = 150")  # refused at A
    assert a.apply(central.read_window(w.watermark).tables, peer="central").total("quarantined") == 1
    (e,) = _entries(a)
    run(a.dsn, "UPDATE vitals SET heart_rate = 80")  # later, and from the same base: concurrent
    local = rows(a.dsn, "SELECT _hlc, _node FROM vitals")[0]
    run(a.dsn, "ALTER TABLE vitals DROP CONSTRAINT hr_cap")
    (o,) = a.retry_quarantined()
    assert o.applied and o.note.startswith("superseded: a newer version was already here") and "facility-a" in o.note
    assert rows(a.dsn, "SELECT heart_rate, _hlc, _node FROM vitals") == [(80, *local)]
    (c,) = a.conflicts("vitals").to_pylist()
    assert (c["loser_hlc"], c["loser_node"], c["peer"], c["key"]) == (e["hlc"], "central", "central", e["key"])
    assert o.note.endswith(f"conflict logged (#{c['id']})")
    assert _entries(a)[0]["status"] == "retried"


def test_discard_is_recorded_listed_and_final(make_demo_store) -> None:  # type: ignore[no-untyped-def]
    _, central, _ = _synced_with_hr_cap(make_demo_store)
    first, second = (e["id"] for e in _entries(central))
    with pytest.raises(SyncError, match="needs a note"):
        central.discard_quarantined([first], "  ")
    assert central.discard_quarantined([first], "duplicate of P-123, confirmed with ward") == [first]
    (d,) = list_entries(central, status="discarded")
    assert (d["id"], d["status"], d["note"]) == (first, "discarded", "duplicate of P-123, confirmed with ward")
    assert d["resolved_at"] is not None
    assert [e["id"] for e in list_entries(central)] == [second]
    assert [e["id"] for e in list_entries(central, status="all")] == [second, first]
    with pytest.raises(SyncError, match=f"quarantine entry {first} was discarded .* never retried"):
        central.retry_quarantined([first, second])
    with pytest.raises(SyncError, match="was discarded"):
        central.discard_quarantined([first], "again")
    with pytest.raises(SyncError, match="no quarantine entry with id 999999"):
        central.retry_quarantined([second, 999999])
    assert [(e["status"], e["attempts"]) for e in _entries(central)] == [("discarded", 1), ("held", 1)]
    # --all retries only what is held.
    run(central.dsn, "ALTER TABLE vitals DROP CONSTRAINT hr_cap")
    assert [o.id for o in central.retry_quarantined()] == [second]
    assert one(central.dsn, "SELECT count(*) FROM vitals") == 2


def test_an_entry_from_an_older_install_is_listed_and_discarded_but_not_retried(  # type: ignore[no-untyped-def]
    make_demo_store,
) -> None:
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    # The quarantine as an older install made it, with one of its entries.
    run(central.dsn, "ALTER TABLE tidesync.quarantine DROP COLUMN version, DROP COLUMN status, "
                     "DROP COLUMN attempts, DROP COLUMN resolved_at, DROP COLUMN note",
        "INSERT INTO tidesync.quarantine (table_name, key, hlc, node, row_data, reason, peer) VALUES "
        f"('vitals', '{new_id()}', 1, 'facility-a', '{{\"heart_rate\": 999}}', 'old reason', 'facility-a')")  # fmt: skip
    # Apply quarantines into it: the columns come first, and the new entry keeps its version.
    pid = seed_patient(a.dsn)
    seed_encounter(a.dsn, pid, vitals=3)
    run(central.dsn, "ALTER TABLE vitals ADD CONSTRAINT hr_cap CHECK (heart_rate < 72)")
    assert central.apply(a.read_window(0).tables, peer="facility-a").tables["vitals"].quarantined == 1
    central.install("central")  # and install upgrades idempotently
    old, new = list_entries(central, status="all")[::-1]
    assert (old["retryable"], old["status"], old["attempts"]) == (False, "held", 1)
    assert new["retryable"] and new["stamp"]["node"] == "facility-a"
    assert show_entry(central, old["id"])["version"] is None
    run(central.dsn, "ALTER TABLE vitals DROP CONSTRAINT hr_cap")
    outcomes = {o.id: o for o in central.retry_quarantined()}
    assert (outcomes[old["id"]].applied, outcomes[old["id"]].note) == (False, NO_VERSION)
    assert outcomes[new["id"]].applied
    assert [(e["status"], e["attempts"]) for e in _entries(central)] == [("held", 1), ("retried", 2)]
    central.discard_quarantined([old["id"]], "re-entered by hand at facility-a")
    assert _entries(central, status="held") == []


def test_a_retry_is_atomic(make_demo_store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _, central, _ = _synced_with_hr_cap(make_demo_store)
    first, second = _entries(central)
    run(central.dsn, "ALTER TABLE vitals DROP CONSTRAINT hr_cap",
        f"UPDATE tidesync.quarantine SET version = '\\x00ff'::bytea WHERE id = {second['id']}")  # fmt: skip

    def unchanged() -> None:
        assert [(e["status"], e["attempts"]) for e in _entries(central)] == [("held", 1), ("held", 1)]
        assert one(central.dsn, "SELECT count(*) FROM vitals") == 1

    with pytest.raises(SyncError, match=f"quarantine entry {second['id']}: its stored version does not decode"):
        central.retry_quarantined()
    unchanged()
    assert "does not decode" in show_entry(central, second["id"])["version_error"]  # shown, not raised
    # An error after the rows were written takes them back with everything else.
    run(central.dsn, f"UPDATE tidesync.quarantine SET version = '\\x{second['version'].hex()}'::bytea "
                     f"WHERE id = {second['id']}")  # fmt: skip

    def fail(self: PgQuarantineTxn, outcomes: object) -> None:
        raise RuntimeError("lost the connection")

    monkeypatch.setattr(PgQuarantineTxn, "settle", fail)
    with pytest.raises(RuntimeError, match="lost the connection"):
        central.retry_quarantined()
    unchanged()
    monkeypatch.undo()
    assert [o.applied for o in central.retry_quarantined()] == [True, True]


def test_bulk_load_orphans_keep_their_version_and_apply_once_the_parent_is_there(  # type: ignore[no-untyped-def]
    make_demo_store, monkeypatch
) -> None:
    import tidesync.pg.apply as pg_apply

    monkeypatch.setattr(pg_apply, "LOAD_MIN_ROWS", 1)  # every table is a bulk load into an empty table
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    pid = seed_patient(a.dsn)
    seed_encounter(a.dsn, pid, vitals=2)
    w = a.read_window(0)
    vitals = w.tables["vitals"]
    eid = vitals.column("encounter_id")[0].as_py()
    central.apply({k: v for k, v in w.tables.items() if k != "encounters"}, peer="facility-a")
    (e1, e2) = _entries(central)
    assert "vitals_encounter_id_fkey" in e1["reason"]
    stored = [decode_version(REGISTRY["vitals"], e["version"], e["id"]).rows for e in (e1, e2)]
    assert pa.concat_tables(stored).sort_by("id").equals(vitals.sort_by("id"))
    assert [o.applied for o in central.retry_quarantined()] == [False, False]  # the encounter is still missing
    central.apply({"encounters": w.tables["encounters"]}, peer="facility-a")
    assert [o.note for o in central.retry_quarantined()] == ["applied", "applied"]
    assert one(central.dsn, f"SELECT count(*) FROM vitals WHERE encounter_id = '{uuid.UUID(bytes=eid)}'") == 2
    assert [e["attempts"] for e in _entries(central)] == [3, 3]
