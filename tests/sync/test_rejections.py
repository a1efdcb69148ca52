"""Bad input at the central server: a clear error, and nothing applied."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pytest

from tidesync.errors import AuthError, ProtocolError, SchemaMismatchError
from tidesync.registry import DELETED
from tidesync.schemas.demo import REGISTRY
from tidesync.sync.client import CentralClient, Retry
from tidesync.sync.protocol import (
    PROTOCOL_VERSION,
    ForbiddenError,
    PayloadTooLargeError,
    SessionError,
    encode_page,
    fingerprint,
)
from tests.sync.conftest import FACILITY_A, FACILITY_B, Net, query

FAST = Retry(attempts=2, base_s=0.01, cap_s=0.01)


def _client(network: Net, token: str | None = None) -> CentralClient:
    return CentralClient(network.net.url, token or network.a.token, retry=FAST)


def _open(client: CentralClient) -> str:
    hello = {"protocol": PROTOCOL_VERSION, "registry": "demo", "fingerprint": fingerprint(REGISTRY), "pull_cursor": 0}
    return str(client.call("POST", "/v1/sessions", json=hello).json()["session"])


def _rows(table: str, **values: object) -> pa.Table:
    """One change row of ``table`` in its wire schema (unset columns null)."""
    spec = REGISTRY[table]
    row: dict[str, object] = {c.name: None for c in spec.columns}
    row.update(values)
    row.update({"_hlc": 1 << 40, "_node": "fac-a", "_base_hlc": None, DELETED: False})
    if spec.field_wise:
        row.update({f"_hlc_{c.name}": 1 << 40 for c in spec.data_columns})
    cols = {f.name: pa.array([row.get(f.name)], f.type) for f in spec.wire_schema()}
    return pa.table(cols, schema=spec.wire_schema())


def _uuid(text: str) -> bytes:
    return uuid.UUID(text).bytes


def _central_count(network: Net, table: str) -> int:
    return int(query(network.net, f"SELECT count(*) FROM {table}")[0][0])


def test_bad_token_is_refused(network: Net) -> None:
    for token in ("fac-a.wrong", "nobody.secret", "garbage"):
        with _client(network, token) as client, pytest.raises(AuthError, match="token"):
            _open(client)


def test_protocol_and_schema_mismatch_name_both_versions(network: Net) -> None:
    with _client(network) as client:
        with pytest.raises(SchemaMismatchError, match=rf"node speaks 99, central speaks {PROTOCOL_VERSION}"):
            client.call("POST", "/v1/sessions", json={"protocol": 99, "fingerprint": fingerprint(REGISTRY)})
        with pytest.raises(SchemaMismatchError, match="fingerprint abc.*central has 'demo' fingerprint"):
            client.call("POST", "/v1/sessions", json={"protocol": PROTOCOL_VERSION, "registry": "x",
                                                      "fingerprint": "abc"})  # fmt: skip


def test_push_to_pull_only_table_is_refused(network: Net) -> None:
    page = encode_page("facilities", _rows("facilities", id=_uuid(str(uuid.uuid4())), code="X", name="Evil",
                                           is_sensitive=False))  # fmt: skip
    with _client(network) as client:
        sid = _open(client)
        with pytest.raises(ForbiddenError, match="pull-only"):
            client.call("PUT", f"/v1/sessions/{sid}/push/0", content=page)
    assert _central_count(network, "facilities") == 2


def test_row_outside_scope_is_refused(network: Net) -> None:
    # A facility-scoped row of another facility, on arrival.
    page = encode_page("audit_log", _rows("audit_log", id=_uuid(str(uuid.uuid4())), facility_id=_uuid(FACILITY_B),
                                          action="x", at=pa.scalar(0, pa.timestamp("us", "UTC")).as_py()))  # fmt: skip
    with _client(network) as client:
        sid = _open(client)
        with pytest.raises(ForbiddenError, match="other facilities"):
            client.call("PUT", f"/v1/sessions/{sid}/push/0", content=page)
    # A patient-scoped row of a patient not marked for the pusher, at completion.
    pid = network.new_patient(network.b)
    network.b.sync()
    enc = _rows("encounters", id=_uuid(str(uuid.uuid4())), patient_id=_uuid(pid), facility_id=_uuid(FACILITY_A),
                encounter_type="clinic", start_at=pa.scalar(0, pa.timestamp("us", "UTC")).as_py())  # fmt: skip
    before = _central_count(network, "encounters")
    with _client(network) as client:
        sid = _open(client)
        client.call("PUT", f"/v1/sessions/{sid}/push/0", content=encode_page("encounters", enc))
        with pytest.raises(ForbiddenError, match="not marked"):
            client.call("POST", f"/v1/sessions/{sid}/push/complete", json={"pages": 1})
    assert _central_count(network, "encounters") == before


def test_malformed_page_is_refused(network: Net) -> None:
    good = encode_page("patients", _rows("patients", id=_uuid(str(uuid.uuid4())), display_id="P"))
    with _client(network) as client:
        sid = _open(client)
        with pytest.raises(ProtocolError, match="not a readable Arrow IPC stream"):
            client.call("PUT", f"/v1/sessions/{sid}/push/0", content=b"\x00garbage" * 10)
        with pytest.raises(ProtocolError, match="not a readable"):
            client.call("PUT", f"/v1/sessions/{sid}/push/0", content=good[: len(good) // 2])
        wrong = pa.table({"id": ["x"]}).replace_schema_metadata({b"tidesync.table": b"patients"})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, wrong.schema) as w:
            w.write_table(wrong)
        with pytest.raises(SchemaMismatchError, match="missing columns"):
            client.call("PUT", f"/v1/sessions/{sid}/push/0", content=sink.getvalue().to_pybytes())
        unknown = encode_page("patients", _rows("patients", id=_uuid(str(uuid.uuid4())), display_id="P"))
        unknown = unknown.replace(b"tidesync.table", b"tidesync.tablX")
        with pytest.raises(ProtocolError, match="no table name"):
            client.call("PUT", f"/v1/sessions/{sid}/push/0", content=unknown)
        # Nothing was stored: completing with one page finds it missing.
        with pytest.raises(SessionError, match="missing \\[0\\]"):
            client.call("POST", f"/v1/sessions/{sid}/push/complete", json={"pages": 1})
    assert _central_count(network, "patients") == 0


def test_oversized_page_is_refused(network: Net) -> None:
    limit = network.net.server.app.state.settings.max_page_bytes if network.net.server else 0  # type: ignore[union-attr]
    assert limit > 0
    with _client(network) as client:
        sid = _open(client)
        with pytest.raises(PayloadTooLargeError, match="above the limit"):
            client.call("PUT", f"/v1/sessions/{sid}/push/0", content=b"x" * (limit + 1))


def test_repeated_page_changes_nothing_and_conflicting_repeat_is_refused(network: Net) -> None:
    pid = str(uuid.uuid4())
    page = encode_page("patients", _rows("patients", id=_uuid(pid), display_id="P1"))
    other = encode_page("patients", _rows("patients", id=_uuid(pid), display_id="P2"))
    with _client(network) as client:
        sid = _open(client)
        first = client.call("PUT", f"/v1/sessions/{sid}/push/0", content=page).json()
        again = client.call("PUT", f"/v1/sessions/{sid}/push/0", content=page).json()
        assert (first["repeat"], again["repeat"]) == (False, True)
        with pytest.raises(SessionError, match="different content"):
            client.call("PUT", f"/v1/sessions/{sid}/push/0", content=other)
        done = client.call("POST", f"/v1/sessions/{sid}/push/complete", json={"pages": 1}).json()
        assert client.call("POST", f"/v1/sessions/{sid}/push/complete", json={"pages": 1}).json() == done
    assert query(network.net, "SELECT display_id FROM patients") == [("P1",)]


def test_other_nodes_session_is_not_yours(network: Net) -> None:
    with _client(network) as a, _client(network, network.b.token) as b:
        sid = _open(a)
        with pytest.raises(SessionError, match="no session"):
            b.call("POST", f"/v1/sessions/{sid}/pull", json={})


def test_plain_http_refused_off_loopback() -> None:
    from tidesync.errors import SyncError

    with pytest.raises(SyncError, match="refusing plain HTTP"):
        CentralClient("http://10.1.2.3:8700", "x.y")
    CentralClient("http://10.1.2.3:8700", "x.y", allow_http=True).close()
    CentralClient("http://localhost:8700", "x.y").close()
