"""What central server and nodes agree on: versions, fingerprints, pages, errors.

Record data travels as **pages**: one Arrow IPC stream (zstd-compressed buffers)
holding change rows of one table in its wire schema, with the table's name in the
schema metadata. Everything else (session open, acknowledgements, reports) is small
JSON. Errors come back as JSON ``{"error": {"type": ..., "message": ...}}`` with an
HTTP status, and the client raises the matching :class:`tidesync.SyncError` subclass.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from tidesync.changes import conform
from tidesync.errors import AuthError, ProtocolError, SchemaMismatchError, SyncError
from tidesync.registry import Registry

#: Bumped when the protocol changes incompatibly; checked at session open.
#: 2: digests and row hashes (verify) hash byte strings with tidesync's own hash
#: (docs/semantics.md, "Digests"), so a node and a central server of different
#: versions would see every bucket differ.
#: 3: the same hash reads 17-64 byte strings in fewer pieces and rows end with one
#: folded multiply (faster digests; every digest changes again).
PROTOCOL_VERSION = 3
#: Schema metadata key naming a page's table.
TABLE_KEY = b"tidesync.table"
#: Rows per page a sender aims for (pages are also capped in bytes by the receiver).
PAGE_ROWS = 50_000
#: Largest page body the central server accepts by default.
MAX_PAGE_BYTES = 64 * 1024 * 1024
#: The name nodes use for the central server as a peer (``_origin`` of pulled rows).
CENTRAL_PEER = "central"
CONTENT_TYPE = "application/vnd.apache.arrow.stream"


class ForbiddenError(SyncError):
    """The node is not allowed to do this: a table it may not push, a row outside its scope."""


class PayloadTooLargeError(ProtocolError):
    """A page is larger than the central server accepts; send smaller pages."""


class SessionError(ProtocolError):
    """The session is unknown, finished, or in the wrong phase for this request."""


class UnavailableError(SyncError):
    """The central server could not be reached or answered with a server error (retryable)."""


#: HTTP status of each error type the server sends, and the class the client raises.
ERRORS: dict[str, tuple[int, type[SyncError]]] = {
    "AuthError": (401, AuthError),
    "ForbiddenError": (403, ForbiddenError),
    "SessionError": (409, SessionError),
    "SchemaMismatchError": (409, SchemaMismatchError),
    "PayloadTooLargeError": (413, PayloadTooLargeError),
    "ProtocolError": (422, ProtocolError),
    "UnavailableError": (503, UnavailableError),
}


def error_type(exc: SyncError) -> str:
    """The wire name of an error (the nearest class in :data:`ERRORS`)."""
    for cls in type(exc).__mro__:
        if cls.__name__ in ERRORS:
            return cls.__name__
    return "ProtocolError"


def fingerprint(registry: Registry) -> str:
    """A short hash of every table's wire schema, direction, scope and merge mode.

    Two nodes with the same fingerprint exchange pages that mean the same thing.
    """
    desc = []
    for spec in registry:
        desc.append(
            {
                "table": spec.name,
                "key": spec.key,
                "direction": spec.direction.value,
                "scope": [spec.scope.kind.value, spec.scope.column, spec.scope.sensitive_column],
                "merge": spec.merge,
                "schema": [[f.name, str(f.type)] for f in spec.wire_schema()],
            }
        )
    blob = json.dumps({"registry": registry.name, "tables": desc}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def encode_page(table_name: str, rows: pa.Table) -> bytes:
    """One page: ``rows`` as an Arrow IPC stream with zstd-compressed buffers."""
    schema = rows.schema.with_metadata({TABLE_KEY: table_name.encode()})
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, schema, options=options) as writer:
        writer.write_table(rows.replace_schema_metadata(schema.metadata), max_chunksize=PAGE_ROWS)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def split_pages(table_name: str, rows: pa.Table, page_rows: int = PAGE_ROWS) -> list[bytes]:
    """A table's rows as pages of at most ``page_rows`` rows (an empty table gives none)."""
    return [encode_page(table_name, rows.slice(i, page_rows)) for i in range(0, rows.num_rows, page_rows)]


def decode_page(data: bytes, registry: Registry) -> tuple[str, pa.Table]:
    """Read a page back: its table's name and rows cast to the table's wire schema.

    A page that is not an Arrow stream, names no table or an unknown one, or whose
    columns do not match the registry raises :class:`ProtocolError` or
    :class:`SchemaMismatchError`, so a bad page is refused before anything is applied.
    """
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        table = reader.read_all()
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ProtocolError(f"page is not a readable Arrow IPC stream ({str(exc).splitlines()[0]})") from None
    meta = table.schema.metadata or {}
    name = meta.get(TABLE_KEY)
    if name is None:
        raise ProtocolError("page has no table name (schema metadata 'tidesync.table')")
    table_name = name.decode()
    if table_name not in registry:
        raise SchemaMismatchError(
            f"page is for unknown table {table_name!r}; the registry {registry.name!r} syncs {', '.join(registry.names)}"
        )
    return table_name, conform(table.replace_schema_metadata(None), registry[table_name], "page")
