"""Capture: trigger stamping of plain-SQL writes, tombstones, and windows that miss nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from tests.sqlite.util import App, hlc_now, new_id, stamps, ub, wire
from tidesync.core import hlc_unpack, now_ms
from tidesync.schemas.demo import REGISTRY
from tidesync.sqlite import SQLiteStore

PATIENTS = REGISTRY["patients"]


def test_insert_stamps_the_row(store: SQLiteStore, app: App) -> None:
    before = now_ms()
    pid = app.seed_patient()
    after = now_ms()
    row = app.row("patients", pid)
    ms, counter = hlc_unpack(row["_hlc"])
    assert before - 1 <= ms <= after + 1 and counter == 0
    assert row["_node"] == "device-a" and row["_base_hlc"] == row["_hlc"] and row["_origin"] is None
    assert set(stamps(PATIENTS, row).values()) == {row["_hlc"]}
    # Record-mode tables get no field stamps, but the same row stamps.
    village = app.row("reference_data", row["village_id"])
    assert village["_node"] == "device-a" and village["_cursor"] < row["_cursor"]


def test_update_restamps_only_the_changed_columns(store: SQLiteStore, app: App) -> None:
    pid = app.seed_patient()
    old = app.row("patients", pid)
    app.run(("UPDATE patients SET first_name = 'Anne', last_name = 'Lee', sex = 'female' WHERE id = ?", (pid,)))
    new = app.row("patients", pid)
    assert new["_hlc"] > old["_hlc"] and new["_cursor"] > old["_cursor"]
    changed = {c for c, s in stamps(PATIENTS, new).items() if s != old[f"_hlc_{c}"]}
    assert changed == {"first_name", "sex"}  # last_name was set to the value it had
    assert new["_hlc_first_name"] == new["_hlc"]
    assert new["_base_hlc"] == old["_hlc"]  # still this node's own chain: the creation is the base


def test_update_hlc_follows_the_old_stamp_even_if_the_clock_is_behind(store: SQLiteStore, app: App) -> None:
    pid = app.seed_patient()
    future = hlc_now() + (3_600_000 << 16)  # a peer an hour ahead
    store.apply({"patients": wire(PATIENTS, [{"id": pid, "display_id": "P", "first_name": "Z"}], hlc=future)},
                peer="central")  # fmt: skip
    app.run(("UPDATE patients SET first_name = 'Y' WHERE id = ?", (pid,)))
    row = app.row("patients", pid)
    assert row["_hlc"] == future + 1 and row["_node"] == "device-a"
    assert row["_hlc_first_name"] == future + 1


def test_base_hlc_rule(store: SQLiteStore, app: App) -> None:
    pid = new_id()
    h = hlc_now() - 1000
    store.apply({"patients": wire(PATIENTS, [{"id": pid, "display_id": "P", "first_name": "Ann"}], hlc=h)},
                peer="central")  # fmt: skip
    received = app.row("patients", pid)
    assert (received["_hlc"], received["_node"], received["_base_hlc"]) == (h, "central", None)
    assert received["_origin"] == "central"
    # First local edit of a version that came from elsewhere: its stamp becomes the base.
    app.run(("UPDATE patients SET first_name = 'Anna' WHERE id = ?", (pid,)))
    first = app.row("patients", pid)
    assert first["_base_hlc"] == h and first["_node"] == "device-a" and first["_origin"] is None
    # Further local edits continue the chain: the base stays.
    app.run(("UPDATE patients SET last_name = 'Lee' WHERE id = ?", (pid,)))
    second = app.row("patients", pid)
    assert second["_base_hlc"] == h and second["_hlc"] > first["_hlc"]
    # A hard delete's tombstone follows the same rule.
    app.run(("DELETE FROM patients WHERE id = ?", (pid,)))
    tomb = app.rows("SELECT _hlc, _node, _base_hlc, _origin FROM _tidesync_tomb_patients WHERE id = ?", (pid,))
    assert tomb == [(tomb[0][0], "device-a", h, None)] and tomb[0][0] > second["_hlc"]


def test_hard_delete_leaves_a_tombstone_in_the_window(store: SQLiteStore, app: App) -> None:
    pid = app.seed_patient()
    eid = app.seed_encounter(pid, vitals=2)
    w0 = store.read_window(0)
    vid = app.one("SELECT id FROM vitals WHERE heart_rate = 70")
    app.run(("DELETE FROM vitals WHERE id = ?", (vid,)))
    w1 = store.read_window(w0.watermark)
    v = w1.tables["vitals"]
    assert v.num_rows == 1
    row = v.to_pylist()[0]
    assert row["id"] == ub(vid) and row["_deleted"] is True and row["_node"] == "device-a"
    assert row["patient_id"] is None and row["heart_rate"] is None
    assert sum(t.num_rows for t in w1.tables.values()) == 1
    assert v.schema == REGISTRY["vitals"].wire_schema()
    # Delete then insert the same key at once: the new row orders after the tombstone, which goes.
    app.run("DELETE FROM vitals", ("DELETE FROM encounters WHERE id = ?", (eid,)),
            ("DELETE FROM patients WHERE id = ?", (pid,)))  # fmt: skip
    dead = app.one("SELECT _hlc FROM _tidesync_tomb_patients WHERE id = ?", (pid,))
    app.seed_patient(pid=pid)
    assert app.row("patients", pid)["_hlc"] > dead
    assert app.rows("SELECT * FROM _tidesync_tomb_patients WHERE id = ?", (pid,)) == []
    w2 = store.read_window(w1.watermark)
    assert [r["_deleted"] for r in w2.tables["patients"].to_pylist()] == [False]


def _content(w: pa.Table, key: str = "id") -> dict[bytes, dict[str, object]]:
    return {r[key]: r for r in w.to_pylist()}


def test_every_write_is_in_exactly_one_window(store: SQLiteStore, app: App) -> None:
    seen: dict[bytes, list[int]] = {}
    cursor = 0
    written: list[str] = []
    for step in range(6):
        for _ in range(step):
            written.append(app.seed_patient(f"n{step}"))
        if step % 2:
            app.run(("UPDATE patients SET middle_name = ? WHERE id = ?", (f"m{step}", written[0])))
        w = store.read_window(cursor)
        assert w.cursor == cursor and w.watermark >= cursor
        for r in w.tables["patients"].to_pylist():
            seen.setdefault(r["id"], []).append(r["_hlc"])
        cursor = w.watermark
    assert store.read_window(cursor).rows == 0
    assert set(seen) == {ub(p) for p in written}
    # Each version once: the key edited in several windows shows each of its versions once.
    assert all(len(set(v)) == len(v) for v in seen.values())
    assert len(seen[ub(written[0])]) == 3


_WRITER = textwrap.dedent(
    """
    import sqlite3, sys, time, uuid
    path, seconds = sys.argv[1], float(sys.argv[2])
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    vid = str(uuid.uuid4())
    conn.execute("INSERT INTO reference_data (id, type, code, name) VALUES (?, 'village', 'w', 'W')", (vid,))
    end, i, ids = time.monotonic() + seconds, 0, []
    while time.monotonic() < end:
        conn.execute("BEGIN")
        for _ in range(5):
            pid = str(uuid.uuid4())
            ids.append(pid)
            conn.execute("INSERT INTO patients (id, display_id, first_name, village_id) VALUES (?, ?, 'w', ?)",
                         (pid, f"W{i}", vid))
            i += 1
        conn.execute("UPDATE patients SET last_name = ? WHERE id = ?", (f"L{i}", ids[i // 2]))
        conn.execute("COMMIT")
    print(i, flush=True)
    """
)


def test_windows_under_a_concurrent_writer_miss_nothing(db: Path, store: SQLiteStore, app: App) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(db), "2.0"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ})  # fmt: skip
    cursor, windows, latest = 0, 0, {}
    counts: dict[bytes, int] = {}
    done = False
    while not done:
        done = proc.poll() is not None  # one more window after the writer finished
        w = store.read_window(cursor)
        cursor = w.watermark
        windows += 1
        for r in w.tables["patients"].to_pylist():
            counts[r["id"]] = counts.get(r["id"], 0) + 1
            prev = latest.get(r["id"])
            assert prev is None or r["_hlc"] > prev["_hlc"], "a version came twice or out of order"
            latest[r["id"]] = r
        time.sleep(0.005)
    assert proc.stdout is not None
    inserted = int(proc.stdout.read())
    proc.stdout.close()
    assert proc.returncode == 0 and inserted > 100 and windows > 10
    # Count: every committed row reached a window; content: the last version seen is the stored one.
    stored = app.rows("SELECT id, first_name, last_name, _hlc FROM patients")
    assert len(stored) == inserted == len(latest)
    for pid, first, last, hlc in stored:
        r = latest[uuid.UUID(pid).bytes]
        assert (r["first_name"], r["last_name"], r["_hlc"]) == (first, last, hlc)


def test_echo_suppression(store: SQLiteStore, app: App) -> None:
    mine = app.seed_patient("Mine")
    theirs = new_id()
    w0 = store.read_window(0)
    store.apply({"patients": wire(PATIENTS, [{"id": theirs, "display_id": "T", "first_name": "Theirs"}])},
                peer="central")  # fmt: skip
    # Read for the peer the version came from: not there. For anyone else: there.
    for_central = store.read_window(0, peer="central").tables["patients"]
    assert for_central.column("id").to_pylist() == [ub(mine)]
    assert sorted(store.read_window(0, peer="facility-b").tables["patients"].column("id").to_pylist()) == sorted(
        [ub(mine), ub(theirs)]
    )
    assert store.read_window(w0.watermark).tables["patients"].column("id").to_pylist() == [ub(theirs)]
    # Once edited here the row is a local version again, and goes back to central.
    app.run(("UPDATE patients SET first_name = 'Edited' WHERE id = ?", (theirs,)))
    assert store.read_window(w0.watermark, peer="central").tables["patients"].column("id").to_pylist() == [
        ub(theirs)
    ]


def test_window_of_selected_tables_in_fk_order(store: SQLiteStore, app: App) -> None:
    pid = app.seed_patient()
    app.seed_encounter(pid)
    w = store.read_window(0, tables=["vitals", "patients", "facilities"])
    assert list(w.tables) == ["facilities", "patients", "vitals"]
    assert [t.num_rows for t in w.tables.values()] == [1, 1, 3]
    assert pc.all(pc.equal(w.tables["vitals"].column("_node"), "device-a")).as_py()
