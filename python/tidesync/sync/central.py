"""The central server's side of a sync session, without HTTP: nodes, tokens, sessions, pages.

Everything a session needs between requests lives in PostgreSQL (``tidesync.nodes``,
``tidesync.sessions``, ``tidesync.push_pages``, ``tidesync.pull_pages``,
``tidesync.clamps``), so any worker of any host can serve any request of a session,
and a central server killed mid-session picks up where it was when it comes back.

A session goes ``open`` -> ``pushed`` (all pushed pages merged in one transaction) ->
``pulling`` (pull pages prepared from one snapshot) -> ``ended``. Every step can be
repeated with the same effect, which is what lets a node resume after a dropped
connection: pages are stored under their number, completing a push twice merges once,
preparing a pull twice prepares once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tidesync.changes import ApplyOptions, ApplyResult, _storage, key_texts
from tidesync.core import DEFAULT_MAX_DRIFT_MS, clamp_hlcs, now_ms
from tidesync.errors import AuthError, ProtocolError, SchemaMismatchError, SyncError
from tidesync.pg.conn import execute_script, ingest, transaction
from tidesync.pg.install import SCHEMA, missing_columns, ql
from tidesync.pg.store import PostgresStore
from tidesync.registry import HLC, Registry, TableSpec, stamp_column
from tidesync.sync import scope
from tidesync.sync.protocol import (
    MAX_PAGE_BYTES,
    PAGE_ROWS,
    PROTOCOL_VERSION,
    SessionError,
    decode_page,
    encode_page,
    fingerprint,
)

#: The central server's node id (its own edits are stamped with it).
CENTRAL_NODE = "central"
NODE_KINDS = ("facility", "mobile")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: Pages of sessions idle this long are dropped when a new session opens.
STALE_SESSION_HOURS = 24

log = logging.getLogger("tidesync.central")

CENTRAL_DDL = f"""
CREATE TABLE IF NOT EXISTS {SCHEMA}.nodes (
    id text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('facility', 'mobile')),
    facility_id text NOT NULL,
    token_hash text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.sessions (
    id uuid PRIMARY KEY,
    node_id text NOT NULL REFERENCES {SCHEMA}.nodes (id),
    status text NOT NULL,
    opened_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    ended_at timestamptz,
    pull_cursor bigint NOT NULL,
    pull_watermark bigint,
    pull_pages integer,
    push_pages integer NOT NULL DEFAULT 0,
    rows_in bigint NOT NULL DEFAULT 0,
    rows_out bigint NOT NULL DEFAULT 0,
    bytes_in bigint NOT NULL DEFAULT 0,
    bytes_out bigint NOT NULL DEFAULT 0,
    conflicts integer NOT NULL DEFAULT 0,
    quarantined integer NOT NULL DEFAULT 0,
    clamped integer NOT NULL DEFAULT 0,
    phases jsonb NOT NULL DEFAULT '{{}}',
    error text,
    clock_skew_ms bigint,
    clock_warning text
);
CREATE INDEX IF NOT EXISTS sessions_node ON {SCHEMA}.sessions (node_id, opened_at);
CREATE TABLE IF NOT EXISTS {SCHEMA}.push_pages (
    session_id uuid NOT NULL,
    page_no integer NOT NULL,
    table_name text NOT NULL,
    rows integer NOT NULL,
    digest text NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (session_id, page_no)
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.pull_pages (
    session_id uuid NOT NULL,
    page_no integer NOT NULL,
    table_name text NOT NULL,
    rows integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (session_id, page_no)
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.clamps (
    id bigserial PRIMARY KEY,
    session_id uuid NOT NULL,
    node_id text NOT NULL,
    table_name text NOT NULL,
    key text NOT NULL,
    original_hlc bigint NOT NULL,
    clamped_hlc bigint NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
"""
#: Session columns added after the first release: an existing central server gets them
#: from :func:`upgrade` (run by ``central init`` and when the server starts).
ADDED_SESSION_COLUMNS = {"clock_skew_ms": "bigint", "clock_warning": "text"}


@dataclass(frozen=True)
class Node:
    id: str
    kind: str
    facility_id: str


@dataclass(frozen=True)
class Settings:
    max_drift_ms: int = DEFAULT_MAX_DRIFT_MS
    max_page_bytes: int = MAX_PAGE_BYTES
    page_rows: int = PAGE_ROWS
    #: Where seed files for nodes that ask over the network are made (``--seed-dir``);
    #: None: a ``tidesync-seeds`` folder in the temp directory.
    seed_dir: str | None = None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _one(cur: Any, sql: str) -> tuple[Any, ...] | None:
    cur.execute(sql)
    row = cur.fetchone()
    return None if row is None else tuple(row)


# ----------------------------------------------------------------------------- setup


def init(store: PostgresStore) -> None:
    """Make a database a central server: the registry's tables, tidesync, the session tables."""
    with store.connection.cursor() as cur:
        missing = [s.name for s in store.registry if _one(cur, f"SELECT to_regclass({ql(s.name)})") == (None,)]
    if missing and store.registry.name == "demo":
        store.create_app_tables()
    store.install(CENTRAL_NODE)
    with transaction(store.connection) as cur:
        execute_script(cur, CENTRAL_DDL)
        if (index := scope.marks_index_sql(store.registry)) is not None:
            cur.execute(index)
    upgrade(store)


def upgrade(store: PostgresStore) -> None:
    """Add the session columns a central server made by an older version lacks.

    Looks before it alters, so a server whose role does not own the tables starts
    fine once the owner has upgraded (``tidesync central init`` again).
    """
    with store.connection.cursor() as cur:
        # None: not a central server (yet): `central init` creates the table whole.
        for name in missing_columns(cur, f"{SCHEMA}.sessions", ADDED_SESSION_COLUMNS) or []:
            try:
                cur.execute(f"ALTER TABLE {SCHEMA}.sessions ADD COLUMN IF NOT EXISTS {name} "
                            f"{ADDED_SESSION_COLUMNS[name]}")  # fmt: skip
            except Exception as exc:
                raise SyncError(
                    f"{SCHEMA}.sessions lacks the column {name!r} this version records, and adding it failed "
                    f"({exc}); run `tidesync central init` once as the owner of the central tables"
                ) from exc


def add_node(store: PostgresStore, name: str, kind: str, facility_id: str) -> str:
    """Register a node and return its token (``<node id>.<secret>``; only a hash is kept)."""
    if not _NAME.match(name):
        raise SyncError(
            f"node name {name!r}: use 1-63 lowercase letters, digits, '-' or '_' (it becomes the node id)"
        )
    if name == CENTRAL_NODE:
        raise SyncError(f"{CENTRAL_NODE!r} is the central server's own node id")
    if kind not in NODE_KINDS:
        raise SyncError(f"node kind must be one of {NODE_KINDS}, not {kind!r}")
    try:
        uuid.UUID(facility_id)
    except ValueError:
        raise SyncError(f"facility {facility_id!r} is not a uuid") from None
    secret = secrets.token_urlsafe(32)
    with transaction(store.connection) as cur:
        _require_central(cur)
        if _one(cur, f"SELECT 1 FROM {SCHEMA}.nodes WHERE id = {ql(name)}") is not None:
            raise SyncError(f"a node named {name!r} is already registered")
        cur.execute(
            f"INSERT INTO {SCHEMA}.nodes (id, kind, facility_id, token_hash) "
            f"VALUES ({ql(name)}, {ql(kind)}, {ql(str(uuid.UUID(facility_id)))}, {ql(_hash(secret))})"
        )
    return f"{name}.{secret}"


def _require_central(cur: Any) -> None:
    if _one(cur, f"SELECT to_regclass('{SCHEMA}.sessions')") == (None,):
        raise SyncError("this database is not a central server: run `tidesync central init` first")


def authenticate(store: PostgresStore, token: str | None) -> Node:
    """The node a bearer token belongs to, or :class:`AuthError`."""
    if not token or "." not in token:
        raise AuthError("missing or malformed token: send 'Authorization: Bearer <node token>'")
    node_id, secret = token.rsplit(".", 1)
    with store.connection.cursor() as cur:
        row = _one(
            cur, f"SELECT token_hash, kind, facility_id, revoked_at FROM {SCHEMA}.nodes WHERE id = {ql(node_id)}"
        )
    if row is None or not hmac.compare_digest(row[0], _hash(secret)):
        raise AuthError("invalid token: this node is unknown here or its token is wrong")
    if row[3] is not None:
        raise AuthError(f"node {node_id!r} has been revoked")
    return Node(node_id, str(row[1]), str(row[2]))


def find_node(store: PostgresStore, node_id: str) -> Node:
    """A registered node by id (for work done on its behalf at central: a seed file)."""
    with store.connection.cursor() as cur:
        _require_central(cur)
        row = _one(cur, f"SELECT kind, facility_id, revoked_at FROM {SCHEMA}.nodes WHERE id = {ql(node_id)}")
    if row is None:
        raise SyncError(f"no node named {node_id!r} is registered here: see `tidesync status` for the nodes")
    if row[2] is not None:
        raise SyncError(f"node {node_id!r} has been revoked")
    return Node(node_id, str(row[0]), str(row[1]))


# ----------------------------------------------------------------------------- sessions


def open_session(store: PostgresStore, node: Node, hello: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Check versions and start a session; the node says where its last pull ended and
    what time its database clock reads (recorded as the node's clock skew)."""
    central_ms = now_ms()
    skew = clock_skew(hello, central_ms)
    theirs = hello.get("protocol")
    if theirs != PROTOCOL_VERSION:
        raise SchemaMismatchError(
            f"protocol version mismatch: node speaks {theirs}, central speaks {PROTOCOL_VERSION}; upgrade the older side"
        )
    ours = fingerprint(store.registry)
    if hello.get("fingerprint") != ours:
        raise SchemaMismatchError(
            f"schema mismatch: node has registry {hello.get('registry')!r} fingerprint {hello.get('fingerprint')}, "
            f"central has {store.registry.name!r} fingerprint {ours}; run the same schema version on both"
        )
    cursor = int(hello.get("pull_cursor") or 0)
    sid = str(uuid.uuid4())
    warning = clock_warning(node.id, skew, settings.max_drift_ms)
    if warning:
        log.warning("session %s: %s", sid, warning)
    with transaction(store.connection) as cur:
        cur.execute(
            f"DELETE FROM {SCHEMA}.push_pages WHERE session_id IN (SELECT id FROM {SCHEMA}.sessions "
            f"WHERE updated_at < now() - interval '{STALE_SESSION_HOURS} hours' AND status <> 'ended')"
        )
        cur.execute(
            f"DELETE FROM {SCHEMA}.pull_pages WHERE session_id IN (SELECT id FROM {SCHEMA}.sessions "
            f"WHERE updated_at < now() - interval '{STALE_SESSION_HOURS} hours' AND status <> 'ended')"
        )
        cur.execute(
            f"INSERT INTO {SCHEMA}.sessions (id, node_id, status, pull_cursor, clock_skew_ms, clock_warning) "
            f"VALUES ({ql(sid)}, {ql(node.id)}, 'open', {cursor}, {'NULL' if skew is None else skew}, "
            f"{'NULL' if warning is None else ql(warning)})"
        )
    return {
        "session": sid,
        "node": node.id,
        "central_time_ms": central_ms,
        "clock_skew_ms": skew,
        "clock_warning": warning,
        "max_drift_ms": settings.max_drift_ms,
        "max_page_bytes": settings.max_page_bytes,
        "page_rows": settings.page_rows,
    }


def clock_skew(hello: dict[str, Any], central_ms: int) -> int | None:
    """How far the node's database clock runs ahead of ours (negative: behind), in ms.

    The node reads its clock just before sending the hello, so the figure is off by the
    request's travel time (milliseconds; seconds if the open was retried), far below
    any drift tolerance. A node too old to send its clock gets ``None`` (nothing
    measured), not an error.
    """
    node_ms = hello.get("node_clock_ms")
    if node_ms is None:
        return None
    if not isinstance(node_ms, int) or isinstance(node_ms, bool):
        raise ProtocolError(f"node_clock_ms must be the node's clock in Unix milliseconds, not {node_ms!r}")
    return node_ms - central_ms


def clock_warning(node_id: str, skew_ms: int | None, tolerance_ms: int) -> str | None:
    """What to tell an operator about a node's clock beyond the tolerance (else ``None``)."""
    if skew_ms is None or abs(skew_ms) <= tolerance_ms:
        return None
    side = "ahead of" if skew_ms > 0 else "behind"
    what = f"{node_id} runs {span(abs(skew_ms))} {side} central (tolerance {span(tolerance_ms)})"
    if skew_ms > 0:
        return f"{what}: its stamps are clamped; fix the node's clock (NTP)"
    return f"{what}: its edits carry old stamps and lose to concurrent edits made elsewhere; fix the node's clock (NTP)"


def span(ms: int) -> str:
    """A duration for people, rounded to its two largest units: '3d 2h', '1h 5min', '40 min', '1.5 s'."""
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    minutes = round(ms / 60_000)
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 24 * 60:
        hours, minutes = divmod(minutes, 60)
        return f"{hours}h {minutes}min" if minutes else f"{hours}h"
    days, hours = divmod(round(ms / 3_600_000), 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


@dataclass
class Session:
    id: str
    node_id: str
    status: str
    pull_cursor: int
    pull_watermark: int | None
    pull_pages: int | None


def load_session(cur: Any, node: Node, sid: str, *, lock: bool = False) -> Session:
    try:
        uuid.UUID(sid)
    except ValueError:
        raise SessionError(f"{sid!r} is not a session id") from None
    row = _one(
        cur,
        f"SELECT node_id, status, pull_cursor, pull_watermark, pull_pages FROM {SCHEMA}.sessions "
        f"WHERE id = {ql(sid)}{' FOR UPDATE' if lock else ''}",
    )
    if row is None or row[0] != node.id:
        raise SessionError(f"no session {sid} for node {node.id!r}: open a new session")
    return Session(sid, row[0], row[1], int(row[2]), None if row[3] is None else int(row[3]),
                   None if row[4] is None else int(row[4]))  # fmt: skip


@contextmanager
def _phase(store: PostgresStore, sid: str, name: str) -> Iterator[dict[str, Any]]:
    """Time a phase and record it (with anything the body adds) in the session's ``phases``."""
    info: dict[str, Any] = {}
    start = time.perf_counter()
    yield info
    info["seconds"] = round(time.perf_counter() - start, 4)
    with store.connection.cursor() as cur:
        cur.execute(
            f"UPDATE {SCHEMA}.sessions SET phases = phases || jsonb_build_object({ql(name)}, "
            f"{ql(json.dumps(info))}::jsonb), updated_at = now() WHERE id = {ql(sid)}"
        )


def fail_session(store: PostgresStore, sid: str, error: str) -> None:
    """Record an error on a session (the node may still retry the request)."""
    with store.connection.cursor() as cur:
        cur.execute(f"UPDATE {SCHEMA}.sessions SET error = {ql(error[:2000])}, updated_at = now() WHERE id = {ql(sid)}")


# ----------------------------------------------------------------------------- push


def receive_page(store: PostgresStore, node: Node, sid: str, page_no: int, data: bytes, settings: Settings) -> dict[str, Any]:
    """Check one pushed page and keep it until the push completes. Repeats are no-ops."""
    from tidesync.sync.protocol import PayloadTooLargeError

    if len(data) > settings.max_page_bytes:
        raise PayloadTooLargeError(
            f"page {page_no} is {len(data)} bytes, above the limit of {settings.max_page_bytes}; send smaller pages"
        )
    if page_no < 0:
        raise SessionError(f"page numbers start at 0, got {page_no}")
    table_name, rows = decode_page(data, store.registry)
    spec = store.registry[table_name]
    scope.check_push_table(spec, node)
    scope.check_push_facility(spec, rows, node)
    digest = hashlib.sha256(data).hexdigest()
    with transaction(store.connection) as cur:
        session = load_session(cur, node, sid)
        if session.status != "open":
            raise SessionError(f"session {sid} is {session.status}: its push is already complete")
        seen = _one(cur, f"SELECT digest FROM {SCHEMA}.push_pages WHERE session_id = {ql(sid)} AND page_no = {page_no}")
        if seen is not None:
            if seen[0] != digest:
                raise SessionError(f"page {page_no} of session {sid} was already received with different content")
            return {"page": page_no, "rows": rows.num_rows, "repeat": True}
        meta = pa.table({"session_id": [sid], "page_no": pa.array([page_no], pa.int32()),
                         "table_name": [table_name], "rows": pa.array([rows.num_rows], pa.int32()),
                         "digest": [digest], "data": pa.array([data], pa.binary())})  # fmt: skip
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS _tidesync_page (session_id text, page_no int, table_name text, "
                    "rows int, digest text, data bytea) ON COMMIT DELETE ROWS")  # fmt: skip
        ingest(cur, "_tidesync_page", meta, temporary=True)
        cur.execute(
            f"INSERT INTO {SCHEMA}.push_pages SELECT session_id::uuid, page_no, table_name, rows, digest, data "
            "FROM _tidesync_page ON CONFLICT DO NOTHING"
        )
        cur.execute(
            f"UPDATE {SCHEMA}.sessions SET push_pages = push_pages + 1, bytes_in = bytes_in + {len(data)}, "
            f"updated_at = now() WHERE id = {ql(sid)}"
        )
    return {"page": page_no, "rows": rows.num_rows, "repeat": False}


def complete_push(store: PostgresStore, node: Node, sid: str, pages: int, settings: Settings) -> dict[str, Any]:
    """Merge every pushed page in one transaction (once, however often it is asked)."""
    done_cursor = f"push:{sid}"
    with store.connection.cursor() as cur:
        session = load_session(cur, node, sid)
    if session.status != "open":
        return _push_summary(store, sid)
    if store.get_cursor(done_cursor):
        # Merged before a crash that came ahead of the bookkeeping: just finish that.
        with store.connection.cursor() as cur:
            cur.execute(f"UPDATE {SCHEMA}.sessions SET status = 'pushed', updated_at = now() WHERE id = {ql(sid)}")
        return _push_summary(store, sid)
    with _phase(store, sid, "push_merge") as info:
        batches = _read_pushed(store, sid, pages)
        scope.check_push_patients(store, batches, node)
        batches, restamped, clamps = _clamp(batches, store.registry, settings)
        result: ApplyResult | None = None
        for attempt in range(5):
            try:
                result = store.apply(batches, peer=node.id, cursor=(done_cursor, 1),
                                     options=ApplyOptions(restamped=restamped))  # fmt: skip
                break
            except SyncError:
                raise
            except Exception as exc:  # a deadlock with another node's push: take turns
                if "deadlock" not in str(exc) and "could not serialize" not in str(exc) or attempt == 4:
                    raise
                time.sleep(0.05 * 2**attempt)
        assert result is not None
        rows_in = sum(t.num_rows for t in batches.values())
        info.update(rows=rows_in, conflicts=result.total("conflicts"), quarantined=result.total("quarantined"),
                    clamped=len(clamps))  # fmt: skip
    with transaction(store.connection) as cur:
        if clamps:
            _record_clamps(cur, sid, node, clamps)
        cur.execute(
            f"UPDATE {SCHEMA}.sessions SET status = 'pushed', rows_in = {rows_in}, "
            f"conflicts = {result.total('conflicts')}, quarantined = {result.total('quarantined')}, "
            f"clamped = {len(clamps)}, updated_at = now() WHERE id = {ql(sid)}"
        )
        cur.execute(f"DELETE FROM {SCHEMA}.push_pages WHERE session_id = {ql(sid)}")
    return _push_summary(store, sid)


def _push_summary(store: PostgresStore, sid: str) -> dict[str, Any]:
    with store.connection.cursor() as cur:
        row = _one(cur, f"SELECT rows_in, conflicts, quarantined, clamped FROM {SCHEMA}.sessions WHERE id = {ql(sid)}")
    assert row is not None
    return {"rows": int(row[0]), "conflicts": int(row[1]), "quarantined": int(row[2]), "clamped": int(row[3])}


def _read_pushed(store: PostgresStore, sid: str, pages: int) -> dict[str, pa.Table]:
    with store.connection.cursor() as cur:
        cur.execute(f"SELECT page_no FROM {SCHEMA}.push_pages WHERE session_id = {ql(sid)} ORDER BY page_no")
        have = [int(r[0]) for r in cur.fetchall()]
    missing = sorted(set(range(pages)) - set(have))
    if missing or len(have) != pages:
        raise SessionError(
            f"push of session {sid} is incomplete: {pages} pages announced, missing {missing[:20]}"
            + (f", {len(have)} received" if not missing else "")
        )
    parts: dict[str, list[pa.Table]] = {}
    for n in range(pages):
        with store.connection.cursor() as cur:
            cur.execute(f"SELECT data FROM {SCHEMA}.push_pages WHERE session_id = {ql(sid)} AND page_no = {n}")
            data = cur.fetchone()[0]
        name, rows = decode_page(bytes(data), store.registry)
        parts.setdefault(name, []).append(rows)
    return {name: pa.concat_tables(ts) for name, ts in parts.items()}


def _clamp(
    batches: dict[str, pa.Table], registry: Registry, settings: Settings
) -> tuple[dict[str, pa.Table], dict[str, pa.Array], list[tuple[str, str, int, int]]]:
    """Bound every stamp to the central clock plus the drift tolerance.

    A node whose clock runs ahead would otherwise win every conflict until real time
    caught up. Clamped versions are re-stamped versions: they go back to their node
    (which adopts them, see ``ApplyOptions.own_node``) and are recorded in ``clamps``.
    """
    now = now_ms()
    out: dict[str, pa.Table] = {}
    restamped: dict[str, pa.Array] = {}
    clamps: list[tuple[str, str, int, int]] = []
    for name, table in batches.items():
        spec = registry[name]
        cols = [HLC, *([stamp_column(c.name) for c in spec.data_columns] if spec.field_wise else [])]
        any_mask = None
        original = table.column(HLC)
        for col in cols:
            values, mask = clamp_hlcs(table.column(col).combine_chunks(), now, settings.max_drift_ms)
            if not pc.any(mask).as_py():
                continue
            table = table.set_column(table.schema.get_field_index(col), table.schema.field(col), values)
            any_mask = mask if any_mask is None else pc.or_(any_mask, mask)
        if any_mask is not None:
            keys = _storage(table.column(spec.key)).filter(any_mask)
            restamped[name] = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
            texts = key_texts(spec, keys)
            before = original.filter(any_mask).to_pylist()
            after = table.column(HLC).filter(any_mask).to_pylist()
            clamps += [(name, k, int(b), int(a)) for k, b, a in zip(texts, before, after, strict=True)]
        out[name] = table
    return out, restamped, clamps


def _record_clamps(cur: Any, sid: str, node: Node, clamps: list[tuple[str, str, int, int]]) -> None:
    values = ", ".join(
        f"({ql(sid)}::uuid, {ql(node.id)}, {ql(t)}, {ql(k)}, {b}, {a})" for t, k, b, a in clamps[:10_000]
    )
    cur.execute(
        f"INSERT INTO {SCHEMA}.clamps (session_id, node_id, table_name, key, original_hlc, clamped_hlc) "
        f"VALUES {values}"
    )


# ----------------------------------------------------------------------------- pull


def prepare_pull(store: PostgresStore, reader: PostgresStore, node: Node, sid: str, settings: Settings) -> dict[str, Any]:
    """Cut everything the node may see and has not seen into pages, from one snapshot.

    ``reader`` is a second connection: rows stream from it (REPEATABLE READ) while
    pages are written through ``store`` in one transaction, so memory stays flat and a
    failure leaves no half-prepared pull. Asking again returns the same pages.
    """
    with transaction(store.connection) as cur:
        session = load_session(cur, node, sid, lock=True)  # one preparer per session
        if session.status == "open":
            raise SessionError(f"session {sid}: complete the push before pulling (POST .../push/complete)")
        if session.pull_pages is not None:
            return {"pages": session.pull_pages, "watermark": session.pull_watermark}
        start = time.perf_counter()
        pages = rows_out = bytes_out = 0
        page_table = "_tidesync_pull"
        cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {page_table} (page_no int, table_name text, rows int, "
                    "data bytea) ON COMMIT DELETE ROWS")  # fmt: skip
        with transaction(reader.connection, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY") as rcur:
            from tidesync.pg.capture import snapshot_watermark

            watermark = max(snapshot_watermark(rcur), session.pull_cursor)
            for spec in store.registry:
                if not spec.direction.pulls or watermark <= session.pull_cursor:
                    continue
                rcur.execute(scope.pull_sql(store.registry, spec, node, session.pull_cursor, watermark))
                for part in _pages_of(rcur.fetch_record_batch(), spec, settings.page_rows):
                    data = encode_page(spec.name, part)
                    page = pa.table({"page_no": pa.array([pages], pa.int32()), "table_name": [spec.name],
                                     "rows": pa.array([part.num_rows], pa.int32()),
                                     "data": pa.array([data], pa.binary())})  # fmt: skip
                    ingest(cur, page_table, page, temporary=True)
                    pages += 1
                    rows_out += part.num_rows
                    bytes_out += len(data)
        cur.execute(f"INSERT INTO {SCHEMA}.pull_pages SELECT {ql(sid)}::uuid, page_no, table_name, rows, data "
                    f"FROM {page_table}")  # fmt: skip
        phase = json.dumps({"seconds": round(time.perf_counter() - start, 4), "rows": rows_out, "pages": pages})
        cur.execute(
            f"UPDATE {SCHEMA}.sessions SET status = 'pulling', pull_watermark = {watermark}, pull_pages = {pages}, "
            f"rows_out = {rows_out}, bytes_out = {bytes_out}, updated_at = now(), "
            f"phases = phases || jsonb_build_object('pull_prepare', {ql(phase)}::jsonb) WHERE id = {ql(sid)}"
        )
    return {"pages": pages, "watermark": watermark}


def _pages_of(reader: Any, spec: TableSpec, page_rows: int) -> Iterator[pa.Table]:
    """Re-chunk a stream of record batches into tables of ``page_rows`` rows."""
    from tidesync.changes import conform

    buf: list[pa.RecordBatch] = []
    held = 0
    for batch in reader:
        if batch.num_rows == 0:
            continue
        buf.append(batch)
        held += batch.num_rows
        while held >= page_rows:
            table = pa.Table.from_batches(buf)
            yield conform(table.slice(0, page_rows), spec, "pull")
            rest = table.slice(page_rows)
            buf, held = rest.to_batches(), rest.num_rows
    if held:
        yield conform(pa.Table.from_batches(buf), spec, "pull")


def pull_page(store: PostgresStore, node: Node, sid: str, page_no: int) -> bytes:
    with store.connection.cursor() as cur:
        session = load_session(cur, node, sid)
        if session.pull_pages is None:
            raise SessionError(f"session {sid}: prepare the pull first (POST .../pull)")
        if not 0 <= page_no < session.pull_pages:
            raise SessionError(f"session {sid} has pull pages 0..{session.pull_pages - 1}, not {page_no}")
        cur.execute(f"SELECT data FROM {SCHEMA}.pull_pages WHERE session_id = {ql(sid)} AND page_no = {page_no}")
        return bytes(cur.fetchone()[0])


def end_session(store: PostgresStore, node: Node, sid: str, report: dict[str, Any]) -> dict[str, Any]:
    """Close a session with the node's own report (phase timings, what it applied)."""
    with transaction(store.connection) as cur:
        session = load_session(cur, node, sid, lock=True)
        if session.status != "ended":
            status = "failed" if report.get("error") else "ended"
            error = ql(str(report["error"])[:2000]) if report.get("error") else "error"
            cur.execute(
                f"UPDATE {SCHEMA}.sessions SET status = {ql(status)}, ended_at = now(), updated_at = now(), "
                f"error = {error}, phases = phases || jsonb_build_object('node', {ql(json.dumps(report))}::jsonb) "
                f"WHERE id = {ql(sid)}"
            )
            cur.execute(f"DELETE FROM {SCHEMA}.pull_pages WHERE session_id = {ql(sid)}")
            cur.execute(f"DELETE FROM {SCHEMA}.push_pages WHERE session_id = {ql(sid)}")
            cur.execute(f"DELETE FROM {SCHEMA}.cursors WHERE name = {ql('push:' + sid)}")
    return {"session": sid, "ended": True}


# ----------------------------------------------------------------------------- status


def sessions(store: PostgresStore, limit: int = 20) -> pa.Table:
    """The most recent sessions, newest first (what ``tidesync status`` shows on central)."""
    return _arrow(
        store,
        "SELECT id::text AS session, node_id AS node, status, opened_at, ended_at, rows_in, rows_out, "
        "bytes_in, bytes_out, conflicts, quarantined, clamped, phases::text AS phases, error, clock_skew_ms, "
        f"clock_warning FROM {SCHEMA}.sessions ORDER BY opened_at DESC LIMIT {int(limit)}",
    )


def nodes(store: PostgresStore) -> pa.Table:
    """Every node, its last good sync, and its clock as its latest session measured it."""
    return _arrow(
        store,
        "SELECT n.id AS node, n.kind, n.facility_id, n.created_at, n.revoked_at IS NOT NULL AS revoked, "
        f"(SELECT max(s.ended_at) FROM {SCHEMA}.sessions s WHERE s.node_id = n.id AND s.status = 'ended') "
        "AS last_sync, c.clock_skew_ms, c.clock_warning, c.opened_at AS clock_measured_at "
        f"FROM {SCHEMA}.nodes n LEFT JOIN LATERAL (SELECT s.clock_skew_ms, s.clock_warning, s.opened_at "
        f"FROM {SCHEMA}.sessions s WHERE s.node_id = n.id AND s.clock_skew_ms IS NOT NULL "
        "ORDER BY s.opened_at DESC LIMIT 1) c ON true ORDER BY n.id",
    )


def _arrow(store: PostgresStore, sql: str) -> pa.Table:
    with store.connection.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table()
