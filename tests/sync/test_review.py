"""`tidesync conflicts list|show` on real conflicts from the network (PostgreSQL and SQLite)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from tests.sync.conftest import Net, query, sql
from tidesync.cli import main
from tidesync.review import list_conflicts, show_conflict, stamp_text, why_won


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_a_field_conflict_shows_both_versions_and_why_the_winner_won(network: Net) -> None:
    a, b = network.a, network.b
    pid = network.new_patient(a)
    network.share(pid)
    sql(a, f"UPDATE patients SET last_name = 'Fifita', sex = 'male' WHERE id = '{pid}'")
    sql(b, f"UPDATE patients SET last_name = 'Tonga' WHERE id = '{pid}'")  # later stamp: its last_name wins
    a.sync(), b.sync(), a.sync()
    central = network.net.central
    (item,) = [c for c in list_conflicts(central, "patients") if c["key"] == pid]
    assert item["lost_columns"] == ["last_name"]
    assert (item["winner"]["node"], item["loser"]["node"]) == ("fac-b", "fac-a")
    shown = show_conflict(central, item["id"])
    fields = {f["column"]: f for f in shown["fields"]}
    assert fields["last_name"] == {"column": "last_name", "loser": "Fifita", "now": "Tonga", "lost": True}
    assert fields["sex"]["now"] == "male" and not fields["sex"]["lost"]  # A's other edit merged in
    assert shown["row_now"] == "present" and shown["why"].startswith("later stamp")
    # The command line says the same, as a table and as JSON.
    out = _cli("conflicts", "show", "--db", central.dsn, str(item["id"]))
    assert "Fifita" in out and "Tonga" in out and "later stamp" in out
    listed = json.loads(_cli("conflicts", "list", "--db", central.dsn, "--table", "patients", "--json"))
    assert [c["id"] for c in listed] == [c["id"] for c in list_conflicts(central, "patients")]


def test_conflicts_on_a_mobile_device(network: Net) -> None:
    a, m = network.a, network.mobile
    pid = network.new_patient(a)
    a.sync(), m.sync()
    eid = str(query(a, f"SELECT id FROM encounters WHERE patient_id = '{pid}'")[0][0])
    sql(m, f"UPDATE encounters SET reason = 'fever' WHERE id = '{eid}'")
    sql(a, f"UPDATE encounters SET reason = 'cough' WHERE id = '{eid}'")  # later: wins
    a.sync(), m.sync()
    items = list_conflicts(m.store, "encounters")
    assert len(items) == 1 and items[0]["loser"]["node"] == m.store.node_id()
    shown = show_conflict(m.store, items[0]["id"])
    reason = next(f for f in shown["fields"] if f["column"] == "reason")
    assert (reason["loser"], reason["now"]) == ("fever", "cough")
    assert "conflicts (1 newest)" in _cli("conflicts", "list", "--db", str(m.store.path))
    listed = json.loads(_cli("conflicts", "list", "--db", str(m.store.path), "--json"))
    assert [(c["table"], c["key"], c["lost_columns"]) for c in listed] == [("encounters", eid, ["reason"])]


def test_unknown_conflict_is_a_one_line_error(network: Net) -> None:
    result = CliRunner().invoke(main, ["conflicts", "show", "--db", network.net.central.dsn, "999999"])
    assert result.exit_code != 0 and "no conflict with id 999999" in result.output


def test_stamps_read_as_time_and_counter() -> None:
    hlc = (1_763_720_000_123 << 16) | 2
    assert stamp_text(hlc) == "2025-11-21T10:13:20.123Z #2"
    assert why_won(hlc, "b", hlc, "a") == "same stamp 2025-11-21T10:13:20.123Z #2: node 'b' sorts after 'a'"
