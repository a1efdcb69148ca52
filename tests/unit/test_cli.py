"""The `tidesync` command as a user runs it: a real subprocess, real exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import tidesync


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidesync.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_version() -> None:
    out = run("version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"tidesync {tidesync.__version__}"


def test_demo_converges_and_reports_json() -> None:
    out = run("demo", "--patients", "3000", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["converged"] is True
    assert report["repaired"] is True
    assert report["divergent_rows_found"] == 3
    # Both facilities edited the same phone numbers of some patients: logged, not lost.
    assert report["conflicts_logged"] > 0
    assert {s["name"] for s in report["steps"]} >= {"verify by digest"}


def test_unknown_command_fails_with_usage_error() -> None:
    out = run("no-such-command")
    assert out.returncode != 0
    assert "No such command" in out.stderr


def test_schema_install_status_uninstall_on_postgres(pg_db: str) -> None:
    out = run("schema", "install", "--db", pg_db, "--node-id", "clinic-1", "--create-tables")
    assert out.returncode == 0, out.stderr
    assert "12 synced tables" in out.stdout
    again = run("schema", "install", "--db", pg_db, "--node-id", "clinic-1")
    assert again.returncode == 0, again.stderr
    status = run("schema", "status", "--db", pg_db)
    assert status.returncode == 0, status.stderr
    assert "node 'clinic-1'" in status.stdout and "patients" in status.stdout
    clash = run("schema", "install", "--db", pg_db, "--node-id", "clinic-2")
    assert clash.returncode == 1 and "already node 'clinic-1'" in clash.stderr
    gone = run("schema", "uninstall", "--db", pg_db)
    assert gone.returncode == 0, gone.stderr
    missing = run("schema", "status", "--db", pg_db)
    assert missing.returncode == 1 and "not installed" in missing.stderr


def test_schema_install_status_uninstall_on_sqlite(tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = str(tmp_path / "device.sqlite")
    out = run("schema", "install", "--db", db, "--node-id", "tablet-3", "--create-tables")
    assert out.returncode == 0, out.stderr
    assert run("schema", "install", "--db", db, "--node-id", "tablet-3").returncode == 0
    status = run("schema", "status", "--db", db)
    assert status.returncode == 0 and "node 'tablet-3'" in status.stdout, status.stderr
    assert run("schema", "uninstall", "--db", db).returncode == 0
    missing = run("schema", "status", "--db", db)
    assert missing.returncode == 1 and "not installed" in missing.stderr
