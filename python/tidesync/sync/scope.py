"""Which rows a node may push, and which it pulls (see docs/protocol.md, "Scope").

A node belongs to one facility. It pulls global tables, its facility's rows, the rows
of patients marked for its facility (with the whole history of a patient newly marked
there), never another facility's sensitive rows, and never what it pushed itself. It
may push only tables whose direction goes up, and only rows inside that same scope.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from tidesync.changes import _storage
from tidesync.pg.capture import wire_columns
from tidesync.pg.install import qi, ql, tomb_table
from tidesync.registry import DELETED, Registry, ScopeKind, TableSpec
from tidesync.sync.protocol import ForbiddenError

if TYPE_CHECKING:
    from tidesync.pg.store import PostgresStore
    from tidesync.sync.central import Node


def _facility_literal(spec: TableSpec, column: str, node: Node) -> str:
    return f"{ql(node.facility_id)}::{spec.column(column).type.pg}"


def _marks_here(registry: Registry, node: Node, *, ever: bool = False) -> str:
    """SQL over the marks table (alias ``m``): a live mark for the node's facility (or,
    with ``ever``, any mark it had, ended or not)."""
    m = registry.marks
    assert m is not None
    alive = f" AND m.{qi(m.deleted)} IS NULL" if m.deleted and not ever else ""
    return f"m.{qi(m.facility)} = {_facility_literal(registry[m.table], m.facility, node)}{alive}"


def marked_patients_sql(registry: Registry, node: Node, extra: str = "") -> str:
    """Patients marked for the node's facility (a subquery of patient ids)."""
    m = registry.marks
    assert m is not None
    return f"SELECT m.{qi(m.patient)} FROM {qi(m.table)} m WHERE {_marks_here(registry, node)}{extra}"


def scope_condition(
    registry: Registry, spec: TableSpec, node: Node, alias: str = "t", *, ever: bool = False,
    before: int | None = None,
) -> str:
    """SQL that is true for the rows of ``spec`` inside ``node``'s scope (``ever``: also
    the rows of patients whose mark for the node's facility has ended; ``before``: only
    marks written before that cursor count)."""
    sc = spec.scope
    if sc.kind is ScopeKind.GLOBAL:
        return "true"
    assert sc.column is not None
    col = f"{alias}.{qi(sc.column)}"
    if sc.kind in (ScopeKind.FACILITY, ScopeKind.SENSITIVE_FACILITY):
        return f"{col} = {_facility_literal(spec, sc.column, node)}"
    marked = is_marked(registry, node, col, ever=ever, before=before)
    return f"{marked} AND {sensitive_condition(registry, spec, node, alias)}"


def is_marked(registry: Registry, node: Node, patient: str, *, ever: bool = False, before: int | None = None) -> str:
    """SQL: the patient (an expression) is marked for the node's facility (``ever``:
    was marked there at some time, the mark since ended or not).

    A correlated EXISTS, so that a window of a few changed rows probes the marks index
    a few times instead of reading every mark of the facility (cost follows changes).
    """
    m = registry.marks
    assert m is not None
    here = _marks_here(registry, node, ever=ever)
    if before is not None:
        here += f" AND m._cursor < '{int(before)}'::xid8"
    return f"EXISTS (SELECT 1 FROM {qi(m.table)} m WHERE m.{qi(m.patient)} = {patient} AND {here})"


def marks_index_sql(registry: Registry) -> str | None:
    """The index the central server keeps on the marks table for :func:`is_marked`."""
    m = registry.marks
    if m is None:
        return None
    return f"CREATE INDEX IF NOT EXISTS tidesync_marks ON {qi(m.table)} ({qi(m.patient)}, {qi(m.facility)})"


def sensitive_condition(registry: Registry, spec: TableSpec, node: Node, alias: str = "t") -> str:
    """True unless the row belongs to *another* facility flagged sensitive."""
    sens = spec.scope.sensitive_column
    if sens is None:
        return "true"
    s = registry.sensitivity
    assert s is not None
    col = f"{alias}.{qi(sens)}"
    return (
        f"({col} = {_facility_literal(spec, sens, node)} OR NOT EXISTS (SELECT 1 FROM {qi(s.table)} f "
        f"WHERE f.{qi(s.key)} = {col} AND f.{qi(s.flag)}))"
    )


def pull_sql(registry: Registry, spec: TableSpec, node: Node, cursor: int, watermark: int) -> str:
    """One table's pull for ``node``: changes in ``[cursor, watermark)`` in its scope,
    plus (patient scope) the older history of patients marked for it in that window.

    Tombstones carry no values to judge scope by; they go to every node that pulls
    the table (a key and a stamp, no clinical data), where a tombstone for a key the
    node never had is harmless.
    """
    window = f"t._cursor >= '{cursor}'::xid8 AND t._cursor < '{watermark}'::xid8"
    not_theirs = f"t._origin IS DISTINCT FROM {ql(node.id)}"
    live = wire_columns(spec, "t", tombstone=False)
    # Scope as of the watermark: a mark committed past it (the snapshot sees it, the
    # window does not) must wait for the window that carries it, with the patient's
    # history. Counting it now sent a note ahead of the encounter it belongs to.
    in_scope = scope_condition(registry, spec, node, before=watermark)
    parts = [f"SELECT {live} FROM {qi(spec.name)} t WHERE {window} AND {not_theirs} AND {in_scope}"]
    if spec.scope.kind is ScopeKind.PATIENT and cursor > 0:
        m = registry.marks
        assert m is not None
        newly = marked_patients_sql(
            registry, node, f" AND m._cursor >= '{cursor}'::xid8 AND m._cursor < '{watermark}'::xid8"
        )
        col = f"t.{qi(spec.scope.column or '')}"
        parts.append(
            f"SELECT {live} FROM {qi(spec.name)} t WHERE t._cursor < '{cursor}'::xid8 AND {not_theirs} "
            f"AND {col} IN ({newly}) AND {sensitive_condition(registry, spec, node)}"
        )
    parts.append(
        f"SELECT {wire_columns(spec, 't', tombstone=True)} FROM {tomb_table(spec)} t WHERE {window} AND {not_theirs}"
    )
    return "\nUNION ALL\n".join(parts)


def snapshot_sql(registry: Registry, spec: TableSpec, node: Node, watermark: int) -> str:
    """One table's live rows in ``node``'s scope as of ``watermark``: what a node that
    pulled everything before the watermark holds (its own rows included: there is no
    echo to avoid in a copy made from nothing). Seeds and verify read this.

    Tombstones are left out: a node that never had a key needs no word of its deletion,
    and the next pull from the watermark carries any deletion that happens later.
    """
    window = f"t._cursor < '{watermark}'::xid8"
    in_scope = scope_condition(registry, spec, node, before=watermark)
    return f"SELECT {wire_columns(spec, 't', tombstone=False)} FROM {qi(spec.name)} t WHERE {window} AND {in_scope}"


# ----------------------------------------------------------------------------- push checks


def check_push_table(spec: TableSpec, node: Node) -> None:
    if not spec.direction.pushes:
        raise ForbiddenError(
            f"table {spec.name!r} is {spec.direction.value}: it is authored centrally and nodes cannot push it"
        )


def check_push_facility(spec: TableSpec, rows: pa.Table, node: Node) -> None:
    """Facility-scoped rows must be the pusher's facility's (checked per page, on arrival)."""
    sc = spec.scope
    cols = []
    if sc.kind in (ScopeKind.FACILITY, ScopeKind.SENSITIVE_FACILITY):
        cols.append(sc.column)
    if sc.sensitive_column:
        cols.append(None)  # judged later, against the facilities table
    for col in cols:
        if col is None:
            continue
        live = rows.filter(pc.invert(rows.column(DELETED)))
        values = _distinct_texts(spec, live.column(col)) if live.num_rows else []
        outside = sorted({v for v in values if v != node.facility_id})
        if outside:
            raise ForbiddenError(
                f"node {node.id!r} (facility {node.facility_id}) pushed {spec.name} rows of other facilities "
                f"{outside[:5]}: a node may push only rows in its own scope"
            )


def check_push_patients(store: PostgresStore, batches: Mapping[str, pa.Table], node: Node) -> None:
    """Patient-scoped rows must be of patients marked for the pusher's facility (at
    central or by a mark in the same push), and not of another sensitive facility;
    deletions of rows outside the scope are refused too.

    A mark that has since ended still counts: a patient transferred elsewhere stays on
    the old facility's devices until they next pull, and what clinicians record there
    meanwhile is real care that must reach the record. Refusing it would also wedge
    that node's sync for good, since the same rows would be refused on every retry.
    """
    registry = store.registry
    marks = registry.marks
    scoped = [registry[n] for n in batches if registry[n].scope.kind is ScopeKind.PATIENT]
    tombstoned = [registry[n] for n in batches if registry[n].scope.kind is not ScopeKind.GLOBAL
                  and pc.any(batches[n].column(DELETED)).as_py()]  # fmt: skip
    if not scoped and not tombstoned:
        return
    with store.connection.cursor() as cur:
        allowed: set[str] = set()
        if scoped:
            assert marks is not None
            wanted = sorted({p for spec in scoped for p in _distinct_texts(
                spec, batches[spec.name].filter(pc.invert(batches[spec.name].column(DELETED))).column(spec.scope.column or ""))})  # fmt: skip
            if wanted:
                ptype = registry[marks.table].column(marks.patient).type.pg
                listed = ", ".join(ql(p) for p in wanted)
                cur.execute(f"SELECT p::text FROM unnest(ARRAY[{listed}]::{ptype}[]) p "
                            f"WHERE {is_marked(registry, node, 'p', ever=True)}")  # fmt: skip
                allowed = {str(v) for v in cur.fetch_arrow_table().column(0).to_pylist()}
            pushed_marks = batches.get(marks.table)
            if pushed_marks is not None and pushed_marks.num_rows:
                mspec = registry[marks.table]
                live = pushed_marks.filter(pc.invert(pushed_marks.column(DELETED)))
                mine = [p for p, f, d in zip(
                    _uuid_texts(mspec, live.column(marks.patient)), _uuid_texts(mspec, live.column(marks.facility)),
                    live.column(marks.deleted).to_pylist() if marks.deleted else [None] * live.num_rows, strict=True)
                    if f == node.facility_id]  # fmt: skip
                allowed.update(mine)
        for spec in scoped:
            rows = batches[spec.name]
            live = rows.filter(pc.invert(rows.column(DELETED)))
            col = spec.scope.column
            assert col is not None
            outside = sorted({p for p in _distinct_texts(spec, live.column(col)) if p not in allowed})
            if outside:
                raise ForbiddenError(
                    f"node {node.id!r} pushed {spec.name} rows of patients not marked for its facility "
                    f"{outside[:5]}: mark the patient for the facility (a {marks.table if marks else 'marks'} row) first"
                )
            sens = spec.scope.sensitive_column
            if sens and live.num_rows:
                s = registry.sensitivity
                assert s is not None
                cur.execute(f"SELECT {qi(s.key)}::text FROM {qi(s.table)} WHERE {qi(s.flag)}")
                sensitive = {str(v) for v in cur.fetch_arrow_table().column(0).to_pylist()} - {node.facility_id}
                bad = sorted({f for f in _distinct_texts(spec, live.column(sens)) if f in sensitive})
                if bad:
                    raise ForbiddenError(
                        f"node {node.id!r} pushed {spec.name} rows of sensitive facilities {bad[:5]}, not its own"
                    )
        for spec in tombstoned:
            _check_deletions(cur, registry, spec, batches[spec.name], node)


def _check_deletions(cur: Any, registry: Registry, spec: TableSpec, rows: pa.Table, node: Node) -> None:
    keys = _uuid_texts(spec, rows.filter(rows.column(DELETED)).column(spec.key))
    if not keys:
        return
    k = qi(spec.key)
    key_type = spec.column(spec.key).type.pg
    listed = ", ".join(ql(x) for x in keys[:50_000])
    cur.execute(
        f"SELECT t.{k}::text FROM {qi(spec.name)} t WHERE t.{k} = ANY(ARRAY[{listed}]::{key_type}[]) "
        f"AND NOT ({scope_condition(registry, spec, node, ever=True)}) LIMIT 5"
    )
    outside = [str(v) for v in cur.fetch_arrow_table().column(0).to_pylist()]
    if outside:
        raise ForbiddenError(f"node {node.id!r} deleted {spec.name} rows outside its scope {outside}")


def _plain(col: pa.ChunkedArray) -> list[Any]:
    """Values of a uuid/text column as text."""
    col = _storage(col)
    if pa.types.is_fixed_size_binary(col.type):
        import uuid

        return [None if v is None else str(uuid.UUID(bytes=v)) for v in col.to_pylist()]
    return [None if v is None else str(v) for v in col.to_pylist()]


def _uuid_texts(spec: TableSpec, col: pa.ChunkedArray | pa.Array) -> list[str]:
    """Non-null values as text, row for row."""
    return [v for v in _plain(col if isinstance(col, pa.ChunkedArray) else pa.chunked_array([col])) if v is not None]


def _distinct_texts(spec: TableSpec, col: pa.ChunkedArray | pa.Array) -> list[str]:
    """The distinct non-null values as text (few, even when the rows are many)."""
    return _uuid_texts(spec, pc.unique(_storage(col)))
