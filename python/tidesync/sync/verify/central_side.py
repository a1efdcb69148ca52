"""The central server's side of a verify: the ``/v1/verify/*`` handlers.

``digest`` reads and hashes one table of the node's scope as of its pull cursor (or
reuses such a read it has proved current: :mod:`tidesync.sync.verify.scope_cache`) and
answers per-bucket digests; ``rows`` answers the row hashes of the buckets that differ
(from that same read when this process still has it); ``keys`` says what central holds
now for a few keys; ``fetch`` sends central's versions of a few keys, for a repair.
Every answer stays inside the node's scope.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tidesync.changes import conform, key_texts, keys_from_texts
from tidesync.errors import ProtocolError, SchemaMismatchError
from tidesync.pg.capture import snapshot_watermark, wire_columns
from tidesync.pg.install import SCHEMA, qi, ql, tomb_table
from tidesync.registry import Registry, TableSpec
from tidesync.sync import scope
from tidesync.sync.protocol import ForbiddenError, PayloadTooLargeError, SessionError, encode_page, fingerprint
from tidesync.sync.verify import hashing, messages, pg_scan, scope_cache
from tidesync.sync.verify.hashing import (
    as_keys,
    bucket_sums,
    choose_buckets,
    coarse,
    hash_rows,
    in_buckets,
    key_buckets,
)
from tidesync.sync.verify.messages import (
    ABSENT,
    DELETED_AT_CENTRAL,
    LIVE,
    OUT_OF_SCOPE,
    PENDING,
    QUARANTINED,
    encode_message,
)

if TYPE_CHECKING:
    from tidesync.pg.store import PostgresStore
    from tidesync.sync.central import Node

#: Memory per hash step of a scope read: the node's marked patients are hashed once
#: and every row probes them; with the server default (4MB) the hash spills to
#: temporary files for a facility of a few hundred thousand patients (allocated only
#: as used, only in the verify's read-only transaction).
WORK_MEM = "256MB"
#: Connections central reads one large table of a node's scope with (1: just the
#: request's); tables below ``pg_scan.SPLIT_BLOCKS`` are read by one.
READERS = 2

READ_ONLY = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"


# ----------------------------------------------------------------------------- requests


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
    if not hashing.verifiable(spec):
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


def _cursor_param(body: Mapping[str, Any], what: str) -> int:
    pull_cursor = _param(body, "pull_cursor", int, what)
    if pull_cursor < 0:
        raise ProtocolError(f"{what}: pull_cursor must be 0 or more")
    return int(pull_cursor)


def _buckets_param(body: Mapping[str, Any], what: str) -> int:
    buckets = _param(body, "buckets", int, what)
    if buckets < 1 or buckets > hashing.MAX_BUCKETS or buckets & (buckets - 1):
        raise ProtocolError(f"{what}: buckets must be a power of two from 1 to {hashing.MAX_BUCKETS}, got {buckets}")
    return int(buckets)


def _in_list(spec: TableSpec, keys: pa.Array, alias: str = "t") -> str:
    """SQL: the key column is one of ``keys`` (at most :data:`messages.MAX_KEYS` literals)."""
    texts = key_texts(spec, keys)
    if not texts:
        return "false"
    listed = ", ".join(ql(k) for k in texts)
    return f"{alias}.{qi(spec.key)} = ANY(ARRAY[{listed}]::{spec.column(spec.key).type.pg}[])"


# ----------------------------------------------------------------------------- the scope as of the pull cursor


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


def _check_pending(cur: Any, registry: Registry, spec: TableSpec, node: Node, pull_cursor: int) -> int:
    limit = messages.MAX_PENDING
    pending = _pending_at_central(cur, registry, spec, node, pull_cursor, limit)
    if pending > limit:
        raise SessionError(
            f"central has more than {limit} changes of {spec.name} that node {node.id!r} has not pulled "
            f"yet (its pull cursor is {pull_cursor}): run `tidesync sync` on the node first, then verify"
        )
    return pending


def _scope_sql(registry: Registry, spec: TableSpec, node: Node, pull_cursor: int, blocks: str = "true") -> str:
    """The node's scope as it holds it after its last pull (rows changed at central since
    are on their way to it, and left out), limited to the ``blocks`` condition on
    ``t.ctid``; only the columns that are hashed."""
    sql = scope.snapshot_sql(registry, spec, node, pull_cursor)
    # snapshot_sql is one SELECT ... FROM <table> t WHERE ...: one more condition on t.
    assert " UNION " not in sql.upper(), "snapshot_sql is expected to be a single SELECT"
    return hashing.hashed_select(spec, f"{sql} AND ({blocks})")


def _read_scope(store: PostgresStore, cur: Any, spec: TableSpec, node: Node, pull_cursor: int,
                xmin: int) -> scope_cache.ScopeRead:  # fmt: skip
    """Read and hash the node's scope of ``spec`` in ``cur``'s snapshot (whose xmin is ``xmin``)."""
    registry = store.registry
    cur.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")
    shared = pg_scan.SharedSnapshot(cur, store.dsn, [f"SET LOCAL work_mem = '{WORK_MEM}'"]) if READERS > 1 else None
    try:
        hashed = pg_scan.scan_hashes(cur, shared, spec, lambda blocks: _scope_sql(registry, spec, node, pull_cursor,
                                     blocks), readers=READERS, what="central rows")  # fmt: skip
    finally:
        if shared is not None:
            shared.close()
    return scope_cache.ScopeRead(
        keys=as_keys(spec, hashed.column(spec.key)),
        buckets=hashed.column("bucket").to_numpy(),
        hashes=hashed.column("hash").to_numpy(),
        xmin=xmin,
        counts={},
    )


def _kept(entry: scope_cache.ScopeRead, spec: TableSpec, exclude: pa.Array) -> np.ndarray[Any, Any] | None:
    """Which rows of ``entry`` are not the node's pending keys (None: all of them)."""
    if not len(exclude) or not len(entry.keys):
        return None
    return np.asarray(pc.invert(pc.is_in(entry.keys, value_set=exclude)).to_numpy(zero_copy_only=False), dtype=bool)


def serve_digest(store: PostgresStore, node: Node, body: Mapping[str, Any]) -> bytes:
    """``POST /v1/verify/digest``: central's range digest of its copy of one table of the
    node's scope, as the node holds it after its last pull.

    The request is JSON ``{table, pull_cursor, exclude: [keys], fingerprint}`` (and
    optionally ``buckets``: by default central picks about ``ROWS_PER_BUCKET`` rows per
    bucket; ``fresh``: read afresh even if a kept read could be proved current). Rows changed at central since ``pull_cursor`` (on their way to the node)
    and the node's own pending keys (``exclude``) are left out. The answer is Arrow IPC
    ``{rows: uint32, hash: uint64}``, one row per bucket, with ``{table, buckets, rows,
    watermark, pending, reused, read}`` in the metadata (``reused``: from an earlier read
    of the same scope proved current, see :mod:`tidesync.sync.verify.scope_cache`;
    ``read``: the id of the kept read it came from, null if none was kept).
    """
    what = "verify digest request"
    spec = _request(store, node, body, what)
    pull_cursor = _cursor_param(body, what)
    exclude = _keys_param(spec, body, "exclude", what, messages.MAX_PENDING)
    asked = _buckets_param(body, what) if body.get("buckets") is not None else None
    fresh = body.get("fresh", False)
    if not isinstance(fresh, bool):
        raise ProtocolError(f"{what}: 'fresh' must be true or false")
    registry = store.registry
    relations = scope_cache.scope_relations(registry, spec)
    from tidesync.pg.conn import transaction

    with transaction(store.connection, READ_ONLY) as cur:
        watermark = snapshot_watermark(cur)
        pending = _check_pending(cur, registry, spec, node, pull_cursor)
        key = (scope_cache.instance(cur, store.dsn), node.id, node.facility_id, spec.name, pull_cursor)
        entry = None if fresh else scope_cache.CACHE.get(key)
        reused = entry is not None and scope_cache.unchanged_since(cur, entry, relations)
        kept = reused
        if entry is None or not reused:
            scope_cache.CACHE.drop(key)
            entry = _read_scope(store, cur, spec, node, pull_cursor, watermark)
            if scope_cache.fits(entry.nbytes):
                entry.counts = scope_cache.row_counts(cur, relations)  # in the read's snapshot
                kept = scope_cache.CACHE.put(key, entry)
    keep = _kept(entry, spec, exclude)
    b, h = (entry.buckets, entry.hashes) if keep is None else (entry.buckets[keep], entry.hashes[keep])
    buckets = asked or choose_buckets(len(b))
    rows_c, sums_c = bucket_sums(coarse(b, buckets), h, buckets)
    meta = {"table": spec.name, "buckets": buckets, "rows": len(b), "watermark": watermark, "pending": pending,
            "reused": reused, "read": entry.id if kept else None}  # fmt: skip
    return encode_message(pa.table({"rows": pa.array(rows_c), "hash": pa.array(sums_c)}), meta)


def serve_rows(store: PostgresStore, node: Node, body: Mapping[str, Any]) -> bytes:
    """``POST /v1/verify/rows``: central's row hashes of the rows of some buckets (the
    ones whose digests differ), in the same scope as :func:`serve_digest`.

    The request is JSON ``{table, pull_cursor, exclude, buckets, differing: [bucket
    numbers], fingerprint[, read]}``; the answer Arrow IPC ``{<key>, hash}`` with
    ``{table, rows, reread}`` in the metadata. Central answers from the kept read the
    digest named (``read``) when this process still has it; otherwise (``reread``) it
    reads the keys of the node's scope to find the rows of those buckets, then the whole
    rows of those keys.
    """
    what = "verify rows request"
    spec = _request(store, node, body, what)
    pull_cursor = _cursor_param(body, what)
    exclude = _keys_param(spec, body, "exclude", what, messages.MAX_PENDING)
    buckets = _buckets_param(body, what)
    differing = body.get("differing")
    if not isinstance(differing, list) or not all(isinstance(x, int) and 0 <= x < buckets for x in differing):
        raise ProtocolError(f"{what}: 'differing' must be a list of bucket numbers from 0 to {buckets - 1}")
    read = body.get("read")
    if read is not None and not isinstance(read, str):
        raise ProtocolError(f"{what}: 'read' must be the id a digest answer gave, or null")
    registry = store.registry
    from tidesync.pg.conn import transaction

    with transaction(store.connection, READ_ONLY) as cur:
        _check_pending(cur, registry, spec, node, pull_cursor)
        key = (scope_cache.instance(cur, store.dsn), node.id, node.facility_id, spec.name, pull_cursor)
    entry = scope_cache.CACHE.get(key) if read else None
    if entry is not None and entry.id == read:
        mask = in_buckets(entry.buckets, buckets, differing)
        keep = _kept(entry, spec, exclude)
        if keep is not None:
            mask &= keep
        _check_drill(spec, int(mask.sum()), len(differing), buckets)
        out = pa.table({spec.key: entry.keys.filter(pa.array(mask)), "hash": pa.array(entry.hashes[mask])})
        return encode_message(out, {"table": spec.name, "rows": out.num_rows, "reread": False})
    out = _reread_rows(store, spec, node, pull_cursor, exclude, buckets, differing)
    return encode_message(out, {"table": spec.name, "rows": out.num_rows, "reread": True})


def _check_drill(spec: TableSpec, rows: int, differing: int, buckets: int) -> None:
    if rows > messages.MAX_DRILL_ROWS:
        raise PayloadTooLargeError(
            f"{rows} rows of {spec.name} at central fall in the {differing} of {buckets} buckets "
            "that differ: too far apart to compare row by row. If the node was offline long, run `tidesync "
            "sync` first; otherwise rebuild it from central (a seed) instead of repairing"
        )


def _reread_rows(store: PostgresStore, spec: TableSpec, node: Node, pull_cursor: int, exclude: pa.Array,
                 buckets: int, differing: list[int]) -> pa.Table:  # fmt: skip
    """The drill-down without a kept read: the keys of the scope, those in the differing
    buckets, then their rows (read by key)."""
    registry = store.registry
    k = qi(spec.key)
    from tidesync.pg import apply as pg_apply
    from tidesync.pg.conn import transaction

    # Not READ ONLY: the keys are staged in a temporary table (nothing else is written).
    with transaction(store.connection, "BEGIN ISOLATION LEVEL REPEATABLE READ") as cur:
        cur.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")
        _check_pending(cur, registry, spec, node, pull_cursor)
        cur.execute(f"SELECT s.{k} FROM ({scope.snapshot_sql(registry, spec, node, pull_cursor)}) s")
        keys = pa.table({spec.key: as_keys(spec, cur.fetch_arrow_table().column(0))})
        if len(exclude):
            keys = keys.filter(pc.invert(pc.is_in(keys.column(spec.key), value_set=exclude)))
        at = key_buckets(spec, keys.column(spec.key))
        keys = keys.filter(pa.array(in_buckets(at, buckets, differing)))
        _check_drill(spec, keys.num_rows, len(differing), buckets)
        pg_apply._stage(cur, spec, keys, key_only=True)
        cur.execute(f"SELECT {wire_columns(spec, 't', tombstone=False)} FROM {qi(spec.name)} t "
                    f"JOIN {pg_apply.KEYS} s ON t.{k} = s.{k}")  # fmt: skip
        rows = conform(cur.fetch_arrow_table(), spec, "central rows")
    return hash_rows(spec, rows).select([spec.key, "hash"])


def serve_keys(store: PostgresStore, node: Node, body: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /v1/verify/keys``: what central holds now for each key, as the node may
    know it: ``live`` (with its row hash), ``deleted``, ``absent``, ``quarantined``
    (refused by central's database, held there), ``out_of_scope`` (a row the node may
    not have: never its data), or ``pending`` (changed at or after the node's pull
    cursor: the next pull brings it)."""
    what = "verify keys request"
    spec = _request(store, node, body, what)
    keys = _keys_param(spec, body, "keys", what, messages.MAX_KEYS)
    pull_cursor = _cursor_param(body, what)
    registry = store.registry
    states: dict[str, dict[str, Any]] = {}
    from tidesync.pg.conn import transaction

    with transaction(store.connection, READ_ONLY) as cur:
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
    keys = _keys_param(spec, body, "keys", what, messages.MAX_KEYS)
    registry = store.registry
    from tidesync.pg.conn import transaction

    with transaction(store.connection, READ_ONLY) as cur:
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
