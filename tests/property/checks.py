"""Comparison helpers: tables are equal when schemas (names, types) match and every
value is equal under the spec's value equality (so NaN == NaN, -0.0 != 0.0)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

import tidesync
from tidesync import reference
from tidesync.core import MergeMode, MergeResult

from .strategies import KEY


def show(table: pa.Table) -> list[dict[str, Any]]:
    """Rows for messages: temporal columns as their integers, since Python's datetime
    cannot hold every timestamp (``to_pylist`` would raise OverflowError)."""
    columns = []
    for col in table.columns:
        if pa.types.is_temporal(col.type):
            narrow = pa.types.is_date32(col.type) or pa.types.is_time32(col.type)
            col = col.cast(pa.int32() if narrow else pa.int64())
        columns.append(col)
    rows: list[dict[str, Any]] = pa.Table.from_arrays(columns, names=table.column_names).to_pylist()
    return rows


def schema_sig(table: pa.Table) -> list[tuple[str, pa.DataType]]:
    """Names and types in order (nullability and metadata are not part of the contract)."""
    return [(f.name, f.type) for f in table.schema]


def canon_rows(table: pa.Table) -> list[tuple[Any, ...]]:
    """Rows as tuples of value-order keys: equal exactly when the spec calls them equal."""
    cols = [reference.value_keys(table.column(i)) for i in range(table.num_columns)]
    return list(zip(*cols, strict=True)) if cols else [() for _ in range(table.num_rows)]


def assert_same_table(native: pa.Table, ref: pa.Table, what: str, *, ordered: bool = True) -> None:
    assert schema_sig(native) == schema_sig(ref), f"{what}: schema\n{native.schema}\n!=\n{ref.schema}"
    got, want = canon_rows(native), canon_rows(ref)
    if not ordered:
        got, want = sorted(got), sorted(want)
    assert got == want, f"{what}:\nnative    {show(native)}\nreference {show(ref)}"


def sorted_by_key(table: pa.Table, key: str = KEY) -> list[tuple[Any, ...]]:
    """Canonical rows sorted by the key column's value order (then the rest)."""
    rows = canon_rows(table)
    k = table.column_names.index(key)
    return sorted(rows, key=lambda r: (r[k], r))


def assert_same_merge(native: MergeResult, ref: MergeResult, key: str = KEY) -> None:
    """Rows (with their inserted flags) compared as sets sorted by key; conflicts as
    sorted lists, their row order being unspecified."""
    assert schema_sig(native.rows) == schema_sig(ref.rows)
    assert native.inserted.type == pa.bool_()
    assert len(native.inserted) == native.rows.num_rows

    def with_flags(r: MergeResult) -> list[tuple[Any, ...]]:
        rows = canon_rows(r.rows)
        k = r.rows.column_names.index(key)
        flags = r.inserted.to_pylist()
        # Row keys are totally ordered tuples, so the triples sort without a key function.
        return sorted((row[k], row, flag) for row, flag in zip(rows, flags, strict=True))

    assert with_flags(native) == with_flags(ref), (
        f"rows:\nnative    {show(native.rows)} {native.inserted.to_pylist()}\n"
        f"reference {show(ref.rows)} {ref.inserted.to_pylist()}"
    )
    assert_same_table(native.conflicts, ref.conflicts, "conflicts", ordered=False)


MergeFn = Callable[..., MergeResult]


def apply(state: pa.Table, batch: pa.Table, mode: MergeMode, merge: MergeFn = tidesync.merge) -> pa.Table:
    """The destination after a sync: ``state`` with the merged rows upserted by key.

    Also checks the ``inserted`` flags against the state, since that is free here.
    """
    result = merge(state, batch, KEY, mode)
    state_keys = state.column(KEY).to_pylist()
    written = result.rows.column(KEY).to_pylist()
    assert len(set(written)) == len(written), "merge wrote a key twice"
    assert result.inserted.to_pylist() == [k not in set(state_keys) for k in written]
    written_set = set(written)
    keep = pa.array([k not in written_set for k in state_keys], type=pa.bool_())
    return pa.concat_tables([state.filter(keep), result.rows.cast(state.schema)])


def same_state(a: pa.Table, b: pa.Table) -> bool:
    return schema_sig(a) == schema_sig(b) and sorted_by_key(a) == sorted_by_key(b)
