"""Foreign keys and indexes set aside for a bulk load into an empty table, and put back as declared."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tidesync.pg import bulk_load
from tidesync.pg.conn import connect, transaction

from .util import rows, run

SCHEMA = [
    "CREATE TABLE parent (a int, b int, PRIMARY KEY (a, b))",
    "CREATE TABLE child (id int PRIMARY KEY, pa int, pb int, up int, "
    "  CONSTRAINT to_parent FOREIGN KEY (pa, pb) REFERENCES parent (a, b) ON DELETE CASCADE, "
    "  CONSTRAINT to_up FOREIGN KEY (up) REFERENCES child (id) DEFERRABLE INITIALLY DEFERRED)",
    "CREATE INDEX child_up ON child (up) WHERE up IS NOT NULL",
    "CREATE UNIQUE INDEX child_pa_id ON child (pa, id)",
    "INSERT INTO parent VALUES (1, 1), (2, 2)",
]


def _definitions(dsn: str) -> list[tuple[str, str]]:
    """The child table's constraints and indexes, as PostgreSQL prints them."""
    return [(str(n), str(d)) for n, d in rows(
        dsn, "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'child'::regclass "
             "UNION ALL SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
             "WHERE indrelid = 'child'::regclass ORDER BY 1")]  # fmt: skip


def _by_id(found: list[tuple[pa.Table, str]]) -> dict[int, str]:
    return {i: reason for rows_, reason in found for i in rows_.column(0).to_pylist()}


def test_orphans_are_found_deleted_and_the_constraints_come_back_unchanged(pg_db: str) -> None:
    run(pg_db, *SCHEMA)
    declared = _definitions(pg_db)
    with connect(pg_db) as conn, transaction(conn) as cur:
        aside = bulk_load.set_aside(cur, "child")
        assert aside is not None
        fks = aside.foreign_keys
        assert [fk.name for fk in fks] == ["to_parent", "to_up"]
        assert fks[0].columns == ("pa", "pb") and fks[0].parent_columns == ("a", "b") and fks[0].parent == "parent"
        assert [name for name, _ in aside.indexes] == ["child_pa_id", "child_up"]  # not the primary key's
        cur.execute("SELECT count(*) FROM pg_index WHERE indrelid = 'child'::regclass")
        assert cur.fetchone()[0] == 1
        cur.execute(
            "INSERT INTO child VALUES "
            "(1, 1, 1, NULL), "  # fine
            "(2, 9, 9, NULL), "  # no such parent
            "(3, 2, NULL, NULL), "  # partly null reference: MATCH SIMPLE lets it through
            "(4, 1, 1, 2), "  # its `up` is the orphan 2: goes in the next round
            "(5, 1, 1, 4), "  # ... and then this one
            "(6, 2, 2, 1)"  # fine
        )
        gone = _by_id(bulk_load.restore(cur, aside, "t.id"))  # finds them when adding the keys back fails
        assert set(gone) == {2, 4, 5}
        assert '"to_parent"' in gone[2] and '"to_up"' in gone[4] and '"to_up"' in gone[5]
    assert sorted(r[0] for r in rows(pg_db, "SELECT id FROM child")) == [1, 3, 6]
    assert _definitions(pg_db) == declared  # actions, deferrability, partial and unique indexes as declared
    with pytest.raises(Exception, match="to_parent"):
        run(pg_db, "INSERT INTO child VALUES (7, 5, 5, NULL)")
    run(pg_db, "DELETE FROM parent WHERE a = 2")  # ON DELETE CASCADE still there
    assert sorted(r[0] for r in rows(pg_db, "SELECT id FROM child")) == [1, 3]


def test_without_orphans_everything_comes_back_and_nothing_is_deleted(pg_db: str) -> None:
    run(pg_db, *SCHEMA)
    declared = _definitions(pg_db)
    with connect(pg_db) as conn, transaction(conn) as cur:
        aside = bulk_load.set_aside(cur, "child")
        assert aside is not None
        cur.execute("INSERT INTO child VALUES (1, 1, 1, NULL), (2, 2, 2, 1)")
        assert bulk_load.restore(cur, aside, "t.id") == []
    assert _definitions(pg_db) == declared
    assert sorted(r[0] for r in rows(pg_db, "SELECT id FROM child")) == [1, 2]


def test_match_full_rejects_a_partly_null_reference(pg_db: str) -> None:
    run(pg_db, "CREATE TABLE parent (a int, b int, PRIMARY KEY (a, b))",
        "CREATE TABLE child (id int PRIMARY KEY, pa int, pb int, FOREIGN KEY (pa, pb) REFERENCES parent MATCH FULL)")  # fmt: skip
    with connect(pg_db) as conn, transaction(conn) as cur:
        fks = bulk_load.foreign_keys(cur, "child")
        assert fks is not None and fks[0].match_full
        bulk_load.drop(cur, "child", fks)
        cur.execute("INSERT INTO child VALUES (1, NULL, NULL), (2, 1, NULL)")
        assert set(_by_id(bulk_load.delete_orphans(cur, "child", "t.id", fks))) == {2}
        bulk_load.add_back(cur, "child", fks)


def test_a_table_this_role_does_not_own_is_left_alone(pg_db: str) -> None:
    run(pg_db, *SCHEMA, "CREATE ROLE tidesync_reader_fk", "ALTER TABLE child OWNER TO tidesync_reader_fk")
    try:
        run(pg_db, "CREATE ROLE tidesync_other_fk", "GRANT ALL ON child, parent TO tidesync_other_fk")
        with connect(pg_db) as conn, transaction(conn) as cur:
            cur.execute("SET LOCAL ROLE tidesync_other_fk")
            assert bulk_load.set_aside(cur, "child") is None
    finally:
        run(pg_db, "DROP TABLE child", "DROP OWNED BY tidesync_other_fk", "DROP ROLE tidesync_reader_fk",
            "DROP ROLE tidesync_other_fk")  # fmt: skip
