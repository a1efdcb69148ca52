"""``tidesync schema install`` / ``uninstall`` on PostgreSQL.

Install adds, on top of the application's own tables:

- metadata columns on every synced table: ``_cursor xid8`` (the writing transaction,
  for windows), ``_hlc``, ``_node``, ``_base_hlc``, ``_origin`` and, for field-wise
  tables, ``_hlc_<col>``; an index on ``_cursor``;
- capture triggers (one PL/pgSQL function per table and operation, with this node's
  id baked in so they read no table: triggers are on every write path of a hospital);
- in the ``tidesync`` schema: a tombstone table per synced table, the node's identity,
  cursors, the conflict log and the quarantine.

Everything is ``IF NOT EXISTS`` / ``OR REPLACE``, so install is idempotent; uninstall
drops exactly what install added and leaves application data alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tidesync.errors import NotInstalledError, SchemaMismatchError
from tidesync.pg.conn import execute_script, transaction
from tidesync.registry import Registry, TableSpec, stamp_column

SCHEMA = "tidesync"
#: Session setting the apply transaction turns on: triggers then keep incoming stamps.
APPLYING_GUC = "tidesync.applying"
NOT_APPLYING = f"current_setting('{APPLYING_GUC}', true) IS DISTINCT FROM 'on'"
#: `now` as an HLC stamp: milliseconds in the high 48 bits. clock_timestamp() is
#: the real time of the row's write, not the transaction start.
NOW_HLC = "((date_part('epoch', clock_timestamp()) * 1000)::bigint << 16)"

META_COLUMNS = ("_cursor", "_hlc", "_node", "_base_hlc", "_origin")


def qi(name: str) -> str:
    """Quote an identifier (registry names are already checked to be plain)."""
    return '"' + name.replace('"', '""') + '"'


def ql(value: str) -> str:
    """Quote a literal."""
    return "'" + value.replace("'", "''") + "'"


def tomb_table(spec: TableSpec) -> str:
    return f"{SCHEMA}.{qi(spec.name + '__tombstones')}"


def _fn(spec: TableSpec, op: str) -> str:
    return f"{SCHEMA}.{qi(spec.name + '__' + op)}"


def _trigger(op: str) -> str:
    return qi(f"tidesync_{op}")


BOOKKEEPING = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.node (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    node_id text NOT NULL,
    registry text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.cursors (
    name text PRIMARY KEY,
    value bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.settings (
    name text PRIMARY KEY,
    value text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.conflicts (
    id bigserial PRIMARY KEY,
    table_name text NOT NULL,
    key text NOT NULL,
    loser_hlc bigint NOT NULL,
    loser_node text NOT NULL,
    winner_hlc bigint NOT NULL,
    winner_node text NOT NULL,
    lost_columns text[] NOT NULL,
    loser_row jsonb NOT NULL,
    peer text,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.quarantine (
    id bigserial PRIMARY KEY,
    table_name text NOT NULL,
    key text,
    hlc bigint,
    node text,
    row_data jsonb NOT NULL,
    reason text NOT NULL,
    peer text,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
"""

#: Quarantine columns added after its first release (see :mod:`tidesync.quarantine`):
#: a fresh install and an upgrade of an older one run the same statement.
QUARANTINE_COLUMNS = {
    # The rejected version: one row in the table's wire schema, as an Arrow IPC stream.
    "version": "bytea",
    "status": "text NOT NULL DEFAULT 'held' CHECK (status IN ('held', 'retried', 'discarded'))",
    "attempts": "integer NOT NULL DEFAULT 1",
    "resolved_at": "timestamptz",
    "note": "text",  # what a retry did, or who discarded the entry and why
}
QUARANTINE_UPGRADE = f"ALTER TABLE {SCHEMA}.quarantine " + ", ".join(
    f"ADD COLUMN IF NOT EXISTS {name} {decl}" for name, decl in QUARANTINE_COLUMNS.items()
)


def missing_columns(cur: Any, table: str, columns: Iterable[str]) -> list[str] | None:
    """Which of ``columns`` the table ``table`` (schema-qualified) lacks, or None if there
    is no such table. Upgrades look with this before they alter: an ALTER locks the
    table even when it changes nothing."""
    cur.execute(f"SELECT to_regclass({ql(table)}) IS NOT NULL")
    if not cur.fetchone()[0]:
        return None
    cur.execute(f"SELECT attname FROM pg_attribute WHERE attrelid = to_regclass({ql(table)}) "
                "AND attnum > 0 AND NOT attisdropped")  # fmt: skip
    have = {str(r[0]) for r in cur.fetchall()}
    return [c for c in columns if c not in have]


def upgrade_quarantine(cur: Any) -> None:
    """Give a quarantine made by an older install its newer columns. Cheap on the paths
    that call it (writing entries, the quarantine commands) when there is nothing to do."""
    missing = missing_columns(cur, f"{SCHEMA}.quarantine", QUARANTINE_COLUMNS)
    if missing is None:
        raise NotInstalledError("tidesync is not installed in this database: run `tidesync schema install`")
    if missing:
        cur.execute(QUARANTINE_UPGRADE)


def _columns_of(cur: Any, table: str) -> dict[str, str]:
    cur.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE c.relname = {ql(table)} AND n.nspname = current_schema() AND a.attnum > 0 AND NOT a.attisdropped"
    )
    return {name: typ for name, typ in cur.fetchall()}


def check_tables(cur: Any, registry: Registry) -> None:
    """Every registry table exists with its declared columns and types, or raise."""
    problems = []
    for spec in registry:
        cols = _columns_of(cur, spec.name)
        if not cols:
            problems.append(f"table {spec.name!r} does not exist (create the application's tables first)")
            continue
        for c in spec.columns:
            have = cols.get(c.name)
            if have is None:
                problems.append(f"{spec.name}.{c.name} is missing")
            elif not (have == c.type.pg or have.startswith(c.type.pg + "(") or
                      (c.type.pg == "text" and have.startswith("character varying"))):  # fmt: skip
                problems.append(f"{spec.name}.{c.name} is {have}, the registry says {c.type.pg}")
    if problems:
        raise SchemaMismatchError("the database does not match the registry: " + "; ".join(problems))


def _stamp_functions(spec: TableSpec, node_id: str) -> str:
    me = ql(node_id)
    fields = [c.name for c in spec.data_columns] if spec.field_wise else []
    ins_stamps = "".join(f"    NEW.{qi(stamp_column(c))} := h;\n" for c in fields)
    upd_stamps = "".join(
        f"    IF NEW.{qi(c)} IS DISTINCT FROM OLD.{qi(c)} THEN NEW.{qi(stamp_column(c))} := h; END IF;\n"
        for c in fields
    )
    key = qi(spec.key)
    return f"""
CREATE OR REPLACE FUNCTION {_fn(spec, 'insert')}() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE h bigint := {NOW_HLC}; dead bigint;
BEGIN
    -- A key written again after a delete: the new version goes above the tombstone (a
    -- clock behind it, or one millisecond, must not order the re-insert before the
    -- delete), and the tombstone goes. One index probe when there is none.
    DELETE FROM {tomb_table(spec)} WHERE {key} = NEW.{key} RETURNING _hlc INTO dead;
    IF dead >= h THEN h := dead + 1; END IF;
    NEW._cursor := pg_current_xact_id();
    NEW._hlc := h;
    NEW._node := {me};
    NEW._base_hlc := h;  -- a new record is its own base: its creator has changed nothing since
    NEW._origin := NULL;
{ins_stamps}    RETURN NEW;
END $fn$;

CREATE OR REPLACE FUNCTION {_fn(spec, 'update')}() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE h bigint := greatest({NOW_HLC}, OLD._hlc + 1);
BEGIN
    NEW._cursor := pg_current_xact_id();
    NEW._hlc := h;
    NEW._node := {me};
    NEW._base_hlc := CASE WHEN OLD._node = {me} THEN OLD._base_hlc ELSE OLD._hlc END;
    NEW._origin := NULL;
{upd_stamps}    RETURN NEW;
END $fn$;

CREATE OR REPLACE FUNCTION {_fn(spec, 'delete')}() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO {tomb_table(spec)} AS t ({key}, _cursor, _hlc, _node, _base_hlc, _origin)
    VALUES (OLD.{key}, pg_current_xact_id(), greatest({NOW_HLC}, OLD._hlc + 1), {me},
            CASE WHEN OLD._node = {me} THEN OLD._base_hlc ELSE OLD._hlc END, NULL)
    ON CONFLICT ({key}) DO UPDATE SET _cursor = EXCLUDED._cursor, _hlc = greatest(EXCLUDED._hlc, t._hlc + 1),
        _node = EXCLUDED._node, _base_hlc = EXCLUDED._base_hlc, _origin = NULL;
    RETURN NULL;
END $fn$;
"""


def install_sql(spec: TableSpec, node_id: str) -> str:
    """Everything install does for one table, as one SQL script."""
    t = qi(spec.name)
    key_type = spec.column(spec.key).type.pg
    stamps = [stamp_column(c.name) for c in spec.data_columns] if spec.field_wise else []
    add = ",\n  ".join(
        [f"ADD COLUMN IF NOT EXISTS {qi(c)} {typ}" for c, typ in
         [("_cursor", "xid8"), ("_hlc", "bigint"), ("_node", "text"), ("_base_hlc", "bigint"),
          ("_origin", "text"), *[(s, "bigint") for s in stamps]]]
    )  # fmt: skip
    backfill_stamps = "".join(f", {qi(s)} = coalesce({qi(s)}, {NOW_HLC})" for s in stamps)
    return f"""
ALTER TABLE {t}
  {add};
-- Rows that existed before install become this node's versions, so they sync.
UPDATE {t} SET _cursor = pg_current_xact_id(), _hlc = {NOW_HLC}, _node = {ql(node_id)}{backfill_stamps}
 WHERE _hlc IS NULL;
ALTER TABLE {t} ALTER COLUMN _cursor SET DEFAULT pg_current_xact_id(),
  ALTER COLUMN _cursor SET NOT NULL, ALTER COLUMN _hlc SET NOT NULL, ALTER COLUMN _node SET NOT NULL;
CREATE INDEX IF NOT EXISTS {qi(spec.name + '__tidesync_cursor')} ON {t} (_cursor);
CREATE TABLE IF NOT EXISTS {tomb_table(spec)} (
    {qi(spec.key)} {key_type} PRIMARY KEY,
    _cursor xid8 NOT NULL DEFAULT pg_current_xact_id(),
    _hlc bigint NOT NULL,
    _node text NOT NULL,
    _base_hlc bigint,
    _origin text
);
CREATE INDEX IF NOT EXISTS {qi(spec.name + '__tombstones_cursor')} ON {tomb_table(spec)} (_cursor);
{_stamp_functions(spec, node_id)}
CREATE OR REPLACE TRIGGER {_trigger('insert')} BEFORE INSERT ON {t}
  FOR EACH ROW WHEN ({NOT_APPLYING}) EXECUTE FUNCTION {_fn(spec, 'insert')}();
CREATE OR REPLACE TRIGGER {_trigger('update')} BEFORE UPDATE ON {t}
  FOR EACH ROW WHEN ({NOT_APPLYING}) EXECUTE FUNCTION {_fn(spec, 'update')}();
CREATE OR REPLACE TRIGGER {_trigger('delete')} AFTER DELETE ON {t}
  FOR EACH ROW WHEN ({NOT_APPLYING}) EXECUTE FUNCTION {_fn(spec, 'delete')}();
"""


def uninstall_sql(spec: TableSpec, columns: dict[str, str]) -> str:
    """Drop what install added to one table (only what is there)."""
    t = qi(spec.name)
    ours = [c for c in columns if c in META_COLUMNS or c.startswith("_hlc_")]
    drops = ",\n  ".join(f"DROP COLUMN IF EXISTS {qi(c)}" for c in ours)
    parts = [f"DROP TRIGGER IF EXISTS {_trigger(op)} ON {t};" for op in ("insert", "update", "delete")]
    if drops:
        parts.append(f"ALTER TABLE {t}\n  {drops};")
    return "\n".join(parts)


def install(conn: Any, registry: Registry, node_id: str) -> None:
    """Install (or refresh) tidesync on the connection's database, in one transaction."""
    if not node_id or len(node_id) > 64:
        raise SchemaMismatchError("a node id must be 1 to 64 characters")
    with transaction(conn) as cur:
        check_tables(cur, registry)
        cur.execute(f"SELECT pg_advisory_xact_lock(hashtext({ql(SCHEMA + '.install')}))")
        execute_script(cur, BOOKKEEPING)
        cur.execute(QUARANTINE_UPGRADE)
        cur.execute(f"SELECT node_id, registry FROM {SCHEMA}.node")
        row = cur.fetchone()
        if row is not None and row[0] != node_id:
            raise SchemaMismatchError(
                f"this database is already node {row[0]!r}; uninstall first to give it another id ({node_id!r})"
            )
        cur.execute(
            f"INSERT INTO {SCHEMA}.node (node_id, registry) VALUES ({ql(node_id)}, {ql(registry.name)}) "
            "ON CONFLICT (singleton) DO UPDATE SET registry = EXCLUDED.registry"
        )
        for spec in registry:
            execute_script(cur, install_sql(spec, node_id))


def uninstall(conn: Any, registry: Registry) -> None:
    """Remove tidesync's columns, triggers and schema; application rows stay as they are."""
    with transaction(conn) as cur:
        for spec in registry:
            cols = _columns_of(cur, spec.name)
            if cols:
                execute_script(cur, uninstall_sql(spec, cols))
        cur.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


def installed_node(cur: Any) -> str | None:
    """This database's node id, or None when tidesync is not installed."""
    cur.execute(f"SELECT to_regclass('{SCHEMA}.node') IS NOT NULL")
    row = cur.fetchone()
    if not row or not row[0]:
        return None
    cur.execute(f"SELECT node_id FROM {SCHEMA}.node")
    row = cur.fetchone()
    return None if row is None else str(row[0])
