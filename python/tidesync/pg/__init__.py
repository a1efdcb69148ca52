"""PostgreSQL nodes (facility and central servers): install, capture, apply."""

from tidesync.errors import NotInstalledError
from tidesync.pg.store import PostgresStore

__all__ = ["NotInstalledError", "PostgresStore"]
