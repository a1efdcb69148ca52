"""Capture on PostgreSQL: trigger stamping, tombstones, windows that never miss a change."""

from __future__ import annotations

import random
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc

from tidesync.pg import PostgresStore
from tidesync.pg.conn import connect

from .util import new_id, run, seed_patient


def _patient(store: PostgresStore, cursor: int = 0) -> dict[str, object]:
    t = store.read_window(cursor).tables["patients"]
    assert t.num_rows == 1
    row: dict[str, object] = t.to_pylist()[0]
    return row


def test_insert_and_update_are_stamped(demo_store: PostgresStore) -> None:
    dsn = demo_store.dsn
    pid = seed_patient(dsn)
    first = _patient(demo_store)
    assert first["_node"] == "facility-a" and first["_base_hlc"] == first["_hlc"] and first["_deleted"] is False
    assert all(first[f"_hlc_{c}"] == first["_hlc"] for c in ("display_id", "first_name", "last_name"))
    run(dsn, f"UPDATE patients SET first_name = 'Anne', sex = 'female' WHERE id = '{pid}'")
    second = _patient(demo_store)
    assert second["_hlc"] > first["_hlc"]  # type: ignore[operator]
    # Field-wise: only the columns that changed get the new stamp.
    assert second["_hlc_first_name"] == second["_hlc"] and second["_hlc_sex"] == second["_hlc"]
    assert second["_hlc_last_name"] == first["_hlc_last_name"]
    assert second["_hlc_display_id"] == first["_hlc_display_id"]
    # An UPDATE that sets a column to its current value does not restamp it.
    run(dsn, f"UPDATE patients SET first_name = 'Anne' WHERE id = '{pid}'")
    assert _patient(demo_store)["_hlc_first_name"] == second["_hlc_first_name"]


def test_stamp_never_goes_backwards_even_if_the_clock_does(demo_store: PostgresStore) -> None:
    dsn = demo_store.dsn
    pid = seed_patient(dsn)
    future = (int(time.time() * 1000) + 3_600_000) << 16  # a version an hour ahead, as if received
    run(dsn, "SET tidesync.applying = 'on'", f"UPDATE patients SET _hlc = {future}, _node = 'central' WHERE id = '{pid}'")
    run(dsn, f"UPDATE patients SET last_name = 'Li' WHERE id = '{pid}'")
    row = _patient(demo_store)
    assert row["_hlc"] == future + 1
    # The old version came from elsewhere, so the new one records it as its base.
    assert row["_base_hlc"] == future and row["_node"] == "facility-a"
    run(dsn, f"UPDATE patients SET last_name = 'Lo' WHERE id = '{pid}'")
    assert _patient(demo_store)["_base_hlc"] == future  # own chain keeps its base


def test_a_key_written_again_after_a_delete_is_stamped_above_its_tombstone(demo_store: PostgresStore) -> None:
    """Regression (found by the convergence harness): a re-insert took the clock's stamp
    even when the key's tombstone (from a peer whose clock is ahead, or clamped) carried
    a later one. The re-insert then lost to the delete everywhere but on its own node,
    which never heard the tombstone again: the network diverged for good."""
    dsn = demo_store.dsn
    vid = new_id()
    run(dsn, f"INSERT INTO reference_data (id, type, code, name) VALUES ('{vid}', 'drug', 'd1', 'Drug')")
    future = (int(time.time() * 1000) + 3_600_000) << 16  # a delete stamped an hour ahead, received
    run(dsn, "SET tidesync.applying = 'on'", f"INSERT INTO tidesync.reference_data__tombstones "
        f"(id, _cursor, _hlc, _node, _base_hlc) SELECT id, _cursor, {future}, 'central', _hlc FROM reference_data",
        f"DELETE FROM reference_data WHERE id = '{vid}'")  # fmt: skip
    run(dsn, f"INSERT INTO reference_data (id, type, code, name) VALUES ('{vid}', 'drug', 'd1', 'Drug again')")
    t = demo_store.read_window(0).tables["reference_data"].to_pylist()
    assert [(r["name"], r["_deleted"]) for r in t] == [("Drug again", False)]  # the tombstone went
    assert t[0]["_hlc"] == future + 1 and t[0]["_node"] == "facility-a"


def test_hard_delete_leaves_a_tombstone(demo_store: PostgresStore) -> None:
    dsn = demo_store.dsn
    vid = new_id()
    run(dsn, f"INSERT INTO reference_data (id, type, code, name) VALUES ('{vid}', 'drug', 'd1', 'Drug')")
    w1 = demo_store.read_window(0)
    hlc = w1.tables["reference_data"].column("_hlc")[0].as_py()
    run(dsn, f"DELETE FROM reference_data WHERE id = '{vid}'")
    w2 = demo_store.read_window(w1.watermark)
    t = w2.tables["reference_data"]
    assert t.num_rows == 1
    row = t.to_pylist()[0]
    assert row["_deleted"] is True and row["name"] is None and row["_hlc"] > hlc
    assert row["id"] == w1.tables["reference_data"].column("id")[0].as_py()


def test_out_of_order_commit_lands_in_a_later_window(demo_store: PostgresStore) -> None:
    dsn = demo_store.dsn
    cursor = demo_store.read_window(0).watermark
    a, b = new_id(), new_id()
    with connect(dsn, autocommit=False) as t1:
        with t1.cursor() as c1:  # T1 writes first, commits last
            c1.execute(f"INSERT INTO reference_data (id, type, code, name) VALUES ('{a}', 'x', 'a', 'A')")
        run(dsn, f"INSERT INTO reference_data (id, type, code, name) VALUES ('{b}', 'x', 'b', 'B')")  # T2
        w1 = demo_store.read_window(cursor)
        t1.commit()
    w2 = demo_store.read_window(w1.watermark)
    seen1 = w1.tables["reference_data"].column("code").to_pylist()
    seen2 = w2.tables["reference_data"].column("code").to_pylist()
    # T2 committed before the read but T1 was still running: the watermark stopped at
    # T1, so neither is in the first window, and both are in the next, once.
    assert "a" not in seen1
    assert sorted(seen1 + seen2) == ["a", "b"]


def test_concurrent_writers_every_commit_in_exactly_one_window(demo_store: PostgresStore) -> None:
    dsn = demo_store.dsn
    committed: dict[str, str] = {}  # id -> last committed name
    lock = threading.Lock()
    stop = time.monotonic() + 3.0
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        rng = random.Random(w)
        try:
            with connect(dsn, autocommit=False) as conn, conn.cursor() as cur:
                seq = 0
                mine: list[str] = []  # each writer updates only its own rows: no deadlocks
                while time.monotonic() < stop:
                    batch: dict[str, str] = {}
                    for _ in range(rng.randint(1, 5)):
                        seq += 1
                        if mine and rng.random() < 0.3:
                            rid = rng.choice(mine)
                            name = f"w{w}-{seq}"
                            cur.execute(f"UPDATE reference_data SET name = '{name}' WHERE id = '{rid}'")
                        else:
                            rid, name = new_id(), f"w{w}-{seq}"
                            cur.execute(f"INSERT INTO reference_data (id, type, code, name) "
                                        f"VALUES ('{rid}', 't', 'c', '{name}')")  # fmt: skip
                        batch[rid] = name
                    time.sleep(rng.random() * 0.02)  # hold the transaction open a little
                    if rng.random() < 0.1:
                        conn.rollback()
                        continue
                    conn.commit()
                    with lock:
                        committed.update(batch)
                    mine.extend(k for k in batch if k not in mine)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    cursor, seen = 0, []
    while any(t.is_alive() for t in threads):
        w = demo_store.read_window(cursor)
        cursor = w.watermark
        seen.append(w.tables["reference_data"].select(["id", "name"]))
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert not errors, errors
    seen.append(demo_store.read_window(cursor).tables["reference_data"].select(["id", "name"]))
    all_seen = pa.concat_tables(seen)
    pairs = list(zip(all_seen.column("id").to_pylist(), all_seen.column("name").to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)), "a version was handed out twice"
    last: dict[str, str] = {}
    for rid, name in pairs:  # windows are in order, so the last one seen is the newest
        last[str(uuid.UUID(bytes=rid))] = name
    assert len(committed) > 50
    assert last == committed


def test_no_echo_to_the_peer_a_version_came_from(make_demo_store) -> None:  # type: ignore[no-untyped-def]
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    seed_patient(a.dsn)
    w = a.read_window(0)
    central.apply(w.tables, peer="facility-a")
    assert central.read_window(0, peer="facility-a").rows == 0
    assert central.read_window(0, peer="facility-b").rows == 2
    # A local edit at central makes the row new again for everyone.
    run(central.dsn, "UPDATE patients SET first_name = 'Edited'")
    back = central.read_window(0, peer="facility-a").tables["patients"]
    assert pc.equal(back.column("first_name"), "Edited").to_pylist() == [True]
