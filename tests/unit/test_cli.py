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
