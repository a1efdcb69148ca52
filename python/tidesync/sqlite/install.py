"""``install`` / ``uninstall``: the engine's metadata on top of the application's tables.

Install checks every registry table against the database, then, in one transaction
(SQLite DDL is transactional, so a failure leaves nothing behind): creates the
bookkeeping tables, adds the metadata columns (and an index on ``_cursor``), backfills
stamps on existing rows so they sync, creates a tombstone table and the capture
triggers per synced table. Running it again changes nothing. Uninstall drops all of
it (ALTER TABLE DROP COLUMN, SQLite >= 3.35); the application's data stays.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidesync.errors import InvalidInputError, NotInstalledError, SchemaMismatchError
from tidesync.registry import Registry, TableSpec, stamp_column
from tidesync.sqlite import names
from tidesync.sqlite.capture import NOW_HLC, trigger_ddl
from tidesync.sqlite.conn import Connection, literal, quote
from tidesync.sqlite.types import ACCEPTED_AFFINITY, STORAGE, affinity

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ForeignKey:
    """One foreign key of a synced table (from ``PRAGMA foreign_key_list``)."""

    parent: str
    columns: tuple[str, ...]  # in the child
    parent_columns: tuple[str, ...]  # in the parent (its primary key when the DDL names none)
    on_delete: str


@dataclass(frozen=True)
class TableInfo:
    """What the store needs to know about an application table."""

    columns: dict[str, str]  # name -> declared type
    rowid: bool
    foreign_keys: tuple[ForeignKey, ...]


def table_exists(conn: Connection, name: str) -> bool:
    return bool(conn.scalar("SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?", [name]))


def inspect(conn: Connection, spec: TableSpec) -> TableInfo:
    """Read a table's shape, or raise SchemaMismatchError if it cannot carry ``spec``."""
    t = quote(spec.name)
    if not table_exists(conn, spec.name):
        raise SchemaMismatchError(
            f"table {spec.name!r} of registry is missing from {conn.path}: create the application's "
            "tables before `tidesync schema install`"
        )
    info = conn.rows(f"PRAGMA table_info({t})")
    columns = {str(r[1]): str(r[2] or "") for r in info}
    pk = [str(r[1]) for r in sorted(info, key=lambda r: int(r[5])) if int(r[5]) > 0]
    problems: list[str] = []
    missing = [c.name for c in spec.columns if c.name not in columns]
    if missing:
        problems.append(f"missing columns {missing}")
    for c in spec.columns:
        if c.name in columns:
            aff = affinity(columns[c.name])
            if aff not in ACCEPTED_AFFINITY[c.type]:
                problems.append(
                    f"column {c.name!r} is declared {columns[c.name] or '(no type)'} ({aff} affinity) but the "
                    f"registry says {c.type.value} (stored as {STORAGE[c.type]})"
                )
    if not missing and pk != [spec.key] and not _unique_on(conn, spec.name, spec.key):
        problems.append(f"key column {spec.key!r} is neither the primary key nor UNIQUE")
    if problems:
        raise SchemaMismatchError(f"table {spec.name!r} does not match the registry: {'; '.join(problems)}")
    rowid = True
    try:
        conn.rows(f"SELECT rowid FROM {t} LIMIT 0")
    except Exception:  # a WITHOUT ROWID table
        rowid = False
    return TableInfo(columns, rowid, foreign_keys(conn, spec.name))


def _unique_on(conn: Connection, table: str, column: str) -> bool:
    for idx in conn.rows(f"PRAGMA index_list({quote(table)})"):
        if int(idx[2]):
            cols = [r[2] for r in conn.rows(f"PRAGMA index_info({quote(str(idx[1]))})")]
            if cols == [column]:
                return True
    return False


def foreign_keys(conn: Connection, table: str) -> tuple[ForeignKey, ...]:
    by_id: dict[int, list[tuple[object, ...]]] = {}
    for r in conn.rows(f"PRAGMA foreign_key_list({quote(table)})"):
        by_id.setdefault(int(r[0]), []).append(r)
    out = []
    for rows in by_id.values():
        rows.sort(key=lambda r: int(str(r[1])))
        parent = str(rows[0][2])
        cols = tuple(str(r[3]) for r in rows)
        pcols: tuple[str, ...]
        if any(r[4] is None for r in rows):
            info = conn.rows(f"PRAGMA table_info({quote(parent)})")
            pcols = tuple(str(r[1]) for r in sorted(info, key=lambda r: int(r[5])) if int(r[5]) > 0)
        else:
            pcols = tuple(str(r[4]) for r in rows)
        out.append(ForeignKey(parent, cols, pcols, str(rows[0][6]).upper()))
    return tuple(out)


def installed_node(conn: Connection) -> str | None:
    if not table_exists(conn, names.NODE_INFO):
        return None
    v = conn.scalar(f"SELECT node_id FROM {quote(names.NODE_INFO)}")
    return None if v is None else str(v)


_BOOKKEEPING = [
    f"""CREATE TABLE IF NOT EXISTS {names.NODE_INFO} (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    node_id TEXT NOT NULL,
    registry TEXT NOT NULL,
    format INTEGER NOT NULL,
    installed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
)""",
    f"""CREATE TABLE IF NOT EXISTS {names.CLOCK} (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
)""",
    f"INSERT INTO {names.CLOCK} (id, value) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
    f"""CREATE TABLE IF NOT EXISTS {names.CURSORS} (
    name TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
)""",
    f"""CREATE TABLE IF NOT EXISTS {names.SETTINGS} (
    name TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
)""",
    f"""CREATE TABLE IF NOT EXISTS {names.CONFLICTS} (
    id INTEGER PRIMARY KEY,
    table_name TEXT NOT NULL,
    key TEXT NOT NULL,
    loser_hlc INTEGER NOT NULL,
    loser_node TEXT NOT NULL,
    winner_hlc INTEGER NOT NULL,
    winner_node TEXT NOT NULL,
    lost_columns TEXT NOT NULL,   -- JSON array of column names
    loser_row TEXT NOT NULL,      -- the losing version's application columns, JSON
    peer TEXT,
    recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
)""",
    f"""CREATE TABLE IF NOT EXISTS {names.QUARANTINE} (
    id INTEGER PRIMARY KEY,
    table_name TEXT NOT NULL,
    key TEXT,
    hlc INTEGER,
    node TEXT,
    row_data TEXT NOT NULL,       -- the rejected version's application columns, JSON
    reason TEXT NOT NULL,
    peer TEXT,
    recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
)""",
]

#: Quarantine columns added after its first release (see :mod:`tidesync.quarantine`): a
#: fresh install and an upgrade of an older one add them the same way.
QUARANTINE_COLUMNS = (
    # The rejected version: one row in the table's wire schema, as an Arrow IPC stream.
    ("version", "BLOB"),
    ("status", "TEXT NOT NULL DEFAULT 'held' CHECK (status IN ('held', 'retried', 'discarded'))"),
    ("attempts", "INTEGER NOT NULL DEFAULT 1"),
    ("resolved_at", "TEXT"),  # written like recorded_at
    ("note", "TEXT"),  # what a retry did, or who discarded the entry and why
)


def upgrade_quarantine(conn: Connection) -> None:
    """Give a quarantine made by an older install its newer columns (looks first; in the
    caller's transaction if one is open, else in its own)."""
    have = {str(r[1]) for r in conn.rows(f"PRAGMA table_info({quote(names.QUARANTINE)})")}
    if not have:
        raise NotInstalledError(f"tidesync is not installed in {conn.path}: run `tidesync schema install` first")
    missing = [(c, decl) for c, decl in QUARANTINE_COLUMNS if c not in have]
    if not missing:
        return
    if not conn.in_transaction:
        with conn.transaction("IMMEDIATE"):
            upgrade_quarantine(conn)  # looks again, under the write lock
        return
    for col, decl in missing:
        conn.execute(f"ALTER TABLE {quote(names.QUARANTINE)} ADD COLUMN {col} {decl}")


def install(conn: Connection, registry: Registry, node_id: str) -> None:
    """Add the engine's metadata (idempotent; one transaction)."""
    if not node_id or not isinstance(node_id, str):
        raise InvalidInputError("node_id must be a non-empty string")
    have = installed_node(conn)
    if have is not None and have != node_id:
        raise InvalidInputError(
            f"{conn.path} is already installed as node {have!r}; uninstall first to become {node_id!r}"
        )
    # WAL: window reads never block the application's writes, nor the other way round.
    conn.execute("PRAGMA journal_mode = WAL")
    with conn.transaction("IMMEDIATE"):
        infos = {spec.name: inspect(conn, spec) for spec in registry}
        for stmt in _BOOKKEEPING:
            conn.execute(stmt)
        upgrade_quarantine(conn)
        conn.execute(
            f"INSERT INTO {names.NODE_INFO} (id, node_id, registry, format) VALUES (1, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET registry = excluded.registry, format = excluded.format",
            [node_id, registry.name, FORMAT_VERSION],
        )
        for spec in registry:
            _install_table(conn, spec, infos[spec.name], node_id)


def _install_table(conn: Connection, spec: TableSpec, info: TableInfo, node_id: str) -> None:
    t, k = quote(spec.name), quote(spec.key)
    for col, sqltype in names.meta_columns(spec):
        if col not in info.columns:
            conn.execute(f"ALTER TABLE {t} ADD COLUMN {quote(col)} {sqltype}")
    key_type = STORAGE[spec.column(spec.key).type]
    tomb = quote(names.tombstones(spec.name))
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {tomb} (
    {k} {key_type} PRIMARY KEY NOT NULL,
    _cursor INTEGER NOT NULL,
    _hlc INTEGER NOT NULL,
    _node TEXT NOT NULL,
    _base_hlc INTEGER,
    _origin TEXT
)"""
    )
    conn.execute(f"CREATE INDEX IF NOT EXISTS {quote(names.cursor_index(spec.name))} ON {t} (_cursor)")
    conn.execute(
        f"CREATE INDEX IF NOT EXISTS {quote(names.cursor_index(names.tombstones(spec.name)))} ON {tomb} (_cursor)"
    )
    # Rows written before install (or while the triggers were away): stamp them as
    # this node's versions so they sync. One cursor for all of them.
    for trig in ("ins", "upd", "del"):
        conn.execute(f"DROP TRIGGER IF EXISTS {quote(names.trigger(spec.name, trig))}")
    unstamped = conn.scalar(f"SELECT count(*) FROM {t} WHERE _hlc IS NULL OR _cursor IS NULL")
    if unstamped:
        conn.execute(f"UPDATE {quote(names.CLOCK)} SET value = value + 1")
        sets = [
            f"_cursor = (SELECT value FROM {quote(names.CLOCK)})",
            f"_hlc = coalesce(_hlc, {NOW_HLC})",
            f"_node = coalesce(_node, {literal(node_id)})",
        ]
        if spec.field_wise:
            sets += [f"{quote(stamp_column(c.name))} = coalesce({quote(stamp_column(c.name))}, "
                     f"_hlc, {NOW_HLC})" for c in spec.data_columns]  # fmt: skip
        conn.execute(f"UPDATE {t} SET {', '.join(sets)} WHERE _hlc IS NULL OR _cursor IS NULL")
    for stmt in trigger_ddl(spec, node_id, info.rowid):
        conn.execute(stmt)


def uninstall(conn: Connection, registry: Registry) -> None:
    """Remove every trigger, column, index and bookkeeping table install added."""
    with conn.transaction("IMMEDIATE"):
        for (name,) in conn.rows(
            "SELECT name FROM sqlite_schema WHERE type = 'trigger' AND name LIKE '\\_tidesync\\_%' ESCAPE '\\'"
        ):
            conn.execute(f"DROP TRIGGER IF EXISTS {quote(str(name))}")
        for (name,) in conn.rows(
            "SELECT name FROM sqlite_schema WHERE type = 'index' AND name LIKE '\\_tidesync\\_%' ESCAPE '\\'"
        ):
            conn.execute(f"DROP INDEX IF EXISTS {quote(str(name))}")
        for spec in registry:
            if not table_exists(conn, spec.name):
                continue
            have = {str(r[1]) for r in conn.rows(f"PRAGMA table_info({quote(spec.name)})")}
            ours = [c for c, _ in names.meta_columns(spec)]
            # Stamps of columns the registry no longer lists, too.
            ours += sorted(c for c in have if c.startswith("_hlc_") and c not in ours)
            for col in ours:
                if col in have:
                    conn.execute(f"ALTER TABLE {quote(spec.name)} DROP COLUMN {quote(col)}")
        for (name,) in conn.rows(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name LIKE '\\_tidesync\\_%' ESCAPE '\\'"
        ):
            conn.execute(f"DROP TABLE IF EXISTS {quote(str(name))}")

