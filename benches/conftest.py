"""Fixtures of the pytest-benchmark suite (benches/ is not in the default test run).

Run the benchmarks:        python -m pytest benches --benchmark-only
Smoke-run them once (CI):  python -m pytest benches -q --benchmark-disable

Rows per table: TIDESYNC_BENCH_ROWS, else 200_000 — or 2_000 when benchmarks are
disabled, so the smoke run takes seconds.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from tidesync.bench import data
from tidesync.memory import prefer_jemalloc

prefer_jemalloc()  # as the `tidesync` command does

DEFAULT_ROWS = 200_000
SMOKE_ROWS = 2_000


@pytest.fixture(scope="session")
def bench_rows(request: pytest.FixtureRequest) -> int:
    env = os.environ.get("TIDESYNC_BENCH_ROWS")
    if env:
        return int(env.replace("_", ""))
    return SMOKE_ROWS if request.config.getoption("benchmark_disable") else DEFAULT_ROWS


@pytest.fixture(scope="session")
def table(bench_rows: int) -> pa.Table:
    """The local EMR table (record mode, uuid text key)."""
    return data.make_table(bench_rows, seed=0)


@pytest.fixture(scope="session")
def changed(table: pa.Table) -> pa.Table:
    return data.derive_changed(table, seed=1)


@pytest.fixture(scope="session")
def table16(bench_rows: int) -> pa.Table:
    """The same table with the key as fixed_size_binary(16)."""
    return data.make_table(bench_rows, seed=0, key_type="uuid16")


@pytest.fixture(scope="session")
def changed16(table16: pa.Table) -> pa.Table:
    return data.derive_changed(table16, seed=1)


@pytest.fixture(scope="session")
def incoming(table: pa.Table) -> pa.Table:
    return data.make_incoming(table, seed=2)


@pytest.fixture(scope="session")
def table_field(bench_rows: int) -> pa.Table:
    """A field-wise local table (with ``_hlc_<col>`` stamps)."""
    return data.make_table(bench_rows, seed=5, field_stamps=True)


@pytest.fixture(scope="session")
def incoming_field(table_field: pa.Table) -> pa.Table:
    return data.make_incoming(table_field, seed=2)


@pytest.fixture(scope="session")
def changes(bench_rows: int) -> pa.Table:
    return data.make_changes(bench_rows, seed=4)
