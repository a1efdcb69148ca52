"""The node's side of a verify: compare digests, then row hashes of the buckets that
differ, classify each key that differs by asking central about it, and with
``--repair`` write central's versions through :meth:`tidesync.store.Store.write_verbatim`."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tidesync.changes import ApplyPlan, TableApplyStats, key_texts, keys_from_texts, new_rows, with_origin
from tidesync.errors import ProtocolError, SyncError
from tidesync.registry import BASE_HLC, DELETED, HLC, NODE, Registry, TableSpec
from tidesync.sync.protocol import CENTRAL_PEER, decode_page, fingerprint
from tidesync.sync.verify import messages
from tidesync.sync.verify.hashing import bucket_sums, coarse, empty_keys, hash_rows, in_buckets, verifiable
from tidesync.sync.verify.messages import (
    ABSENT,
    DELETED_AT_CENTRAL,
    DIFFERS,
    LIVE,
    MISSING_HERE,
    ONLY_HERE,
    OUT_OF_SCOPE,
    PENDING,
    QUARANTINED,
    STRAY_REASON,
    Progress,
    decode_message,
)
from tidesync.sync.verify.node_reads import node_snapshot
from tidesync.sync.verify.report import Difference, TableReport, VerifyReport

if TYPE_CHECKING:
    from tidesync.store import Store
    from tidesync.sync.client import CentralClient


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


def _texts_to_hashes(spec: TableSpec, keys: pa.Array | pa.ChunkedArray, hashes: Any) -> dict[str, int | None]:
    return dict(zip(key_texts(spec, keys), hashes.to_pylist(), strict=True))


def verify_node(
    store: Store, client: CentralClient, *, repair: bool = False, progress: Progress | None = None,
    tables: Sequence[str] | None = None, fresh: bool = False,
) -> VerifyReport:  # fmt: skip
    """Compare this node's copy of every table central sends it with central's, and with
    ``repair`` write central's versions over what differs (one transaction here).
    ``fresh``: central reads its copy again even where it could reuse a recent read.

    Keys changed on either side since the last sync are left out (the next cycle carries
    them); rows the node holds outside its current scope are reported as
    ``out_of_scope``, not as differences. Raises :class:`SyncError` when the node has too
    many changes waiting to be pushed (sync first)."""
    started = time.perf_counter()
    step = progress or (lambda what, done, total: None)
    registry = store.registry
    report = VerifyReport(node=store.node_id(), repair=repair)
    specs = [s for s in (registry.ordered(tables) if tables else registry) if verifiable(s)]
    meter = _Meter(client, report)
    fp = fingerprint(registry)
    found: list[_Candidates] = []
    with node_snapshot(store) as snap, _requests() as http:
        push, pull = snap.cursors()
        report.pull_cursor = pull
        if pull == 0:
            raise SyncError("this node has never pulled from central, so there is no copy to verify yet: "
                            "run `tidesync sync` first")  # fmt: skip
        pending: dict[str, pa.Array] = {}
        for spec in specs:
            pending[spec.name] = snap.pending(spec, push) if spec.direction.pushes else empty_keys(spec)
            if len(pending[spec.name]) > messages.MAX_PENDING:
                raise SyncError(f"{len(pending[spec.name])} changes of {spec.name} wait to be pushed from this node "
                                f"(at most {messages.MAX_PENDING} are left out of a verify): run `tidesync sync` "
                                "first, then verify")  # fmt: skip
        asks = {s.name: {"table": s.name, "pull_cursor": pull, "fingerprint": fp,
                         "exclude": key_texts(s, pending[s.name])} for s in specs}  # fmt: skip
        digest_asks = {name: {**ask, "fresh": True} if fresh else ask for name, ask in asks.items()}
        # Central digests its copies (one request at a time, in a worker thread) while
        # this thread reads and hashes the node's: the two reads overlap.
        digests = [http.submit(meter.post, "/v1/verify/digest", body=digest_asks[s.name]) for s in specs]
        drills: list[tuple[TableReport, Future[Any], dict[str, int | None]]] = []
        for i, spec in enumerate(specs):
            t0 = time.perf_counter()
            table = TableReport(spec.name, pending_here=len(pending[spec.name]))
            report.tables.append(table)
            mine = snap.row_hashes(spec, pending[spec.name])
            theirs, answer = decode_message(digests[i].result().content, "central's verify digest")
            buckets = table.buckets = int(answer["buckets"])
            table.rows_here, table.rows_central = mine.num_rows, int(answer.get("rows", 0))
            table.central_reused = bool(answer.get("reused", False))
            report.watermark = int(answer.get("watermark", 0))
            at = mine.column("bucket").to_numpy()
            rows_n, sums_n = bucket_sums(coarse(at, buckets), mine.column("hash").to_numpy(), buckets)
            rows_c = theirs.column("rows").to_numpy().astype(np.uint32)
            sums_c = theirs.column("hash").to_numpy().astype(np.uint64)
            if len(rows_c) != buckets:
                raise ProtocolError(f"central's digest of {spec.name} has {len(rows_c)} buckets, not {buckets}")
            differ = np.flatnonzero((rows_c != rows_n) | (sums_c != sums_n))
            table.differing_buckets = len(differ)
            if len(differ):
                near = mine.filter(pa.array(in_buckets(at, buckets, differ)))
                here = _texts_to_hashes(spec, near.column(spec.key), near.column("hash"))
                ask = {**asks[spec.name], "buckets": buckets, "differing": [int(x) for x in differ],
                       "read": answer.get("read")}  # the read central kept for this digest, if any
                drills.append((table, http.submit(meter.post, "/v1/verify/rows", body=ask), here))
            report.phases[spec.name] = round(time.perf_counter() - t0, 4)
            step("tables", i + 1, len(specs))
        for table, rows_asked, here in drills:
            spec = registry[table.table]
            theirs, _ = decode_message(rows_asked.result().content, "central's verify rows")
            there = _texts_to_hashes(spec, theirs.column(spec.key), theirs.column("hash"))
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
        _repair(store, meter, registry, found, by_table, fp, step)
        report.phases["repair"] = round(time.perf_counter() - t0, 4)
    report.seconds = round(time.perf_counter() - started, 4)
    return report


def _chunks(items: Sequence[str], n: int | None = None) -> Iterator[Sequence[str]]:
    n = n or messages.MAX_KEYS
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


def _hash_map(spec: TableSpec, rows: pa.Table) -> dict[str, int | None]:
    """Key text -> row hash of live rows (tombstones are None: no live row)."""
    if rows.num_rows == 0:
        return {}
    live = rows.filter(pc.invert(rows.column(DELETED))) if DELETED in rows.column_names else rows
    out: dict[str, int | None] = {k: None for k in key_texts(spec, rows.column(spec.key))}
    if live.num_rows:
        h = hash_rows(spec, live)
        out.update(_texts_to_hashes(spec, h.column(spec.key), h.column("hash")))
    return out


def _repair(store: Store, meter: _Meter, registry: Registry, found: list[_Candidates],
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
    with store.write_verbatim(CENTRAL_PEER) as txn:
        for spec in order:
            table, cand = by_table[spec.name], wanted[spec.name]
            diffs = [d for d in table.differences if d.kind != OUT_OF_SCOPE]
            if not diffs:
                continue
            local = txn.current(spec.name, keys_from_texts(spec, [d.key for d in diffs]))
            plans[spec.name], stray = _plan_repair(spec, diffs, cand, local, versions[spec.name], table)
            if stray is not None:
                strays[spec.name] = stray
        stats = {name: TableApplyStats() for name in plans}
        for spec in reversed(order):  # children first: a stray parent goes after its stray children
            if spec.name in strays:
                table = by_table[spec.name]
                table.quarantine_ids = txn.set_aside(spec.name, strays[spec.name], STRAY_REASON)
                table.quarantined = strays[spec.name].num_rows
        for spec in order:  # parents first
            if spec.name in plans:
                txn.upsert(plans[spec.name], stats[spec.name])
                done += 1
                step("repair", done, 2 * len(plans))
        for spec in reversed(order):  # children first
            if spec.name in plans:
                txn.delete(plans[spec.name], stats[spec.name])
                done += 1
                step("repair", done, 2 * len(plans))
    for name, st in stats.items():
        table = by_table[name]
        table.written, table.deleted = st.inserted + st.updated, st.deleted
        # Central's versions this database refused (a constraint): held in the quarantine
        # with their reason, as a pull would have done.
        table.refused = st.quarantined


def _plan_repair(spec: TableSpec, diffs: list[Difference], cand: _Candidates, local: pa.Table, theirs: pa.Table,
                 table: TableReport) -> tuple[ApplyPlan, pa.Table | None]:  # fmt: skip
    """What to write for one table's differences (and the stray rows to set aside), given
    the local versions now (``local``, locked) and central's (``theirs``); a key whose
    local state changed since it was compared is skipped."""
    now = _hash_map(spec, local)
    dead_here = set(key_texts(spec, local.filter(local.column(DELETED)).column(spec.key)))
    central = dict(zip(key_texts(spec, theirs.column(spec.key)), range(theirs.num_rows), strict=True))
    up_ins: list[int] = []
    up_upd: list[int] = []
    dels: list[int] = []
    stray: list[Difference] = []
    revive: list[str] = []
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
    strays = None
    if stray:
        gone = keys_from_texts(spec, [d.key for d in stray])
        strays = local.filter(pc.is_in(local.column(spec.key), value_set=gone))
        for d in stray:
            d.repair = "quarantined: kept in the quarantine, removed here"

    def rows_at(idx: list[int]) -> pa.Table:
        return theirs.take(pa.array(idx, pa.int64()))

    plan = ApplyPlan(
        spec,
        inserts=new_rows(spec, rows_at(up_ins), CENTRAL_PEER),
        updates=new_rows(spec, rows_at(up_upd), CENTRAL_PEER),
        deletes=with_origin(rows_at(dels).select([spec.key, HLC, NODE, BASE_HLC]), CENTRAL_PEER),
        revived=keys_from_texts(spec, revive),
        conflicts=pa.table({}),
        unchanged=0,
    )
    return plan, strays
