"""`tidesync demo`: offline edits at two clinics converge through the sync core.

What runs today is the core (issue 2): a central copy and two facility copies of a
patient table held as Arrow tables in memory, edited offline, then converged with
field-wise merge, with the conflict log and range digests doing their jobs. The
PostgreSQL/SQLite stores and the HTTP network (issues 3 and 4) slot in under the
same steps as they land.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

import tidesync
from tidesync.core import HybridClock

DATA_COLUMNS = ("first_name", "last_name", "village", "phone", "date_of_birth", "deleted_at")
FIRST = ["Amina", "Kofi", "Sione", "Mele", "Tavita", "Leilani", "Nour", "Bao", "Ana", "Joon"]
LAST = ["Fifita", "Mensah", "Tupou", "Nguyen", "Haddad", "Kaufana", "Lee", "Silva", "Otieno"]
VILLAGES = ["Nuku'alofa", "Neiafu", "Pangai", "Ohonua", "Kolonga", "Hihifo", "Vaini"]


@dataclass
class Node:
    """One copy of the patient table, with its own clock and its last-synced state."""

    name: str
    clock: HybridClock
    table: pa.Table
    synced: pa.Table = field(init=False)

    def __post_init__(self) -> None:
        self.synced = self.table


@dataclass
class Step:
    name: str
    seconds: float
    rows: int
    detail: str


def make_patients(n: int, stamp: int, rng: np.random.Generator) -> pa.Table:
    """n patients authored at the central server at `stamp`, in field-wise layout."""
    ids = pa.array([f"{i:08x}-7000-4000-8000-{rng.integers(1 << 47):012x}" for i in range(n)])
    dob = pa.array(rng.integers(-20000, 19000, n).astype("int32"), pa.date32())
    columns: dict[str, Any] = {
        "id": ids,
        "first_name": pa.array(np.array(FIRST)[rng.integers(0, len(FIRST), n)]),
        "last_name": pa.array(np.array(LAST)[rng.integers(0, len(LAST), n)]),
        "village": pa.array(np.array(VILLAGES)[rng.integers(0, len(VILLAGES), n)]),
        "phone": pa.array([f"+676 {x:07d}" for x in rng.integers(0, 10**7, n)]),
        "date_of_birth": dob,
        "deleted_at": pa.nulls(n, pa.timestamp("us", tz="UTC")),
        "_hlc": pa.array(np.full(n, stamp), pa.int64()),
        "_node": pa.array(["central"] * n),
        "_base_hlc": pa.nulls(n, pa.int64()),
    }
    for c in DATA_COLUMNS:
        columns[f"_hlc_{c}"] = pa.array(np.full(n, stamp), pa.int64())
    return pa.table(columns)


def edit(node: Node, rows: np.ndarray, column: str, values: pa.Array) -> None:
    """What the application does with plain SQL: change one column of some rows."""
    col = node.table.column(column).combine_chunks()
    # replace_with_mask fills the masked slots in row order: one value per row, sorted.
    unique_rows, first = np.unique(rows, return_index=True)
    mask = np.zeros(node.table.num_rows, dtype=bool)
    mask[unique_rows] = True
    replaced = pc.replace_with_mask(col, pa.array(mask), values.take(pa.array(first)).cast(col.type))
    node.table = node.table.set_column(node.table.schema.get_field_index(column), column, replaced)


def capture(node: Node) -> pa.Table:
    """Stamp the node's changes since its last sync, as the capture triggers will.

    The diff against the last-synced copy finds changed rows and columns; changed
    columns get the new stamp, and `_base_hlc` follows docs/semantics.md.
    """
    d = tidesync.diff(node.synced, node.table, "id")
    if d.updated.num_rows == 0:
        return node.table.slice(0, 0)
    changed = node.table.take(d.updated.column("_new_index"))
    stamp = node.clock.tick()
    n = changed.num_rows
    own = pc.equal(changed.column("_node"), node.name)
    base = pc.if_else(own, changed.column("_base_hlc"), changed.column("_hlc"))
    out = changed
    for c in DATA_COLUMNS:
        stamps = pc.if_else(d.updated.column(c), pa.scalar(stamp, pa.int64()), changed.column(f"_hlc_{c}"))
        out = out.set_column(out.schema.get_field_index(f"_hlc_{c}"), f"_hlc_{c}", stamps)
    out = out.set_column(out.schema.get_field_index("_hlc"), "_hlc", pa.array(np.full(n, stamp), pa.int64()))
    out = out.set_column(out.schema.get_field_index("_node"), "_node", pa.array([node.name] * n))
    out = out.set_column(out.schema.get_field_index("_base_hlc"), "_base_hlc", base)
    return out


def apply(node: Node, incoming: pa.Table) -> tidesync.MergeResult:
    """Merge incoming versions into a node's copy and upsert what changed.

    Like the database apply will: read the local versions of the incoming keys only,
    merge, then write the rows the merge returns.
    """
    touched = node.table.filter(pc.is_in(node.table.column("id"), incoming.column("id")))
    result = tidesync.merge(touched, incoming, "id", mode="field")
    if result.rows.num_rows:
        written = pc.is_in(node.table.column("id"), result.rows.column("id"))
        kept = node.table.filter(pc.invert(written))
        node.table = pa.concat_tables([kept, result.rows.cast(kept.schema)])
    newest = tidesync.max_hlc(incoming.column("_hlc"))
    if newest is not None:
        node.clock.observe(newest, clamp=True)
    return result


def run_demo(patients: int = 20_000, facilities: int = 2, json_output: bool = False) -> dict[str, Any]:
    """Run the walkthrough; print progress and a summary unless `json_output`."""
    console = Console(quiet=json_output)
    rng = np.random.default_rng(7)
    steps: list[Step] = []

    def timed(name: str, rows: int, detail: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        out = fn()
        steps.append(Step(name, time.perf_counter() - t0, rows, detail))
        return out

    console.rule("[bold]tidesync demo — the sync core")
    console.print("Central server and facilities hold copies of a field-wise [cyan]patients[/] table.")
    central_clock = HybridClock()
    base = make_patients(patients, central_clock.tick(), rng)
    central = Node("central", central_clock, base)
    clinics = [Node(f"facility-{chr(97 + i)}", HybridClock(), base) for i in range(max(2, facilities))]
    a, b = clinics[0], clinics[1]

    # Offline edits: A fixes phone numbers, B records moves between villages; a
    # slice of patients is edited at both, some of them in the same field.
    k = max(10, patients // 20)
    rows_a = rng.choice(patients, k, replace=False)
    rows_b = np.concatenate([rows_a[: k // 10], rng.choice(patients, k - k // 10, replace=False)])
    both_same_field = rows_a[: k // 50 or 1]
    edit(a, rows_a, "phone", pa.array([f"+676 {x:07d}" for x in rng.integers(0, 10**7, k)]))
    edit(b, rows_b, "village", pa.array(np.array(VILLAGES)[rng.integers(0, len(VILLAGES), k)]))
    edit(b, both_same_field, "phone", pa.array(["+676 0000000"] * len(both_same_field)))
    console.print(
        f"Offline: {a.name} edited {k} phones; {b.name} edited {k} villages "
        f"({k // 10} of the same patients) and {len(both_same_field)} of the same phones."
    )

    pushes = {}
    for clinic in (a, b):
        pushes[clinic.name] = timed(f"capture {clinic.name}", clinic.table.num_rows, "diff vs last sync",
                                    lambda c=clinic: capture(c))
    conflicts = 0
    for clinic in (a, b):
        res = timed(f"central ← {clinic.name}", pushes[clinic.name].num_rows, "field-wise merge",
                    lambda c=clinic: apply(central, pushes[c.name]))
        conflicts += res.conflicts.num_rows
        console.print(f"  central ← {clinic.name}: {res.rows.num_rows} rows written, "
                      f"{res.conflicts.num_rows} concurrent same-field edits logged")
    for clinic in clinics:
        changed = tidesync.diff(clinic.synced, central.table, "id")
        pull = central.table.take(changed.updated.column("_new_index"))
        res = timed(f"{clinic.name} ← central", pull.num_rows, "field-wise merge", lambda c=clinic, p=pull: apply(c, p))
        clinic.synced = clinic.table
        console.print(f"  {clinic.name} ← central: {res.rows.num_rows} rows written")

    digests = {n.name: tidesync.digest(n.table, "id", 256, columns=["_hlc", "_node", *DATA_COLUMNS])
               for n in [central, *clinics]}
    converged = all(tidesync.differing_buckets(digests["central"], d) == [] for d in digests.values())
    console.print(f"All {1 + len(clinics)} copies converged (range digests equal): [bold]{converged}[/]")

    # Damage behind the engine's back, then find exactly those rows by digest.
    damaged = rng.choice(patients, 3, replace=False)
    edit(b, damaged, "last_name", pa.array(["CORRUPTED"] * 3))
    found = timed("verify by digest", b.table.num_rows, "buckets, then rows",
                  lambda: find_divergent(central.table, b.table))
    console.print(f"Verify found {len(found)} divergent rows on {b.name}; repairing only those.")
    repair = central.table.filter(pc.is_in(central.table.column("id"), pa.array(found)))
    keep = b.table.filter(pc.invert(pc.is_in(b.table.column("id"), pa.array(found))))
    b.table = pa.concat_tables([keep, repair])
    repaired = tidesync.differing_buckets(
        tidesync.digest(central.table, "id", 256, ["_hlc", "_node", *DATA_COLUMNS]),
        tidesync.digest(b.table, "id", 256, ["_hlc", "_node", *DATA_COLUMNS]),
    ) == []

    summary = Table(title="Steps")
    for col in ("step", "rows", "seconds", "rows/s", "what"):
        summary.add_column(col, justify="right" if col in ("rows", "seconds", "rows/s") else "left", no_wrap=col == "step")
    for s in steps:
        summary.add_row(s.name, f"{s.rows:,}", f"{s.seconds:.4f}", f"{s.rows / max(s.seconds, 1e-9):,.0f}", s.detail)
    console.print(summary)
    result = {
        "patients": patients,
        "nodes": 1 + len(clinics),
        "conflicts_logged": conflicts,
        "converged": converged,
        "divergent_rows_found": len(found),
        "repaired": repaired,
        "steps": [s.__dict__ for s in steps],
    }
    if not (converged and repaired and len(found) == 3):
        raise tidesync.SyncError(f"demo did not converge: {result}")
    return result


def find_divergent(reference: pa.Table, copy: pa.Table) -> list[str]:
    """Keys whose rows differ between two copies, found bucket first, then by row."""
    columns = ["_hlc", "_node", *DATA_COLUMNS]
    buckets = tidesync.differing_buckets(
        tidesync.digest(reference, "id", 256, columns), tidesync.digest(copy, "id", 256, columns)
    )
    rows_ref = tidesync.row_hashes(reference, "id", 256, columns)
    rows_copy = tidesync.row_hashes(copy, "id", 256, columns)
    in_buckets = pa.array(buckets, pa.uint32())
    ref = rows_ref.filter(pc.is_in(rows_ref.column("bucket"), in_buckets))
    cp = rows_copy.filter(pc.is_in(rows_copy.column("bucket"), in_buckets))
    joined = ref.join(cp, "id", join_type="full outer", left_suffix="_ref", right_suffix="_copy")
    differ = pc.fill_null(pc.not_equal(joined.column("hash_ref"), joined.column("hash_copy")), True)
    return sorted(joined.filter(differ).column("id").to_pylist())
