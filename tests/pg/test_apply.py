"""Apply on PostgreSQL: merge in Rust, set-based writes, conflicts, quarantine, atomicity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tidesync import SchemaMismatchError
from tidesync.pg import PostgresStore

from .util import one, rows, run, seed_encounter, seed_patient


def test_apply_inserts_updates_and_deletes(make_demo_store) -> None:  # type: ignore[no-untyped-def]
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    pid = seed_patient(a.dsn)
    seed_encounter(a.dsn, pid, vitals=3)
    w1 = a.read_window(0)
    r1 = central.apply(w1.tables, peer="facility-a", cursor=("facility-a", w1.watermark))
    assert r1.total("inserted") == w1.rows == 7
    assert central.get_cursor("facility-a") == w1.watermark
    assert one(central.dsn, "SELECT count(*) FROM vitals") == 3
    # Applying the same window again changes nothing (pages are idempotent).
    again = central.apply(w1.tables, peer="facility-a")
    assert again.total("inserted") == again.total("updated") == 0 and again.total("unchanged") == 7

    run(a.dsn, "UPDATE vitals SET heart_rate = 99 WHERE heart_rate = 70",
        "DELETE FROM vitals WHERE heart_rate = 71")  # fmt: skip
    w2 = a.read_window(w1.watermark)
    r2 = central.apply(w2.tables, peer="facility-a")
    assert (r2.tables["vitals"].updated, r2.tables["vitals"].deleted) == (1, 1)
    assert sorted(r[0] for r in rows(central.dsn, "SELECT heart_rate FROM vitals")) == [72, 99]
    # The delete is a tombstone at central too, so it travels on to other nodes.
    other = central.read_window(0, peer="facility-b").tables["vitals"]
    assert pc.sum(other.column("_deleted").cast(pa.int64())).as_py() == 1
    # Stamps arrive as they were written; the applied rows are marked as from facility-a.
    assert one(central.dsn, "SELECT count(*) FROM vitals WHERE _node = 'facility-a' AND _origin = 'facility-a'") == 2


def test_field_wise_concurrent_edits_merge_and_log_the_loser(make_demo_store) -> None:  # type: ignore[no-untyped-def]
    central: PostgresStore = make_demo_store("central")
    a: PostgresStore = make_demo_store("facility-a")
    b: PostgresStore = make_demo_store("facility-b")
    pid = seed_patient(central.dsn)  # registered centrally, synced out to both clinics
    start = central.read_window(0)
    a.apply(start.tables, peer="central")
    b.apply(start.tables, peer="central")
    base = a.read_window(0, peer="central")
    assert base.rows == 0
    # Offline: A edits the names, B edits the first name differently and the sex.
    run(a.dsn, f"UPDATE patients SET first_name = 'Anna', last_name = 'Leigh' WHERE id = '{pid}'")
    time.sleep(0.002)
    run(b.dsn, f"UPDATE patients SET first_name = 'Annie', sex = 'female' WHERE id = '{pid}'")
    wa, wb = a.read_window(base.watermark), b.read_window(0, peer="central")
    ra = a.apply(wb.tables, peer="facility-b")
    b.apply(wa.tables, peer="facility-a")
    q = f"SELECT first_name, last_name, sex FROM patients WHERE id = '{pid}'"
    assert rows(a.dsn, q) == rows(b.dsn, q) == [("Annie", "Leigh", "female")]
    assert ra.tables["patients"].conflicts == 1
    log = a.conflicts("patients").to_pylist()
    assert len(log) == 1 and log[0]["lost_columns"] == ["first_name"] and log[0]["key"] == pid
    assert json.loads(log[0]["loser_row"])["first_name"] == "Anna"
    # The merged row mixes both sides, so A has a version B has not seen... and B
    # merged to the same row, so sending it over changes nothing there.
    again = b.apply(a.read_window(0, peer="facility-b").tables, peer="facility-a")
    assert again.total("updated") == 0


def test_bad_rows_are_quarantined_and_the_rest_applies(make_demo_store) -> None:  # type: ignore[no-untyped-def]
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    pid = seed_patient(a.dsn)
    seed_encounter(a.dsn, pid, vitals=4)
    w = a.read_window(0)
    vitals = w.tables["vitals"]
    temp = vitals.column("temperature_c").to_pylist()
    temp[0] = 99.0  # violates CHECK (temperature_c BETWEEN 25 AND 45)
    enc = vitals.column("encounter_id").to_pylist()
    enc[1] = uuid.uuid4().bytes  # an encounter that exists nowhere: foreign key violation
    vitals = vitals.set_column(vitals.schema.get_field_index("temperature_c"), "temperature_c", pa.array(temp))
    vitals = vitals.set_column(vitals.schema.get_field_index("encounter_id"), "encounter_id",
                               pa.array(enc, pa.binary(16)))  # fmt: skip
    tables = {**w.tables, "vitals": vitals}
    result = central.apply(tables, peer="facility-a", cursor=("facility-a", w.watermark))
    assert result.tables["vitals"].inserted == 2 and result.tables["vitals"].quarantined == 2
    assert result.tables["patients"].inserted == 1 and result.tables["encounters"].inserted == 1
    assert one(central.dsn, "SELECT count(*) FROM vitals") == 2
    q = central.quarantine("vitals").to_pylist()
    reasons = sorted(r["reason"] for r in q)
    assert any("vitals_temperature_c_check" in r for r in reasons), reasons
    assert any("foreign key" in r for r in reasons), reasons
    assert {json.loads(r["row_data"])["id"] for r in q} == {str(uuid.UUID(bytes=v)) for v in
                                                            vitals.column("id").to_pylist()[:2]}  # fmt: skip
    assert central.get_cursor("facility-a") == w.watermark  # the sync moved on


def test_wrong_schema_or_unknown_table_applies_nothing(make_demo_store) -> None:  # type: ignore[no-untyped-def]
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    seed_patient(a.dsn)
    w = a.read_window(0)
    with pytest.raises(SchemaMismatchError, match="unknown tables \\['prescriptions'\\]"):
        central.apply({**w.tables, "prescriptions": pa.table({"id": [1]})}, peer="facility-a")
    broken = w.tables["patients"].drop_columns(["last_name"])
    with pytest.raises(SchemaMismatchError, match="missing columns \\['last_name'\\]"):
        central.apply({**w.tables, "patients": broken}, peer="facility-a")
    wrong = w.tables["patients"].set_column(4, "last_name", pa.array([[1]]))
    with pytest.raises(SchemaMismatchError, match="last_name"):
        central.apply({**w.tables, "patients": wrong}, peer="facility-a")
    assert one(central.dsn, "SELECT count(*) FROM patients") == 0
    assert one(central.dsn, "SELECT count(*) FROM reference_data") == 0


_KILLED_APPLY = textwrap.dedent(
    """
    import sys, uuid
    import pyarrow as pa
    from tidesync.pg import PostgresStore
    from tidesync.schemas.demo import REGISTRY
    n = int(sys.argv[2])
    spec = REGISTRY["reference_data"]
    ids = pa.array([uuid.uuid4().bytes for _ in range(n)], pa.binary(16))
    batch = pa.table({
        "id": ids, "type": pa.repeat("drug", n), "code": pa.repeat("c", n),
        "name": pa.repeat("x" * 200, n), "visibility": pa.repeat("current", n),
        "_hlc": pa.repeat(pa.scalar(1 << 40, pa.int64()), n), "_node": pa.repeat("central", n),
        "_base_hlc": pa.nulls(n, pa.int64()), "_deleted": pa.repeat(False, n),
    })
    store = PostgresStore(sys.argv[1], REGISTRY)
    print("applying", flush=True)
    store.apply({"reference_data": batch}, peer="central", cursor=("central", 12345))
    print("done", flush=True)
    """
)


def test_apply_is_atomic_when_the_process_is_killed(demo_store: PostgresStore) -> None:
    dsn = demo_store.dsn
    n = 400_000
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_APPLY, dsn, str(n)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ})  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "applying"
    # Wait until the apply is writing (its COPY is running), then kill it outright.
    deadline = time.monotonic() + 30
    while one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'COPY%' AND state = 'active'") == 0:
        assert time.monotonic() < deadline, "the apply never started writing"
        assert proc.poll() is None, "the apply finished before it could be killed; use a bigger batch"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    # Nothing of the transaction is visible: no rows, no cursor.
    assert one(dsn, "SELECT count(*) FROM reference_data") == 0
    assert demo_store.get_cursor("central") == 0
    # And the same apply run to the end is complete, rows and cursor together.
    done = subprocess.run([sys.executable, "-c", _KILLED_APPLY, dsn, "1000"], capture_output=True, text=True,
                          check=True)  # fmt: skip
    assert done.stdout.split() == ["applying", "done"]
    assert one(dsn, "SELECT count(*) FROM reference_data") == 1000
    assert demo_store.get_cursor("central") == 12345


def test_a_local_edit_during_apply_is_not_lost(make_demo_store) -> None:  # type: ignore[no-untyped-def]
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    pid = seed_patient(central.dsn)
    w = central.read_window(0)
    a.apply(w.tables, peer="central")
    run(central.dsn, f"UPDATE patients SET last_name = 'Central' WHERE id = '{pid}'")
    run(a.dsn, f"UPDATE patients SET first_name = 'Local' WHERE id = '{pid}'")
    a.apply(central.read_window(w.watermark).tables, peer="central")
    assert rows(a.dsn, f"SELECT first_name, last_name FROM patients WHERE id = '{pid}'") == [("Local", "Central")]
    # The merged row holds a local edit central has not seen: it is not marked as from central.
    assert one(a.dsn, f"SELECT _origin IS NULL FROM patients WHERE id = '{pid}'") is True
    assert a.read_window(0, peer="central").tables["patients"].num_rows == 1


def test_bulk_path_locks_the_table_and_applies_the_same(make_demo_store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import tidesync.pg.apply as pg_apply

    monkeypatch.setattr(pg_apply, "ROW_LOCK_LIMIT", 1)  # every batch takes the bulk path
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    pid = seed_patient(a.dsn)
    seed_encounter(a.dsn, pid, vitals=3)
    w1 = a.read_window(0)
    assert central.apply(w1.tables, peer="facility-a").total("inserted") == 7  # empty tables: nothing read
    run(a.dsn, "UPDATE vitals SET heart_rate = heart_rate + 100", "DELETE FROM vitals WHERE heart_rate = 171")
    seed_encounter(a.dsn, pid, vitals=1)
    r = central.apply(a.read_window(w1.watermark).tables, peer="facility-a")
    assert (r.tables["vitals"].inserted, r.tables["vitals"].updated, r.tables["vitals"].deleted) == (1, 2, 1)
    assert sorted(x[0] for x in rows(central.dsn, "SELECT heart_rate FROM vitals")) == [70, 170, 172]


def test_apply_settings_stay_inside_its_transaction(make_demo_store) -> None:  # type: ignore[no-untyped-def]
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    seed_patient(a.dsn)
    with central.connection.cursor() as cur:
        cur.execute("SELECT current_setting('work_mem')")
        before = cur.fetchone()[0]
    assert central.apply(a.read_window(0).tables, peer="facility-a").total("inserted") == 2
    with central.connection.cursor() as cur:
        # apply raises work_mem for its joins with SET LOCAL: the session keeps its own.
        cur.execute("SELECT current_setting('work_mem')")
        assert cur.fetchone()[0] == before
        cur.execute("SELECT current_setting('tidesync.applying', true)")
        assert cur.fetchone()[0] in (None, "")


@pytest.mark.parametrize(
    ("errcode", "what"),
    [("query_canceled", "a cancelled statement (Ctrl-C, statement_timeout)"), ("deadlock_detected", "a deadlock")],
)
def test_an_error_that_is_not_about_the_rows_fails_the_apply_and_quarantines_nothing(  # type: ignore[no-untyped-def]
    make_demo_store, errcode: str, what: str
) -> None:
    # Regression: apply used to treat every database error as "bad rows" and bisect, so
    # a cancelled statement quarantined good rows and the sync moved past them.
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    pid = seed_patient(a.dsn)
    seed_encounter(a.dsn, pid, vitals=4)
    w = a.read_window(0)
    run(
        central.dsn,
        "CREATE FUNCTION interrupt() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN RAISE EXCEPTION '{what}' USING ERRCODE = '{errcode}'; END $$",
        "CREATE TRIGGER interrupt BEFORE INSERT ON vitals FOR EACH ROW EXECUTE FUNCTION interrupt()",
    )
    with pytest.raises(Exception, match=what.split(" (")[0]):
        central.apply(w.tables, peer="facility-a", cursor=("facility-a", w.watermark))
    assert one(central.dsn, "SELECT count(*) FROM patients") == 0  # all or nothing
    assert central.quarantine("vitals").num_rows == 0
    assert central.get_cursor("facility-a") != w.watermark
    run(central.dsn, "DROP TRIGGER interrupt ON vitals")
    assert central.apply(w.tables, peer="facility-a", cursor=("facility-a", w.watermark)).total("quarantined") == 0
    assert one(central.dsn, "SELECT count(*) FROM vitals") == 4


def test_bulk_load_into_an_empty_table_quarantines_orphans_and_keeps_the_constraints(  # type: ignore[no-untyped-def]
    make_demo_store, monkeypatch
) -> None:
    import tidesync.pg.apply as pg_apply

    monkeypatch.setattr(pg_apply, "LOAD_MIN_ROWS", 1)  # every table is a bulk load into an empty table
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    declared = rows(central.dsn, "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                                 "FROM pg_constraint WHERE contype = 'f' ORDER BY 1, 2")  # fmt: skip
    pid = seed_patient(a.dsn)
    seed_encounter(a.dsn, pid, vitals=4)
    w = a.read_window(0)
    vitals = w.tables["vitals"]
    enc = vitals.column("encounter_id").to_pylist()
    enc[1] = uuid.uuid4().bytes  # an encounter that exists nowhere
    vitals = vitals.set_column(vitals.schema.get_field_index("encounter_id"), "encounter_id",
                               pa.array(enc, pa.binary(16)))  # fmt: skip
    result = central.apply({**w.tables, "vitals": vitals}, peer="facility-a")
    assert (result.tables["vitals"].inserted, result.tables["vitals"].quarantined) == (3, 1)
    q = central.quarantine("vitals").to_pylist()
    assert len(q) == 1 and "vitals_encounter_id_fkey" in q[0]["reason"]
    assert json.loads(q[0]["row_data"])["id"] == str(uuid.UUID(bytes=vitals.column("id")[1].as_py()))
    assert one(central.dsn, "SELECT count(*) FROM vitals") == 3
    # The foreign keys are back exactly as declared, and enforced.
    assert rows(central.dsn, "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                             "FROM pg_constraint WHERE contype = 'f' ORDER BY 1, 2") == declared  # fmt: skip
    with pytest.raises(Exception, match="foreign key"):
        run(central.dsn, f"UPDATE vitals SET encounter_id = '{uuid.uuid4()}'")


def test_streamed_parts_load_in_bulk_and_fall_back_to_merging_cleanly(  # type: ignore[no-untyped-def]
    make_demo_store, monkeypatch
) -> None:
    import tidesync.pg.apply as pg_apply

    monkeypatch.setattr(pg_apply, "LOAD_MIN_ROWS", 1)
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    pid = seed_patient(a.dsn)
    seed_encounter(a.dsn, pid, vitals=6)
    run(a.dsn, "DELETE FROM vitals WHERE heart_rate = 75")  # a tombstone in the stream
    w = a.read_window(0)
    vitals = w.tables["vitals"].sort_by("_deleted")  # live rows first, the tombstone last
    temp = vitals.column("temperature_c").to_pylist()
    temp[3] = 99.0  # violates the CHECK: the part holding it cannot go straight in
    vitals = vitals.set_column(vitals.schema.get_field_index("temperature_c"), "temperature_c", pa.array(temp))
    parts = [(name, t) for name, t in w.tables.items() if name != "vitals"]
    parts += [("vitals", vitals.slice(0, 2)), ("vitals", vitals.slice(2, 2)), ("vitals", vitals.slice(4))]
    again = parts[-1]  # the last part delivered twice changes nothing
    r = central.apply_parts([*parts, again], peer="facility-a", cursor=("facility-a", w.watermark))
    v = r.tables["vitals"]
    assert (v.inserted, v.quarantined, v.deleted) == (4, 1, 1), v
    assert sorted(x[0] for x in rows(central.dsn, "SELECT heart_rate FROM vitals")) == [70, 71, 72, 74]
    assert one(central.dsn, "SELECT count(*) FROM tidesync.vitals__tombstones") == 1
    assert central.get_cursor("facility-a") == w.watermark
    assert one(central.dsn, "SELECT count(*) FROM pg_indexes WHERE indexname = 'vitals_patient'") == 1
    with pytest.raises(Exception, match="foreign key"):
        run(central.dsn, f"UPDATE vitals SET patient_id = '{uuid.uuid4()}'")
    # Apply the same stream to the same database again: all unchanged.
    r2 = central.apply_parts(parts, peer="facility-a")
    assert r2.tables["vitals"].unchanged == 5 and r2.tables["vitals"].inserted == 0


def test_streamed_parts_name_an_unknown_table_and_apply_nothing(make_demo_store) -> None:  # type: ignore[no-untyped-def]
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    seed_patient(a.dsn)
    w = a.read_window(0)
    with pytest.raises(SchemaMismatchError, match="unknown table 'nope'"):
        central.apply_parts([*w.tables.items(), ("nope", w.tables["patients"])], peer="facility-a")
    assert one(central.dsn, "SELECT count(*) FROM patients") == 0


def test_a_parent_deleted_with_its_children_applies_children_first(make_demo_store) -> None:  # type: ignore[no-untyped-def]
    """Regression (found by the convergence harness's review of apply order): parts come
    parents first, so a patient's tombstone arrived before its encounter's and vitals';
    deleting the patient first failed its foreign keys and quarantined a valid delete."""
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    pid = seed_patient(a.dsn)
    seed_encounter(a.dsn, pid, vitals=2)
    w1 = a.read_window(0)
    central.apply(w1.tables, peer="facility-a")
    run(a.dsn, f"DELETE FROM vitals WHERE patient_id = '{pid}'", f"DELETE FROM encounters WHERE patient_id = '{pid}'",
        f"DELETE FROM patients WHERE id = '{pid}'")  # fmt: skip
    w2 = a.read_window(w1.watermark)
    r = central.apply(w2.tables, peer="facility-a")
    assert r.total("quarantined") == 0 and central.quarantine().num_rows == 0
    assert (r.tables["patients"].deleted, r.tables["encounters"].deleted, r.tables["vitals"].deleted) == (1, 1, 2)
    assert one(central.dsn, f"SELECT count(*) FROM patients WHERE id = '{pid}'") == 0


def test_a_rejected_row_with_a_non_finite_float_is_quarantined_not_fatal(make_demo_store) -> None:  # type: ignore[no-untyped-def]
    """Regression: the quarantine's readable JSON of a row holding an infinite or NaN
    float was refused by jsonb, which failed the whole apply (and so every sync)."""
    a: PostgresStore = make_demo_store("facility-a")
    central: PostgresStore = make_demo_store("central")
    seed_encounter(a.dsn, seed_patient(a.dsn), vitals=2)
    tables = dict(a.read_window(0).tables)
    vitals = tables["vitals"]
    i = vitals.schema.get_field_index("temperature_c")
    tables["vitals"] = vitals.set_column(i, vitals.schema.field(i), pa.array([float("inf"), float("nan")]))
    r = central.apply(tables, peer="facility-a")
    assert r.tables["vitals"].quarantined == 2 and r.tables["encounters"].inserted == 1
    reasons = central.quarantine(table="vitals").to_pylist()
    assert {json.loads(e["row_data"])["temperature_c"] for e in reasons} == {"inf", "nan"}
