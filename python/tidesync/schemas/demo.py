"""The demo EMR schema: what a small electronic medical record syncs.

Used by the tests, the demo and the benchmarks. The application's own DDL is in
``demo_postgres.sql`` and ``demo_sqlite.sql`` (tidesync does not create application
tables; ``create_app_tables`` runs those files for the demo). ``REGISTRY`` declares
how each table syncs.
"""

from __future__ import annotations

from importlib.resources import files

from tidesync.registry import Column, Direction, Marks, Registry, Scope, Sensitivity, TableSpec
from tidesync.registry import LogicalType as T


def _cols(*spec: tuple[str, T] | tuple[str, T, bool]) -> tuple[Column, ...]:
    return tuple(Column(s[0], s[1], s[2] if len(s) == 3 else True) for s in spec)


_ID = ("id", T.UUID, False)

TABLES = [
    TableSpec(
        "facilities",
        _cols(_ID, ("code", T.TEXT, False), ("name", T.TEXT, False), ("is_sensitive", T.BOOL, False),
              ("updated_at", T.TIMESTAMPTZ)),
        direction=Direction.PULL_ONLY,
    ),
    TableSpec(
        "reference_data",
        _cols(_ID, ("type", T.TEXT, False), ("code", T.TEXT, False), ("name", T.TEXT, False),
              ("visibility", T.TEXT, False)),
        direction=Direction.PULL_ONLY,
    ),
    TableSpec(
        "users",
        _cols(_ID, ("email", T.TEXT, False), ("display_name", T.TEXT, False), ("role", T.TEXT, False),
              ("facility_id", T.UUID), ("deleted_at", T.TIMESTAMPTZ)),
        direction=Direction.PULL_ONLY,
        parents=("facilities",),
    ),
    TableSpec(
        "patients",
        _cols(_ID, ("display_id", T.TEXT, False), ("first_name", T.TEXT), ("middle_name", T.TEXT),
              ("last_name", T.TEXT), ("sex", T.TEXT), ("date_of_birth", T.DATE), ("village_id", T.UUID),
              ("deleted_at", T.TIMESTAMPTZ), ("updated_at", T.TIMESTAMPTZ)),
        merge="field",
        parents=("reference_data",),
    ),
    TableSpec(
        "patient_additional_data",
        _cols(_ID, ("patient_id", T.UUID, False), ("phone", T.TEXT), ("address", T.TEXT),
              ("blood_type", T.TEXT), ("emergency_contact", T.TEXT), ("height_cm", T.FLOAT64),
              ("updated_at", T.TIMESTAMPTZ)),
        scope=Scope.patient(),
        merge="field",
        parents=("patients",),
    ),
    TableSpec(
        "patient_facilities",
        _cols(_ID, ("patient_id", T.UUID, False), ("facility_id", T.UUID, False),
              ("created_at", T.TIMESTAMPTZ), ("deleted_at", T.TIMESTAMPTZ)),
        scope=Scope.facility(),
        parents=("patients", "facilities"),
    ),
    TableSpec(
        "encounters",
        _cols(_ID, ("patient_id", T.UUID, False), ("facility_id", T.UUID, False), ("examiner_id", T.UUID),
              ("encounter_type", T.TEXT, False), ("reason", T.TEXT), ("start_at", T.TIMESTAMPTZ, False),
              ("end_at", T.TIMESTAMPTZ), ("deleted_at", T.TIMESTAMPTZ)),
        scope=Scope.patient(sensitive_column="facility_id"),
        parents=("patients", "facilities", "users"),
    ),
    TableSpec(
        "vitals",
        _cols(_ID, ("encounter_id", T.UUID, False), ("patient_id", T.UUID, False),
              ("recorded_at", T.TIMESTAMPTZ, False), ("temperature_c", T.FLOAT64), ("heart_rate", T.INT32),
              ("systolic", T.INT32), ("diastolic", T.INT32), ("spo2", T.INT32), ("weight_kg", T.FLOAT64),
              ("deleted_at", T.TIMESTAMPTZ)),
        scope=Scope.patient(),
        parents=("encounters", "patients"),
    ),
    TableSpec(
        "notes",
        _cols(_ID, ("encounter_id", T.UUID), ("patient_id", T.UUID, False), ("author_id", T.UUID),
              ("note_type", T.TEXT, False), ("content", T.TEXT, False), ("recorded_at", T.TIMESTAMPTZ, False),
              ("deleted_at", T.TIMESTAMPTZ)),
        scope=Scope.patient(),
        parents=("encounters", "patients", "users"),
    ),
    TableSpec(
        "lab_requests",
        _cols(_ID, ("encounter_id", T.UUID), ("patient_id", T.UUID, False), ("requested_by", T.UUID),
              ("test_type_id", T.UUID), ("status", T.TEXT, False), ("priority", T.TEXT),
              ("requested_at", T.TIMESTAMPTZ, False), ("sample_at", T.TIMESTAMP), ("result", T.TEXT),
              ("result_value", T.FLOAT64), ("deleted_at", T.TIMESTAMPTZ)),
        scope=Scope.patient(),
        merge="field",
        parents=("encounters", "patients", "users", "reference_data"),
    ),
    TableSpec(
        "audit_log",
        _cols(_ID, ("facility_id", T.UUID), ("user_id", T.UUID), ("action", T.TEXT, False),
              ("table_name", T.TEXT), ("record_id", T.TEXT), ("at", T.TIMESTAMPTZ, False),
              ("sequence", T.INT64)),
        direction=Direction.PUSH_ONLY,
        scope=Scope.facility(),
    ),
    TableSpec(
        "attachments",
        _cols(_ID, ("facility_id", T.UUID, False), ("patient_id", T.UUID), ("kind", T.TEXT, False),
              ("size_bytes", T.INT64, False), ("data", T.BYTES), ("created_at", T.TIMESTAMPTZ)),
        direction=Direction.PUSH_THEN_DELETE,
        scope=Scope.facility(),
        parents=("facilities", "patients"),
    ),
]  # fmt: skip

REGISTRY = Registry(TABLES, name="demo", marks=Marks(), sensitivity=Sensitivity())


def app_ddl(dialect: str) -> str:
    """The demo application's own DDL (``postgres`` or ``sqlite``)."""
    if dialect not in ("postgres", "sqlite"):
        raise ValueError(f"unknown dialect {dialect!r}: use 'postgres' or 'sqlite'")
    return files("tidesync.schemas").joinpath(f"demo_{dialect}.sql").read_text()
