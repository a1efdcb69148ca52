"""Clock skew on a facility, without touching product code.

A facility's stamps come from its PostgreSQL's ``clock_timestamp()`` (the capture
triggers, ``Store.clock_ms``). :func:`skew_clock` shadows that function with one that
runs ``ms`` ahead (or behind, when negative): a schema ``skew`` holding
``skew.clock_timestamp()``, searched before ``pg_catalog``, on the store's own
connection and, through ``ALTER DATABASE``, on every connection opened after (the
application's writes). :func:`unskew_clock` puts the real clock back.
"""

from __future__ import annotations

from tidesync.sync.local import LocalNode
from tests.sync.conftest import query, sql

SKEW_SCHEMA = "skew"
SKEWED_PATH = f"public, {SKEW_SCHEMA}, pg_catalog"


def shadow_clock_sql(ms: int) -> list[str]:
    """The statements that create the shadowing ``clock_timestamp()``, ``ms`` off
    (in force for a session once its search_path is :data:`SKEWED_PATH`)."""
    return [f"CREATE SCHEMA IF NOT EXISTS {SKEW_SCHEMA}",
            f"CREATE OR REPLACE FUNCTION {SKEW_SCHEMA}.clock_timestamp() RETURNS timestamptz LANGUAGE sql VOLATILE "
            f"AS $$ SELECT pg_catalog.clock_timestamp() + interval '{int(ms)} milliseconds' $$"]  # fmt: skip


def skew_clock(node: LocalNode, ms: int) -> None:
    """Make ``node``'s database clock run ``ms`` milliseconds ahead (negative: behind)."""
    db = _database(node)
    sql(node, *shadow_clock_sql(ms), f'ALTER DATABASE "{db}" SET search_path = {SKEWED_PATH}')
    _set_path(node, SKEWED_PATH)


def unskew_clock(node: LocalNode) -> None:
    """Give ``node`` back its real clock (connections opened from now on, and the store's)."""
    db = _database(node)
    _set_path(node, "DEFAULT")
    sql(node, f'ALTER DATABASE "{db}" RESET search_path', f"DROP SCHEMA IF EXISTS {SKEW_SCHEMA} CASCADE")


def _database(node: LocalNode) -> str:
    if node.kind != "facility":
        raise ValueError(f"{node.name} is a {node.kind}: only a PostgreSQL node's clock can be shadowed")
    return str(query(node, "SELECT current_database()")[0][0])


def _set_path(node: LocalNode, path: str) -> None:
    # The store's connection predates ALTER DATABASE, so it is told directly.
    with node.store.connection.cursor() as cur:  # type: ignore[attr-defined]
        cur.execute(f"SET search_path = {path}")
