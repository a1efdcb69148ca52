"""National datasets in and out: ``tidesync import`` and ``tidesync export``.

**Import** (:func:`import_table`) loads a Parquet or CSV file into one synced table of a
PostgreSQL store, usually the central server's database, so that the next pull hands
the rows to every node in their scope. In order:

1. The file's header is checked against the registry (``store.registry[table]``) and
   the table's own catalog: every column must be one of the table's application
   columns (names starting with ``_`` are tidesync's and are refused), the key must be
   there, and so must every column that may not be null and has no default.
2. The file is read with polars and converted slice by slice to the columns' Arrow wire
   types (vectorized; a value that does not convert is found by halving the slice), and
   each converted slice goes by binary ``COPY`` (ADBC ingest) into a temporary staging
   table that also carries each row's number in the file.
3. One set-based ``INSERT … SELECT … ON CONFLICT (key) DO UPDATE … WHERE (columns) IS
   DISTINCT FROM …`` writes the rows, so the installed capture triggers stamp them
   exactly as they stamp the application's own writes (this node's id, a fresh HLC,
   this transaction as the change cursor, field stamps of changed columns only).
   A row whose values are already there is not touched: importing a file again
   changes nothing.

Everything runs in one transaction: any error rolls all of it back. Every error is a
:class:`DatasetError` naming the file, the row (1-based data row: the header of a CSV
file is not counted) and the column at fault, and what was expected; when PostgreSQL
refuses the rows (a foreign key, a check, a unique constraint, a key twice in the
file), the staged rows are searched for the first one at fault.

**Export** (:func:`export_snapshot`) writes chosen registry tables from one consistent
snapshot (``REPEATABLE READ, READ ONLY`` on PostgreSQL), streamed batch by batch, to
Parquet (one table: that file; several: a directory of that name with
``<table>.parquet`` each) or to one DuckDB database file (one table per registry
table). Live rows only, application columns only unless ``with_metadata``. uuids are
written as their canonical text in Parquet (every reader shows them as PostgreSQL
does) and as DuckDB's ``UUID`` in DuckDB.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tidesync.errors import InvalidInputError, SchemaMismatchError
from tidesync.pg.install import APPLYING_GUC, qi, ql
from tidesync.registry import BASE_HLC, DELETED, HLC, NODE, Column, LogicalType, TableSpec, stamp_column

#: ``progress(what, done, total)``: called as work advances (rows), as `tidesync sync`'s
#: page progress is; ``tidesync import`` and ``export`` draw it as rich progress bars.
Progress = Callable[[str, int, int], None]

#: Rows converted and staged at a time: bounds the memory of the conversion.
SLICE_ROWS = 262_144
STAGE = "_tidesync_import"
ROW = "_row"  # the staged row's number in the file (1-based)
#: Memory per hash/sort step of the import transaction (as apply sets it).
WORK_MEM = "256MB"

_NOTHING = "nothing was imported; fix the file and import it again"


class DatasetError(InvalidInputError):
    """A file that cannot be imported (or an export that cannot be written) as it is.

    ``path``, ``row`` (1-based data row in the file, None when the fault is not one
    row's) and ``column`` say where; the message says what was expected.
    """

    def __init__(self, message: str, *, path: str, row: int | None = None, column: str | None = None) -> None:
        super().__init__(message)
        self.path, self.row, self.column = path, row, column


class DatasetSchemaError(DatasetError, SchemaMismatchError):
    """The file's columns do not fit the table (unknown, metadata, missing or wrongly typed)."""


@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_table` did."""

    table: str
    path: str
    rows: int  # data rows in the file
    inserted: int
    updated: int  # existing rows where some value changed (restamped)
    unchanged: int  # existing rows already holding the file's values (untouched)
    node: str  # the node id the new versions carry
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_snapshot` wrote."""

    path: str
    format: str  # "parquet" or "duckdb"
    tables: dict[str, int] = field(default_factory=dict)  # rows per table, in foreign-key order
    files: list[str] = field(default_factory=list)  # the Parquet files (a DuckDB export: the one file)
    with_metadata: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ============================================================================= import


def import_table(
    store: Any, table: str, path: str | os.PathLike[str], *, progress: Progress | None = None
) -> ImportReport:
    """Load ``path`` (``.parquet`` or ``.csv``) into ``table`` of a PostgreSQL store,
    stamped as the application's own writes, all or nothing.

    Raises :class:`DatasetError` (:class:`DatasetSchemaError` for the header) naming the
    file, row and column at fault; nothing is written then.
    """
    from tidesync.pg import PostgresStore
    from tidesync.pg.conn import ingest, transaction

    started = time.perf_counter()
    file = Path(path)
    name = str(file)
    if not isinstance(store, PostgresStore):
        raise DatasetError(f"{name}: import writes to a PostgreSQL database (the central server's); "
                           f"{type(store).__name__} is not one", path=name)  # fmt: skip
    if table not in store.registry:
        raise DatasetSchemaError(f"{name}: unknown table {table!r}: the registry {store.registry.name!r} syncs "
                                 f"{', '.join(store.registry.names)}", path=name)  # fmt: skip
    spec: TableSpec = store.registry[table]
    fmt = _file_format(file)
    node = store.node_id()  # NotInstalledError when tidesync is not installed
    conn = store.connection
    with conn.cursor() as cur:
        catalog = _catalog(cur, spec)
    header = _read_header(file, fmt)
    columns = _check_header(spec, header, catalog, name)
    frame = _read(file, fmt, [c.name for c in columns])
    total = frame.height
    done = 0
    step = progress or (lambda what, d, t: None)
    step("check and stage", 0, total)
    with transaction(conn) as cur:
        cur.execute(f"SET LOCAL {APPLYING_GUC} = 'off'")  # the capture triggers stamp every row
        cur.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")
        cur.execute(f"DROP TABLE IF EXISTS {STAGE}")
        cols_sql = ", ".join(qi(c.name) for c in columns)
        cur.execute(f"CREATE TEMP TABLE {STAGE} ON COMMIT DROP AS SELECT {cols_sql} FROM {qi(spec.name)} WITH NO DATA")
        cur.execute(f"ALTER TABLE {STAGE} ADD COLUMN {ROW} bigint NOT NULL")
        for offset in range(0, total, SLICE_ROWS):
            part = frame.slice(offset, SLICE_ROWS).to_arrow()
            arrays = [_column(part.column(c.name), c, catalog, spec, name, offset) for c in columns]
            rows = np.arange(offset + 1, offset + part.num_rows + 1, dtype=np.int64)
            staged = pa.table([*arrays, pa.array(rows)], names=[*(c.name for c in columns), ROW])
            ingest(cur, STAGE, staged, temporary=True)
            done += part.num_rows
            step("check and stage", done, total)
        del frame
        step("write", 0, total)
        inserted, updated = _write(cur, spec, columns, catalog, name)
        step("write", total, total)
    return ImportReport(table=spec.name, path=name, rows=total, inserted=inserted, updated=updated,
                        unchanged=total - inserted - updated, node=node,
                        seconds=time.perf_counter() - started)  # fmt: skip


@dataclass(frozen=True)
class _DbColumn:
    not_null: bool
    has_default: bool
    max_chars: int | None  # character varying(n)


def _catalog(cur: Any, spec: TableSpec) -> dict[str, _DbColumn]:
    """What PostgreSQL says about the table's columns (NOT NULL, defaults, varchar lengths)."""
    cur.execute(
        "SELECT a.attname::text, a.attnotnull, a.atthasdef, "
        "CASE WHEN a.atttypid = 'varchar'::regtype AND a.atttypmod > 4 THEN a.atttypmod - 4 END "
        f"FROM pg_attribute a WHERE a.attrelid = {ql(spec.name)}::regclass AND a.attnum > 0 AND NOT a.attisdropped"
    )
    return {str(n): _DbColumn(bool(nn), bool(d), None if m is None else int(m)) for n, nn, d, m in cur.fetchall()}


def _file_format(file: Path) -> str:
    suffix = file.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    raise DatasetError(f"{file}: not a .parquet or .csv file (the extension says which reader to use)", path=str(file))


def _read_header(file: Path, fmt: str) -> list[str]:
    import polars as pl

    if not file.is_file():
        raise DatasetError(f"{file}: no such file", path=str(file))
    try:
        if fmt == "parquet":
            return list(pl.read_parquet_schema(file))
        return list(pl.read_csv(file, n_rows=0, infer_schema=False).columns)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DatasetError(f"{file}: cannot read it as {fmt.upper()}: {_first_line(exc)}", path=str(file)) from exc


def _read(file: Path, fmt: str, columns: list[str]) -> Any:
    """The file's data (only ``columns``), as a polars DataFrame. A CSV is read as text
    throughout, so the conversion sees every value exactly as written."""
    import polars as pl

    try:
        if fmt == "parquet":
            return pl.read_parquet(file, columns=columns)
        # An empty field is null (CSV cannot tell an empty text from a missing one).
        return pl.read_csv(file, columns=columns, infer_schema=False)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DatasetError(f"{file}: cannot read it as {fmt.upper()}: {_first_line(exc)}", path=str(file)) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_PANDAS_INDEX = re.compile(r"^__index_level_\d+__$")


def _check_header(spec: TableSpec, header: list[str], catalog: dict[str, _DbColumn], name: str) -> list[Column]:
    """The table's columns the file brings, in declaration order; raises on any header fault."""
    known = {c.name for c in spec.columns}
    seen: set[str] = set()
    for col in header:
        if _PANDAS_INDEX.match(col):
            continue  # pandas' DataFrame index, which to_parquet writes beside the data
        if col in seen:
            raise DatasetSchemaError(f"{name}: column {col!r} appears twice in the header; {_NOTHING}",
                                     path=name, column=col)  # fmt: skip
        seen.add(col)
        if col.startswith("_"):
            raise DatasetSchemaError(
                f"{name}: column {col!r} is tidesync metadata, which the import stamps itself; "
                f"remove it from the file ({_NOTHING.split('; ')[0]})", path=name, column=col)  # fmt: skip
        if col not in known:
            raise DatasetSchemaError(
                f"{name}: column {col!r} is not a column of table {spec.name!r} (its columns: "
                f"{', '.join(c.name for c in spec.columns)}); {_NOTHING}", path=name, column=col)  # fmt: skip
    if spec.key not in seen:
        raise DatasetSchemaError(f"{name}: the key column {spec.key!r} of table {spec.name!r} is missing: every row "
                                 f"needs its key; {_NOTHING}", path=name, column=spec.key)  # fmt: skip
    for c in spec.columns:
        db = catalog.get(c.name)
        if db is None:
            raise SchemaMismatchError(f"table {spec.name!r} has no column {c.name!r}: the database does not match "
                                      "the registry (see `tidesync schema install`)")  # fmt: skip
        required = (not c.nullable or db.not_null) and not db.has_default
        if required and c.name not in seen:
            raise DatasetSchemaError(
                f"{name}: column {c.name!r} is missing; table {spec.name!r} requires a value there (not null, no "
                f"default), expected {_expected(c.type)}; {_NOTHING}", path=name, column=c.name)  # fmt: skip
    return [c for c in spec.columns if c.name in seen]


# ----------------------------------------------------------------------------- conversion


_EXPECTED = {
    LogicalType.UUID: "a uuid (like 0b000000-0000-4000-8000-00000000000b)",
    LogicalType.TEXT: "text",
    LogicalType.INT32: "a whole number from -2147483648 to 2147483647",
    LogicalType.INT64: "a whole number (64-bit)",
    LogicalType.FLOAT64: "a number",
    LogicalType.BOOL: "true or false (also t/f, yes/no, 1/0)",
    LogicalType.DATE: "a date as YYYY-MM-DD",
    LogicalType.TIMESTAMPTZ: "a timestamp as YYYY-MM-DD HH:MM:SS[.ffffff][+HH:MM] (without an offset: UTC)",
    LogicalType.TIMESTAMP: "a timestamp without time zone as YYYY-MM-DD HH:MM:SS[.ffffff]",
    LogicalType.BYTES: "bytes (in a CSV file: \\x followed by hex digits)",
}


def _expected(t: LogicalType) -> str:
    return f"{_EXPECTED[t]} ({t.pg})"


_UUID_RE = r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
_BYTES_RE = r"^\\x([0-9a-fA-F]{2})*$"
_OFFSET_RE = r"(Z|z|[+-]\d\d(:?\d\d)?)$"
_TRUE = pa.array(["true", "t", "yes", "y", "1"])
_FALSE = pa.array(["false", "f", "no", "n", "0"])
_UNHEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _UNHEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _UNHEX[_c] = 10 + _i


def _plain(arr: pa.Array) -> pa.Array:
    """Undo polars' and Parquet's representations: dictionaries decoded, large/view
    strings and binaries as plain ones, extension types as their storage."""
    t = arr.type
    if isinstance(t, pa.ExtensionType):
        return _plain(arr.storage)
    if pa.types.is_dictionary(t):
        return _plain(arr.dictionary_decode())
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return arr.cast(pa.string())
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return arr.cast(pa.binary())
    return arr


def _is_int(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t))


def _accepts(source: pa.DataType, target: LogicalType) -> bool:
    """Whether a file column of ``source`` type can hold values of ``target`` at all."""
    if pa.types.is_null(source) or pa.types.is_string(source):
        return True
    if target is LogicalType.TEXT:
        return _is_int(source)
    if target in (LogicalType.UUID, LogicalType.BYTES):
        return bool(pa.types.is_binary(source) or pa.types.is_fixed_size_binary(source))
    if target in (LogicalType.INT32, LogicalType.INT64):
        return _is_int(source) or bool(pa.types.is_floating(source))
    if target is LogicalType.FLOAT64:
        return _is_int(source) or bool(pa.types.is_floating(source) or pa.types.is_decimal(source))
    if target is LogicalType.BOOL:
        return bool(pa.types.is_boolean(source))
    if target is LogicalType.DATE:
        return bool(pa.types.is_date(source))
    if target is LogicalType.TIMESTAMPTZ:
        return bool(pa.types.is_timestamp(source))
    if target is LogicalType.TIMESTAMP:
        return bool(pa.types.is_timestamp(source)) and source.tz is None
    return False


def _convert(arr: pa.Array, target: LogicalType) -> pa.Array:
    """Values of a file column (already :func:`_plain`) -> ``target``'s wire type.

    Raises ``pa.ArrowInvalid`` when any value does not convert (the caller halves to
    find the first one)."""
    out = target.arrow
    t = arr.type
    if pa.types.is_null(t):
        return pa.nulls(len(arr), out)
    if target is LogicalType.TEXT:
        text = arr.cast(pa.string())
        if pc.any(pc.match_substring(text, "\x00")).as_py():
            raise pa.ArrowInvalid("a NUL character, which PostgreSQL text cannot hold")
        return text
    if pa.types.is_string(t):
        return _from_text(pc.utf8_trim_whitespace(arr), target)
    if target is LogicalType.UUID:
        sixteen = _all(pc.equal(pc.binary_length(arr), 16)) if pa.types.is_binary(t) else t.byte_width == 16
        if not sixteen:
            raise pa.ArrowInvalid("not 16 bytes")
        return arr.cast(out)
    if target is LogicalType.TIMESTAMPTZ and t.tz is None:
        return arr.cast(pa.timestamp("us")).cast(out)  # a timestamp without a zone is UTC
    return arr.cast(out)  # safe: overflow, truncation and lost precision raise


def _all(mask: pa.Array) -> bool:
    """Every non-null entry of ``mask`` is true (a null value was not checked: it stays null)."""
    return not pc.any(pc.invert(mask)).as_py()


def _from_text(arr: pa.Array, target: LogicalType) -> pa.Array:
    out = target.arrow
    if target is LogicalType.UUID:
        if not _all(pc.match_substring_regex(arr, _UUID_RE)):
            raise pa.ArrowInvalid("not a uuid")
        return _uuid_bytes(pc.replace_substring(arr, "-", ""))
    if target is LogicalType.BOOL:
        low = pc.utf8_lower(arr)
        is_true, is_false = pc.is_in(low, value_set=_TRUE), pc.is_in(low, value_set=_FALSE)
        if not _all(pc.or_(is_true, is_false)):
            raise pa.ArrowInvalid("not a boolean")
        return pc.if_else(pc.is_null(arr), pa.scalar(None, pa.bool_()), is_true)
    if target is LogicalType.BYTES:
        if not _all(pc.match_substring_regex(arr, _BYTES_RE)):
            raise pa.ArrowInvalid("not \\x-hex bytes")
        return pa.array([None if v is None else bytes.fromhex(v[2:]) for v in arr.to_pylist()], pa.binary())
    if target is LogicalType.TIMESTAMPTZ:
        zoned = pc.match_substring_regex(arr, _OFFSET_RE)
        with_zone = pc.if_else(zoned, arr, pa.scalar(None, pa.string())).cast(out)
        naive = pc.if_else(zoned, pa.scalar(None, pa.string()), arr).cast(pa.timestamp("us")).cast(out)
        return pc.coalesce(with_zone, naive)
    return arr.cast(out)


def _uuid_bytes(hex32: pa.Array) -> pa.Array:
    """32-hex-digit strings (checked) -> fixed_size_binary(16), nulls kept."""
    n = len(hex32)
    filled = pc.fill_null(hex32, "0" * 32).cast(pa.string())
    if isinstance(filled, pa.ChunkedArray):
        filled = filled.combine_chunks()
    offsets = np.frombuffer(filled.buffers()[1], dtype=np.int32, count=filled.offset + n + 1)[filled.offset :]
    start = int(offsets[0]) if n else 0
    chars = np.frombuffer(filled.buffers()[2], dtype=np.uint8, count=start + 32 * n)[start:].reshape(n, 32) \
        if n else np.empty((0, 32), dtype=np.uint8)  # fmt: skip
    nibbles = _UNHEX[chars]
    raw = np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2])
    validity = None
    if hex32.null_count:
        validity = pa.py_buffer(np.packbits(pc.is_valid(hex32).to_numpy(zero_copy_only=False), bitorder="little"))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [validity, pa.py_buffer(raw)], hex32.null_count)


def _first_failure(arr: pa.Array, convert: Callable[[pa.Array], Any]) -> int:
    """The index of the first value that ``convert`` refuses (it refuses ``arr`` as a whole):
    the shortest failing prefix, found by halving."""
    lo, hi = 0, len(arr)  # prefix of lo passes, prefix of hi fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            convert(arr.slice(0, mid))
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            hi = mid
    return hi - 1


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _column(
    data: pa.ChunkedArray, col: Column, catalog: dict[str, _DbColumn], spec: TableSpec, name: str, offset: int
) -> pa.Array:
    """One slice of one file column, converted and checked; raises :class:`DatasetError`
    naming the first row at fault."""
    arr = _plain(data.combine_chunks() if isinstance(data, pa.ChunkedArray) else data)
    if not _accepts(arr.type, col.type):
        raise DatasetSchemaError(
            f"{name}: column {col.name!r} holds {arr.type} values (every row); table {spec.name!r} expects "
            f"{_expected(col.type)}; {_NOTHING}", path=name, column=col.name)  # fmt: skip
    try:
        out = _convert(arr, col.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        i = _first_failure(arr, lambda a: _convert(a, col.type))
        value = arr[i].as_py()
        if col.type is LogicalType.TEXT:
            what = "contains a NUL character, which PostgreSQL text cannot hold"
        else:
            what = f"{_shown(value)} is not {_expected(col.type)}"
        raise DatasetError(f"{name}: row {offset + i + 1}, column {col.name!r}: {what}; {_NOTHING}",
                           path=name, row=offset + i + 1, column=col.name) from None  # fmt: skip
    db = catalog[col.name]
    if out.null_count and (col.name == spec.key or not col.nullable or db.not_null):
        i = pc.index(pc.is_null(out), True).as_py()
        what = "the key is empty: every row needs its key" if col.name == spec.key else (
            f"no value, but table {spec.name!r} requires one (not null): expected {_expected(col.type)}")
        raise DatasetError(f"{name}: row {offset + i + 1}, column {col.name!r}: {what}; {_NOTHING}",
                           path=name, row=offset + i + 1, column=col.name)  # fmt: skip
    if db.max_chars is not None and len(out):
        too_long = pc.greater(pc.utf8_length(out), db.max_chars)
        if pc.any(too_long).as_py():
            i = pc.index(too_long, True).as_py()
            raise DatasetError(
                f"{name}: row {offset + i + 1}, column {col.name!r}: {_shown(out[i].as_py())} is longer than "
                f"{db.max_chars} characters (character varying({db.max_chars})); {_NOTHING}",
                path=name, row=offset + i + 1, column=col.name)  # fmt: skip
    return out


# ----------------------------------------------------------------------------- writing


def _write(
    cur: Any, spec: TableSpec, columns: list[Column], catalog: dict[str, _DbColumn], name: str
) -> tuple[int, int]:
    """The one INSERT … ON CONFLICT of the staged rows; returns (inserted, updated).

    A refusal is turned into a :class:`DatasetError` naming the staged row at fault."""
    k = qi(spec.key)
    names = [qi(c.name) for c in columns]
    data = [qi(c.name) for c in columns if c.name != spec.key]
    if data:
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in data)
        # A row already holding these values is left alone: no new stamps, no new cursor.
        changed = f"({', '.join(f't.{c}' for c in data)}) IS DISTINCT FROM ({', '.join(f'EXCLUDED.{c}' for c in data)})"
        on_conflict = f"DO UPDATE SET {sets} WHERE {changed}"
    else:
        on_conflict = "DO NOTHING"
    sql = (
        f"WITH written AS (INSERT INTO {qi(spec.name)} AS t ({', '.join(names)}) "
        f"SELECT {', '.join(names)} FROM {STAGE} ORDER BY {k} "  # the key index grows in order
        f"ON CONFLICT ({k}) {on_conflict} RETURNING (xmax = 0) AS inserted) "
        "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM written"
    )
    cur.execute("SAVEPOINT tidesync_import")
    try:
        cur.execute(sql)
        inserted, updated = cur.fetchone()
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")  # deferred keys are checked here, not at commit
    except Exception as exc:
        state = getattr(exc, "sqlstate", None) or ""
        if not state.startswith(("21", "22", "23")):  # not about the rows: cancelled, deadlock, lost connection
            raise
        cur.execute("ROLLBACK TO SAVEPOINT tidesync_import")
        raise _refusal(cur, spec, columns, catalog, name, exc) from None
    cur.execute("RELEASE SAVEPOINT tidesync_import")
    return int(inserted), int(updated)


def _details(exc: Exception) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in getattr(exc, "details", None) or []:
        k = key.decode() if isinstance(key, bytes) else str(key)
        out[k] = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return out


def _pg_message(exc: Exception) -> str:
    d = _details(exc)
    return d.get("PG_DIAG_MESSAGE_PRIMARY") or _first_line(exc)


def _first_row(cur: Any, where: str) -> int | None:
    """The number of the first staged row (in file order) matching ``where`` over alias ``s``."""
    cur.execute(f"SELECT s.{ROW} FROM {STAGE} s WHERE {where} ORDER BY s.{ROW} LIMIT 1")
    row = cur.fetchone()
    return None if row is None else int(row[0])


def _value_at(cur: Any, row: int, column: str) -> Any:
    cur.execute(f"SELECT s.{qi(column)}::text FROM {STAGE} s WHERE s.{ROW} = {int(row)}")
    return cur.fetchone()[0]


def _refusal(cur: Any, spec: TableSpec, columns: list[Column], catalog: dict[str, _DbColumn], name: str,
             exc: Exception) -> DatasetError:  # fmt: skip
    """Find the staged row PostgreSQL refused, and say so."""
    from tidesync.pg import bulk_load

    state = getattr(exc, "sqlstate", None) or ""
    details = _details(exc)
    present = {c.name for c in columns}
    t, k = qi(spec.name), qi(spec.key)
    constraint = details.get("PG_DIAG_CONSTRAINT_NAME")
    row: int | None = None
    column: str | None = None
    what = _pg_message(exc)
    cur.execute(f"ANALYZE {STAGE}")  # the searches below join the staged rows
    if state == "21000":  # ON CONFLICT cannot affect a row twice: a key twice in the file
        cur.execute(
            f"SELECT {ROW}, first FROM (SELECT {ROW}, min({ROW}) OVER (PARTITION BY {k}) AS first FROM {STAGE}) x "
            f"WHERE {ROW} > first ORDER BY {ROW} LIMIT 1"
        )
        found = cur.fetchone()
        if found is not None:
            row, column = int(found[0]), spec.key
            what = (f"key {_shown(_value_at(cur, row, spec.key))} appears again (first at row {int(found[1])}): a "
                    "file holds each key once")  # fmt: skip
    elif state == "23503" and constraint:  # a foreign key without its parent row
        fk = next((f for f in bulk_load.foreign_keys(cur, spec.name) if f.name == constraint), None)
        if fk is not None and set(fk.columns) <= present:
            cols = [f"s.{qi(c)}" for c in fk.columns]
            joiner = " OR " if fk.match_full else " AND "
            same = " AND ".join(f"p.{qi(pc_)} = {c}" for pc_, c in zip(fk.parent_columns, cols, strict=True))
            where = (f"({joiner.join(f'{c} IS NOT NULL' for c in cols)}) "
                     f"AND NOT EXISTS (SELECT 1 FROM {fk.parent} p WHERE {same})")  # fmt: skip
            if fk.parent.strip('"') == spec.name:  # a tree: the parent may come in the same file
                where += f" AND NOT EXISTS (SELECT 1 FROM {STAGE} p WHERE {same})"
            row = _first_row(cur, where)
            if row is not None:
                column = fk.columns[0]
                value = ", ".join(str(_value_at(cur, row, c)) for c in fk.columns)
                what = (f"{value} is not in {fk.parent} ({', '.join(fk.parent_columns)}): import or create the "
                        f"{fk.parent} rows first (foreign key {constraint})")  # fmt: skip
    elif state == "23502":  # NOT NULL
        column = details.get("PG_DIAG_COLUMN_NAME")
        if column in present:
            row = _first_row(cur, f"s.{qi(column)} IS NULL")
            what = f"no value, but table {spec.name!r} requires one (not null)"
        elif column is not None:
            row = _first_row(cur, f"NOT EXISTS (SELECT 1 FROM {t} x WHERE x.{k} = s.{k})")
            what = (f"the file has no column {column!r}, which a new row of {spec.name!r} needs (not null, no "
                    "default)")  # fmt: skip
    elif state == "23514" and constraint:  # CHECK
        cur.execute(
            "SELECT pg_get_constraintdef(c.oid), ARRAY(SELECT a.attname::text FROM unnest(c.conkey) u(n) "
            "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = u.n) "
            f"FROM pg_constraint c WHERE c.conrelid = {ql(spec.name)}::regclass AND c.conname = {ql(constraint)}"
        )
        found = cur.fetchone()
        if found is not None and set(found[1]) <= present:
            expr = str(found[0]).removeprefix("CHECK ").removesuffix(" NOT VALID")
            row = _first_row(cur, f"NOT {expr}")
            if row is not None:
                column = found[1][0] if found[1] else None
                shown = _shown(_value_at(cur, row, column)) if column else "the row"
                what = f"{shown} breaks the check {constraint}: {expr}"
    elif state == "23505" and constraint:  # a unique constraint other than the key
        cur.execute(
            "SELECT ARRAY(SELECT a.attname::text FROM unnest(i.indkey) u(n) JOIN pg_attribute a "
            "ON a.attrelid = i.indrelid AND a.attnum = u.n) FROM pg_index i "
            f"WHERE i.indrelid = {ql(spec.name)}::regclass AND i.indexrelid::regclass::text = {ql(constraint)}"
        )
        found = cur.fetchone()
        if found is not None and set(found[0]) <= present:
            same = " AND ".join(f"x.{qi(c)} = s.{qi(c)}" for c in found[0])
            row = _first_row(
                cur,
                f"(EXISTS (SELECT 1 FROM {t} x WHERE {same} AND x.{k} <> s.{k}) OR EXISTS (SELECT 1 FROM {STAGE} x "
                f"WHERE {same} AND x.{k} <> s.{k} AND x.{ROW} < s.{ROW}))",
            )
            if row is not None:
                column = found[0][0]
                value = ", ".join(str(_value_at(cur, row, c)) for c in found[0])
                what = (f"{_shown(value)} is already taken by another {spec.name} row (unique {constraint} on "
                        f"{', '.join(found[0])})")  # fmt: skip
    where = f"row {row}, " if row is not None else ""
    where += f"column {column!r}: " if column is not None else ""
    if row is None:
        where = "PostgreSQL refused the rows (row not identified): "
    return DatasetError(f"{name}: {where}{what}; {_NOTHING}", path=name, row=row, column=column)


# ============================================================================= export


#: Metadata columns an export with ``with_metadata`` keeps, per store kind (PostgreSQL
#: also has each row's change cursor and where it came from).
PG_METADATA = ("_cursor", HLC, NODE, BASE_HLC, "_origin")
SQLITE_METADATA = (HLC, NODE, BASE_HLC)


def export_snapshot(
    store: Any,
    to: str | os.PathLike[str],
    *,
    tables: Iterable[str] | None = None,
    with_metadata: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportReport:
    """Write ``tables`` (default: every registry table) of ``store`` from one snapshot to
    ``to``: ``*.parquet`` (one table: that file; several: a directory of that name with
    ``<table>.parquet`` each) or ``*.duckdb`` (one database, a table per registry table).

    Live rows only (tombstones are not exported); application columns, plus tidesync's
    metadata columns with ``with_metadata``. The output is written beside ``to`` and
    renamed into place at the end, so a failed export leaves nothing behind. An existing
    ``to`` is refused unless ``overwrite``.
    """
    started = time.perf_counter()
    out = Path(to)
    name = str(out)
    fmt = {".parquet": "parquet", ".duckdb": "duckdb"}.get(out.suffix.lower())
    if fmt is None:
        raise DatasetError(f"{name}: export writes .parquet or .duckdb (the extension says which)", path=name)
    specs = store.registry.ordered(tables) if tables is not None else list(store.registry)
    if not specs:
        raise DatasetError(f"{name}: no tables to export", path=name)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise DatasetError(f"{name} already exists: choose another name, or overwrite it (--overwrite)", path=name)
    if not out.parent.is_dir():
        raise DatasetError(f"{name}: the directory {out.parent} does not exist", path=name)
    if fmt == "duckdb" and importlib.util.find_spec("duckdb") is None:
        raise DatasetError(f"{name}: writing DuckDB needs the duckdb package (pip install duckdb); "
                           "or export to .parquet", path=name)  # fmt: skip
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove(tmp)
    report = ExportReport(path=name, format=fmt, with_metadata=with_metadata)
    step = progress or (lambda what, d, t: None)
    try:
        with _snapshot(store, specs, with_metadata) as source:
            if fmt == "duckdb":
                _to_duckdb(tmp, specs, source, report, step)
                report.files.append(name)
            elif len(specs) == 1:
                report.tables[specs[0].name] = _to_parquet(tmp, source(specs[0]), specs[0].name, step)
                report.files.append(name)
            else:
                tmp.mkdir()
                for spec in specs:
                    report.tables[spec.name] = _to_parquet(tmp / f"{spec.name}.parquet", source(spec), spec.name, step)
                    report.files.append(str(out / f"{spec.name}.parquet"))
        if overwrite:
            _remove(out)
        os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return ExportReport(path=name, format=fmt, tables=report.tables, files=report.files, with_metadata=with_metadata,
                        seconds=time.perf_counter() - started)  # fmt: skip


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass
class _Source:
    """One table's rows from the snapshot: a stream of batches in ``schema``, and an estimate of their count."""

    schema: pa.Schema
    batches: Iterator[pa.RecordBatch]
    estimate: int


def _out_schema(spec: TableSpec, metadata: tuple[str, ...]) -> pa.Schema:
    """An export's columns: application columns (uuids as text), then the kept metadata."""
    fields = [pa.field(c.name, pa.string() if c.type is LogicalType.UUID else c.type.arrow) for c in spec.columns]
    meta_types = {"_cursor": pa.int64(), HLC: pa.int64(), NODE: pa.string(), BASE_HLC: pa.int64(),
                  "_origin": pa.string()}  # fmt: skip
    fields += [pa.field(m, meta_types[m]) for m in metadata]
    if metadata and spec.field_wise:
        fields += [pa.field(stamp_column(c.name), pa.int64()) for c in spec.data_columns]
    return pa.schema(fields)


def _normalize(batch: pa.RecordBatch | pa.Table, spec: TableSpec, schema: pa.Schema) -> pa.RecordBatch:
    from tidesync.sqlite.types import uuid_to_text

    uuids = {c.name for c in spec.columns if c.type is LogicalType.UUID}
    arrays = []
    for f in schema:
        col = batch.column(f.name)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if col.null_count == len(col):
            arrays.append(pa.nulls(len(col), f.type))
        else:
            arrays.append(uuid_to_text(col) if f.name in uuids else _plain(col).cast(f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


@contextlib.contextmanager
def _snapshot(store: Any, specs: list[TableSpec], with_metadata: bool) -> Iterator[Callable[[TableSpec], _Source]]:
    """Yields ``source(spec)``: the table's live rows, all tables from one snapshot."""
    from tidesync.pg import PostgresStore
    from tidesync.pg.conn import transaction

    if isinstance(store, PostgresStore):
        with transaction(store.connection, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY") as cur:

            def pg_source(spec: TableSpec) -> _Source:
                schema = _out_schema(spec, PG_METADATA if with_metadata else ())
                cols = [f"t.{qi(f.name)}" for f in schema]
                if with_metadata:
                    cols[cols.index('t."_cursor"')] = 't."_cursor"::text::bigint AS "_cursor"'
                cur.execute(f"SELECT reltuples::bigint FROM pg_class WHERE oid = {ql(spec.name)}::regclass")
                estimate = max(int(cur.fetchone()[0]), 0)
                cur.execute(f"SELECT {', '.join(cols)} FROM {qi(spec.name)} t")
                reader = cur.fetch_record_batch()
                return _Source(schema, (_normalize(b, spec, schema) for b in reader), estimate)

            yield pg_source
        return
    # A SQLite store (a mobile device: small): one read transaction gives the window of
    # everything, live rows and tombstones; the tombstones are dropped.
    window = store.read_window(0, tables=[s.name for s in specs])

    def sqlite_source(spec: TableSpec) -> _Source:
        schema = _out_schema(spec, SQLITE_METADATA if with_metadata else ())
        rows = window.tables[spec.name]
        rows = rows.filter(pc.invert(rows.column(DELETED)))
        batches = (_normalize(b, spec, schema) for b in rows.to_batches(max_chunksize=SLICE_ROWS))
        return _Source(schema, batches, rows.num_rows)

    yield sqlite_source


def _to_parquet(path: Path, source: _Source, table: str, step: Progress) -> int:
    import pyarrow.parquet as pq

    done = 0
    step(f"export {table}", 0, source.estimate)
    with pq.ParquetWriter(path, source.schema, compression="zstd") as writer:
        for batch in source.batches:
            writer.write_batch(batch)
            done += batch.num_rows
            step(f"export {table}", done, max(done, source.estimate))
    step(f"export {table}", done, done)
    return done


def _to_duckdb(path: Path, specs: list[TableSpec], source: Callable[[TableSpec], _Source], report: ExportReport,
               step: Progress) -> None:  # fmt: skip
    import duckdb

    # Everything comes in as Arrow: nothing to install, nothing to download.
    con = duckdb.connect(str(path), config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        for spec in specs:
            src = source(spec)
            counted = [0]

            def counting(
                src: _Source = src, spec: TableSpec = spec, counted: list[int] = counted
            ) -> Iterator[pa.RecordBatch]:
                step(f"export {spec.name}", 0, src.estimate)
                for batch in src.batches:
                    counted[0] += batch.num_rows
                    step(f"export {spec.name}", counted[0], max(counted[0], src.estimate))
                    yield batch

            reader = pa.RecordBatchReader.from_batches(src.schema, counting())
            con.register("_tidesync_export", reader)
            uuids = [qi(c.name) for c in spec.columns if c.type is LogicalType.UUID]
            replace = f" REPLACE ({', '.join(f'CAST({u} AS UUID) AS {u}' for u in uuids)})" if uuids else ""
            con.execute(f"CREATE TABLE {qi(spec.name)} AS SELECT *{replace} FROM _tidesync_export")
            con.unregister("_tidesync_export")
            step(f"export {spec.name}", counted[0], counted[0])
            report.tables[spec.name] = counted[0]
        con.execute("CHECKPOINT")
    finally:
        con.close()


__all__ = [
    "DatasetError",
    "DatasetSchemaError",
    "ExportReport",
    "ImportReport",
    "Progress",
    "export_snapshot",
    "import_table",
]
