"""The command-line contract: central init / add-node / serve, node init, sync, status."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from tidesync.cli import main
from tests.conftest import PgServer
from tests.sync.conftest import FACILITY_A
from tests.pg.util import run as pg_run


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_whole_cli_flow(pg_server: PgServer, pg_db: str, tmp_path: Path) -> None:
    central_db = pg_db
    _cli("central", "init", "--db", central_db)
    _cli("central", "init", "--db", central_db)  # idempotent
    pg_run(central_db, f"INSERT INTO facilities (id, code, name) VALUES ('{FACILITY_A}', 'A', 'Clinic A')")
    out = _cli("central", "add-node", "--db", central_db, "--name", "tablet-1", "--kind", "mobile",
               "--facility", FACILITY_A)  # fmt: skip
    token = out.strip().splitlines()[-1]
    assert token.startswith("tablet-1.")
    with socket_port() as port:
        server = subprocess.Popen([sys.executable, "-m", "tidesync.cli", "central", "serve", "--db", central_db,
                                   "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url)
        device = str(tmp_path / "tablet.db")
        _cli("node", "init", "--db", device, "--central", url, "--token", token)
        cycle = json.loads(_cli("sync", "--db", device, "--json").strip().splitlines()[-1])
        assert cycle["ok"] and cycle["pulled_rows"] == 1 and cycle["conflicts"] == 0
        assert {"open", "push_send", "pull_apply"} <= cycle["phases"].keys()
        status = json.loads(_cli("status", "--db", device, "--json"))
        assert status["role"] == "node" and status["node"] == "tablet-1" and status["last_cycle"]["ok"]
        central = json.loads(_cli("status", "--db", central_db, "--json"))
        assert central["role"] == "central" and central["sessions"][0]["node"] == "tablet-1"
        assert central["sessions"][0]["status"] == "ended"
        _cli("status", "--db", device)  # the human form renders too
        _cli("status", "--db", central_db)
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_errors_are_one_line_with_nonzero_exit(pg_db: str, tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(main, ["central", "add-node", "--db", pg_db, "--name", "x", "--kind", "mobile",
                               "--facility", FACILITY_A])  # fmt: skip
    assert bad.exit_code == 1 and "central init" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    not_node = runner.invoke(main, ["sync", "--db", str(tmp_path / "nothing.db")])
    assert not_node.exit_code == 1 and "tidesync: error:" in not_node.stderr
    with pytest.raises(AssertionError):
        _cli("node", "init", "--db", str(tmp_path / "n.db"), "--central", "http://10.0.0.1:8700", "--token", "a.b")


class socket_port:
    """A free TCP port on 127.0.0.1 (released for the server to take)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port: int = self.sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _wait(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("central server did not start")
