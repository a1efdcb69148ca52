"""Native ``merge`` agrees with the reference; merge laws hold on table states; the
conflict rules behave as docs/semantics.md describes on hand-written histories."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import tidesync
from tidesync import reference
from tidesync.core import MergeMode
from tidesync.errors import (
    DuplicateKeyError,
    InvalidInputError,
    SchemaMismatchError,
    UnsupportedTypeError,
)

from .checks import apply, assert_same_merge, canon_rows, same_state, schema_sig, show
from .strategies import KEY, MergeScenario, merge_scenarios

MODES: list[MergeMode] = ["record", "field"]
IMPLS = [pytest.param(tidesync.merge, id="native"), pytest.param(reference.merge, id="reference")]


def _tables(sc: MergeScenario) -> tuple[pa.Table, list[pa.Table]]:
    state = sc.schema.table(sc.state)
    batches = [sc.schema.table(b) for b in sc.batches]
    note(f"mode={sc.schema.mode} schema={state.schema}")
    note(f"state={show(state)}")
    for i, b in enumerate(batches):
        note(f"batch{i}={show(b)}")
    return state, batches


# ------------------------------------------------------------- native == reference


@pytest.mark.parametrize("mode", MODES)
@given(data=st.data())
def test_merge_matches_reference(mode: MergeMode, data: st.DataObject) -> None:
    sc = data.draw(merge_scenarios(mode, n_batches=1))
    state, (batch,) = _tables(sc)
    native = tidesync.merge(state, batch, KEY, mode)
    ref = reference.merge(state, batch, KEY, mode)
    assert_same_merge(native, ref)


@pytest.mark.parametrize("mode", MODES)
@given(data=st.data())
def test_merge_row_order(mode: MergeMode, data: st.DataObject) -> None:
    """Field mode writes rows in order of the first appearance of their key in
    ``incoming``; record mode in incoming order of the version written (its ``source``).

    Only keys and flags are compared: row contents are test_merge_matches_reference's job.
    """
    sc = data.draw(merge_scenarios(mode, n_batches=1))
    state, (batch,) = _tables(sc)
    native = tidesync.merge(state, batch, KEY, mode)
    if mode == "field":
        ref = reference.merge(state, batch, KEY, mode)
        assert native.rows.column(KEY).to_pylist() == ref.rows.column(KEY).to_pylist()
        assert native.inserted.to_pylist() == ref.inserted.to_pylist()
    else:
        sources = native.source.to_pylist()
        assert None not in sources, "a record-mode row is always a copy of an incoming row"
        assert sources == sorted(set(sources)), f"rows not in incoming order: {sources}"


@pytest.mark.parametrize("mode", MODES)
@given(data=st.data())
def test_merge_says_where_each_row_stands(mode: MergeMode, data: st.DataObject) -> None:
    """``local_row`` is the key's local row; ``source``, when set, is an incoming row
    equal to the output row in every column, and it is set whenever a key's one
    incoming version is such a copy (with several versions it may stay null); ``keys``
    counts distinct incoming keys."""
    sc = data.draw(merge_scenarios(mode, n_batches=1))
    state, (batch,) = _tables(sc)
    native = tidesync.merge(state, batch, KEY, mode)
    ref = reference.merge(state, batch, KEY, mode)
    # Row order differs between the modes (test_merge_row_order): compare by key.
    keys = native.rows.column(KEY).to_pylist()
    ref_keys = ref.rows.column(KEY).to_pylist()
    assert dict(zip(keys, native.local_row.to_pylist(), strict=True)) == dict(
        zip(ref_keys, ref.local_row.to_pylist(), strict=True)
    )
    assert native.inserted.to_pylist() == [r is None for r in native.local_row.to_pylist()]
    assert native.keys == ref.keys == len(set(batch.column(KEY).to_pylist()))
    out, inc = canon_rows(native.rows), canon_rows(batch.cast(native.rows.schema))
    versions = Counter(batch.column(KEY).to_pylist())
    ref_source = dict(zip(ref_keys, ref.source.to_pylist(), strict=True))
    for i, src in enumerate(native.source.to_pylist()):
        ref_src = ref_source[keys[i]]
        if src is not None:
            assert inc[src] == out[i], f"row {i} is not a copy of incoming row {src}"
        elif versions[keys[i]] == 1:
            assert ref_src is None, f"row {i} copies incoming row {ref_src}, but source is null"


@pytest.mark.parametrize("mode", MODES)
@given(data=st.data())
def test_merge_into_empty_and_of_empty(mode: MergeMode, data: st.DataObject) -> None:
    sc = data.draw(merge_scenarios(mode, n_batches=1))
    state, (batch,) = _tables(sc)
    empty = state.slice(0, 0)
    assert_same_merge(
        tidesync.merge(empty, batch, KEY, mode), reference.merge(empty, batch, KEY, mode)
    )
    nothing = tidesync.merge(state, empty, KEY, mode)
    assert nothing.rows.num_rows == nothing.conflicts.num_rows == len(nothing.inserted) == 0
    assert schema_sig(nothing.rows) == schema_sig(state)


@pytest.mark.parametrize("mode", MODES)
@given(data=st.data())
def test_merge_accepts_record_batches_and_chunked_tables(mode: MergeMode, data: st.DataObject) -> None:
    sc = data.draw(merge_scenarios(mode, n_batches=1))
    state, (batch,) = _tables(sc)
    chunked = pa.Table.from_batches(batch.to_batches(max_chunksize=1), schema=batch.schema)
    local_in: Any = state.to_batches()[0] if state.num_rows else state
    assert_same_merge(
        tidesync.merge(local_in, chunked, KEY, mode), reference.merge(state, batch, KEY, mode)
    )


# -------------------------------------------------------------------- merge laws


def check_commutative(s: pa.Table, a: pa.Table, b: pa.Table, mode: MergeMode, merge: Any) -> None:
    ab = apply(apply(s, a, mode, merge), b, mode, merge)
    ba = apply(apply(s, b, mode, merge), a, mode, merge)
    assert same_state(ab, ba), f"\nS+A+B {show(ab)}\nS+B+A {show(ba)}"


def check_associative(s: pa.Table, a: pa.Table, b: pa.Table, mode: MergeMode, merge: Any) -> None:
    at_once = apply(s, pa.concat_tables([a, b]), mode, merge)
    one_by_one = apply(apply(s, a, mode, merge), b, mode, merge)
    assert same_state(at_once, one_by_one), (
        f"\nS+(A++B) {show(at_once)}\nS+A+B    {show(one_by_one)}"
    )


def check_idempotent(s: pa.Table, a: pa.Table, mode: MergeMode, merge: Any) -> None:
    once = apply(s, a, mode, merge)
    assert same_state(apply(once, a, mode, merge), once)
    again = merge(once, a, KEY, mode)
    assert again.rows.num_rows == 0, f"re-applying wrote {show(again.rows)}"


def check_batch_order_irrelevant(s: pa.Table, a: pa.Table, shuffled: pa.Table, mode: MergeMode, merge: Any) -> None:
    """Shuffling the rows of ``incoming`` changes nothing but the output row order."""
    assert_same_merge(merge(s, a, KEY, mode), merge(s, shuffled, KEY, mode))


@pytest.mark.parametrize("mode", MODES)
@given(data=st.data())
def test_merge_commutative(mode: MergeMode, data: st.DataObject) -> None:
    s, (a, b) = _tables(data.draw(merge_scenarios(mode, n_batches=2)))
    check_commutative(s, a, b, mode, tidesync.merge)


@pytest.mark.parametrize("mode", MODES)
@given(data=st.data())
def test_merge_associative(mode: MergeMode, data: st.DataObject) -> None:
    s, (a, b) = _tables(data.draw(merge_scenarios(mode, n_batches=2)))
    check_associative(s, a, b, mode, tidesync.merge)


@pytest.mark.parametrize("mode", MODES)
@given(data=st.data())
def test_merge_idempotent(mode: MergeMode, data: st.DataObject) -> None:
    s, (a,) = _tables(data.draw(merge_scenarios(mode, n_batches=1)))
    check_idempotent(s, a, mode, tidesync.merge)


@pytest.mark.parametrize("mode", MODES)
@given(data=st.data())
def test_merge_batch_order_irrelevant(mode: MergeMode, data: st.DataObject) -> None:
    sc = data.draw(merge_scenarios(mode, n_batches=1))
    s, (a,) = _tables(sc)
    shuffled = sc.schema.table(data.draw(st.permutations(sc.batches[0])))
    check_batch_order_irrelevant(s, a, shuffled, mode, tidesync.merge)


# The oracle must obey the laws too. Native == reference on the examples above makes
# this mostly redundant, so it runs on a quarter of the examples, all laws at once.
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=max(10, settings().max_examples // 4))  # settings(): the loaded profile
@given(data=st.data())
def test_reference_obeys_merge_laws(mode: MergeMode, data: st.DataObject) -> None:
    sc = data.draw(merge_scenarios(mode, n_batches=2))
    s, (a, b) = _tables(sc)
    check_commutative(s, a, b, mode, reference.merge)
    check_associative(s, a, b, mode, reference.merge)
    check_idempotent(s, a, mode, reference.merge)
    shuffled = sc.schema.table(data.draw(st.permutations(sc.batches[0])))
    check_batch_order_irrelevant(s, a, shuffled, mode, reference.merge)


_TIE_SCHEMA = pa.schema(
    [
        (KEY, pa.utf8()),
        ("_hlc", pa.int64()),
        ("_node", pa.utf8()),
        ("_base_hlc", pa.int64()),
        ("c", pa.utf8()),
        ("_hlc_c", pa.int64()),
    ]
)


def _tie_table(*rows: tuple[Any, ...]) -> pa.Table:
    return pa.Table.from_pylist([dict(zip(_TIE_SCHEMA.names, r, strict=True)) for r in rows], schema=_TIE_SCHEMA)


# Three versions of one key; x and y carry the same value of c with stamps null and 0.
# Were null counted as 0 there, they would tie and the stamp kept would depend on the
# order of arrival; the spec sorts a null stamp below every stamp, so 0 wins.
_X = ("k", 1, "a", None, "v", None)
_Y = ("k", 5, "a", None, "v", 0)
_Z = ("k", 10, "a", None, "u", None)


@pytest.mark.parametrize("merge", IMPLS)
def test_field_null_and_zero_stamp_tie_commutes(merge: Any) -> None:
    empty = _tie_table()
    a, b = _tie_table(_Y), _tie_table(_X, _Z)
    ab = apply(apply(empty, a, "field", merge), b, "field", merge)
    ba = apply(apply(empty, b, "field", merge), a, "field", merge)
    assert same_state(ab, ba), f"\nS+A+B {show(ab)}\nS+B+A {show(ba)}"


@pytest.mark.parametrize("merge", IMPLS)
def test_field_null_stamp_sorts_below_zero(merge: Any) -> None:
    r = merge(_tie_table(_X), _tie_table(_Y), KEY, "field")
    assert r.rows.to_pylist() == [dict(zip(_TIE_SCHEMA.names, _Y, strict=True))]
    assert merge(_tie_table(_Y), _tie_table(_X), KEY, "field").rows.num_rows == 0


@pytest.mark.parametrize("merge", IMPLS)
def test_field_null_and_zero_stamp_tie_associates(merge: Any) -> None:
    empty = _tie_table()
    a, b = _tie_table(_X, _Z), _tie_table(_Y)
    at_once = apply(empty, pa.concat_tables([a, b]), "field", merge)
    one_by_one = apply(apply(empty, a, "field", merge), b, "field", merge)
    assert same_state(at_once, one_by_one), f"\nS+(A++B) {show(at_once)}\nS+A+B    {show(one_by_one)}"


# --------------------------------------------------- conflict semantics, by example

DELETED_AT = datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)

SCHEMA = pa.schema(
    [
        (KEY, pa.utf8()),
        ("_hlc", pa.int64()),
        ("_node", pa.utf8()),
        ("_base_hlc", pa.int64()),
        ("note", pa.utf8()),
        ("dose", pa.int64()),
        ("deleted_at", pa.timestamp("us", tz="UTC")),
    ]
)
FIELD_SCHEMA = pa.schema(
    [*SCHEMA, ("_hlc_note", pa.int64()), ("_hlc_dose", pa.int64()), ("_hlc_deleted_at", pa.int64())]
)


def row(
    hlc: int,
    node: str,
    base: int | None,
    note: str | None = "n0",
    dose: int | None = 1,
    deleted_at: datetime | None = None,
    stamps: tuple[int | None, int | None, int | None] | None = None,
    key: str = "p1",
) -> dict[str, Any]:
    r: dict[str, Any] = {
        KEY: key,
        "_hlc": hlc,
        "_node": node,
        "_base_hlc": base,
        "note": note,
        "dose": dose,
        "deleted_at": deleted_at,
    }
    if stamps is not None:
        r["_hlc_note"], r["_hlc_dose"], r["_hlc_deleted_at"] = stamps
    return r


def table(*rows: dict[str, Any]) -> pa.Table:
    schema = FIELD_SCHEMA if rows and "_hlc_note" in rows[0] else SCHEMA
    return pa.Table.from_pylist(list(rows), schema=schema)


def field_table(*rows: dict[str, Any]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=FIELD_SCHEMA)


def conflicts_of(result: tidesync.MergeResult) -> list[dict[str, Any]]:
    return sorted(result.conflicts.to_pylist(), key=lambda r: (r["_hlc"], r["_node"]))


def strip(conflict: dict[str, Any]) -> tuple[int, str, int, str, list[str]]:
    """(loser hlc, loser node, winner hlc, winner node, lost columns)."""
    return (
        conflict["_hlc"],
        conflict["_node"],
        conflict["_winner_hlc"],
        conflict["_winner_node"],
        conflict["_lost_columns"],
    )


@pytest.mark.parametrize("merge", IMPLS)
class TestRecordMode:
    def test_sequential_edit_is_not_a_conflict(self, merge: Any) -> None:
        local = row(10, "a", None, note="x")
        edit = row(20, "b", 10, note="y")  # derived from the local version
        r = merge(table(local), table(edit), KEY, "record")
        assert r.rows.to_pylist() == [edit]
        assert r.inserted.to_pylist() == [False]
        assert r.conflicts.num_rows == 0

    def test_older_sequential_version_arriving_late_is_ignored(self, merge: Any) -> None:
        local = row(20, "b", 10, note="y")
        old = row(10, "a", None, note="x")
        r = merge(table(local), table(old), KEY, "record")
        assert r.rows.num_rows == 0
        assert r.conflicts.num_rows == 0

    def test_same_node_is_not_a_conflict(self, merge: Any) -> None:
        local = row(10, "a", 5, note="x")
        mine_later = row(20, "a", 5, note="y")  # the node's own chain of unsynced edits
        r = merge(table(local), table(mine_later), KEY, "record")
        assert r.rows.to_pylist() == [mine_later]
        assert r.conflicts.num_rows == 0

    def test_concurrent_edits_log_the_loser(self, merge: Any) -> None:
        local = row(10, "a", 5, note="x", dose=2)
        theirs = row(20, "b", 5, note="y", dose=2)
        r = merge(table(local), table(theirs), KEY, "record")
        assert r.rows.to_pylist() == [theirs]
        [c] = conflicts_of(r)
        assert strip(c) == (10, "a", 20, "b", ["note"])
        assert {k: c[k] for k in local} == local  # the losing row, whole
        assert [f.name for f in r.conflicts.schema] == [
            *SCHEMA.names,
            "_winner_hlc",
            "_winner_node",
            "_lost_columns",
        ]
        assert r.conflicts.schema.field("_winner_hlc").type == pa.int64()
        assert r.conflicts.schema.field("_winner_node").type == pa.utf8()
        assert r.conflicts.schema.field("_lost_columns").type == pa.list_(pa.utf8())

    def test_concurrent_edit_losing_to_local(self, merge: Any) -> None:
        local = row(20, "b", 5, note="y", dose=3)
        theirs = row(10, "a", 5, note="x", dose=2)
        r = merge(table(local), table(theirs), KEY, "record")
        assert r.rows.num_rows == 0  # local stays
        [c] = conflicts_of(r)
        assert strip(c) == (10, "a", 20, "b", ["note", "dose"])  # schema order

    def test_concurrent_edits_with_equal_data_are_not_a_conflict(self, merge: Any) -> None:
        local = row(10, "a", 5, note="x")
        theirs = row(20, "b", 5, note="x")
        r = merge(table(local), table(theirs), KEY, "record")
        assert r.rows.to_pylist() == [theirs]  # _hlc/_node changed: still written
        assert r.conflicts.num_rows == 0

    def test_node_order_is_utf8_bytewise(self, merge: Any) -> None:
        local = row(10, "é", 5, note="x")
        theirs = row(10, "z", 5, note="y")  # "z" < "é" in UTF-8 bytes
        r = merge(table(local), table(theirs), KEY, "record")
        assert r.rows.num_rows == 0
        assert [strip(c) for c in conflicts_of(r)] == [(10, "z", 10, "é", ["note"])]

    def test_soft_delete_is_a_field(self, merge: Any) -> None:
        deleted = row(10, "a", 5, deleted_at=DELETED_AT)
        edited = row(20, "b", 5, note="y")
        r = merge(table(deleted), table(edited), KEY, "record")
        assert r.rows.to_pylist() == [edited]  # later whole record wins: undeleted
        [c] = conflicts_of(r)
        assert strip(c) == (10, "a", 20, "b", ["note", "deleted_at"])

    def test_several_versions_in_one_batch(self, merge: Any) -> None:
        first = row(10, "a", None, note="x")
        second = row(20, "b", 10, note="y")
        r = merge(table(), table(second, first, second), KEY, "record")
        assert r.rows.to_pylist() == [second]
        assert r.inserted.to_pylist() == [True]
        assert r.conflicts.num_rows == 0

    def test_three_way_concurrency(self, merge: Any) -> None:
        a = row(10, "a", 5, note="x")
        b = row(11, "b", 5, note="y")
        c = row(12, "c", 5, note="z")
        r = merge(table(a), table(c, b), KEY, "record")
        assert r.rows.to_pylist() == [c]
        # Fold in ascending order: (a, b) -> a loses; (b, c) -> b loses.
        assert [strip(x) for x in conflicts_of(r)] == [
            (10, "a", 11, "b", ["note"]),
            (11, "b", 12, "c", ["note"]),
        ]

    def test_same_stamp_and_node_different_content(self, merge: Any) -> None:
        """Should never happen; still deterministic (greatest by the other columns), no conflict."""
        x = row(10, "a", 5, note="x")
        y = row(10, "a", 5, note="y")
        r1 = merge(table(x), table(y), KEY, "record")
        r2 = merge(table(y), table(x), KEY, "record")
        assert r1.rows.to_pylist() == [y]
        assert r2.rows.num_rows == 0
        assert r1.conflicts.num_rows == r2.conflicts.num_rows == 0


@pytest.mark.parametrize("merge", IMPLS)
class TestFieldMode:
    def test_concurrent_edits_of_different_columns_merge(self, merge: Any) -> None:
        local = row(10, "a", 5, note="x", dose=1, stamps=(10, 3, None))
        theirs = row(12, "b", 5, note="n0", dose=2, stamps=(3, 12, None))
        r = merge(field_table(local), field_table(theirs), KEY, "field")
        expected = {**theirs, "note": "x", "_hlc_note": 10}
        assert r.rows.to_pylist() == [expected]
        assert r.inserted.to_pylist() == [False]
        assert r.conflicts.num_rows == 0

    def test_concurrent_edits_of_the_same_column_conflict(self, merge: Any) -> None:
        local = row(10, "a", 5, note="x", stamps=(10, 3, None))
        theirs = row(12, "b", 5, note="y", stamps=(12, 3, None))
        r = merge(field_table(local), field_table(theirs), KEY, "field")
        assert r.rows.to_pylist() == [theirs]
        [c] = conflicts_of(r)
        assert strip(c) == (10, "a", 12, "b", ["note"])

    def test_both_sides_can_lose_a_column(self, merge: Any) -> None:
        local = row(10, "a", 5, note="x", dose=7, stamps=(10, 9, None))
        theirs = row(12, "b", 5, note="y", dose=8, stamps=(6, 12, None))
        r = merge(field_table(local), field_table(theirs), KEY, "field")
        assert r.rows.to_pylist() == [{**theirs, "note": "x", "_hlc_note": 10}]
        assert [strip(c) for c in conflicts_of(r)] == [
            (10, "a", 12, "b", ["dose"]),
            (12, "b", 10, "a", ["note"]),
        ]

    def test_sequential_field_edit_is_not_a_conflict(self, merge: Any) -> None:
        local = row(10, "a", 5, note="x", stamps=(10, 3, None))
        theirs = row(12, "b", 10, note="y", stamps=(12, 3, None))  # derived from local
        r = merge(field_table(local), field_table(theirs), KEY, "field")
        assert r.rows.to_pylist() == [theirs]
        assert r.conflicts.num_rows == 0

    def test_unchanged_since_base_is_not_a_conflict(self, merge: Any) -> None:
        """Only columns both sides wrote after their base can conflict."""
        local = row(10, "a", 5, note="x", stamps=(4, 3, None))  # note older than base
        theirs = row(12, "b", 5, note="y", stamps=(12, 3, None))
        r = merge(field_table(local), field_table(theirs), KEY, "field")
        assert r.rows.to_pylist() == [theirs]
        assert r.conflicts.num_rows == 0

    def test_soft_delete_and_concurrent_edit_both_survive(self, merge: Any) -> None:
        ts = DELETED_AT
        deleted = row(10, "a", 5, deleted_at=ts, stamps=(3, 3, 10))
        edited = row(12, "b", 5, note="y", stamps=(12, 3, None))
        r = merge(field_table(deleted), field_table(edited), KEY, "field")
        assert r.rows.to_pylist() == [{**edited, "deleted_at": ts, "_hlc_deleted_at": 10}]
        assert r.conflicts.num_rows == 0

    def test_same_node_is_not_a_conflict(self, merge: Any) -> None:
        local = row(10, "a", 5, note="x", stamps=(10, 3, None))
        later = row(12, "a", 5, note="y", stamps=(12, 3, None))
        r = merge(field_table(local), field_table(later), KEY, "field")
        assert r.rows.to_pylist() == [later]
        assert r.conflicts.num_rows == 0


# ------------------------------------------------------------------------- errors

BASE = table(row(10, "a", 5))


@pytest.mark.parametrize("merge", IMPLS)
class TestMergeErrors:
    def test_duplicate_local_keys(self, merge: Any) -> None:
        local = table(row(10, "a", 5), row(11, "b", 5))
        with pytest.raises(DuplicateKeyError):
            merge(local, BASE, KEY, "record")

    def test_duplicate_incoming_keys_are_fine(self, merge: Any) -> None:
        incoming = table(row(10, "a", 5), row(11, "b", 5))
        assert merge(BASE, incoming, KEY, "record").rows.num_rows == 1

    @pytest.mark.parametrize("side", ["local", "incoming"])
    def test_null_key(self, merge: Any, side: str) -> None:
        bad = table({**row(10, "a", 5), KEY: None})
        with pytest.raises(InvalidInputError):
            merge(bad, BASE, KEY, "record") if side == "local" else merge(BASE, bad, KEY, "record")

    @pytest.mark.parametrize("column", ["_hlc", "_node"])
    def test_null_metadata(self, merge: Any, column: str) -> None:
        bad = table({**row(10, "a", 5), column: None})
        with pytest.raises(InvalidInputError):
            merge(BASE, bad, KEY, "record")

    @pytest.mark.parametrize("column", ["_hlc", "_node", "_base_hlc"])
    def test_missing_metadata_column(self, merge: Any, column: str) -> None:
        t = BASE.drop_columns([column])
        with pytest.raises(InvalidInputError):
            merge(t, t, KEY, "record")

    def test_unknown_key(self, merge: Any) -> None:
        with pytest.raises(InvalidInputError):
            merge(BASE, BASE, "nope", "record")

    def test_field_mode_needs_every_stamp(self, merge: Any) -> None:
        t = field_table(row(10, "a", 5, stamps=(1, 1, 1))).drop_columns(["_hlc_dose"])
        with pytest.raises(InvalidInputError):
            merge(t, t, KEY, "field")

    def test_schema_mismatch(self, merge: Any) -> None:
        other = BASE.set_column(5, "dose", BASE.column("dose").cast(pa.int32()))
        with pytest.raises(SchemaMismatchError):
            merge(BASE, other, KEY, "record")
        with pytest.raises(SchemaMismatchError):
            merge(BASE, field_table(row(10, "a", 5, stamps=(1, 1, 1))), KEY, "record")

    def test_unsupported_key_type(self, merge: Any) -> None:
        t = BASE.set_column(0, KEY, pa.array([1.5]))
        with pytest.raises(UnsupportedTypeError):
            merge(t, t, KEY, "record")
