"""`schema install` / `uninstall` on PostgreSQL: idempotent, checked, reversible."""

from __future__ import annotations

import pytest

from tidesync import SchemaMismatchError
from tidesync.pg import NotInstalledError, PostgresStore
from tidesync.registry import Column, LogicalType, Registry, TableSpec
from tidesync.schemas.demo import REGISTRY

from .util import one, rows, run, seed_patient


def _app_columns(dsn: str, table: str) -> list[str]:
    return [r[0] for r in rows(dsn, f"SELECT column_name FROM information_schema.columns WHERE table_name = "
                                    f"'{table}' AND table_schema = 'public' ORDER BY ordinal_position")]  # fmt: skip


def test_install_is_idempotent_and_adds_metadata(demo_db: str) -> None:
    store = PostgresStore(demo_db, REGISTRY)
    with pytest.raises(NotInstalledError):
        store.node_id()
    store.install("facility-a")
    store.install("facility-a")
    assert store.node_id() == "facility-a"
    cols = _app_columns(demo_db, "patients")
    assert {"_cursor", "_hlc", "_node", "_base_hlc", "_origin", "_hlc_first_name"} <= set(cols)
    assert "_hlc_first_name" not in _app_columns(demo_db, "encounters")  # record-mode table
    assert one(demo_db, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tidesync_%'") == 3 * len(REGISTRY)
    store.close()


def test_install_refuses_another_node_id(demo_store: PostgresStore) -> None:
    with pytest.raises(SchemaMismatchError, match="already node 'facility-a'"):
        demo_store.install("facility-b")


def test_install_checks_tables_against_registry(pg_db: str) -> None:
    run(pg_db, "CREATE TABLE things (id uuid PRIMARY KEY, name integer)")
    reg = Registry([TableSpec("things", (Column("id", LogicalType.UUID), Column("name", LogicalType.TEXT),
                                         Column("size", LogicalType.INT64)))])  # fmt: skip
    store = PostgresStore(pg_db, reg)
    with pytest.raises(SchemaMismatchError) as err:
        store.install("n1")
    assert "things.name is integer, the registry says text" in str(err.value)
    assert "things.size is missing" in str(err.value)
    missing = PostgresStore(pg_db, Registry([TableSpec("nothere", (Column("id", LogicalType.UUID),))]))
    with pytest.raises(SchemaMismatchError, match="'nothere' does not exist"):
        missing.install("n1")
    store.close()
    missing.close()


def test_existing_rows_are_stamped_at_install(demo_db: str) -> None:
    pid = seed_patient(demo_db)
    store = PostgresStore(demo_db, REGISTRY)
    store.install("facility-a")
    window = store.read_window(0)
    patients = window.tables["patients"]
    assert patients.num_rows == 1
    assert patients.column("_node").to_pylist() == ["facility-a"]
    assert patients.column("_hlc_first_name")[0].as_py() is not None
    assert str(one(demo_db, "SELECT id FROM patients")) == pid
    store.close()


def test_uninstall_round_trip_keeps_application_data(demo_db: str) -> None:
    pid = seed_patient(demo_db, "Zed")
    before = rows(demo_db, "SELECT * FROM patients ORDER BY id")
    cols_before = _app_columns(demo_db, "patients")
    store = PostgresStore(demo_db, REGISTRY)
    store.install("facility-a")
    run(demo_db, f"UPDATE patients SET first_name = 'Zoe' WHERE id = '{pid}'",
        f"UPDATE patients SET first_name = 'Zed' WHERE id = '{pid}'")  # fmt: skip
    store.uninstall()
    assert _app_columns(demo_db, "patients") == cols_before
    assert rows(demo_db, "SELECT * FROM patients ORDER BY id") == before
    assert one(demo_db, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tidesync'") == 0
    assert one(demo_db, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tidesync_%'") == 0
    # And it installs again cleanly afterwards.
    store.install("facility-a")
    assert store.read_window(0).tables["patients"].num_rows == 1
    store.close()
