"""End to end: central + two facilities + a mobile over real HTTP (issue 4's behaviours)."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.sync.conftest import FACILITY_A, FACILITY_B, Net, ids, query, sql


def test_reference_data_reaches_every_node(network: Net) -> None:
    for node in (network.a, network.b, network.mobile):
        assert ids(node, "facilities") == {FACILITY_A, FACILITY_B}


def test_record_reaches_other_facility_only_once_marked_there(network: Net) -> None:
    a, b = network.a, network.b
    pid = network.new_patient(a)
    report = a.sync()
    assert report.pushed_rows == 3 and report.ok
    b.sync()
    assert pid in ids(b, "patients")  # patients are global
    assert ids(b, "encounters") == set()  # but their history is not, until marked
    # B marks the patient: the whole history arrives in the same cycle.
    network.mark(b, pid)
    report = b.sync()
    assert ids(b, "encounters") == ids(a, "encounters") and len(ids(b, "encounters")) == 1
    assert report.pulled_rows >= 1


def test_concurrent_field_edits_merge(network: Net) -> None:
    a, b = network.a, network.b
    pid = network.new_patient(a)
    network.share(pid)
    # Both offline: A fixes the last name, B the sex.
    sql(a, f"UPDATE patients SET last_name = 'Fifita' WHERE id = '{pid}'")
    sql(b, f"UPDATE patients SET sex = 'female' WHERE id = '{pid}'")
    a.sync(), b.sync(), a.sync()
    for node in (a, b, network.net):
        assert query(node, f"SELECT last_name, sex FROM patients WHERE id = '{pid}'") == [("Fifita", "female")]
    assert network.net.central.conflicts("patients").num_rows == 0  # different fields: no conflict


def test_whole_record_conflict_decided_by_hlc_and_logged(network: Net) -> None:
    a, b = network.a, network.b
    pid = network.new_patient(a)
    network.share(pid)
    eid = str(query(a, f"SELECT id FROM encounters WHERE patient_id = '{pid}'")[0][0])
    sql(a, f"UPDATE encounters SET reason = 'cough' WHERE id = '{eid}'")
    sql(b, f"UPDATE encounters SET reason = 'fever' WHERE id = '{eid}'")  # later stamp: wins
    a.sync(), b.sync(), a.sync()
    for node in (a, b, network.net):
        assert query(node, f"SELECT reason FROM encounters WHERE id = '{eid}'") == [("fever",)]
    log = network.net.central.conflicts("encounters").to_pylist()
    assert len(log) == 1 and json.loads(log[0]["loser_row"])["reason"] == "cough"
    assert log[0]["loser_node"] == "fac-a" and log[0]["winner_node"] == "fac-b"


def test_mobile_sees_only_its_scope(network: Net) -> None:
    a, b, m = network.a, network.b, network.mobile
    at_a = network.new_patient(a, "Kofi")
    at_b = network.new_patient(b, "Mele")
    a.sync(), b.sync(), m.sync()
    assert {at_a, at_b} <= ids(m, "patients")
    mine = {str(r[0]) for r in query(m, "SELECT patient_id FROM encounters")}
    assert mine == {at_a}
    assert {str(r[0]) for r in query(m, "SELECT facility_id FROM patient_facilities")} == {FACILITY_A}


def test_mobile_vitals_recorded_offline_reach_central_and_facility(network: Net) -> None:
    a, m = network.a, network.mobile
    pid = network.new_patient(a)
    a.sync(), m.sync()
    eid = str(query(m, f"SELECT id FROM encounters WHERE patient_id = '{pid}'")[0][0])
    sql(m, f"INSERT INTO vitals (id, encounter_id, patient_id, recorded_at, heart_rate) VALUES "
           f"('11111111-2222-4333-8444-555555555555', '{eid}', '{pid}', '2026-11-21T09:00:00.000000Z', 72)")  # fmt: skip
    assert m.sync().pushed_rows == 1
    a.sync()
    assert query(a, "SELECT heart_rate FROM vitals") == [(72,)]
    assert query(network.net, "SELECT heart_rate FROM vitals") == [(72,)]


def test_sensitive_facility_rows_stay_home(network: Net) -> None:
    a, b = network.a, network.b
    sql(network.net, f"UPDATE facilities SET is_sensitive = true WHERE id = '{FACILITY_B}'")
    pid = network.new_patient(a)
    network.share(pid)
    sql(b, Net.encounter_sql(b, pid))  # an encounter at the sensitive facility
    b.sync(), a.sync()
    at_b = {str(r[0]) for r in query(b, "SELECT facility_id FROM encounters")}
    at_a = {str(r[0]) for r in query(a, "SELECT facility_id FROM encounters")}
    assert at_b == {FACILITY_A, FACILITY_B}
    assert at_a == {FACILITY_A}


def test_push_only_and_push_then_delete(network: Net) -> None:
    a, b = network.a, network.b
    sql(a, f"INSERT INTO audit_log (facility_id, action) VALUES ('{FACILITY_A}', 'login')",
        f"INSERT INTO attachments (facility_id, kind, size_bytes, data) VALUES ('{FACILITY_A}', 'photo', 3, 'abc')")
    report = a.sync()
    assert report.forgotten == 1
    assert query(a, "SELECT count(*) FROM attachments") == [(0,)]  # left the facility
    assert query(a, "SELECT count(*) FROM audit_log") == [(1,)]  # logs stay
    assert query(network.net, "SELECT count(*) FROM attachments") == [(1,)]
    assert query(network.net, "SELECT count(*) FROM audit_log") == [(1,)]
    b.sync()
    assert query(b, "SELECT count(*) FROM audit_log") == [(0,)]
    a.sync()  # forgetting is not deleting: nothing goes up, central keeps the attachment
    assert query(network.net, "SELECT count(*) FROM attachments") == [(1,)]


def test_deletes_propagate(network: Net) -> None:
    a, b = network.a, network.b
    pid = network.new_patient(a)
    network.share(pid)
    sql(a, f"DELETE FROM encounters WHERE patient_id = '{pid}'")
    a.sync(), b.sync()
    assert query(b, f"SELECT count(*) FROM encounters WHERE patient_id = '{pid}'") == [(0,)]


def test_a_transfer_does_not_wedge_a_device_that_recorded_care_before_it_knew(network: Net) -> None:
    """Regression (found by the convergence harness): a patient moved from facility A to
    B while A's mobile was offline; the mobile then recorded an encounter and a note's
    deletion for the patient. Central refused the whole push ("not marked for its
    facility") on every retry, so the device could never sync again."""
    a, b, mobile = network.a, network.b, network.mobile
    pid = network.new_patient(a)
    a.sync(), mobile.sync()
    # The transfer: A ends its mark, B marks the patient; both sync.
    sql(a, f"UPDATE patient_facilities SET deleted_at = now() WHERE patient_id = '{pid}'")
    network.share(pid)
    # Meanwhile, on the ward's tablet that has not heard of it yet:
    eid = str(uuid.uuid4())
    sql(mobile, network.encounter_sql(mobile, pid, eid))
    report = mobile.sync()
    assert report.ok and report.pushed_rows >= 1
    assert eid in ids(network.net, "encounters")
    b.sync()
    assert eid in ids(b, "encounters")  # the patient's new facility has the care given
    # A facility that never had the patient still may not push its rows.
    assert mobile.sync().ok


def test_a_mark_past_the_watermark_waits_with_the_patients_history(network: Net) -> None:
    """Regression (found by the convergence harness): a facility marked a patient while an
    older transaction at central held the watermark back. The pull's scope counted the
    mark (the snapshot saw it) but its history waited for the window carrying the mark,
    so a newer note went out ahead of the older encounter it belongs to, and was
    quarantined at the facility for want of its parent."""
    from tidesync.pg.conn import connect

    a, b = network.a, network.b
    pid = network.new_patient(b)
    b.sync()
    eid = query(b, f"SELECT id FROM encounters WHERE patient_id = '{pid}'")[0][0]
    a.sync()  # A knows the patient (global) but not its encounter
    sql(b, f"INSERT INTO notes (id, encounter_id, patient_id, note_type, content, recorded_at) "
           f"VALUES ('{uuid.uuid4()}', '{eid}', '{pid}', 'progress', 'stable', now())")  # fmt: skip
    b.sync()
    network.mark(a, pid)
    with connect(network.net.central_dsn) as held:  # an older transaction, still running
        with held.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("SELECT pg_current_xact_id()")
            report = a.sync()  # pushes the mark (past central's watermark), pulls around it
            cur.execute("COMMIT")
    assert report.ok and report.pushed_rows == 1
    assert a.store.quarantine().num_rows == 0
    a.sync()
    assert query(a, f"SELECT count(*) FROM notes WHERE patient_id = '{pid}'") == [(1,)]
    assert query(a, f"SELECT count(*) FROM encounters WHERE id = '{eid}'") == [(1,)]
    assert a.store.quarantine().num_rows == 0


def test_no_echo_and_quiet_cycles(network: Net) -> None:
    a = network.a
    network.new_patient(a)
    a.sync()
    again = a.sync()
    assert again.pushed_rows == 0 and again.pulled_rows == 0


def test_sessions_are_recorded(network: Net) -> None:
    from tidesync.sync import central

    network.new_patient(network.a)
    network.a.sync()
    sessions = central.sessions(network.net.central).to_pylist()
    last = [s for s in sessions if s["node"] == "fac-a"][0]
    assert last["status"] == "ended" and last["rows_in"] == 3 and last["bytes_in"] > 0
    phases = json.loads(last["phases"])
    assert {"push_merge", "pull_prepare", "node"} <= phases.keys()
    assert phases["node"]["pushed_rows"] == 3


@pytest.mark.parametrize("node_name", ["a", "mobile"])
def test_offline_for_many_changes_then_catches_up(network: Net, node_name: str) -> None:
    node = getattr(network, node_name)
    pids = [network.new_patient(network.b, f"P{i}") for i in range(20)]
    for pid in pids[:10]:
        sql(network.b, f"UPDATE patients SET last_name = 'X' WHERE id = '{pid}'")
    network.b.sync()
    node.sync()
    assert set(pids) <= ids(node, "patients")
    assert query(node, "SELECT count(*) FROM patients WHERE last_name = 'X'") == [(10,)]
