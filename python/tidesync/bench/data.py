"""Deterministic synthetic EMR-like tables for benchmarks and smoke tests.

Everything is vectorized with numpy and pyarrow compute (no per-row Python), so a
million rows are generated in about a second. The same ``seed`` always gives the same
tables.

The table (``make_table``) holds patient encounters: a UUIDv7-like key ``id`` (36-char
text, or ``fixed_size_binary(16)`` with ``key_type="uuid16"``), twelve data columns of
the types a health record uses (strings, int32/int64, float64 vitals, bool, date32,
timestamps with and without time zone, ~5-10 % nulls in the nullable ones) and the
engine's metadata columns ``_hlc``, ``_node``, ``_base_hlc`` and, for field-wise tables
(``field_stamps=True``), ``_hlc_<col>`` per data column (see docs/semantics.md).

Derived copies:

- ``derive_changed(table)``: the same table after local edits on this node — a fraction
  of rows updated (one or more columns each, with new stamps), some deleted, some
  inserted. Input for ``diff``.
- ``make_incoming(local)``: versions received from other nodes for ``merge``: updates of
  existing keys (newer and derived from the local version, concurrent edits from a
  common ancestor, stale re-deliveries of already-known versions), brand-new records,
  and a few keys with several versions in the same batch.
- ``subsample_merge(local, incoming, n)``: a proportional subsample of a merge input
  (for the slow plain-Python reference).
- ``make_changes(n)``: a change log interleaving several nodes, for ``logical_order``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

KeyType = Literal["string", "uuid16"]

#: Name of the key column.
KEY = "id"

#: The data columns, in schema order (the key comes first, the metadata last).
DATA_COLUMNS: tuple[str, ...] = (
    "given_name",
    "family_name",
    "mrn",
    "icd10",
    "age",
    "heart_rate",
    "weight_kg",
    "temp_c",
    "smoker",
    "birth_date",
    "admitted_at",
    "recorded_at",
)

DATA_TYPES: dict[str, pa.DataType] = {
    "given_name": pa.string(),
    "family_name": pa.string(),
    "mrn": pa.int64(),
    "icd10": pa.string(),
    "age": pa.int32(),
    "heart_rate": pa.int32(),
    "weight_kg": pa.float64(),
    "temp_c": pa.float64(),
    "smoker": pa.bool_(),
    "birth_date": pa.date32(),
    "admitted_at": pa.timestamp("us", tz="UTC"),
    "recorded_at": pa.timestamp("us"),
}

#: The node whose database the local tables belong to.
LOCAL_NODE = "clinic-a"

#: Nodes that wrote rows; the local node is the first.
NODES: tuple[str, ...] = (LOCAL_NODE, "clinic-b", "clinic-c", "ward-3", "mobile-7", "hub")

#: Table names used by ``make_changes``.
TABLES: tuple[str, ...] = ("patient", "encounter", "observation", "medication", "allergy")

_T0_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
_DAY_MS = 86_400_000
_SPAN_MS = 365 * _DAY_MS

# serial-number ranges, so keys made by different generators never collide
_SERIAL_CHANGED = 1 << 29
_SERIAL_INCOMING = 1 << 30

_GIVEN = (
    "Amira Ana Anders Aoife Arjun Ava Bea Carlos Chen Chloe Dmitri Elena Emil Eva Farah "
    "Finn Freya Grace Hana Hugo Ines Isaac Ivy Jamal Jonas Julia Kai Karin Leila Leo Lina "
    "Lucas Maja Malik Maria Mateo Mei Mila Nadia Nils Noah Nora Olga Omar Oskar Priya Rafael "
    "Rosa Sami Sara Sofia Tariq Thea Tomas Uma Vera Viktor Yara Yusuf Zoe"
).split()
_FAMILY_STEMS = (
    "Berg Costa Dahl Eriks Fisch Garc Hans Ivan Jens Kowal Lind Mart Nguy Olsen Pete Quin "
    "Ross Schmi Tanak Ulric Varg Weiss Xavi Yilm Zhan"
).split()
_FAMILY_ENDS = ("", "son", "sen", "ez", "ova", "ski", "er", "i", "ström", "ini")


def _vocab_family() -> pa.Array:
    return pa.array([s + e for s in _FAMILY_STEMS for e in _FAMILY_ENDS], pa.string())


def _vocab_icd10() -> pa.Array:
    letters = "ABCDEFGHIJKLMNOPQRSTZ"
    return pa.array([f"{c}{d:02d}.{x}" for c in letters for d in range(0, 100, 3) for x in range(3)], pa.string())


_VOCAB_GIVEN = pa.array(_GIVEN, pa.string())
_VOCAB_FAMILY = _vocab_family()
_VOCAB_ICD10 = _vocab_icd10()
_VOCAB_NODES = pa.array(NODES, pa.string())
_VOCAB_TABLES = pa.array(TABLES, pa.string())
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)

I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]


def hlc(ms: I64 | int, counter: I64 | int = 0) -> I64:
    """Vectorized ``hlc_pack``: milliseconds in the high 48 bits, counter in the low 16."""
    return np.asarray((np.asarray(ms, dtype=np.int64) << 16) | np.asarray(counter, dtype=np.int64), dtype=np.int64)


def stamp_column(col: str) -> str:
    """Name of the field-wise stamp column of data column ``col``."""
    return f"_hlc_{col}"


def schema(*, key_type: KeyType = "string", field_stamps: bool = False) -> pa.Schema:
    """Schema of the generated tables."""
    key = pa.field(KEY, pa.string() if key_type == "string" else pa.binary(16), nullable=False)
    fields = [key, *(pa.field(c, DATA_TYPES[c]) for c in DATA_COLUMNS)]
    fields += [
        pa.field("_hlc", pa.int64(), nullable=False),
        pa.field("_node", pa.string(), nullable=False),
        pa.field("_base_hlc", pa.int64()),
    ]
    if field_stamps:
        fields += [pa.field(stamp_column(c), pa.int64()) for c in DATA_COLUMNS]
    return pa.schema(fields)


# ---------------------------------------------------------------------------- keys


def _uuid7_bytes(serial: I64, ms: I64, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """UUIDv7-like 16-byte keys: 48-bit ms timestamp, version/variant bits, random bits,
    and a bijective scramble of ``serial`` in the last 4 bytes (so keys are unique)."""
    n = serial.shape[0]
    out = np.empty((n, 16), dtype=np.uint8)
    shifts = np.array([40, 32, 24, 16, 8, 0], dtype=np.int64)
    out[:, 0:6] = ((ms[:, None] >> shifts) & 0xFF).astype(np.uint8)
    rand = rng.integers(0, 256, size=(n, 6), dtype=np.uint8)
    out[:, 6] = 0x70 | (rand[:, 0] & 0x0F)
    out[:, 7] = rand[:, 1]
    out[:, 8] = 0x80 | (rand[:, 2] & 0x3F)
    out[:, 9:12] = rand[:, 3:6]
    scrambled = (serial.astype(np.uint64) * np.uint64(0x9E3779B1) + np.uint64(0x5BD1E995)) & np.uint64(0xFFFFFFFF)
    out[:, 12:16] = ((scrambled[:, None] >> np.array([24, 16, 8, 0], dtype=np.uint64)) & np.uint64(0xFF)).astype(
        np.uint8
    )
    return out


def _uuid_text(raw: npt.NDArray[np.uint8]) -> pa.Array:
    """Format 16-byte keys as canonical 36-char UUID text, without a per-row loop."""
    n = raw.shape[0]
    hexed = np.empty((n, 32), dtype=np.uint8)
    hexed[:, 0::2] = _HEX[raw >> 4]
    hexed[:, 1::2] = _HEX[raw & 0x0F]
    text = np.full((n, 36), ord("-"), dtype=np.uint8)
    text[:, 0:8] = hexed[:, 0:8]
    text[:, 9:13] = hexed[:, 8:12]
    text[:, 14:18] = hexed[:, 12:16]
    text[:, 19:23] = hexed[:, 16:20]
    text[:, 24:36] = hexed[:, 20:32]
    if 36 * n < 2**31:
        offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
        return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(text)))
    offsets64 = np.arange(0, 36 * (n + 1), 36, dtype=np.int64)
    large = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets64), pa.py_buffer(np.ascontiguousarray(text)))
    return large.cast(pa.string())


def _keys(serial: I64, ms: I64, rng: np.random.Generator, key_type: KeyType) -> pa.Array:
    raw = _uuid7_bytes(serial, ms, rng)
    if key_type == "uuid16":
        return pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(16), serial.shape[0], [None, pa.py_buffer(np.ascontiguousarray(raw))]
        )
    return _uuid_text(raw)


# ---------------------------------------------------------------------------- data


def _nulls(rng: np.random.Generator, n: int, fraction: float) -> Mask:
    return rng.random(n) < fraction


def _pick(vocab: pa.Array, rng: np.random.Generator, n: int, null_fraction: float) -> pa.Array:
    idx = rng.integers(0, len(vocab), size=n, dtype=np.int32)
    mask = _nulls(rng, n, null_fraction) if null_fraction > 0 else None
    return vocab.take(pa.array(idx, mask=mask))


def _data(n: int, rng: np.random.Generator, serial: I64, created_ms: I64) -> dict[str, pa.Array]:
    """Fresh values of every data column for ``n`` rows."""
    age = rng.integers(0, 100, size=n, dtype=np.int32)
    days_old = age.astype(np.int64) * 365 + rng.integers(0, 365, size=n)
    created_day = created_ms // _DAY_MS
    admitted_us = (created_ms - rng.integers(0, 72 * 3_600_000, size=n)) * 1000
    recorded_us = (created_ms + rng.integers(0, 3_600_000, size=n) + 3_600_000) * 1000  # naive local wall time
    return {
        "given_name": _pick(_VOCAB_GIVEN, rng, n, 0.05),
        "family_name": _pick(_VOCAB_FAMILY, rng, n, 0.05),
        "mrn": pa.array(10_000_000 + (serial * 7919) % 90_000_000, pa.int64()),
        "icd10": _pick(_VOCAB_ICD10, rng, n, 0.08),
        "age": pa.array(age, pa.int32(), mask=_nulls(rng, n, 0.05)),
        "heart_rate": pa.array(rng.normal(78, 14, size=n).round().astype(np.int32), pa.int32(), mask=_nulls(rng, n, 0.09)),
        "weight_kg": pa.array(rng.normal(74, 16, size=n).clip(2.5, 250).round(1), pa.float64(), mask=_nulls(rng, n, 0.07)),
        "temp_c": pa.array(rng.normal(37.0, 0.6, size=n).round(1), pa.float64(), mask=_nulls(rng, n, 0.06)),
        "smoker": pa.array(rng.random(n) < 0.18, pa.bool_(), mask=_nulls(rng, n, 0.10)),
        "birth_date": pa.array((created_day - days_old).astype(np.int32), pa.date32(), mask=_nulls(rng, n, 0.05)),
        "admitted_at": pa.array(admitted_us, DATA_TYPES["admitted_at"], mask=_nulls(rng, n, 0.05)),
        "recorded_at": pa.array(recorded_us, DATA_TYPES["recorded_at"], mask=_nulls(rng, n, 0.06)),
    }


def _nodes(idx: npt.NDArray[np.int64]) -> pa.Array:
    return _VOCAB_NODES.take(pa.array(idx))


def _node_index(nodes: pa.Array | pa.ChunkedArray) -> npt.NDArray[np.int64]:
    return np.asarray(pc.index_in(nodes, value_set=_VOCAB_NODES).to_numpy(zero_copy_only=False), dtype=np.int64)


def _i64(col: pa.Array | pa.ChunkedArray, fill: int = 0) -> I64:
    """An int64 column as numpy, nulls replaced by ``fill``."""
    return np.asarray(pc.fill_null(col, fill).to_numpy(zero_copy_only=False), dtype=np.int64)


def _table(key: pa.Array, data: dict[str, pa.Array], meta: dict[str, pa.Array], sch: pa.Schema) -> pa.Table:
    columns = {KEY: key, **data, **meta}
    return pa.Table.from_arrays([columns[f.name] for f in sch], schema=sch)


def make_table(
    rows: int, *, seed: int = 0, key_type: KeyType = "string", field_stamps: bool = False, serial_base: int = 0
) -> pa.Table:
    """The local EMR table of ``rows`` encounters, in insertion (key) order."""
    rng = np.random.default_rng(seed)
    n = rows
    serial = np.arange(serial_base, serial_base + n, dtype=np.int64)
    created_ms = _T0_MS + np.sort(rng.integers(0, _SPAN_MS, size=n))
    key = _keys(serial, created_ms, rng, key_type)
    data = _data(n, rng, serial, created_ms)

    created_hlc = hlc(created_ms, rng.integers(0, 4, size=n))
    edited = rng.random(n) < 0.4
    edit_ms = created_ms + rng.integers(1, 30 * _DAY_MS, size=n)
    row_hlc = np.where(edited, hlc(edit_ms, rng.integers(0, 4, size=n)), created_hlc)
    node_idx = rng.integers(0, len(NODES), size=n)
    # never edited: base null or 0 (brand-new); edited: derived from the created version
    base = np.where(edited, created_hlc, 0)
    base_null = ~edited & (rng.random(n) < 0.5)
    meta: dict[str, pa.Array] = {
        "_hlc": pa.array(row_hlc, pa.int64()),
        "_node": _nodes(node_idx),
        "_base_hlc": pa.array(base, pa.int64(), mask=base_null),
    }
    if field_stamps:
        ncols = len(DATA_COLUMNS)
        last_edit_col = rng.integers(0, ncols, size=n)  # the last edit wrote at least this column
        for i, col in enumerate(DATA_COLUMNS):
            touched = edited & ((rng.random(n) < 0.25) | (last_edit_col == i))
            meta[stamp_column(col)] = pa.array(np.where(touched, row_hlc, created_hlc), pa.int64())
    return _table(key, data, meta, schema(key_type=key_type, field_stamps=field_stamps))


def _edit(
    before: pa.Table,
    rng: np.random.Generator,
    *,
    new_hlc: I64,
    new_node: pa.Array,
    new_base: pa.Array,
    change_probability: float,
    created_ms: I64,
) -> pa.Table:
    """``before`` with some data columns of every row rewritten (at least one per row),
    new metadata, and the rewritten columns' stamps set to ``new_hlc``."""
    n = before.num_rows
    field_stamps = stamp_column(DATA_COLUMNS[0]) in before.schema.names
    fresh = _data(n, rng, np.arange(n, dtype=np.int64), created_ms)
    forced = rng.integers(0, len(DATA_COLUMNS), size=n)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {KEY: before.column(KEY)}
    stamps: dict[str, pa.Array | pa.ChunkedArray] = {}
    for i, col in enumerate(DATA_COLUMNS):
        changed = (rng.random(n) < change_probability) | (forced == i)
        if col == "mrn":  # the record number does not change
            changed[:] = False
        mask = pa.array(changed)
        columns[col] = pc.if_else(mask, fresh[col], before.column(col))
        if field_stamps:
            stamps[stamp_column(col)] = pc.if_else(mask, pa.array(new_hlc), before.column(stamp_column(col)))
    columns["_hlc"] = pa.array(new_hlc, pa.int64())
    columns["_node"] = new_node
    columns["_base_hlc"] = new_base
    columns.update(stamps)
    return pa.Table.from_arrays([columns[f.name] for f in before.schema], schema=before.schema)


def _created_ms(table: pa.Table) -> I64:
    return np.asarray(_i64(table.column("_hlc")) >> 16, dtype=np.int64)


def derive_changed(
    table: pa.Table,
    *,
    seed: int = 1,
    update_fraction: float = 0.10,
    delete_fraction: float = 0.02,
    insert_fraction: float = 0.02,
    node: str = LOCAL_NODE,
) -> pa.Table:
    """``table`` after local edits on ``node``: updated rows keep their position, deleted
    rows are gone, inserted rows are appended (UUIDv7 keys are time-ordered)."""
    rng = np.random.default_rng(seed)
    n = table.num_rows
    pick = rng.random(n)
    updated = pick < update_fraction
    deleted = (pick >= update_fraction) & (pick < update_fraction + delete_fraction)
    upd_idx = np.flatnonzero(updated)

    before = table.take(pa.array(upd_idx))
    old_hlc = _i64(before.column("_hlc"))
    ms = (old_hlc >> 16) + rng.integers(1, 7 * _DAY_MS, size=len(upd_idx))
    new_hlc = hlc(ms, rng.integers(0, 4, size=len(upd_idx)))
    own = pc.equal(before.column("_node"), node)
    # capture-trigger rule: continue our own chain, else derive from the received version
    new_base = pc.if_else(own, before.column("_base_hlc"), before.column("_hlc"))
    after = _edit(
        before,
        rng,
        new_hlc=new_hlc,
        new_node=pa.repeat(pa.scalar(node, pa.string()), len(upd_idx)),
        new_base=new_base.combine_chunks() if isinstance(new_base, pa.ChunkedArray) else new_base,
        change_probability=0.15,
        created_ms=_created_ms(before),
    )

    # scatter the updated rows back: position i of the table takes row pos[i] of `after`
    pos = np.full(n, -1, dtype=np.int64)
    pos[upd_idx] = np.arange(len(upd_idx))
    sel = pa.array(np.where(updated, pos, 0))
    upd_mask = pa.array(updated)
    merged = pa.Table.from_arrays(
        [pc.if_else(upd_mask, after.column(c).take(sel), table.column(c)) for c in table.schema.names],
        schema=table.schema,
    )
    kept = merged.filter(pa.array(~deleted))

    n_ins = round(n * insert_fraction)
    key_type: KeyType = "uuid16" if pa.types.is_fixed_size_binary(table.schema.field(KEY).type) else "string"
    field_stamps = stamp_column(DATA_COLUMNS[0]) in table.schema.names
    inserted = _fresh_rows(
        n_ins, rng, key_type=key_type, field_stamps=field_stamps, serial_base=_SERIAL_CHANGED + seed * n_ins,
        after_ms=int(_i64(table.column("_hlc")).max() >> 16) if n else _T0_MS, node_idx=np.zeros(n_ins, dtype=np.int64),
    )
    return pa.concat_tables([kept, inserted]).combine_chunks()


def _fresh_rows(
    n: int,
    rng: np.random.Generator,
    *,
    key_type: KeyType,
    field_stamps: bool,
    serial_base: int,
    after_ms: int,
    node_idx: npt.NDArray[np.int64],
) -> pa.Table:
    """Brand-new records (no base) created after ``after_ms`` by the given nodes."""
    serial = np.arange(serial_base, serial_base + n, dtype=np.int64)
    created_ms = after_ms + np.sort(rng.integers(1, _DAY_MS, size=n))
    row_hlc = hlc(created_ms, rng.integers(0, 4, size=n))
    meta: dict[str, pa.Array] = {
        "_hlc": pa.array(row_hlc, pa.int64()),
        "_node": _nodes(node_idx),
        "_base_hlc": pa.array(np.zeros(n, dtype=np.int64), pa.int64(), mask=rng.random(n) < 0.5),
    }
    if field_stamps:
        for col in DATA_COLUMNS:
            meta[stamp_column(col)] = pa.array(row_hlc, pa.int64())
    return _table(
        _keys(serial, created_ms, rng, key_type),
        _data(n, rng, serial, created_ms),
        meta,
        schema(key_type=key_type, field_stamps=field_stamps),
    )


def make_incoming(
    local: pa.Table,
    *,
    seed: int = 2,
    rows: int | None = None,
    update_fraction: float = 0.5,
    concurrent_fraction: float = 0.15,
    stale_fraction: float = 0.10,
    duplicate_fraction: float = 0.01,
) -> pa.Table:
    """Versions received from other nodes, for ``merge(local, incoming)``.

    ``rows`` (default ``len(local)``) versions, shuffled: ``update_fraction`` of them
    update existing local keys — of those, ``concurrent_fraction`` are concurrent edits
    (derived from the same ancestor as the local version, by another node, stamped a
    little before or after it), ``stale_fraction`` are re-deliveries of versions the
    local row already derives from, and the rest are newer versions derived from the
    local one. ``duplicate_fraction`` are later versions of keys already in the batch
    (same node, chained). The remainder are brand-new records.
    """
    rng = np.random.default_rng(seed)
    n_in = local.num_rows if rows is None else rows
    n_dup = round(n_in * duplicate_fraction)
    n_upd = min(round(n_in * update_fraction), local.num_rows)
    n_new = max(n_in - n_upd - n_dup, 0)
    key_type: KeyType = "uuid16" if pa.types.is_fixed_size_binary(local.schema.field(KEY).type) else "string"
    field_stamps = stamp_column(DATA_COLUMNS[0]) in local.schema.names

    upd_idx = np.sort(rng.choice(local.num_rows, size=n_upd, replace=False))
    before = local.take(pa.array(upd_idx))
    local_hlc = _i64(before.column("_hlc"))
    local_base = _i64(before.column("_base_hlc"))
    local_node = _node_index(before.column("_node"))

    kind = rng.random(n_upd)
    concurrent = kind < concurrent_fraction
    stale = (kind >= concurrent_fraction) & (kind < concurrent_fraction + stale_fraction)
    # remote writer: any node but ours; for concurrent edits also not the local row's writer
    remote = rng.integers(1, len(NODES), size=n_upd)
    clash = concurrent & (remote == local_node)
    remote = np.where(clash, 1 + (remote % (len(NODES) - 1)), remote)

    later_ms = (local_hlc >> 16) + rng.integers(1, 3 * _DAY_MS, size=n_upd)
    skew_ms = (local_hlc >> 16) + rng.integers(-6 * 3_600_000, 6 * 3_600_000, size=n_upd)
    counter = rng.integers(0, 4, size=n_upd)
    new_hlc = np.where(concurrent, hlc(skew_ms, counter), hlc(later_ms, counter))
    new_hlc = np.where(concurrent & (new_hlc == local_hlc), new_hlc + 1, new_hlc)
    # sequential: derived from the local version; concurrent: from the local version's ancestor
    base = np.where(concurrent, local_base, local_hlc)
    base_null = concurrent & pc.is_null(before.column("_base_hlc")).to_numpy(zero_copy_only=False)
    edited = _edit(
        before,
        rng,
        new_hlc=new_hlc,
        new_node=_nodes(remote),
        new_base=pa.array(base, pa.int64(), mask=base_null),
        change_probability=0.15,
        created_ms=_created_ms(before),
    )
    # stale re-delivery: the version the local row was derived from (by its stamp), or an
    # exact copy of the local row when it has no ancestor
    stale_hlc = np.where(local_base > 0, local_base, local_hlc)
    stale_node = np.where(local_base > 0, remote, local_node)
    stale_rows = _edit(
        before,
        rng,
        new_hlc=stale_hlc,
        new_node=_nodes(stale_node),
        new_base=pa.array(np.zeros(n_upd, dtype=np.int64), pa.int64()),
        change_probability=0.15,
        created_ms=_created_ms(before),
    )
    if field_stamps:  # an older version cannot carry newer field stamps
        stale_rows = _with_columns(
            stale_rows,
            {
                stamp_column(c): pa.array(np.minimum(_i64(stale_rows.column(stamp_column(c))), stale_hlc))
                for c in DATA_COLUMNS
            },
        )
    if field_stamps:  # a concurrent version carries its ancestor's stamps in the columns it did not write
        ceiling = np.where(concurrent & (local_base > 0), local_base, new_hlc)
        clamped: dict[str, pa.Array] = {}
        for c in DATA_COLUMNS:
            st = _i64(edited.column(stamp_column(c)))
            clamped[stamp_column(c)] = pa.array(np.where(st == new_hlc, new_hlc, np.minimum(st, ceiling)))
        edited = _with_columns(edited, clamped)
    exact = pa.array(stale & (local_base <= 0))
    stale_mask = pa.array(stale)
    updates = pa.Table.from_arrays(
        [
            pc.if_else(exact, before.column(c), pc.if_else(stale_mask, stale_rows.column(c), edited.column(c)))
            for c in local.schema.names
        ],
        schema=local.schema,
    )

    after_ms = int(_i64(local.column("_hlc")).max() >> 16) if local.num_rows else _T0_MS
    new = _fresh_rows(
        n_new, rng, key_type=key_type, field_stamps=field_stamps, serial_base=_SERIAL_INCOMING + seed * n_in,
        after_ms=after_ms, node_idx=rng.integers(1, len(NODES), size=n_new),
    )
    batch = pa.concat_tables([updates, new])

    if n_dup and batch.num_rows:
        dup_src = batch.take(pa.array(rng.integers(0, batch.num_rows, size=n_dup)))
        src_hlc = _i64(dup_src.column("_hlc"))
        dup_hlc = hlc((src_hlc >> 16) + rng.integers(1, 3_600_000, size=n_dup), 0)
        dups = _edit(
            dup_src,
            rng,
            new_hlc=dup_hlc,
            new_node=dup_src.column("_node").combine_chunks(),
            new_base=dup_src.column("_base_hlc").combine_chunks(),  # same node: continues its chain
            change_probability=0.1,
            created_ms=src_hlc >> 16,
        )
        batch = pa.concat_tables([batch, dups])

    perm = rng.permutation(batch.num_rows)
    return batch.take(pa.array(perm)).combine_chunks()


def _with_columns(table: pa.Table, replace: dict[str, pa.Array]) -> pa.Table:
    return pa.Table.from_arrays(
        [replace.get(name, table.column(name)) for name in table.schema.names], schema=table.schema
    )


def subsample_merge(local: pa.Table, incoming: pa.Table, rows: int, *, seed: int = 3) -> tuple[pa.Table, pa.Table]:
    """A proportional subsample of a merge input: ``rows`` random incoming versions (with
    every other version of their keys), their local rows, and as many unrelated local rows
    as keeps the local/incoming size ratio."""
    if rows >= incoming.num_rows:
        return local, incoming
    rng = np.random.default_rng(seed)
    picked = incoming.take(pa.array(np.sort(rng.choice(incoming.num_rows, size=rows, replace=False))))
    keys = pc.unique(picked.column(KEY))
    sub_in = incoming.filter(pc.is_in(incoming.column(KEY), value_set=keys))
    matched = pc.is_in(local.column(KEY), value_set=keys).to_numpy(zero_copy_only=False)
    want_local = round(local.num_rows * sub_in.num_rows / incoming.num_rows)
    extra = max(want_local - int(matched.sum()), 0)
    others = np.flatnonzero(~matched)
    chosen = np.zeros(local.num_rows, dtype=bool)
    chosen[matched] = True
    chosen[rng.choice(others, size=min(extra, len(others)), replace=False)] = True
    return local.filter(pa.array(chosen)).combine_chunks(), sub_in.combine_chunks()


def make_changes(rows: int, *, seed: int = 4, nodes: int = 8, key_type: KeyType = "string") -> pa.Table:
    """A change log ``{_hlc, _node, _table, id}`` as a server receives it: the logs of
    several nodes concatenated, each strictly increasing in its own clock, with equal
    stamps across nodes; a key changes several times. ``(_hlc, _node)`` is unique."""
    rng = np.random.default_rng(seed)
    node_idx = np.sort(rng.integers(0, nodes, size=rows))
    names = pa.array([NODES[i] if i < len(NODES) else f"node-{i}" for i in range(nodes)], pa.string())
    ms = _T0_MS + rng.integers(0, _DAY_MS, size=rows) // 1000 * 1000  # second-granular: ties across nodes
    ms = ms[np.lexsort((ms, node_idx))]  # each node's log in its own clock order
    # a node's stamps strictly increase: s_i = max(raw_i, s_{i-1} + 1), restarted per node
    group = node_idx.astype(np.int64) << 52
    i = np.arange(rows, dtype=np.int64)
    stamps = np.maximum.accumulate(hlc(ms) + group - i) + i - group
    distinct = max(rows // 3, 1)
    uniq = _keys(np.arange(distinct, dtype=np.int64), np.full(distinct, _T0_MS, dtype=np.int64), rng, key_type)
    return pa.table(
        {
            "_hlc": pa.array(stamps, pa.int64()),
            "_node": names.take(pa.array(node_idx)),
            "_table": _VOCAB_TABLES.take(pa.array(rng.integers(0, len(TABLES), size=rows))),
            KEY: uniq.take(pa.array(rng.integers(0, distinct, size=rows))),
        }
    )
