"""Loading a large batch into an empty table the way ``pg_restore`` does: foreign keys
and secondary indexes set aside, rows in key order, then checked and built once.

With the constraints in place, PostgreSQL checks every inserted row on its own (one
lookup and one row lock in the parent per child row), and every index takes each row
in random order: together most of the time of a first sync. Instead, inside the apply
transaction: drop the table's foreign keys and its indexes that back no constraint,
load (sorted by key, so the primary key index grows at its right edge), delete the
rows without a parent with one anti-join per key (they are quarantined), build the
indexes with one sort each, and add the foreign keys back (PostgreSQL validates each
with one more join). Nobody ever sees the table without them: the DDL commits or
rolls back with the rows, and the table is locked meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tidesync.pg.install import qi, ql


FOREIGN_KEY_VIOLATION = "23503"


@dataclass(frozen=True)
class ForeignKey:
    name: str
    #: As ``pg_get_constraintdef`` prints it: ``FOREIGN KEY (...) REFERENCES ...``, with
    #: its actions and deferrability, ready to add back unchanged.
    definition: str
    columns: tuple[str, ...]
    parent: str  # the referenced table, qualified as needed
    parent_columns: tuple[str, ...]
    match_full: bool

    def delete_orphans_sql(self, table: str, returning: str) -> str:
        """Delete the ``table`` rows (alias ``t``) whose reference finds no parent row,
        returning ``returning`` of each."""
        t_cols = [f"t.{qi(c)}" for c in self.columns]
        # MATCH SIMPLE (the default) skips a row when any referencing column is null;
        # MATCH FULL only when all are (a partly null reference is itself a violation,
        # and the anti-join below reports it, since null = x never holds).
        joiner = " AND " if not self.match_full else " OR "
        present = joiner.join(f"{c} IS NOT NULL" for c in t_cols)
        same = " AND ".join(f"p.{qi(pc)} = {tc}" for pc, tc in zip(self.parent_columns, t_cols, strict=True))
        return (
            f"DELETE FROM {qi(table)} t WHERE ({present}) "
            f"AND NOT EXISTS (SELECT 1 FROM {self.parent} p WHERE {same}) RETURNING {returning}"
        )

    def reason(self, table: str) -> str:
        # Worded like PostgreSQL's own error, so the quarantine reads the same either way.
        return (
            f'insert or update on table "{table}" violates foreign key constraint "{self.name}": '
            f"no row in {self.parent} has ({', '.join(self.parent_columns)}) = its "
            f"({', '.join(self.columns)})"
        )


@dataclass(frozen=True)
class SetAside:
    """What :func:`set_aside` took off a table, to put back with :func:`restore`."""

    table: str
    foreign_keys: list[ForeignKey]
    #: (name, ``pg_get_indexdef``) of the indexes that back no constraint.
    indexes: list[tuple[str, str]]


def set_aside(cur: Any, table: str) -> SetAside | None:
    """Drop ``table``'s foreign keys and plain indexes; None (nothing done) when this
    role may not alter the table."""
    cur.execute(f"SELECT pg_has_role(relowner, 'USAGE') FROM pg_class WHERE oid = {ql(table)}::regclass")
    if not cur.fetchone()[0]:
        return None
    cur.execute(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        f"WHERE i.indrelid = {ql(table)}::regclass "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid) ORDER BY 1"
    )
    indexes = [(str(n), str(d)) for n, d in cur.fetchall()]
    aside = SetAside(table, foreign_keys(cur, table), indexes)
    drop(cur, table, aside.foreign_keys)
    for name, _ in aside.indexes:
        cur.execute(f"DROP INDEX {name}")
    return aside


def restore(cur: Any, aside: SetAside, returning: str) -> list[tuple[pa.Table, str]]:
    """Build the indexes and add the foreign keys back. Rows without a parent are
    deleted first: returns them (``returning`` of each) with the reason, for the quarantine."""
    for _, definition in aside.indexes:
        cur.execute(definition)
    if not aside.foreign_keys:
        return []
    # Optimistic: adding the keys back validates them (one join each), and a sync
    # almost never brings orphans; only when it does, find and delete them, and add again.
    cur.execute("SAVEPOINT tidesync_foreign_keys")
    try:
        add_back(cur, aside.table, aside.foreign_keys)
    except Exception as exc:  # noqa: BLE001 - only a foreign key violation is handled here
        if getattr(exc, "sqlstate", None) != FOREIGN_KEY_VIOLATION:
            raise
        cur.execute("ROLLBACK TO SAVEPOINT tidesync_foreign_keys")
        orphans = delete_orphans(cur, aside.table, returning, aside.foreign_keys)
        add_back(cur, aside.table, aside.foreign_keys)
        return orphans
    cur.execute("RELEASE SAVEPOINT tidesync_foreign_keys")
    return []


def foreign_keys(cur: Any, table: str) -> list[ForeignKey]:
    """The foreign keys declared on ``table``."""
    cur.execute(
        "SELECT c.conname, pg_get_constraintdef(c.oid), c.confrelid::regclass::text, c.confmatchtype = 'f', "
        "ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY u(n, o) "
        "      JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = u.n ORDER BY u.o), "
        "ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY u(n, o) "
        "      JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = u.n ORDER BY u.o) "
        f"FROM pg_constraint c WHERE c.conrelid = {ql(table)}::regclass AND c.contype = 'f' ORDER BY c.conname"
    )
    return [
        ForeignKey(name=str(name), definition=str(definition), parent=str(parent), match_full=bool(full),
                   columns=tuple(cols), parent_columns=tuple(pcols))  # fmt: skip
        for name, definition, parent, full, cols, pcols in cur.fetchall()
    ]


def drop(cur: Any, table: str, fks: list[ForeignKey]) -> None:
    if fks:
        cur.execute(f"ALTER TABLE {qi(table)} " + ", ".join(f"DROP CONSTRAINT {qi(fk.name)}" for fk in fks))


def add_back(cur: Any, table: str, fks: list[ForeignKey]) -> None:
    if fks:
        cur.execute(
            f"ALTER TABLE {qi(table)} " + ", ".join(f"ADD CONSTRAINT {qi(fk.name)} {fk.definition}" for fk in fks)
        )


def delete_orphans(cur: Any, table: str, returning: str, fks: list[ForeignKey]) -> list[tuple[pa.Table, str]]:
    """Delete every row of ``table`` that a foreign key would reject: (rows, reason) per
    key that found some, each row with ``returning`` (over alias ``t``).

    Repeats until nothing more goes, since a row can lose its parent to an earlier
    round (a table that references itself)."""
    found: list[tuple[pa.Table, str]] = []
    while True:
        before = len(found)
        for fk in fks:
            cur.execute(fk.delete_orphans_sql(table, returning))
            gone: pa.Table = cur.fetch_arrow_table()
            if gone.num_rows:
                found.append((gone, fk.reason(table)))
        if len(found) == before:
            return found
