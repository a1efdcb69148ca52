"""Seeding benchmarks (``tidesync bench --only seed``): bringing a new facility to
central's state for its scope, at ``rows`` and at ``5 × rows`` rows of scope.

- **seed over the network**: ``tidesync node init --seed`` in a child process against a
  central server process (central cuts the seed file from one snapshot, the node
  downloads it over HTTP and loads it), end to end, vs ``pg_dump --data-only -Fc |
  pg_restore --data-only --disable-triggers`` of the same tables into an identical
  database, and vs the floor: the node's own binary ``COPY FROM`` of pre-made files
  (``psql \\copy``, triggers and foreign keys off). Peak memory of the node process
  and growth of the central process.
- **seed file**: ``seed export`` and ``seed import`` of the same scope (time, size) vs
  polars reading the same tables through ADBC and writing zstd Parquet.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from tidesync import seed
from tidesync.bench.core_bench import Row, _Reporter, _row, render_notes, render_table
from tidesync.bench.sync_bench import (
    SCOPE_TABLES,
    CentralProcess,
    _central,
    _cluster,
    _count,
    _dump_restore,
    _facilities,
    _facility_db,
    generate_scope,
)
from tidesync.pg.cluster import find_bindir
from tidesync.pg.conn import drop_database
from tidesync.pg.store import PostgresStore
from tidesync.schemas.demo import REGISTRY
from tidesync.sync import central

SECTIONS: tuple[str, ...] = ("seed",)
SEED_MAX_RATIO = 1.1  # tidesync's time over pg_dump | pg_restore's


def _seed_subprocess(db: str, url: str, token: str, spool: Path) -> tuple[float, int]:
    """``tidesync node init --seed`` in a child process: (seconds, its peak RSS in KiB)."""
    cmd = [sys.executable, "-m", "tidesync.cli", "node", "init", "--db", db, "--central", url, "--token", token,
           "--seed", "--spool", str(spool)]  # fmt: skip
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own resource usage
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"tidesync node init --seed failed: {err.read().decode()[-800:]}")
    return seconds, int(usage.ru_maxrss)


def _psql(bindir: Path, dsn: str, command: str, *, replica: bool = False) -> None:
    env = dict(os.environ)
    if replica:  # no triggers, no foreign key checks: the bare cost of loading the bytes
        env["PGOPTIONS"] = "-c session_replication_role=replica"
    subprocess.run([str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", command],
                   check=True, env=env, capture_output=True)  # fmt: skip


def _copy_out(bindir: Path, central_dsn: str, folder: Path) -> None:
    for t in SCOPE_TABLES:
        _psql(bindir, central_dsn, f"\\copy {t} TO '{folder / t}.bin' (FORMAT binary)")


def _copy_in(bindir: Path, dsn: str, folder: Path) -> float:
    start = time.perf_counter()
    for t in SCOPE_TABLES:
        _psql(bindir, dsn, f"\\copy {t} FROM '{folder / t}.bin' (FORMAT binary)", replica=True)
    return time.perf_counter() - start


def _polars_parquet(central_dsn: str, folder: Path) -> tuple[float, int]:
    import polars as pl

    start = time.perf_counter()
    size = 0
    for t in SCOPE_TABLES:
        df = pl.read_database_uri(f"SELECT * FROM {t}", central_dsn, engine="adbc")
        path = folder / f"{t}.parquet"
        df.write_parquet(path, compression="zstd")
        size += path.stat().st_size
        del df
    return time.perf_counter() - start, size


def _twin(server: str, name: str) -> str:
    """A facility database like the node's (same tables, indexes and triggers)."""
    db = _facility_db(server, name)
    with PostgresStore(db, REGISTRY) as store:
        store.install("twin")
    return db


def _bench_size(server: str, rows: int, repeats: int, rep: _Reporter) -> list[Row]:
    bindir = find_bindir()
    with _central(server) as central_dsn, tempfile.TemporaryDirectory(prefix="tidesync-seed-bench-") as tmp:
        work = Path(tmp)
        (fac,) = _facilities(central_dsn, "SEED")
        with rep.step(f"generating {rows:,} rows of scope at central"):
            generated = generate_scope(central_dsn, fac, rows)
        with rep.step("pre-made binary COPY files"):
            _copy_out(bindir, central_dsn, work)
        ts_runs: list[float] = []
        dump_runs: list[float] = []
        floor_runs: list[float] = []
        node_peak = central_growth = 0
        counts: dict[str, int] = {}
        server_proc = CentralProcess(central_dsn)
        try:
            for i in range(repeats):
                tag = uuid.uuid4().hex[:6]
                with rep.step(f"{rows:,} rows: seed over the network {i + 1}/{repeats}"):
                    name = f"ts_bench_seed_{tag}"
                    db = _facility_db(server, name)
                    with PostgresStore(central_dsn, REGISTRY) as cstore:
                        token = central.add_node(cstore, f"seed-{tag}", "facility", fac)
                    before = server_proc.rss_kib()
                    seconds, peak = _seed_subprocess(db, server_proc.url, token, work / "spool")
                    central_growth = max(central_growth, server_proc.rss_kib("VmHWM") - before)
                    node_peak = max(node_peak, peak)
                    ts_runs.append(seconds)
                    counts["seed"] = _count(db)
                    drop_database(server, name)
                # Each baseline loads a fresh twin the same way: (name, label, runs, load).
                baselines: list[tuple[str, str, list[float], Callable[[str], float]]] = [
                    ("dump", "pg_dump | pg_restore", dump_runs, lambda db: _dump_restore(bindir, central_dsn, db)),
                    ("copy", "binary COPY of pre-made files", floor_runs, lambda db: _copy_in(bindir, db, work)),
                ]
                for kind, what, runs, load in baselines:
                    with rep.step(f"{rows:,} rows: {what} {i + 1}/{repeats}"):
                        name = f"ts_bench_{kind}_{tag}"
                        db = _twin(server, name)
                        runs.append(load(db))
                        counts[kind] = _count(db)
                        drop_database(server, name)
        finally:
            server_proc.stop()
        with rep.step(f"{rows:,} rows: seed file export / import, polars Parquet"):
            file_rows = _bench_file(server, central_dsn, fac, work, generated)
    ok = set(counts.values()) == {generated}
    check = "ok" if ok else f"row counts differ: {counts}, generated {generated}"
    ratio = statistics.median(ts_runs) / statistics.median(dump_runs)
    memory = f"peak RSS node {node_peak / 1024:.0f} MiB, central +{central_growth / 1024:.0f} MiB"
    return [
        _row(benchmark=f"seed a facility over the network, {rows:,} rows", baseline="pg_dump | pg_restore",
             rows=generated, ts_runs=ts_runs, base_runs=dump_runs, target=f"≤ {SEED_MAX_RATIO}× its time",
             target_met=ratio <= SEED_MAX_RATIO, check=check, note=f"time ratio {ratio:.2f}×; {memory}"),
        _row(benchmark=f"seed a facility over the network, {rows:,} rows", baseline="binary COPY of pre-made files",
             rows=generated, ts_runs=ts_runs, base_runs=floor_runs, check=check,
             note=f"the floor: {statistics.median(ts_runs) / statistics.median(floor_runs):.2f}× its time"),
        *file_rows,
    ]  # fmt: skip


def _bench_file(server: str, central_dsn: str, fac: str, work: Path, generated: int) -> list[Row]:
    """One export and one import of a seed file, and polars writing the same tables as Parquet."""
    with PostgresStore(central_dsn, REGISTRY) as cstore:
        node = f"file-{uuid.uuid4().hex[:6]}"
        central.add_node(cstore, node, "facility", fac)
        out = work / "node.seed"
        start = time.perf_counter()
        manifest = seed.export_seed(cstore, node, out)
        export_s = time.perf_counter() - start
        key = seed.public_key_text(seed.signing_key(cstore))
    size = out.stat().st_size
    name = f"ts_bench_file_{uuid.uuid4().hex[:6]}"
    db = _facility_db(server, name)
    try:
        with PostgresStore(db, REGISTRY) as store:
            start = time.perf_counter()
            seed.import_seed(store, out, public_key=key)
            import_s = time.perf_counter() - start
        loaded = _count(db)
    finally:
        drop_database(server, name)
    (work / "pq").mkdir(exist_ok=True)
    polars_s, polars_size = _polars_parquet(central_dsn, work / "pq")
    check = "ok" if loaded == generated else f"loaded {loaded} of {generated}"
    mib = 2**20
    return [
        _row(benchmark=f"seed file export, {generated:,} rows", baseline="polars read (ADBC) + write Parquet",
             rows=manifest.rows, ts_runs=[export_s], base_runs=[polars_s], check=check,
             note=f"seed file {size / mib:.1f} MiB (all {manifest.rows:,} rows of scope) vs Parquet "
                  f"{polars_size / mib:.1f} MiB ({len(SCOPE_TABLES)} tables, app and metadata columns)"),
        _row(benchmark=f"seed file import, {generated:,} rows", baseline="—", rows=manifest.rows,
             ts_runs=[import_s], base_runs=None, check=check),
    ]  # fmt: skip


def run_seed_bench(
    rows: int = 1_000_000,
    repeats: int = 3,
    console: Console | None = None,
    *,
    dsn: str | None = None,
    sizes: Sequence[int] | None = None,
    show_table: bool = True,
) -> list[Row]:
    """Seed benchmarks at ``rows`` and ``5 × rows`` (the larger once when repeats > 1)."""
    plan = [(n, repeats if n == rows else max(1, repeats // 3)) for n in (sizes or (rows, 5 * rows))]
    rep = _Reporter(console, 1 + sum(3 + 3 * r for _, r in plan))
    results: list[Row] = []
    with rep.running(), contextlib.ExitStack() as stack:
        with rep.step("starting PostgreSQL"):
            server = stack.enter_context(_cluster(dsn))
        for n, r in plan:
            results += _bench_size(server, n, r, rep)
    if console is not None and show_table:
        console.print(render_table(results, repeats=repeats))
        for line in render_notes(results):
            console.print(line, highlight=False, markup=False)
    return results


__all__ = ["SECTIONS", "run_seed_bench"]
