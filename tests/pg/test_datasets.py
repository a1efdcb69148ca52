"""National import and export (tidesync.datasets) against a real PostgreSQL: stamps as the
application's own writes, idempotent re-imports, bad files refused with the row and
column at fault and nothing loaded, snapshot exports that duckdb and polars open."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest
from click.testing import CliRunner, Result

from tidesync import datasets
from tidesync.cli import main
from tidesync.datasets import DatasetError, DatasetSchemaError, export_snapshot, import_table
from tidesync.errors import SchemaMismatchError
from tidesync.pg import PostgresStore
from tidesync.schemas.demo import REGISTRY

from tests.sync.conftest import Net, ids, network, query  # noqa: F401 - `network` is a fixture
from .util import new_id, one, rows, run

UTC = dt.timezone.utc
PATIENT_COLUMNS = "id::text, display_id, first_name, last_name, sex, date_of_birth, updated_at"


def _patients(n: int, start: int = 0) -> pl.DataFrame:
    """``n`` patients as a national registry would send them (uuid keys as text)."""
    sexes = ["female", "male", "other", "unknown"]
    return pl.DataFrame(
        {
            "id": [str(uuid.UUID(int=(7 << 76) | (i + 1))) for i in range(start, start + n)],
            "display_id": [f"NAT-{i:06d}" for i in range(start, start + n)],
            "first_name": [f"First{i}" for i in range(start, start + n)],
            "last_name": [None if i % 5 == 0 else f"Last{i}" for i in range(start, start + n)],
            "sex": [sexes[i % 4] for i in range(start, start + n)],
            "date_of_birth": [dt.date(1950, 1, 1) + dt.timedelta(days=37 * i) for i in range(start, start + n)],
            "updated_at": [dt.datetime(2024, 1, 1, tzinfo=UTC) + dt.timedelta(minutes=i)
                           for i in range(start, start + n)],
        },
        schema_overrides={"updated_at": pl.Datetime("us", "UTC")},
    )


def _db_patients(dsn: str) -> list[tuple[Any, ...]]:
    return rows(dsn, f"SELECT {PATIENT_COLUMNS} FROM patients ORDER BY id")


def _frame_rows(df: pl.DataFrame) -> list[tuple[Any, ...]]:
    cols = ["id", "display_id", "first_name", "last_name", "sex", "date_of_birth", "updated_at"]
    return [tuple(r) for r in df.select(cols).sort("id").iter_rows()]


def _state(dsn: str, table: str = "patients") -> list[tuple[Any, ...]]:
    """A table's rows with their stamps and cursors: equal before and after means untouched."""
    return rows(dsn, f"SELECT t::text, _cursor::text FROM {table} t ORDER BY id")


def _now_hlc() -> int:
    return int(time.time() * 1000) << 16


# ----------------------------------------------------------------------------- import


def test_parquet_import_is_stamped_like_the_applications_writes(make_demo_store: Any, tmp_path: Path) -> None:
    central: PostgresStore = make_demo_store("central")
    df = _patients(50)
    path = tmp_path / "patients.parquet"
    df.write_parquet(path)
    before = _now_hlc()
    report = import_table(central, "patients", path)
    after = _now_hlc() + (1 << 16)
    assert (report.rows, report.inserted, report.updated, report.unchanged, report.node) == (50, 50, 0, 0, "central")
    assert _db_patients(central.dsn) == _frame_rows(df)
    # Stamped by the capture triggers: this node, a fresh HLC, its own base, no origin,
    # one transaction as the cursor, and every field stamp of a new row = its HLC.
    stamps = rows(central.dsn, "SELECT _node, _hlc, _base_hlc, _origin, _cursor::text, _hlc_first_name, "
                               "_hlc_date_of_birth, _hlc_updated_at FROM patients")  # fmt: skip
    assert {s[0] for s in stamps} == {"central"}
    assert all(before <= s[1] <= after and s[2] == s[1] and s[3] is None for s in stamps)
    assert all(s[5] == s[6] == s[7] == s[1] for s in stamps)
    assert len({s[4] for s in stamps}) == 1
    # The next window hands them out (to every peer: nothing is suppressed as an echo)...
    window = central.read_window(0, peer="fac-a", tables=["patients"])
    out = window.tables["patients"]
    assert out.num_rows == 50 and not any(out.column("_deleted").to_pylist())
    assert set(out.column("_node").to_pylist()) == {"central"}
    # ...and a node applying that pull holds exactly the file.
    fac: PostgresStore = make_demo_store("fac-a")
    fac.apply(window.tables, peer="central", cursor=("central", window.watermark))
    assert _db_patients(fac.dsn) == _frame_rows(df)


def test_csv_import_into_a_field_wise_table_is_idempotent_and_stamps_only_changes(
    make_demo_store: Any, tmp_path: Path
) -> None:
    central: PostgresStore = make_demo_store("central")
    patients = _patients(20)
    patients.write_parquet(tmp_path / "patients.parquet")
    import_table(central, "patients", tmp_path / "patients.parquet")
    pids = patients["id"].to_list()
    extra = pl.DataFrame({
        "id": [str(uuid.UUID(int=(9 << 76) | i)) for i in range(20)],
        "patient_id": pids,
        "phone": [f"+254 700 {i:06d}" for i in range(20)],
        "address": [None if i % 3 else f"Plot {i}, Kisumu" for i in range(20)],
        "height_cm": [150.5 + i for i in range(20)],
        "updated_at": [f"2024-03-0{1 + i % 9} 10:{i:02d}:00+03:00" for i in range(20)],
    })  # fmt: skip
    csv = tmp_path / "patient_additional_data.csv"
    extra.write_csv(csv)
    first = import_table(central, "patient_additional_data", csv)
    assert (first.inserted, first.updated, first.unchanged) == (20, 0, 0)
    got = rows(central.dsn, "SELECT id::text, patient_id::text, phone, address, height_cm, updated_at "
                            "FROM patient_additional_data ORDER BY id")  # fmt: skip
    assert got[3] == (extra["id"][3], pids[3], "+254 700 000003", "Plot 3, Kisumu", 153.5,
                      dt.datetime(2024, 3, 4, 7, 3, tzinfo=UTC))  # fmt: skip
    assert got[4][3] is None  # an empty CSV field is null
    mark = central.read_window(0).watermark
    state = _state(central.dsn, "patient_additional_data")

    # The same file again: nothing changes, not a stamp, not a cursor; nothing to pull.
    again = import_table(central, "patient_additional_data", csv)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 20)
    assert _state(central.dsn, "patient_additional_data") == state
    assert central.read_window(mark).rows == 0

    # One phone number corrected: that row is restamped, that field only.
    key = extra["id"][7]
    q = (f"SELECT _hlc, _base_hlc, _hlc_phone, _hlc_address, _hlc_height_cm, phone FROM patient_additional_data "
         f"WHERE id = '{key}'")  # fmt: skip
    (old,) = rows(central.dsn, q)
    time.sleep(0.002)
    extra.with_columns(pl.when(pl.col("id") == key).then(pl.lit("+254 711 111111")).otherwise(pl.col("phone"))
                       .alias("phone")).write_csv(csv)  # fmt: skip
    fixed = import_table(central, "patient_additional_data", csv)
    assert (fixed.inserted, fixed.updated, fixed.unchanged) == (0, 1, 19)
    (new,) = rows(central.dsn, q)
    assert new[5] == "+254 711 111111"
    assert new[0] > old[0] and new[2] == new[0]  # a new version, its phone stamped with it
    assert new[3:5] == old[3:5]  # the untouched fields keep their stamps
    assert new[1] == old[1]  # the previous version was this node's own: same base
    window = central.read_window(mark)
    assert window.rows == 1 and window.tables["patient_additional_data"].column("phone").to_pylist() == [new[5]]


def test_imported_rows_reach_exactly_the_nodes_in_scope_over_the_network(
    network: Net, tmp_path: Path  # noqa: F811 - the fixture imported above
) -> None:
    """Imported at central: global patients go to every node; patient-scoped data only
    where the patient is marked; the marks (facility scope) only to their facility."""
    net, a, b, mobile = network.net, network.a, network.b, network.mobile
    patients = _patients(12)
    pids = patients["id"].to_list()
    patients.write_parquet(tmp_path / "patients.parquet")
    extra = pl.DataFrame({"id": [new_id() for _ in pids], "patient_id": pids, "blood_type": ["O+"] * 12})
    extra.write_csv(tmp_path / "extra.csv")
    marks = pl.DataFrame({"id": [new_id(), new_id()], "patient_id": pids[:2], "facility_id": [a.facility_id] * 2})
    marks.write_csv(tmp_path / "marks.csv")
    import_table(net.central, "patients", tmp_path / "patients.parquet")
    import_table(net.central, "patient_facilities", tmp_path / "marks.csv")
    import_table(net.central, "patient_additional_data", tmp_path / "extra.csv")
    for node in (a, b, mobile):
        report = node.sync()
        assert report.conflicts == report.quarantined == 0
    for node in (a, b, mobile):
        assert set(pids) <= ids(node, "patients")
    assert ids(a, "patient_additional_data") == set(extra["id"][:2].to_list())
    assert ids(mobile, "patient_additional_data") == set(extra["id"][:2].to_list())
    assert ids(b, "patient_additional_data") == set() and ids(b, "patient_facilities") == set()
    # Re-importing sends nothing; a corrected row travels alone.
    import_table(net.central, "patient_additional_data", tmp_path / "extra.csv")
    assert a.sync().pulled_rows == 0
    extra.with_columns(pl.when(pl.col("patient_id") == pids[0]).then(pl.lit("AB-")).otherwise(pl.col("blood_type"))
                       .alias("blood_type")).write_csv(tmp_path / "extra.csv")  # fmt: skip
    assert import_table(net.central, "patient_additional_data", tmp_path / "extra.csv").updated == 1
    assert a.sync().pulled_rows == 1
    assert query(a, f"SELECT blood_type FROM patient_additional_data WHERE patient_id = '{pids[0]}'") == [("AB-",)]


def _seeded(make_demo_store: Any, tmp_path: Path) -> PostgresStore:
    """The central store holding 3 patients already (what a bad import must leave alone)."""
    central: PostgresStore = make_demo_store("central")
    _patients(3, start=1000).write_parquet(tmp_path / "seed.parquet")
    import_table(central, "patients", tmp_path / "seed.parquet")
    return central


def _csv(tmp_path: Path, df: pl.DataFrame, name: str = "patients.csv") -> Path:
    path = tmp_path / name
    df.write_csv(path)
    return path


def _refused(store: PostgresStore, table: str, path: Path, *, row: int | None, column: str | None,
             says: str, cls: type[Exception] = DatasetError) -> str:  # fmt: skip
    """Import ``path``; it must be refused naming ``row`` and ``column``, leaving ``table`` as it was."""
    before = _state(store.dsn, table)
    with pytest.raises(cls) as info:
        import_table(store, table, path)
    msg = str(info.value)
    assert str(path) in msg and says in msg, msg
    if isinstance(info.value, DatasetError):
        assert (info.value.row, info.value.column) == (row, column), msg
    if row is not None:
        assert f"row {row}," in msg, msg
    if column is not None:
        assert f"column {column!r}" in msg, msg
    assert "nothing was imported" in msg or not isinstance(info.value, DatasetError)
    assert _state(store.dsn, table) == before
    return msg


def test_the_header_is_checked_before_anything_is_read(make_demo_store: Any, tmp_path: Path) -> None:
    central = _seeded(make_demo_store, tmp_path)
    good = _patients(4)
    _refused(central, "patients", _csv(tmp_path, good.with_columns(pl.lit("x").alias("nickname"))), row=None,
             column="nickname", says="is not a column of table 'patients'", cls=DatasetSchemaError)  # fmt: skip
    _refused(central, "patients", _csv(tmp_path, good.with_columns(pl.lit(1).alias("_hlc"))), row=None,
             column="_hlc", says="is tidesync metadata", cls=DatasetSchemaError)  # fmt: skip
    _refused(central, "patients", _csv(tmp_path, good.drop("id")), row=None, column="id",
             says="the key column 'id' of table 'patients' is missing", cls=DatasetSchemaError)  # fmt: skip
    _refused(central, "patients", _csv(tmp_path, good.drop("display_id")), row=None, column="display_id",
             says="requires a value there (not null, no default)", cls=DatasetSchemaError)  # fmt: skip
    # A column the database fills in by default may be left out (updated_at: now()).
    assert import_table(central, "patients", _csv(tmp_path, good.drop("updated_at"))).inserted == 4
    # The wrong type in a Parquet file: the whole column, named.
    wrong = tmp_path / "wrong.parquet"
    good.with_columns(pl.lit(True).alias("date_of_birth")).write_parquet(wrong)
    _refused(central, "patients", wrong, row=None, column="date_of_birth",
             says="holds bool values (every row); table 'patients' expects a date as YYYY-MM-DD",
             cls=DatasetSchemaError)  # fmt: skip
    with pytest.raises(SchemaMismatchError, match="unknown table 'patient'"):
        import_table(central, "patient", wrong)
    with pytest.raises(DatasetError, match="not a .parquet or .csv"):
        import_table(central, "patients", tmp_path / "patients.xlsx")


@pytest.mark.parametrize(
    ("column", "row", "value", "says"),
    [
        ("id", 3, "not-a-uuid", "'not-a-uuid' is not a uuid"),
        ("id", 2, "", "the key is empty"),
        ("date_of_birth", 2, "1990-02-30", "'1990-02-30' is not a date as YYYY-MM-DD (date)"),
        ("updated_at", 4, "yesterday", "'yesterday' is not a timestamp"),
        ("display_id", 4, "", "no value, but table 'patients' requires one"),
    ],
)
def test_a_value_that_does_not_convert_is_named_by_row_and_column(
    make_demo_store: Any, tmp_path: Path, column: str, row: int, value: str, says: str
) -> None:
    central = _seeded(make_demo_store, tmp_path)
    df = _patients(6).with_columns(pl.col(c).cast(pl.String) for c in ("date_of_birth", "updated_at"))
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == row - 1).then(pl.lit(value or None))
                         .otherwise(pl.col(column)).alias(column))  # fmt: skip
    _refused(central, "patients", _csv(tmp_path, df), row=row, column=column, says=says)


def test_numbers_and_flags_are_checked_too(make_demo_store: Any, tmp_path: Path) -> None:
    central: PostgresStore = make_demo_store("central")
    log = pl.DataFrame({"id": [new_id() for _ in range(3)], "action": ["login", "view", "edit"],
                        "at": ["2024-05-01T08:00:00Z"] * 3, "sequence": ["1", "2", "2.5"]})  # fmt: skip
    _refused(central, "audit_log", _csv(tmp_path, log, "audit.csv"), row=3, column="sequence",
             says="'2.5' is not a whole number (64-bit)")  # fmt: skip
    facilities = pl.DataFrame({"id": [new_id(), new_id()], "code": ["A", "B"], "name": ["Clinic A", "Clinic B"],
                               "is_sensitive": ["no", "maybe"]})  # fmt: skip
    _refused(central, "facilities", _csv(tmp_path, facilities, "fac.csv"), row=2, column="is_sensitive",
             says="'maybe' is not true or false")  # fmt: skip
    # Parquet floats for an integer column (pandas writes those when a value is missing) are
    # fine when whole, refused at the first fraction.
    ok = log.with_columns(pl.Series("sequence", [1.0, None, 3.0]), pl.col("at").str.to_datetime(time_zone="UTC"))
    ok.write_parquet(tmp_path / "audit.parquet")
    assert import_table(central, "audit_log", tmp_path / "audit.parquet").inserted == 3
    assert sorted(rows(central.dsn, "SELECT sequence FROM audit_log"), key=str) == [(1,), (3,), (None,)]


def test_parquet_types_and_text_forms_convert(make_demo_store: Any, tmp_path: Path) -> None:
    central: PostgresStore = make_demo_store("central")
    ids = [uuid.uuid4() for _ in range(3)]
    fac = uuid.uuid4()
    log = pl.DataFrame({
        "id": [u.bytes for u in ids],  # 16 bytes, as Parquet's UUID type reads in polars
        "facility_id": [fac.hex.upper(), None, str(fac)],  # no dashes, upper case, canonical
        "action": pl.Series(["login", "view", "login"], dtype=pl.Categorical),
        "at": [dt.datetime(2024, 5, 1, 8, 0), dt.datetime(2024, 5, 1, 9, 30), dt.datetime(2024, 5, 2)],  # naive: UTC
        "sequence": pl.Series([1, 2, 3], dtype=pl.Int16),
    })  # fmt: skip
    log.write_parquet(tmp_path / "audit.parquet")
    assert import_table(central, "audit_log", tmp_path / "audit.parquet").inserted == 3
    got = rows(central.dsn, "SELECT id::text, facility_id::text, action, at, sequence FROM audit_log ORDER BY sequence")
    assert got == [
        (str(ids[0]), str(fac), "login", dt.datetime(2024, 5, 1, 8, 0, tzinfo=UTC), 1),
        (str(ids[1]), None, "view", dt.datetime(2024, 5, 1, 9, 30, tzinfo=UTC), 2),
        (str(ids[2]), str(fac), "login", dt.datetime(2024, 5, 2, tzinfo=UTC), 3),
    ]
    # A value too large for an integer column is refused before the database sees it
    # (so before any foreign key of vitals is even looked at).
    vitals = pl.DataFrame({"id": [new_id(), new_id()], "encounter_id": [new_id()] * 2,
                           "patient_id": [new_id()] * 2, "recorded_at": ["2024-05-01 08:00:00Z"] * 2,
                           "heart_rate": ["72", "3000000000"]})  # fmt: skip
    _refused(central, "vitals", _csv(tmp_path, vitals, "vitals.csv"), row=2, column="heart_rate",
             says="'3000000000' is not a whole number from -2147483648 to 2147483647")  # fmt: skip
    short = pl.DataFrame({"id": [b"\x01" * 16, b"\x02" * 15], "action": ["a", "b"],
                          "at": [dt.datetime(2024, 1, 1, tzinfo=UTC)] * 2})  # fmt: skip
    short.write_parquet(tmp_path / "short.parquet")
    _refused(central, "audit_log", tmp_path / "short.parquet", row=2, column="id", says="is not a uuid")


def test_constraints_refused_by_postgresql_are_traced_to_the_row(make_demo_store: Any, tmp_path: Path) -> None:
    central = _seeded(make_demo_store, tmp_path)
    # CHECK (sex IN (...)): rows 1-4 are fine, row 5 is not, so nothing at all is loaded.
    df = _patients(6).with_columns(pl.when(pl.int_range(pl.len()) == 4).then(pl.lit("robot"))
                                   .otherwise(pl.col("sex")).alias("sex"))  # fmt: skip
    _refused(central, "patients", _csv(tmp_path, df), row=5, column="sex", says="'robot' breaks the check")
    # A foreign key without its parent (village_id -> reference_data).
    village = new_id()
    run(central.dsn, f"INSERT INTO reference_data (id, type, code, name) VALUES ('{village}', 'village', 'v1', 'V')")
    missing = new_id()
    df = _patients(4).with_columns(pl.Series("village_id", [village, None, missing, village]))
    _refused(central, "patients", _csv(tmp_path, df), row=3, column="village_id",
             says=f"{missing} is not in reference_data (id)")  # fmt: skip
    # A key twice in one file.
    df = pl.concat([_patients(6), _patients(1, start=1)])
    _refused(central, "patients", _csv(tmp_path, df), row=7, column="id", says="appears again (first at row 2)")
    # Another unique constraint (facilities.code) against a row already there.
    run(central.dsn, f"INSERT INTO facilities (id, code, name) VALUES ('{new_id()}', 'KSM', 'Kisumu')")
    fac = pl.DataFrame({"id": [new_id(), new_id()], "code": ["NBI", "KSM"], "name": ["Nairobi", "Kisumu 2"],
                        "is_sensitive": [False, False]})  # fmt: skip
    _refused(central, "facilities", _csv(tmp_path, fac, "fac.csv"), row=2, column="code",
             says="'KSM' is already taken by another facilities row")  # fmt: skip
    # The connection is fine after all that: a good file goes in.
    assert import_table(central, "patients", _csv(tmp_path, _patients(6))).inserted == 6


def test_rows_are_numbered_across_slices_and_a_late_failure_loads_nothing(
    make_demo_store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    central = _seeded(make_demo_store, tmp_path)
    monkeypatch.setattr(datasets, "SLICE_ROWS", 100)
    df = _patients(350)
    bad_value = df.with_columns(pl.when(pl.int_range(pl.len()) == 276).then(pl.lit("13/13/1990"))
                                .otherwise(pl.col("date_of_birth").cast(pl.String)).alias("date_of_birth"))  # fmt: skip
    _refused(central, "patients", _csv(tmp_path, bad_value), row=277, column="date_of_birth", says="'13/13/1990'")
    # Three slices staged, then PostgreSQL refuses row 333: the staged rows go too.
    bad_check = df.with_columns(pl.when(pl.int_range(pl.len()) == 332).then(pl.lit("n/a"))
                                .otherwise(pl.col("sex")).alias("sex"))  # fmt: skip
    bad_check.write_parquet(tmp_path / "late.parquet")
    _refused(central, "patients", tmp_path / "late.parquet", row=333, column="sex", says="'n/a' breaks the check")
    steps: list[tuple[str, int, int]] = []
    report = datasets.import_table(central, "patients", _csv(tmp_path, df), progress=lambda *s: steps.append(s))
    assert report.inserted == 350 and one(central.dsn, "SELECT count(*) FROM patients") == 353
    assert [s for s in steps if s[0] == "check and stage"][-1] == ("check and stage", 350, 350)
    assert steps[-1] == ("write", 350, 350)


# ----------------------------------------------------------------------------- export


def _network_data(make_demo_store: Any, tmp_path: Path) -> PostgresStore:
    """Central with imported patients and extra data, one patient deleted (a tombstone)."""
    central: PostgresStore = make_demo_store("central")
    patients = _patients(30)
    patients.write_parquet(tmp_path / "in.parquet")
    import_table(central, "patients", tmp_path / "in.parquet")
    pl.DataFrame({"id": [new_id() for _ in range(10)], "patient_id": patients["id"][:10],
                  "phone": [f"+1 555 {i:04d}" for i in range(10)], "height_cm": [160.0 + i for i in range(10)]}
                 ).write_csv(tmp_path / "extra.csv")  # fmt: skip
    import_table(central, "patient_additional_data", tmp_path / "extra.csv")
    run(central.dsn, f"DELETE FROM patients WHERE id = '{patients['id'][29]}'")
    return central


def _exported_equals_database(dsn: str, table: str, got: pl.DataFrame) -> None:
    spec = REGISTRY[table]
    cols = ", ".join(f"{c.name}::text AS {c.name}" if c.type.value == "uuid" else c.name for c in spec.columns)
    want = rows(dsn, f"SELECT {cols} FROM {table} ORDER BY id")
    assert got.columns[: len(spec.columns)] == [c.name for c in spec.columns]
    assert [tuple(r) for r in got.select([c.name for c in spec.columns]).sort("id").iter_rows()] == want


def test_export_to_parquet_opens_in_polars_and_duckdb_from_one_snapshot(make_demo_store: Any, tmp_path: Path) -> None:
    central = _network_data(make_demo_store, tmp_path)
    out = tmp_path / "national.parquet"
    late = new_id()

    def meanwhile(what: str, done: int, total: int) -> None:
        # After the first table, someone registers a patient: the export must not see it.
        if what == "export facilities" and not rows(central.dsn, f"SELECT 1 FROM patients WHERE id = '{late}'"):
            run(central.dsn, f"INSERT INTO patients (id, display_id) VALUES ('{late}', 'LATE')")

    report = export_snapshot(central, out, progress=meanwhile)
    assert out.is_dir() and sorted(p.name for p in out.iterdir()) == sorted(f"{n}.parquet" for n in REGISTRY.names)
    assert report.tables["patients"] == 29 and report.tables["patient_additional_data"] == 10
    assert list(report.tables) == REGISTRY.names and report.format == "parquet"
    assert one(central.dsn, "SELECT count(*) FROM patients") == 30  # the late one is there now...
    patients = pl.read_parquet(out / "patients.parquet")
    assert late not in patients["id"].to_list()  # ...but not in the snapshot
    run(central.dsn, f"DELETE FROM patients WHERE id = '{late}'")
    _exported_equals_database(central.dsn, "patients", patients)  # tombstone not exported, values equal
    _exported_equals_database(central.dsn, "patient_additional_data",
                              pl.read_parquet(out / "patient_additional_data.parquet"))  # fmt: skip
    assert patients.schema["date_of_birth"] == pl.Date and patients.schema["updated_at"] == pl.Datetime("us", "UTC")
    assert not any(c.startswith("_") for c in patients.columns)
    con = duckdb.connect()
    assert con.execute(f"SELECT count(*) FROM '{out}/patients.parquet'").fetchone() == (29,)
    assert con.execute(f"SELECT count(*) FROM '{out}/patients.parquet' p JOIN '{out}/patient_additional_data.parquet' "
                       "a ON a.patient_id = p.id").fetchone() == (10,)  # fmt: skip
    # An existing output is refused, then replaced on request.
    with pytest.raises(DatasetError, match="already exists"):
        export_snapshot(central, out)
    single = tmp_path / "patients.parquet"
    one_table = export_snapshot(central, single, tables=["patients"], with_metadata=True)
    assert single.is_file() and one_table.tables == {"patients": 29}
    meta = pl.read_parquet(single)
    assert {"_cursor", "_hlc", "_node", "_base_hlc", "_origin", "_hlc_first_name"} <= set(meta.columns)
    want = rows(central.dsn, "SELECT id::text, _cursor::text::bigint, _hlc, _node, _hlc_first_name "
                             "FROM patients ORDER BY id")  # fmt: skip
    got = meta.select("id", "_cursor", "_hlc", "_node", "_hlc_first_name").sort("id")
    assert [tuple(r) for r in got.iter_rows()] == want
    run(central.dsn, "UPDATE patients SET first_name = 'Renamed'")
    export_snapshot(central, single, tables=["patients"], overwrite=True)
    assert set(pl.read_parquet(single)["first_name"].to_list()) == {"Renamed"}
    assert not list(tmp_path.glob(".*tmp*"))  # nothing left behind


def test_export_to_duckdb_reads_back_equal(make_demo_store: Any, tmp_path: Path) -> None:
    central = _network_data(make_demo_store, tmp_path)
    out = tmp_path / "report.duckdb"
    report = export_snapshot(central, out, tables=["patient_additional_data", "patients"])
    assert list(report.tables) == ["patients", "patient_additional_data"]  # parents first
    con = duckdb.connect(str(out), read_only=True)
    assert {r[0] for r in con.execute("SHOW TABLES").fetchall()} == {"patients", "patient_additional_data"}
    types = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_name = 'patients'").fetchall())  # fmt: skip
    assert (types["id"], types["date_of_birth"], types["updated_at"]) == ("UUID", "DATE", "TIMESTAMP WITH TIME ZONE")
    for table in ("patients", "patient_additional_data"):
        spec = REGISTRY[table]

        def select(uuid_as: str, micros: str) -> str:
            # uuids as text, timestamps as microseconds (python objects of DuckDB's
            # TIMESTAMPTZ need pytz, which is not a dependency)
            return ", ".join(f"{c.name}::{uuid_as}" if c.type.value == "uuid" else micros.format(c.name)
                             if c.type.value == "timestamptz" else c.name for c in spec.columns)  # fmt: skip

        got = con.execute(f"SELECT {select('VARCHAR', 'epoch_us({})')} FROM {table} ORDER BY id").fetchall()
        want = rows(central.dsn, f"SELECT {select('text', '(extract(epoch FROM {}) * 1000000)::bigint')} "
                                 f"FROM {table} ORDER BY id")  # fmt: skip
        assert got == want and len(got) == report.tables[table]
    assert con.execute("SELECT count(*) FROM patients p JOIN patient_additional_data a "
                       "ON a.patient_id = p.id").fetchone() == (10,)  # fmt: skip
    con.close()
    with pytest.raises(DatasetError, match="already exists"):
        export_snapshot(central, out)
    with pytest.raises(DatasetError, match=r"\.parquet or \.duckdb"):
        export_snapshot(central, tmp_path / "report.xlsx")


def test_a_failed_export_leaves_nothing(make_demo_store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    central = _network_data(make_demo_store, tmp_path)
    real = datasets._to_parquet
    calls = []

    def failing(path: Path, *args: Any) -> int:
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(path, *args)

    monkeypatch.setattr(datasets, "_to_parquet", failing)
    with pytest.raises(OSError, match="disk full"):
        export_snapshot(central, tmp_path / "all.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extra.csv", "in.parquet"]


def test_export_from_a_mobile_device(make_demo_store: Any, tmp_path: Path) -> None:
    from tidesync.sqlite import SQLiteStore

    central = _network_data(make_demo_store, tmp_path)
    window = central.read_window(0)
    with SQLiteStore(tmp_path / "device.db", REGISTRY) as device:
        device.create_app_tables()
        device.install("tablet-1")
        device.apply(window.tables, peer="central")
        report = export_snapshot(device, tmp_path / "device.parquet", tables=["patients"], with_metadata=True)
    assert report.tables == {"patients": 29}
    got = pl.read_parquet(tmp_path / "device.parquet")
    _exported_equals_database(central.dsn, "patients", got)
    assert {"_hlc", "_node", "_hlc_first_name"} <= set(got.columns) and "_deleted" not in got.columns


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def test_cli_import_export_round_trip(make_demo_store: Any, tmp_path: Path) -> None:
    central: PostgresStore = make_demo_store("central")
    other: PostgresStore = make_demo_store("central-2")
    df = _patients(25)
    csv = _csv(tmp_path, df)
    out = _cli("import", "--db", central.dsn, "--table", "patients", str(csv)).output
    assert "patients: 25 rows from" in out and "25 inserted, 0 updated, 0 unchanged" in out
    again = json.loads(_cli("import", "--db", central.dsn, "--table", "patients", str(csv), "--json").output)
    assert (again["inserted"], again["unchanged"], again["node"]) == (0, 25, "central")
    bad = _csv(tmp_path, df.with_columns(pl.when(pl.int_range(pl.len()) == 2).then(pl.lit("nope"))
                                         .otherwise(pl.col("id")).alias("id")), "bad.csv")  # fmt: skip
    refused = _cli("import", "--db", central.dsn, "--table", "patients", str(bad), code=1).output
    assert "tidesync: error: DatasetError:" in refused and "row 3, column 'id'" in refused
    # Export, then import the export into another central database: the same rows.
    target = tmp_path / "patients.parquet"
    report = json.loads(_cli("export", "--db", central.dsn, "--to", str(target), "--tables", "patients",
                             "--json").output)  # fmt: skip
    assert report["tables"] == {"patients": 25} and report["files"] == [str(target)]
    assert "already exists" in _cli("export", "--db", central.dsn, "--to", str(target), "--tables", "patients",
                                    code=1).output  # fmt: skip
    shown = _cli("export", "--db", central.dsn, "--to", str(target), "--tables", "patients", "--overwrite").output
    assert "patients: 25 rows" in shown
    _cli("import", "--db", other.dsn, "--table", "patients", str(target))
    assert _db_patients(other.dsn) == _db_patients(central.dsn) == _frame_rows(df)
    duck = tmp_path / "all.duckdb"
    _cli("export", "--db", other.dsn, "--to", str(duck), "--with-metadata")
    con = duckdb.connect(str(duck), read_only=True)
    assert con.execute("SELECT count(*), min(_node), max(_node) FROM patients").fetchone() == (25, "central-2",
                                                                                          "central-2")
    con.close()
