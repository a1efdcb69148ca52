"""Time capture and apply on a real PostgreSQL against PostgreSQL's own bulk paths.

All runs use one throwaway cluster (or ``--db``), the demo schema's ``patients`` table
(field-wise: 10 application columns plus 9 per-column stamps), medians of ``repeats``
interleaved runs, ratios measured in the same run (above 1: tidesync is faster):

- **window** — ``read_window`` of 1M changed rows into Arrow vs ``psql`` running the
  same window query as ``COPY (…) TO STDOUT (FORMAT binary)`` into /dev/null.
- **apply (empty)** — ``apply`` of 1M incoming rows into an empty table vs ``psql``
  ``\\copy … FROM (FORMAT binary)`` of the same rows into a copy of the table (same
  columns, constraints and indexes, no triggers).
- **apply (half updates)** — 1M incoming rows, half of them newer versions of rows in a
  1M-row table, vs ``COPY`` into a staging table plus one plain ``MERGE``.
- **triggers** — a bulk ``INSERT … SELECT`` and single-row ``UPDATE``s on the table with
  tidesync's capture triggers vs the same table without triggers (and with a
  do-nothing trigger, the floor any trigger costs).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from rich.console import Console

from tidesync.bench.core_bench import Row, _measure, _median, _Reporter, _row, render_notes, render_table
from tidesync.pg import PostgresStore
from tidesync.pg.capture import window_sql
from tidesync.pg.cluster import TempCluster, find_bindir
from tidesync.pg.conn import connect, execute_script
from tidesync.registry import stamp_column
from tidesync.schemas.demo import REGISTRY, app_ddl

SECTIONS: tuple[str, ...] = ("window", "apply", "triggers")
WINDOW_MIN_RATIO = 0.7
APPLY_EMPTY_MIN_RATIO = 0.7
APPLY_MERGE_MIN_RATIO = 0.8
TABLE = "patients"
SPEC = REGISTRY[TABLE]

_FIRST = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gita", "Hemi", "Ioane", "Jun", "Kiri", "Losa"]
_LAST = ["Tui", "Ngata", "Smith", "Kumar", "Silva", "Okafor", "Nguyen", "Fale", "Wong", "Brown"]
_SEX = ["female", "male", "other", "unknown"]


def make_patients(n: int, *, seed: int = 0, hlc_base: int = 1 << 56, node: str = "central") -> pa.Table:
    """``n`` patient versions in the wire schema, built column-wise (no per-row Python)."""
    rng = np.random.default_rng(seed)
    ids = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(rng.bytes(16 * n))])
    return patient_versions(ids, rng, hlc_base=hlc_base, node=node)


def patient_versions(ids: pa.Array, rng: np.random.Generator, *, hlc_base: int, node: str) -> pa.Table:
    n = len(ids)

    def pick(words: list[str]) -> pa.Array:
        return pa.DictionaryArray.from_arrays(pa.array(rng.integers(0, len(words), n), pa.int32()),
                                              pa.array(words)).cast(pa.string())  # fmt: skip

    hlc = pa.array(hlc_base + rng.integers(0, 1 << 40, n), pa.int64())
    ts = pa.array(1_700_000_000_000_000 + rng.integers(0, 10**13, n), pa.timestamp("us", tz="UTC"))
    cols: dict[str, pa.Array] = {
        "id": ids,
        "display_id": pa.array(np.char.add("P", rng.integers(10**7, 10**8, n).astype(str))),
        "first_name": pick(_FIRST),
        "middle_name": pa.nulls(n, pa.string()),
        "last_name": pick(_LAST),
        "sex": pick(_SEX),
        "date_of_birth": pa.array(rng.integers(-20000, 19000, n).astype(np.int32), pa.date32()),
        "village_id": pa.nulls(n, pa.binary(16)),
        "deleted_at": pa.nulls(n, pa.timestamp("us", tz="UTC")),
        "updated_at": ts,
        "_hlc": hlc,
        "_node": pa.repeat(pa.scalar(node), n),
        "_base_hlc": pa.nulls(n, pa.int64()),
        "_deleted": pa.repeat(pa.scalar(False), n),
    }
    for c in SPEC.data_columns:
        cols[stamp_column(c.name)] = hlc
    return pa.table(cols).cast(SPEC.wire_schema())


class _Db:
    """A benchmark database: the demo tables, tidesync installed, a trigger-free twin."""

    def __init__(self, dsn: str, bindir: Path) -> None:
        self.dsn = dsn
        self.psql = str(bindir / "psql")
        with connect(dsn) as conn, conn.cursor() as cur:
            execute_script(cur, app_ddl("postgres"))
        self.store = PostgresStore(dsn, REGISTRY)
        self.store.install("bench")
        # The twin: same columns (metadata included), constraints and indexes; no triggers.
        self.sql(f"DROP TABLE IF EXISTS {TABLE}_plain", f"CREATE TABLE {TABLE}_plain (LIKE {TABLE} INCLUDING ALL)")
        # LIKE copies no foreign keys: give the twin the table's own, so both pay for them.
        with connect(dsn) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = '{TABLE}'::regclass "
                        "AND contype = 'f'")  # fmt: skip
            self.foreign_keys = [str(row[0]) for row in cur.fetchall()]
        self.sql(*(f"ALTER TABLE {TABLE}_plain ADD {fk}" for fk in self.foreign_keys))
        self.columns = [*(c.name for c in SPEC.columns), "_hlc", "_node", "_base_hlc",
                        *(stamp_column(c.name) for c in SPEC.data_columns), "_origin"]  # fmt: skip

    def sql(self, *statements: str) -> None:
        with connect(self.dsn) as conn, conn.cursor() as cur:
            for s in statements:
                cur.execute(s)

    def psql_run(self, *args: str) -> None:
        """Run psql (``-c command`` or ``-1 -f script``); its output is thrown away."""
        # Rows loaded into the tidesync table by psql keep their stamps, as apply's do.
        env = {**os.environ, "PGOPTIONS": "-c tidesync.applying=on"}
        cmd = [self.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.dsn, *args]
        subprocess.run(cmd, check=True, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def reset(self) -> None:
        self.sql(f"TRUNCATE {TABLE} CASCADE", f"TRUNCATE tidesync.{TABLE}__tombstones", f"TRUNCATE {TABLE}_plain")

    def close(self) -> None:
        self.store.close()


@contextmanager
def _database(dsn: str | None) -> Iterator[_Db]:
    """The benchmark database on ``dsn``'s server, or on a throwaway cluster."""
    with contextlib.ExitStack() as stack:
        if dsn is None:
            cluster = stack.enter_context(TempCluster(fast=False, settings={"synchronous_commit": "off"}))
            dsn = cluster.create_database("tidesync_bench")
        db = _Db(dsn, find_bindir())
        stack.callback(db.close)
        yield db


def _bench_window(db: _Db, rows: int, repeats: int, rep: _Reporter) -> Row:
    with rep.step(f"window: loading {rows:,} changed rows"):
        db.reset()
        db.store.apply({TABLE: make_patients(rows)}, peer=None)
    query = window_sql(SPEC, 0, 1 << 62, None)
    counted: list[int] = []

    def ours() -> None:
        w = db.store.read_window(0, tables=[TABLE])
        counted.append(w.tables[TABLE].num_rows)

    def raw() -> None:
        db.psql_run("-c", f"COPY ({query}) TO STDOUT (FORMAT binary)")

    with rep.step(f"window: read_window vs COPY TO STDOUT ×{repeats}"):
        t = _measure({"tidesync": ours, "copy": raw}, repeats)
    check = "ok" if set(counted) == {rows} else f"MISMATCH: read {sorted(set(counted))} rows, expected {rows}"
    ratio = _median(t["copy"]) / _median(t["tidesync"])
    return _row(benchmark="window read", baseline="COPY (window query) TO STDOUT binary", rows=rows,
                ts_runs=t["tidesync"], base_runs=t["copy"], target=f"≥{WINDOW_MIN_RATIO}×",
                target_met=ratio >= WINDOW_MIN_RATIO, check=check)  # fmt: skip


def _bench_apply(db: _Db, rows: int, repeats: int, rep: _Reporter, tmp: Path) -> list[Row]:
    results: list[Row] = []
    incoming = make_patients(rows, seed=1)
    cols = ", ".join(db.columns)
    file_in = tmp / "incoming.bin"
    with rep.step("apply: writing the incoming rows as a binary COPY file"):
        db.reset()
        db.store.apply({TABLE: incoming}, peer="central")
        db.psql_run("-c", f"\\copy (SELECT {cols} FROM {TABLE}) TO '{file_in}' (FORMAT binary)")

    counts: list[int] = []

    def ours_empty() -> None:
        db.store.apply({TABLE: incoming}, peer="central")

    def raw_empty() -> None:
        db.psql_run("-c", f"\\copy {TABLE}_plain ({cols}) FROM '{file_in}' (FORMAT binary)")

    def empty_tables() -> None:
        db.reset()
        db.sql("CHECKPOINT")

    with rep.step(f"apply into an empty table vs COPY ×{repeats}"):
        t = _interleaved({"tidesync": ours_empty, "copy": raw_empty}, repeats, prepare=lambda _: empty_tables(),
                         after={"tidesync": lambda: counts.append(int(_count(db, TABLE)))}, warmup=1)  # fmt: skip
    n = min(counts)
    results.append(_row(benchmark="apply (empty table)", baseline="binary COPY into the same table", rows=rows,
                        ts_runs=t["tidesync"], base_runs=t["copy"], target=f"≥{APPLY_EMPTY_MIN_RATIO}×",
                        target_met=_median(t["copy"]) / _median(t["tidesync"]) >= APPLY_EMPTY_MIN_RATIO,
                        check="ok" if n == rows else f"MISMATCH: {n} rows")) # fmt: skip

    # Half updates: the local table holds `rows` rows; incoming has newer versions of
    # half of them (new stamps, a changed name) and as many new keys.
    rng = np.random.default_rng(7)
    half = rows // 2
    local = make_patients(rows, seed=2, hlc_base=1 << 55)
    upd_ids = local.column("id").combine_chunks().take(pa.array(rng.permutation(rows)[:half]))
    updates = patient_versions(upd_ids, rng, hlc_base=1 << 57, node="central")
    new_rows = make_patients(rows - half, seed=3)
    mixed = pa.concat_tables([updates, new_rows])
    file_local, file_mixed = tmp / "local.bin", tmp / "mixed.bin"
    with rep.step("apply: preparing the 1M-row table and the half-update batch"):
        db.reset()
        db.store.apply({TABLE: mixed}, peer="central")
        db.psql_run("-c", f"\\copy (SELECT {cols} FROM {TABLE}) TO '{file_mixed}' (FORMAT binary)")
        db.reset()
        db.store.apply({TABLE: local}, peer="central")
        db.psql_run("-c", f"\\copy (SELECT {cols} FROM {TABLE}) TO '{file_local}' (FORMAT binary)")

    def restore(name: str) -> None:
        # Only the table the next run writes; the checkpoint flushes the restore's dirty
        # pages before the clock starts, so neither side pays for the other's writes.
        table = TABLE if name == "tidesync" else f"{TABLE}_plain"
        db.reset()
        db.psql_run("-c", f"\\copy {table} ({cols}) FROM '{file_local}' (FORMAT binary)")
        db.sql(f"VACUUM ANALYZE {table}", "CHECKPOINT")

    counts.clear()

    def ours_mixed() -> None:
        db.store.apply({TABLE: mixed}, peer="central")

    # The same columns as apply writes: apply also moves `_cursor` to its transaction
    # (that is how windows find the change; inserts take it from the column default).
    sets = ", ".join(f"{c} = s.{c}" for c in db.columns if c != "id") + ", _cursor = pg_current_xact_id()"
    merge_sql = (
        f"CREATE TEMP TABLE stage (LIKE {TABLE}_plain INCLUDING DEFAULTS); "
        f"\\copy stage ({cols}) FROM '{file_mixed}' (FORMAT binary)\n"
        f"MERGE INTO {TABLE}_plain t USING stage s ON t.id = s.id "
        f"WHEN MATCHED THEN UPDATE SET {sets} "
        f"WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({', '.join('s.' + c for c in db.columns)});"
    )
    script = tmp / "merge.sql"
    script.write_text(merge_sql.replace("; \\copy", ";\n\\copy"))

    def raw_merge() -> None:
        db.psql_run("-1", "-f", str(script))

    with rep.step(f"apply half updates into 1M rows vs COPY + MERGE ×{repeats}"):
        times = _interleaved({"tidesync": ours_mixed, "merge": raw_merge}, repeats, prepare=restore,
                             after={"tidesync": lambda: counts.append(int(_count(db, TABLE)))})  # fmt: skip
    n = min(counts)
    expect = rows + (rows - half)
    results.append(_row(benchmark="apply (half updates)", baseline="binary COPY to staging + MERGE", rows=rows,
                        ts_runs=times["tidesync"], base_runs=times["merge"], target=f"≥{APPLY_MERGE_MIN_RATIO}×",
                        target_met=_median(times["merge"]) / _median(times["tidesync"]) >= APPLY_MERGE_MIN_RATIO,
                        check="ok" if n == expect else f"MISMATCH: {n} rows, expected {expect}"))  # fmt: skip
    return results


def _interleaved(
    fns: dict[str, Callable[[], None]],
    repeats: int,
    *,
    prepare: Callable[[str], None],
    after: dict[str, Callable[[], None]],
    warmup: int = 0,
) -> dict[str, list[float]]:
    """Round-robin timed runs; ``prepare(name)`` before and ``after[name]()`` (checks) after
    each run, both outside the timed region."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            prepare(name)
            elapsed = _measure({name: fn}, 1, warmup=0)[name]
            if name in after:
                after[name]()
            if round_ >= warmup:
                times[name] += elapsed
    return times


def _count(db: _Db, table: str) -> Any:
    with connect(db.dsn) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        return cur.fetchone()[0]


def _bench_triggers(db: _Db, rows: int, repeats: int, rep: _Reporter) -> list[Row]:
    db.reset()
    db.sql(
        f"DROP TABLE IF EXISTS {TABLE}_noop",
        f"CREATE TABLE {TABLE}_noop (LIKE {TABLE} INCLUDING ALL)",
        *(f"ALTER TABLE {TABLE}_noop ADD {fk}" for fk in db.foreign_keys),
        "CREATE OR REPLACE FUNCTION bench_noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
        f"CREATE TRIGGER noop BEFORE INSERT OR UPDATE ON {TABLE}_noop FOR EACH ROW EXECUTE FUNCTION bench_noop()",
    )
    insert = (
        "INSERT INTO {t} (id, display_id, first_name, last_name, sex, date_of_birth, _hlc, _node) "
        "SELECT uuidv7(), 'P' || i, 'Ana', 'Tui', 'female', date '1990-01-01' + (i % 9000), 0, 'x' "
        f"FROM generate_series(1, {rows}) i"
    )
    tables = {"tidesync": TABLE, "no trigger": f"{TABLE}_plain", "do-nothing trigger": f"{TABLE}_noop"}

    def bulk(t: str) -> Callable[[], None]:
        def run() -> None:
            db.sql(f"TRUNCATE {t} CASCADE")
            db.sql(insert.format(t=t))

        return run

    results: list[Row] = []
    with rep.step(f"triggers: bulk insert of {rows:,} rows ×{repeats}"):
        t = _measure({k: bulk(v) for k, v in tables.items()}, repeats)
    for base in ("no trigger", "do-nothing trigger"):
        results.append(_row(benchmark="trigger: bulk insert", baseline=f"same table, {base}", rows=rows,
                            ts_runs=t["tidesync"], base_runs=t[base],
                            note="ratio below 1 = slower than the baseline; 1/ratio is the overhead"))  # fmt: skip
    updates = min(rows, 20_000)
    upd = (
        "DO $$ DECLARE r record; BEGIN FOR r IN SELECT id FROM {t} LIMIT " + str(updates) + " LOOP "
        "UPDATE {t} SET first_name = 'Ben' || length(r.id::text) , last_name = 'Ngata' WHERE id = r.id; "
        "END LOOP; END $$"
    )

    def single(t: str) -> Callable[[], None]:
        return lambda: db.sql(upd.replace("{t}", t))

    with rep.step(f"triggers: {updates:,} single-row updates ×{repeats}"):
        t = _measure({k: single(v) for k, v in tables.items()}, repeats)
    for base in ("no trigger", "do-nothing trigger"):
        results.append(_row(benchmark="trigger: single-row updates", baseline=f"same table, {base}", rows=updates,
                            ts_runs=t["tidesync"], base_runs=t[base]))  # fmt: skip
    return results


def run_store_bench(
    rows: int = 1_000_000,
    repeats: int = 3,
    console: Console | None = None,
    *,
    only: Sequence[str] | None = None,
    dsn: str | None = None,
    show_table: bool = True,
) -> list[Row]:
    """Run the PostgreSQL capture/apply benchmarks; one dict per (benchmark, baseline)."""
    sections = [s for s in SECTIONS if only is None or s in only]
    steps = {"window": 2, "apply": 4, "triggers": 2}
    rep = _Reporter(console, sum(steps[s] for s in sections) + 1)
    results: list[Row] = []
    # psql's \copy reads and writes these files on the client side, as this user.
    with tempfile.TemporaryDirectory(prefix="tidesync-bench-") as tmp, rep.running(), contextlib.ExitStack() as stack:
        with rep.step("starting PostgreSQL and installing the demo schema"):
            db = stack.enter_context(_database(dsn))
        if "window" in sections:
            results.append(_bench_window(db, rows, repeats, rep))
        if "apply" in sections:
            results += _bench_apply(db, rows, repeats, rep, Path(tmp))
        if "triggers" in sections:
            results += _bench_triggers(db, min(rows, 200_000), repeats, rep)
    if console is not None and show_table:
        console.print(render_table(results, repeats=repeats))
        for line in render_notes(results):
            console.print(line, highlight=False, markup=False)
    return results
