"""What both sides of a verify agree on: limits, the names of states and kinds, and the
wire form of the Arrow messages (docs/protocol.md "Verify").

Limits are read through this module (``messages.MAX_PENDING``), never copied into
another one, so that changing one here changes it for both sides.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa

from tidesync.errors import ProtocolError

#: Schema metadata key of a verify message (JSON): the parameters next to the Arrow data.
META_KEY = b"tidesync.verify"
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

#: ``progress(what, done, total)``: ``what`` is ``"tables"`` (tables compared) or
#: ``"repair"`` (repair steps).
Progress = Callable[[str, int, int], None]


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
