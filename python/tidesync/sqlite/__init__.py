"""The SQLite store for mobile devices: capture triggers, windows and atomic apply.

``SQLiteStore`` implements :class:`tidesync.store.Store` on one SQLite file with the
same behaviour as the PostgreSQL store. Storage conventions and the trigger design
are in docs/sqlite.md.
"""

from tidesync.sqlite.store import SQLiteStore

__all__ = ["SQLiteStore"]
