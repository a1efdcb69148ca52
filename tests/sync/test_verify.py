"""Verify and repair without re-syncing (issue 6): a node's copy against central's, over
real HTTP, on a PostgreSQL facility and a SQLite mobile."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from click.testing import CliRunner

from tidesync.errors import AuthError, ProtocolError, SchemaMismatchError, SyncError
from tidesync.sync import verify as verify_mod
from tidesync.sync.verify import hashing, messages, scope_cache
from tidesync.sync.client import CentralClient
from tidesync.sync.local import LocalNode
from tidesync.sync.protocol import ForbiddenError, SessionError, fingerprint
from tidesync.sync.verify import VerifyReport, verify_node
from tests.sync.conftest import Net, query, sql

TABLES = ("patients", "patient_facilities", "encounters", "vitals")


def verify(node: LocalNode, *, repair: bool = False) -> VerifyReport:
    assert node.client is not None  # the fixture synced every node once
    return verify_node(node.store, node.client, repair=repair)


def vitals_sql(at: LocalNode, pid: str, eid: str, vid: str, rate: int = 70) -> str:
    when = "'2026-11-21T09:00:00.000000Z'" if at.kind == "mobile" else "now()"
    return (f"INSERT INTO vitals (id, encounter_id, patient_id, recorded_at, heart_rate, temperature_c) "
            f"VALUES ('{vid}', '{eid}', '{pid}', {when}, {rate}, 36.6)")  # fmt: skip


def care(net: Net, at: LocalNode, patients: int = 3, vitals: int = 3) -> list[tuple[str, str, list[str]]]:
    """Patients created at ``at`` (marked there), each with an encounter and vitals:
    [(patient, encounter, [vitals])]."""
    out = []
    for i in range(patients):
        pid = net.new_patient(at, f"P{i}")
        eid = str(query(at, f"SELECT id FROM encounters WHERE patient_id = '{pid}'")[0][0])
        vids = [str(uuid.uuid4()) for _ in range(vitals)]
        sql(at, *[vitals_sql(at, pid, eid, v, 60 + j) for j, v in enumerate(vids)])
        out.append((pid, eid, vids))
    return out


def central_state(net: Net) -> dict[str, Any]:
    """Everything central holds of the synced tables (rows with stamps, tombstones)."""
    state: dict[str, Any] = {}
    for t in TABLES:
        state[t] = sorted(map(repr, query(net.net, f"SELECT * FROM {t}")))
        state[t + "_tombs"] = sorted(map(repr, query(net.net, f"SELECT * FROM tidesync.{t}__tombstones")))
    return state


def behind_the_back_pg(node: LocalNode, *statements: str) -> None:
    """Write on a facility's PostgreSQL with the capture triggers (and FK checks) off."""
    sql(node, "SET LOCAL session_replication_role = replica", *statements)


def test_clean_after_sync_and_moves_digests_not_rows(network: Net) -> None:
    a = network.a
    care(network, a)
    a.sync()
    report = verify(a)
    assert report.clean and report.differences == 0 and report.unrepaired == 0
    names = {t.table for t in report.tables}
    assert {"facilities", "users", "patients", "encounters", "vitals"} <= names
    assert not names & {"audit_log", "attachments"}  # never sent to nodes: nothing to compare
    vit = next(t for t in report.tables if t.table == "vitals")
    assert vit.rows_here == vit.rows_central == 9 and vit.differing_buckets == 0
    assert 0 < report.bytes_up < 20_000 and report.bytes_down < 20_000


def test_a_converged_network_verifies_clean_everywhere(network: Net) -> None:
    """Merges, conflicts, deletions and a mobile's edits, all synced: every node's copy
    hashes exactly like central's (PostgreSQL and SQLite alike)."""
    a, b, m = network.a, network.b, network.mobile
    (pid, eid, vids), _ = care(network, a, patients=2)
    network.share(pid)
    m.sync()
    sql(a, f"UPDATE patients SET last_name = 'Fifita' WHERE id = '{pid}'",
        f"UPDATE encounters SET reason = 'cough' WHERE id = '{eid}'")  # fmt: skip
    sql(b, f"UPDATE patients SET sex = 'female' WHERE id = '{pid}'",
        f"UPDATE encounters SET reason = 'fever' WHERE id = '{eid}'", f"DELETE FROM vitals WHERE id = '{vids[0]}'")
    sql(m, f"UPDATE vitals SET heart_rate = 99 WHERE id = '{vids[1]}'")
    for _ in range(2):
        for node in (a, b, m):
            node.sync()
    for node in (a, b, m):
        report = verify(node)
        assert report.clean and not report.keys("out_of_scope"), (node.name, report.tables)
        assert sum(t.rows_here for t in report.tables) > 0


@pytest.mark.parametrize("rows_per_bucket", [256, 2])
def test_facility_corrupted_behind_the_engine_is_found_exactly_and_repaired(
    network: Net, monkeypatch: pytest.MonkeyPatch, rows_per_bucket: int
) -> None:
    """The acceptance test: values changed, rows deleted and a stray row inserted on a
    facility with its triggers off; verify finds exactly those keys, repair fixes them,
    a second verify finds nothing, and the next sync sends nothing back to central."""
    monkeypatch.setattr(hashing, "ROWS_PER_BUCKET", rows_per_bucket)  # 2: many buckets, most of them equal
    a, net = network.a, network.net
    people = care(network, a, patients=4)
    a.sync()
    (p1, e1, v1), (p2, e2, v2), (p3, e3, v3), _ = people
    # A vitals row deleted at central: the facility applies the tombstone...
    sql(net, f"DELETE FROM vitals WHERE id = '{v3[0]}'")
    a.sync()
    assert query(a, f"SELECT count(*) FROM vitals WHERE id = '{v3[0]}'") == [(0,)]
    stray = str(uuid.uuid4())
    copy = ("encounter_id, patient_id, recorded_at, temperature_c, heart_rate, systolic, diastolic, spo2, weight_kg, "
            "deleted_at, _cursor, _hlc, _node, _base_hlc")  # fmt: skip
    behind_the_back_pg(
        a,
        f"UPDATE encounters SET reason = 'tampered' WHERE id = '{e1}'",  # stamps untouched
        f"UPDATE patients SET first_name = 'Mallory' WHERE id = '{p2}'",  # a field-wise table
        f"UPDATE vitals SET heart_rate = heart_rate + 1 WHERE id = '{v1[1]}'",
        f"DELETE FROM vitals WHERE id = '{v2[0]}'",  # gone without a tombstone
        f"DELETE FROM vitals WHERE id = '{v2[1]}'",
        # A stray row (say, from a restore), looking as if it had been pulled:
        f"INSERT INTO vitals (id, {copy}, _origin) SELECT '{stray}', {copy}, 'central' FROM vitals "
        f"WHERE id = '{v1[2]}'",
        # ...and the deleted one back, as a bad restore would put it:
        f"INSERT INTO vitals (id, {copy}, _origin) SELECT '{v3[0]}', {copy}, 'central' FROM vitals "
        f"WHERE id = '{v3[1]}'",
    )
    report = verify(a)
    assert report.keys("differs") == {e1, p2, v1[1]}
    assert report.keys("missing_here") == {v2[0], v2[1]}
    assert report.keys("only_here") == {stray, v3[0]}
    assert report.keys("out_of_scope") == set()
    assert report.differences == 7 and report.unrepaired == 7
    central_says = {d.key: d.central for t in report.tables for d in t.differences}
    assert central_says[stray] == "absent" and central_says[v3[0]] == "deleted"
    before = central_state(network)

    fixed = verify(a, repair=True)
    assert fixed.unrepaired == 0
    vit = next(t for t in fixed.tables if t.table == "vitals")
    assert (vit.written, vit.deleted, vit.quarantined) == (3, 1, 1)
    held = a.store.quarantine(status="held").to_pylist()
    assert [(h["table_name"], h["key"]) for h in held] == [("vitals", stray)] and "verify" in held[0]["reason"]
    assert vit.quarantine_ids == [held[0]["id"]]
    assert query(a, f"SELECT reason FROM encounters WHERE id = '{e1}'") == query(
        net, f"SELECT reason FROM encounters WHERE id = '{e1}'")  # fmt: skip
    assert query(a, f"SELECT first_name FROM patients WHERE id = '{p2}'") == [("P1",)]
    assert query(a, f"SELECT count(*) FROM vitals WHERE id IN ('{v2[0]}', '{v2[1]}')") == [(2,)]
    assert query(a, f"SELECT count(*) FROM vitals WHERE id IN ('{stray}', '{v3[0]}')") == [(0,)]

    again = verify(a)
    assert again.clean, [(t.table, t.differences) for t in again.tables if t.differences]
    cycle = a.sync()
    assert cycle.ok and cycle.pushed_rows == 0  # nothing the repair wrote goes back up
    assert central_state(network) == before
    assert verify(a).clean


def test_pending_edits_on_either_side_are_not_reported(network: Net) -> None:
    a, net = network.a, network.net
    (p1, e1, v1), (p2, e2, v2) = care(network, a, patients=2)
    a.sync()
    # Local edits through the application (triggers on): waiting to be pushed.
    sql(a, f"UPDATE encounters SET reason = 'local edit' WHERE id = '{e1}'",
        f"DELETE FROM vitals WHERE id = '{v1[0]}'", vitals_sql(a, p1, e1, str(uuid.uuid4())))  # fmt: skip
    # Central edits not pulled yet: a change, a deletion, a new row.
    sql(net, f"UPDATE encounters SET reason = 'central edit' WHERE id = '{e2}'",
        f"DELETE FROM vitals WHERE id = '{v2[0]}'", vitals_sql(a, p2, e2, str(uuid.uuid4())))  # fmt: skip
    report = verify(a)
    assert report.clean, [(t.table, t.differences) for t in report.tables if t.differences]
    enc = next(t for t in report.tables if t.table == "encounters")
    assert enc.pending_here == 1
    assert verify(a, repair=True).clean  # and a repair touches nothing
    a.sync(), a.sync()
    assert verify(a).clean
    assert query(a, f"SELECT reason FROM encounters WHERE id IN ('{e1}', '{e2}') ORDER BY reason") == [
        ("central edit",), ("local edit",)]  # fmt: skip


def test_a_transferred_patients_rows_are_out_of_scope_not_corruption(network: Net) -> None:
    a, b = network.a, network.b
    (pid, eid, vids), _ = care(network, a, patients=2)
    a.sync()
    sql(a, f"UPDATE patient_facilities SET deleted_at = now() WHERE patient_id = '{pid}'")
    network.share(pid)  # B marks the patient; everyone synced
    report = verify(a)
    assert report.clean and report.differences == 0
    assert report.keys("out_of_scope") == {eid, *vids}
    assert verify(a, repair=True).keys("out_of_scope") == {eid, *vids}
    assert query(a, f"SELECT count(*) FROM vitals WHERE patient_id = '{pid}'") == [(3,)]  # left alone
    assert verify(b).clean


def test_mobile_corrupted_behind_the_engine_is_found_and_repaired(network: Net) -> None:
    a, m, net = network.a, network.mobile, network.net
    (p1, e1, v1), (p2, e2, v2) = care(network, a, patients=2)
    a.sync(), m.sync()
    stray = str(uuid.uuid4())
    sql(  # SQLite's triggers skip writes that set _cursor themselves (docs/sqlite.md)
        m,
        f"UPDATE encounters SET reason = 'tampered', _cursor = _cursor - 1 WHERE id = '{e1}'",
        f"UPDATE vitals SET heart_rate = 1, _cursor = _cursor - 1 WHERE id = '{v1[0]}'",
        f"DELETE FROM vitals WHERE id = '{v2[0]}'",
        f"DELETE FROM _tidesync_tomb_vitals WHERE id = '{v2[0]}'",
        f"INSERT INTO vitals (id, encounter_id, patient_id, recorded_at, heart_rate, _cursor, _hlc, _node, _origin) "
        f"SELECT '{stray}', encounter_id, patient_id, recorded_at, 99, 1, _hlc, _node, 'central' FROM vitals "
        f"WHERE id = '{v2[1]}'",
    )
    report = verify(m)
    assert (report.keys("differs"), report.keys("missing_here"), report.keys("only_here")) == (
        {e1, v1[0]}, {v2[0]}, {stray})
    before = central_state(network)
    fixed = verify(m, repair=True)
    assert fixed.unrepaired == 0
    assert [h["key"] for h in m.store.quarantine(status="held").to_pylist()] == [stray]
    assert verify(m).clean
    assert m.sync().pushed_rows == 0
    assert central_state(network) == before
    assert query(m, f"SELECT heart_rate FROM vitals WHERE id = '{v1[0]}'") == query(
        net, f"SELECT heart_rate FROM vitals WHERE id = '{v1[0]}'")  # fmt: skip
    # A local edit after the repair still syncs as usual.
    sql(m, f"UPDATE vitals SET heart_rate = 75 WHERE id = '{v1[0]}'")
    assert m.sync().pushed_rows == 1
    assert query(net, f"SELECT heart_rate FROM vitals WHERE id = '{v1[0]}'") == [(75,)]


def test_mobile_pending_edits_are_not_reported(network: Net) -> None:
    a, m, net = network.a, network.mobile, network.net
    (p1, e1, v1), (p2, e2, v2) = care(network, a, patients=2)
    a.sync(), m.sync()
    sql(m, f"UPDATE encounters SET reason = 'on the ward' WHERE id = '{e1}'",
        f"DELETE FROM vitals WHERE id = '{v1[0]}'")  # fmt: skip
    sql(net, f"UPDATE encounters SET reason = 'at central' WHERE id = '{e2}'")
    assert verify(m).clean


def _raw(node: LocalNode, path: str, body: Any = None, content: bytes | None = None) -> Any:
    assert node.client is not None
    return node.client.call("POST", path, json=body, content=content)


def test_a_node_never_gets_rows_outside_its_scope(network: Net) -> None:
    a, b = network.a, network.b
    (pid, eid, vids), = care(network, a, patients=1)
    a.sync(), b.sync()
    fp = fingerprint(a.store.registry)
    # A may fetch its own patient's encounter; B (patient not marked there) may not.
    page = _raw(a, "/v1/verify/fetch", {"table": "encounters", "keys": [eid], "fingerprint": fp})
    assert page.status_code == 200 and len(page.content) > 0
    with pytest.raises(ForbiddenError, match="outside node 'fac-b'"):
        _raw(b, "/v1/verify/fetch", {"table": "encounters", "keys": [eid], "fingerprint": fp})
    states = _raw(b, "/v1/verify/keys", {"table": "vitals", "keys": vids, "pull_cursor": 1, "fingerprint": fp})
    assert {s["state"] for s in states.json()["keys"]} == {"out_of_scope"}
    assert all("hash" not in s for s in states.json()["keys"])
    # B's digest answers never carry A's rows, whatever B claims to hold.
    report = verify(b)
    assert report.clean and eid not in report.keys("missing_here")
    # Tombstones and never-seen keys are no secret (a pull sends tombstones to everyone).
    ghost = str(uuid.uuid4())
    states = _raw(b, "/v1/verify/keys", {"table": "vitals", "keys": [ghost], "pull_cursor": 1, "fingerprint": fp})
    assert states.json()["keys"] == [{"key": ghost, "state": "absent"}]


def test_bad_requests_get_clear_errors(network: Net) -> None:
    a = network.a
    fp = fingerprint(a.store.registry)
    with pytest.raises(SchemaMismatchError, match="unknown table 'nope'"):
        _raw(a, "/v1/verify/keys", {"table": "nope", "keys": [], "pull_cursor": 1, "fingerprint": fp})
    with pytest.raises(ForbiddenError, match="push-only"):
        _raw(a, "/v1/verify/fetch", {"table": "audit_log", "keys": [], "fingerprint": fp})
    with pytest.raises(SchemaMismatchError, match="fingerprint"):
        _raw(a, "/v1/verify/keys", {"table": "vitals", "keys": [], "pull_cursor": 1, "fingerprint": "0" * 16})
    with pytest.raises(ProtocolError, match="'keys' must be a list"):
        _raw(a, "/v1/verify/keys", {"table": "vitals", "keys": "abc", "pull_cursor": 1, "fingerprint": fp})
    with pytest.raises(ProtocolError, match="pull_cursor"):
        _raw(a, "/v1/verify/keys", {"table": "vitals", "keys": [], "fingerprint": fp})
    with pytest.raises(SchemaMismatchError, match="not a key of table 'vitals'"):
        _raw(a, "/v1/verify/keys", {"table": "vitals", "keys": ["not-a-uuid"], "pull_cursor": 1, "fingerprint": fp})
    with pytest.raises(ProtocolError, match="request body is not JSON"):
        _raw(a, "/v1/verify/digest", content=b"hello")
    with pytest.raises(ProtocolError, match="request body is not JSON"):
        _raw(a, "/v1/verify/keys", content=b"{")
    good = {"table": "vitals", "pull_cursor": 1, "fingerprint": fp, "exclude": []}
    with pytest.raises(ProtocolError, match="power of two"):
        _raw(a, "/v1/verify/rows", {**good, "buckets": 3, "differing": [0]})
    with pytest.raises(ProtocolError, match="'differing' must be a list of bucket numbers from 0 to 3"):
        _raw(a, "/v1/verify/rows", {**good, "buckets": 4, "differing": [4]})
    with pytest.raises(ProtocolError, match="'exclude' must be a list"):
        _raw(a, "/v1/verify/digest", {**good, "exclude": "x"})
    with pytest.raises(ProtocolError, match="'fresh' must be true or false"):
        _raw(a, "/v1/verify/digest", {**good, "fresh": "yes"})
    with pytest.raises(ProtocolError, match="'read' must be the id"):
        _raw(a, "/v1/verify/rows", {**good, "buckets": 4, "differing": [1], "read": 7})
    answer, meta = verify_mod.decode_message(_raw(a, "/v1/verify/digest", {**good, "buckets": 8}).content, "digest")
    assert answer.num_rows == 8 and meta["buckets"] == 8 and meta["rows"] == 0
    with pytest.raises(ProtocolError, match="no JSON parameters"):
        verify_mod.decode_message(_raw(a, "/v1/verify/fetch", {"table": "vitals", "keys": [], "fingerprint": fp})
                                  .content, "a page")  # fmt: skip
    nobody = CentralClient(network.net.url, "fac-a.wrong")
    with pytest.raises(AuthError):
        nobody.call("POST", "/v1/verify/keys", json={"table": "vitals"})
    nobody.close()


def test_sync_first_when_too_much_is_pending(network: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    a, net = network.a, network.net
    care(network, a, patients=2)
    a.sync()
    monkeypatch.setattr(messages, "MAX_PENDING", 2)
    sql(a, *[f"UPDATE vitals SET heart_rate = heart_rate + 1 WHERE id = '{r[0]}'"
             for r in query(a, "SELECT id FROM vitals LIMIT 3")])  # fmt: skip
    with pytest.raises(SyncError, match="wait to be pushed from this node .* run `tidesync sync` first"):
        verify(a)
    a.sync()
    assert verify(a).clean
    sql(net, "UPDATE vitals SET heart_rate = heart_rate + 1")
    # (central's own limit is its module constant: the server runs in this process)
    with pytest.raises(SessionError, match="run `tidesync sync` on the node first"):
        verify(a)


def test_cli_verify_and_repair(network: Net) -> None:
    from tidesync.cli import main

    a = network.a
    (pid, eid, vids), = care(network, a, patients=1)
    a.sync()
    behind_the_back_pg(a, f"UPDATE vitals SET heart_rate = 1 WHERE id = '{vids[0]}'")
    runner = CliRunner()
    found = runner.invoke(main, ["verify", "--db", a.db, "--json"])
    assert found.exit_code == 1, found.output
    data = json.loads(found.stdout)
    assert data["differences"] == 1 and data["bytes_up"] > 0
    assert [d["key"] for t in data["tables"] for d in t["differences"]] == [vids[0]]
    fixed = runner.invoke(main, ["verify", "--db", a.db, "--repair"])
    assert fixed.exit_code == 0, fixed.output
    assert "repaired" in fixed.output
    clean = runner.invoke(main, ["verify", "--db", a.db, "--central", network.net.url, "--fresh"])
    assert clean.exit_code == 0 and "no differences" in clean.output, clean.output
    nowhere = runner.invoke(main, ["verify", "--db", a.db, "--central", "http://127.0.0.1:9"])
    assert nowhere.exit_code == 1 and "cannot reach the central server at http://127.0.0.1:9" in nowhere.output


# ----------------------------------------------------------------------------- central's kept reads


def _vitals(report: VerifyReport) -> Any:
    return next(t for t in report.tables if t.table == "vitals")


def test_central_reuses_its_read_only_while_nothing_it_depends_on_changed(network: Net) -> None:
    """A verify right after another one is answered from central's kept read; any write
    at central to the table or to what its scope depends on, through the engine or
    behind its back (stamps and `_cursor` untouched), makes central read afresh, so
    nothing a fresh read would find is missed."""
    a, net = network.a, network.net
    (p1, e1, v1), (p2, e2, v2) = care(network, a, patients=2)
    a.sync()
    first = verify(a)
    assert first.clean and not _vitals(first).central_reused
    again = verify(a)
    assert again.clean and _vitals(again).central_reused
    assert {t.table for t in again.tables if t.central_reused} >= {"patients", "encounters", "vitals"}
    assert a.client is not None
    fresh = verify_node(a.store, a.client, fresh=True)  # `verify --fresh`: central reads again
    assert fresh.clean and not any(t.central_reused for t in fresh.tables)

    # Central's copy changed behind the engine's back: the node's copy now differs.
    sql(net, "SET LOCAL session_replication_role = replica",
        f"UPDATE vitals SET heart_rate = heart_rate + 5 WHERE id = '{v1[0]}'")  # fmt: skip
    changed = verify(a)
    assert not _vitals(changed).central_reused and changed.keys("differs") == {v1[0]}
    assert _vitals(verify(a)).central_reused  # nothing changed since that read
    # A row deleted at central behind the engine's back (no tombstone, one row fewer).
    sql(net, "SET LOCAL session_replication_role = replica", f"DELETE FROM vitals WHERE id = '{v1[1]}'")
    gone = verify(a)
    assert not _vitals(gone).central_reused
    assert gone.keys("only_here") == {v1[1]} and gone.keys("differs") == {v1[0]}

    # The marks decide the scope of patient-scoped tables: a change there counts too.
    assert _vitals(verify(a)).central_reused
    sql(net, "SET LOCAL session_replication_role = replica",
        f"UPDATE patient_facilities SET facility_id = facility_id WHERE patient_id = '{p2}'")  # fmt: skip
    marks = verify(a)
    assert not _vitals(marks).central_reused and marks.keys("differs") == {v1[0]}

    # A write through the engine (pending for the node): found at once by `_cursor`.
    sql(net, f"UPDATE vitals SET heart_rate = 88 WHERE id = '{v2[0]}'")
    pending = verify(a)
    assert not _vitals(pending).central_reused and pending.keys("differs") == {v1[0]}

    # After a sync (a new pull cursor) central reads afresh; repair leaves a clean copy.
    a.sync()
    assert not _vitals(verify(a)).central_reused
    assert verify(a, repair=True).unrepaired == 0
    after = verify(a)
    assert after.clean and _vitals(after).central_reused


def test_a_drill_down_after_a_central_write_still_classifies_right(
    network: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Central answers the drill-down from the read its digest came from; rows written
    at central in between are then found pending (left for the next pull) by the per-key
    check, and the real difference is still found exactly."""
    a, net = network.a, network.net
    (p1, e1, v1), (p2, e2, v2) = care(network, a, patients=2)
    a.sync()
    behind_the_back_pg(a, *[f"UPDATE vitals SET heart_rate = heart_rate + 1 WHERE id = '{v}'"
                            for v in (v1[0], v1[1], v2[0])])  # fmt: skip
    served = verify_mod.serve_rows
    answers: list[dict[str, Any]] = []

    def write_then_serve(store: Any, node: Any, body: Any) -> bytes:
        if body["table"] == "vitals" and not answers:
            sql(net, f"UPDATE vitals SET heart_rate = 99 WHERE id = '{v1[1]}'",  # changed at central meanwhile
                f"DELETE FROM vitals WHERE id = '{v2[0]}'",  # deleted at central meanwhile
                f"UPDATE vitals SET heart_rate = 98 WHERE id = '{v2[1]}'")  # not corrupted here  # fmt: skip
        data = served(store, node, body)
        answers.append(verify_mod.decode_message(data, "rows")[1])
        return data

    monkeypatch.setattr(verify_mod, "serve_rows", write_then_serve)
    report = verify(a)
    assert answers and answers[0]["reread"] is False  # from the digest's own read
    assert report.keys("differs") == {v1[0]} and report.differences == 1
    assert _vitals(report).pending_central == 2  # v1[1] and v2[0]: the next pull brings them
    monkeypatch.undo()
    a.sync()
    final = verify(a, repair=True)
    assert final.keys("differs") == {v1[0]} and final.unrepaired == 0
    assert verify(a).clean


def test_without_a_kept_read_central_reads_the_scope_again(network: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    """No memory for kept reads (or the drill-down reaching another server process):
    the same answers, central reads the keys of the scope again to drill down."""
    monkeypatch.setenv(scope_cache.BUDGET_ENV, "0")
    a = network.a
    (p1, e1, v1), = care(network, a, patients=1)
    a.sync()
    behind_the_back_pg(a, f"UPDATE vitals SET heart_rate = 1 WHERE id = '{v1[0]}'")
    served = verify_mod.serve_rows
    answers: list[dict[str, Any]] = []

    def spy(store: Any, node: Any, body: Any) -> bytes:
        data = served(store, node, body)
        answers.append(verify_mod.decode_message(data, "rows")[1])
        return data

    monkeypatch.setattr(verify_mod, "serve_rows", spy)
    first, second = verify(a), verify(a)
    assert first.keys("differs") == second.keys("differs") == {v1[0]}
    assert not any(t.central_reused for t in second.tables)
    assert answers and all(ans["reread"] for ans in answers)


def test_large_tables_are_read_over_several_connections(network: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sides split a large table's blocks between connections sharing one snapshot
    (forced here on small tables): the same differences, found exactly."""
    from tidesync.sync.verify import central_side, pg_scan

    monkeypatch.setattr(pg_scan, "SPLIT_BLOCKS", 0)
    monkeypatch.setattr(central_side, "READERS", 3)
    monkeypatch.setenv(scope_cache.BUDGET_ENV, "0")  # central reads every time
    opened: list[int] = []
    helpers = pg_scan.SharedSnapshot.helpers

    def counting(self: pg_scan.SharedSnapshot, n: int) -> list[Any]:
        opened.append(n)
        return helpers(self, n)

    monkeypatch.setattr(pg_scan.SharedSnapshot, "helpers", counting)
    a = network.a
    people = care(network, a, patients=3)
    a.sync()
    (p1, e1, v1), (p2, e2, v2), _ = people
    behind_the_back_pg(a, f"UPDATE vitals SET heart_rate = heart_rate + 1 WHERE id = '{v1[0]}'",
                       f"UPDATE encounters SET reason = 'x' WHERE id = '{e2}'", f"DELETE FROM vitals WHERE id = '{v2[2]}'")
    report = verify(a)
    assert report.keys("differs") == {v1[0], e2} and report.keys("missing_here") == {v2[2]}
    assert _vitals(report).rows_central == 9 and _vitals(report).rows_here == 8
    assert 1 in opened and 2 in opened  # the node's second reader, central's two more
    assert pg_scan.block_ranges(10, 3) == ["t.ctid < '(4,0)'::tid", "t.ctid >= '(4,0)'::tid AND t.ctid < '(8,0)'::tid",
                                           "t.ctid >= '(8,0)'::tid"]  # fmt: skip


def test_kept_reads_stay_within_their_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    import pyarrow as pa

    def entry(rows: int) -> scope_cache.ScopeRead:
        return scope_cache.ScopeRead(keys=pa.array(np.arange(rows, dtype=np.int64)),
                                     buckets=np.zeros(rows, np.uint32), hashes=np.zeros(rows, np.uint64),
                                     xmin=3, counts={})  # fmt: skip

    cache = scope_cache.ScopeCache()
    monkeypatch.setenv(scope_cache.BUDGET_ENV, str(100 * 20 * 2.5 / 2**20))  # room for 250 rows of 20 bytes
    key = ("db", "node", "facility", "vitals", 7)
    assert cache.put(key, entry(100)) and cache.put(key[:4] + (8,), entry(100))
    assert cache.get(key) is not None  # now the most recently used
    assert cache.put(key[:4] + (9,), entry(100))  # the least recently used one goes
    assert cache.get(key[:4] + (8,)) is None and cache.get(key) is not None and len(cache) == 2
    assert not cache.put(("db", "node", "facility", "patients", 7), entry(300))  # larger than the budget
    monkeypatch.setattr(scope_cache, "IDLE_SECONDS", -1)
    assert cache.get(key) is None and len(cache) == 0
    # However current it can be proved, a read is not reused past its maximum age
    # (damage below PostgreSQL leaves no xmin to see): no query is even made.
    old = entry(1)
    old.counts = {"vitals": 1}
    old.made -= scope_cache.MAX_AGE_SECONDS + 1
    assert not scope_cache.unchanged_since(None, old, ["vitals"])
