"""pytest-benchmark suite of the native core and its baselines (see conftest.py).

    python -m pytest benches --benchmark-only                 # 200k rows
    TIDESYNC_BENCH_ROWS=1000000 python -m pytest benches --benchmark-only
    python -m pytest benches -q --benchmark-disable           # smoke: each once, 2k rows

The headline figures (medians, ratios, targets) come from ``tidesync bench``; this
suite is for tracking regressions with ``--benchmark-autosave``/``--benchmark-compare``.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import tidesync
from tidesync.bench import core_bench, data

KEY = data.KEY


# --------------------------------------------------------------------------- diff


@pytest.mark.benchmark(group="diff")
def test_diff(benchmark: Any, table: pa.Table, changed: pa.Table) -> None:
    d = benchmark(tidesync.diff, table, changed, KEY)
    assert d.updated.num_rows > 0 and d.inserted.num_rows > 0 and d.deleted.num_rows > 0


@pytest.mark.benchmark(group="diff")
def test_diff_uuid16(benchmark: Any, table16: pa.Table, changed16: pa.Table) -> None:
    d = benchmark(tidesync.diff, table16, changed16, KEY)
    assert d.updated.num_rows > 0


@pytest.mark.benchmark(group="diff")
def test_diff_baseline_duckdb(benchmark: Any, table: pa.Table, changed: pa.Table) -> None:
    result = benchmark(core_bench.duckdb_diff(table, changed, KEY))
    expected = tidesync.diff(table, changed, KEY)
    assert result.num_rows == expected.inserted.num_rows + expected.deleted.num_rows + expected.updated.num_rows


@pytest.mark.benchmark(group="diff")
def test_diff_baseline_polars(benchmark: Any, table: pa.Table, changed: pa.Table) -> None:
    result = benchmark(core_bench.polars_diff, table, changed, KEY)
    expected = tidesync.diff(table, changed, KEY)
    assert result.height == expected.inserted.num_rows + expected.deleted.num_rows + expected.updated.num_rows


# --------------------------------------------------------------------------- merge


@pytest.mark.benchmark(group="merge")
def test_merge_record(benchmark: Any, table: pa.Table, incoming: pa.Table) -> None:
    result = benchmark(tidesync.merge, table, incoming, KEY, "record")
    assert result.rows.num_rows == len(result.inserted) > 0
    assert result.conflicts.num_rows > 0


@pytest.mark.benchmark(group="merge")
def test_merge_field(benchmark: Any, table_field: pa.Table, incoming_field: pa.Table) -> None:
    result = benchmark(tidesync.merge, table_field, incoming_field, KEY, "field")
    assert result.rows.num_rows == len(result.inserted) > 0


# --------------------------------------------------------------------------- digest


@pytest.mark.benchmark(group="digest")
def test_digest(benchmark: Any, table: pa.Table) -> None:
    d = benchmark(tidesync.digest, table, KEY, core_bench.DIGEST_BUCKETS)
    assert pc.sum(d.column("rows")).as_py() == table.num_rows


@pytest.mark.benchmark(group="digest")
def test_digest_baseline_xxh3(benchmark: Any, table: pa.Table) -> None:
    benchmark(core_bench.xxh3_pass, core_bench.arrow_buffers(table, (KEY, "_hlc", "_node")))


@pytest.mark.benchmark(group="digest")
def test_digest_baseline_blake3(benchmark: Any, table: pa.Table) -> None:
    benchmark(core_bench.blake3_pass, core_bench.arrow_buffers(table, (KEY, "_hlc", "_node")))


# --------------------------------------------------------------------------- hlc


@pytest.mark.benchmark(group="hlc")
def test_logical_order(benchmark: Any, changes: pa.Table) -> None:
    order = benchmark(tidesync.logical_order, changes, core_bench.LOGICAL_ORDER_BY)
    assert order.cast(pa.uint64()).equals(core_bench.pyarrow_order(changes))


@pytest.mark.benchmark(group="hlc")
def test_logical_order_baseline_pyarrow(benchmark: Any, changes: pa.Table) -> None:
    benchmark(core_bench.pyarrow_order, changes)


# --------------------------------------------------------------------------- generator sanity (not benchmarks)


def test_generator_is_deterministic() -> None:
    a = data.make_table(500, seed=7)
    assert a.equals(data.make_table(500, seed=7))
    assert not a.equals(data.make_table(500, seed=8))
    assert data.make_incoming(a, seed=2).equals(data.make_incoming(a, seed=2))


@pytest.mark.parametrize("key_type", ["string", "uuid16"])
@pytest.mark.parametrize("field_stamps", [False, True])
def test_generator_shapes(key_type: data.KeyType, field_stamps: bool) -> None:
    t = data.make_table(3_000, seed=1, key_type=key_type, field_stamps=field_stamps)
    assert t.schema == data.schema(key_type=key_type, field_stamps=field_stamps)
    assert pc.count_distinct(t.column(KEY)).as_py() == t.num_rows
    for col in data.DATA_COLUMNS:
        frac = t.column(col).null_count / t.num_rows
        assert frac == 0 if col == "mrn" else 0.02 < frac < 0.15, (col, frac)
    changed = data.derive_changed(t)
    assert changed.schema == t.schema
    assert pc.count_distinct(changed.column(KEY)).as_py() == changed.num_rows
    incoming = data.make_incoming(t)
    assert incoming.schema == t.schema and incoming.num_rows == t.num_rows
    if key_type == "string":
        assert set(pc.utf8_length(t.column(KEY)).to_pylist()) == {36}


def test_changes_are_unique_by_stamp_and_node() -> None:
    c = data.make_changes(5_000)
    pairs = pa.table({"h": c.column("_hlc"), "n": c.column("_node")}).group_by(["h", "n"]).aggregate([])
    assert pairs.num_rows == c.num_rows


@pytest.mark.parametrize("mode", ["record", "field"])
def test_merge_agrees_with_reference_on_bench_data(mode: tidesync.MergeMode) -> None:
    from tidesync import reference

    local = data.make_table(600, seed=3, field_stamps=mode == "field")
    incoming = data.make_incoming(local, seed=4)
    got = tidesync.merge(local, incoming, KEY, mode)
    want = reference.merge(local, incoming, KEY, mode)
    # Compared in key order: the two write rows in different orders (docs/semantics.md).
    got_rows, got_inserted = core_bench.rows_by_key(got, KEY)
    want_rows, want_inserted = core_bench.rows_by_key(want, KEY)
    assert got_rows.equals(want_rows)
    assert got_inserted.equals(want_inserted)
    assert got.conflicts.num_rows == want.conflicts.num_rows
