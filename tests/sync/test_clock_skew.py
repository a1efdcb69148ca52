"""Clock skew: a node whose database clock runs ahead or behind beyond the drift
tolerance is measured at every session open, named in `tidesync status` (central and
node) and in the session record; its stamps stay bounded (ahead: clamped) or lose as
HLC order says (behind). Real network over loopback; the skew is a shadowed
``clock_timestamp()`` in the facility's PostgreSQL (tests/sync/clocks.py)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
from click.testing import CliRunner

from tests.sync.clocks import skew_clock, unskew_clock
from tests.sync.conftest import Net, ids, query, sql
from tidesync.cli import main
from tidesync.core import DEFAULT_MAX_DRIFT_MS, hlc_unpack, now_ms
from tidesync.errors import ProtocolError
from tidesync.schemas.demo import REGISTRY
from tidesync.sync.client import CentralClient, Retry
from tidesync.sync.local import LocalNetwork, LocalNode
from tidesync.sync.protocol import PROTOCOL_VERSION, fingerprint
from tidesync.sync.serve import BackgroundServer
from tidesync.sync.status import node_status

DAY_MS = 24 * 3600 * 1000
#: How close a measured skew must be to the injected one: the loopback round trip and
#: the test's own statements, with room for a slow shared machine.
SLACK_MS = 60_000


def _status_text(db: str) -> str:
    """`tidesync status` as an operator reads it, whitespace folded (rich wraps lines)."""
    result = CliRunner().invoke(main, ["status", "--db", db], env={"COLUMNS": "200"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def _status_json(db: str) -> Any:
    result = CliRunner().invoke(main, ["status", "--db", db, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _central_nodes(network: Net) -> dict[str, dict[str, Any]]:
    return {n["node"]: n for n in node_status(network.net.central_dsn, REGISTRY)["nodes"]}


def _stamp_ms(node: LocalNode | LocalNetwork, table: str, key: str) -> int:
    """The wall-clock part of a row's stamp at ``node``."""
    return hlc_unpack(int(query(node, f"SELECT _hlc FROM {table} WHERE id = '{key}'")[0][0]))[0]


def test_a_clock_days_ahead_is_named_everywhere_and_its_stamps_are_clamped(
    network: Net, caplog: pytest.LogCaptureFixture
) -> None:
    b = network.b
    skew_clock(b, 3 * DAY_MS)
    # The shadow really is the clock B stamps with: its store reads it, its triggers use it.
    assert abs(b.store.clock_ms() - (now_ms() + 3 * DAY_MS)) < SLACK_MS
    pid = network.new_patient(b, "Ahead")
    assert abs(_stamp_ms(b, "patients", pid) - (now_ms() + 3 * DAY_MS)) < SLACK_MS

    with caplog.at_level(logging.WARNING, logger="tidesync"):
        report = b.sync()
    assert report.ok and report.clamped >= 3  # the patient, its mark, its encounter
    assert report.clock_skew_ms is not None and abs(report.clock_skew_ms - 3 * DAY_MS) < SLACK_MS
    expected = "fac-b runs 3d ahead of central (tolerance 5 min): its stamps are clamped; fix the node's clock (NTP)"
    assert report.clock_warning == expected
    # Both sides said so in their logs: central when it opened the session, the node on hearing it.
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.endswith(expected) and m.startswith("session ") for m in said)
    assert f"clock skew: {expected}" in said

    # The session record carries the measure and the warning.
    (skew, warning, clamped), = query(network.net, "SELECT clock_skew_ms, clock_warning, clamped FROM tidesync.sessions "
                                                   f"WHERE id = '{report.session}'")  # fmt: skip
    assert skew == report.clock_skew_ms and warning == expected and clamped == report.clamped
    # Its stamps are bounded: central holds them at most the tolerance ahead of real time.
    assert _stamp_ms(network.net, "patients", pid) <= now_ms() + DEFAULT_MAX_DRIFT_MS

    # Central's status names fac-b, and only fac-b (the others were measured in the fixture's sync).
    nodes = _central_nodes(network)
    assert nodes["fac-b"]["clock_warning"] == expected and nodes["fac-b"]["clock_skew_ms"] == skew
    for other in ("fac-a", "mob-a"):
        assert nodes[other]["clock_warning"] is None
        assert abs(nodes[other]["clock_skew_ms"]) < SLACK_MS
    text = _status_text(network.net.central_dsn)
    assert f"clock off: {expected}" in text and "+3d ahead" in text
    assert text.count("clock off:") == 1
    as_json = {n["node"]: n for n in _status_json(network.net.central_dsn)["nodes"]}
    assert as_json["fac-b"]["clock_skew_ms"] == skew

    # The node's own status says it too, from its last cycle.
    last = node_status(b.db, REGISTRY)["last_cycle"]
    assert (last["clock_skew_ms"], last["clock_warning"]) == (skew, expected)
    assert f"clock off: {expected}" in _status_text(b.db)
    assert _status_json(b.db)["last_cycle"]["clock_skew_ms"] == skew

    # Clock fixed: the next session measures it ok again, and status stops naming fac-b.
    unskew_clock(b)
    assert b.sync().clock_warning is None
    assert _central_nodes(network)["fac-b"]["clock_warning"] is None
    assert "clock off" not in _status_text(network.net.central_dsn)


def test_a_clock_days_behind_is_named_and_its_edits_sync_but_lose_by_stamp(network: Net) -> None:
    a, b = network.a, network.b
    skew_clock(b, -3 * DAY_MS)
    pid = network.new_patient(b, "Behind")
    assert abs(_stamp_ms(b, "patients", pid) - (now_ms() - 3 * DAY_MS)) < SLACK_MS
    report = b.sync()
    assert report.ok and report.clamped == 0  # old stamps are not clamped: they are merely old
    assert report.clock_skew_ms is not None and abs(report.clock_skew_ms + 3 * DAY_MS) < SLACK_MS
    expected = "fac-b runs 3d behind central (tolerance 5 min)"
    assert report.clock_warning is not None and report.clock_warning.startswith(expected)

    # Its edits still sync ...
    a.sync()
    assert pid in ids(a, "patients")
    # ... but an edit B makes after A's, in real time, carries the older stamp and loses.
    sql(a, f"UPDATE patients SET first_name = 'FromA' WHERE id = '{pid}'")
    time.sleep(0.05)
    sql(b, f"UPDATE patients SET first_name = 'FromB' WHERE id = '{pid}'")
    a.sync(), b.sync(), a.sync()
    for node in (a, b, network.net):
        assert query(node, f"SELECT first_name FROM patients WHERE id = '{pid}'") == [("FromA",)]
    lost = network.net.central.conflicts("patients").to_pylist()
    assert [(c["key"], c["loser_node"], c["lost_columns"]) for c in lost] == [(pid, "fac-b", ["first_name"])]

    nodes = _central_nodes(network)
    assert str(nodes["fac-b"]["clock_warning"]).startswith(expected)
    text = _status_text(network.net.central_dsn)
    assert f"clock off: {expected}" in text and "-3d behind" in text
    assert "lose to concurrent edits made elsewhere" in _status_text(b.db)


def test_a_clock_within_tolerance_is_ok(network: Net, caplog: pytest.LogCaptureFixture) -> None:
    a = network.a
    skew_clock(a, 2 * 60_000)  # two minutes: inside the five minutes' tolerance
    with caplog.at_level(logging.WARNING, logger="tidesync"):
        report = a.sync()
    assert report.clock_skew_ms is not None and abs(report.clock_skew_ms - 2 * 60_000) < SLACK_MS
    assert report.clock_warning is None and report.clamped == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert _central_nodes(network)["fac-a"]["clock_warning"] is None
    text = _status_text(network.net.central_dsn)
    assert "clock off" not in text and "ok" in text
    assert "clock against central: ok" in _status_text(a.db)
    # The SQLite mobile was measured too (julianday('now')), and is fine.
    assert abs(network.mobile.store.clock_ms() - now_ms()) < SLACK_MS


def test_a_node_that_sends_no_clock_is_not_measured_and_not_refused(network: Net) -> None:
    hello = {"protocol": PROTOCOL_VERSION, "registry": REGISTRY.name, "fingerprint": fingerprint(REGISTRY),
             "pull_cursor": 0}  # fmt: skip
    with CentralClient(network.net.url, network.a.token, retry=Retry(attempts=1)) as client:
        opened = client.call("POST", "/v1/sessions", json=hello).json()
        assert (opened["clock_skew_ms"], opened["clock_warning"]) == (None, None)
        with pytest.raises(ProtocolError, match="node_clock_ms must be the node's clock in Unix milliseconds"):
            client.call("POST", "/v1/sessions", json={**hello, "node_clock_ms": "soon"})
    row = query(network.net, f"SELECT clock_skew_ms, clock_warning FROM tidesync.sessions WHERE id = '{opened['session']}'")
    assert row == [(None, None)]
    # Status keeps the last measured clock rather than forgetting it.
    assert _central_nodes(network)["fac-a"]["clock_skew_ms"] is not None


def test_an_older_central_gets_the_clock_columns_on_start(network: Net) -> None:
    drop = "ALTER TABLE tidesync.sessions DROP COLUMN clock_skew_ms, DROP COLUMN clock_warning"
    columns = ("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'tidesync' "
               "AND table_name = 'sessions' AND column_name LIKE 'clock%'")  # fmt: skip
    sql(network.net, drop)
    with BackgroundServer(network.net.central_dsn, REGISTRY):
        assert query(network.net, columns) == [(2,)]
    # `central init` again does the same, for an owner upgrading by hand.
    from tidesync.sync import central

    sql(network.net, drop)
    central.init(network.net.central)
    assert query(network.net, columns) == [(2,)]
    assert network.a.sync().clock_skew_ms is not None
