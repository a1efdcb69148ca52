"""install / uninstall: idempotent, checked against the registry, data left intact."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.sqlite.util import App, new_id
from tidesync.errors import InvalidInputError, SchemaMismatchError
from tidesync.schemas.demo import REGISTRY
from tidesync.sqlite import SQLiteStore


def _schema(app: App) -> list[tuple[str, str, str]]:
    return app.rows("SELECT type, name, coalesce(sql, '') FROM sqlite_schema ORDER BY type, name")


def _data(app: App) -> dict[str, list[tuple[object, ...]]]:
    out = {}
    for spec in REGISTRY:
        cols = ", ".join(c.name for c in spec.columns)
        out[spec.name] = app.rows(f"SELECT {cols} FROM {spec.name} ORDER BY id")
    return out


def test_install_is_idempotent(db: Path, app: App) -> None:
    pid = app.seed_patient()
    with SQLiteStore(db, REGISTRY) as store:
        store.install("device-a")
        schema = _schema(app)
        before = app.row("patients", pid)
        store.install("device-a")
        assert _schema(app) == schema
        assert app.row("patients", pid) == before  # existing stamps are not redone
        assert store.node_id() == "device-a"
        assert store.read_window(0).tables["patients"].num_rows == 1
        with pytest.raises(InvalidInputError, match="already installed as node 'device-a'"):
            store.install("device-b")


def test_install_adds_metadata_and_backfills_existing_rows(db: Path, app: App) -> None:
    pid = app.seed_patient()
    with SQLiteStore(db, REGISTRY) as store:
        store.install("device-a")
        row = app.row("patients", pid)
        assert row["_node"] == "device-a" and row["_hlc"] > 0 and row["_cursor"] > 0
        assert row["_base_hlc"] is None and row["_origin"] is None
        assert {row[f"_hlc_{c.name}"] for c in REGISTRY["patients"].data_columns} == {row["_hlc"]}
        # field stamps only on field-wise tables
        assert "_hlc_first_name" in row and "_hlc_code" not in app.row("reference_data", row["village_id"])
        tables = {r[0] for r in app.rows("SELECT name FROM sqlite_schema WHERE type = 'table'")}
        assert {"_tidesync_node", "_tidesync_clock", "_tidesync_cursors", "_tidesync_conflicts",
                "_tidesync_quarantine", "_tidesync_tomb_patients"} <= tables  # fmt: skip
        triggers = {r[0] for r in app.rows("SELECT name FROM sqlite_schema WHERE type = 'trigger'")}
        assert len(triggers) == 3 * len(REGISTRY)
        assert app.one("PRAGMA journal_mode") == "wal"


def test_install_checks_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "bad.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE facilities (id TEXT PRIMARY KEY, code TEXT, name TEXT, is_sensitive INTEGER);"
    )
    conn.close()
    with SQLiteStore(path, REGISTRY) as store:
        with pytest.raises(SchemaMismatchError, match="facilities.*missing columns \\['updated_at'\\]"):
            store.install("device-a")
    conn = sqlite3.connect(path)
    conn.executescript("ALTER TABLE facilities ADD COLUMN updated_at TEXT")
    conn.close()
    with SQLiteStore(path, REGISTRY) as store:
        with pytest.raises(SchemaMismatchError, match="table 'reference_data' .* is missing"):
            store.install("device-a")
    # Nothing was left behind by the failed installs.
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE name LIKE '%tidesync%'")] == []
    assert [r[1] for r in conn.execute("PRAGMA table_info(facilities)")] == [
        "id", "code", "name", "is_sensitive", "updated_at"]  # fmt: skip
    conn.close()


def test_install_checks_column_types_and_key(tmp_path: Path, db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.executescript("DROP TABLE attachments; CREATE TABLE attachments (id TEXT, facility_id TEXT, "
                       "patient_id TEXT, kind TEXT, size_bytes TEXT, data BLOB, created_at TEXT)")  # fmt: skip
    conn.close()
    with SQLiteStore(db, REGISTRY) as store:
        with pytest.raises(SchemaMismatchError) as err:
            store.install("device-a")
    assert "'size_bytes' is declared TEXT" in str(err.value)
    assert "key column 'id' is neither the primary key nor UNIQUE" in str(err.value)


def test_uninstall_round_trip_leaves_application_data_intact(db: Path, app: App) -> None:
    schema = _schema(app)
    pid = app.seed_patient()
    app.seed_encounter(pid, vitals=4)
    with SQLiteStore(db, REGISTRY) as store:
        store.install("device-a")
        app.run(("UPDATE patients SET first_name = 'Zoe' WHERE id = ?", (pid,)),
                "DELETE FROM vitals WHERE heart_rate = 70")  # fmt: skip
        app.seed_patient("Bob")
        data = _data(app)
        store.uninstall()
        assert _schema(app) == schema
        assert _data(app) == data
        assert app.rows("SELECT name FROM sqlite_schema WHERE name LIKE '%tidesync%'") == []
        # The application keeps working without triggers, and a new install picks it all up.
        app.run(("INSERT INTO reference_data (id, type, code, name) VALUES (?, 't', 'c', 'n')", (new_id(),)))
        store.install("device-a")
        w = store.read_window(0)
        assert w.tables["patients"].num_rows == 2 and w.tables["reference_data"].num_rows == 3
        assert w.tables["vitals"].num_rows == 3
