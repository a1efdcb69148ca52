"""Verify a node against the central server, and repair what differs, without re-syncing.

``tidesync verify --db NODE [--repair]`` (docs/protocol.md "Verify"; the operator's view
in docs/operations.md "Verify and repair"). For each table central sends to nodes:

1. **node**: in one snapshot of its database, the keys it changed since its push cursor
   (its *pending* keys: the next push carries them) go to ``POST /v1/verify/digest``
   with its pull cursor; meanwhile it reads its other live rows and hashes them (the
   Rust core's ``row_hashes`` over every wire column: data and stamps);
2. **central**: reads the node's scope as the node holds it after its last pull
   (:func:`tidesync.sync.scope.snapshot_sql` as of the node's pull cursor: rows changed
   at central since then are on their way to the node and left out) minus the node's
   pending keys, and answers with its range digest (row count and hash sum per bucket);
3. **node**: folds its own hashes into the same buckets and compares; for the buckets
   that differ it asks ``POST /v1/verify/rows`` for central's row hashes, and compares
   row by row: the candidates;
4. **node**: asks ``POST /v1/verify/keys`` what central holds now for each candidate
   (live with its hash, deleted, never had, held in its quarantine, outside the node's
   scope, changed since the pull cursor) and classifies: ``differs``,
   ``missing_here``, ``only_here``, ``out_of_scope`` (pending ones are dropped);
5. **repair** (``--repair``): fetches central's versions of those keys
   (``POST /v1/verify/fetch``, an Arrow IPC page) and writes them verbatim, bypassing the
   merge (stamps can be equal while values differ), marked as coming from central
   (``_origin``) so the next push does not send them back; a row central never had is
   kept whole in the node's quarantine with the reason, then removed. One transaction
   on the node, after checking that none of those rows changed here meanwhile.

Only digests, the row hashes of differing buckets and a few keys cross the network,
never rows (except the few a repair writes); the node's and central's reads overlap.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tidesync.changes import (
    NO_OPTIONS,
    ApplyPlan,
    TableApplyStats,
    _storage,
    conform,
    key_texts,
    keys_from_texts,
    new_rows,
    with_origin,
)
from tidesync.core import row_hashes
from tidesync.errors import ProtocolError, SchemaMismatchError, SyncError
from tidesync.pg.capture import snapshot_watermark, wire_columns
from tidesync.pg.install import SCHEMA, qi, ql, tomb_table
from tidesync.registry import BASE_HLC, DELETED, HLC, NODE, LogicalType, Registry, TableSpec
from tidesync.sync import scope
from tidesync.sync.protocol import (
    CENTRAL_PEER,
    ForbiddenError,
    PayloadTooLargeError,
    SessionError,
    decode_page,
    encode_page,
    fingerprint,
)

if TYPE_CHECKING:
    from tidesync.pg.store import PostgresStore
    from tidesync.sqlite.store import SQLiteStore
    from tidesync.store import Store
    from tidesync.sync.central import Node
    from tidesync.sync.client import CentralClient

#: Schema metadata key of a verify message (JSON): the parameters next to the Arrow data.
META_KEY = b"tidesync.verify"
#: Rows per bucket the node aims for. Bytes moved are about ``10 B × rows / this`` up
#: (the digest) plus ``24 B × this`` per differing row down (its bucket's row hashes).
ROWS_PER_BUCKET = 256
#: At most this many buckets (about 1.2 MB of digest up, compressed).
MAX_BUCKETS = 1 << 17
#: Row hashes are computed once at this resolution; coarser buckets are prefixes.
HASH_BUCKETS = 1 << 31
#: Pending keys (changed on one side since the last sync) a verify works around, per
#: table and side. Beyond that the node should sync first: its digests would mostly
#: show what the next cycle carries anyway.
MAX_PENDING = 10_000
#: Keys per ``/v1/verify/keys`` or ``/v1/verify/fetch`` request.
MAX_KEYS = 10_000
#: Row hashes central sends back at most for one table: beyond that the copies are too
#: far apart to compare row by row (re-seed the node instead).
MAX_DRILL_ROWS = 2_000_000

#: What central holds for a key (``/v1/verify/keys``).
LIVE, DELETED_AT_CENTRAL, ABSENT, QUARANTINED, OUT_OF_SCOPE, PENDING = (
    "live", "deleted", "absent", "quarantined", "out_of_scope", "pending")  # fmt: skip
#: Kinds of difference a verify reports.
DIFFERS, MISSING_HERE, ONLY_HERE = "differs", "missing_here", "only_here"
KINDS = (DIFFERS, MISSING_HERE, ONLY_HERE, OUT_OF_SCOPE)

#: The reason a repair gives a row it removes because central never had it.
STRAY_REASON = (
    "verify --repair: only on this node; central has never had this row (nor a deletion of it), so it was "
    "written past the sync engine (triggers off, a restore, a manual fix). Kept here whole and removed from "
    "the table: `tidesync quarantine retry ID` puts it back as a local change (the next sync pushes it), "
    "`tidesync quarantine discard ID --note ...` drops it"
)

Progress = Callable[[str, int, int], None]


def verifiable(spec: TableSpec) -> bool:
    """Tables central sends to nodes; push-only logs and attachments leave the node, so
    there is no copy of them to compare."""
    return spec.direction.pulls


def digest_columns(spec: TableSpec) -> list[str]:
    """The columns folded into a row hash besides the key: every wire column (data,
    ``_hlc``, ``_node``, ``_base_hlc``, field stamps) but ``_deleted`` (always false on
    a live row). A value changed behind the engine's back with its stamps untouched
    changes the hash."""
    return [f.name for f in spec.wire_schema() if f.name not in (spec.key, DELETED)]


def hash_rows(spec: TableSpec, rows: pa.Table, buckets: int = HASH_BUCKETS) -> pa.Table:
    """``{key, bucket, hash}`` of live wire rows (conformed: both sides hash identical
    Arrow types for identical values, whatever database they came from)."""
    return row_hashes(rows, spec.key, buckets, digest_columns(spec))


def choose_buckets(rows: int) -> int:
    """A power of two giving about :data:`ROWS_PER_BUCKET` rows per bucket."""
    want = max(1, math.ceil(rows / ROWS_PER_BUCKET))
    return min(MAX_BUCKETS, 1 << (want - 1).bit_length())


def bucket_sums(buckets: np.ndarray[Any, Any], hashes: np.ndarray[Any, Any], n: int) -> tuple[
        np.ndarray[Any, Any], np.ndarray[Any, Any]]:  # fmt: skip
    """Rows and wrapping hash sums per bucket (what ``tidesync.digest`` computes), from
    row hashes already at hand."""
    rows = np.bincount(buckets, minlength=n).astype(np.uint32)
    sums = np.zeros(n, dtype=np.uint64)
    np.add.at(sums, buckets, hashes)  # uint64 wraps: the same sums as the core's
    return rows, sums


def encode_message(table: pa.Table, meta: Mapping[str, Any]) -> bytes:
    """A verify message: Arrow IPC (zstd) with the parameters as JSON in the schema metadata."""
    schema = table.schema.with_metadata({META_KEY: json.dumps(meta).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table.replace_schema_metadata(schema.metadata))
    return bytes(sink.getvalue().to_pybytes())


def decode_message(data: bytes, what: str) -> tuple[pa.Table, dict[str, Any]]:
    """The table and parameters of a verify message, or :class:`ProtocolError`."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ProtocolError(f"{what} is not a readable Arrow IPC stream ({str(exc).splitlines()[0]})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    try:
        meta = json.loads(raw) if raw is not None else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise ProtocolError(f"{what} has no JSON parameters in its schema metadata ({META_KEY.decode()!r})")
    return table.replace_schema_metadata(None), meta


# ----------------------------------------------------------------------------- central side


def _param(body: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ProtocolError(f"{what} needs {name!r} ({kind.__name__}), got {value!r}")
    return value


def _request(store: PostgresStore, node: Node, body: Mapping[str, Any], what: str) -> TableSpec:
    """The table a verify request is about, after checking the schema and that the node
    may hold the table's rows at all."""
    registry = store.registry
    ours = fingerprint(registry)
    if body.get("fingerprint") != ours:
        raise SchemaMismatchError(
            f"schema mismatch: node {node.id!r} has fingerprint {body.get('fingerprint')!r}, central has {ours}; "
            "verify compares like with like: run the same schema version on both"
        )
    spec = registry[_param(body, "table", str, what)]  # an unknown table: SchemaMismatchError naming the known
    if not verifiable(spec):
        raise ForbiddenError(
            f"table {spec.name!r} is {spec.direction.value}: central never sends it to nodes, so there is no copy "
            "of it to verify"
        )
    return spec


def _keys_param(spec: TableSpec, body: Mapping[str, Any], name: str, what: str, limit: int) -> pa.Array:
    texts = body.get(name, [])
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ProtocolError(f"{what}: {name!r} must be a list of keys as text")
    if len(texts) > limit:
        raise PayloadTooLargeError(f"{what}: {len(texts)} keys in {name!r}, at most {limit} per request")
    return keys_from_texts(spec, texts)


def _in_list(spec: TableSpec, keys: pa.Array, alias: str = "t") -> str:
    """SQL: the key column is one of ``keys`` (at most :data:`MAX_KEYS` literals)."""
    texts = key_texts(spec, keys)
    if not texts:
        return "false"
    listed = ", ".join(ql(k) for k in texts)
    return f"{alias}.{qi(spec.key)} = ANY(ARRAY[{listed}]::{spec.column(spec.key).type.pg}[])"


def _pending_at_central(cur: Any, registry: Registry, spec: TableSpec, node: Node, since: int, limit: int) -> int:
    """Rows (and deletions) at central changed at or after ``since`` that could be the
    node's: what its next pull carries (counted up to ``limit + 1``)."""
    ever = scope.scope_condition(registry, spec, node, ever=True)
    changed = f"t._cursor >= '{int(since)}'::xid8"
    cur.execute(
        f"SELECT (SELECT count(*) FROM (SELECT 1 FROM {qi(spec.name)} t WHERE {changed} AND {ever} "
        f"LIMIT {limit + 1}) a) + (SELECT count(*) FROM (SELECT 1 FROM {tomb_table(spec)} t WHERE {changed} "
        f"LIMIT {limit + 1}) b)"
    )
    return int(cur.fetchone()[0])


def _cursor_param(body: Mapping[str, Any], what: str) -> int:
    pull_cursor = _param(body, "pull_cursor", int, what)
    if pull_cursor < 0:
        raise ProtocolError(f"{what}: pull_cursor must be 0 or more")
    return int(pull_cursor)


def _buckets_param(body: Mapping[str, Any], what: str) -> int:
    buckets = _param(body, "buckets", int, what)
    if buckets < 1 or buckets > MAX_BUCKETS or buckets & (buckets - 1):
        raise ProtocolError(f"{what}: buckets must be a power of two from 1 to {MAX_BUCKETS}, got {buckets}")
    return int(buckets)


def _check_pending(cur: Any, registry: Registry, spec: TableSpec, node: Node, pull_cursor: int) -> int:
    pending = _pending_at_central(cur, registry, spec, node, pull_cursor, MAX_PENDING)
    if pending > MAX_PENDING:
        raise SessionError(
            f"central has more than {MAX_PENDING} changes of {spec.name} that node {node.id!r} has not pulled "
            f"yet (its pull cursor is {pull_cursor}): run `tidesync sync` on the node first, then verify"
        )
    return pending


def serve_digest(store: PostgresStore, node: Node, body: Mapping[str, Any]) -> bytes:
    """``POST /v1/verify/digest``: central's range digest of its copy of one table of the
    node's scope, as the node holds it after its last pull.

    The request is JSON ``{table, pull_cursor, exclude: [keys], fingerprint}`` (and
    optionally ``buckets``; by default central picks about :data:`ROWS_PER_BUCKET` rows
    per bucket). Rows changed at central since ``pull_cursor`` (on their way to the
    node) and the node's own pending keys (``exclude``) are left out. The answer is Arrow
    IPC ``{rows: uint32, hash: uint64}``, one row per bucket, with ``{table, buckets,
    rows, watermark, pending}`` in the metadata.
    """
    what = "verify digest request"
    spec = _request(store, node, body, what)
    pull_cursor = _cursor_param(body, what)
    exclude = _keys_param(spec, body, "exclude", what, MAX_PENDING)
    asked = _buckets_param(body, what) if body.get("buckets") is not None else None
    registry = store.registry
    from tidesync.pg.conn import transaction

    parts: list[pa.Table] = []
    with transaction(store.connection, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY") as cur:
        watermark = snapshot_watermark(cur)
        pending = _check_pending(cur, registry, spec, node, pull_cursor)
        # The node's scope as it holds it after its last pull: rows changed at central
        # since then are on their way to it (pending) and left out, on both sides.
        cur.execute(scope.snapshot_sql(registry, spec, node, pull_cursor))
        for batch in cur.fetch_record_batch():
            if batch.num_rows == 0:
                continue
            rows = conform(batch, spec, "central rows")
            if len(exclude):
                rows = rows.filter(pc.invert(pc.is_in(rows.column(spec.key), value_set=exclude)))
            parts.append(hash_rows(spec, rows).select(["bucket", "hash"]))
    n = sum(t.num_rows for t in parts)
    buckets = asked or choose_buckets(n)
    shift = np.uint32(31 - (buckets.bit_length() - 1))
    b = np.concatenate([t.column("bucket").to_numpy() for t in parts]) if parts else np.zeros(0, np.uint32)
    h = np.concatenate([t.column("hash").to_numpy() for t in parts]) if parts else np.zeros(0, np.uint64)
    rows_c, sums_c = bucket_sums(b >> shift, h, buckets)
    meta = {"table": spec.name, "buckets": buckets, "rows": n, "watermark": watermark, "pending": pending}
    return encode_message(pa.table({"rows": pa.array(rows_c), "hash": pa.array(sums_c)}), meta)


def serve_rows(store: PostgresStore, node: Node, body: Mapping[str, Any]) -> bytes:
    """``POST /v1/verify/rows``: central's row hashes of the rows of some buckets (the
    ones whose digests differ), in the same scope as :func:`serve_digest`.

    The request is JSON ``{table, pull_cursor, exclude, buckets, differing: [bucket
    numbers], fingerprint}``; the answer Arrow IPC ``{<key>, hash}`` with ``{table,
    rows}`` in the metadata. Central first reads only the keys of the node's scope (to
    find which rows fall in those buckets), then the whole rows of just those keys.
    """
    what = "verify rows request"
    spec = _request(store, node, body, what)
    pull_cursor = _cursor_param(body, what)
    exclude = _keys_param(spec, body, "exclude", what, MAX_PENDING)
    buckets = _buckets_param(body, what)
    differing = body.get("differing")
    if not isinstance(differing, list) or not all(isinstance(x, int) and 0 <= x < buckets for x in differing):
        raise ProtocolError(f"{what}: 'differing' must be a list of bucket numbers from 0 to {buckets - 1}")
    registry = store.registry
    k = qi(spec.key)
    from tidesync.pg import apply as pg_apply
    from tidesync.pg.conn import transaction

    # Not READ ONLY: the keys are staged in a temporary table (nothing else is written).
    with transaction(store.connection, "BEGIN ISOLATION LEVEL REPEATABLE READ") as cur:
        _check_pending(cur, registry, spec, node, pull_cursor)
        cur.execute(f"SELECT s.{k} FROM ({scope.snapshot_sql(registry, spec, node, pull_cursor)}) s")
        keys = pa.table({spec.key: _as_keys(spec, cur.fetch_arrow_table().column(0))})
        if len(exclude):
            keys = keys.filter(pc.invert(pc.is_in(keys.column(spec.key), value_set=exclude)))
        at = row_hashes(keys, spec.key, buckets, []).column("bucket").to_numpy()
        keys = keys.filter(pa.array(np.isin(at, np.array(differing, dtype=np.int64))))
        if keys.num_rows > MAX_DRILL_ROWS:
            raise PayloadTooLargeError(
                f"{keys.num_rows} rows of {spec.name} at central fall in the {len(differing)} of {buckets} buckets "
                "that differ: too far apart to compare row by row. If the node was offline long, run `tidesync "
                "sync` first; otherwise rebuild it from central (a seed) instead of repairing"
            )
        pg_apply._stage(cur, spec, keys, key_only=True)
        cur.execute(f"SELECT {wire_columns(spec, 't', tombstone=False)} FROM {qi(spec.name)} t "
                    f"JOIN {pg_apply.KEYS} s ON t.{k} = s.{k}")  # fmt: skip
        rows = conform(cur.fetch_arrow_table(), spec, "central rows")
    out = hash_rows(spec, rows).select([spec.key, "hash"])
    return encode_message(out, {"table": spec.name, "rows": out.num_rows})


def serve_keys(store: PostgresStore, node: Node, body: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /v1/verify/keys``: what central holds now for each key, as the node may
    know it: ``live`` (with its row hash), ``deleted``, ``absent``, ``quarantined``
    (refused by central's database, held there), ``out_of_scope`` (a row the node may
    not have: never its data), or ``pending`` (changed at or after the node's pull
    cursor: the next pull brings it)."""
    what = "verify keys request"
    spec = _request(store, node, body, what)
    keys = _keys_param(spec, body, "keys", what, MAX_KEYS)
    pull_cursor = _cursor_param(body, what)
    registry = store.registry
    states: dict[str, dict[str, Any]] = {}
    from tidesync.pg.conn import transaction

    with transaction(store.connection, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY") as cur:
        watermark = snapshot_watermark(cur)
        since = f"'{int(pull_cursor)}'::xid8"
        cur.execute(
            f"SELECT {wire_columns(spec, 't', tombstone=False)}, t._cursor >= {since} AS _v_pending, "
            f"({scope.scope_condition(registry, spec, node)}) AS _v_scope FROM {qi(spec.name)} t "
            f"WHERE {_in_list(spec, keys)}"
        )
        live = cur.fetch_arrow_table()
        flags = live.select(["_v_pending", "_v_scope"]).to_pylist()
        live = conform(live.drop_columns(["_v_pending", "_v_scope"]), spec, "central rows")
        texts = key_texts(spec, live.column(spec.key))
        hashes = hash_rows(spec, live).column("hash").to_pylist() if live.num_rows else []
        for k, f, h in zip(texts, flags, hashes, strict=True):
            if not f["_v_scope"]:
                states[k] = {"state": OUT_OF_SCOPE}
            elif f["_v_pending"]:
                states[k] = {"state": PENDING}
            else:
                states[k] = {"state": LIVE, "hash": f"{h:016x}"}
        cur.execute(f"SELECT t.{qi(spec.key)}::text, t._cursor >= {since} FROM {tomb_table(spec)} t "
                    f"WHERE {_in_list(spec, keys)}")  # fmt: skip
        for k, pending in cur.fetchall():
            states.setdefault(str(k), {"state": PENDING if pending else DELETED_AT_CENTRAL})
        rest = [k for k in key_texts(spec, keys) if k not in states]
        if rest:
            listed = ", ".join(ql(k) for k in rest)
            cur.execute(f"SELECT DISTINCT key FROM {SCHEMA}.quarantine WHERE table_name = {ql(spec.name)} "
                        f"AND status = 'held' AND key = ANY(ARRAY[{listed}]::text[])")  # fmt: skip
            for (k,) in cur.fetchall():
                states[str(k)] = {"state": QUARANTINED}
    out = [{"key": k, **states.get(k, {"state": ABSENT})} for k in key_texts(spec, keys)]
    return {"table": spec.name, "keys": out, "watermark": watermark}


def serve_fetch(store: PostgresStore, node: Node, body: Mapping[str, Any]) -> bytes:
    """``POST /v1/verify/fetch``: central's current versions of ``keys`` (live rows in
    the node's scope, or tombstones), as one page; keys central never had are simply
    not in it. A live row outside the node's scope refuses the request
    (:class:`ForbiddenError`): a node only ever gets rows of its own scope."""
    what = "verify fetch request"
    spec = _request(store, node, body, what)
    keys = _keys_param(spec, body, "keys", what, MAX_KEYS)
    registry = store.registry
    from tidesync.pg.conn import transaction

    with transaction(store.connection, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY") as cur:
        cur.execute(
            f"SELECT {wire_columns(spec, 't', tombstone=False)}, ({scope.scope_condition(registry, spec, node)}) "
            f"AS _v_scope FROM {qi(spec.name)} t WHERE {_in_list(spec, keys)}"
        )
        got = cur.fetch_arrow_table()
        live = conform(got.drop_columns(["_v_scope"]), spec, "central rows")
        outside = pc.invert(got.column("_v_scope"))
        if live.num_rows and pc.any(outside).as_py():
            few = key_texts(spec, live.column(spec.key).filter(outside))[:5]
            raise ForbiddenError(
                f"{pc.sum(outside).as_py()} of the {spec.name} rows asked for are outside node {node.id!r}'s scope "
                f"(out of scope: {few}): central sends a node only rows of its own scope"
            )
        k = qi(spec.key)
        cur.execute(
            f"SELECT {wire_columns(spec, 't', tombstone=True)} FROM {tomb_table(spec)} t WHERE {_in_list(spec, keys)} "
            f"AND NOT EXISTS (SELECT 1 FROM {qi(spec.name)} l WHERE l.{k} = t.{k})"
        )
        dead = conform(cur.fetch_arrow_table(), spec, "central tombstones")
    return encode_page(spec.name, pa.concat_tables([live, dead]))


# ----------------------------------------------------------------------------- the report


@dataclass
class Difference:
    """One key whose copies differ (or that the node holds outside its scope)."""

    key: str
    #: ``differs``, ``missing_here``, ``only_here`` or ``out_of_scope``.
    kind: str
    #: What central holds: ``live``, ``deleted``, ``absent``, ``quarantined``, ``out_of_scope``.
    central: str
    #: What a repair did with it (empty when not repairing).
    repair: str = ""


@dataclass
class TableReport:
    table: str
    rows_here: int = 0
    rows_central: int = 0
    buckets: int = 0
    differing_buckets: int = 0
    #: Keys changed here since the last push (left out on both sides).
    pending_here: int = 0
    #: Candidates that central had changed since this node's last pull (left out).
    pending_central: int = 0
    differences: list[Difference] = field(default_factory=list)
    #: Of a repair: rows written from central's copy, rows deleted (central's
    #: tombstone), rows kept in the quarantine and removed, rows left alone.
    written: int = 0
    deleted: int = 0
    quarantined: int = 0
    skipped: int = 0
    #: Central's versions this database refused while repairing (now in its quarantine).
    refused: int = 0
    #: Quarantine entries holding the rows this repair removed (central never had them).
    quarantine_ids: list[int] = field(default_factory=list)

    def keys(self, kind: str) -> set[str]:
        return {d.key for d in self.differences if d.kind == kind}


@dataclass
class VerifyReport:
    """What ``tidesync verify`` found (and repaired); ``--json`` prints :meth:`as_dict`."""

    node: str
    repair: bool = False
    tables: list[TableReport] = field(default_factory=list)
    pull_cursor: int = 0
    watermark: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def keys(self, kind: str, table: str | None = None) -> set[str]:
        """Keys of one kind (``differs``, ``missing_here``, ``only_here``, ``out_of_scope``)."""
        return {k for t in self.tables if table in (None, t.table) for k in t.keys(kind)}

    @property
    def differences(self) -> int:
        """Differences that are corruption: everything but rows outside the node's scope."""
        return sum(1 for t in self.tables for d in t.differences if d.kind != OUT_OF_SCOPE)

    @property
    def unrepaired(self) -> int:
        """Differences still there after this run (all of them when not repairing)."""
        done = ("written", "deleted", "quarantined")
        left = sum(1 for t in self.tables for d in t.differences
                   if d.kind != OUT_OF_SCOPE and not d.repair.startswith(done))
        return left + sum(t.refused for t in self.tables)

    @property
    def clean(self) -> bool:
        return self.differences == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "differences": self.differences, "unrepaired": self.unrepaired, "clean": self.clean,
                "rows_here": sum(t.rows_here for t in self.tables)}  # fmt: skip


# ----------------------------------------------------------------------------- the node's database


class _Snapshot(Protocol):
    """Reads of one consistent snapshot of the node's database."""

    def cursors(self) -> tuple[int, int]:
        """(push cursor, pull cursor)."""

    def pending(self, spec: TableSpec, push: int) -> pa.Array:
        """Keys (live or deleted) changed here at or after ``push`` and not pulled from central."""

    def rows(self, spec: TableSpec) -> Iterator[pa.Table]:
        """Every live row of the table, in the wire schema, a batch at a time."""


class _RepairTxn(Protocol):
    """The statements of a repair, inside one write transaction of the node's database."""

    def current(self, spec: TableSpec, keys: pa.Array) -> pa.Table:
        """The local versions of ``keys`` (live rows, else tombstones; wire schema), locked."""

    def remove_stray(self, spec: TableSpec, rows: pa.Table) -> list[int]:
        """Keep live wire ``rows`` in the quarantine (reason :data:`STRAY_REASON`), then
        delete them without a tombstone; returns the quarantine entry ids."""

    def upsert(self, spec: TableSpec, plan: ApplyPlan, stats: TableApplyStats) -> None:
        """Write ``plan.inserts`` / ``plan.updates`` as they are (parents come first)."""

    def delete(self, spec: TableSpec, plan: ApplyPlan, stats: TableApplyStats) -> None:
        """Delete the live rows of ``plan.deletes`` and record those tombstones (children first)."""

    def finish(self) -> None: ...


class _NodeDb(Protocol):
    def snapshot(self) -> contextlib.AbstractContextManager[_Snapshot]: ...

    def repair(self) -> contextlib.AbstractContextManager[_RepairTxn]: ...


def _node_db(store: Store) -> _NodeDb:
    from tidesync.pg.store import PostgresStore
    from tidesync.sqlite.store import SQLiteStore

    if isinstance(store, PostgresStore):
        return _PgNode(store)
    if isinstance(store, SQLiteStore):
        return _SqliteNode(store)
    raise SyncError(f"verify works on PostgreSQL and SQLite nodes, not {type(store).__name__}")


def _empty_keys(spec: TableSpec) -> pa.Array:
    return pa.array([], spec.column(spec.key).type.arrow)


def _as_keys(spec: TableSpec, col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A key column as read (ADBC gives uuids an extension type) in the key's wire type."""
    arr = _storage(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    want = spec.column(spec.key).type.arrow
    return arr if arr.type == want else arr.cast(want)


class _PgNode:
    """A facility server (PostgreSQL): reads in one REPEATABLE READ snapshot; a repair
    runs as an apply does (``tidesync.applying`` on: the capture triggers stand aside,
    deletes leave no tombstone of their own) with the writers of :mod:`tidesync.pg.apply`."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[_Snapshot]:
        from tidesync.pg.conn import transaction

        with transaction(self.store.connection, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY") as cur:
            yield _PgSnapshot(cur)

    @contextlib.contextmanager
    def repair(self) -> Iterator[_RepairTxn]:
        from tidesync.pg import apply as pg_apply
        from tidesync.pg.conn import transaction

        with transaction(self.store.connection) as cur:
            pg_apply._apply_settings(cur)
            txn = _PgRepair(cur)
            yield txn


class _PgSnapshot:
    def __init__(self, cur: Any) -> None:
        self.cur = cur

    def cursors(self) -> tuple[int, int]:
        from tidesync.sync.client import PULL_CURSOR, PUSH_CURSOR

        names = f"{ql(PUSH_CURSOR)}, {ql(PULL_CURSOR)}"
        self.cur.execute(f"SELECT name, value FROM {SCHEMA}.cursors WHERE name IN ({names})")
        got = {str(n): int(v) for n, v in self.cur.fetchall()}
        return got.get(PUSH_CURSOR, 0), got.get(PULL_CURSOR, 0)

    def pending(self, spec: TableSpec, push: int) -> pa.Array:
        where = f"t._cursor >= '{int(push)}'::xid8 AND t._origin IS DISTINCT FROM {ql(CENTRAL_PEER)}"
        k = qi(spec.key)
        self.cur.execute(f"SELECT t.{k} FROM {qi(spec.name)} t WHERE {where} "
                         f"UNION SELECT t.{k} FROM {tomb_table(spec)} t WHERE {where}")  # fmt: skip
        col = self.cur.fetch_arrow_table().column(0)
        return _as_keys(spec, col) if len(col) else _empty_keys(spec)

    def rows(self, spec: TableSpec) -> Iterator[pa.Table]:
        self.cur.execute(f"SELECT {wire_columns(spec, 't', tombstone=False)} FROM {qi(spec.name)} t")
        for batch in self.cur.fetch_record_batch():
            if batch.num_rows:
                yield conform(batch, spec, "local rows")


class _PgRepair:
    def __init__(self, cur: Any) -> None:
        self.cur = cur

    def current(self, spec: TableSpec, keys: pa.Array) -> pa.Table:
        from tidesync.pg.apply import read_local

        return read_local(self.cur, spec, pa.chunked_array([keys]), lock=True)

    def remove_stray(self, spec: TableSpec, rows: pa.Table) -> list[int]:
        from tidesync.pg import apply as pg_apply

        cur = self.cur
        cur.execute(f"SELECT coalesce(max(id), 0) FROM {SCHEMA}.quarantine")
        mark = int(cur.fetchone()[0])
        pg_apply._quarantine(cur, spec, rows, [(STRAY_REASON, i) for i in range(rows.num_rows)], None, NO_OPTIONS)
        pg_apply._stage(cur, spec, pa.table({spec.key: rows.column(spec.key)}), key_only=True)
        k = qi(spec.key)
        cur.execute(f"DELETE FROM {qi(spec.name)} t USING {pg_apply.KEYS} s WHERE t.{k} = s.{k}")
        # A row still referenced fails here, by name, rather than in a later write.
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cur.execute("SET CONSTRAINTS ALL DEFERRED")
        cur.execute(f"SELECT id FROM {SCHEMA}.quarantine WHERE id > {mark} AND table_name = {ql(spec.name)} "
                    f"AND reason = {ql(STRAY_REASON)} ORDER BY id")  # fmt: skip
        return [int(r[0]) for r in cur.fetchall()]

    def upsert(self, spec: TableSpec, plan: ApplyPlan, stats: TableApplyStats) -> None:
        from tidesync.pg import apply as pg_apply

        cur = self.cur
        write = pg_apply._write
        stats.inserted += write(cur, spec, plan.inserts, CENTRAL_PEER, NO_OPTIONS, stats, pg_apply._insert_rows)
        if len(plan.revived):
            pg_apply._stage(cur, spec, pa.table({spec.key: plan.revived}), key_only=True)
            k = qi(spec.key)
            cur.execute(f"DELETE FROM {tomb_table(spec)} t USING {pg_apply.KEYS} s WHERE t.{k} = s.{k}")
        stats.updated += write(cur, spec, plan.updates, CENTRAL_PEER, NO_OPTIONS, stats, pg_apply._update_rows)

    def delete(self, spec: TableSpec, plan: ApplyPlan, stats: TableApplyStats) -> None:
        from tidesync.pg import apply as pg_apply

        stats.deleted += pg_apply._write(self.cur, spec, plan.deletes, CENTRAL_PEER, NO_OPTIONS, stats,
                                         pg_apply._delete_rows)  # fmt: skip

    def finish(self) -> None:
        self.cur.execute("SET CONSTRAINTS ALL IMMEDIATE")


class _SqliteNode:
    """A mobile device (SQLite): reads in one read transaction; a repair is one
    ``BEGIN IMMEDIATE`` transaction using the writers of :mod:`tidesync.sqlite.apply`
    (rows carry a fresh change counter, which keeps the capture triggers out)."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.conn = store._conn  # the store's own connection: one SQLite library per process

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[_Snapshot]:
        with self.conn.transaction("DEFERRED"):
            yield _SqliteSnapshot(self.conn)

    @contextlib.contextmanager
    def repair(self) -> Iterator[_RepairTxn]:
        infos = self.store._table_infos()
        with self.conn.transaction("IMMEDIATE"):
            txn = _SqliteRepair(self.conn, infos)
            yield txn


class _SqliteSnapshot:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def cursors(self) -> tuple[int, int]:
        from tidesync.sqlite import names
        from tidesync.sqlite.conn import quote
        from tidesync.sync.client import PULL_CURSOR, PUSH_CURSOR

        got = {str(n): int(v) for n, v in self.conn.rows(f"SELECT name, value FROM {quote(names.CURSORS)}")}
        return got.get(PUSH_CURSOR, 0), got.get(PULL_CURSOR, 0)

    def pending(self, spec: TableSpec, push: int) -> pa.Array:
        from tidesync.sqlite import names
        from tidesync.sqlite.conn import quote
        from tidesync.sqlite.types import from_storage

        k = quote(spec.key)
        where = "_cursor >= ? AND _origin IS NOT ?"
        got = self.conn.arrow(f"SELECT {k} FROM {quote(spec.name)} WHERE {where} UNION "
                              f"SELECT {k} FROM {quote(names.tombstones(spec.name))} WHERE {where}",
                              [int(push), CENTRAL_PEER, int(push), CENTRAL_PEER])  # fmt: skip
        if got.num_rows == 0:
            return _empty_keys(spec)
        return from_storage(got.column(0), spec.column(spec.key).type, f"{spec.name}.{spec.key}")

    def rows(self, spec: TableSpec) -> Iterator[pa.Table]:
        from tidesync.sqlite.capture import select_columns, to_wire
        from tidesync.sqlite.conn import quote

        stored = self.conn.arrow(f"SELECT {', '.join(quote(c) for c in select_columns(spec))} FROM {quote(spec.name)}")
        if stored.num_rows:
            yield to_wire(spec, stored)


class _SqliteRepair:
    def __init__(self, conn: Any, infos: Mapping[str, Any]) -> None:
        from tidesync.sqlite import apply as sq_apply
        from tidesync.sqlite import names
        from tidesync.sqlite.conn import quote

        self.conn, self.infos = conn, infos
        conn.execute("PRAGMA defer_foreign_keys = ON")
        conn.execute(f"UPDATE {quote(names.CLOCK)} SET value = value + 1")
        self.change = int(conn.scalar(f"SELECT value FROM {quote(names.CLOCK)}"))
        self.refused = sq_apply._Quarantined(CENTRAL_PEER, NO_OPTIONS)
        self.children: dict[str, Any] | None = None

    def current(self, spec: TableSpec, keys: pa.Array) -> pa.Table:
        from tidesync.sqlite.apply import read_local

        return read_local(self.conn, spec, pa.table({spec.key: keys}))

    def remove_stray(self, spec: TableSpec, rows: pa.Table) -> list[int]:
        from tidesync.sqlite import apply as sq_apply
        from tidesync.sqlite import names
        from tidesync.sqlite.conn import quote

        mark = int(self.conn.scalar(f"SELECT coalesce(max(id), 0) FROM {quote(names.QUARANTINE)}"))
        kept = sq_apply._Quarantined(None, NO_OPTIONS)
        kept.add(spec, rows, [STRAY_REASON] * rows.num_rows)
        sq_apply._log_quarantine(self.conn, kept)
        texts = key_texts(spec, rows.column(spec.key))
        t, k, tomb = quote(spec.name), quote(spec.key), quote(names.tombstones(spec.name))
        for i in range(0, len(texts), 500):
            part = texts[i : i + 500]
            marks = ", ".join("?" * len(part))
            self.conn.execute(f"DELETE FROM main.{t} WHERE {k} IN ({marks})", part)
            # The delete trigger left tombstones: removing a stray row is not a deletion to sync.
            self.conn.execute(f"DELETE FROM main.{tomb} WHERE {k} IN ({marks})", part)
        got = self.conn.rows(f"SELECT id FROM {quote(names.QUARANTINE)} WHERE id > ? AND table_name = ? ORDER BY id",
                             [mark, spec.name])  # fmt: skip
        return [int(r[0]) for r in got]

    def upsert(self, spec: TableSpec, plan: ApplyPlan, stats: TableApplyStats) -> None:
        from tidesync.sqlite import apply as sq_apply

        if plan.inserts.num_rows or plan.updates.num_rows:
            sq_apply._write_upserts(self.conn, plan, self.infos[spec.name], self.change, stats, self.refused)

    def delete(self, spec: TableSpec, plan: ApplyPlan, stats: TableApplyStats) -> None:
        from tidesync.sqlite import apply as sq_apply

        if not plan.deletes.num_rows:
            return
        if self.children is None:
            self.children = sq_apply._referencing(self.conn)
        sq_apply._write_deletes(self.conn, plan, self.children, self.change, stats, self.refused)

    def finish(self) -> None:
        from tidesync.sqlite import apply as sq_apply

        sq_apply._log_quarantine(self.conn, self.refused)


# ----------------------------------------------------------------------------- the node side


@dataclass
class _Candidates:
    """A table's keys to classify: the node's row hash (None: no live row) and central's."""

    spec: TableSpec
    here: dict[str, int | None]
    there: dict[str, int | None]


class _Meter:
    """Counts the bytes a verify moves, both ways (bodies as sent and received)."""

    def __init__(self, client: CentralClient, report: VerifyReport) -> None:
        self.client, self.report = client, report
        self._lock = threading.Lock()  # requests go from a worker thread too

    def post(self, path: str, *, body: Mapping[str, Any]) -> Any:
        resp = self.client.call("POST", path, json=body)
        with self._lock:
            self.report.bytes_up += len(json.dumps(body).encode())
            self.report.bytes_down += len(resp.content)
        return resp


def _hash_map(spec: TableSpec, rows: pa.Table) -> dict[str, int | None]:
    """Key text -> row hash of live rows (tombstones are None: no live row)."""
    if rows.num_rows == 0:
        return {}
    live = rows.filter(pc.invert(rows.column(DELETED))) if DELETED in rows.column_names else rows
    out: dict[str, int | None] = {k: None for k in key_texts(spec, rows.column(spec.key))}
    if live.num_rows:
        h = hash_rows(spec, live)
        out.update(zip(key_texts(spec, h.column(spec.key)), h.column("hash").to_pylist(), strict=True))
    return out


@contextlib.contextmanager
def _requests() -> Iterator[ThreadPoolExecutor]:
    """One worker thread for requests to central; on an error, queued requests are dropped."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="tidesync-verify")
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _hash_node_rows(snap: _Snapshot, spec: TableSpec, pending: pa.Array) -> pa.Table:
    """``{key, bucket (of 2^31), hash}`` of the node's live rows but its pending keys."""
    parts = []
    for rows in snap.rows(spec):
        if len(pending):
            rows = rows.filter(pc.invert(pc.is_in(rows.column(spec.key), value_set=pending)))
        parts.append(hash_rows(spec, rows))
    return pa.concat_tables(parts) if parts else hash_rows(spec, spec.wire_schema().empty_table())


def verify_node(
    store: Store, client: CentralClient, *, repair: bool = False, progress: Progress | None = None,
    tables: Sequence[str] | None = None,
) -> VerifyReport:  # fmt: skip
    """Compare this node's copy of every table central sends it with central's, and with
    ``repair`` write central's versions over what differs (one transaction here).

    Keys changed on either side since the last sync are left out (the next cycle carries
    them); rows the node holds outside its current scope are reported as
    ``out_of_scope``, not as differences. Raises :class:`SyncError` when the node has too
    many changes waiting to be pushed (sync first)."""
    started = time.perf_counter()
    step = progress or (lambda what, done, total: None)
    registry = store.registry
    report = VerifyReport(node=store.node_id(), repair=repair)
    specs = [s for s in (registry.ordered(tables) if tables else registry) if verifiable(s)]
    db = _node_db(store)
    meter = _Meter(client, report)
    fp = fingerprint(registry)
    found: list[_Candidates] = []
    with db.snapshot() as snap, _requests() as http:
        push, pull = snap.cursors()
        report.pull_cursor = pull
        if pull == 0:
            raise SyncError("this node has never pulled from central, so there is no copy to verify yet: "
                            "run `tidesync sync` first")  # fmt: skip
        pending: dict[str, pa.Array] = {}
        for spec in specs:
            pending[spec.name] = snap.pending(spec, push) if spec.direction.pushes else _empty_keys(spec)
            if len(pending[spec.name]) > MAX_PENDING:
                raise SyncError(f"{len(pending[spec.name])} changes of {spec.name} wait to be pushed from this node "
                                f"(at most {MAX_PENDING} are left out of a verify): run `tidesync sync` first, then "
                                "verify")  # fmt: skip
        asks = {s.name: {"table": s.name, "pull_cursor": pull, "fingerprint": fp,
                         "exclude": key_texts(s, pending[s.name])} for s in specs}  # fmt: skip
        # Central digests its copies (one request at a time, in a worker thread) while
        # this thread reads and hashes the node's: the two reads overlap.
        digests = [http.submit(meter.post, "/v1/verify/digest", body=asks[s.name]) for s in specs]
        drills: list[tuple[TableReport, Future[Any], dict[str, int]]] = []
        for i, spec in enumerate(specs):
            t0 = time.perf_counter()
            table = TableReport(spec.name, pending_here=len(pending[spec.name]))
            report.tables.append(table)
            mine = _hash_node_rows(snap, spec, pending[spec.name])
            theirs, answer = decode_message(digests[i].result().content, "central's verify digest")
            buckets = table.buckets = int(answer["buckets"])
            table.rows_here, table.rows_central = mine.num_rows, int(answer.get("rows", 0))
            report.watermark = int(answer.get("watermark", 0))
            b = mine.column("bucket").to_numpy() >> np.uint32(31 - (buckets.bit_length() - 1))
            rows_n, sums_n = bucket_sums(b, mine.column("hash").to_numpy(), buckets)
            rows_c = theirs.column("rows").to_numpy().astype(np.uint32)
            sums_c = theirs.column("hash").to_numpy().astype(np.uint64)
            if len(rows_c) != buckets:
                raise ProtocolError(f"central's digest of {spec.name} has {len(rows_c)} buckets, not {buckets}")
            differ = np.flatnonzero((rows_c != rows_n) | (sums_c != sums_n))
            table.differing_buckets = len(differ)
            if len(differ):
                near = mine.filter(pa.array(np.isin(b, differ)))
                here = dict(zip(key_texts(spec, near.column(spec.key)), near.column("hash").to_pylist(), strict=True))
                ask = {**asks[spec.name], "buckets": buckets, "differing": [int(x) for x in differ]}
                drills.append((table, http.submit(meter.post, "/v1/verify/rows", body=ask), here))
            report.phases[spec.name] = round(time.perf_counter() - t0, 4)
            step("tables", i + 1, len(specs))
        for table, rows_asked, here in drills:
            spec = registry[table.table]
            theirs, _ = decode_message(rows_asked.result().content, "central's verify rows")
            there = dict(zip(key_texts(spec, theirs.column(spec.key)), theirs.column("hash").to_pylist(), strict=True))
            odd = {k for k in here.keys() | there.keys() if here.get(k) != there.get(k)}
            if odd:
                found.append(_Candidates(spec, {k: here.get(k) for k in odd}, {k: there.get(k) for k in odd}))
    t0 = time.perf_counter()
    by_table = {t.table: t for t in report.tables}
    for cand in found:
        _classify(meter, cand, by_table[cand.spec.name], pull, fp)
    report.phases["classify"] = round(time.perf_counter() - t0, 4)
    if repair and report.differences:
        t0 = time.perf_counter()
        _repair(db, meter, registry, found, by_table, fp, step)
        report.phases["repair"] = round(time.perf_counter() - t0, 4)
    report.seconds = round(time.perf_counter() - started, 4)
    return report


def _chunks(items: Sequence[str], n: int = MAX_KEYS) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _classify(meter: _Meter, cand: _Candidates, table: TableReport, pull: int, fp: str) -> None:
    """Ask central what it holds for each candidate now, and name the difference."""
    keys = sorted(cand.here)
    for part in _chunks(keys):
        body = {"table": cand.spec.name, "keys": list(part), "pull_cursor": pull, "fingerprint": fp}
        for entry in meter.post("/v1/verify/keys", body=body).json()["keys"]:
            k, state = str(entry["key"]), str(entry["state"])
            mine = cand.here[k]
            if state == PENDING:
                table.pending_central += 1
            elif state == LIVE:
                theirs = int(entry["hash"], 16)
                cand.there[k] = theirs
                if mine is None:
                    table.differences.append(Difference(k, MISSING_HERE, LIVE))
                elif mine != theirs:
                    table.differences.append(Difference(k, DIFFERS, LIVE))
            elif mine is None:
                continue  # no live row here, none there: the copies agree
            elif state == OUT_OF_SCOPE:
                table.differences.append(Difference(k, OUT_OF_SCOPE, OUT_OF_SCOPE))
            else:  # deleted, absent, quarantined
                table.differences.append(Difference(k, ONLY_HERE, state))


def _repair(db: _NodeDb, meter: _Meter, registry: Registry, found: list[_Candidates],
            by_table: dict[str, TableReport], fp: str, step: Progress) -> None:  # fmt: skip
    """Fetch central's versions of what differs, then write them here in one transaction."""
    wanted: dict[str, _Candidates] = {c.spec.name: c for c in found}
    versions: dict[str, pa.Table] = {}
    for name, cand in wanted.items():
        diffs = by_table[name].differences
        fetch = [d.key for d in diffs if d.kind in (DIFFERS, MISSING_HERE) or d.kind == ONLY_HERE
                 and d.central == DELETED_AT_CENTRAL]  # fmt: skip
        pages = []
        for part in _chunks(fetch):
            resp = meter.post("/v1/verify/fetch", body={"table": name, "keys": list(part), "fingerprint": fp})
            pages.append(decode_page(resp.content, registry)[1])
        versions[name] = pa.concat_tables(pages) if pages else cand.spec.wire_schema().empty_table()
    order = [s for s in registry if s.name in wanted]
    plans: dict[str, ApplyPlan] = {}
    strays: dict[str, pa.Table] = {}
    done = 0
    with db.repair() as txn:
        for spec in order:
            table, cand = by_table[spec.name], wanted[spec.name]
            diffs = [d for d in table.differences if d.kind != OUT_OF_SCOPE]
            if not diffs:
                continue
            local = txn.current(spec, keys_from_texts(spec, [d.key for d in diffs]))
            now = _hash_map(spec, local)
            dead_here = set(key_texts(spec, local.filter(local.column(DELETED)).column(spec.key)))
            theirs = versions.get(spec.name, spec.wire_schema().empty_table())
            central = dict(zip(key_texts(spec, theirs.column(spec.key)), range(theirs.num_rows), strict=True))
            up_ins, up_upd, dels, stray, revive = [], [], [], [], []
            for d in diffs:
                if now.get(d.key) != cand.here.get(d.key):
                    d.repair = "skipped: changed here since it was compared; verify again"
                    table.skipped += 1
                    continue
                if d.kind == ONLY_HERE and d.central == QUARANTINED:
                    d.repair = "left: held in central's quarantine (resolve it there)"
                    table.skipped += 1
                    continue
                if d.kind == ONLY_HERE and d.central == ABSENT:
                    stray.append(d)
                    continue
                at = central.get(d.key)
                if at is None:
                    d.repair = "skipped: central no longer has it; verify again"
                    table.skipped += 1
                elif theirs.column(DELETED)[at].as_py():
                    if d.key in now and now[d.key] is not None:
                        dels.append(at)
                        d.repair = "deleted (central's tombstone)"
                    else:
                        d.repair = "deleted on both sides now: nothing to do"
                elif now.get(d.key) is None:
                    up_ins.append(at)
                    if d.key in dead_here:
                        revive.append(d.key)
                    d.repair = "written (central's version)"
                else:
                    up_upd.append(at)
                    d.repair = "written (central's version)"
            if stray:
                gone = keys_from_texts(spec, [d.key for d in stray])
                strays[spec.name] = local.filter(pc.is_in(local.column(spec.key), value_set=gone))
                for d in stray:
                    d.repair = "quarantined: kept in the quarantine, removed here"

            def rows_at(idx: list[int], theirs: pa.Table = theirs) -> pa.Table:
                return theirs.take(pa.array(idx, pa.int64()))

            plans[spec.name] = ApplyPlan(
                spec,
                inserts=new_rows(spec, rows_at(up_ins), CENTRAL_PEER),
                updates=new_rows(spec, rows_at(up_upd), CENTRAL_PEER),
                deletes=with_origin(rows_at(dels).select([spec.key, HLC, NODE, BASE_HLC]), CENTRAL_PEER),
                revived=keys_from_texts(spec, revive),
                conflicts=pa.table({}),
                unchanged=0,
            )
        stats = {name: TableApplyStats() for name in plans}
        for spec in reversed(order):  # children first: a stray parent goes after its stray children
            if spec.name in strays:
                table = by_table[spec.name]
                table.quarantine_ids = txn.remove_stray(spec, strays[spec.name])
                table.quarantined = strays[spec.name].num_rows
        for spec in order:  # parents first
            if spec.name in plans:
                txn.upsert(spec, plans[spec.name], stats[spec.name])
                done += 1
                step("repair", done, 2 * len(plans))
        for spec in reversed(order):  # children first
            if spec.name in plans:
                txn.delete(spec, plans[spec.name], stats[spec.name])
                done += 1
                step("repair", done, 2 * len(plans))
        txn.finish()
    for name, st in stats.items():
        table = by_table[name]
        table.written, table.deleted = st.inserted + st.updated, st.deleted
        # Central's versions this database refused (a constraint): held in the quarantine
        # with their reason, as a pull would have done.
        table.refused = st.quarantined

__all__ = [
    "Difference",
    "TableReport",
    "VerifyReport",
    "choose_buckets",
    "digest_columns",
    "serve_digest",
    "serve_fetch",
    "serve_keys",
    "verify_node",
]
