"""The quarantine, for people: ``tidesync quarantine list|show|retry|discard``.

A version the database refuses (a constraint, a bad value, a row whose parent is
missing, a version without key or stamp) goes to the quarantine with the reason, and
the rest of the apply goes on. Each entry keeps the whole version — one row in the
table's wire schema as an Arrow IPC stream, every stamp included — so it can be applied
once the cause is fixed. A retry runs the normal apply: the version is merged against
the row as it is now, so a version superseded meanwhile loses as it would have then, and
a concurrent one logs its conflict. Everything a retry does (the rows, the entries' new
statuses) is one transaction. Nothing is deleted: an entry is ``held``, ``retried`` or
``discarded``, the last with a note saying who decided and why.

The stores (:mod:`tidesync.pg.apply`, :mod:`tidesync.sqlite.apply`) supply the few
statements that differ (:class:`QuarantineTxn`); the logic is here, once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from tidesync.changes import (
    NO_OPTIONS,
    ORIGIN,
    ApplyOptions,
    _storage,
    conform,
    key_texts,
    keys_from_texts,
    rows_as_json,
    tombstone_rows,
)
from tidesync.errors import SchemaMismatchError, SyncError
from tidesync.registry import BASE_HLC, DELETED, HLC, NODE, Registry, TableSpec, stamp_column
from tidesync.review import stamp_text

if TYPE_CHECKING:
    from tidesync.store import Store

HELD, RETRIED, DISCARDED = "held", "retried", "discarded"
STATUSES = (HELD, RETRIED, DISCARDED)

#: Schema metadata of a stored version. ``from_peer``: "1" when the row apply tried to
#: write was the peer's own version, "0" when it was new here (a field-wise mix with
#: local values, or a version the hub re-stamped) and so must travel back to the peer;
#: a retry restores that, or echo suppression would hide the row from the peer.
#: ``own_node``: the apply adopted the hub's re-stamped versions of this node's own rows
#: (:class:`tidesync.changes.ApplyOptions`); a retry does the same.
FROM_PEER, OWN_NODE = b"tidesync.from_peer", b"tidesync.own_node"

#: The columns a store reads an entry from, in :class:`Entry`'s order.
ENTRY_COLUMNS = ("id", "table_name", "key", "hlc", "node", "reason", "peer", "status", "attempts", "version",
                 "note", "resolved_at")  # fmt: skip

REJECTED_AGAIN = "rejected again on retry"
#: How the note of an entry a retry could not even try begins (it stays held, untouched).
CANNOT_RETRY = "cannot be retried: "
NO_VERSION = (
    CANNOT_RETRY + "an older tidesync quarantined it with the row's values only, not the version and its "
    "stamps. Re-enter the row at its source node if it is needed, then discard this entry with a note"
)


# ----------------------------------------------------------------------------- versions


def stored_versions(
    spec: TableSpec, rows: pa.Table, peer: str | None, options: ApplyOptions = NO_OPTIONS
) -> list[bytes]:
    """Each row apply could not write, as the bytes the quarantine keeps.

    ``rows`` are wire rows, or rows of an apply plan (no ``_deleted``, with ``_origin``;
    a planned delete has only the key and the row stamps): every shape is stored as the
    one-row wire batch it stands for.
    """
    wire = _as_wire(spec, rows)
    from_peer = _from_peer(spec, rows, peer, options)
    out = []
    for i in range(wire.num_rows):
        meta = {FROM_PEER: b"1" if from_peer[i] else b"0"}
        if options.own_node is not None:
            meta[OWN_NODE] = options.own_node.encode()
        out.append(encode_version(wire.slice(i, 1), meta))
    return out


def encode_version(row: pa.Table, metadata: dict[bytes, bytes] | None = None) -> bytes:
    """A wire batch as an Arrow IPC stream (lossless for every logical type)."""
    row = row.replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, row.schema) as writer:
        writer.write_table(row)
    return bytes(sink.getvalue().to_pybytes())


@dataclass(frozen=True)
class StoredVersion:
    """A quarantined version read back: wire rows (one) and how apply had treated it."""

    rows: pa.Table
    from_peer: bool
    own_node: str | None


def decode_version(spec: TableSpec, data: bytes, entry_id: int) -> StoredVersion:
    """The version an entry keeps, in ``spec``'s wire schema; raises SyncError naming the
    entry if the bytes do not decode or no longer fit the registry."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise SyncError(
            f"quarantine entry {entry_id}: its stored version does not decode ({exc}), so it cannot be retried "
            "(a retry that includes it does nothing); discard it with a note, and retry the others by id"
        ) from None
    meta = table.schema.metadata or {}
    try:
        rows = conform(table, spec, f"the stored version of quarantine entry {entry_id}")
    except SchemaMismatchError as exc:
        raise SchemaMismatchError(
            f"{exc}; the registry changed since it was quarantined, so it cannot be retried (a retry that includes "
            "it does nothing); discard it with a note, and retry the others by id"
        ) from None
    own = meta.get(OWN_NODE)
    return StoredVersion(rows, meta.get(FROM_PEER, b"1") == b"1", None if own is None else own.decode())


def _as_wire(spec: TableSpec, rows: pa.Table) -> pa.Table:
    names = set(rows.column_names)
    if DELETED not in names:
        if not names - {spec.key, HLC, NODE, BASE_HLC, ORIGIN}:
            return tombstone_rows(spec, rows)  # a planned delete: the tombstone it writes
        rows = rows.append_column(DELETED, pa.repeat(pa.scalar(False), rows.num_rows))
    if ORIGIN in names:
        rows = rows.drop_columns([ORIGIN])
    return conform(rows, spec, "quarantined rows")


def _from_peer(spec: TableSpec, rows: pa.Table, peer: str | None, options: ApplyOptions) -> list[bool]:
    n = rows.num_rows
    if peer is None:
        return [False] * n
    if ORIGIN in rows.column_names:  # planned rows say it themselves
        return [o is not None for o in rows.column(ORIGIN).to_pylist()]
    restamped = options.restamped.get(spec.name)
    if restamped is None or not len(restamped):
        return [True] * n
    mine = pc.is_in(_storage(rows.column(spec.key)), value_set=_storage(restamped))
    return [not m for m in pc.fill_null(mine, False).to_pylist()]


# ----------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """One quarantine entry as retry and discard see it (columns of :data:`ENTRY_COLUMNS`)."""

    id: int
    table: str
    key: str | None
    hlc: int | None
    node: str | None
    reason: str
    peer: str | None
    status: str
    attempts: int
    version: bytes | None
    note: str | None
    resolved_at: Any

    @staticmethod
    def from_row(row: Sequence[Any]) -> Entry:
        (id_, table, key, hlc, node, reason, peer, status, attempts, version, note, resolved) = row
        return Entry(int(id_), str(table), key, None if hlc is None else int(hlc), node, str(reason), peer,
                     str(status), int(attempts), None if version is None else bytes(version), note,
                     resolved)  # fmt: skip


@dataclass(frozen=True)
class RetryOutcome:
    """What a retry did with one entry."""

    id: int
    table: str
    key: str | None
    #: True: the version went through the normal apply, the entry is now ``retried``;
    #: False: it is still ``held`` (rejected again, or it cannot be retried at all).
    applied: bool
    #: What happened ("applied", "superseded: ...", "rejected again ...", why not).
    note: str
    attempts: int
    #: The entry's reason now: the new error when the version was rejected again.
    reason: str


class QuarantineTxn(Protocol):
    """What retry and discard need from a store, inside one open write transaction."""

    def entries(self, ids: Sequence[int] | None, table: str | None) -> list[Entry]:
        """Entries ``ids`` whatever their status, or (``ids`` None) every held entry, of
        ``table`` if given; oldest first, locked until the transaction ends."""

    def marks(self) -> tuple[int, int]:
        """The highest quarantine id and conflict id so far."""

    def apply(self, spec: TableSpec, batch: pa.Table, peer: str | None, options: ApplyOptions) -> None:
        """Merge and write ``batch`` the way a normal apply does (conflicts and rejected
        rows logged), without committing."""

    def current(self, spec: TableSpec, keys: pa.Array) -> pa.Table:
        """The local versions of ``keys`` now (live rows, else tombstones), wire schema."""

    def added_since(self, marks: tuple[int, int]) -> tuple[list[Entry], list[tuple[int, str, str]]]:
        """Quarantine entries and conflicts (id, table, key) this transaction logged after ``marks``."""

    def remove(self, entry_ids: Sequence[int], conflict_ids: Sequence[int]) -> None:
        """Delete entries and conflicts this transaction logged (folded into their originals)."""

    def settle(self, outcomes: Sequence[RetryOutcome]) -> None:
        """Record outcomes: applied -> ``retried`` with resolved_at now; others stay held.
        Note, reason and attempts as given."""

    def discard(self, ids: Sequence[int], note: str) -> None:
        """Mark held entries ``discarded`` with resolved_at now and ``note``."""


def select_held(txn: QuarantineTxn, ids: Sequence[int] | None, table: str | None, action: str) -> list[Entry]:
    """The entries to ``action`` ("retry", "discard"): ``ids`` (each must exist and be
    held), or every held one (of ``table``)."""
    if ids is None:
        return txn.entries(None, table)
    if table is not None:
        raise SyncError(f"{action}: give entry ids or a table, not both")
    wanted = sorted({int(i) for i in ids})
    if not wanted:
        raise SyncError(f"{action}: no entry ids given (see `tidesync quarantine list`)")
    found = {e.id: e for e in txn.entries(wanted, None)}
    missing = [i for i in wanted if i not in found]
    if missing:
        raise SyncError(
            f"no quarantine entry with id {', '.join(map(str, missing))} in this database; nothing was done "
            "(see `tidesync quarantine list --status all`)"
        )
    for e in found.values():
        if e.status != HELD:
            raise SyncError(_not_held(e, action))
    return [found[i] for i in wanted]


def _not_held(e: Entry, action: str) -> str:
    when = str(e.resolved_at)[:19] if e.resolved_at is not None else "an unknown time"
    if e.status == DISCARDED:
        what = (
            "a discarded entry is never retried: the decision stays on record. If the row is wanted after all, "
            "re-enter it at its source node"
            if action == "retry"
            else "it stays discarded with its first note"
        )
        return f"quarantine entry {e.id} was discarded at {when} (note: {e.note}); {what}. Nothing was done"
    return (
        f"quarantine entry {e.id} was already retried at {when} ({e.note}): it is resolved, nothing to {action}. "
        "Nothing was done"
    )


def discard_in(txn: QuarantineTxn, ids: Sequence[int], note: str) -> list[int]:
    """Mark held entries ``ids`` discarded with ``note`` (who decided and why); returns the ids."""
    note = note.strip()
    if not note:
        raise SyncError('a discard needs a note saying who decided and why, e.g. "duplicate of P-123, confirmed '
                        'with the ward"')  # fmt: skip
    entries = select_held(txn, ids, None, "discard")
    txn.discard([e.id for e in entries], note)
    return [e.id for e in entries]


# ----------------------------------------------------------------------------- retry


@dataclass(frozen=True)
class _Retry:
    entry: Entry
    spec: TableSpec
    version: StoredVersion

    @property
    def where(self) -> tuple[str, str | None]:
        return (self.entry.table, self.entry.key)

    @property
    def deleted(self) -> bool:
        return bool(pc.any(pc.fill_null(self.version.rows.column(DELETED), False)).as_py())


_Stamp = tuple[int | None, str | None, bool]


def retry_in(
    txn: QuarantineTxn, registry: Registry, ids: Sequence[int] | None = None, table: str | None = None
) -> list[RetryOutcome]:
    """Apply held entries again (``ids``, or all held of ``table``), inside ``txn``.

    The versions go through the normal apply, grouped by the peer they came from, and the
    entries' statuses are written in the same transaction: an exception anywhere leaves
    everything as it was. An entry rejected again stays held, one entry: what the apply
    logged for it in this transaction is folded back into it.
    """
    entries = select_held(txn, ids, table, "retry")
    outcomes: dict[int, RetryOutcome] = {}
    todo = []
    for e in entries:
        if e.version is None:
            outcomes[e.id] = RetryOutcome(e.id, e.table, e.key, False, NO_VERSION, e.attempts, e.reason)
        elif e.table not in registry:
            why = (f"{CANNOT_RETRY}the registry {registry.name!r} does not sync table {e.table!r} (any more); "
                   "discard this entry with a note")  # fmt: skip
            outcomes[e.id] = RetryOutcome(e.id, e.table, e.key, False, why, e.attempts, e.reason)
        else:
            spec = registry[e.table]
            todo.append(_Retry(e, spec, decode_version(spec, e.version, e.id)))
    if todo:
        outcomes.update(_retry(txn, registry, todo))
        txn.settle([outcomes[r.entry.id] for r in todo])
    return [outcomes[e.id] for e in entries]


def _retry(txn: QuarantineTxn, registry: Registry, todo: list[_Retry]) -> dict[int, RetryOutcome]:
    marks = txn.marks()
    before = _stamps_now(txn, todo)
    for spec, batch, peer, options in _steps(registry, todo):
        txn.apply(spec, batch, peer, options)
    added, conflicts = txn.added_since(marks)
    retried = {r.where for r in todo}
    ours = [a for a in added if (a.table, a.key) in retried]
    again = _fold(todo, ours)
    logged: dict[tuple[str, str | None], list[int]] = {}
    for cid, t, k in conflicts:
        logged.setdefault((t, k), []).append(cid)
    # A key rejected again was not written: conflicts its merge logged did not happen.
    moot = [cid for where, cids in logged.items() if where in again for cid in cids]
    txn.remove([a.id for a in ours], moot)
    after = _stamps_now(txn, todo)
    return {r.entry.id: _outcome(r, again, logged, before, after) for r in todo}


def _steps(
    registry: Registry, todo: list[_Retry]
) -> list[tuple[TableSpec, pa.Table, str | None, ApplyOptions]]:
    """Apply calls in the order one apply writes: live versions parents first, then
    tombstones children first; within a table, one call per peer the versions came from."""
    groups: dict[tuple[str, bool, str | None, str | None], list[_Retry]] = {}
    for r in todo:
        groups.setdefault((r.spec.name, r.deleted, r.entry.peer, r.version.own_node), []).append(r)
    order = [(False, s) for s in registry] + [(True, s) for s in reversed(list(registry))]
    steps = []
    for dead, spec in order:
        mine = sorted((k for k in groups if k[0] == spec.name and k[1] == dead), key=lambda k: (k[2] or "", k[3] or ""))
        for key in mine:
            rs = groups[key]
            batch = pa.concat_tables([r.version.rows for r in rs])
            new_here = [r.version.rows.column(spec.key).combine_chunks() for r in rs if not r.version.from_peer]
            restamped = {spec.name: pa.concat_arrays(new_here)} if new_here else {}
            steps.append((spec, batch, key[2], ApplyOptions(restamped=restamped, own_node=key[3])))
    return steps


def _fold(todo: list[_Retry], added: list[Entry]) -> dict[tuple[str, str | None], str]:
    """The new reason per key rejected again: the entry logged for the same version, or
    else any entry logged for that key (a merge changes the stamps it writes)."""
    same = {(r.entry.table, r.entry.key, r.entry.hlc, r.entry.node) for r in todo}
    again: dict[tuple[str, str | None], str] = {}
    for a in added:
        if (a.table, a.key) not in again or (a.table, a.key, a.hlc, a.node) in same:
            again[(a.table, a.key)] = a.reason
    return again


def _stamps_now(txn: QuarantineTxn, todo: list[_Retry]) -> dict[tuple[str, str], _Stamp]:
    """(hlc, node, deleted) of the local version of every retried key."""
    specs = {r.spec.name: r.spec for r in todo}
    keys: dict[str, list[pa.Array]] = {}
    for r in todo:
        k = r.version.rows.column(r.spec.key).combine_chunks()
        if k.null_count < len(k):
            keys.setdefault(r.spec.name, []).append(k.drop_null())
    out: dict[tuple[str, str], _Stamp] = {}
    for name, arrays in keys.items():
        spec = specs[name]
        now = txn.current(spec, pc.unique(pa.concat_arrays(arrays)))
        texts = key_texts(spec, now.column(spec.key))
        for k, h, n, d in zip(texts, now.column(HLC).to_pylist(), now.column(NODE).to_pylist(),
                              now.column(DELETED).to_pylist(), strict=True):  # fmt: skip
            out[(name, k)] = (h, n, bool(d))
    return out


def _outcome(
    r: _Retry,
    again: dict[tuple[str, str | None], str],
    logged: dict[tuple[str, str | None], list[int]],
    before: dict[tuple[str, str], _Stamp],
    after: dict[tuple[str, str], _Stamp],
) -> RetryOutcome:
    e = r.entry
    if r.where in again:
        reason = again[r.where]
        note = REJECTED_AGAIN + ("" if reason == e.reason else f" (before: {e.reason})")
        return RetryOutcome(e.id, e.table, e.key, False, note, e.attempts + 1, reason)
    row = r.version.rows
    mine: _Stamp = (row.column(HLC)[0].as_py(), row.column(NODE)[0].as_py(), bool(row.column(DELETED)[0].as_py()))
    now = was = None
    if e.key is not None:
        now, was = after.get((e.table, e.key)), before.get((e.table, e.key))
    if was == mine:
        note = "already here: the same version arrived since it was quarantined"
    elif now is None or now == mine:
        note = "applied" + (": the row is deleted" if mine[2] else "")
    elif r.spec.field_wise:
        note = f"merged field by field with a newer version here ({_stamp(now)})"
    else:
        note = f"superseded: a newer version was already here ({_stamp(now)}) and stays"
    if cids := logged.get(r.where):
        note += f"; conflict logged (#{', #'.join(map(str, cids))})"
    return RetryOutcome(e.id, e.table, e.key, True, note, e.attempts + 1, e.reason)


def _stamp(s: _Stamp) -> str:
    text = f"{stamp_text(s[0])} by {s[1]}" if s[0] is not None else f"by {s[1]}"
    return text + (", deleted" if s[2] else "")


# ----------------------------------------------------------------------------- for people


def list_entries(store: Store, table: str | None = None, status: str = HELD, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` entries of ``status`` (or "all"), of ``table``, newest first."""
    if status != "all" and status not in STATUSES:
        raise SyncError(f"unknown quarantine status {status!r}: use {', '.join(STATUSES)} or all")
    log = store.quarantine(table, status=None if status == "all" else status)
    log = log.slice(max(0, log.num_rows - limit))
    return [_summary(r) for r in reversed(log.to_pylist())]


def short_reason(reason: str) -> str:
    """The database's own words, without the driver's preamble (for a table cell)."""
    return reason.rsplit("ERROR:", 1)[-1].strip()


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    stamp = None if r["hlc"] is None else {"hlc": r["hlc"], "node": r["node"], "at": stamp_text(r["hlc"])}
    return {
        "id": r["id"], "table": r["table_name"], "key": r["key"], "reason": r["reason"], "stamp": stamp,
        "peer": r["peer"], "attempts": r["attempts"], "recorded_at": r["recorded_at"], "status": r["status"],
        "resolved_at": r["resolved_at"], "note": r["note"], "retryable": r["version"] is not None,
    }  # fmt: skip


def show_entry(store: Store, entry_id: int) -> dict[str, Any]:
    """One entry: the row's values, the version's stamps, the reason, its history, and the
    row as it is here now."""
    found = store.quarantine(entry_id=entry_id).to_pylist()
    if not found:
        raise SyncError(f"no quarantine entry with id {entry_id} in this database "
                        "(see `tidesync quarantine list --status all`)")  # fmt: skip
    r = found[0]
    out = _summary(r)
    row = json.loads(r["row_data"])
    if r["table_name"] in store.registry:  # in declaration order (jsonb keeps its own)
        declared = [c.name for c in store.registry[r["table_name"]].columns]
        row = {c: row[c] for c in declared if c in row} | {c: v for c, v in row.items() if c not in declared}
    out["row"] = row
    out["version"] = out["version_error"] = None
    out["now"] = None
    out["history"] = _history(r)
    if r["table_name"] not in store.registry:
        return out
    spec = store.registry[r["table_name"]]
    if r["version"] is not None:
        try:
            out["version"] = _stamps(spec, decode_version(spec, r["version"], entry_id).rows)
        except SyncError as exc:  # shown, not raised: the operator needs the rest to decide
            out["version_error"] = str(exc)
    if r["key"] is not None:
        now = store.read_rows(spec.name, keys_from_texts(spec, [r["key"]]))
        if now.num_rows:
            out["now"] = _stamps(spec, now)
            out["now"]["row"] = None if out["now"]["deleted"] else json.loads(rows_as_json(spec, now)[0])
    return out


def _stamps(spec: TableSpec, rows: pa.Table) -> dict[str, Any]:
    """A version's stamps, for people: row stamp, node, base, deletion, field stamps."""
    row = rows.slice(0, 1).to_pylist()[0]

    def at(h: int | None) -> str | None:
        return None if h is None else stamp_text(h)

    fields = {}
    if spec.field_wise:
        fields = {c.name: {"hlc": row[stamp_column(c.name)], "at": at(row[stamp_column(c.name)])}
                  for c in spec.data_columns}  # fmt: skip
    return {"hlc": row[HLC], "at": at(row[HLC]), "node": row[NODE], "base_hlc": row[BASE_HLC],
            "base_at": at(row[BASE_HLC]), "deleted": row[DELETED], "fields": fields}  # fmt: skip


def _history(r: dict[str, Any]) -> list[dict[str, Any]]:
    """What happened to an entry, oldest first (the reason is the latest refusal's)."""
    events = [{"at": r["recorded_at"], "event": "quarantined" + (f" (from {r['peer']})" if r["peer"] else ""),
               "note": None}]  # fmt: skip
    refused = r["attempts"] - (2 if r["status"] == RETRIED else 1)
    if refused > 0:
        told = r["status"] == HELD and r["note"] not in (None, REJECTED_AGAIN)
        events.append({"at": None, "event": f"{refused} retry attempt(s) rejected again",
                       "note": r["note"] if told else None})  # fmt: skip
    if r["status"] == RETRIED:
        events.append({"at": r["resolved_at"], "event": f"retried (attempt {r['attempts']})", "note": r["note"]})
    elif r["status"] == DISCARDED:
        events.append({"at": r["resolved_at"], "event": "discarded", "note": r["note"]})
    return events
