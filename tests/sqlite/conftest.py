"""Fixtures of the SQLite store tests: a real SQLite file with the demo app's tables."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sqlite.util import App
from tidesync.schemas.demo import REGISTRY, app_ddl
from tidesync.sqlite import SQLiteStore


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A SQLite file holding the demo application's tables (no tidesync metadata)."""
    path = tmp_path / "device.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(app_ddl("sqlite"))
    conn.close()
    return path


@pytest.fixture
def app(db: Path) -> Iterator[App]:
    """The application: plain SQL through Python's sqlite3, autocommit."""
    a = App(db)
    yield a
    a.close()


@pytest.fixture
def store(db: Path) -> Iterator[SQLiteStore]:
    """The store of ``db``, installed as node ``device-a``."""
    s = SQLiteStore(db, REGISTRY)
    s.install("device-a")
    yield s
    s.close()


def open_store(path: Path, node: str) -> SQLiteStore:
    s = SQLiteStore(path, REGISTRY)
    s.install(node)
    return s
