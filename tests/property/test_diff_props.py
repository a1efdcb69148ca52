"""Native ``diff`` agrees with the reference on every supported type, and rejects bad input."""

from __future__ import annotations

import math
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tidesync
from tidesync import reference
from tidesync.errors import (
    DuplicateKeyError,
    InvalidInputError,
    SchemaMismatchError,
    SyncError,
    UnsupportedTypeError,
)

from .checks import assert_same_table, schema_sig
from .strategies import KEY, KEY_TYPES, VALUE_TYPES, ColType, diff_cases, make_table


def assert_same_diff(old: Any, new: Any, key: str = KEY) -> tidesync.Diff:
    native = tidesync.diff(old, new, key)
    ref = reference.diff(old, new, key)
    assert_same_table(native.inserted, ref.inserted, "inserted")
    assert_same_table(native.deleted, ref.deleted, "deleted")
    assert_same_table(native.updated, ref.updated, "updated")
    return native


@given(diff_cases())
def test_diff_matches_reference(case: tuple[pa.Table, pa.Table, str]) -> None:
    old, new, key = case
    assert_same_diff(old, new, key)


@given(diff_cases(), st.sampled_from(["batch", "chunked"]))
def test_diff_accepts_record_batches_and_chunked_tables(
    case: tuple[pa.Table, pa.Table, str], form: str
) -> None:
    """The input's container (one RecordBatch, a Table of several chunks) is irrelevant."""
    old, new, key = case
    if form == "batch":
        old_in: Any = old.combine_chunks().to_batches()[0] if old.num_rows else old
        new_in: Any = new.combine_chunks().to_batches()[0] if new.num_rows else new
    else:
        old_in = _rechunk(old)
        new_in = _rechunk(new)
    native = tidesync.diff(old_in, new_in, key)
    ref = reference.diff(old, new, key)
    assert_same_table(native.inserted, ref.inserted, "inserted")
    assert_same_table(native.deleted, ref.deleted, "deleted")
    assert_same_table(native.updated, ref.updated, "updated")


def _rechunk(table: pa.Table) -> pa.Table:
    """The same rows split into chunks of at most two rows."""
    batches = table.combine_chunks().to_batches(max_chunksize=2)
    return pa.Table.from_batches(batches, schema=table.schema)


@given(diff_cases())
def test_diff_of_a_table_with_itself_is_empty(case: tuple[pa.Table, pa.Table, str]) -> None:
    _, new, key = case
    d = tidesync.diff(new, new, key)
    assert d.inserted.num_rows == d.deleted.num_rows == d.updated.num_rows == 0


@given(diff_cases())
def test_diff_partitions_keys(case: tuple[pa.Table, pa.Table, str]) -> None:
    """Every key is inserted, deleted, updated or unchanged — exactly one of them —
    and the indices point at the rows carrying that key."""
    old, new, key = case
    d = tidesync.diff(old, new, key)
    old_keys = old.column(key).to_pylist()
    new_keys = new.column(key).to_pylist()
    ins = d.inserted.column(key).to_pylist()
    dels = d.deleted.column(key).to_pylist()
    upd = d.updated.column(key).to_pylist()
    assert set(ins) == set(new_keys) - set(old_keys)
    assert set(dels) == set(old_keys) - set(new_keys)
    assert set(upd) <= set(old_keys) & set(new_keys)
    assert [new_keys[i] for i in d.inserted.column("_new_index").to_pylist()] == ins
    assert [old_keys[i] for i in d.deleted.column("_old_index").to_pylist()] == dels
    assert [old_keys[i] for i in d.updated.column("_old_index").to_pylist()] == upd
    assert [new_keys[i] for i in d.updated.column("_new_index").to_pylist()] == upd
    for row in d.updated.to_pylist():  # an updated row changed at least one column
        assert any(v for c, v in row.items() if c not in (key, "_old_index", "_new_index"))


def test_diff_float_equality_is_total_order() -> None:
    """NaN equals NaN, -0.0 differs from 0.0, null equals null and differs from 0."""
    old = pa.table({KEY: [1, 2, 3, 4, 5], "x": [math.nan, -0.0, None, None, math.inf]})
    new = pa.table({KEY: [1, 2, 3, 4, 5], "x": [math.nan, 0.0, None, 0.0, math.inf]})
    d = assert_same_diff(old, new)
    assert d.updated.column(KEY).to_pylist() == [2, 4]
    assert d.updated.column("x").to_pylist() == [True, True]


def test_diff_output_schema_and_order() -> None:
    old = pa.table({"v": [1, 2, 3, 4], KEY: ["d", "b", "a", "c"]})
    new = pa.table({"v": [9, 1, 5, 3], KEY: ["e", "d", "c", "a"]})
    d = assert_same_diff(old, new)
    assert schema_sig(d.inserted) == [(KEY, pa.utf8()), ("_new_index", pa.uint32())]
    assert schema_sig(d.deleted) == [(KEY, pa.utf8()), ("_old_index", pa.uint32())]
    assert schema_sig(d.updated) == [
        (KEY, pa.utf8()),
        ("_old_index", pa.uint32()),
        ("_new_index", pa.uint32()),
        ("v", pa.bool_()),
    ]
    assert d.inserted.to_pylist() == [{KEY: "e", "_new_index": 0}]
    assert d.deleted.to_pylist() == [{KEY: "b", "_old_index": 1}]
    # "d" and "a" kept their values; only "c" changed (4 -> 5).
    assert d.updated.to_pylist() == [{KEY: "c", "_old_index": 3, "_new_index": 2, "v": True}]


@pytest.mark.parametrize("col", VALUE_TYPES, ids=lambda c: c.label)
def test_diff_empty_batches(col: ColType) -> None:
    empty = make_table([(KEY, KEY_TYPES[0]), ("v", col)], [])
    d = assert_same_diff(empty, empty)
    assert d.inserted.num_rows == d.deleted.num_rows == d.updated.num_rows == 0


@given(diff_cases())
def test_diff_accepts_polars(case: tuple[pa.Table, pa.Table, str]) -> None:
    """A polars DataFrame goes in through the Arrow PyCapsule interface.

    Only types polars round-trips without changing them (ints, floats, bools) are
    used: polars exports strings as utf8_view, which is not a key type.
    """
    old, new, key = case
    numeric = [
        n for n, t in zip(old.column_names, old.schema.types, strict=True)
        if pa.types.is_int64(t) or pa.types.is_float64(t) or pa.types.is_boolean(t)
    ]
    # Re-key with int64 (same key -> same int on both sides) so polars keeps the key type.
    ids = {k: i for i, k in enumerate(old.column(key).to_pylist() + new.column(key).to_pylist())}

    def rekey(t: pa.Table) -> pa.Table:
        int_keys = pa.array([ids[k] for k in t.column(key).to_pylist()], pa.int64())
        return t.set_column(t.column_names.index(key), key, int_keys)

    columns = [key, *(n for n in numeric if n != key)]
    old, new = rekey(old).select(columns), rekey(new).select(columns)
    native = tidesync.diff(pl.from_arrow(old), pl.from_arrow(new), key)
    ref = reference.diff(old, new, key)
    assert_same_table(native.inserted, ref.inserted, "inserted")
    assert_same_table(native.deleted, ref.deleted, "deleted")
    assert_same_table(native.updated, ref.updated, "updated")


def test_diff_polars_frame() -> None:
    old = pl.DataFrame({KEY: [1, 2, 3], "dose": [1.0, 2.0, None], "ok": [True, False, None]})
    new = pl.DataFrame({KEY: [3, 2, 4], "dose": [None, 2.5, 1.0], "ok": [None, False, True]})
    d = tidesync.diff(old, new, KEY)
    assert d.inserted.to_pylist() == [{KEY: 4, "_new_index": 2}]
    assert d.deleted.to_pylist() == [{KEY: 1, "_old_index": 0}]
    assert d.updated.to_pylist() == [
        {KEY: 2, "_old_index": 1, "_new_index": 1, "dose": True, "ok": False}
    ]


# ------------------------------------------------------------------------- errors


def test_errors_are_sync_errors() -> None:
    for cls in (DuplicateKeyError, InvalidInputError, SchemaMismatchError, UnsupportedTypeError):
        assert issubclass(cls, SyncError)
    assert tidesync.DuplicateKeyError is DuplicateKeyError


IMPLS = [pytest.param(tidesync.diff, id="native"), pytest.param(reference.diff, id="reference")]


@pytest.mark.parametrize("diff", IMPLS)
@given(col=st.sampled_from(KEY_TYPES), data=st.data())
def test_diff_duplicate_keys(diff: Any, col: ColType, data: st.DataObject) -> None:
    keys = data.draw(st.lists(col.values, unique=True, min_size=1, max_size=4))
    dup = data.draw(st.sampled_from(keys))
    rows = [{KEY: k, "v": i} for i, k in enumerate(keys)]
    with_dup = data.draw(st.permutations([*rows, {KEY: dup, "v": 99}]))
    columns = [(KEY, col), ("v", KEY_TYPES[3])]
    good, bad = make_table(columns, rows), make_table(columns, with_dup)
    with pytest.raises(DuplicateKeyError):
        diff(bad, good, KEY)
    with pytest.raises(DuplicateKeyError):
        diff(good, bad, KEY)


@pytest.mark.parametrize("diff", IMPLS)
@given(col=st.sampled_from(KEY_TYPES), data=st.data())
def test_diff_null_keys(diff: Any, col: ColType, data: st.DataObject) -> None:
    keys = data.draw(st.lists(col.values, unique=True, max_size=4))
    rows = [{KEY: k, "v": i} for i, k in enumerate(keys)]
    with_null = data.draw(st.permutations([*rows, {KEY: None, "v": 99}]))
    columns = [(KEY, col), ("v", KEY_TYPES[3])]
    good, bad = make_table(columns, rows), make_table(columns, with_null)
    with pytest.raises(InvalidInputError):
        diff(bad, good, KEY)
    with pytest.raises(InvalidInputError):
        diff(good, bad, KEY)


@pytest.mark.parametrize("diff", IMPLS)
@pytest.mark.parametrize(
    "other",
    [
        pytest.param(pa.table({KEY: ["a"], "v": pa.array([1], pa.int32())}), id="type"),
        pytest.param(pa.table({KEY: ["a"], "w": [1]}), id="name"),
        pytest.param(pa.table({"v": [1], KEY: ["a"]}), id="order"),
        pytest.param(pa.table({KEY: ["a"], "v": [1], "w": [1]}), id="extra-column"),
        pytest.param(pa.table({KEY: pa.array(["a"], pa.large_utf8()), "v": [1]}), id="key-type"),
    ],
)
def test_diff_schema_mismatch(diff: Any, other: pa.Table) -> None:
    base = pa.table({KEY: ["a"], "v": [1]})
    with pytest.raises(SchemaMismatchError):
        diff(base, other, KEY)
    with pytest.raises(SchemaMismatchError):
        diff(other, base, KEY)


@pytest.mark.parametrize("diff", IMPLS)
def test_diff_unknown_key_column(diff: Any) -> None:
    t = pa.table({KEY: ["a"], "v": [1]})
    with pytest.raises(InvalidInputError):
        diff(t, t, "nope")


@pytest.mark.parametrize("diff", IMPLS)
@pytest.mark.parametrize("key_type", [pa.float64(), pa.bool_(), pa.date32()], ids=str)
def test_diff_unsupported_key_type(diff: Any, key_type: pa.DataType) -> None:
    """Only the key types the spec lists can be keys (UnsupportedTypeError otherwise)."""
    t = pa.table({KEY: pa.array([1], pa.int32()).cast(key_type), "v": [1]})
    with pytest.raises(UnsupportedTypeError):
        diff(t, t, KEY)
