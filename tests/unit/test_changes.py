"""tidesync.changes: batches conformed to the wire schema, and apply plans."""

from __future__ import annotations

import pyarrow as pa
import pytest

import tidesync
from tidesync import SchemaMismatchError
from tidesync.bench.store_bench import SPEC, make_patients
from tidesync.changes import ApplyOptions, conform, new_rows, plan_apply, quarantine_bisect


def test_plan_for_an_empty_table_is_what_merge_gives() -> None:
    batch = make_patients(500, seed=3)
    i = batch.schema.get_field_index("_deleted")
    tomb = batch.slice(0, 5).set_column(i, batch.schema.field(i), pa.array([True] * 5))
    batch = pa.concat_tables([tomb, batch.slice(5)])
    empty = SPEC.wire_schema().empty_table()
    plan = plan_apply(SPEC, empty, batch, peer="central")
    merged = tidesync.merge(empty, batch, SPEC.key, SPEC.merge)
    live = merged.rows.filter(pa.compute.invert(merged.rows.column("_deleted")))
    assert plan.inserts.drop_columns(["_origin"]).equals(live.drop_columns(["_deleted"]))
    assert plan.deletes.num_rows == 5 and plan.updates.num_rows == 0
    assert plan.conflicts.schema.equals(merged.conflicts.schema) and plan.conflicts.num_rows == 0
    assert set(plan.inserts.column("_origin").to_pylist()) == {"central"}


@pytest.mark.parametrize("peer", ["central", None])
def test_new_rows_of_a_bulk_load_are_what_plan_apply_inserts(peer: str | None) -> None:
    batch = make_patients(300, seed=5)
    restamped = ApplyOptions(restamped={SPEC.name: batch.column(SPEC.key).combine_chunks()[:7]})
    empty = SPEC.wire_schema().empty_table()
    for options in (ApplyOptions(), restamped):
        assert new_rows(SPEC, batch, peer, options).equals(plan_apply(SPEC, empty, batch, peer, options).inserts)


def test_conform_names_the_problem() -> None:
    batch = make_patients(3)
    with pytest.raises(SchemaMismatchError, match="unknown columns \\['extra'\\]"):
        conform(batch.append_column("extra", pa.array([1, 2, 3])), SPEC)
    shuffled = batch.select(list(reversed(batch.column_names)))
    assert conform(shuffled, SPEC).equals(batch)


def test_quarantine_bisect_isolates_exactly_the_bad_rows() -> None:
    rows = pa.table({"v": list(range(100))})
    bad = {3, 57, 58, 99}
    calls = []

    def attempt(b: pa.Table) -> str | None:
        calls.append(b.num_rows)
        hit = bad & set(b.column("v").to_pylist())
        return f"bad {sorted(hit)}" if hit else None

    found = quarantine_bisect(rows, attempt)
    assert {i for i, _ in found} == bad
    assert all(reason == f"bad [{i}]" for i, reason in found)
    assert len(calls) < 60  # O(k log n), not n


def test_keys_from_texts_inverts_key_texts_and_names_a_bad_key() -> None:
    from tidesync.changes import key_texts, keys_from_texts

    keys = make_patients(20, seed=9).column(SPEC.key).combine_chunks()
    assert keys_from_texts(SPEC, key_texts(SPEC, keys)).equals(keys)
    with pytest.raises(SchemaMismatchError, match="not a key of table 'patients'"):
        keys_from_texts(SPEC, ["not-a-uuid"])
