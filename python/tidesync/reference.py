"""Plain-Python reference of the sync semantics: the oracle of the property tests.

Everything here follows docs/semantics.md line by line and favours being obviously
right over being fast: rows become Python lists, every comparison goes through one
value-order function, and nothing is vectorised. Never call this on a hot path; the
native core (:mod:`tidesync.core`) is the implementation, this module is how the
tests know what the implementation must answer.

The functions take the same arguments and return the same types as their
counterparts in :mod:`tidesync.core` (``diff``, ``merge``) or the methods of
:class:`tidesync.HybridClock` as pure functions (``tick``, ``observe``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from tidesync.core import DEFAULT_MAX_DRIFT_MS, Diff, MergeMode, MergeResult
from tidesync.errors import (
    ClockSkewError,
    DuplicateKeyError,
    InvalidInputError,
    SchemaMismatchError,
    UnsupportedTypeError,
)

__all__ = [
    "clamp_hlc",
    "clamp_hlcs",
    "diff",
    "hlc_pack",
    "hlc_unpack",
    "is_skewed",
    "merge",
    "observe",
    "tick",
    "value_keys",
]

#: A value turned into something Python orders exactly as the spec orders values:
#: ``(0,)`` for null, ``(1, x)`` otherwise (so null sorts first whatever ``x`` is).
ValueKey = tuple[Any, ...]

#: Width of the counter in the low bits of a stamp.
_COUNTER_BITS = 16
_COUNTER_MASK = (1 << _COUNTER_BITS) - 1

#: The metadata columns every merged batch must carry, with their Arrow types.
_HLC, _NODE, _BASE = "_hlc", "_node", "_base_hlc"
_STAMP_PREFIX = "_hlc_"


# --------------------------------------------------------------------------- HLC


def hlc_pack(ms: int, counter: int = 0) -> int:
    """``ms << 16 | counter``: milliseconds in the high 48 bits, counter in the low 16."""
    if not 0 <= counter <= _COUNTER_MASK:
        raise InvalidInputError(f"HLC counter {counter} does not fit in 16 bits")
    return (ms << _COUNTER_BITS) | counter


def hlc_unpack(hlc: int) -> tuple[int, int]:
    """Split a stamp into ``(milliseconds, counter)``."""
    return hlc >> _COUNTER_BITS, hlc & _COUNTER_MASK


def tick(last: int, now_ms: int) -> int:
    """Stamp a local event: ``max(last + 1, now_ms << 16)``.

    ``last + 1`` may carry out of the counter into the milliseconds; that is the
    spec's "run a little ahead instead of going backwards", which plain integer
    addition gives for free.
    """
    return max(last + 1, now_ms << _COUNTER_BITS)


def is_skewed(remote: int, now_ms: int, max_drift_ms: int = DEFAULT_MAX_DRIFT_MS) -> bool:
    """Whether ``remote``'s millisecond part is *more than* ``max_drift_ms`` ahead of now.

    Only the millisecond part counts: a stamp exactly at the tolerance with any
    counter is still acceptable.
    """
    return (remote >> _COUNTER_BITS) - now_ms > max_drift_ms


def clamp_hlc(remote: int, now_ms: int, max_drift_ms: int = DEFAULT_MAX_DRIFT_MS) -> int:
    """The stamp a skewed ``remote`` is treated as: the greatest stamp not skewed,
    ``((now_ms + max_drift_ms) << 16) | 0xFFFF``."""
    if is_skewed(remote, now_ms, max_drift_ms):
        return ((now_ms + max_drift_ms) << _COUNTER_BITS) | ((1 << _COUNTER_BITS) - 1)
    return remote


def observe(
    last: int,
    remote: int,
    now_ms: int,
    max_drift_ms: int = DEFAULT_MAX_DRIFT_MS,
    *,
    clamp: bool = False,
) -> int:
    """Fold in a received stamp: ``max(last + 1, remote + 1, now_ms << 16)``.

    A skewed ``remote`` raises :class:`ClockSkewError` (the clock is left as it was,
    which a pure function gets for free), or with ``clamp=True`` is replaced by the
    tolerance bound before folding in.
    """
    if is_skewed(remote, now_ms, max_drift_ms):
        if not clamp:
            raise ClockSkewError(
                f"remote stamp {remote} is {(remote >> _COUNTER_BITS) - now_ms} ms ahead "
                f"of the local clock (tolerance {max_drift_ms} ms)"
            )
        remote = clamp_hlc(remote, now_ms, max_drift_ms)
    return max(last + 1, remote + 1, now_ms << _COUNTER_BITS)


def clamp_hlcs(
    values: Sequence[int | None], now_ms: int, max_drift_ms: int = DEFAULT_MAX_DRIFT_MS
) -> tuple[list[int | None], list[bool]]:
    """Vectorised :func:`clamp_hlc` over a list: (clamped stamps, mask of clamped ones).

    Nulls stay null and are not "clamped" (a missing stamp is not ahead of anything).
    """
    clamped: list[int | None] = []
    mask: list[bool] = []
    for v in values:
        skewed = v is not None and is_skewed(v, now_ms, max_drift_ms)
        clamped.append(clamp_hlc(v, now_ms, max_drift_ms) if v is not None else None)
        mask.append(skewed)
    return clamped, mask


# ------------------------------------------------------------------- value order


def _float_key(x: float) -> int:
    """IEEE 754 totalOrder as an integer: ``-NaN < -inf < … < -0.0 < 0.0 < … < inf < NaN``.

    Reinterpreting the bits as a signed integer orders positive floats correctly
    but negative ones backwards; flipping every bit but the sign of the negative
    ones fixes that. Unlike ``<`` on floats this separates -0.0 from 0.0 and puts
    NaNs (by sign and payload) at the ends, which is what the spec asks for.
    """
    (bits,) = struct.unpack("<q", struct.pack("<d", x))
    assert isinstance(bits, int)
    if bits < 0:
        bits ^= 0x7FFF_FFFF_FFFF_FFFF
    return bits


def _storage_type(dtype: pa.DataType) -> pa.DataType:
    """The integer type a temporal type is stored as, so temporal values order numerically.

    Casting to it rather than going through ``to_pylist`` avoids Python
    ``datetime`` objects: they drop nanoseconds, cannot be compared across time
    zones and overflow outside years 1..9999, none of which the spec has.
    """
    if pa.types.is_date32(dtype) or pa.types.is_time32(dtype):
        return pa.int32()
    return pa.int64()


def _scalar_key_fn(dtype: pa.DataType) -> Callable[[Any], Any]:
    """How one non-null Python value of ``dtype`` becomes an orderable key, or raise."""
    if pa.types.is_floating(dtype):
        if pa.types.is_float16(dtype):
            raise UnsupportedTypeError(f"column type {dtype} is not supported")
        return _float_key
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        # Python compares str by code point, which is the same as UTF-8 byte order;
        # encoding anyway keeps the spec's wording literally true.
        return lambda s: s.encode("utf-8")
    if (
        pa.types.is_integer(dtype)
        or pa.types.is_boolean(dtype)  # False < True in Python, as in the spec
        or pa.types.is_binary(dtype)
        or pa.types.is_large_binary(dtype)
        or pa.types.is_binary_view(dtype)
        or pa.types.is_fixed_size_binary(dtype)  # bytes compare bytewise
        or pa.types.is_decimal(dtype)
        or pa.types.is_temporal(dtype)  # already cast to its integer storage
        or pa.types.is_null(dtype)
    ):
        return lambda v: v
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        inner = _scalar_key_fn(dtype.value_type)
        return lambda items: tuple(_null_first(inner, x) for x in items)
    raise UnsupportedTypeError(f"column type {dtype} is not supported")


def _null_first(fn: Callable[[Any], Any], v: Any) -> ValueKey:
    """Wrap a key so that null sorts before every value."""
    return (0,) if v is None else (1, fn(v))


def value_keys(column: pa.Array | pa.ChunkedArray) -> list[ValueKey]:
    """One key per value of ``column`` such that Python's ``<``/``==`` on the keys is
    exactly the spec's value order/equality (null first, floats by total order, ...).

    Two values are equal for diff and merge purposes iff their keys are equal.
    """
    dtype = column.type
    fn = _scalar_key_fn(dtype)
    if pa.types.is_temporal(dtype):
        column = column.cast(_storage_type(dtype))
    return [_null_first(fn, v) for v in column.to_pylist()]


# -------------------------------------------------------------------- input checks


_KEY_TYPE_CHECKS: tuple[Callable[[pa.DataType], bool], ...] = (
    pa.types.is_string,
    pa.types.is_large_string,
    lambda t: pa.types.is_int32(t) or pa.types.is_int64(t),
    pa.types.is_fixed_size_binary,
    pa.types.is_binary,
    pa.types.is_large_binary,
)


def _as_table(data: Any) -> pa.Table:
    """Accept a pyarrow Table or RecordBatch or anything exporting an Arrow stream."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if hasattr(data, "__arrow_c_stream__"):
        return pa.table(data)
    raise InvalidInputError(f"expected Arrow tabular data, got {type(data).__name__}")


def _check_same_schema(a: pa.Table, b: pa.Table, what: str) -> None:
    """Names and types, in order, must match; nullability and metadata do not matter."""
    sa = [(f.name, f.type) for f in a.schema]
    sb = [(f.name, f.type) for f in b.schema]
    if sa != sb:
        raise SchemaMismatchError(f"{what}: schemas differ: {a.schema} vs {b.schema}")


def _check_key(table: pa.Table, key: str) -> None:
    """The key must exist and have one of the key types the spec lists."""
    if key not in table.column_names:
        raise InvalidInputError(f"key column {key!r} is not in the batch")
    dtype = table.schema.field(key).type
    if not any(check(dtype) for check in _KEY_TYPE_CHECKS):
        raise UnsupportedTypeError(f"key column {key!r} has type {dtype}, which cannot be a key")


def _key_values(table: pa.Table, key: str, side: str, *, unique: bool) -> list[Any]:
    """The key column as Python values, refusing nulls (and duplicates if ``unique``).

    str/int/bytes key values are hashable and equal exactly when the spec calls the
    keys equal, so they can index dicts directly.
    """
    values: list[Any] = table.column(key).to_pylist()
    if any(v is None for v in values):
        raise InvalidInputError(f"{side}: key column {key!r} contains nulls")
    if unique:
        seen: set[Any] = set()
        for v in values:
            if v in seen:
                raise DuplicateKeyError(f"{side}: key {v!r} appears more than once")
            seen.add(v)
    return values


# ---------------------------------------------------------------------------- diff


def diff(old: Any, new: Any, key: str) -> Diff:
    """Inserted, deleted and updated keys between two versions of a batch.

    See "Diff" in docs/semantics.md. Rows are compared column by column with the
    spec's value equality (null = null, NaN = NaN, -0.0 != 0.0).
    """
    old_t, new_t = _as_table(old), _as_table(new)
    _check_same_schema(old_t, new_t, "diff")
    _check_key(old_t, key)
    for reserved in ("_old_index", "_new_index"):
        if reserved in old_t.column_names:
            raise InvalidInputError(f"column name {reserved!r} is reserved for diff output")
    old_keys = _key_values(old_t, key, "old", unique=True)
    new_keys = _key_values(new_t, key, "new", unique=True)
    columns = [name for name in old_t.column_names if name != key]
    # Validate every column type up front, even in an empty batch, like a typed core would.
    old_vals = {c: value_keys(old_t.column(c)) for c in columns}
    new_vals = {c: value_keys(new_t.column(c)) for c in columns}
    key_type = old_t.schema.field(key).type

    old_index = {k: i for i, k in enumerate(old_keys)}
    new_index = {k: i for i, k in enumerate(new_keys)}

    ins_keys: list[Any] = []
    ins_idx: list[int] = []
    upd_keys: list[Any] = []
    upd_old: list[int] = []
    upd_new: list[int] = []
    upd_masks: dict[str, list[bool]] = {c: [] for c in columns}
    for j, k in enumerate(new_keys):  # new's row order for inserted and updated
        i = old_index.get(k)
        if i is None:
            ins_keys.append(k)
            ins_idx.append(j)
            continue
        changed = {c: old_vals[c][i] != new_vals[c][j] for c in columns}
        if any(changed.values()):
            upd_keys.append(k)
            upd_old.append(i)
            upd_new.append(j)
            for c in columns:
                upd_masks[c].append(changed[c])

    del_keys = [k for k in old_keys if k not in new_index]  # old's row order
    del_idx = [old_index[k] for k in del_keys]

    inserted = pa.table(
        [pa.array(ins_keys, type=key_type), pa.array(ins_idx, type=pa.uint32())],
        names=[key, "_new_index"],
    )
    deleted = pa.table(
        [pa.array(del_keys, type=key_type), pa.array(del_idx, type=pa.uint32())],
        names=[key, "_old_index"],
    )
    updated = pa.table(
        [
            pa.array(upd_keys, type=key_type),
            pa.array(upd_old, type=pa.uint32()),
            pa.array(upd_new, type=pa.uint32()),
            *(pa.array(upd_masks[c], type=pa.bool_()) for c in columns),
        ],
        names=[key, "_old_index", "_new_index", *columns],
    )
    return Diff(inserted=inserted, deleted=deleted, updated=updated)


# --------------------------------------------------------------------------- merge

#: A version of a row, as the row (of the local+incoming concatenation) each column's
#: value comes from. Input rows use one index throughout; rows produced by a
#: field-wise merge mix columns of several versions. Keeping indices rather than
#: values lets the output be built with ``take``, which keeps every value bit for bit.
_Version = tuple[int, ...]


class _Merger:
    """The merge rules of docs/semantics.md over the rows of one concatenated table."""

    def __init__(self, table: pa.Table, key: str, mode: MergeMode) -> None:
        names: list[str] = table.column_names
        self.names = names
        self.mode = mode
        self.keys = [value_keys(table.column(n)) for n in names]  # keys[col][row]
        self.raw_hlc: list[int] = table.column(_HLC).to_pylist()
        self.raw_node: list[str] = table.column(_NODE).to_pylist()
        self.raw_base: list[int | None] = table.column(_BASE).to_pylist()
        self.hlc_i = names.index(_HLC)
        self.node_i = names.index(_NODE)
        self.base_i = names.index(_BASE)
        # Data columns: neither the key nor reserved (leading underscore).
        self.data = [i for i, n in enumerate(names) if n != key and not n.startswith("_")]
        # Field mode pairs each data column with its stamp; record mode has no stamps.
        self.stamp: dict[int, int] = {}
        if mode == "field":
            self.stamp = {c: names.index(_STAMP_PREFIX + names[c]) for c in self.data}
        self.raw_stamps: dict[int, list[int | None]] = {
            s: table.column(s).to_pylist() for s in self.stamp.values()
        }
        stamp_cols = set(self.stamp.values())
        self.row_level = [i for i in range(len(names)) if i not in self.data and i not in stamp_cols]
        # "(_hlc, _node, then every other column in schema order)"
        rest = [i for i in range(len(names)) if i not in (self.hlc_i, self.node_i)]
        self.record_cols = [self.hlc_i, self.node_i, *rest]
        rl_rest = [i for i in self.row_level if i not in (self.hlc_i, self.node_i)]
        self.row_level_cols = [self.hlc_i, self.node_i, *rl_rest]

    # -- the pieces of a version
    def hlc(self, v: _Version) -> int:
        return self.raw_hlc[v[self.hlc_i]]

    def node(self, v: _Version) -> str:
        return self.raw_node[v[self.node_i]]

    def base0(self, v: _Version) -> int:
        """``_base_hlc`` with null as 0 (field-mode conflict rule)."""
        base = self.raw_base[v[self.base_i]]
        return 0 if base is None else base

    def stamp0(self, v: _Version, c: int) -> int:
        """``_hlc_<c>`` with null as 0, as the field-mode conflict rule counts it."""
        s = self.stamp[c]
        stamp = self.raw_stamps[s][v[s]]
        return 0 if stamp is None else stamp

    def value(self, v: _Version, c: int) -> ValueKey:
        return self.keys[c][v[c]]

    # -- orders
    def version_id(self, v: _Version) -> tuple[int, bytes]:
        """``(_hlc, _node)``: the total order of versions; nodes compare as UTF-8 bytes."""
        return self.hlc(v), self.node(v).encode("utf-8")

    def record_order(self, v: _Version) -> tuple[Any, ...]:
        return tuple(self.value(v, c) for c in self.record_cols)

    def row_level_order(self, v: _Version) -> tuple[Any, ...]:
        return tuple(self.value(v, c) for c in self.row_level_cols)

    def field_order(self, v: _Version, c: int) -> tuple[Any, ...]:
        """``(_hlc_<c>, <c>)`` in the value order, so a null stamp sorts below every stamp.

        Not "null as 0" here: a null and a 0 stamp are different contents, and
        letting them tie would make the picked stamp depend on arrival order.
        """
        return (self.value(v, self.stamp[c]), self.value(v, c))

    # -- merge
    def merge_all(self, versions: Sequence[_Version]) -> _Version:
        """The merged row of a set of versions of one key (each rule is a maximum)."""
        if self.mode == "record":
            return max(versions, key=self.record_order)
        top: _Version = max(versions, key=self.row_level_order)
        merged = list(top)
        for c in self.data:
            best = max(versions, key=lambda v: self.field_order(v, c))
            merged[c] = best[c]
            merged[self.stamp[c]] = best[self.stamp[c]]
        return tuple(merged)

    def same_row(self, a: _Version, b: _Version) -> bool:
        return all(self.value(a, c) == self.value(b, c) for c in range(len(self.names)))

    # -- conflicts
    def conflicts(self, x: _Version, y: _Version) -> list[tuple[_Version, _Version, list[str]]]:
        """Conflict rows of the pair: ``(losing side, other side, lost columns)``."""
        if self.version_id(x) == self.version_id(y):
            return []  # the same version (maybe seen twice): nothing to reconcile
        w, l = (x, y) if self.version_id(x) > self.version_id(y) else (y, x)
        base = self.raw_base[w[self.base_i]]
        if base == self.hlc(l) or self.node(w) == self.node(l):
            return []  # sequential: w was derived from l, or both are one node's chain
        if self.mode == "record":
            lost = [self.names[c] for c in self.data if self.value(l, c) != self.value(w, c)]
            return [(l, w, lost)] if lost else []
        lost_x: list[str] = []
        lost_y: list[str] = []
        for c in self.data:  # schema order, so the lost lists come out in schema order
            both_changed = self.stamp0(x, c) > self.base0(x) and self.stamp0(y, c) > self.base0(y)
            if not both_changed or self.value(x, c) == self.value(y, c):
                continue
            # The values differ, so (stamp, value) orders the two sides strictly.
            x_wins = self.field_order(x, c) > self.field_order(y, c)
            (lost_y if x_wins else lost_x).append(self.names[c])
        out: list[tuple[_Version, _Version, list[str]]] = []
        if lost_x:
            out.append((x, y, lost_x))
        if lost_y:
            out.append((y, x, lost_y))
        return out


def _check_merge_schema(table: pa.Table, key: str, mode: str) -> None:
    """Key, ``_hlc``/``_node``/``_base_hlc`` and (field mode) every stamp must be there."""
    if mode not in ("record", "field"):
        raise InvalidInputError(f"merge mode must be 'record' or 'field', not {mode!r}")
    for reserved in ("_winner_hlc", "_winner_node", "_lost_columns"):
        if reserved in table.column_names:
            raise InvalidInputError(f"column name {reserved!r} is reserved for the conflict output of merge")
    _check_key(table, key)
    required = {_HLC: pa.int64(), _NODE: pa.utf8(), _BASE: pa.int64()}
    if mode == "field":
        for name in table.column_names:
            if name != key and not name.startswith("_"):
                required[_STAMP_PREFIX + name] = pa.int64()
    for name, dtype in required.items():
        if name not in table.column_names:
            raise InvalidInputError(f"merge needs a column {name!r} ({dtype})")
        if table.schema.field(name).type != dtype:
            raise InvalidInputError(
                f"column {name!r} must be {dtype}, not {table.schema.field(name).type}"
            )


def merge(local: Any, incoming: Any, key: str, mode: MergeMode = "record") -> MergeResult:
    """Merge incoming versions into the local rows of one table.

    See "Merge" in docs/semantics.md: per key of ``incoming``, the merged row is a
    maximum over the local row and every incoming version; rows that differ from
    the local row are returned, and the losing side of every concurrent edit is
    logged in ``conflicts``.
    """
    local_t, incoming_t = _as_table(local), _as_table(incoming)
    _check_same_schema(local_t, incoming_t, "merge")
    _check_merge_schema(local_t, key, mode)
    local_keys = _key_values(local_t, key, "local", unique=True)
    incoming_keys = _key_values(incoming_t, key, "incoming", unique=False)
    for side, t in (("local", local_t), ("incoming", incoming_t)):
        for name in (_HLC, _NODE):
            if t.column(name).null_count:
                raise InvalidInputError(f"{side}: {name} is never null but has nulls")

    # Local rows are 0..L-1 of the concatenation, incoming rows L..L+I-1.
    both = pa.concat_tables([local_t, incoming_t.cast(local_t.schema)])
    n_local = local_t.num_rows
    width = both.num_columns
    m = _Merger(both, key, mode)

    local_row = {k: i for i, k in enumerate(local_keys)}
    versions: dict[Any, list[_Version]] = {}  # insertion order = first appearance
    for j, k in enumerate(incoming_keys):
        versions.setdefault(k, []).append((n_local + j,) * width)

    out_rows: list[_Version] = []
    out_inserted: list[bool] = []
    out_local: list[int | None] = []
    out_source: list[int | None] = []
    conflicts: list[tuple[_Version, _Version, list[str]]] = []
    for k, incoming_versions in versions.items():
        here = local_row.get(k)
        v_set = incoming_versions if here is None else [(here,) * width, *incoming_versions]

        merged = m.merge_all(v_set)
        if here is None or not m.same_row(merged, (here,) * width):
            out_rows.append(merged)
            out_inserted.append(here is None)
            out_local.append(here)
            # The first incoming version the merged row equals in every column.
            copies = [v[0] - n_local for v in incoming_versions if m.same_row(merged, v)]
            out_source.append(copies[0] if copies else None)

        # Conflicts: fold V in ascending record order, checking each next version
        # against everything merged so far.
        ordered = sorted(v_set, key=m.record_order)
        acc = ordered[0]
        for b in ordered[1:]:
            conflicts.extend(m.conflicts(acc, b))
            acc = m.merge_all([acc, b])

    rows = pa.Table.from_arrays(_take_versions(both, out_rows), schema=both.schema)
    conflict_table = pa.Table.from_arrays(
        [
            *_take_versions(both, [loser for loser, _, _ in conflicts]),
            pa.array([m.hlc(w) for _, w, _ in conflicts], type=pa.int64()),
            pa.array([m.node(w) for _, w, _ in conflicts], type=pa.utf8()),
            pa.array([lost for _, _, lost in conflicts], type=pa.list_(pa.utf8())),
        ],
        names=[*both.column_names, "_winner_hlc", "_winner_node", "_lost_columns"],
    )
    return MergeResult(
        rows=rows,
        inserted=pa.array(out_inserted, type=pa.bool_()),
        conflicts=conflict_table,
        local_row=pa.array(out_local, type=pa.uint32()),
        source=pa.array(out_source, type=pa.uint32()),
        keys=len(versions),
    )


def _take_versions(table: pa.Table, versions: Sequence[_Version]) -> list[pa.Array]:
    """The columns of a table whose row ``r`` is ``versions[r]``, built with ``take``."""
    columns = []
    for c in range(table.num_columns):
        indices = pa.array([v[c] for v in versions], type=pa.int64())
        columns.append(table.column(c).take(indices).combine_chunks())
    return columns
