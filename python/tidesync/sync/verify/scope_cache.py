"""Central's recent reads of nodes' scopes, kept as row hashes for a while.

A digest request makes central read and hash one table of the node's scope as of the
node's pull cursor (millions of rows: the expensive part of a verify). The row hashes of
that read are kept here, in this process, so that

- the drill-down that follows (``/v1/verify/rows``: the row hashes of the buckets that
  differ) is answered from them, from the very read the digest came from (the digest
  names it, the drill-down names it back), instead of reading the scope again; and
- the next digest request for the same node, table and pull cursor is answered from
  them too, if central proves in its current snapshot that nothing they depend on has
  changed since (:func:`unchanged_since`); otherwise it reads afresh.

The proof is exact: PostgreSQL stamps every row version with the transaction that wrote
it (``xmin``), whether it came through the sync engine or past it (triggers off, a
manual fix), so "no visible row of the table, of the marks table and of the sensitivity
table has an ``xmin`` at or past the read's snapshot, and each holds as many rows as
then" means they hold exactly the rows the read saw (a deletion lowers the count; an
insert or update leaves a new ``xmin``). A write through the engine also stamps
``_cursor``, which an index finds at once: on a busy table the check fails in
microseconds and costs nothing. Damage below PostgreSQL (a disk changing a page in
place) leaves no ``xmin`` behind, so a read is reused for at most :data:`MAX_AGE_SECONDS`
after it was made: the next fresh read sees such damage.

Memory is bounded (:func:`budget_bytes`, least recently used first out; a read larger
than the budget is not kept) and entries go after :data:`IDLE_SECONDS`. Each server
process has its own: with several workers a drill-down may reach another process, which
then reads the keys of the scope again (slower, same answer).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from tidesync.pg.install import qi, ql
from tidesync.registry import Registry, ScopeKind, TableSpec

#: Environment variable: MiB of row hashes a central server process keeps (0: none).
BUDGET_ENV = "TIDESYNC_VERIFY_CACHE_MB"
#: Its default: about 20 million rows of uuid keys (28 bytes a row).
DEFAULT_BUDGET_MB = 512
#: An entry nobody used for this long is dropped.
IDLE_SECONDS = 15 * 60
#: A read is reused (proved current) for at most this long after it was made.
MAX_AGE_SECONDS = 60 * 60

#: (central database instance, node id, node facility, table, pull cursor).
Key = tuple[str, str, str, str, int]


def budget_bytes() -> int:
    raw = os.environ.get(BUDGET_ENV, "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_BUDGET_MB
    except ValueError:
        mb = DEFAULT_BUDGET_MB
    return max(0, int(mb * 2**20))


def fits(nbytes: int) -> bool:
    """Whether a read of ``nbytes`` can be kept at all (a budget of 0 keeps none)."""
    budget = budget_bytes()
    return budget > 0 and nbytes <= budget


@dataclass
class ScopeRead:
    """The row hashes of one read of a table of a node's scope (exclusions not applied)."""

    keys: pa.Array
    #: Buckets of ``HASH_BUCKETS`` (uint32) and row hashes (uint64), row for row.
    buckets: np.ndarray[Any, Any]
    hashes: np.ndarray[Any, Any]
    #: The reading snapshot's xmin (an xid8): every transaction before it had ended.
    xmin: int
    #: Rows of the table and of the tables its scope depends on, in that snapshot.
    counts: dict[str, int]
    #: Names this read in a digest's answer; a drill-down naming it is answered from it.
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    made: float = field(default_factory=time.monotonic)
    used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.buckets.nbytes + self.hashes.nbytes)


class ScopeCache:
    """Least recently used :class:`ScopeRead` entries within a byte budget; thread safe
    (the server answers requests on worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, ScopeRead] = OrderedDict()

    def get(self, key: Key) -> ScopeRead | None:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            entry = self._entries.get(key)
            if entry is not None:
                entry.used = now
                self._entries.move_to_end(key)
            return entry

    def put(self, key: Key, entry: ScopeRead) -> bool:
        """Keep ``entry`` (replacing the key's older one); False if it does not fit."""
        budget = budget_bytes()
        with self._lock:
            self._entries.pop(key, None)
            if not fits(entry.nbytes):
                return False
            self._entries[key] = entry
            total = sum(e.nbytes for e in self._entries.values())
            while total > budget:
                _, old = self._entries.popitem(last=False)
                total -= old.nbytes
            return True

    def drop(self, key: Key) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _expire(self, now: float) -> None:
        for key in [k for k, e in self._entries.items() if now - e.used > IDLE_SECONDS]:
            del self._entries[key]


#: This process's cache.
CACHE = ScopeCache()


def instance(cur: Any, dsn: str) -> str:
    """Which database this is, down to the server's start: a database dropped and made
    again, or a server restored from a backup and restarted, is another instance (its
    transaction ids may go back)."""
    cur.execute("SELECT d.oid::text, pg_postmaster_start_time()::text FROM pg_database d "
                "WHERE d.datname = current_database()")  # fmt: skip
    oid, started = cur.fetchone()
    return f"{dsn} {oid} {started}"


def scope_relations(registry: Registry, spec: TableSpec) -> list[str]:
    """The tables whose rows decide which rows of ``spec`` a node holds and what they
    contain (see :func:`tidesync.sync.scope.scope_condition`)."""
    out = [spec.name]
    if spec.scope.kind is ScopeKind.PATIENT and registry.marks is not None:
        out.append(registry.marks.table)
    if spec.scope.sensitive_column and registry.sensitivity is not None:
        out.append(registry.sensitivity.table)
    return list(dict.fromkeys(out))


def row_counts(cur: Any, relations: list[str]) -> dict[str, int]:
    cur.execute(" UNION ALL ".join(f"SELECT {ql(r)}, count(*) FROM {qi(r)}" for r in relations))
    return {str(name): int(n) for name, n in cur.fetchall()}


def unchanged_since(cur: Any, entry: ScopeRead, relations: list[str]) -> bool:
    """Whether the tables of ``relations`` hold, in ``cur``'s snapshot, exactly the rows
    they held in the snapshot ``entry`` was read in (module docstring); False also once
    the read is older than :data:`MAX_AGE_SECONDS`."""
    if set(entry.counts) != set(relations) or time.monotonic() - entry.made > MAX_AGE_SECONDS:
        return False
    since = f"'{int(entry.xmin)}'::xid8"
    # Fast, through the `_cursor` index: a write through the engine since then.
    cur.execute("SELECT " + " OR ".join(f"EXISTS (SELECT 1 FROM {qi(r)} WHERE _cursor >= {since})" for r in relations))
    if cur.fetchone()[0]:
        return False
    # Exact: any row version written since (by whatever means) has an xmin at or past
    # the read's xmin, i.e. an age no greater than its; a deletion leaves fewer rows.
    # (age() counts from a point fixed for the whole transaction.)
    cur.execute(f"SELECT age('{int(entry.xmin) % 2**32}'::xid)")
    limit = int(cur.fetchone()[0])
    for r in relations:
        cur.execute(f"SELECT count(*), count(*) FILTER (WHERE age(xmin) <= {limit}) FROM {qi(r)}")
        rows, newer = cur.fetchone()
        if int(newer) or int(rows) != entry.counts[r]:
            return False
    return True
