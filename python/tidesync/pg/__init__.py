"""PostgreSQL nodes (facility and central servers): install, capture, apply."""

from tidesync.pg.store import NotInstalledError, PostgresStore

__all__ = ["NotInstalledError", "PostgresStore"]
