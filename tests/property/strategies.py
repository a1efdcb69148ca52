"""Hypothesis strategies shared by the property tests: typed columns, diff pairs and
realistic (and pathological) merge histories.

Value strategies mix a tiny pool of "usual suspects" (so equal values, ties and the
edge cases of the value order come up constantly) with the full domain of the type.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from hypothesis import strategies as st

from tidesync.core import MergeMode

KEY = "id"

#: Nodes whose names cover the UTF-8 byte order: ASCII upper < lower < non-ASCII.
NODES = ("Z", "a", "b", "é")


class ColType:
    """An Arrow type and a strategy for its non-null Python values.

    A plain class rather than a dataclass: Hypothesis prints dataclasses field by
    field, which would bury falsifying examples under strategy reprs.
    """

    def __init__(self, label: str, type: pa.DataType, values: st.SearchStrategy[Any]) -> None:
        self.label = label
        self.type = type
        self.values = values

    def __repr__(self) -> str:
        return f"<{self.label}>"

    def nullable(self) -> st.SearchStrategy[Any]:
        # Nulls roughly a third of the time: frequent enough for null-vs-value ties.
        return st.one_of(st.none(), self.values, self.values)

    def array(self, values: Sequence[Any]) -> pa.Array:
        return pa.array(list(values), type=self.type)


_NAN = math.nan
_NEG_NAN = -math.nan
_UUIDS = [uuid.UUID(int=i * 0x0123456789ABCDEF0123456789ABCDEF % (1 << 128)) for i in range(1, 4)]

_texts = st.one_of(st.sampled_from(["", "a", "b", "é", "zz", "\u0800"]), st.text(max_size=5))
_int32s = st.one_of(st.integers(-2, 2), st.integers(-(2**31), 2**31 - 1))
_int64s = st.one_of(st.integers(-2, 2), st.integers(-(2**63), 2**63 - 1))
_floats = st.one_of(
    st.sampled_from([0.0, -0.0, _NAN, _NEG_NAN, math.inf, -math.inf, 1.0, -1.0, 5e-324]),
    st.floats(),  # includes NaNs of both signs, subnormals, infinities
)
_micros = st.one_of(st.integers(-2, 2), st.integers(-(2**63), 2**63 - 1))
_binaries = st.one_of(st.sampled_from([b"", b"\x00", b"\xff", b"a"]), st.binary(max_size=6))
_uuid_bytes = st.one_of(
    st.sampled_from([u.bytes for u in _UUIDS]), st.binary(min_size=16, max_size=16)
)
_uuid_strs = st.one_of(st.sampled_from([str(u) for u in _UUIDS]), st.uuids().map(str))

UTF8 = ColType("utf8", pa.utf8(), _texts)
LARGE_UTF8 = ColType("large_utf8", pa.large_utf8(), _texts)
INT32 = ColType("int32", pa.int32(), _int32s)
INT64 = ColType("int64", pa.int64(), _int64s)
FLOAT64 = ColType("float64", pa.float64(), _floats)
BOOL = ColType("bool", pa.bool_(), st.booleans())
# date32 from day numbers: covers days Python's datetime.date cannot represent.
DATE32 = ColType("date32", pa.date32(), st.one_of(st.integers(-2, 2), st.integers(-(2**31), 2**31 - 1)))
TS_US = ColType("timestamp_us", pa.timestamp("us"), _micros)
TS_US_UTC = ColType("timestamp_us_utc", pa.timestamp("us", tz="UTC"), _micros)
TS_US_BERLIN = ColType("timestamp_us_berlin", pa.timestamp("us", tz="Europe/Berlin"), _micros)
BINARY = ColType("binary", pa.binary(), _binaries)
LARGE_BINARY = ColType("large_binary", pa.large_binary(), _binaries)
UUID_BYTES = ColType("uuid_fsb16", pa.binary(16), _uuid_bytes)
UUID_STR = ColType("uuid_str", pa.utf8(), _uuid_strs)
# Text UUID keys are matched as 128-bit values when every key is canonical (lowercase);
# the same UUIDs in upper case are other keys, and must stay other keys.
UUID_STR_MIXED_CASE = ColType("uuid_str_mixed_case", pa.large_utf8(), st.one_of(_uuid_strs, _uuid_strs.map(str.upper)))

#: Every column type the sync schema uses (diff and merge must compare all of them).
VALUE_TYPES = (
    UTF8,
    LARGE_UTF8,
    INT32,
    INT64,
    FLOAT64,
    BOOL,
    DATE32,
    TS_US,
    TS_US_UTC,
    TS_US_BERLIN,
    BINARY,
    UUID_BYTES,
    UUID_STR,
)

#: The key types the spec lists.
KEY_TYPES = (UTF8, LARGE_UTF8, INT32, INT64, UUID_BYTES, BINARY, LARGE_BINARY, UUID_STR, UUID_STR_MIXED_CASE)


def small_keys(col: ColType, max_size: int) -> st.SearchStrategy[list[Any]]:
    """Distinct key values (Python equality is key equality for str/int/bytes)."""
    return st.lists(col.values, unique=True, max_size=max_size)


def make_table(columns: Sequence[tuple[str, ColType]], rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows (dicts) to a single-chunk table with exactly the given column types."""
    return pa.Table.from_arrays(
        [col.array([r[name] for r in rows]) for name, col in columns],
        names=[name for name, _ in columns],
    )


# ---------------------------------------------------------------------------- diff


@st.composite
def diff_cases(draw: st.DrawFn, max_keys: int = 8) -> tuple[pa.Table, pa.Table, str]:
    """Two versions of one table with a shared key space, unsorted, some rows changed.

    Keys live in both, one or neither; a kept row changes a random subset of its
    columns (to a value that may happen to be equal). The key column sits at a
    random position.
    """
    key_col = draw(st.sampled_from(KEY_TYPES))
    value_cols = draw(st.lists(st.sampled_from(VALUE_TYPES), max_size=4))
    columns: list[tuple[str, ColType]] = [(f"c{i}_{c.label}", c) for i, c in enumerate(value_cols)]
    columns.insert(draw(st.integers(0, len(columns))), (KEY, key_col))
    data = [(n, c) for n, c in columns if n != KEY]

    keys = draw(small_keys(key_col, max_keys))
    old_rows: dict[Any, dict[str, Any]] = {}
    new_rows: dict[Any, dict[str, Any]] = {}
    for k in keys:
        in_old, in_new = draw(st.sampled_from([(True, True), (True, False), (False, True)]))
        if in_old:
            old_rows[k] = {KEY: k, **{n: draw(c.nullable()) for n, c in data}}
        if in_new:
            if in_old and draw(st.booleans()):
                # An edit of an existing row: each column kept or redrawn.
                row = dict(old_rows[k])
                for n, c in data:
                    if draw(st.booleans()):
                        row[n] = draw(c.nullable())
                new_rows[k] = row
            elif in_old:
                new_rows[k] = dict(old_rows[k])  # unchanged
            else:
                new_rows[k] = {KEY: k, **{n: draw(c.nullable()) for n, c in data}}
    old_order = draw(st.permutations(list(old_rows.values())))
    new_order = draw(st.permutations(list(new_rows.values())))
    return make_table(columns, old_order), make_table(columns, new_order), KEY


# --------------------------------------------------------------------------- merge

#: Data-column types used in merge tests (every value type; names make them readable).
MERGE_VALUE_TYPES = VALUE_TYPES

_HLC_MAX = 12  # a small stamp range so that ties of _hlc (and of field stamps) are common


@dataclass
class MergeSchema:
    """Column layout of one synced table: key, metadata, data columns (+ stamps), extras."""

    mode: MergeMode
    key_col: ColType
    data: list[tuple[str, ColType]]
    extra: list[tuple[str, ColType]]
    columns: list[tuple[str, ColType]] = field(default_factory=list)

    def table(self, rows: Sequence[dict[str, Any]]) -> pa.Table:
        return make_table(self.columns, rows)


_HLC_COL = ColType("hlc", pa.int64(), st.integers(0, _HLC_MAX))
_NODE_COL = ColType("node", pa.utf8(), st.sampled_from(NODES))


@st.composite
def merge_schemas(draw: st.DrawFn, mode: MergeMode | None = None) -> MergeSchema:
    """A table layout for merge, with the columns in a random order.

    The order matters: it is the tie-break order of record mode and of row-level
    columns, and the order of ``_lost_columns``.
    """
    modes: list[MergeMode] = ["record", "field"]
    chosen: MergeMode = mode if mode is not None else draw(st.sampled_from(modes))
    key_col = draw(st.sampled_from(KEY_TYPES))
    types = draw(st.lists(st.sampled_from(MERGE_VALUE_TYPES), min_size=1, max_size=3))
    names = ["note", "dose", "deleted_at"]
    data = [(names[i], t) for i, t in enumerate(types)]
    # An extra reserved, row-level column (not data, not a stamp) some of the time.
    extra = [("_src", ColType("src", pa.utf8(), st.sampled_from(["x", "y"])))] if draw(st.booleans()) else []
    columns: list[tuple[str, ColType]] = [
        (KEY, key_col),
        ("_hlc", _HLC_COL),
        ("_node", _NODE_COL),
        ("_base_hlc", _HLC_COL),
        *data,
        *extra,
    ]
    if chosen == "field":
        columns += [(f"_hlc_{n}", _HLC_COL) for n, _ in data]
    columns = draw(st.permutations(columns))
    return MergeSchema(chosen, key_col, data, extra, list(columns))


@st.composite
def _fresh_version(draw: st.DrawFn, schema: MergeSchema, keys: Sequence[Any]) -> dict[str, Any]:
    """An unrelated version: random stamp/node/base from small ranges (ties, and the
    pathological same (_hlc, _node) with different content, happen often)."""
    hlc = draw(st.integers(1, _HLC_MAX))
    row: dict[str, Any] = {
        KEY: draw(st.sampled_from(keys)),
        "_hlc": hlc,
        "_node": draw(st.sampled_from(NODES)),
        "_base_hlc": draw(st.one_of(st.none(), st.just(0), st.integers(1, _HLC_MAX))),
    }
    for n, c in schema.data:
        row[n] = draw(c.nullable())
        if schema.mode == "field":
            # stamp <= _hlc; null and 0 both mean "never written" yet are different contents
            row[f"_hlc_{n}"] = draw(st.one_of(st.none(), st.just(0), st.integers(0, hlc)))
    for n, c in schema.extra:
        row[n] = draw(c.nullable())
    return row


@st.composite
def _derived_version(draw: st.DrawFn, schema: MergeSchema, prev: dict[str, Any]) -> dict[str, Any]:
    """An edit of ``prev`` made by some node after receiving it, as the capture trigger
    records it: ``_base_hlc`` continues the node's own chain or points at ``prev``."""
    node = draw(st.sampled_from(NODES))
    hlc = prev["_hlc"] + draw(st.integers(1, 3))
    row = dict(prev)
    row["_hlc"] = hlc
    row["_node"] = node
    row["_base_hlc"] = prev["_base_hlc"] if node == prev["_node"] else prev["_hlc"]
    for n, c in schema.data:
        if draw(st.booleans()):
            row[n] = draw(c.nullable())
            if schema.mode == "field":
                row[f"_hlc_{n}"] = hlc  # written now
    for n, c in schema.extra:
        if draw(st.booleans()):
            row[n] = draw(c.nullable())
    return row


@dataclass
class MergeScenario:
    schema: MergeSchema
    state: list[dict[str, Any]]  # unique keys: the destination's rows
    batches: list[list[dict[str, Any]]]  # incoming batches, several versions per key


@st.composite
def merge_scenarios(draw: st.DrawFn, mode: MergeMode | None = None, n_batches: int = 2) -> MergeScenario:
    """A pool of versions of a few keys — some derived from others (realistic chains and
    concurrent edits), some unrelated — and a state plus batches drawn from it."""
    schema = draw(merge_schemas(mode))
    keys = draw(st.lists(schema.key_col.values, unique=True, min_size=1, max_size=3))
    pool: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 10))):
        if len(pool) > 0 and draw(st.booleans()):
            pool.append(draw(_derived_version(schema, draw(st.sampled_from(pool)))))
        else:
            pool.append(draw(_fresh_version(schema, keys)))
    state: dict[Any, dict[str, Any]] = {}
    for row in draw(st.lists(st.sampled_from(pool), max_size=len(keys))):
        state.setdefault(row[KEY], row)
    state_rows = draw(st.permutations(list(state.values())))
    batches = [draw(st.lists(st.sampled_from(pool), max_size=6)) for _ in range(n_batches)]
    return MergeScenario(schema, list(state_rows), batches)
