"""Sync apply on SQLite: merge incoming change batches and write them in one transaction.

``BEGIN IMMEDIATE`` takes the write lock before anything is read, so the local
versions the merge sees are the ones it overwrites. Then:

1. every table (foreign-key order): its incoming keys go to a temporary table (ADBC
   ingest), the local versions of those keys are read into Arrow (live rows, and
   tombstones of keys with no live row), and :func:`tidesync.changes.plan_apply`
   merges them in Rust;
2. inserts and updates, parents before children: the rows go to a temporary staging
   table in their SQLite storage form; rows whose foreign key names a missing parent
   are quarantined (one anti-join per foreign key); the rest is written with one
   ``INSERT ... SELECT`` and one ``UPDATE ... FROM`` per table, inside a savepoint,
   and if the database rejects a row (NOT NULL, CHECK, UNIQUE) the batch is halved
   until the culprits are isolated (:func:`tidesync.changes.quarantine_bisect`);
3. tombstones, children before parents: a tombstone whose key is still referenced
   by a live child (a foreign key without ON DELETE CASCADE / SET NULL) is
   quarantined; the rest delete their live rows and upsert their tombstones;
4. conflicts and quarantined rows are logged, the cursor is saved, COMMIT.

Foreign keys are on for the store's connection and deferred to COMMIT for the whole
apply (``PRAGMA defer_foreign_keys``). Every written row carries one fresh value of the
change counter as ``_cursor``, which is also what keeps the capture triggers out of
the way (see :mod:`tidesync.sqlite.capture`). A kill at any moment leaves SQLite's
journal to roll the whole apply back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tidesync.changes import (
    NO_OPTIONS,
    ORIGIN,
    ApplyOptions,
    ApplyPlan,
    ApplyResult,
    TableApplyStats,
    conform,
    key_texts,
    plan_apply,
    quarantine_bisect,
    rows_as_json,
)
from tidesync.errors import SchemaMismatchError
from tidesync.registry import BASE_HLC, DELETED, HLC, NODE, Registry, TableSpec
from tidesync.sqlite import names
from tidesync.sqlite.capture import select_columns, to_wire, tombstones_to_wire
from tidesync.sqlite.conn import Connection, IntegrityError, quote
from tidesync.quarantine import ENTRY_COLUMNS, Entry, RetryOutcome, stored_versions
from tidesync.sqlite.install import (
    ForeignKey,
    TableInfo,
    foreign_keys,
    installed_node,
    table_exists,
    upgrade_quarantine,
)
from tidesync.sqlite.types import to_storage

_KEYS, _STAGE, _DEL = "_tidesync_keys", "_tidesync_stage", "_tidesync_del"


@dataclass
class _Quarantined:
    """Rows one apply could not write, gathered for the quarantine (each with its whole
    version: :func:`tidesync.quarantine.stored_versions`)."""

    peer: str | None = None
    options: ApplyOptions = NO_OPTIONS
    table: list[str] = field(default_factory=list)
    key: list[str] = field(default_factory=list)
    hlc: list[int | None] = field(default_factory=list)
    node: list[str | None] = field(default_factory=list)
    row: list[str] = field(default_factory=list)
    reason: list[str] = field(default_factory=list)
    version: list[bytes] = field(default_factory=list)

    def add(self, spec: TableSpec, rows: pa.Table, reasons: list[str], *, tombstone: bool = False) -> None:
        if not rows.num_rows:
            return
        self.table += [spec.name] * rows.num_rows
        self.key += key_texts(spec, rows.column(spec.key))
        self.hlc += rows.column(HLC).to_pylist()
        self.node += rows.column(NODE).to_pylist()
        if tombstone:  # no values: the key and the mark
            self.row += [json.dumps({spec.key: k, DELETED: True}) for k in key_texts(spec, rows.column(spec.key))]
        else:
            self.row += rows_as_json(spec, rows)
        self.reason += reasons
        self.version += stored_versions(spec, rows, self.peer, self.options)


def apply(
    conn: Connection,
    registry: Registry,
    infos: Mapping[str, TableInfo],
    batches: Mapping[str, pa.Table],
    peer: str | None,
    cursor: tuple[str, int] | None,
    options: ApplyOptions = NO_OPTIONS,
) -> ApplyResult:
    # Check everything before writing anything: an unknown table or a wrong schema
    # fails the whole apply.
    specs = registry.ordered(batches.keys())
    incoming = {s.name: conform(batches[s.name], s, "incoming batch") for s in specs}
    if installed_node(conn) is None:
        raise SchemaMismatchError(f"{conn.path} has no tidesync metadata: run `tidesync schema install` first")
    result = ApplyResult({s.name: TableApplyStats() for s in specs})
    with conn.transaction("IMMEDIATE"):
        apply_in_transaction(conn, specs, infos, incoming, peer, options, result)
        if cursor is not None:
            set_cursor(conn, *cursor)
    return result


def apply_in_transaction(
    conn: Connection,
    specs: list[TableSpec],
    infos: Mapping[str, TableInfo],
    incoming: Mapping[str, pa.Table],
    peer: str | None,
    options: ApplyOptions,
    result: ApplyResult,
) -> None:
    """Steps 1-4 of the module's docstring (without the cursor) inside the caller's
    transaction: ``apply``, and a retry of quarantined versions, which settles the
    entries in the same transaction. ``specs`` in foreign-key order, ``incoming``
    conformed, ``result`` with stats for every spec."""
    quarantined = _Quarantined(peer, options)
    conn.execute("PRAGMA defer_foreign_keys = ON")
    conn.execute(f"UPDATE {quote(names.CLOCK)} SET value = value + 1")
    change = int(conn.scalar(f"SELECT value FROM {quote(names.CLOCK)}"))
    plans: dict[str, ApplyPlan] = {}
    for spec in specs:
        batch = incoming[spec.name]
        if batch.num_rows:
            plans[spec.name] = plan_apply(spec, read_local(conn, spec, batch), batch, peer, options)
            stats = result.tables[spec.name]
            stats.unchanged = plans[spec.name].unchanged
            stats.conflicts = plans[spec.name].conflicts.num_rows
    for spec in specs:
        if spec.name in plans:
            _write_upserts(conn, plans[spec.name], infos[spec.name], change, result.tables[spec.name], quarantined)
    children = _referencing(conn) if any(p.deletes.num_rows for p in plans.values()) else {}
    for spec in reversed(specs):
        if spec.name in plans:
            _write_deletes(conn, plans[spec.name], children, change, result.tables[spec.name], quarantined)
    _log_conflicts(conn, [p for p in plans.values() if p.conflicts.num_rows], peer)
    _log_quarantine(conn, quarantined)


def set_cursor(conn: Connection, name: str, value: int) -> None:
    conn.execute(
        f"INSERT INTO {quote(names.CURSORS)} (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        [name, int(value)],
    )


# ----------------------------------------------------------------------------- read


def read_local(conn: Connection, spec: TableSpec, batch: pa.Table) -> pa.Table:
    """Live rows of the incoming keys, plus tombstones of those with no live row."""
    ltype = spec.column(spec.key).type
    keys = to_storage(pc.unique(batch.column(spec.key).combine_chunks()), ltype)
    conn.ingest(_KEYS, pa.table({"k": keys}))
    t, k = quote(spec.name), quote(spec.key)
    cols = ", ".join(f"t.{quote(c)}" for c in select_columns(spec))
    live = conn.arrow(f"SELECT {cols} FROM temp.{_KEYS} AS x JOIN main.{t} AS t ON t.{k} = x.k")
    meta = ", ".join(f"d.{quote(c)}" for c in (spec.key, HLC, NODE, BASE_HLC))
    dead = conn.arrow(
        f"SELECT {meta} FROM temp.{_KEYS} AS x JOIN main.{quote(names.tombstones(spec.name))} AS d ON d.{k} = x.k "
        f"WHERE NOT EXISTS (SELECT 1 FROM main.{t} AS t WHERE t.{k} = x.k)"
    )
    local = to_wire(spec, live)
    if dead.num_rows:
        local = pa.concat_tables([local, tombstones_to_wire(spec, dead)])
    return local


# ----------------------------------------------------------------------------- write


def _stage(spec: TableSpec, rows: pa.Table, extra: dict[str, pa.Array]) -> pa.Table:
    """Rows in their SQLite storage form, numbered by ``_i``, for a temporary table."""
    cols: dict[str, pa.Array] = {"_i": pa.array(np.arange(rows.num_rows, dtype=np.int64)), **extra}
    for name in rows.column_names:
        col = rows.column(name)
        if name in (HLC, NODE, BASE_HLC, ORIGIN) or name.startswith("_hlc_"):
            cols[name] = col.combine_chunks()
        else:
            cols[name] = to_storage(col, spec.column(name).type)
    return pa.table(cols)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for prefix in ("INTEGRITY: ", "[SQLite] "):
        text = text.removeprefix(prefix)
    return text


def _write_upserts(
    conn: Connection, plan: ApplyPlan, info: TableInfo, change: int, stats: TableApplyStats, q: _Quarantined
) -> None:
    spec = plan.spec
    n_ins = plan.inserts.num_rows
    rows = pa.concat_tables([plan.inserts, plan.updates])
    if not rows.num_rows:
        return
    is_insert = pa.array(np.arange(rows.num_rows) < n_ins)
    conn.ingest(_STAGE, _stage(spec, rows, {"_ins": is_insert.cast(pa.int64())}))
    t, k = quote(spec.name), quote(spec.key)

    bad: dict[int, str] = {}
    for fk in info.foreign_keys:
        for i, reason in _missing_parents(conn, spec, fk):
            bad.setdefault(i, reason)
    keep = np.ones(rows.num_rows, dtype=bool)
    if bad:
        keep[list(bad)] = False
        _drop_staged(conn, _STAGE, list(bad))

    cols = list(rows.column_names)
    col_list = ", ".join(quote(c) for c in cols)
    insert = (
        f"INSERT INTO main.{t} ({col_list}, _cursor) SELECT {col_list}, {change} "
        f"FROM temp.{_STAGE} WHERE _ins = 1 AND _i BETWEEN ? AND ?"
    )
    sets = ", ".join(f"{quote(c)} = s.{quote(c)}" for c in cols if c != spec.key)
    update = (
        f"UPDATE main.{t} AS t SET {sets}, _cursor = {change} FROM temp.{_STAGE} AS s "
        f"WHERE s._ins = 0 AND s._i BETWEEN ? AND ? AND t.{k} = s.{k}"
    )
    numbered = pa.table({"_i": pa.array(np.arange(rows.num_rows, dtype=np.int64))}).filter(pa.array(keep))

    def attempt(part: pa.Table) -> str | None:
        lo, hi = int(part.column("_i")[0].as_py()), int(part.column("_i")[-1].as_py())
        try:
            with conn.savepoint("tidesync_rows"):
                if n_ins:
                    conn.execute(insert, [lo, hi])
                if rows.num_rows > n_ins:
                    conn.execute(update, [lo, hi])
        except IntegrityError as exc:
            return _reason(exc)
        return None

    for pos, reason in quarantine_bisect(numbered, attempt):
        i = int(numbered.column("_i")[pos].as_py())
        bad[i] = reason
        keep[i] = False
    if bad:
        _drop_staged(conn, _STAGE, list(bad))
        order = sorted(bad)
        q.add(spec, rows.take(pa.array(order)), [bad[i] for i in order])
    # Keys written live again lose their tombstone (resurrection).
    if len(plan.revived):
        conn.execute(
            f"DELETE FROM main.{quote(names.tombstones(spec.name))} WHERE {k} IN "
            f"(SELECT {k} FROM temp.{_STAGE} WHERE _ins = 1)"
        )
    stats.inserted = int(keep[:n_ins].sum())
    stats.updated = int(keep[n_ins:].sum())
    stats.quarantined += len(bad)


def _drop_staged(conn: Connection, table: str, indexes: list[int]) -> None:
    conn.executemany(f"DELETE FROM temp.{table} WHERE _i = ?", pa.table({"i": pa.array(indexes, pa.int64())}))


def _missing_parents(conn: Connection, spec: TableSpec, fk: ForeignKey) -> list[tuple[int, str]]:
    """Staged rows whose foreign key names a parent row that does not exist."""
    t, k = quote(spec.name), quote(spec.key)
    present = " AND ".join(f"s.{quote(c)} IS NOT NULL" for c in fk.columns)
    match = " AND ".join(f"p.{quote(pc_)} = s.{quote(c)}" for c, pc_ in zip(fk.columns, fk.parent_columns, strict=True))
    same = " AND ".join(f"cur.{quote(c)} IS s.{quote(c)}" for c in fk.columns)
    sql = (
        f"SELECT s._i, {', '.join(f's.{quote(c)}' for c in fk.columns)} FROM temp.{_STAGE} AS s "
        f"WHERE {present} AND NOT EXISTS (SELECT 1 FROM main.{quote(fk.parent)} AS p WHERE {match}) "
        # An update that leaves the foreign key as it was is not checked (as in PostgreSQL).
        f"AND (s._ins = 1 OR NOT EXISTS (SELECT 1 FROM main.{t} AS cur WHERE cur.{k} = s.{k} AND {same}))"
    )
    if fk.parent == spec.name:  # a tree: the parent may arrive in the same batch
        match_s = match.replace("p.", "s2.")
        sql += f" AND NOT EXISTS (SELECT 1 FROM temp.{_STAGE} AS s2 WHERE {match_s})"
    if not table_exists(conn, fk.parent):
        sql = f"SELECT s._i, {', '.join(f's.{quote(c)}' for c in fk.columns)} FROM temp.{_STAGE} AS s WHERE {present}"
    out = []
    for row in conn.rows(sql):
        values = ", ".join(f"{c} = {v!r}" for c, v in zip(fk.columns, row[1:], strict=True))
        out.append(
            (int(row[0]), f"FOREIGN KEY constraint failed: {values} has no row in {fk.parent}"
             f"({', '.join(fk.parent_columns)})")
        )  # fmt: skip
    return out


def _referencing(conn: Connection) -> dict[str, list[tuple[str, ForeignKey]]]:
    """For each table, the (child table, foreign key) pairs that block deleting its rows."""
    out: dict[str, list[tuple[str, ForeignKey]]] = {}
    for (name,) in conn.rows(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
        "AND name NOT LIKE '\\_tidesync\\_%' ESCAPE '\\'"
    ):
        for fk in foreign_keys(conn, str(name)):
            if fk.on_delete in ("NO ACTION", "RESTRICT"):
                out.setdefault(fk.parent, []).append((str(name), fk))
    return out


def _write_deletes(
    conn: Connection,
    plan: ApplyPlan,
    children: Mapping[str, list[tuple[str, ForeignKey]]],
    change: int,
    stats: TableApplyStats,
    q: _Quarantined,
) -> None:
    spec = plan.spec
    dels = plan.deletes
    if not dels.num_rows:
        return
    conn.ingest(_DEL, _stage(spec, dels, {}))
    t, k = quote(spec.name), quote(spec.key)
    bad: dict[int, str] = {}
    for child, fk in children.get(spec.name, []):
        if fk.parent_columns != (spec.key,):
            continue  # referencing another column: left to the database to judge
        c = quote(fk.columns[0])
        cond = f"ch.{c} = d.{k}"
        if child == spec.name:  # rows of a tree deleted together do not block each other
            cond += f" AND ch.{k} NOT IN (SELECT {k} FROM temp.{_DEL})"
        for (i,) in conn.rows(
            f"SELECT d._i FROM temp.{_DEL} AS d WHERE EXISTS (SELECT 1 FROM main.{quote(child)} AS ch WHERE {cond})"
        ):
            bad.setdefault(int(i), f"FOREIGN KEY constraint failed: still referenced by {child}.{fk.columns[0]}")
    if bad:
        _drop_staged(conn, _DEL, list(bad))
    numbered = pa.table({"_i": pa.array(np.arange(dels.num_rows, dtype=np.int64))})
    if bad:
        numbered = numbered.filter(pc.invert(pc.is_in(numbered.column("_i"), value_set=pa.array(list(bad)))))
    tomb = quote(names.tombstones(spec.name))
    delete = f"DELETE FROM main.{t} WHERE {k} IN (SELECT {k} FROM temp.{_DEL} WHERE _i BETWEEN ? AND ?)"
    # The delete trigger wrote a local tombstone; the incoming one replaces it.
    upsert = (
        f"INSERT INTO main.{tomb} ({k}, _cursor, _hlc, _node, _base_hlc, _origin) "
        f"SELECT {k}, {change}, _hlc, _node, _base_hlc, _origin FROM temp.{_DEL} WHERE _i BETWEEN ? AND ? "
        f"ON CONFLICT ({k}) DO UPDATE SET _cursor = excluded._cursor, _hlc = excluded._hlc, "
        "_node = excluded._node, _base_hlc = excluded._base_hlc, _origin = excluded._origin"
    )

    def attempt(part: pa.Table) -> str | None:
        lo, hi = int(part.column("_i")[0].as_py()), int(part.column("_i")[-1].as_py())
        try:
            with conn.savepoint("tidesync_rows"):
                conn.execute(delete, [lo, hi])
                conn.execute(upsert, [lo, hi])
        except IntegrityError as exc:
            return _reason(exc)
        return None

    for pos, reason in quarantine_bisect(numbered, attempt):
        bad[int(numbered.column("_i")[pos].as_py())] = reason
    if bad:
        order = sorted(bad)
        q.add(spec, dels.take(pa.array(order)), [bad[i] for i in order], tombstone=True)
    stats.deleted = dels.num_rows - len(bad)
    stats.quarantined += len(bad)


# ----------------------------------------------------------------------------- logs


def _log_conflicts(conn: Connection, plans: list[ApplyPlan], peer: str | None) -> None:
    for plan in plans:
        spec, c = plan.spec, plan.conflicts
        lost = [json.dumps(v or []) for v in c.column("_lost_columns").to_pylist()]
        rows = pa.table(
            {
                "table_name": pa.array([spec.name] * c.num_rows, pa.string()),
                "key": pa.array(key_texts(spec, c.column(spec.key)), pa.string()),
                "loser_hlc": c.column(HLC).combine_chunks(),
                "loser_node": c.column(NODE).combine_chunks(),
                "winner_hlc": c.column("_winner_hlc").combine_chunks(),
                "winner_node": c.column("_winner_node").combine_chunks(),
                "lost_columns": pa.array(lost, pa.string()),
                "loser_row": pa.array(rows_as_json(spec, c), pa.string()),
                "peer": pa.array([peer] * c.num_rows, pa.string()),
            }
        )
        conn.executemany(
            f"INSERT INTO {quote(names.CONFLICTS)} (table_name, key, loser_hlc, loser_node, winner_hlc, "
            "winner_node, lost_columns, loser_row, peer) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


def _log_quarantine(conn: Connection, q: _Quarantined) -> None:
    if not q.table:
        return
    upgrade_quarantine(conn)  # a device installed by an older version gets the columns now
    rows = pa.table(
        {
            "table_name": pa.array(q.table, pa.string()),
            "key": pa.array(q.key, pa.string()),
            "hlc": pa.array(q.hlc, pa.int64()),
            "node": pa.array(q.node, pa.string()),
            "row_data": pa.array(q.row, pa.string()),
            "reason": pa.array(q.reason, pa.string()),
            "peer": pa.array([q.peer] * len(q.table), pa.string()),
            "version": pa.array(q.version, pa.binary()),
        }
    )
    conn.executemany(
        f"INSERT INTO {quote(names.QUARANTINE)} (table_name, key, hlc, node, row_data, reason, peer, version) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )



# ----------------------------------------------------------------------------- quarantine retry


@contextlib.contextmanager
def quarantine_transaction(conn: Connection, infos: Mapping[str, TableInfo]) -> Iterator[SQLiteQuarantineTxn]:
    """One write transaction for a retry or discard of quarantine entries (see
    :func:`tidesync.quarantine.retry_in`); ``BEGIN IMMEDIATE`` makes it the only writer."""
    if installed_node(conn) is None:
        raise SchemaMismatchError(f"{conn.path} has no tidesync metadata: run `tidesync schema install` first")
    with conn.transaction("IMMEDIATE"):
        upgrade_quarantine(conn)
        yield SQLiteQuarantineTxn(conn, infos)


_NOW = "strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'"  # as recorded_at's default writes it


def _marks(n: int) -> str:
    return ", ".join("?" * n)


class SQLiteQuarantineTxn:
    """The statements of :class:`tidesync.quarantine.QuarantineTxn` on SQLite. Being the
    only writer, everything above the id marks was logged by this transaction."""

    def __init__(self, conn: Connection, infos: Mapping[str, TableInfo]) -> None:
        self.conn, self.infos = conn, infos

    def entries(self, ids: Sequence[int] | None, table: str | None) -> list[Entry]:
        if ids is not None and not ids:
            return []
        conds = ["status = 'held'"] if ids is None else [f"id IN ({_marks(len(ids))})"]
        params: list[object] = [] if ids is None else list(ids)
        if table is not None:
            conds.append("table_name = ?")
            params.append(table)
        return self._entries(" AND ".join(conds), params)

    def _entries(self, where: str, params: list[object]) -> list[Entry]:
        rows = self.conn.rows(f"SELECT {', '.join(ENTRY_COLUMNS)} FROM {quote(names.QUARANTINE)} WHERE {where} "
                              "ORDER BY id", params)  # fmt: skip
        return [Entry.from_row(r) for r in rows]

    def marks(self) -> tuple[int, int]:
        q = self.conn.scalar(f"SELECT coalesce(max(id), 0) FROM {quote(names.QUARANTINE)}")
        c = self.conn.scalar(f"SELECT coalesce(max(id), 0) FROM {quote(names.CONFLICTS)}")
        return int(q), int(c)

    def apply(self, spec: TableSpec, batch: pa.Table, peer: str | None, options: ApplyOptions) -> None:
        result = ApplyResult({spec.name: TableApplyStats()})
        incoming = {spec.name: conform(batch, spec, "quarantined version")}
        apply_in_transaction(self.conn, [spec], self.infos, incoming, peer, options, result)

    def current(self, spec: TableSpec, keys: pa.Array) -> pa.Table:
        return read_local(self.conn, spec, pa.table({spec.key: keys}))

    def added_since(self, marks: tuple[int, int]) -> tuple[list[Entry], list[tuple[int, str, str]]]:
        added = self._entries("id > ?", [marks[0]])
        rows = self.conn.rows(f"SELECT id, table_name, key FROM {quote(names.CONFLICTS)} WHERE id > ?", [marks[1]])
        return added, [(int(i), str(t), str(k)) for i, t, k in rows]

    def remove(self, entry_ids: Sequence[int], conflict_ids: Sequence[int]) -> None:
        for log, ids in ((names.QUARANTINE, entry_ids), (names.CONFLICTS, conflict_ids)):
            if ids:
                self.conn.execute(f"DELETE FROM {quote(log)} WHERE id IN ({_marks(len(ids))})", list(ids))

    def settle(self, outcomes: Sequence[RetryOutcome]) -> None:
        rows = pa.table(
            {
                "status": pa.array(["retried" if o.applied else "held" for o in outcomes], pa.string()),
                "applied": pa.array([int(o.applied) for o in outcomes], pa.int64()),
                "note": pa.array([o.note for o in outcomes], pa.string()),
                "reason": pa.array([o.reason for o in outcomes], pa.string()),
                "attempts": pa.array([o.attempts for o in outcomes], pa.int64()),
                "id": pa.array([o.id for o in outcomes], pa.int64()),
            }
        )
        self.conn.executemany(
            f"UPDATE {quote(names.QUARANTINE)} SET status = ?, resolved_at = CASE WHEN ? THEN {_NOW} END, "
            "note = ?, reason = ?, attempts = ? WHERE id = ?",
            rows,
        )

    def discard(self, ids: Sequence[int], note: str) -> None:
        if ids:
            self.conn.execute(f"UPDATE {quote(names.QUARANTINE)} SET status = 'discarded', resolved_at = {_NOW}, "
                              f"note = ? WHERE id IN ({_marks(len(ids))}) AND status = 'held'",
                              [note, *ids])  # fmt: skip
