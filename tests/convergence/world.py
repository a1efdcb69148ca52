"""The world the convergence harness drives: a real network, its applications, its faults.

One central server (a separate ``tidesync central serve`` process, so it can be killed
with SIGKILL), two facility servers (PostgreSQL) and two mobile devices (SQLite), all
over HTTP on 127.0.0.1. Applications write plain SQL on every node through their own
connections; each write reads back, in its own transaction, the versions its node's
triggers stamped, and hands them to the :class:`~tests.convergence.oracle.Oracle`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa

from tidesync.changes import keys_from_texts
from tidesync.core import DEFAULT_MAX_DRIFT_MS
from tidesync.pg import apply as pg_apply
from tidesync.pg.conn import connect, transaction
from tidesync.registry import Registry
from tidesync.schemas.demo import REGISTRY
from tidesync.sqlite import apply as sqlite_apply
from tidesync.sqlite.conn import Connection
from tidesync.sync.client import CentralClient, CycleReport, Retry, sync_once
from tidesync.sync.protocol import UnavailableError
from tidesync.sync.local import LocalNetwork, LocalNode
from tests.convergence.oracle import Oracle
from tests.sync.clocks import SKEWED_PATH, shadow_clock_sql

FACILITIES = {"A": "0a000000-0000-4000-8000-00000000000a", "B": "0b000000-0000-4000-8000-00000000000b"}
#: Small pages, so every session has several and faults land mid-stream.
PAGE_ROWS = 7
DAY_MS = 24 * 3600 * 1000


def stamp_literal(i: int) -> str:
    """A timestamptz literal both PostgreSQL and SQLite store as written."""
    return f"2026-11-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00.000000Z"


# ----------------------------------------------------------------------------- central


class CentralProcess:
    """``tidesync central serve`` as a child process on a fixed port."""

    def __init__(self, dsn: str, port: int, *, max_drift_ms: int) -> None:
        self.dsn, self.port, self.max_drift_ms = dsn, port, max_drift_ms
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "tidesync.cli", "central", "serve", "--db", self.dsn, "--port", str(self.port),
               "--page-rows", str(PAGE_ROWS), "--max-drift-ms", str(self.max_drift_ms)]  # fmt: skip
        with self._lock:
            # close_fds=False lets subprocess use posix_spawn: this test process maps a
            # lot of virtual memory, and a plain fork of it can fail with ENOMEM.
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False)
        self.wait_up()

    def kill(self) -> None:
        """SIGKILL, as a power cut would; back after a short while, as a supervisor would."""
        with self._lock:
            proc = self.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            self.kills += 1
        threading.Timer(0.3, self.start).start()

    def wait_up(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise AssertionError("the central server did not answer within 30 s")

    def stop(self) -> None:
        time.sleep(0.35)  # a restart timer may still be pending
        with self._lock:
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


# ----------------------------------------------------------------------------- faults


class Faults(httpx.HTTPTransport):
    """Real HTTP with faults at chosen requests (counted from 0 within one sync):

    - ``lose_request``: the connection drops before the request reaches the server;
    - ``lose_response``: the server does the work, the answer is lost;
    - ``duplicate``: the request reaches the server twice (a page delivered twice);
    - ``kill_central``: the central server is SIGKILLed just before the request.
    """

    def __init__(self, plan: dict[int, str], central: CentralProcess) -> None:
        super().__init__()
        self.plan, self.central = dict(plan), central
        self.n = 0
        self.fired: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        i, self.n = self.n, self.n + 1
        kind = self.plan.pop(i, None)
        if kind is None:
            return super().handle_request(request)
        what = f"{kind} at {request.method} {request.url.path.split('/', 4)[-1]}"
        self.fired.append(what)
        if kind == "lose_request":
            raise httpx.ConnectError(f"injected: {what}", request=request)
        if kind == "kill_central":
            self.central.kill()
            return super().handle_request(request)
        response = super().handle_request(request)
        if kind == "lose_response":
            response.read()
            response.close()
            raise httpx.ReadError(f"injected: {what}", request=request)
        if kind == "duplicate":
            response.read()
            response.close()
            return super().handle_request(request)
        raise AssertionError(kind)


class Crash(Exception):
    """A node dying between fetching its pull and committing it (or part way through)."""


# ----------------------------------------------------------------------------- nodes


@dataclass
class App:
    """The application on one node: its own connection, writing plain SQL."""

    name: str
    kind: str  # "central", "facility", "mobile"
    facility: str | None
    db: str
    conn: Any = None
    skew_ms: int = 0

    def open(self) -> None:
        if self.kind == "mobile":
            self.conn = Connection(self.db)
            self.conn.execute("PRAGMA foreign_keys = ON")
        else:
            self.conn = connect(self.db)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self.kind == "mobile":
            return list(self.conn.rows(sql))
        with self.conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Callable[[str], None]]:
        if self.kind == "mobile":
            with self.conn.transaction("IMMEDIATE"):
                yield self.conn.execute
        else:
            with transaction(self.conn) as cur:
                self._cur = cur
                yield cur.execute

    def read_back(self, registry: Registry, table: str, keys: list[str]) -> pa.Table:
        """The versions of ``keys`` as this node holds them now (inside the open transaction)."""
        spec = registry[table]
        karr = keys_from_texts(spec, keys)
        if self.kind == "mobile":
            return sqlite_apply.read_local(self.conn, spec, pa.table({spec.key: karr}))
        return pg_apply.read_local(self._cur, spec, pa.chunked_array([karr]), lock=False)

    def set_clock(self, offset_ms: int) -> None:
        """Run this PostgreSQL node's clock ``offset_ms`` off true time, as its triggers
        see it: ``clock_timestamp()`` shadowed for the application's session only."""
        assert self.kind != "mobile"
        self.skew_ms = offset_ms
        with self.conn.cursor() as cur:
            if offset_ms == 0:
                cur.execute("SET search_path = DEFAULT")
                return
            for stmt in shadow_clock_sql(offset_ms):
                cur.execute(stmt)
            cur.execute(f"SET search_path = {SKEWED_PATH}")


@dataclass
class World:
    server_dsn: str
    workdir: Path
    registry: Registry = REGISTRY
    max_drift_ms: int = DEFAULT_MAX_DRIFT_MS
    oracle: Oracle = field(init=False)
    net: LocalNetwork = field(init=False)
    central: CentralProcess = field(init=False)
    apps: dict[str, App] = field(init=False, default_factory=dict)
    nodes: dict[str, LocalNode] = field(init=False, default_factory=dict)
    _ids: int = 0
    log: list[str] = field(init=False, default_factory=list)
    #: Cycles given up because central was still restarting after a kill.
    abandoned: int = 0

    def start(self) -> World:
        self.oracle = Oracle(self.registry)
        self.net = LocalNetwork(self.server_dsn, self.registry, self.workdir).start()
        with transaction(self.net.central.connection) as cur:
            for code, fid in FACILITIES.items():
                cur.execute(f"INSERT INTO facilities (id, code, name) VALUES ('{fid}', '{code}', 'Facility {code}')")
        for name, kind, fac in (("fac-a", "facility", "A"), ("fac-b", "facility", "B"),
                                ("mob-a", "mobile", "A"), ("mob-b", "mobile", "B")):  # fmt: skip
            self.nodes[name] = self.net.add_node(name, kind, FACILITIES[fac])
        assert self.net.server is not None
        port = self.net.server.port
        self.net.server.stop()
        self.net.server = None
        self.central = CentralProcess(self.net.central_dsn, port, max_drift_ms=self.max_drift_ms)
        self.central.start()
        self.apps["central"] = App("central", "central", None, self.net.central_dsn)
        for name, node in self.nodes.items():
            self.apps[name] = App(name, node.kind, node.facility_id, node.db)
        for app in self.apps.values():
            app.open()
        for name in self.nodes:
            self.sync(name)
        return self

    def close(self) -> None:
        for app in self.apps.values():
            app.close()
        with contextlib.suppress(Exception):
            self.central.stop()
        self.net.close()

    # ------------------------------------------------------------------ ids

    def new_id(self) -> str:
        """Ids from a counter: the same operations give the same ids (shrinking replays)."""
        self._ids += 1
        return str(uuid.UUID(int=(0x5EED << 96) | (4 << 76) | (0x8 << 60) | self._ids))

    # ------------------------------------------------------------------ application writes

    def write(self, node: str, statements: list[str], touched: list[tuple[str, list[str]]]) -> None:
        """Run ``statements`` in one application transaction at ``node`` and record the
        versions of ``touched`` (table, keys) its triggers stamped."""
        app = self.apps[node]
        with app.transaction() as execute:
            for s in statements:
                execute(s)
            versions = [(t, app.read_back(self.registry, t, keys)) for t, keys in touched if keys]
        for table, v in versions:
            self.oracle.record(table, v, max_drift_ms=self.max_drift_ms)

    def ids(self, node: str, sql: str) -> list[str]:
        return sorted(str(r[0]) for r in self.apps[node].rows(sql))

    def marked_here(self, node: str) -> list[str]:
        """Patients with a live mark for the node's facility, as the node sees them."""
        fac = self.apps[node].facility
        return self.ids(node, "SELECT DISTINCT m.patient_id FROM patient_facilities m JOIN patients p ON p.id = "
                              f"m.patient_id WHERE m.facility_id = '{fac}' AND m.deleted_at IS NULL")  # fmt: skip

    # ------------------------------------------------------------------ sync

    def client(self, node: str, transport: httpx.BaseTransport | None = None) -> CentralClient:
        return CentralClient(self.central.url, self.nodes[node].token,
                             retry=Retry(attempts=12, base_s=0.05, cap_s=1.0), transport=transport)  # fmt: skip

    def sync(self, node: str, plan: dict[int, str] | None = None, crash_after_parts: int | None = None) -> CycleReport:
        transport = Faults(plan or {}, self.central)
        store = self.nodes[node].store
        original = store.apply_parts
        if crash_after_parts is not None:

            def dying(parts: Any, **kw: Any) -> Any:
                def some() -> Iterator[Any]:
                    for i, part in enumerate(parts):
                        if i >= crash_after_parts:
                            raise Crash(f"{node} died after {i} parts of its pull")
                        yield part
                    raise Crash(f"{node} died before committing its pull")

                return original(some(), **kw)

            store.apply_parts = dying  # type: ignore[method-assign]
        try:
            with self.client(node, transport) as client:
                report = sync_once(store, client)
        except UnavailableError as exc:
            if not any(f.startswith("kill_central") for f in transport.fired):
                raise
            # Central stayed down longer than this cycle's retries (a slow restart on a
            # busy machine): the node gives up this cycle and tries again later, as
            # `sync --watch` does. Nothing may be lost by that either.
            self.central.wait_up()
            self.abandoned += 1
            report = CycleReport(node=node, error=f"UnavailableError: {exc}")
        finally:
            store.apply_parts = original  # type: ignore[method-assign]
        self.log.append(f"sync {node}: {report.pushed_rows} up, {report.pulled_rows} down"
                        + (f"; faults {transport.fired}" if transport.fired else ""))  # fmt: skip
        return report

    def quiet_rounds(self) -> None:
        """Sync every node until a whole round moves nothing (at most 5 rounds)."""
        self.central.wait_up()
        for _ in range(5):
            moved = 0
            for name in self.nodes:
                r = self.sync(name)
                moved += r.pushed_rows + r.pulled_rows
            if moved == 0:
                return
        raise AssertionError("the network did not settle after 5 quiet rounds")

    def clamps(self) -> dict[tuple[str, bytes, int], int]:
        out: dict[tuple[str, bytes, int], int] = {}
        rows = self.apps["central"].rows("SELECT table_name, key, original_hlc, clamped_hlc FROM tidesync.clamps")
        for table, key, before, after in rows:
            out[(table, uuid.UUID(key).bytes, int(before))] = int(after)
        return out

    def conflict_log(self) -> set[tuple[str, bytes, int, str]]:
        """(table, key, loser hlc, loser node) of every conflict logged on any node."""
        out: set[tuple[str, bytes, int, str]] = set()
        stores = [self.net.central, *(n.store for n in self.nodes.values())]
        for store in stores:
            for r in store.conflicts().to_pylist():
                out.add((r["table_name"], uuid.UUID(r["key"]).bytes, int(r["loser_hlc"]), r["loser_node"]))
        return out


__all__ = ["App", "CentralProcess", "Crash", "DAY_MS", "FACILITIES", "Faults", "World", "stamp_literal"]
