"""Applying incoming change batches to PostgreSQL: merge in Rust, write set-based, atomically.

One transaction for everything: for each table in foreign-key order, the incoming
keys are copied into a temporary table, the local versions of those keys are read
(and locked) as Arrow, the Rust core merges them, and the result is written with
binary ``COPY`` and a handful of set-based statements — never a statement per row.
Conflicts go to ``tidesync.conflicts``; a row the database rejects (a constraint,
a bad value) goes to ``tidesync.quarantine`` with the error, found by halving the
batch inside savepoints, and the rest applies. The cursor advance commits with the
rows, so a crash anywhere leaves all or nothing.

While applying, the capture triggers stand aside (``tidesync.applying``): incoming
versions keep their stamps, and ``_origin`` remembers the peer they came from.

:func:`apply_parts` takes the batches as a stream of parts (the pages of a pull) and
holds one at a time. A table that is empty when its first large part arrives is loaded
in bulk (:mod:`tidesync.pg.bulk_load`). An error that says nothing about the rows (a
cancelled statement, a deadlock, a lost connection) fails the apply; it never
quarantines.

A quarantined row keeps its whole version; :func:`quarantine_transaction` runs the
same applier again for ``tidesync quarantine retry`` (see :mod:`tidesync.quarantine`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
    new_rows,
    plan_apply,
    quarantine_bisect,
    rows_as_json,
)
from tidesync.errors import SchemaMismatchError, SyncError
from tidesync.pg import bulk_load
from tidesync.pg.capture import wire_columns
from tidesync.pg.conn import ingest, transaction
from tidesync.pg.install import APPLYING_GUC, SCHEMA, qi, ql, tomb_table, upgrade_quarantine
from tidesync.quarantine import ENTRY_COLUMNS, Entry, RetryOutcome, stored_versions
from tidesync.registry import BASE_HLC, DELETED, HLC, NODE, Registry, TableSpec, stamp_column

KEYS = "_tidesync_keys"
#: Above this many incoming keys, apply locks the table against writers instead of rows.
ROW_LOCK_LIMIT = 50_000
#: A table's first part of at least this many rows checks whether the table is empty,
#: and if so loads it in bulk (:mod:`tidesync.pg.bulk_load`).
LOAD_MIN_ROWS = 10_000
STAGE = "_tidesync_stage"
#: Memory per hash/sort step of the apply transaction. The joins of a bulk apply (the
#: staged keys against the table, the staged updates against the table) hash up to a
#: million rows; with the server default (4MB) they spill to temporary files in 8-32
#: batches. Allocated only as used, and only inside the apply transaction (SET LOCAL).
WORK_MEM = "256MB"


def apply_changes(
    conn: Any,
    registry: Registry,
    batches: Mapping[str, Any],
    *,
    peer: str | None,
    cursor: tuple[str, int] | None = None,
    options: ApplyOptions = NO_OPTIONS,
) -> ApplyResult:
    """Merge and write ``batches`` (table name -> Arrow data) in one transaction."""
    unknown = [n for n in batches if n not in registry]
    if unknown:
        raise SchemaMismatchError(
            f"unknown tables {unknown}: the registry {registry.name!r} syncs {', '.join(registry.names)}"
        )
    # Validate every batch before writing anything: a wrong schema applies nothing.
    incoming = {name: conform(batch, registry[name], "incoming batch") for name, batch in batches.items()}
    parts = ((spec.name, incoming[spec.name]) for spec in registry.ordered(incoming))
    return apply_parts(conn, registry, parts, peer=peer, cursor=cursor, options=options)


def apply_parts(
    conn: Any,
    registry: Registry,
    parts: Iterable[tuple[str, Any]],
    *,
    peer: str | None,
    cursor: tuple[str, int] | None = None,
    options: ApplyOptions = NO_OPTIONS,
) -> ApplyResult:
    """Merge and write a stream of ``(table name, batch)`` parts in one transaction.

    Only one part is held at a time, so memory stays flat however large the stream
    (the pages of a first sync). Parts come in foreign-key order (a parent's before its
    children's), as a pull's pages do; the parts of one table follow each other.
    """
    result = ApplyResult()
    with transaction(conn) as cur:
        _apply_settings(cur)
        applier = _Applier(cur, peer, options, result)
        for name, batch in parts:
            spec = registry[name]  # an unknown table raises SchemaMismatchError, and nothing commits
            applier.part(spec, conform(batch, spec, "incoming batch"))
        applier.finish()
        if cursor is not None:
            _save_cursor(cur, *cursor)
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
    return result


def _apply_settings(cur: Any) -> None:
    """What every apply transaction sets first (all undone when it ends)."""
    cur.execute(f"SET LOCAL {APPLYING_GUC} = 'on'")
    cur.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")
    cur.execute(f"SET LOCAL maintenance_work_mem = '{WORK_MEM}'")  # index builds of a bulk load
    cur.execute("SET CONSTRAINTS ALL DEFERRED")


def _save_cursor(cur: Any, name: str, value: int) -> None:
    cur.execute(
        f"INSERT INTO {SCHEMA}.cursors (name, value) VALUES ({ql(name)}, {int(value)}) "
        "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()"
    )


@dataclass
class _Load:
    """A table being bulk-loaded (it was empty when its first large part came)."""

    spec: TableSpec
    aside: bulk_load.SetAside
    #: While true, a part of live rows goes straight in with COPY: nothing local can
    #: match it (the parts of a pull carry each key once). Any tombstone, or a part
    #: that does not go in cleanly, ends that and the rest merges as usual.
    straight: bool = True


class _Applier:
    """Applies parts one by one inside the open transaction."""

    def __init__(self, cur: Any, peer: str | None, options: ApplyOptions, result: ApplyResult) -> None:
        self.cur, self.peer, self.options, self.result = cur, peer, options, result
        self.seen: set[str] = set()
        self.load: _Load | None = None
        #: Deletions that still had children: a parent's tombstone arrives before its
        #: children's (parts come parents first). They are tried again at the end,
        #: children first, and only then quarantined if still refused.
        self.deletes: list[tuple[TableSpec, pa.Table]] = []

    def part(self, spec: TableSpec, incoming: pa.Table) -> None:
        if self.load is not None and self.load.spec.name != spec.name:
            self._end_load()
        stats = self.result.tables.setdefault(spec.name, TableApplyStats())
        if incoming.num_rows == 0:
            return
        cur = self.cur
        incoming, bad = _reject_unusable(spec, incoming)
        if bad.num_rows:
            _quarantine(cur, spec, bad, [("a version needs a key, _hlc and _node", i) for i in range(bad.num_rows)],
                        self.peer, self.options)  # fmt: skip
            stats.quarantined += bad.num_rows
        if spec.name not in self.seen:
            self.seen.add(spec.name)
            if incoming.num_rows >= LOAD_MIN_ROWS and _lock_and_check_empty(cur, spec):
                aside = bulk_load.set_aside(cur, spec.name)
                self.load = _Load(spec, aside) if aside is not None else None
        if self.load is not None and self.load.straight:
            if not pc.any(incoming.column(DELETED)).as_py() and self._straight_in(spec, incoming, stats):
                return
            self.load.straight = False
        self._merge(spec, incoming, stats)

    def finish(self) -> None:
        if self.load is not None:
            self._end_load()
        for spec, rows in reversed(self.deletes):
            stats = self.result.tables[spec.name]
            stats.deleted += _write(self.cur, spec, rows, self.peer, self.options, stats, _delete_rows)
        self.deletes.clear()

    def _straight_in(self, spec: TableSpec, incoming: pa.Table, stats: TableApplyStats) -> bool:
        """COPY a part of a bulk load, sorted by key (the primary key index then grows at
        its right edge); False, with nothing written, if the database refuses any row
        (a bad value, or a key twice: then merging sorts it out)."""
        rows = new_rows(spec, incoming, self.peer, self.options)
        rows = rows.take(pc.sort_indices(rows.column(spec.key)))
        self.cur.execute("SAVEPOINT tidesync_load")
        try:
            _insert_rows(self.cur, spec, rows)
        except Exception as exc:  # noqa: BLE001 - a bad row: this part merges the slow way
            if not _blames_the_rows(exc):
                raise
            self.cur.execute("ROLLBACK TO SAVEPOINT tidesync_load")
            return False
        self.cur.execute("RELEASE SAVEPOINT tidesync_load")
        stats.inserted += rows.num_rows
        return True

    def _merge(self, spec: TableSpec, incoming: pa.Table, stats: TableApplyStats) -> None:
        cur, peer, options = self.cur, self.peer, self.options
        local = read_local(cur, spec, incoming.column(spec.key))
        plan = plan_apply(spec, local, incoming, peer, options)
        stats.unchanged += plan.unchanged
        stats.inserted += _write(cur, spec, plan.inserts, peer, options, stats, _insert_rows)
        stats.updated += _write(cur, spec, plan.updates, peer, options, stats, _update_rows)
        held: list[pa.Table] = []
        stats.deleted += _write(cur, spec, plan.deletes, peer, options, stats, _delete_rows, held=held)
        self.deletes += [(spec, rows) for rows in held]
        if len(plan.revived):
            _stage(cur, spec, pa.table({spec.key: plan.revived}), key_only=True)
            cur.execute(f"DELETE FROM {tomb_table(spec)} t USING {KEYS} k WHERE t.{qi(spec.key)} = k.{qi(spec.key)}")
        stats.conflicts += _log_conflicts(cur, spec, plan, peer)

    def _end_load(self) -> None:
        """Indexes built, foreign keys back; rows without a parent go to the quarantine."""
        assert self.load is not None
        load, self.load = self.load, None
        spec, stats = load.spec, self.result.tables[load.spec.name]
        for orphans, reason in bulk_load.restore(self.cur, load.aside, wire_columns(spec, "t", tombstone=False)):
            rows = conform(orphans, spec, "orphan rows")
            _quarantine(self.cur, spec, rows, [(reason, i) for i in range(rows.num_rows)], self.peer, self.options)
            stats.quarantined += rows.num_rows
            stats.inserted -= rows.num_rows


def _reject_unusable(spec: TableSpec, incoming: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Split off versions merge cannot take at all (no key or no stamp): they are quarantined."""
    bad = pc.or_(
        pc.or_(pc.is_null(incoming.column(spec.key)), pc.is_null(incoming.column(HLC))),
        pc.or_(pc.is_null(incoming.column(NODE)), pc.is_null(incoming.column(DELETED))),
    )
    if not pc.any(bad).as_py():
        return incoming, incoming.slice(0, 0)
    return incoming.filter(pc.invert(bad)), incoming.filter(bad)


# ----------------------------------------------------------------------------- reading


def _stage(cur: Any, spec: TableSpec, table: pa.Table, *, key_only: bool = False) -> None:
    """COPY ``table`` into a fresh temporary table typed like the target (dropped at commit)."""
    name = KEYS if key_only else STAGE
    cur.execute(f"DROP TABLE IF EXISTS {name}")
    if key_only:
        cur.execute(f"CREATE TEMP TABLE {name} ({qi(spec.key)} {spec.column(spec.key).type.pg}) ON COMMIT DROP")
    else:
        cols = ", ".join(qi(c) for c in table.column_names if c != ORIGIN)
        cur.execute(
            f"CREATE TEMP TABLE {name} ON COMMIT DROP AS SELECT {cols}, ''::text AS _origin "
            f"FROM {qi(spec.name)} WITH NO DATA"
        )
    if table.num_rows:
        ingest(cur, name, table, temporary=True)
        cur.execute(f"ANALYZE {name}")  # temp tables have no statistics; the joins need them


def _lock_and_check_empty(cur: Any, spec: TableSpec) -> bool:
    """Lock the table against writers for a bulk apply; True when it has no rows and no
    tombstones (seeding, a first sync): then there is nothing to read or merge."""
    cur.execute(f"LOCK TABLE {qi(spec.name)} IN SHARE ROW EXCLUSIVE MODE")
    cur.execute(f"SELECT EXISTS (SELECT 1 FROM {qi(spec.name)}) OR EXISTS (SELECT 1 FROM {tomb_table(spec)})")
    return not cur.fetchone()[0]


def read_local(cur: Any, spec: TableSpec, keys: pa.ChunkedArray, *, lock: bool = True) -> pa.Table:
    """The local versions of ``keys`` in the wire schema: live rows (locked, unless
    ``lock`` is false), else tombstones."""
    k = qi(spec.key)
    _stage(cur, spec, pa.table({spec.key: pc.unique(keys.combine_chunks())}), key_only=True)
    # What we merge against must be what we overwrite: an application write to one of
    # these rows has to wait for this transaction. Small batches lock just their rows;
    # a bulk apply locks the table against writers (readers go on), which is far cheaper
    # than marking a million rows locked one by one.
    row_lock = "" if len(keys) > ROW_LOCK_LIMIT or not lock else " FOR UPDATE OF t"
    # A semi-join, not a join: PostgreSQL then hashes the staged keys (16 bytes each)
    # and scans the table, instead of hashing the table's wide rows (1.2 s of a 2.1 s
    # read of 500k of 1M rows, measured on the demo `patients`).
    cur.execute(
        f"SELECT {wire_columns(spec, 't', tombstone=False)} "
        f"FROM {qi(spec.name)} t WHERE t.{k} IN (SELECT k.{k} FROM {KEYS} k){row_lock}"
    )
    live = conform(cur.fetch_arrow_table(), spec, "local rows")
    cur.execute(
        f"SELECT {wire_columns(spec, 't', tombstone=True)} "
        f"FROM {tomb_table(spec)} t JOIN {KEYS} k ON t.{k} = k.{k} "
        f"WHERE NOT EXISTS (SELECT 1 FROM {qi(spec.name)} l WHERE l.{k} = t.{k})"
    )
    dead = conform(cur.fetch_arrow_table(), spec, "local tombstones")
    return pa.concat_tables([live, dead]) if dead.num_rows else live


# ----------------------------------------------------------------------------- writing


def _write(
    cur: Any, spec: TableSpec, rows: pa.Table, peer: str | None, options: ApplyOptions, stats: TableApplyStats, op: Any,
    *, held: list[pa.Table] | None = None,
) -> int:
    """Run ``op`` on ``rows``; rows the database rejects go to the quarantine. Returns rows written.

    With ``held``, rows refused only because other rows still reference them (a
    foreign key, SQLSTATE 23503) are appended there instead, to be tried again later.
    """
    if rows.num_rows == 0:
        return 0
    states: dict[str, str] = {}

    def attempt(batch: pa.Table) -> str | None:
        cur.execute("SAVEPOINT tidesync_write")
        try:
            op(cur, spec, batch)
            # Deferred constraints (foreign keys) are checked here, so a bad row is
            # caught while we can still tell which batch it was in.
            cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
            cur.execute("SET CONSTRAINTS ALL DEFERRED")
        except Exception as exc:  # noqa: BLE001 - a database error about the rows quarantines them
            if not _blames_the_rows(exc):
                raise
            cur.execute("ROLLBACK TO SAVEPOINT tidesync_write")
            text = _error_text(exc)
            states[text] = getattr(exc, "sqlstate", None) or ""
            return text
        cur.execute("RELEASE SAVEPOINT tidesync_write")
        return None

    bad = quarantine_bisect(rows, attempt)
    waiting = [i for i, reason in bad if states.get(reason) == "23503"] if held is not None else []
    if waiting:
        assert held is not None
        held.append(rows.take(pa.array(waiting, pa.int64())))
        bad = [(i, reason) for i, reason in bad if states.get(reason) != "23503"]
    if bad:
        idx = pa.array([i for i, _ in bad], pa.int64())
        _quarantine(cur, spec, rows.take(idx), [(reason, i) for i, (_, reason) in enumerate(bad)], peer, options)
        stats.quarantined += len(bad)
    return int(rows.num_rows) - len(bad) - len(waiting)


#: SQLSTATE classes that say nothing about the rows: a cancelled statement (Ctrl-C, a
#: statement timeout, an administrator), a deadlock or serialization failure, a lost
#: connection, a full disk, a server shutting down. Bisecting would "quarantine" good
#: rows; the whole apply must fail instead, so the caller can retry it later.
_NOT_THE_ROWS = ("08", "25", "40", "53", "54", "55", "57", "58", "XX")


def _blames_the_rows(exc: Exception) -> bool:
    state = getattr(exc, "sqlstate", None) or ""
    if isinstance(exc.__cause__, KeyboardInterrupt) or isinstance(exc.__context__, KeyboardInterrupt):
        return False
    return not state.startswith(_NOT_THE_ROWS)


def _error_text(exc: Exception) -> str:
    text = str(exc).strip()
    for prefix in ("INTERNAL: ", "IO: ", "INVALID_ARGUMENT: "):
        text = text.removeprefix(prefix)
    return text.splitlines()[0] if text else type(exc).__name__


def _data_names(spec: TableSpec) -> list[str]:
    stamps = [stamp_column(c.name) for c in spec.data_columns] if spec.field_wise else []
    return [*[c.name for c in spec.data_columns], HLC, NODE, BASE_HLC, *stamps, ORIGIN]


def _insert_rows(cur: Any, spec: TableSpec, rows: pa.Table) -> None:
    # Straight into the table with binary COPY; `_cursor` takes its default, this
    # transaction's id, and the capture triggers stand aside while applying.
    ingest(cur, spec.name, rows)


def _update_rows(cur: Any, spec: TableSpec, rows: pa.Table) -> None:
    _stage(cur, spec, rows)
    k = qi(spec.key)
    sets = ", ".join(f"{qi(c)} = s.{qi(c)}" for c in _data_names(spec))
    cur.execute(
        f"UPDATE {qi(spec.name)} t SET {sets}, _cursor = pg_current_xact_id() FROM {STAGE} s WHERE t.{k} = s.{k}"
    )


def _delete_rows(cur: Any, spec: TableSpec, rows: pa.Table) -> None:
    k = qi(spec.key)
    cur.execute(f"DROP TABLE IF EXISTS {STAGE}")
    cur.execute(
        f"CREATE TEMP TABLE {STAGE} ON COMMIT DROP AS SELECT {k}, _hlc, _node, _base_hlc, _origin "
        f"FROM {tomb_table(spec)} WITH NO DATA"
    )
    ingest(cur, STAGE, rows, temporary=True)
    cur.execute(f"DELETE FROM {qi(spec.name)} t USING {STAGE} s WHERE t.{k} = s.{k}")
    cur.execute(
        f"INSERT INTO {tomb_table(spec)} AS t ({k}, _hlc, _node, _base_hlc, _origin) "
        f"SELECT {k}, _hlc, _node, _base_hlc, _origin FROM {STAGE} "
        f"ON CONFLICT ({k}) DO UPDATE SET _cursor = pg_current_xact_id(), _hlc = EXCLUDED._hlc, "
        "_node = EXCLUDED._node, _base_hlc = EXCLUDED._base_hlc, _origin = EXCLUDED._origin"
    )


# ----------------------------------------------------------------------------- logs


def _log_conflicts(cur: Any, spec: TableSpec, plan: ApplyPlan, peer: str | None) -> int:
    c = plan.conflicts
    if c.num_rows == 0:
        return 0
    table = pa.table(
        {
            "key": pa.array(key_texts(spec, c.column(spec.key)), pa.string()),
            "loser_hlc": c.column(HLC),
            "loser_node": c.column(NODE),
            "winner_hlc": c.column("_winner_hlc"),
            "winner_node": c.column("_winner_node"),
            "lost": pa.array([json.dumps(v) for v in c.column("_lost_columns").to_pylist()], pa.string()),
            "row_data": pa.array(rows_as_json(spec, c), pa.string()),
        }
    )
    cur.execute("DROP TABLE IF EXISTS _tidesync_conflicts")
    cur.execute(
        "CREATE TEMP TABLE _tidesync_conflicts (key text, loser_hlc bigint, loser_node text, winner_hlc bigint, "
        "winner_node text, lost text, row_data text) ON COMMIT DROP"
    )
    ingest(cur, "_tidesync_conflicts", table, temporary=True)
    cur.execute(
        f"INSERT INTO {SCHEMA}.conflicts (table_name, key, loser_hlc, loser_node, winner_hlc, winner_node, "
        "lost_columns, loser_row, peer) "
        f"SELECT {ql(spec.name)}, key, loser_hlc, loser_node, winner_hlc, winner_node, "
        "ARRAY(SELECT jsonb_array_elements_text(lost::jsonb)), row_data::jsonb, "
        f"{'NULL' if peer is None else ql(peer)} FROM _tidesync_conflicts"
    )
    return int(c.num_rows)


def _quarantine(
    cur: Any, spec: TableSpec, rows: pa.Table, reasons: list[tuple[str, int]], peer: str | None, options: ApplyOptions
) -> None:
    """Record rejected versions with the reason (rare path: a few rows, for people to read),
    each with the whole version, so that it can be retried (:mod:`tidesync.quarantine`)."""
    key_col = rows.column(spec.key)
    keys: list[str | None] = [None] * rows.num_rows
    if key_col.null_count == 0:
        keys = list(key_texts(spec, key_col))
    else:
        for i, v in enumerate(key_col.to_pylist()):
            if v is not None:
                keys[i] = key_texts(spec, pa.array([v], key_col.type))[0]
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "hlc": rows.column(HLC),
            "node": rows.column(NODE),
            "row_data": pa.array(rows_as_json(spec, rows), pa.string()),
            "reason": pa.array([r for r, _ in reasons], pa.string()),
            "version": pa.array(stored_versions(spec, rows, peer, options), pa.binary()),
        }
    )
    upgrade_quarantine(cur)  # a node installed by an older version gets the columns now
    cur.execute("DROP TABLE IF EXISTS _tidesync_quarantine")
    cur.execute(
        "CREATE TEMP TABLE _tidesync_quarantine (key text, hlc bigint, node text, row_data text, reason text, "
        "version bytea) ON COMMIT DROP"
    )
    ingest(cur, "_tidesync_quarantine", table, temporary=True)
    cur.execute(
        f"INSERT INTO {SCHEMA}.quarantine (table_name, key, hlc, node, row_data, reason, peer, version) "
        f"SELECT {ql(spec.name)}, key, hlc, node, row_data::jsonb, reason, {'NULL' if peer is None else ql(peer)}, "
        "version FROM _tidesync_quarantine"
    )


# ----------------------------------------------------------------------------- quarantine retry


@contextlib.contextmanager
def quarantine_transaction(conn: Any) -> Iterator[PgQuarantineTxn]:
    """One transaction for a retry or discard of quarantine entries (see
    :func:`tidesync.quarantine.retry_in`): set up as an apply is, committed at the end.

    Repeatable read, so that the logs show this transaction's writes and nothing a
    concurrent apply commits meanwhile: entries above the id marks are the retry's own.
    (Telling them by ``xmin`` fails: the bulk load keeps writing inside a savepoint.) A
    row changed concurrently then fails the retry as a whole, to be run again."""
    try:
        with transaction(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ") as cur:
            upgrade_quarantine(cur)
            _apply_settings(cur)
            yield PgQuarantineTxn(cur)
            cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
    except Exception as exc:
        if getattr(exc, "sqlstate", None) != SERIALIZATION_FAILURE:
            raise
        raise SyncError("rows of this retry changed while it ran (a sync or an edit at the same time); nothing "
                        "was done: run it again") from exc  # fmt: skip


def _ids(ids: Sequence[int]) -> str:
    return ", ".join(str(int(i)) for i in ids)


SERIALIZATION_FAILURE = "40001"


class PgQuarantineTxn:
    """The statements of :class:`tidesync.quarantine.QuarantineTxn` on PostgreSQL."""

    def __init__(self, cur: Any) -> None:
        self.cur = cur

    def entries(self, ids: Sequence[int] | None, table: str | None) -> list[Entry]:
        if ids is not None and not ids:
            return []
        conds = ["status = 'held'"] if ids is None else [f"id IN ({_ids(ids)})"]
        if table is not None:
            conds.append(f"table_name = {ql(table)}")
        return self._entries(" AND ".join(conds), lock=True)

    def _entries(self, where: str, *, lock: bool = False) -> list[Entry]:
        # FOR UPDATE: a second retry of the same entries waits, then finds them settled.
        self.cur.execute(f"SELECT {', '.join(ENTRY_COLUMNS)} FROM {SCHEMA}.quarantine WHERE {where} ORDER BY id"
                         + (" FOR UPDATE" if lock else ""))  # fmt: skip
        return [Entry.from_row(r) for r in self.cur.fetchall()]

    def marks(self) -> tuple[int, int]:
        self.cur.execute(f"SELECT (SELECT coalesce(max(id), 0) FROM {SCHEMA}.quarantine), "
                         f"(SELECT coalesce(max(id), 0) FROM {SCHEMA}.conflicts)")  # fmt: skip
        q, c = self.cur.fetchone()
        return int(q), int(c)

    def apply(self, spec: TableSpec, batch: pa.Table, peer: str | None, options: ApplyOptions) -> None:
        applier = _Applier(self.cur, peer, options, ApplyResult())
        applier.part(spec, conform(batch, spec, "quarantined version"))
        applier.finish()

    def current(self, spec: TableSpec, keys: pa.Array) -> pa.Table:
        return read_local(self.cur, spec, pa.chunked_array([keys]), lock=False)

    def added_since(self, marks: tuple[int, int]) -> tuple[list[Entry], list[tuple[int, str, str]]]:
        added = self._entries(f"id > {int(marks[0])}")
        self.cur.execute(f"SELECT id, table_name, key FROM {SCHEMA}.conflicts WHERE id > {int(marks[1])}")
        return added, [(int(i), str(t), str(k)) for i, t, k in self.cur.fetchall()]

    def remove(self, entry_ids: Sequence[int], conflict_ids: Sequence[int]) -> None:
        if entry_ids:
            self.cur.execute(f"DELETE FROM {SCHEMA}.quarantine WHERE id IN ({_ids(entry_ids)})")
        if conflict_ids:
            self.cur.execute(f"DELETE FROM {SCHEMA}.conflicts WHERE id IN ({_ids(conflict_ids)})")

    def settle(self, outcomes: Sequence[RetryOutcome]) -> None:
        if not outcomes:
            return
        rows = pa.table(
            {
                "id": pa.array([o.id for o in outcomes], pa.int64()),
                "applied": pa.array([o.applied for o in outcomes], pa.bool_()),
                "note": pa.array([o.note for o in outcomes], pa.string()),
                "reason": pa.array([o.reason for o in outcomes], pa.string()),
                "attempts": pa.array([o.attempts for o in outcomes], pa.int32()),
            }
        )
        self.cur.execute("DROP TABLE IF EXISTS _tidesync_settle")
        self.cur.execute("CREATE TEMP TABLE _tidesync_settle (id bigint, applied boolean, note text, reason text, "
                         "attempts integer) ON COMMIT DROP")  # fmt: skip
        ingest(self.cur, "_tidesync_settle", rows, temporary=True)
        self.cur.execute(
            f"UPDATE {SCHEMA}.quarantine q SET status = CASE WHEN s.applied THEN 'retried' ELSE 'held' END, "
            "resolved_at = CASE WHEN s.applied THEN now() END, note = s.note, reason = s.reason, "
            "attempts = s.attempts FROM _tidesync_settle s WHERE q.id = s.id"
        )

    def discard(self, ids: Sequence[int], note: str) -> None:
        if ids:
            self.cur.execute(f"UPDATE {SCHEMA}.quarantine SET status = 'discarded', resolved_at = now(), "
                             f"note = {ql(note)} WHERE id IN ({_ids(ids)}) AND status = 'held'")  # fmt: skip
