"""Verify of two large copies that differ in a few rows, vs a full pull of the same tables.

    python benches/verify_bench.py --rows 5000000          # the figures of docs/benchmarks.md
    python -m pytest -q benches --benchmark-disable         # smoke: tiny data (test_verify_bench.py)

A central server (its own process, one worker, as in ``tidesync bench --only sync``)
holds one facility's scope: ``rows`` vitals, and one patient, mark and encounter per
ten vitals. A new facility pulls it all in one normal sync cycle (the *full pull*:
time and bytes over HTTP), which is also how its copy is made. Then ``differ`` vitals
are changed on the facility behind the engine's back (triggers off, stamps untouched),
and ``verify`` runs (time and bytes, every table of the scope, found keys checked):

- *cold* (``verify --fresh``): central reads and hashes the node's whole scope again
  (what every verify costs when central's data changed since the last one, or the
  first time);
- *warm*: run again right after a verify, central's data unchanged, so it answers from
  the row hashes it kept once it has proved them current (docs/protocol.md "Verify");

then ``verify --repair``, then a verify of the repaired copy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tidesync.bench.sync_bench import CentralProcess, _central, _cluster, _facilities, _facility_db
from tidesync.pg.conn import connect
from tidesync.pg.store import PostgresStore
from tidesync.schemas.demo import REGISTRY
from tidesync.sync import central
from tidesync.sync.client import CentralClient, client_for, init_node, sync_once
from tidesync.sync.verify import VerifyReport, verify_node

#: Vitals per patient (each patient also has one mark and one encounter).
VITALS_PER_PATIENT = 10


def _sql(dsn: str, *statements: str) -> None:
    with connect(dsn) as conn, conn.cursor() as cur:
        for s in statements:
            cur.execute(s)


def generate(dsn: str, facility: str, vitals: int) -> int:
    """``vitals`` vitals rows in ``facility``'s scope at central, with their patients,
    marks and encounters; written set-based with the capture triggers standing aside (as
    an apply does), stamped as central's own rows. Returns the rows of scope made."""
    p = max(1, vitals // VITALS_PER_PATIENT)
    stamp = "((extract(epoch FROM now()) * 1000)::bigint << 16)"
    meta = f", _hlc, _node, _base_hlc) "
    common = f"{stamp} + g, 'central', {stamp} + g"
    pid = "md5('p' || g)::uuid"
    _sql(
        dsn,
        "SET tidesync.applying = 'on'",
        f"INSERT INTO patients (id, display_id, first_name, last_name, sex, date_of_birth, _hlc_display_id, "
        f"_hlc_first_name, _hlc_middle_name, _hlc_last_name, _hlc_sex, _hlc_date_of_birth, _hlc_village_id, "
        f"_hlc_deleted_at, _hlc_updated_at{meta}"
        f"SELECT {pid}, 'P' || g, (ARRAY['Ana','Kofi','Mele','Sione','Nour'])[1 + g % 5], "
        f"(ARRAY['Tupou','Mensah','Silva','Lee'])[1 + g % 4], (ARRAY['female','male'])[1 + g % 2], "
        f"date '1950-01-01' + (g % 25000), {', '.join([f'{stamp} + g'] * 9)}, {common} "
        f"FROM generate_series(1, {p}) g",
        f"INSERT INTO patient_facilities (id, patient_id, facility_id{meta}"
        f"SELECT md5('m' || g)::uuid, {pid}, '{facility}', {common} FROM generate_series(1, {p}) g",
        f"INSERT INTO encounters (id, patient_id, facility_id, encounter_type, reason, start_at{meta}"
        f"SELECT md5('e' || g)::uuid, {pid}, '{facility}', 'clinic', 'check-up', "
        f"now() - (g % 1000) * interval '1 day', {common} FROM generate_series(1, {p}) g",
        f"INSERT INTO vitals (id, encounter_id, patient_id, recorded_at, temperature_c, heart_rate, systolic, "
        f"diastolic, spo2, weight_kg{meta}"
        f"SELECT md5('v' || g || '-' || k)::uuid, md5('e' || g)::uuid, {pid}, now() - k * interval '1 hour', "
        f"36.5 + (g % 10) / 10.0, 60 + (g + k) % 40, 110 + g % 30, 70 + g % 20, 95 + g % 5, 50 + g % 40, "
        f"{stamp} + g * 16 + k, 'central', {stamp} + g * 16 + k "
        f"FROM generate_series(1, {p}) g, generate_series(1, {VITALS_PER_PATIENT}) k",
        "ANALYZE",
    )
    return p * (3 + VITALS_PER_PATIENT)


@dataclass
class VerifyBench:
    """A central server process with one facility's scope, and that facility's database."""

    server: str
    central_dsn: str
    rows: int
    facility: str = ""
    made: int = 0
    node_dsn: str = ""
    proc: CentralProcess | None = None
    store: PostgresStore | None = None
    client: CentralClient | None = None
    results: dict[str, Any] = field(default_factory=dict)

    def setup(self) -> None:
        (self.facility,) = _facilities(self.central_dsn, "VERIFY")
        self.made = generate(self.central_dsn, self.facility, self.rows)
        self.proc = CentralProcess(self.central_dsn)
        with PostgresStore(self.central_dsn, REGISTRY) as cstore:
            token = central.add_node(cstore, f"verify-{uuid.uuid4().hex[:6]}", "facility", self.facility)
        self.node_dsn = _facility_db(self.server, f"ts_bench_verify_{uuid.uuid4().hex[:6]}")
        self.store = PostgresStore(self.node_dsn, REGISTRY)
        init_node(self.store, self.proc.url, token)
        self.client = client_for(self.store)

    def full_pull(self) -> dict[str, Any]:
        """The facility's first sync: its whole scope, over HTTP, into its empty tables."""
        assert self.store is not None and self.client is not None
        start = time.perf_counter()
        report = sync_once(self.store, self.client)
        return {"seconds": time.perf_counter() - start, "bytes": report.bytes_up + report.bytes_down,
                "rows": report.pulled_rows}  # fmt: skip

    def corrupt(self, n: int) -> set[str]:
        """Change ``n`` vitals on the facility behind the engine's back (triggers off)."""
        with connect(self.node_dsn) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT id::text FROM vitals ORDER BY md5(id::text) LIMIT {n}")
            keys = {str(r[0]) for r in cur.fetchall()}
            listed = ", ".join(f"'{k}'" for k in keys)
            cur.execute("BEGIN")
            cur.execute("SET LOCAL session_replication_role = replica")
            cur.execute(f"UPDATE vitals SET heart_rate = heart_rate + 1 WHERE id IN ({listed})")
            cur.execute("COMMIT")
        return keys

    def verify(self, *, repair: bool = False, fresh: bool = False) -> tuple[float, VerifyReport]:
        assert self.store is not None and self.client is not None
        start = time.perf_counter()
        report = verify_node(self.store, self.client, repair=repair, fresh=fresh)
        return time.perf_counter() - start, report

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.store is not None:
            self.store.close()
        if self.proc is not None:
            self.proc.stop()


@contextlib.contextmanager
def verify_bench(rows: int, dsn: str | None = None) -> Iterator[VerifyBench]:
    with _cluster(dsn) as server, _central(server) as central_dsn:
        bench = VerifyBench(server, central_dsn, rows)
        try:
            bench.setup()
            yield bench
        finally:
            bench.close()


def run(rows: int, *, differ: int = 100, repeats: int = 3, dsn: str | None = None, say: Any = print) -> dict[str, Any]:
    """The whole benchmark; returns its figures (also printed as it goes)."""
    out: dict[str, Any] = {"rows_vitals": rows, "differ": differ}
    with verify_bench(rows, dsn) as b:
        out["rows_scope"] = b.made
        say(f"central holds {b.made:,} rows of scope ({rows:,} vitals)")
        pull = b.full_pull()
        out["full_pull"] = pull
        say(f"full pull: {pull['rows']:,} rows, {pull['seconds']:.1f} s, {pull['bytes'] / 2**20:.1f} MiB")
        seconds, clean = b.verify()
        out["verify_clean"] = {"seconds": seconds, "bytes": clean.bytes_up + clean.bytes_down,
                               "differences": clean.differences}  # fmt: skip
        say(f"verify of the fresh copy: {seconds:.2f} s, {(clean.bytes_up + clean.bytes_down) / 1024:.0f} KiB, "
            f"{clean.differences} differences")  # fmt: skip
        changed = b.corrupt(differ)
        for label in ("verify", "verify_warm"):
            runs: list[float] = []
            for _ in range(repeats):
                seconds, found = b.verify(fresh=label == "verify")
                runs.append(seconds)
            ok = found.keys("differs") == changed and found.differences == differ
            reused = sum(t.central_reused for t in found.tables)
            out[label] = {"seconds": statistics.median(runs), "runs": runs, "bytes": found.bytes_up + found.bytes_down,
                          "bytes_up": found.bytes_up, "bytes_down": found.bytes_down, "found": found.differences,
                          "exact": ok, "phases": found.phases, "tables_reused": reused}  # fmt: skip
            say(f"{label} ({'fresh: central reads its copy' if label == 'verify' else 'central reuses its read'}), "
                f"{differ} rows differ: median {statistics.median(runs):.2f} s of {repeats} "
                f"({', '.join(f'{r:.2f}' for r in runs)}), {found.bytes_up / 1024:.0f} KiB up + "
                f"{found.bytes_down / 1024:.0f} KiB down; found {found.differences} "
                f"({'exactly those' if ok else 'WRONG'}); {reused} tables answered from a kept read")  # fmt: skip
        seconds, fixed = b.verify(repair=True)
        out["verify_repair"] = {"seconds": seconds, "bytes": fixed.bytes_up + fixed.bytes_down,
                                "unrepaired": fixed.unrepaired}  # fmt: skip
        say(f"verify --repair: {seconds:.2f} s, {(fixed.bytes_up + fixed.bytes_down) / 1024:.0f} KiB, "
            f"{fixed.unrepaired} left")  # fmt: skip
        seconds, after = b.verify()
        out["verify_after"] = {"seconds": seconds, "differences": after.differences}
        say(f"verify after the repair: {seconds:.2f} s, {after.differences} differences")
    v, w, p = out["verify"], out["verify_warm"], out["full_pull"]
    out["ratio_time"] = v["seconds"] / p["seconds"]
    out["ratio_time_warm"] = w["seconds"] / p["seconds"]
    out["ratio_bytes"] = v["bytes"] / p["bytes"]
    say(f"verify / full pull: {out['ratio_time']:.3f}× the time cold, {out['ratio_time_warm']:.3f}× warm, "
        f"{out['ratio_bytes']:.5f}× the bytes")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="vitals rows (the large table)")
    parser.add_argument("--differ", type=int, default=100, help="rows changed behind the engine's back")
    parser.add_argument("--repeats", type=int, default=3, help="timed verifies of the differing copy, cold and warm "
                        "(median)")
    parser.add_argument("--db", default=None, help="PostgreSQL server DSN (default: a throwaway cluster)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON at the end")
    args = parser.parse_args(argv)
    out = run(args.rows, differ=args.differ, repeats=args.repeats, dsn=args.db)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    exact = out["verify"]["exact"] and out["verify_warm"]["exact"]
    return 0 if exact and out["verify_after"]["differences"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
