"""Measurements of the SQLite store (not a test; run: python -m tests.sqlite.bench_sqlite [rows]).

- trigger overhead: the app's bulk insert and single-row updates, installed vs not;
- window read of N changed rows: the store (ADBC -> Arrow) vs stdlib sqlite3 tuples -> Arrow;
- apply of N incoming rows into an empty table, and N updates into the full table;
  the store (ADBC ingest + INSERT ... SELECT) vs stdlib sqlite3 executemany of the same rows.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from tests.sqlite.util import hlc_now
from tidesync.changes import conform
from tidesync.schemas.demo import REGISTRY, app_ddl
from tidesync.sqlite import SQLiteStore
from tidesync.sqlite.capture import select_columns
from tidesync.sqlite.types import from_storage, to_storage

VITALS = REGISTRY["vitals"]


def _fresh(dir_: Path, name: str, install: bool) -> Path:
    path = dir_ / f"{name}.db"
    conn = sqlite3.connect(path)
    conn.executescript(app_ddl("sqlite"))
    conn.execute("PRAGMA journal_mode = WAL")
    pid, fid, eid = (str(uuid.uuid4()) for _ in range(3))
    conn.execute("INSERT INTO patients (id, display_id) VALUES (?, 'P')", (pid,))
    conn.execute("INSERT INTO facilities (id, code, name) VALUES (?, 'F', 'F')", (fid,))
    conn.execute("INSERT INTO encounters (id, patient_id, facility_id, encounter_type, start_at) VALUES (?, ?, ?, 'c', 'x')",
                 (eid, pid, fid))  # fmt: skip
    conn.commit()
    conn.close()
    if install:
        with SQLiteStore(path, REGISTRY) as s:
            s.install("device-a")
    return path


def _ids(path: Path) -> tuple[str, str]:
    conn = sqlite3.connect(path)
    pid = conn.execute("SELECT id FROM patients").fetchone()[0]
    eid = conn.execute("SELECT id FROM encounters").fetchone()[0]
    conn.close()
    return pid, eid


def _app_rows(n: int, pid: str, eid: str) -> list[tuple[object, ...]]:
    return [(str(uuid.uuid4()), eid, pid, "2024-05-01T08:00:00.000000Z", 36.6, 70 + i % 50, 120, 80, 98, 70.5)
            for i in range(n)]  # fmt: skip


def trigger_overhead(dir_: Path, n: int, reps: int = 3) -> None:
    best: dict[bool, list[float]] = {False: [1e9, 1e9], True: [1e9, 1e9]}
    for rep in range(reps):
        for installed in (False, True):
            path = _fresh(dir_, f"trig{rep}{installed}", installed)
            pid, eid = _ids(path)
            rows = _app_rows(n, pid, eid)
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA synchronous = NORMAL")
            t0 = time.perf_counter()
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO vitals (id, encounter_id, patient_id, recorded_at, temperature_c, heart_rate,"
                             " systolic, diastolic, spo2, weight_kg) VALUES (?,?,?,?,?,?,?,?,?,?)", rows)  # fmt: skip
            conn.execute("COMMIT")
            ins = time.perf_counter() - t0
            ids = [r[0] for r in rows[:: max(1, n // 2000)]]
            t0 = time.perf_counter()
            for i in ids:  # each its own transaction, as an app does
                conn.execute("UPDATE vitals SET heart_rate = heart_rate + 1 WHERE id = ?", (i,))
            upd = (time.perf_counter() - t0) / len(ids)
            conn.close()
            best[installed] = [min(best[installed][0], ins), min(best[installed][1], upd)]
    (i0, u0), (i1, u1) = best[False], best[True]
    print(f"trigger overhead: bulk insert of {n} vitals {i0:.3f}s -> {i1:.3f}s ({i1 / i0:.2f}x); "
          f"single-row update {u0 * 1e6:.1f}us -> {u1 * 1e6:.1f}us ({u1 / u0:.2f}x)")  # fmt: skip


def _batch(n: int, pid: str, eid: str, hlc: int) -> pa.Table:
    ids = np.frombuffer(np.random.default_rng().bytes(16 * n), dtype=np.uint8)
    spec = VITALS
    t = pa.table({
        "id": pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(ids)]),
        "encounter_id": pa.array([uuid.UUID(eid).bytes] * n, pa.binary(16)),
        "patient_id": pa.array([uuid.UUID(pid).bytes] * n, pa.binary(16)),
        "recorded_at": pa.array(np.full(n, int(datetime(2024, 5, 1, tzinfo=UTC).timestamp() * 1e6)),
                                pa.timestamp("us", "UTC")),
        "temperature_c": pa.array(np.full(n, 36.6)), "heart_rate": pa.array(np.arange(n) % 50 + 60, pa.int32()),
        "systolic": pa.array(np.full(n, 120), pa.int32()), "diastolic": pa.nulls(n, pa.int32()),
        "spo2": pa.array(np.full(n, 97), pa.int32()), "weight_kg": pa.array(np.full(n, 70.5)),
        "deleted_at": pa.nulls(n, pa.timestamp("us", "UTC")),
        "_hlc": pa.array(np.full(n, hlc)), "_node": pa.array(["central"] * n), "_base_hlc": pa.nulls(n, pa.int64()),
        "_deleted": pa.array(np.zeros(n, bool)),
    })  # fmt: skip
    return conform(t, spec)


def _stdlib_window(path: Path, n: int) -> pa.Table:
    """The same read with the standard library: tuples, then the same conversions."""
    conn = sqlite3.connect(path)
    cols = select_columns(VITALS)
    rows = conn.execute(f"SELECT {', '.join(cols)} FROM vitals WHERE _cursor >= 0").fetchall()
    conn.close()
    columns = list(zip(*rows, strict=True))
    out = []
    for name, values in zip(cols, columns, strict=True):
        arr = pa.array(values)
        if name.startswith("_"):
            out.append(arr)
        else:
            out.append(from_storage(arr, VITALS.column(name).type, name))
    return pa.Table.from_arrays(out, names=cols)


def _stdlib_apply(path: Path, batch: pa.Table) -> None:
    """Writing the same rows with the standard library: Arrow -> tuples -> executemany."""
    cols = [c.name for c in VITALS.columns] + ["_hlc", "_node", "_base_hlc"]
    arrays = [to_storage(batch.column(c), VITALS.column(c).type) if not c.startswith("_") else batch.column(c)
              for c in cols]  # fmt: skip
    rows = list(zip(*[a.to_pylist() for a in arrays], strict=True))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(f"INSERT INTO vitals ({', '.join(cols)}, _cursor, _origin) VALUES "
                     f"({', '.join('?' * len(cols))}, 1, 'central')", rows)  # fmt: skip
    conn.execute("COMMIT")
    conn.close()


def window_and_apply(dir_: Path, n: int) -> None:
    path = _fresh(dir_, "apply", True)
    pid, eid = _ids(path)
    batch = _batch(n, pid, eid, hlc_now())
    with SQLiteStore(path, REGISTRY) as store:
        t0 = time.perf_counter()
        r = store.apply({"vitals": batch}, peer="central")
        t_apply = time.perf_counter() - t0
        assert r.tables["vitals"].inserted == n
        t0 = time.perf_counter()
        w = store.read_window(0, tables=["vitals"])
        t_read = time.perf_counter() - t0
        assert w.tables["vitals"].num_rows == n
        mark = w.watermark
        upd = batch.set_column(batch.schema.get_field_index("_hlc"), "_hlc", pa.array(np.full(n, hlc_now() + 10)))
        upd = upd.set_column(upd.schema.get_field_index("spo2"), "spo2", pa.array(np.full(n, 99), pa.int32()))
        t0 = time.perf_counter()
        r = store.apply({"vitals": upd}, peer="central")
        t_update = time.perf_counter() - t0
        assert r.tables["vitals"].updated == n
        t0 = time.perf_counter()
        w = store.read_window(mark, tables=["vitals"])
        t_read_inc = time.perf_counter() - t0
        assert w.tables["vitals"].num_rows == n
    t0 = time.perf_counter()
    std = _stdlib_window(path, n)
    t_std_read = time.perf_counter() - t0
    assert std.num_rows == n
    raw = sqlite3.connect(path)
    t0 = time.perf_counter()
    raw.execute("SELECT * FROM vitals WHERE _cursor >= 0").fetchall()
    t_raw = time.perf_counter() - t0
    raw.close()
    path2 = _fresh(dir_, "apply_std", True)
    pid2, eid2 = _ids(path2)
    batch2 = _batch(n, pid2, eid2, hlc_now())
    t0 = time.perf_counter()
    _stdlib_apply(path2, batch2)
    t_std_apply = time.perf_counter() - t0
    print(f"window read of {n} rows: store (ADBC) {t_read:.3f}s ({n / t_read:,.0f} rows/s), "
          f"incremental (cursor index) {t_read_inc:.3f}s; stdlib sqlite3 tuples -> Arrow {t_std_read:.3f}s; "
          f"stdlib fetchall alone {t_raw:.3f}s")  # fmt: skip
    print(f"apply of {n} rows into an empty table: store {t_apply:.3f}s ({n / t_apply:,.0f} rows/s); "
          f"stdlib executemany of the same rows (no merge) {t_std_apply:.3f}s; "
          f"{n} updates into the {n}-row table: store {t_update:.3f}s ({n / t_update:,.0f} rows/s)")  # fmt: skip


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory() as d:
        trigger_overhead(Path(d), n)
        window_and_apply(Path(d), n)
