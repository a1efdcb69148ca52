"""Names of everything the engine adds to a SQLite database (all start with ``_tidesync_``
or, for columns on application tables, with ``_``)."""

from __future__ import annotations

from tidesync.registry import BASE_HLC, HLC, NODE, TableSpec, stamp_column

CURSOR = "_cursor"
ORIGIN = "_origin"

#: One row: the local change counter that the capture triggers and sync apply advance.
CLOCK = "_tidesync_clock"
#: One row: this node's id, the registry it was installed with, the format version.
NODE_INFO = "_tidesync_node"
CURSORS = "_tidesync_cursors"
#: Key-value settings of the sync client (central URL, token, ...).
SETTINGS = "_tidesync_settings"
CONFLICTS = "_tidesync_conflicts"
QUARANTINE = "_tidesync_quarantine"
PREFIX = "_tidesync_"

#: Metadata columns on every synced table, with their SQLite types.
ROW_META: tuple[tuple[str, str], ...] = (
    (CURSOR, "INTEGER"),
    (HLC, "INTEGER"),
    (NODE, "TEXT"),
    (BASE_HLC, "INTEGER"),
    (ORIGIN, "TEXT"),
)


def meta_columns(spec: TableSpec) -> list[tuple[str, str]]:
    """Every column install adds to ``spec``'s table: row metadata, then field stamps."""
    cols = list(ROW_META)
    if spec.field_wise:
        cols += [(stamp_column(c.name), "INTEGER") for c in spec.data_columns]
    return cols


def tombstones(table: str) -> str:
    return f"{PREFIX}tomb_{table}"


def trigger(table: str, op: str) -> str:
    return f"{PREFIX}{table}_{op}"


def cursor_index(table: str) -> str:
    return f"{PREFIX}{table}_cursor"
