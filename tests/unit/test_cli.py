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


def test_demo_runs_the_network_and_reports_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = run("demo", "--patients", "200", "--workdir", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)  # human output went to stderr
    assert report["ok"] is True
    assert report["verified"] and all(report["verified"].values()), report["verified"]
    names = [s["name"] for s in report["steps"]]
    assert names == ["setup", "generate", "initial sync", "field-wise merge", "offline catch-up", "patient moves",
                     "outreach", "final round", "verify"]  # fmt: skip
    cycles = [c for s in report["steps"] for c in s["cycles"]]
    assert {c["node"] for c in cycles} == {"facility-1", "facility-2", "outreach-1"}
    assert all(c["seconds"] > 0 and "pull_apply" in c["phases"] for c in cycles)
    initial = next(s for s in report["steps"] if s["name"] == "initial sync")
    assert all(c["pulled_rows"] > 200 for c in initial["cycles"])  # every patient, plus its own history
    # Both facilities edited the same first names offline: logged at central, not lost.
    assert report["conflicts_logged"] > 0
    # The mobile device's database lives in --workdir and stays; PostgreSQL is gone.
    assert [p.suffix for p in tmp_path.iterdir()] == [".db"]


def test_demo_needs_two_facilities() -> None:
    out = run("demo", "--facilities", "1")
    assert out.returncode == 2 and "--facilities" in out.stderr


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
