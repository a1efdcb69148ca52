"""Range digests: order-independent, sensitive to exactly the hashed columns, located
to the right bucket and row, and refinable by splitting buckets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st

import tidesync
from tidesync.errors import InvalidInputError
from tidesync.reference import value_keys

from .strategies import KEY, KEY_TYPES, NODES, VALUE_TYPES, ColType, make_table

MASK64 = (1 << 64) - 1


@dataclass
class Synced:
    table: pa.Table  # columns: KEY, _hlc, _node, note
    content_type: ColType  # the type of `note`


@st.composite
def synced_tables(draw: st.DrawFn, min_rows: int = 0) -> Synced:
    """A table of unique keys with ``_hlc``, ``_node`` and one content column."""
    key_col = draw(st.sampled_from(KEY_TYPES))
    content_col = draw(st.sampled_from(VALUE_TYPES))
    keys = draw(st.lists(key_col.values, unique=True, min_size=min_rows, max_size=40))
    rows = [
        {
            KEY: k,
            "_hlc": draw(st.integers(0, 1 << 62)),
            "_node": draw(st.sampled_from(NODES)),
            "note": draw(content_col.nullable()),
        }
        for k in keys
    ]
    columns = [
        (KEY, key_col),
        ("_hlc", ColType("hlc", pa.int64(), st.nothing())),
        ("_node", ColType("node", pa.utf8(), st.nothing())),
        ("note", content_col),
    ]
    return Synced(make_table(columns, rows), content_col)


_buckets = st.sampled_from([1, 2, 4, 8, 64, 1024])


def as_dict(digest: pa.Table) -> dict[int, tuple[int, int]]:
    return {r["bucket"]: (r["rows"], r["hash"]) for r in digest.to_pylist()}


@given(synced_tables(), _buckets)
def test_digest_shape_and_consistency_with_row_hashes(s: Synced, buckets: int) -> None:
    d = tidesync.digest(s.table, KEY, buckets)
    assert [(f.name, f.type) for f in d.schema] == [
        ("bucket", pa.uint32()),
        ("rows", pa.uint64()),
        ("hash", pa.uint64()),
    ]
    assert sorted(d.column("bucket").to_pylist()) == list(range(buckets))
    rh = tidesync.row_hashes(s.table, KEY, buckets)
    assert [(f.name, f.type) for f in rh.schema] == [
        (KEY, s.table.schema.field(KEY).type),
        ("bucket", pa.uint32()),
        ("hash", pa.uint64()),
    ]
    assert rh.column(KEY).to_pylist() == s.table.column(KEY).to_pylist()
    # A bucket is the count and wrapping sum of its rows' hashes.
    want: dict[int, tuple[int, int]] = {b: (0, 0) for b in range(buckets)}
    for r in rh.to_pylist():
        assert 0 <= r["bucket"] < buckets
        n, h = want[r["bucket"]]
        want[r["bucket"]] = (n + 1, (h + r["hash"]) & MASK64)
    assert as_dict(d) == want


@given(synced_tables(), _buckets, st.data())
def test_digest_ignores_row_order(s: Synced, buckets: int, data: st.DataObject) -> None:
    perm = data.draw(st.permutations(range(s.table.num_rows)))
    shuffled = s.table.take(pa.array(perm, pa.int64()))
    chunked = pa.Table.from_batches(shuffled.to_batches(max_chunksize=3), schema=shuffled.schema)
    for cols in (["_hlc", "_node"], ["_hlc", "_node", "note"], ["note"]):
        assert tidesync.digest(s.table, KEY, buckets, cols).equals(
            tidesync.digest(chunked, KEY, buckets, cols)
        )
        assert tidesync.differing_buckets(
            tidesync.digest(s.table, KEY, buckets, cols), tidesync.digest(shuffled, KEY, buckets, cols)
        ) == []


def _replace(table: pa.Table, column: str, i: int, value: Any) -> pa.Table:
    """``table`` with row ``i`` of ``column`` set to ``value`` (no round trip through
    Python values, which cannot hold every timestamp or date32)."""
    col = table.column(column).combine_chunks()
    patched = pa.concat_arrays([col[:i], pa.array([value], col.type), col[i + 1 :]])
    return table.set_column(table.column_names.index(column), column, patched)


@given(synced_tables(min_rows=1), _buckets, st.sampled_from(["_hlc", "_node", "note"]), st.data())
def test_one_changed_row_is_found(s: Synced, buckets: int, column: str, data: st.DataObject) -> None:
    """Changing one hashed value changes exactly that row's bucket, and row_hashes of
    that bucket single out exactly that row."""
    i = data.draw(st.integers(0, s.table.num_rows - 1))
    new: Any
    if column == "_hlc":
        old = s.table.column(column)[i].as_py()
        new = data.draw(st.integers(0, 1 << 62).filter(lambda v: v != old))
    elif column == "_node":
        old = s.table.column(column)[i].as_py()
        new = data.draw(st.sampled_from([n for n in NODES if n != old]))
    else:
        new = data.draw(s.content_type.nullable())
    changed = _replace(s.table, column, i, new)
    # The value really changed (by the spec's equality: a NaN replaced by the same NaN,
    # or a value by itself, is no change).
    assume(value_keys(s.table.column(column))[i] != value_keys(changed.column(column))[i])
    key = s.table.column(KEY)[i].as_py()
    note(f"row {i} key {key!r}: {column} -> {new!r}")
    cols = ["_hlc", "_node", "note"] if column == "note" else ["_hlc", "_node"]

    da = tidesync.digest(s.table, KEY, buckets, cols)
    db = tidesync.digest(changed, KEY, buckets, cols)
    rows = tidesync.row_hashes(s.table, KEY, buckets, cols)
    bucket = rows.column("bucket")[i].as_py()
    assert tidesync.differing_buckets(da, db) == [bucket]

    ra = tidesync.row_hashes(s.table, KEY, buckets, cols).to_pylist()
    rb = tidesync.row_hashes(changed, KEY, buckets, cols).to_pylist()
    in_a = {r[KEY]: r["hash"] for r in ra if r["bucket"] == bucket}
    in_b = {r[KEY]: r["hash"] for r in rb if r["bucket"] == bucket}
    assert in_a.keys() == in_b.keys()
    assert [k for k in in_a if in_a[k] != in_b[k]] == [key]


@given(synced_tables(min_rows=1), _buckets, st.data())
def test_unhashed_columns_do_not_matter(s: Synced, buckets: int, data: st.DataObject) -> None:
    """By default only key, _hlc and _node are hashed: a content change alone is invisible."""
    i = data.draw(st.integers(0, s.table.num_rows - 1))
    changed = _replace(s.table, "note", i, data.draw(s.content_type.nullable()))
    assert tidesync.digest(s.table, KEY, buckets).equals(tidesync.digest(changed, KEY, buckets))
    assert tidesync.row_hashes(s.table, KEY, buckets).equals(tidesync.row_hashes(changed, KEY, buckets))


@given(synced_tables(), st.integers(0, 10))
def test_bucket_refinement(s: Synced, k: int) -> None:
    """Bucket b of 2^k is the union of buckets 2b and 2b+1 of 2^(k+1)."""
    coarse = as_dict(tidesync.digest(s.table, KEY, 1 << k))
    fine = as_dict(tidesync.digest(s.table, KEY, 1 << (k + 1)))
    for b, (n, h) in coarse.items():
        (n0, h0), (n1, h1) = fine[2 * b], fine[2 * b + 1]
        assert n == n0 + n1
        assert h == (h0 + h1) & MASK64
    rc = tidesync.row_hashes(s.table, KEY, 1 << k)
    rf = tidesync.row_hashes(s.table, KEY, 1 << (k + 1))
    assert [b >> 1 for b in rf.column("bucket").to_pylist()] == rc.column("bucket").to_pylist()
    # The row hash does not depend on the number of buckets.
    assert rf.column("hash").equals(rc.column("hash"))


@given(synced_tables(), _buckets)
def test_one_bucket_holds_everything(s: Synced, buckets: int) -> None:
    total = tidesync.digest(s.table, KEY, 1).to_pylist()
    d = tidesync.digest(s.table, KEY, buckets).to_pylist()
    assert total[0]["rows"] == s.table.num_rows == sum(r["rows"] for r in d)
    assert total[0]["hash"] == sum(r["hash"] for r in d) & MASK64


def test_empty_table_digest_is_zero() -> None:
    empty = pa.table(
        {KEY: pa.array([], pa.utf8()), "_hlc": pa.array([], pa.int64()), "_node": pa.array([], pa.utf8())}
    )
    d = tidesync.digest(empty, KEY, 8)
    assert d.to_pylist() == [{"bucket": b, "rows": 0, "hash": 0} for b in range(8)]
    assert tidesync.row_hashes(empty, KEY, 8).num_rows == 0


@pytest.mark.parametrize("buckets", [0, 3, 6, 1000, 1025])
@pytest.mark.parametrize("fn", [tidesync.digest, tidesync.row_hashes], ids=["digest", "row_hashes"])
def test_buckets_must_be_a_power_of_two(fn: Any, buckets: int) -> None:
    t = pa.table({KEY: ["a"], "_hlc": [1], "_node": ["n"]})
    with pytest.raises(InvalidInputError):
        fn(t, KEY, buckets)


def test_differing_buckets_needs_equal_sizes() -> None:
    t = pa.table({KEY: ["a"], "_hlc": [1], "_node": ["n"]})
    with pytest.raises(InvalidInputError):
        tidesync.differing_buckets(tidesync.digest(t, KEY, 4), tidesync.digest(t, KEY, 8))


@given(synced_tables(), _buckets)
def test_digest_does_not_depend_on_the_string_layout(s: Synced, buckets: int) -> None:
    """Text as utf8, large_utf8 or utf8_view hashes alike: the fast path (utf8 or
    large_utf8 key and ``_node``, int64 ``_hlc``) and the general one (views) agree."""
    want = tidesync.digest(s.table, KEY, buckets)
    want_rows = tidesync.row_hashes(s.table, KEY, buckets).column("hash")
    key_type = s.table.schema.field(KEY).type
    for text in (pa.large_utf8(), pa.string_view()):
        t = s.table.set_column(2, "_node", s.table.column("_node").cast(text))
        if pa.types.is_string(key_type):
            t = t.set_column(0, KEY, t.column(KEY).cast(text))
        assert tidesync.digest(t, KEY, buckets).equals(want), text
        assert tidesync.row_hashes(t, KEY, buckets).column("hash").equals(want_rows), text
