"""Seeding new nodes from central: seed files, seeding over the network, failover.

Against the live network of tests/sync/conftest.py (real PostgreSQL, SQLite, HTTP).
"""

from __future__ import annotations

import json
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tidesync import seed
from tidesync.cli import main
from tidesync.errors import SeedError, SyncError
from tidesync.pg.store import PostgresStore
from tidesync.schemas.demo import REGISTRY
from tidesync.sqlite.store import SQLiteStore
from tidesync.sync import central
from tidesync.sync.client import PULL_CURSOR, CentralClient, Retry, client_for, init_node, sync_once
from tidesync.sync.local import LocalNode
from tests.sync.conftest import FACILITY_A, FACILITY_B, Net, ids, query, sql

#: Tables whose rows are scoped to patients or facilities (what a seed must get exactly right).
SCOPED = ("patient_facilities", "encounters", "notes")
#: Enough rows for the bulk path of an empty table (pg/apply.py LOAD_MIN_ROWS).
MANY = 12_000


def cli(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def populate(net: Net) -> dict[str, str]:
    """Patients at both facilities, one shared; every node synced. Returns their ids."""
    a_only = net.new_patient(net.a, "Ana")
    b_only = net.new_patient(net.b, "Bea")
    shared = net.new_patient(net.a, "Cai")
    sql(net.a, f"INSERT INTO notes (id, patient_id, note_type, content, recorded_at) VALUES "
               f"('{uuid.uuid4()}', '{a_only}', 'clinical', 'seen at A', now())")  # fmt: skip
    net.share(shared)
    # Reference data authored centrally, enough rows for a bulk load on the new node.
    sql(net.net, f"INSERT INTO patients (id, display_id, first_name) SELECT gen_random_uuid(), 'G-' || i, 'g' || i "
                 f"FROM generate_series(1, {MANY}) i")  # fmt: skip
    for node in (net.a, net.b):
        node.sync()
    return {"a_only": a_only, "b_only": b_only, "shared": shared}


def new_facility(net: Net, name: str, facility: str) -> tuple[str, str]:
    """A node registered at central with an empty database of its own: (token, dsn)."""
    token = central.add_node(net.net.central, name, "facility", facility)
    return token, net.net._database(name)


def key_of(net: Net) -> str:
    return seed.public_key_text(seed.signing_key(net.net.central))


def test_a_seed_file_makes_a_new_facility_equal_to_one_that_synced(network: Net, tmp_path: Path) -> None:
    made = populate(network)
    token, dsn = new_facility(network, "fac-a2", FACILITY_A)
    out = tmp_path / "a2.seed"
    exported = cli("seed", "export", "--db", network.net.central_dsn, "--node", "fac-a2", "--out", str(out), "--json")
    assert exported.exit_code == 0, exported.output
    manifest = json.loads(exported.output)
    assert manifest["node"] == "fac-a2" and manifest["key"] == key_of(network)
    # A change at central after the seed was cut: the first sync must bring exactly it.
    later = network.new_patient(network.a, "Dov")
    network.a.sync()

    loaded = cli("seed", "import", str(out), "--db", dsn, "--key", key_of(network), "--central", network.net.url,
                 "--token", token, "--json")  # fmt: skip
    assert loaded.exit_code == 0, loaded.output
    report = json.loads(loaded.output)
    assert report["node"] == "fac-a2" and report["resumed"] == [] and report["quarantined"] == 0
    assert report["rows"]["patients"] == MANY + 3

    node = LocalNode("fac-a2", "facility", FACILITY_A, PostgresStore(dsn, REGISTRY), dsn, token)
    try:
        assert node.store.get_cursor(PULL_CURSOR) == manifest["watermark"]
        assert later not in ids(node, "patients")
        for table in SCOPED:
            # Everything facility A's own server had when the seed was cut, nothing else.
            assert ids(node, table) == ids(network.a, table) - _rows_of(network.a, table, later), table
        assert made["b_only"] in ids(node, "patients")  # patients are global ...
        assert not any(r[0] == made["b_only"] for r in query(node, "SELECT patient_id FROM encounters"))  # ... care is not
        cycle = node.sync()
        assert cycle.pushed_rows == 0, "seeded rows must not echo back to central"
        assert cycle.pulled_rows == 3  # the later patient, its mark and its encounter
        for table in (*SCOPED, "patients"):
            assert ids(node, table) == ids(network.a, table), table
        # The seeded node writes and syncs like any other.
        sql(node, f"UPDATE patients SET first_name = 'Ana2' WHERE id = '{made['a_only']}'")
        node.sync(), network.a.sync()
        assert query(network.a, f"SELECT first_name FROM patients WHERE id = '{made['a_only']}'") == [("Ana2",)]
    finally:
        node.close()


def _rows_of(node: LocalNode, table: str, patient: str) -> set[str]:
    return {str(r[0]) for r in query(node, f"SELECT id FROM {table} WHERE patient_id = '{patient}'")}


def test_a_seed_file_loads_into_a_mobile_device(network: Net, tmp_path: Path) -> None:
    made = populate(network)
    token = central.add_node(network.net.central, "mob-b2", "mobile", FACILITY_B)
    out = tmp_path / "m.seed"
    seed.export_seed(network.net.central, "mob-b2", out)
    store = SQLiteStore(str(tmp_path / "m.db"), REGISTRY)
    store.create_app_tables()
    report = seed.import_seed(store, out, public_key=key_of(network))
    init_node(store, network.net.url, token)
    node = LocalNode("mob-b2", "mobile", FACILITY_B, store, str(tmp_path / "m.db"), token)
    try:
        assert report.rows["patients"] == MANY + 3
        assert ids(node, "encounters") == ids(network.b, "encounters")
        assert made["a_only"] not in {str(r[0]) for r in query(node, "SELECT patient_id FROM encounters")}
        assert node.sync().pushed_rows == 0
    finally:
        node.close()


def test_damaged_tampered_or_foreign_seed_files_are_refused_and_load_nothing(network: Net, tmp_path: Path) -> None:
    populate(network)
    token, dsn = new_facility(network, "fac-a3", FACILITY_A)
    good = tmp_path / "good.seed"
    manifest = seed.export_seed(network.net.central, "fac-a3", good)
    key = key_of(network)
    data = good.read_bytes()

    def variant(name: str, body: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(body)
        return path

    # One byte of the patients table flipped, in place (the ZIP's own CRC would catch it too).
    member = next(t for t in manifest.tables if t.name == "patients")
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo(member.member)
    at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
    flipped = bytearray(data)
    flipped[at] ^= 0xFF
    # The manifest rewritten to claim another watermark, keeping the old signature.
    forged = tmp_path / "forged.seed"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(forged, "w") as dst:
        for item in src.infolist():
            body = src.read(item)
            if item.filename == seed.MANIFEST:
                raw = json.loads(body)
                raw["watermark"] = 1
                body = json.dumps(raw).encode()
            dst.writestr(item, body)
    other_key = seed.public_key_text(seed.Ed25519PrivateKey.generate())
    cases = [
        (variant("flipped.seed", bytes(flipped)), key, "fails its checksum"),
        (variant("truncated.seed", data[: len(data) // 2]), key, "truncated"),
        (variant("empty.seed", b""), key, "truncated|not a tidesync seed"),
        (forged, key, "signature"),
        (good, other_key, "signature"),
        (good, "not-a-key", "is not a seed key"),
    ]
    store = PostgresStore(dsn, REGISTRY)
    try:
        store.create_app_tables()
        for path, k, message in cases:
            with pytest.raises(SeedError, match=message):
                seed.import_seed(store, path, public_key=k)
        assert query(network.a, "SELECT 1") and _count(dsn, "patients") == 0
        # A seed for another node, into a database that is already that other node.
        store.install("fac-zz")
        with pytest.raises(SeedError, match="for node 'fac-a3'"):
            seed.import_seed(store, good, public_key=key)
        assert _count(dsn, "patients") == 0
    finally:
        store.close()
    # A node that has synced already is not seeded over (verify --repair is for that).
    seed.export_seed(network.net.central, "fac-a", tmp_path / "a.seed")
    with pytest.raises(SeedError, match="has synced before"):
        seed.import_seed(network.a.store, tmp_path / "a.seed", public_key=key)
    result = cli("seed", "import", str(tmp_path / "flipped.seed"), "--db", str(tmp_path / "x.db"), "--key", key)
    assert result.exit_code == 1 and "SeedError" in result.output and "checksum" in result.output


def _count(dsn: str, table: str) -> int:
    from tests.pg.util import rows

    return int(rows(dsn, f"SELECT count(*) FROM {table}")[0][0])


def test_an_interrupted_seed_resumes_at_the_table_it_stopped_in(network: Net, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    populate(network)
    token, dsn = new_facility(network, "fac-a4", FACILITY_A)
    out = tmp_path / "a4.seed"
    manifest = seed.export_seed(network.net.central, "fac-a4", out)
    store = PostgresStore(dsn, REGISTRY)
    store.create_app_tables()
    real = store.apply_parts
    calls: list[str] = []

    def dies_in_the_fifth_table(parts: Any, **kw: Any) -> Any:
        calls.append(kw["cursor"][0])
        if len(calls) == 5:
            raise KeyboardInterrupt  # the process dies mid-load
        return real(parts, **kw)

    monkeypatch.setattr(store, "apply_parts", dies_in_the_fifth_table)
    with pytest.raises(KeyboardInterrupt):
        seed.import_seed(store, out, public_key=key_of(network))
    monkeypatch.undo()
    init_node(store, network.net.url, token)
    assert seed.seed_pending(store) == manifest.id
    with client_for(store) as client, pytest.raises(SyncError, match="half-loaded"):
        sync_once(store, client)
    report = seed.import_seed(store, out, public_key=key_of(network))
    assert report.resumed == [t.name for t in manifest.tables[:4]]
    assert seed.seed_pending(store) is None
    node = LocalNode("fac-a4", "facility", FACILITY_A, store, dsn, token)
    try:
        for table in (*SCOPED, "patients"):
            assert ids(node, table) == ids(network.a, table), table
        assert node.sync().pushed_rows == 0
    finally:
        node.close()


def test_node_restore_rebuilds_a_lost_facility_and_sync_resumes(network: Net, tmp_path: Path) -> None:
    made = populate(network)
    a = network.a
    unsynced = network.new_patient(a, "Lost")  # written after a's last good sync
    synced_before = {t: ids(a, t) for t in (*SCOPED, "patients")}
    lost = {t: _rows_of(a, t, unsynced) for t in SCOPED} | {"patients": {unsynced}}
    a.close()  # the server burns down
    dsn = network.net._database("fac-a-restored")
    result = cli("node", "restore", "--db", dsn, "--central", network.net.url, "--token", a.token,
                 "--spool", str(tmp_path / "spool"), "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["seed"]["node"] == "fac-a" and out["first_sync"]["pushed_rows"] == 0
    restored = LocalNode("fac-a", "facility", FACILITY_A, PostgresStore(dsn, REGISTRY), dsn, a.token)
    network.a = restored
    try:
        for table, before in synced_before.items():
            # Everything it had synced is back, its own rows included; the unsynced edit is not.
            assert ids(restored, table) == before - lost[table], table
        assert unsynced not in ids(restored, "patients")
        assert made["a_only"] in ids(restored, "patients")
        assert not list((tmp_path / "spool").glob("*.seed*")), "the download is removed once loaded"
        # And it carries on: its new edits reach facility B through central.
        sql(restored, f"UPDATE patients SET first_name = 'after' WHERE id = '{made['shared']}'")
        assert restored.sync().pushed_rows == 1
        network.b.sync()
        assert query(network.b, f"SELECT first_name FROM patients WHERE id = '{made['shared']}'") == [("after",)]
    finally:
        restored.close()


def test_a_seed_download_resumes_after_a_dropped_connection(network: Net, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    populate(network)
    token, dsn = new_facility(network, "fac-a5", FACILITY_A)
    store = PostgresStore(dsn, REGISTRY)
    store.create_app_tables()
    init_node(store, network.net.url, token)
    monkeypatch.setattr(seed, "CHUNK_BYTES", 64 * 1024)
    offsets: list[int] = []

    class Flaky(CentralClient):
        def call(self, method: str, path: str, **kw: Any) -> Any:
            if "offset=" in path:
                offsets.append(int(path.split("offset=")[1].split("&")[0]))
                if len(offsets) == 3:
                    raise SyncError("connection dropped")  # after two chunks arrived
            return super().call(method, path, **kw)

    spool = tmp_path / "spool"
    with Flaky(network.net.url, token, retry=Retry(attempts=1)) as client, pytest.raises(SyncError, match="dropped"):
        seed.seed_from_central(store, client, spool)
    assert [p.name.endswith(".part") for p in spool.iterdir()] == [True]
    with Flaky(network.net.url, token) as client:
        report = seed.seed_from_central(store, client, spool)
    assert offsets[3] == offsets[2] == 2 * 64 * 1024, "the second run starts where the first stopped"
    node = LocalNode("fac-a5", "facility", FACILITY_A, store, dsn, token)
    try:
        assert report.rows["patients"] == MANY + 3
        assert ids(node, "encounters") == ids(network.a, "encounters")
    finally:
        node.close()


def test_seed_key_and_export_refusals(network: Net, tmp_path: Path) -> None:
    key = cli("seed", "key", "--db", network.net.central_dsn)
    assert key.exit_code == 0 and key.output.strip() == key_of(network)
    unknown = cli("seed", "export", "--db", network.net.central_dsn, "--node", "nobody", "--out", str(tmp_path / "x"))
    assert unknown.exit_code == 1 and "no node named 'nobody'" in unknown.output
    (tmp_path / "taken.seed").write_bytes(b"keep me")
    taken = cli("seed", "export", "--db", network.net.central_dsn, "--node", "fac-a", "--out",
                str(tmp_path / "taken.seed"))  # fmt: skip
    assert taken.exit_code == 1 and "already exists" in taken.output
    assert (tmp_path / "taken.seed").read_bytes() == b"keep me"
    assert not list(tmp_path.glob("*.partial"))


def test_seed_files_and_folders_are_private_to_their_owner(network: Net, tmp_path: Path) -> None:
    out = tmp_path / "a.seed"
    seed.export_seed(network.net.central, "fac-a", out)
    assert out.stat().st_mode & 0o077 == 0
    spool = seed.SeedSpool(tmp_path / "spool", network.net.central_dsn, REGISTRY)
    assert spool.root.stat().st_mode & 0o077 == 0


def test_the_seed_spool_never_hands_out_a_file_it_cannot_vouch_for(network: Net, tmp_path: Path) -> None:
    """Regression: seed files were kept by node name only, so a central server handed a
    node the file another central (same machine, same node name) had made and signed."""
    import time

    cstore = network.net.central
    other = seed.SeedSpool(tmp_path, network.net.central_dsn + "?application_name=other", REGISTRY)
    spool = seed.SeedSpool(tmp_path, network.net.central_dsn, REGISTRY)
    assert spool.root != other.root and spool.root.parent == other.root.parent

    def ready(node: str) -> dict[str, Any]:
        for _ in range(300):
            answer = spool.request(cstore, node)
            if answer["status"] != "preparing":
                return answer
            time.sleep(0.05)
        raise AssertionError("the seed was never ready")

    first = ready("fac-a")
    assert first["status"] == "ready" and first["key"] == key_of(network)
    assert ready("fac-a")["id"] == first["id"]  # handed out again while fresh
    # A file made under another key (say, central's key was replaced) is rebuilt.
    meta = spool.root / "fac-a.seed.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "key": "ed25519:someone-else"}))
    assert spool.request(cstore, "fac-a")["status"] == "preparing"
    assert ready("fac-a")["key"] == key_of(network)
    # A build that fails is reported, not retried in a loop.
    failed = ready("no-such-node")
    assert failed["status"] == "failed" and "no node named 'no-such-node'" in failed["error"]
