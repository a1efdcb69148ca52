"""End-to-end sync benchmarks: a real central server process, facility and mobile nodes,
HTTP over 127.0.0.1 (``tidesync bench --only sync --only incremental --only load``).

- **initial sync** of a facility whose scope holds ``rows`` rows (patients, their marks,
  encounters and vitals), one ``tidesync sync`` cycle, vs ``pg_dump --data-only | pg_restore``
  of the same tables into an identical empty database. Peak memory (RSS) of the node
  process and the central server process are recorded during the sync.
- **incremental**: a cycle with 10k changed rows (half pushed from the facility, half
  pulled from central) on a facility of ``rows`` and of ``5 × rows`` rows: seconds, and
  the ratio between the two (cost should follow the changes, not the database size).
- **load**: 20 mobile nodes syncing at once against one central server, each with its
  own changes: cycle time p50/p95, errors, and the central server's throughput.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from tidesync.bench.core_bench import Row, _Reporter, _row, render_notes, render_table
from tidesync.pg.cluster import TempCluster, find_bindir
from tidesync.pg.conn import connect, create_database, drop_database
from tidesync.pg.store import PostgresStore
from tidesync.schemas.demo import REGISTRY
from tidesync.sqlite.store import SQLiteStore
from tidesync.sync import central
from tidesync.sync.client import CentralClient, Retry, init_node, sync_once

SECTIONS: tuple[str, ...] = ("sync", "incremental", "load")
INITIAL_MAX_RATIO = 1.25  # tidesync's time over pg_dump | pg_restore's
INCREMENTAL_MAX_RATIO = 1.2  # 5x database / 1x database cycle time
SCOPE_TABLES = ("patients", "patient_facilities", "encounters", "vitals")
LOAD_NODES = 20


def _sql(dsn: str, *statements: str) -> None:
    with connect(dsn) as conn, conn.cursor() as cur:
        for s in statements:
            cur.execute(s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def generate_scope(dsn: str, facility: str, rows: int, *, offset: int = 0) -> int:
    """Add about ``rows`` rows to ``facility``'s scope at central (set-based SQL): per
    patient one mark, one encounter and two vitals. Returns rows added."""
    p = max(1, rows // 5)
    lo, hi = offset + 1, offset + p
    pid = "md5('p' || g)::uuid"
    _sql(
        dsn,
        f"INSERT INTO patients (id, display_id, first_name, last_name, sex, date_of_birth) "
        f"SELECT {pid}, 'P' || g, (ARRAY['Ana','Kofi','Mele','Sione','Nour'])[1 + g % 5], "
        f"(ARRAY['Tupou','Mensah','Silva','Lee'])[1 + g % 4], (ARRAY['female','male'])[1 + g % 2], "
        f"date '1950-01-01' + (g % 25000) FROM generate_series({lo}, {hi}) g",
        f"INSERT INTO patient_facilities (id, patient_id, facility_id) "
        f"SELECT md5('m' || g)::uuid, {pid}, '{facility}' FROM generate_series({lo}, {hi}) g",
        f"INSERT INTO encounters (id, patient_id, facility_id, encounter_type, reason, start_at) "
        f"SELECT md5('e' || g)::uuid, {pid}, '{facility}', 'clinic', 'check-up', now() - (g % 1000) * interval '1 day' "
        f"FROM generate_series({lo}, {hi}) g",
        f"INSERT INTO vitals (id, encounter_id, patient_id, recorded_at, temperature_c, heart_rate, systolic, "
        f"diastolic, spo2, weight_kg) SELECT md5('v' || g || '-' || k)::uuid, md5('e' || g)::uuid, {pid}, now(), "
        f"36.5 + (g % 10) / 10.0, 60 + g % 40, 110 + g % 30, 70 + g % 20, 95 + g % 5, 50 + g % 40 "
        f"FROM generate_series({lo}, {hi}) g, generate_series(1, 2) k",
        "ANALYZE",
    )
    return 5 * p


class CentralProcess:
    """``tidesync central serve`` as a separate process (so client and server do not
    share a GIL), with its peak memory readable from /proc."""

    def __init__(self, dsn: str, workers: int = 1) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tidesync.cli", "central", "serve", "--db", dsn, "--port", str(self.port),
               "--workers", str(workers)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("the central server did not start")
            time.sleep(0.1)

    def rss_kib(self, field: str = "VmRSS") -> int:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _facility_db(server_dsn: str, name: str) -> str:
    dsn = create_database(server_dsn, name, replace=True)
    with PostgresStore(dsn, REGISTRY) as store:
        store.create_app_tables()
    return dsn


def _sync_subprocess(db: str) -> tuple[float, dict[str, Any], int]:
    """One ``tidesync sync --json`` in a child process: (seconds, report, its peak RSS in KiB)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "tidesync.cli", "sync", "--db", db, "--json"],
                                stdout=subprocess.PIPE, stderr=err)  # fmt: skip
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own resource usage
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        proc.stdout.close()
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"tidesync sync failed: {err.read().decode()[-500:]}")
    report = json.loads(out.decode().strip().splitlines()[-1])
    return seconds, report, int(usage.ru_maxrss)


def _dump_restore(bindir: Path, source: str, target: str) -> float:
    """``pg_dump --data-only -Fc -t ... source | pg_restore --data-only --disable-triggers -d target``."""
    tables = [a for t in SCOPE_TABLES for a in ("-t", t)]
    start = time.perf_counter()
    dump = subprocess.Popen([str(bindir / "pg_dump"), "--data-only", "-Fc", *tables, "-d", source],
                            stdout=subprocess.PIPE)  # fmt: skip
    restore = subprocess.run([str(bindir / "pg_restore"), "--data-only", "--disable-triggers", "-d", target],
                             stdin=dump.stdout, capture_output=True, check=False)  # fmt: skip
    assert dump.stdout is not None
    dump.stdout.close()
    dump.wait()
    seconds = time.perf_counter() - start
    if dump.returncode or restore.returncode:
        raise RuntimeError(f"pg_dump | pg_restore failed: {restore.stderr.decode()[-500:]}")
    return seconds


def _count(dsn: str, tables: Sequence[str] = SCOPE_TABLES) -> int:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT " + " + ".join(f"(SELECT count(*) FROM {t})" for t in tables))
        return int(cur.fetchone()[0])


@contextlib.contextmanager
def _cluster(dsn: str | None) -> Iterator[str]:
    """A PostgreSQL server for the benchmark: ``dsn``'s, or a throwaway cluster."""
    if dsn:
        yield dsn
        return
    with TempCluster(fast=False, settings={"synchronous_commit": "off"}) as cluster:
        yield cluster.dsn


@contextlib.contextmanager
def _central(server: str) -> Iterator[str]:
    """A fresh central database (each benchmark gets its own: patients are global, and
    one benchmark's patients would otherwise flow into the next one's nodes)."""
    name = f"ts_bench_central_{uuid.uuid4().hex[:6]}"
    central_dsn = create_database(server, name, replace=True)
    try:
        with PostgresStore(central_dsn, REGISTRY) as store:
            central.init(store)
        yield central_dsn
    finally:
        drop_database(server, name)


def _facilities(central_dsn: str, *codes: str) -> list[str]:
    ids = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"tidesync-bench/{c}")) for c in codes]
    values = ", ".join(f"('{i}', '{c}', 'Facility {c}')" for i, c in zip(ids, codes, strict=True))
    _sql(central_dsn, f"INSERT INTO facilities (id, code, name) VALUES {values} ON CONFLICT DO NOTHING")
    return ids


def _bench_initial(server: str, central_dsn: str, rows: int, repeats: int, rep: _Reporter) -> list[Row]:
    (fac,) = _facilities(central_dsn, "INIT")
    with rep.step(f"generating {rows:,} rows of scope at central"):
        generated = generate_scope(central_dsn, fac, rows)
    bindir = find_bindir()
    ts_runs: list[float] = []
    base_runs: list[float] = []
    node_peak = central_growth = 0
    server_proc = CentralProcess(central_dsn)
    try:
        for i in range(repeats):
            name = f"ts_bench_init_{i}_{uuid.uuid4().hex[:6]}"
            with rep.step(f"initial sync {i + 1}/{repeats}"):
                db = _facility_db(server, name)
                with PostgresStore(central_dsn, REGISTRY) as cstore:
                    token = central.add_node(cstore, f"init-{uuid.uuid4().hex[:8]}", "facility", fac)
                with PostgresStore(db, REGISTRY) as store:
                    init_node(store, server_proc.url, token)
                before = server_proc.rss_kib()
                seconds, report, peak = _sync_subprocess(db)
                central_growth = max(central_growth, server_proc.rss_kib("VmHWM") - before)
                node_peak = max(node_peak, peak)
                ts_runs.append(seconds)
                got = _count(db)
                drop_database(server, name)
            with rep.step(f"pg_dump | pg_restore {i + 1}/{repeats}"):
                twin = f"ts_bench_twin_{i}_{uuid.uuid4().hex[:6]}"
                tdb = _facility_db(server, twin)
                with PostgresStore(tdb, REGISTRY) as store:
                    store.install("twin")
                base_runs.append(_dump_restore(bindir, central_dsn, tdb))
                base_count = _count(tdb)
                drop_database(server, twin)
    finally:
        server_proc.stop()
    ratio = statistics.median(ts_runs) / statistics.median(base_runs)
    check = "ok" if got == base_count == generated else f"rows differ: sync {got}, dump {base_count}, made {generated}"
    return [
        _row(benchmark="initial sync of a facility (HTTP, end to end)", baseline="pg_dump | pg_restore",
             rows=generated, ts_runs=ts_runs, base_runs=base_runs, target=f"≤ {INITIAL_MAX_RATIO}× its time",
             target_met=ratio <= INITIAL_MAX_RATIO, check=check,
             note=f"time ratio {ratio:.2f}×; peak RSS node {node_peak / 1024:.0f} MiB, "
                  f"central +{central_growth / 1024:.0f} MiB"),
    ]  # fmt: skip


def _bench_incremental(server: str, central_dsn: str, rows: int, repeats: int, rep: _Reporter,
                       changes: int = 10_000) -> list[Row]:  # fmt: skip
    results: list[Row] = []
    medians: dict[int, float] = {}
    server_proc = CentralProcess(central_dsn)
    try:
        for size in (rows, 5 * rows):
            code = f"INC{size}"
            (fac,) = _facilities(central_dsn, code)
            with rep.step(f"incremental: a facility of {size:,} rows (generate, first sync)"):
                offset = 10_000_000 + size  # distinct patients per size
                generate_scope(central_dsn, fac, size, offset=offset)
                name = f"ts_bench_inc_{size}_{uuid.uuid4().hex[:6]}"
                db = _facility_db(server, name)
                with PostgresStore(central_dsn, REGISTRY) as cstore:
                    token = central.add_node(cstore, f"inc-{size}-{uuid.uuid4().hex[:6]}", "facility", fac)
                with PostgresStore(db, REGISTRY) as store:
                    init_node(store, server_proc.url, token)
                _sync_subprocess(db)
            runs: list[float] = []
            patients = max(1, size // 5)
            q = max(1, changes // 4)  # patients per side per cycle; each has two vitals

            def chosen(first: int, i: int) -> str:
                """Patient ids for cycle ``i`` (wrapping inside one half of the patients)."""
                half = max(1, patients // 2)
                return (f"SELECT md5('p' || ({offset} + {first} + (g - 1) % {half} + 1))::uuid "
                        f"FROM generate_series({i * q + 1}, {i * q + q}) g")  # fmt: skip

            with rep.step(f"incremental cycles on {size:,} rows"), PostgresStore(db, REGISTRY) as store:
                client = CentralClient(server_proc.url, store.get_setting("central_token") or "", retry=Retry())
                for i in range(repeats + 1):
                    # Half the changes made at the facility (pushed), half at central (pulled).
                    _sql(db, f"UPDATE vitals SET heart_rate = heart_rate + 1 WHERE patient_id IN ({chosen(0, i)})")
                    _sql(central_dsn, f"UPDATE vitals SET spo2 = 99 - {i} WHERE patient_id IN "
                                      f"({chosen(patients // 2, i)})")  # fmt: skip
                    start = time.perf_counter()
                    report = sync_once(store, client)
                    if i:  # the first cycle warms caches
                        runs.append(time.perf_counter() - start)
                    moved = report.pushed_rows + report.pulled_rows
                client.close()
            drop_database(server, name)
            medians[size] = statistics.median(runs)
            results.append(_row(benchmark=f"incremental cycle, {moved:,} changed rows", baseline="—", rows=moved,
                                ts_runs=runs, base_runs=None, note=f"facility of {size:,} rows"))  # fmt: skip
    finally:
        server_proc.stop()
    growth = medians[5 * rows] / medians[rows]
    results[-1]["target"] = f"≤ {INCREMENTAL_MAX_RATIO}× the {rows:,}-row cycle"
    results[-1]["target_met"] = growth <= INCREMENTAL_MAX_RATIO
    results[-1]["note"] += f"; {growth:.2f}× the cycle on {rows:,} rows"
    return results


def _bench_load(server: str, central_dsn: str, repeats: int, rep: _Reporter, per_node: int = 500) -> list[Row]:
    (fac,) = _facilities(central_dsn, "LOAD")
    server_proc = CentralProcess(central_dsn, workers=2)
    cycle_times: list[float] = []
    errors: list[str] = []
    moved = 0
    wall: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tidesync-load-") as tmp:
        stores: list[SQLiteStore] = []
        try:
            with rep.step(f"load: {LOAD_NODES} mobile nodes"), PostgresStore(central_dsn, REGISTRY) as cstore:
                for i in range(LOAD_NODES):
                    token = central.add_node(cstore, f"load-{i}-{uuid.uuid4().hex[:6]}", "mobile", fac)
                    store = SQLiteStore(Path(tmp) / f"m{i}.db", REGISTRY)
                    store.create_app_tables()
                    init_node(store, server_proc.url, token)
                    stores.append(store)
                    # A device's first sync brings the facility and reference rows its
                    # application's records point to (untimed: the rounds measure change).
                    with CentralClient(server_proc.url, token) as c:
                        sync_once(store, c)
            for r in range(repeats):
                with rep.step(f"load: {LOAD_NODES} nodes syncing at once, round {r + 1}/{repeats}"):
                    for i, store in enumerate(stores):
                        _mobile_changes(store, fac, per_node, seed=r * 1000 + i)
                    lock = threading.Lock()

                    def one(store: SQLiteStore) -> None:
                        nonlocal moved
                        with CentralClient(server_proc.url, store.get_setting("central_token") or "") as c:
                            t = time.perf_counter()
                            try:
                                report = sync_once(store, c)
                            except Exception as exc:  # noqa: BLE001 - counted and reported
                                with lock:
                                    errors.append(f"{type(exc).__name__}: {exc}")
                                return
                            with lock:
                                cycle_times.append(time.perf_counter() - t)
                                moved += report.pushed_rows + report.pulled_rows

                    threads = [threading.Thread(target=one, args=(s,)) for s in stores]
                    start = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    wall.append(time.perf_counter() - start)
        finally:
            for s in stores:
                s.close()
            server_proc.stop()
    times = sorted(cycle_times)
    p50 = times[len(times) // 2] if times else float("nan")
    p95 = times[min(len(times) - 1, int(len(times) * 0.95))] if times else float("nan")
    return [
        _row(benchmark=f"load: {LOAD_NODES} nodes syncing at once", baseline="—", rows=moved,
             ts_runs=wall, base_runs=None, target="zero errors", target_met=not errors,
             check="ok" if not errors else f"{len(errors)} errors: {errors[0][:120]}",
             note=f"cycle p50 {p50:.2f} s, p95 {p95:.2f} s; central moved {moved / sum(wall):,.0f} rows/s"),
    ]  # fmt: skip


def _mobile_changes(store: SQLiteStore, facility: str, n: int, *, seed: int) -> None:
    """``n`` new patients (with marks) written on a mobile device, as its application would
    (through the store's own SQLite library: see docs/sqlite.md)."""
    from tidesync.sqlite.conn import Connection

    db = Connection(store.path)
    try:
        with db.transaction("IMMEDIATE"):
            for k in range(n // 2):
                p = str(uuid.uuid5(uuid.NAMESPACE_URL, f"load/{seed}/{k}"))
                db.execute("INSERT INTO patients (id, display_id, first_name) VALUES (?, ?, 'Load')", [p, f"L{seed}-{k}"])
                db.execute("INSERT INTO patient_facilities (id, patient_id, facility_id) VALUES (?, ?, ?)",
                           [str(uuid.uuid5(uuid.NAMESPACE_URL, f"mark/{p}")), p, facility])  # fmt: skip
    finally:
        db.close()


def run_sync_bench(
    rows: int = 1_000_000,
    repeats: int = 3,
    console: Console | None = None,
    *,
    only: Sequence[str] | None = None,
    dsn: str | None = None,
    show_table: bool = True,
) -> list[Row]:
    """Run the end-to-end sync benchmarks; one dict per (benchmark, baseline)."""
    sections = [s for s in SECTIONS if only is None or s in only]
    steps = {"sync": 1 + 2 * repeats, "incremental": 4, "load": 1 + repeats}
    rep = _Reporter(console, sum(steps[s] for s in sections) + 1)
    results: list[Row] = []
    with rep.running(), contextlib.ExitStack() as stack:
        with rep.step("starting PostgreSQL"):
            server = stack.enter_context(_cluster(dsn))
        if "sync" in sections:
            with _central(server) as central_dsn:
                results += _bench_initial(server, central_dsn, rows, repeats, rep)
        if "incremental" in sections:
            with _central(server) as central_dsn:
                results += _bench_incremental(server, central_dsn, rows, repeats, rep, changes=min(10_000, rows // 10))
        if "load" in sections:
            with _central(server) as central_dsn:
                results += _bench_load(server, central_dsn, repeats, rep, per_node=min(500, max(10, rows // 100)))
    if console is not None and show_table:
        console.print(render_table(results, repeats=repeats))
        for line in render_notes(results):
            console.print(line, highlight=False, markup=False)
    return results

