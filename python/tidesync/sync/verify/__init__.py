"""Verify a node against the central server, and repair what differs, without re-syncing.

``tidesync verify --db NODE [--repair]`` (docs/protocol.md "Verify"; the operator's view
in docs/operations.md "Verify and repair"). For each table central sends to nodes:

1. **node**: in one snapshot of its database, the keys it changed since its push cursor
   (its *pending* keys: the next push carries them) go to ``POST /v1/verify/digest``
   with its pull cursor; meanwhile it reads its other live rows and hashes them (the
   Rust core's ``row_hashes`` over every wire column: data and stamps), a large table
   over several connections sharing the snapshot;
2. **central**: reads the node's scope as the node holds it after its last pull
   (:func:`tidesync.sync.scope.snapshot_sql` as of the node's pull cursor: rows changed
   at central since then are on their way to the node and left out), hashes it, keeps
   the row hashes for a while, and answers with its range digest (row count and hash sum
   per bucket) without the node's pending keys. If it already holds such a read of the
   same scope and proves nothing it depends on changed since (every row version carries
   the transaction that wrote it), it answers from that read instead;
3. **node**: folds its own hashes into the same buckets and compares; for the buckets
   that differ it asks ``POST /v1/verify/rows`` for central's row hashes (from the read
   the digest came from), and compares row by row: the candidates;
4. **node**: asks ``POST /v1/verify/keys`` what central holds now for each candidate
   (live with its hash, deleted, never had, held in its quarantine, outside the node's
   scope, changed since the pull cursor) and classifies: ``differs``,
   ``missing_here``, ``only_here``, ``out_of_scope`` (pending ones are dropped);
5. **repair** (``--repair``): fetches central's versions of those keys
   (``POST /v1/verify/fetch``, an Arrow IPC page) and writes them verbatim, bypassing the
   merge (stamps can be equal while values differ), marked as coming from central
   (``_origin``) so the next push does not send them back; a row central never had is
   kept whole in the node's quarantine with the reason, then removed. One transaction
   on the node (:meth:`tidesync.store.Store.write_verbatim`), after checking that none
   of those rows changed here meanwhile.

Only digests, the row hashes of differing buckets and a few keys cross the network,
never rows (except the few a repair writes); the node's and central's reads overlap.

Modules: :mod:`.messages` (limits, states, the Arrow messages) and :mod:`.hashing` (row
hashes, buckets, digests) are shared; :mod:`.central_side` holds the ``/v1/verify/*``
handlers and :mod:`.scope_cache` central's kept reads; :mod:`.node_side` runs a verify
and a repair on the node, reading through :mod:`.node_reads`; :mod:`.pg_scan` reads a
large PostgreSQL table over several connections in one snapshot (both sides);
:mod:`.report` is what a verify returns.
"""

from __future__ import annotations

from tidesync.sync.verify.central_side import serve_digest, serve_fetch, serve_keys, serve_rows
from tidesync.sync.verify.hashing import choose_buckets, digest_columns, verifiable
from tidesync.sync.verify.messages import decode_message, encode_message
from tidesync.sync.verify.node_side import verify_node
from tidesync.sync.verify.report import Difference, TableReport, VerifyReport

__all__ = [
    "Difference",
    "TableReport",
    "VerifyReport",
    "choose_buckets",
    "decode_message",
    "digest_columns",
    "encode_message",
    "serve_digest",
    "serve_fetch",
    "serve_keys",
    "serve_rows",
    "verifiable",
    "verify_node",
]
