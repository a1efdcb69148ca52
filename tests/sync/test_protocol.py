"""Pages and fingerprints, without a server."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tidesync.errors import ProtocolError, SchemaMismatchError
from tidesync.registry import Column, LogicalType, Registry, TableSpec
from tidesync.schemas.demo import REGISTRY
from tidesync.sync.protocol import decode_page, encode_page, fingerprint, split_pages


def _patients(n: int) -> pa.Table:
    spec = REGISTRY["patients"]
    cols = {}
    for f in spec.wire_schema():
        if f.name == "id":
            cols[f.name] = pa.array([i.to_bytes(16, "big") for i in range(n)], f.type)
        elif f.name == "_deleted":
            cols[f.name] = pa.array([False] * n)
        elif f.name == "_node":
            cols[f.name] = pa.array(["n"] * n)
        elif f.name in ("_hlc", "display_id"):
            cols[f.name] = pa.array(range(n), pa.int64()).cast(f.type)
        else:
            cols[f.name] = pa.nulls(n, f.type)
    return pa.table(cols, schema=spec.wire_schema())


def test_pages_round_trip_compressed() -> None:
    rows = _patients(1000)
    page = encode_page("patients", rows)
    assert page[:4] == b"\xff\xff\xff\xff"  # an Arrow IPC stream
    name, back = decode_page(page, REGISTRY)
    assert name == "patients" and back.equals(rows)
    pages = split_pages("patients", rows, page_rows=300)
    assert len(pages) == 4
    assert pa.concat_tables([decode_page(p, REGISTRY)[1] for p in pages]).equals(rows)
    assert split_pages("patients", rows.slice(0, 0)) == []


def test_bad_pages() -> None:
    with pytest.raises(ProtocolError):
        decode_page(b"", REGISTRY)
    page = encode_page("nonesuch", _patients(1))
    with pytest.raises(SchemaMismatchError, match="unknown table 'nonesuch'"):
        decode_page(page, REGISTRY)
    with pytest.raises(SchemaMismatchError, match="missing columns"):
        decode_page(encode_page("patients", _patients(2).drop_columns(["first_name"])), REGISTRY)


def test_fingerprint_is_stable_and_sensitive() -> None:
    assert fingerprint(REGISTRY) == fingerprint(REGISTRY)
    one = Registry([TableSpec("t", (Column("id", LogicalType.UUID), Column("a", LogicalType.TEXT)))])
    other = Registry([TableSpec("t", (Column("id", LogicalType.UUID), Column("a", LogicalType.INT64)))])
    assert fingerprint(one) != fingerprint(other) != fingerprint(REGISTRY)
