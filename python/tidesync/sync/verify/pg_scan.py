"""Reading and hashing every row of a large PostgreSQL query in one snapshot, over
several connections (both sides of a verify read their copy this way).

The transaction on the main connection exports its snapshot (``pg_export_snapshot``)
and helper connections import it, so every reader sees exactly the same rows. A large
table's blocks are split into ``ctid`` ranges, one per reader (PostgreSQL 14+ reads a
range with a TID Range Scan, touching only its blocks); each reader fetches its rows
(binary ``COPY`` through ADBC), conforms and hashes them in its own thread, and the
driver and the Rust core release the GIL, so decoding and hashing use several cores.
Which reader gets which row does not matter: digests are sums.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tidesync.pg.install import qi, ql
from tidesync.registry import TableSpec
from tidesync.sync.verify.hashing import conform_hashed, empty_hashes, hash_rows

#: Connections reading one large table together (1: the main connection alone).
READERS = 2
#: Tables of fewer blocks than this (8 KiB each: 64 MiB) are read by the main connection alone.
SPLIT_BLOCKS = 8192
#: TID Range Scans came with PostgreSQL 14; before that a ctid range scans the whole table.
MIN_VERSION = 140000


class SharedSnapshot:
    """Helper connections that see exactly the snapshot of the transaction open on
    ``cur`` (REPEATABLE READ), opened when first needed and closed by :meth:`close`.
    ``setup``: statements each helper transaction runs first (``SET LOCAL ...``)."""

    def __init__(self, cur: Any, dsn: str, setup: Sequence[str] = ()) -> None:
        self.cur, self.dsn, self.setup = cur, dsn, list(setup)
        self._snapshot: str | None = None
        self._helpers: list[tuple[Any, Any]] = []  # (connection, cursor in the imported snapshot)
        self._usable: bool | None = None

    def usable(self) -> bool:
        if self._usable is None:
            self.cur.execute("SELECT current_setting('server_version_num')::int")
            self._usable = int(self.cur.fetchone()[0]) >= MIN_VERSION
        return self._usable

    def helpers(self, n: int) -> list[Any]:
        """``n`` helper cursors, each in a transaction on the shared snapshot."""
        from tidesync.pg.conn import connect

        if self._snapshot is None:
            self.cur.execute("SELECT pg_export_snapshot()")
            self._snapshot = str(self.cur.fetchone()[0])
        while len(self._helpers) < n:
            conn = connect(self.dsn)
            cur = conn.cursor()
            try:
                cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                cur.execute(f"SET TRANSACTION SNAPSHOT {ql(self._snapshot)}")
                for statement in self.setup:
                    cur.execute(statement)
            except BaseException:
                cur.close()
                conn.close()
                raise
            self._helpers.append((conn, cur))
        return [cur for _, cur in self._helpers[:n]]

    def close(self) -> None:
        for conn, cur in self._helpers:
            try:
                cur.execute("ROLLBACK")  # read only: nothing to keep
            except Exception:  # noqa: BLE001 - a broken helper only needs closing
                pass
            cur.close()
            conn.close()
        self._helpers = []


def _blocks(cur: Any, table: str) -> int:
    cur.execute(f"SELECT pg_relation_size({ql(qi(table))}::regclass) / current_setting('block_size')::int")
    return int(cur.fetchone()[0])


def block_ranges(blocks: int, n: int) -> list[str]:
    """SQL conditions on ``t.ctid`` splitting a table of ``blocks`` blocks into ``n``
    ranges; the last one is open (blocks added since are not in the snapshot anyway)."""
    if n <= 1:
        return ["true"]
    step = max(1, -(-blocks // n))
    out = [f"t.ctid < '({step},0)'::tid"]
    out += [f"t.ctid >= '({i * step},0)'::tid AND t.ctid < '({(i + 1) * step},0)'::tid" for i in range(1, n - 1)]
    out.append(f"t.ctid >= '({(n - 1) * step},0)'::tid")
    return out


def _hash_query(cur: Any, sql: str, spec: TableSpec, leave_out: pa.Array, what: str) -> list[pa.Table]:
    cur.execute(sql)
    out = []
    for batch in cur.fetch_record_batch():
        if batch.num_rows == 0:
            continue
        rows = conform_hashed(batch, spec, what)
        if len(leave_out):
            rows = rows.filter(pc.invert(pc.is_in(rows.column(spec.key), value_set=leave_out)))
        out.append(hash_rows(spec, rows))
    return out


def scan_hashes(
    cur: Any, shared: SharedSnapshot | None, spec: TableSpec, query: Callable[[str], str], *,
    leave_out: pa.Array | None = None, readers: int | None = None, what: str = "rows",
) -> pa.Table:  # fmt: skip
    """``{key, bucket, hash}`` of the rows ``query(condition)`` gives (the columns of
    :func:`tidesync.sync.verify.hashing.hashed_schema`, read from table alias ``t``
    where ``condition`` holds), but the keys in ``leave_out``. With ``shared``, a table
    of at least :data:`SPLIT_BLOCKS` blocks is read by ``readers`` connections (default
    :data:`READERS`)."""
    leave_out = leave_out if leave_out is not None else pa.array([], spec.column(spec.key).type.arrow)
    wanted = READERS if readers is None else readers
    n, blocks = 1, 0
    if shared is not None and wanted > 1 and shared.usable():
        blocks = _blocks(cur, spec.name)
        n = wanted if blocks >= SPLIT_BLOCKS else 1
    ranges = block_ranges(blocks, n)
    if n == 1:
        parts = _hash_query(cur, query(ranges[0]), spec, leave_out, what)
    else:
        assert shared is not None
        helpers = shared.helpers(n - 1)
        # Leaving the block waits for every reader, also when this thread's read fails.
        with ThreadPoolExecutor(n - 1, thread_name_prefix="tidesync-verify-read") as pool:
            futures = [pool.submit(_hash_query, h, query(r), spec, leave_out, what)
                       for h, r in zip(helpers, ranges[1:], strict=True)]  # fmt: skip
            parts = _hash_query(cur, query(ranges[0]), spec, leave_out, what)
            for future in futures:
                parts.extend(future.result())
    return pa.concat_tables(parts) if parts else empty_hashes(spec)
