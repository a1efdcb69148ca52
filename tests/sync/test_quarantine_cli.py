"""`tidesync quarantine list|show|retry|discard` on rows the network really refused: a
push the central server rejects, a pull a mobile device rejects."""

from __future__ import annotations

import json
import uuid

from click.testing import CliRunner, Result

from tests.sync.conftest import Net, ids, query, sql
from tidesync.cli import main


def _cli(*args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def test_central_refuses_a_push_the_operator_retries_once_fixed(network: Net) -> None:
    a, central = network.a, network.net.central
    db = central.dsn
    pid = network.new_patient(a)
    a.sync(), network.mobile.sync()
    # The central application tightens a rule that facility A does not have yet.
    sql(network.net, "ALTER TABLE encounters ADD CONSTRAINT no_triage CHECK (encounter_type <> 'triage')")
    eid = str(uuid.uuid4())
    sql(a, network.encounter_sql(a, pid, eid).replace("'clinic'", "'triage'"))
    a.sync()
    assert eid not in ids(network.net, "encounters")
    (item,) = json.loads(_cli("quarantine", "list", "--db", db, "--json").output)
    assert (item["table"], item["key"], item["peer"], item["status"], item["attempts"]) == (
        "encounters", eid, "fac-a", "held", 1)  # fmt: skip
    assert "no_triage" in item["reason"] and item["stamp"]["node"] == "fac-a" and item["retryable"]
    assert "quarantine: 1 newest held entries" in _cli("quarantine", "list", "--db", db).output
    shown = _cli("quarantine", "show", "--db", db, str(item["id"])).output
    assert "no_triage" in shown and "triage" in shown and "quarantined (from fac-a)" in shown
    assert "the row here now: absent" in shown
    # Still refused: exit status 1, one entry, attempt 2.
    still = _cli("quarantine", "retry", "--db", db, str(item["id"]), code=1)
    assert "still held (attempt 2)" in still.output and "1 of 1 entries still held" in still.output
    assert len(json.loads(_cli("quarantine", "list", "--db", db, "--status", "all", "--json").output)) == 1
    # The rule is relaxed; retry everything held.
    sql(network.net, "ALTER TABLE encounters DROP CONSTRAINT no_triage")
    done = _cli("quarantine", "retry", "--db", db, "--all")
    assert f"{item['id']} encounters {eid}: applied" in done.output
    assert eid in ids(network.net, "encounters")
    assert _cli("quarantine", "list", "--db", db, "--json").output.strip() == "[]"
    (retried,) = json.loads(_cli("quarantine", "list", "--db", db, "--status", "retried", "--json").output)
    assert (retried["attempts"], retried["note"]) == (3, "applied")
    # The retried row travels on like any pushed version: to the mobile of facility A.
    network.mobile.sync()
    assert eid in ids(network.mobile, "encounters")
    again = _cli("quarantine", "retry", "--db", db, str(item["id"]), code=1)
    assert "already retried" in again.output
    assert "nothing held" in _cli("quarantine", "retry", "--db", db, "--all").output
    assert "quarantined rows held: 0 (1 retried or discarded)" in _cli("schema", "status", "--db", db).output


def test_a_mobile_discards_with_a_note_and_the_decision_stays(network: Net) -> None:
    a, m = network.a, network.mobile
    db = str(m.store.path)
    pid = network.new_patient(a)
    a.sync(), m.sync()
    sql(m, "CREATE TRIGGER notes_full BEFORE INSERT ON notes BEGIN SELECT RAISE(ABORT, 'the notes are full'); END")
    nid = str(uuid.uuid4())
    sql(a, f"INSERT INTO notes (id, patient_id, note_type, content, recorded_at) "
           f"VALUES ('{nid}', '{pid}', 'general', 'seen twice', now())")  # fmt: skip
    a.sync(), m.sync()
    (item,) = json.loads(_cli("quarantine", "list", "--db", db, "--json").output)
    assert (item["table"], item["key"], item["peer"]) == ("notes", nid, "central")
    assert "the notes are full" in item["reason"]
    shown = json.loads(_cli("quarantine", "show", "--db", db, str(item["id"]), "--json").output)
    assert shown["row"]["content"] == "seen twice" and shown["version"]["node"] == "fac-a"
    usage = CliRunner().invoke(main, ["quarantine", "discard", "--db", db, str(item["id"])])
    assert usage.exit_code == 2 and "--note" in usage.output
    note = "duplicate of P-123, confirmed with ward"
    out = _cli("quarantine", "discard", "--db", db, str(item["id"]), "--note", note)
    assert "discarded 1 entry" in out.output
    assert _cli("quarantine", "list", "--db", db, "--json").output.strip() == "[]"
    (gone,) = json.loads(_cli("quarantine", "list", "--db", db, "--status", "discarded", "--json").output)
    assert (gone["note"], gone["status"]) == (note, "discarded")
    refused = _cli("quarantine", "retry", "--db", db, str(item["id"]), code=1)
    assert f"quarantine entry {item['id']} was discarded" in refused.output and "never retried" in refused.output
    missing = _cli("quarantine", "show", "--db", db, "999", code=1)
    assert "no quarantine entry with id 999" in missing.output
    assert query(m, "SELECT count(*) FROM notes") == [(0,)]
