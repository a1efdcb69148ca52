"""The conflict log, for people: ``tidesync conflicts list|show``.

Every concurrent edit that lost keeps its losing values in the log (see
docs/semantics.md). Listing shows what lost where; showing one conflict puts the
losing version next to the row as it is now, field by field, and says why the winner
won: the later hybrid-logical-clock stamp, or on equal stamps the node id that sorts
last (the total order merge uses everywhere).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from tidesync.changes import keys_from_texts, rows_as_json
from tidesync.errors import SyncError
from tidesync.registry import DELETED
from tidesync.store import Store


def stamp_text(hlc: int) -> str:
    """An HLC stamp as its wall-clock time and counter, e.g. ``2026-11-21T10:00:00.123Z #2``."""
    when = datetime.fromtimestamp((hlc >> 16) / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return f"{when} #{hlc & 0xFFFF}"


def why_won(winner_hlc: int, winner_node: str, loser_hlc: int, loser_node: str) -> str:
    if winner_hlc != loser_hlc:
        return (
            f"later stamp: {stamp_text(winner_hlc)} by {winner_node} "
            f"after {stamp_text(loser_hlc)} by {loser_node}"
        )
    return f"same stamp {stamp_text(winner_hlc)}: node {winner_node!r} sorts after {loser_node!r}"


def list_conflicts(store: Store, table: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` conflicts (of ``table``), newest first."""
    log = store.conflicts(table)
    log = log.slice(max(0, log.num_rows - limit))
    out = []
    for r in reversed(log.to_pylist()):
        out.append(
            {
                "id": r["id"], "table": r["table_name"], "key": r["key"], "lost_columns": list(r["lost_columns"]),
                "loser": {"hlc": r["loser_hlc"], "node": r["loser_node"], "at": stamp_text(r["loser_hlc"])},
                "winner": {"hlc": r["winner_hlc"], "node": r["winner_node"], "at": stamp_text(r["winner_hlc"])},
                "peer": r["peer"], "recorded_at": r["recorded_at"],
            }
        )  # fmt: skip
    return out


def show_conflict(store: Store, conflict_id: int) -> dict[str, Any]:
    """One conflict: both versions field by field, which won and why, when."""
    found = store.conflicts(conflict_id=conflict_id).to_pylist()
    if not found:
        raise SyncError(f"no conflict with id {conflict_id} in this database (see `tidesync conflicts list`)")
    r = found[0]
    if r["table_name"] not in store.registry:
        raise SyncError(f"conflict {conflict_id} is on table {r['table_name']!r}, which this registry does not sync")
    spec = store.registry[r["table_name"]]
    loser = json.loads(r["loser_row"])
    now_rows: pa.Table = store.read_rows(spec.name, keys_from_texts(spec, [r["key"]]))
    deleted_now = bool(now_rows.num_rows and now_rows.column(DELETED)[0].as_py())
    current = json.loads(rows_as_json(spec, now_rows)[0]) if now_rows.num_rows and not deleted_now else None
    lost = set(r["lost_columns"])
    fields = [
        {"column": c.name, "loser": loser.get(c.name), "now": None if current is None else current.get(c.name),
         "lost": c.name in lost}
        for c in spec.data_columns
    ]  # fmt: skip
    return {
        "id": r["id"], "table": spec.name, "key": r["key"], "recorded_at": r["recorded_at"], "peer": r["peer"],
        "loser": {"hlc": r["loser_hlc"], "node": r["loser_node"], "at": stamp_text(r["loser_hlc"])},
        "winner": {"hlc": r["winner_hlc"], "node": r["winner_node"], "at": stamp_text(r["winner_hlc"])},
        "why": why_won(r["winner_hlc"], r["winner_node"], r["loser_hlc"], r["loser_node"]),
        "row_now": "deleted" if deleted_now else ("absent" if current is None else "present"),
        "fields": fields,
    }  # fmt: skip
