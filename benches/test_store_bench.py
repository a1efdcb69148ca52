"""pytest-benchmark suite of capture and apply on a real PostgreSQL (see conftest.py).

    python -m pytest benches/test_store_bench.py --benchmark-only
    python -m pytest benches -q --benchmark-disable           # smoke: each once, 2k rows

The headline figures (medians, ratios against COPY and MERGE) come from
``tidesync bench --only window --only apply --only triggers``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest

from tidesync.bench import store_bench
from tidesync.pg import PostgresStore
from tidesync.pg.cluster import TempCluster
from tidesync.pg.conn import connect, execute_script
from tidesync.schemas.demo import REGISTRY, app_ddl

TABLE = store_bench.TABLE


@pytest.fixture(scope="module")
def store() -> Iterator[PostgresStore]:
    with TempCluster(fast=False, settings={"synchronous_commit": "off"}) as cluster:
        dsn = cluster.create_database("bench")
        with connect(dsn) as conn, conn.cursor() as cur:
            execute_script(cur, app_ddl("postgres"))
        s = PostgresStore(dsn, REGISTRY)
        s.install("bench")
        yield s
        s.close()


def _truncate(store: PostgresStore) -> None:
    with connect(store.dsn) as conn, conn.cursor() as cur:
        cur.execute(f"TRUNCATE {TABLE} CASCADE")
        cur.execute(f"TRUNCATE tidesync.{TABLE}__tombstones")


@pytest.mark.benchmark(group="apply")
def test_apply_into_empty_table(benchmark: Any, store: PostgresStore, bench_rows: int) -> None:
    batch = store_bench.make_patients(bench_rows)
    result = benchmark.pedantic(lambda: store.apply({TABLE: batch}, peer="central"),
                                setup=lambda: _truncate(store), rounds=3)  # fmt: skip
    assert result.tables[TABLE].inserted == bench_rows


@pytest.mark.benchmark(group="window")
def test_read_window(benchmark: Any, store: PostgresStore, bench_rows: int) -> None:
    _truncate(store)
    store.apply({TABLE: store_bench.make_patients(bench_rows, seed=5)}, peer=None)
    window = benchmark(lambda: store.read_window(0, tables=[TABLE]))
    assert window.tables[TABLE].num_rows == bench_rows
    assert isinstance(window.tables[TABLE], pa.Table)


def test_store_bench_report_smoke() -> None:
    """`tidesync bench` for the store sections runs end to end and checks its own results."""
    results = store_bench.run_store_bench(rows=2_000, repeats=1, console=None)
    assert {r["benchmark"] for r in results} >= {"window read", "apply (empty table)", "apply (half updates)"}
    assert all(r["check"] in ("ok", "—") for r in results), [r["check"] for r in results]
