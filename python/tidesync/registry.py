"""The table registry: which tables sync, how, to whom, and in which order.

A synced table is declared once, in Python. The declaration is the contract every
node shares: the wire schema of the table's change batches (its columns and their
logical types), its primary key, its direction, its scope, its merge mode and the
tables it references (so changes are applied parents first). The application owns
its tables (DDL, constraints, indexes); ``tidesync schema install`` checks them
against the registry and adds the metadata on top.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import pyarrow as pa

from tidesync.core import MergeMode
from tidesync.errors import SchemaMismatchError

#: Names the engine adds to every synced row (see docs/semantics.md). Application
#: columns may not start with an underscore.
HLC, NODE, BASE_HLC, DELETED = "_hlc", "_node", "_base_hlc", "_deleted"

_IDENT = re.compile(r"^[a-z][a-z0-9_]{0,49}$")


class LogicalType(enum.Enum):
    """Column types a synced table may use, with their Arrow wire type."""

    UUID = "uuid"
    TEXT = "text"
    INT32 = "int32"
    INT64 = "int64"
    FLOAT64 = "float64"
    BOOL = "bool"
    DATE = "date"
    TIMESTAMPTZ = "timestamptz"
    TIMESTAMP = "timestamp"
    BYTES = "bytes"

    @property
    def arrow(self) -> pa.DataType:
        """The Arrow type of this column in change batches (the same on every node)."""
        return _ARROW[self]

    @property
    def pg(self) -> str:
        """The PostgreSQL type name (as ``format_type`` prints it)."""
        return _PG[self]


_ARROW: dict[LogicalType, pa.DataType] = {
    LogicalType.UUID: pa.binary(16),
    LogicalType.TEXT: pa.string(),
    LogicalType.INT32: pa.int32(),
    LogicalType.INT64: pa.int64(),
    LogicalType.FLOAT64: pa.float64(),
    LogicalType.BOOL: pa.bool_(),
    LogicalType.DATE: pa.date32(),
    LogicalType.TIMESTAMPTZ: pa.timestamp("us", tz="UTC"),
    LogicalType.TIMESTAMP: pa.timestamp("us"),
    LogicalType.BYTES: pa.binary(),
}
_PG: dict[LogicalType, str] = {
    LogicalType.UUID: "uuid",
    LogicalType.TEXT: "text",
    LogicalType.INT32: "integer",
    LogicalType.INT64: "bigint",
    LogicalType.FLOAT64: "double precision",
    LogicalType.BOOL: "boolean",
    LogicalType.DATE: "date",
    LogicalType.TIMESTAMPTZ: "timestamp with time zone",
    LogicalType.TIMESTAMP: "timestamp without time zone",
    LogicalType.BYTES: "bytea",
}


class Direction(enum.Enum):
    """Which way a table's changes travel between a node and the central server."""

    BIDIRECTIONAL = "bidirectional"
    PULL_ONLY = "pull-only"  # authored centrally: users, facilities, reference data
    PUSH_ONLY = "push-only"  # logs: go up, never come down
    PUSH_THEN_DELETE = "push-then-delete"  # attachments: go up, then leave the node

    @property
    def pushes(self) -> bool:
        return self is not Direction.PULL_ONLY

    @property
    def pulls(self) -> bool:
        return self in (Direction.BIDIRECTIONAL, Direction.PULL_ONLY)


class ScopeKind(enum.Enum):
    GLOBAL = "global"
    FACILITY = "facility"
    PATIENT = "patient"
    SENSITIVE_FACILITY = "sensitive-facility"


@dataclass(frozen=True)
class Scope:
    """Which nodes a row reaches.

    - ``global``: every node.
    - ``facility``: the facility named in ``column``.
    - ``patient``: every facility where the patient in ``column`` is marked for sync
      (a ``patient_facilities`` row), with the patient's whole history once marked.
      With ``sensitive_column``, a row whose facility there is a sensitive facility
      reaches only that facility.
    - ``sensitive-facility``: only the facility in ``column``, whatever the patient.
    """

    kind: ScopeKind
    column: str | None = None
    sensitive_column: str | None = None

    @staticmethod
    def global_() -> Scope:
        return Scope(ScopeKind.GLOBAL)

    @staticmethod
    def facility(column: str = "facility_id") -> Scope:
        return Scope(ScopeKind.FACILITY, column)

    @staticmethod
    def patient(column: str = "patient_id", sensitive_column: str | None = None) -> Scope:
        return Scope(ScopeKind.PATIENT, column, sensitive_column)

    @staticmethod
    def sensitive_facility(column: str = "facility_id") -> Scope:
        return Scope(ScopeKind.SENSITIVE_FACILITY, column)


@dataclass(frozen=True)
class Column:
    name: str
    type: LogicalType
    nullable: bool = True


@dataclass(frozen=True)
class TableSpec:
    """One synced table. ``columns`` are the application's columns, key included."""

    name: str
    columns: tuple[Column, ...]
    key: str = "id"
    direction: Direction = Direction.BIDIRECTIONAL
    scope: Scope = field(default_factory=Scope.global_)
    merge: MergeMode = "record"
    parents: tuple[str, ...] = ()  # tables this one references (applied before it)

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        for n in [self.name, *names]:
            if not _IDENT.match(n):
                raise SchemaMismatchError(
                    f"table {self.name!r}: {n!r} is not a valid name (lowercase letters, digits and "
                    "underscores, starting with a letter; names starting with '_' are the engine's)"
                )
        if len(set(names)) != len(names):
            raise SchemaMismatchError(f"table {self.name!r}: a column is declared twice")
        if self.key not in names:
            raise SchemaMismatchError(f"table {self.name!r}: key column {self.key!r} is not among its columns")
        if self.column(self.key).type not in (LogicalType.UUID, LogicalType.TEXT):
            raise SchemaMismatchError(f"table {self.name!r}: the key must be uuid or text")
        if self.merge not in ("record", "field"):
            raise SchemaMismatchError(f"table {self.name!r}: merge must be 'record' or 'field', not {self.merge!r}")
        for col in (self.scope.column, self.scope.sensitive_column):
            if col is not None and col not in names:
                raise SchemaMismatchError(f"table {self.name!r}: scope column {col!r} is not among its columns")
        if self.scope.kind is not ScopeKind.GLOBAL and self.scope.column is None:
            raise SchemaMismatchError(f"table {self.name!r}: a {self.scope.kind.value} scope needs a column")

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def data_columns(self) -> tuple[Column, ...]:
        """Every column but the key: the ones merge compares and field mode stamps."""
        return tuple(c for c in self.columns if c.name != self.key)

    @property
    def field_wise(self) -> bool:
        return self.merge == "field"

    def wire_schema(self) -> pa.Schema:
        """The Arrow schema of this table's change batches.

        Application columns (in declaration order), then ``_hlc``, ``_node``,
        ``_base_hlc``, ``_deleted`` (a tombstone: every data column null), then in
        field mode one ``_hlc_<col>`` per data column.
        """
        # Data columns are nullable on the wire whatever the table says: a tombstone
        # carries no values.
        fields = [pa.field(c.name, c.type.arrow, nullable=c.name != self.key) for c in self.columns]
        fields += [
            pa.field(HLC, pa.int64(), nullable=False),
            pa.field(NODE, pa.string(), nullable=False),
            pa.field(BASE_HLC, pa.int64()),
            pa.field(DELETED, pa.bool_(), nullable=False),
        ]
        if self.field_wise:
            fields += [pa.field(stamp_column(c.name), pa.int64()) for c in self.data_columns]
        return pa.schema(fields)


def stamp_column(column: str) -> str:
    """The name of a field-wise table's per-column HLC column."""
    return f"_hlc_{column}"


@dataclass(frozen=True)
class Marks:
    """The table that marks a patient for sync to a facility (a patient-scope row
    reaches a facility where its patient is marked, with the patient's whole history).
    A mark whose ``deleted`` column is set no longer counts."""

    table: str = "patient_facilities"
    patient: str = "patient_id"
    facility: str = "facility_id"
    deleted: str | None = "deleted_at"


@dataclass(frozen=True)
class Sensitivity:
    """Where facilities are flagged sensitive (their patients' rows reach only them)."""

    table: str = "facilities"
    key: str = "id"
    flag: str = "is_sensitive"


class Registry:
    """The synced tables of a deployment, kept in foreign-key order (parents first)."""

    def __init__(
        self,
        tables: Iterable[TableSpec],
        name: str = "custom",
        *,
        marks: Marks | None = None,
        sensitivity: Sensitivity | None = None,
    ) -> None:
        self.name = name
        self.marks = marks
        self.sensitivity = sensitivity
        by_name: dict[str, TableSpec] = {}
        for t in tables:
            if t.name in by_name:
                raise SchemaMismatchError(f"table {t.name!r} is declared twice")
            by_name[t.name] = t
        for t in by_name.values():
            for p in t.parents:
                if p not in by_name and p != t.name:
                    raise SchemaMismatchError(f"table {t.name!r} references {p!r}, which is not a synced table")
        self._tables = {t.name: by_name[t.name] for t in _fk_order(by_name)}
        scopes = [t.scope for t in by_name.values()]
        if any(sc.kind is ScopeKind.PATIENT for sc in scopes):
            if marks is None or marks.table not in by_name:
                raise SchemaMismatchError("patient-scoped tables need `marks`: the synced table marking patients")
            for col in (marks.patient, marks.facility, marks.deleted):
                if col is not None:
                    by_name[marks.table].column(col)
        if any(sc.sensitive_column for sc in scopes) and (sensitivity is None or sensitivity.table not in by_name):
            raise SchemaMismatchError("a sensitive-facility column needs `sensitivity`: the synced facilities table")

    def __iter__(self) -> Iterator[TableSpec]:
        return iter(self._tables.values())

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, name: object) -> bool:
        return name in self._tables

    def __getitem__(self, name: str) -> TableSpec:
        try:
            return self._tables[name]
        except KeyError:
            raise SchemaMismatchError(
                f"unknown table {name!r}: the registry {self.name!r} syncs {', '.join(self._tables)}"
            ) from None

    @property
    def names(self) -> list[str]:
        """Table names in foreign-key order (a table comes after every table it references)."""
        return list(self._tables)

    def ordered(self, names: Iterable[str]) -> list[TableSpec]:
        """The named tables, in foreign-key order; unknown names raise."""
        wanted = set(names)
        for n in wanted:
            self[n]
        return [t for t in self if t.name in wanted]


def _fk_order(tables: Mapping[str, TableSpec]) -> list[TableSpec]:
    """Topological order, parents first; ties keep declaration order. Cycles raise."""
    order: list[TableSpec] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise SchemaMismatchError(f"foreign-key cycle between synced tables: {' -> '.join([*path, name])}")
        state[name] = 1
        for p in tables[name].parents:
            if p != name:  # a self-reference (a tree) is fine within one table
                visit(p, [*path, name])
        state[name] = 2
        order.append(tables[name])

    for n in tables:
        visit(n, [])
    return order
