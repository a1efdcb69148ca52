"""A whole sync network on one machine: a central server, facility servers and mobile
devices, on one PostgreSQL cluster (one database each) and SQLite files.

Used by ``tidesync demo``, the end-to-end tests and the benchmarks. Everything talks
over real HTTP on 127.0.0.1, exactly as separate machines would.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidesync.pg.conn import create_database, drop_database
from tidesync.pg.store import PostgresStore
from tidesync.registry import Registry
from tidesync.sqlite.store import SQLiteStore
from tidesync.store import Store
from tidesync.sync import central
from tidesync.sync.client import CentralClient, CycleReport, Retry, client_for, init_node, sync_once
from tidesync.sync.serve import BackgroundServer


@dataclass
class LocalNode:
    name: str
    kind: str
    facility_id: str
    store: Store
    db: str
    token: str
    client: CentralClient | None = None

    def sync(self, **kw: Any) -> CycleReport:
        if self.client is None:
            self.client = client_for(self.store, retry=Retry(attempts=4, base_s=0.05, cap_s=0.5))
        return sync_once(self.store, self.client, **kw)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.store.close()  # type: ignore[attr-defined]


@dataclass
class LocalNetwork:
    """Create with :meth:`start`; ``close()`` stops the server and drops what it made."""

    server_dsn: str
    registry: Registry
    workdir: Path
    prefix: str = field(default_factory=lambda: f"ts_{uuid.uuid4().hex[:8]}")
    settings: central.Settings | None = None
    central: PostgresStore = field(init=False)
    central_dsn: str = field(init=False)
    server: BackgroundServer | None = field(init=False, default=None)
    nodes: dict[str, LocalNode] = field(init=False, default_factory=dict)
    _databases: list[str] = field(init=False, default_factory=list)

    def start(self) -> LocalNetwork:
        self.central_dsn = self._database("central")
        self.central = PostgresStore(self.central_dsn, self.registry)
        central.init(self.central)
        self.server = BackgroundServer(self.central_dsn, self.registry, settings=self.settings).start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def _database(self, name: str) -> str:
        db = f"{self.prefix}_{name.replace('-', '_')}"
        self._databases.append(db)
        return create_database(self.server_dsn, db, replace=True)

    def add_node(self, name: str, kind: str, facility_id: str) -> LocalNode:
        """Register a node at central and set up its own database (PostgreSQL or SQLite)."""
        token = central.add_node(self.central, name, kind, facility_id)
        store: Store
        if kind == "facility":
            db = self._database(name)
            store = PostgresStore(db, self.registry)
        else:
            db = str(self.workdir / f"{self.prefix}_{name}.db")
            store = SQLiteStore(db, self.registry)
        store.create_app_tables()
        init_node(store, self.url, token)
        node = LocalNode(name, kind, facility_id, store, db, token)
        self.nodes[name] = node
        return node

    def close(self) -> None:
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.close()
        if self.server is not None:
            self.server.stop()
        with contextlib.suppress(Exception):
            self.central.close()
        for db in self._databases:
            with contextlib.suppress(Exception):
                drop_database(self.server_dsn, db)

    def __enter__(self) -> LocalNetwork:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LocalNetwork", "LocalNode"]
