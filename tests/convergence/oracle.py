"""The oracle: a plain-Python model of what every node must end up holding.

Every version an application commits anywhere is recorded here exactly as its node's
triggers stamped it (read back inside the writing transaction). Merge is a maximum
under total orders (docs/semantics.md), so once every node has seen everything, each
row must be the merge of every version ever written of it — computed here with
:mod:`tidesync.reference`, the plain-Python merge, never the native one under test.

Two things bend that picture, both by design:

- **Clamping.** The central server bounds stamps that run ahead of its clock
  (``tidesync.clamps``): a version from a node whose clock is days ahead takes part
  with its stamps lowered to the clamp value. :meth:`Oracle.expected` applies the
  recorded clamps before merging.
- **Versions never sent.** A node that edits a row twice before syncing sends only
  the second version; the first is superseded on its own node. For clamped nodes the
  unsent version's raw stamps would wrongly win, so those versions are left out of
  the merge (they must still pass :meth:`Oracle.lost_writes`).
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from tidesync import reference
from tidesync.registry import DELETED, HLC, NODE, Registry, TableSpec, stamp_column


@dataclass
class Written:
    """One committed version, as the writing node's triggers stamped it."""

    table: str
    key: bytes
    row: dict[str, Any]
    #: Written while the node's clock ran ahead beyond the drift tolerance.
    skewed_ahead: bool = False


@dataclass
class Oracle:
    registry: Registry
    writes: list[Written] = field(default_factory=list)

    def record(self, table: str, versions: pa.Table, *, max_drift_ms: int) -> None:
        """Keep ``versions`` as committed just now. A stamp beyond true time plus the
        drift tolerance will be clamped when pushed: not only while a clock is ahead, but
        also after it is fixed, when a row stamped in the future is edited again (the
        trigger then stamps one above the old stamp, never backwards)."""
        spec = self.registry[table]
        bound = (int(time.time() * 1000) + max_drift_ms) << 16
        for row in versions.to_pylist():
            self.writes.append(Written(table, row[spec.key], row, row[HLC] > bound))

    def keys(self, table: str) -> set[bytes]:
        return {w.key for w in self.writes if w.table == table}

    # ------------------------------------------------------------------ expected state

    def effective(self, w: Written, clamps: dict[tuple[str, bytes, int], int]) -> dict[str, Any] | None:
        """The version as it takes part in the network: stamps lowered to the clamp the
        central server applied when it was pushed; None for a skewed version that was
        never pushed (superseded on its own node first)."""
        if not w.skewed_ahead:
            return w.row
        bound = clamps.get((w.table, w.key, w.row[HLC]))
        if bound is None:
            return None
        spec = self.registry[w.table]
        row = dict(w.row)
        for col in _stamp_columns(spec):
            if row[col] is not None and row[col] > bound:
                row[col] = bound
        return row

    def expected(self, clamps: dict[tuple[str, bytes, int], int]) -> dict[str, dict[bytes, dict[str, Any]]]:
        """Per table, per key: the merge of every version that took part."""
        out: dict[str, dict[bytes, dict[str, Any]]] = {}
        by_table: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for w in self.writes:
            row = self.effective(w, clamps)
            if row is not None:
                by_table[w.table].append(row)
        for name, rows in by_table.items():
            spec = self.registry[name]
            schema = spec.wire_schema()
            versions = pa.Table.from_pylist(rows, schema=schema)
            merged = reference.merge(schema.empty_table(), versions, spec.key, "field" if spec.field_wise else "record")
            out[name] = {r[spec.key]: r for r in merged.rows.to_pylist()}
        return out

    # ------------------------------------------------------------------ nothing lost

    def lost_writes(
        self,
        final: dict[str, dict[bytes, dict[str, Any]]],
        logged: set[tuple[str, bytes, int, str]],
        clamps: dict[tuple[str, bytes, int], int],
    ) -> tuple[dict[str, int], list[str]]:
        """Check that every committed write is present, superseded by a later stamp, or
        in a conflict log (``logged``: table, key, loser hlc, loser node). Per field for
        field-wise tables. Returns counts per outcome and the writes that were lost."""
        counts = {"present": 0, "superseded": 0, "logged": 0, "unchanged": 0}
        lost: list[str] = []
        for w in self.writes:
            spec = self.registry[w.table]
            now = final[w.table].get(w.key)
            eff = self.effective(w, clamps)
            if eff is None:
                # A clamped node's version that was never pushed: its own next version
                # replaced it before a sync (or it lost to the clamped copy: then logged).
                if self._replaced_on_its_node(w):
                    counts["superseded"] += 1
                    continue
                eff = w.row
            if now is None:
                lost.append(f"{w.table} {_key_text(w.key)}: written by {w.row[NODE]} but absent everywhere")
                continue
            if (w.table, w.key, w.row[HLC], w.row[NODE]) in logged or (
                w.table, w.key, eff[HLC], w.row[NODE]) in logged:  # fmt: skip
                counts["logged"] += 1
                continue
            if spec.field_wise and not w.row[DELETED] and not now[DELETED]:
                # A field-wise version carries only the fields it stamped itself; the
                # others are earlier versions' values, accounted for under those.
                own = [c.name for c in spec.data_columns if w.row[stamp_column(c.name)] == w.row[HLC]]
                if not own:
                    # An UPDATE that changed no value: a new row stamp and nothing to
                    # lose. (Counted as lost before, when that stamp ran days ahead and
                    # the node then took back central's clamped copy of its previous
                    # version: found by the soak run, see docs/reliability.md.)
                    counts["unchanged"] += 1
                    continue
                outcome = _fields_outcome(eff, now, own)
            else:
                outcome = _record_outcome(eff, now)
            if outcome is None:
                lost.append(f"{w.table} {_key_text(w.key)}: {w.row[NODE]}'s version at {w.row[HLC]} neither present, "
                            f"superseded nor logged; now {now[NODE]} at {now[HLC]}")  # fmt: skip
            else:
                counts[outcome] += 1
        return counts, lost

    def _replaced_on_its_node(self, w: Written) -> bool:
        node = w.row[NODE]
        return any(o.table == w.table and o.key == w.key and o.row[NODE] == node and o.row[HLC] > w.row[HLC]
                   for o in self.writes)  # fmt: skip


def _stamp_columns(spec: TableSpec) -> list[str]:
    return [HLC, *([stamp_column(c.name) for c in spec.data_columns] if spec.field_wise else [])]


def _record_outcome(v: dict[str, Any], now: dict[str, Any]) -> str | None:
    if (now[HLC], now[NODE]) == (v[HLC], v[NODE]):
        return "present"
    if (now[HLC], now[NODE].encode()) > (v[HLC], v[NODE].encode()):
        return "superseded"
    return None


def _fields_outcome(v: dict[str, Any], now: dict[str, Any], own: list[str]) -> str | None:
    """Every field the version wrote (``own``) is still there, or was overwritten later."""
    outcome = "present"
    for name in own:
        s = stamp_column(name)
        if v[s] is None:
            continue
        if now[s] == v[s] and now[name] == v[name]:
            continue
        if now[s] is not None and now[s] > v[s]:
            outcome = "superseded"
            continue
        if now[s] == v[s] and (now[name] is None or (v[name] is not None and now[name] > v[name])):
            outcome = "superseded"  # an exact stamp tie, decided by value (docs/semantics.md)
            continue
        return None
    return outcome


def _key_text(key: bytes) -> str:
    return str(uuid.UUID(bytes=key)) if isinstance(key, bytes) and len(key) == 16 else repr(key)


__all__ = ["Oracle", "Written"]
