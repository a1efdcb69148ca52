"""National import and export (tidesync.datasets) against their floors, on a real PostgreSQL.

- import: ``import_table`` of a Parquet file of patients-like rows (uuid keys as text,
  as national registries send them) into an empty, installed central ``patients``
  table — read, check, convert, stage, one ``INSERT … ON CONFLICT`` stamped by the
  capture triggers — against a raw binary COPY (ADBC ingest) of the same rows, already
  as Arrow in their wire types, into a trigger-free copy of the table (its primary key
  and check kept). The same for a CSV file of the same rows.
- export: ``export_snapshot`` of that table to Parquet against
  ``polars.read_database_uri(..., engine="adbc")`` + ``write_parquet`` of the same
  columns (uuids as text in both).

Medians of ``--repeats`` runs, in one process, on a throwaway cluster.

    python benches/test_datasets_bench.py                       # 1M rows, median of 3
    python benches/test_datasets_bench.py --rows 200000 --json
    python -m pytest -q benches/test_datasets_bench.py --benchmark-disable   # smoke: 2k rows, seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from tidesync.bench import store_bench
from tidesync.datasets import export_snapshot, import_table
from tidesync.pg import PostgresStore
from tidesync.pg.cluster import TempCluster
from tidesync.pg.conn import connect, execute_script, ingest, transaction
from tidesync.schemas.demo import REGISTRY, app_ddl
from tidesync.sqlite.types import uuid_to_text

TABLE = "patients"
PLAIN = "plain_patients"
SPEC = REGISTRY[TABLE]
APP = [c.name for c in SPEC.columns]


def make_rows(n: int) -> pa.Table:
    """``n`` patients: the application columns of the store benchmark's patients (wire types)."""
    return store_bench.make_patients(n, seed=11).select(APP)


def _median(run: Callable[[], Any], repeats: int, setup: Callable[[], None] | None = None) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _sql(dsn: str, *statements: str) -> None:
    with connect(dsn) as conn, conn.cursor() as cur:
        for s in statements:
            cur.execute(s)


def measure(dsn: str, rows: int, repeats: int, workdir: Path) -> list[dict[str, Any]]:
    """Run every measurement on database ``dsn`` (empty); returns one dict per figure."""
    with connect(dsn) as conn, conn.cursor() as cur:
        execute_script(cur, app_ddl("postgres"))
    arrow = make_rows(rows)
    # The file as a national registry would send it: uuids as text.
    as_text = arrow
    for c in SPEC.columns:
        if c.type.value == "uuid":
            i = as_text.schema.get_field_index(c.name)
            as_text = as_text.set_column(i, c.name, uuid_to_text(as_text.column(c.name)))
    parquet, csv = workdir / "patients.parquet", workdir / "patients.csv"
    pq.write_table(as_text, parquet)
    pl.from_arrow(as_text).write_csv(csv)  # type: ignore[union-attr]
    results: list[dict[str, Any]] = []
    with PostgresStore(dsn, REGISTRY) as store:
        store.install("central")
        meta = ["_cursor", "_hlc", "_node", "_base_hlc", "_origin", *(f"_hlc_{c.name}" for c in SPEC.data_columns)]
        _sql(dsn, f"CREATE TABLE {PLAIN} (LIKE {TABLE} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)",
             *[f"ALTER TABLE {PLAIN} DROP COLUMN {c}" for c in meta])  # fmt: skip

        def empty() -> None:
            _sql(dsn, f"TRUNCATE {TABLE} CASCADE", f"TRUNCATE tidesync.{TABLE}__tombstones", f"TRUNCATE {PLAIN}")

        def copy() -> None:
            with connect(dsn) as conn, transaction(conn) as cur:
                ingest(cur, PLAIN, arrow)  # the fastest Arrow COPY we know

        floor, _ = _median(copy, repeats, empty)
        for label, path in (("parquet", parquet), ("csv", csv)):
            took, report = _median(lambda p=path: import_table(store, TABLE, p), repeats, empty)  # type: ignore[misc]
            assert report.inserted == rows, report
            results.append({"benchmark": f"import {label} ({rows:,} rows)", "seconds": took,
                            "baseline": "binary COPY of the Arrow rows, trigger-free copy", "baseline_seconds": floor,
                            "ratio": took / floor, "rows_per_s": rows / took})  # fmt: skip
        # Left loaded by the last import: export it.
        out = workdir / "export.parquet"
        took, report = _median(lambda: export_snapshot(store, out, tables=[TABLE], overwrite=True), repeats)
        assert report.tables[TABLE] == rows
        select = ", ".join(f"{c}::text AS {c}" if SPEC.column(c).type.value == "uuid" else c for c in APP)
        polars_out = workdir / "polars.parquet"

        def polars_export() -> None:
            pl.read_database_uri(f"SELECT {select} FROM {TABLE}", dsn, engine="adbc").write_parquet(polars_out)

        base, _ = _median(polars_export, repeats)
        assert pl.read_parquet(out).height == pl.read_parquet(polars_out).height == rows
        results.append({"benchmark": f"export parquet ({rows:,} rows)", "seconds": took,
                        "baseline": "polars.read_database_uri(engine='adbc') + write_parquet",
                        "baseline_seconds": base, "ratio": took / base, "rows_per_s": rows / took})  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, \
            TempCluster(fast=False, settings={"synchronous_commit": "off"}) as cluster:  # fmt: skip
        results = measure(cluster.create_database("datasets"), args.rows, args.repeats, Path(tmp))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        print(json.dumps({"rows": args.rows, "repeats": args.repeats, "peak_rss_mib": peak, "results": results}))
        return
    for r in results:
        print(f"{r['benchmark']:<32} {r['seconds']:7.2f} s  {r['rows_per_s']:>10,.0f} rows/s  vs "
              f"{r['baseline']}: {r['baseline_seconds']:.2f} s  ({r['ratio']:.2f}x)")
    print(f"peak RSS of the process: {peak:,.0f} MiB")


def test_datasets_bench_smoke(tmp_path: Path) -> None:
    """Every measurement runs end to end on 2k rows (seconds)."""
    with TempCluster() as cluster:
        results = measure(cluster.create_database("datasets"), 2_000, 1, tmp_path)
    assert [r["benchmark"].split(" (")[0] for r in results] == ["import parquet", "import csv", "export parquet"]
    assert all(r["seconds"] > 0 and r["baseline_seconds"] > 0 for r in results)


if __name__ == "__main__":
    main()
