"""What ``tidesync verify`` reports: per table, the keys that differ and what a repair
did with them (``--json`` prints :meth:`VerifyReport.as_dict`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tidesync.sync.verify.messages import OUT_OF_SCOPE


@dataclass
class Difference:
    """One key whose copies differ (or that the node holds outside its scope)."""

    key: str
    #: ``differs``, ``missing_here``, ``only_here`` or ``out_of_scope``.
    kind: str
    #: What central holds: ``live``, ``deleted``, ``absent``, ``quarantined``, ``out_of_scope``.
    central: str
    #: What a repair did with it (empty when not repairing).
    repair: str = ""


@dataclass
class TableReport:
    table: str
    rows_here: int = 0
    rows_central: int = 0
    buckets: int = 0
    differing_buckets: int = 0
    #: Keys changed here since the last push (left out on both sides).
    pending_here: int = 0
    #: Candidates that central had changed since this node's last pull (left out).
    pending_central: int = 0
    #: Central answered from the row hashes of an earlier read it had proved unchanged
    #: since (no row of the table, or of what its scope depends on, written or deleted).
    central_reused: bool = False
    differences: list[Difference] = field(default_factory=list)
    #: Of a repair: rows written from central's copy, rows deleted (central's
    #: tombstone), rows kept in the quarantine and removed, rows left alone.
    written: int = 0
    deleted: int = 0
    quarantined: int = 0
    skipped: int = 0
    #: Central's versions this database refused while repairing (now in its quarantine).
    refused: int = 0
    #: Quarantine entries holding the rows this repair removed (central never had them).
    quarantine_ids: list[int] = field(default_factory=list)

    def keys(self, kind: str) -> set[str]:
        return {d.key for d in self.differences if d.kind == kind}


@dataclass
class VerifyReport:
    """What ``tidesync verify`` found (and repaired); ``--json`` prints :meth:`as_dict`."""

    node: str
    repair: bool = False
    tables: list[TableReport] = field(default_factory=list)
    pull_cursor: int = 0
    watermark: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def keys(self, kind: str, table: str | None = None) -> set[str]:
        """Keys of one kind (``differs``, ``missing_here``, ``only_here``, ``out_of_scope``)."""
        return {k for t in self.tables if table in (None, t.table) for k in t.keys(kind)}

    @property
    def differences(self) -> int:
        """Differences that are corruption: everything but rows outside the node's scope."""
        return sum(1 for t in self.tables for d in t.differences if d.kind != OUT_OF_SCOPE)

    @property
    def unrepaired(self) -> int:
        """Differences still there after this run (all of them when not repairing)."""
        done = ("written", "deleted", "quarantined")
        left = sum(1 for t in self.tables for d in t.differences
                   if d.kind != OUT_OF_SCOPE and not d.repair.startswith(done))
        return left + sum(t.refused for t in self.tables)

    @property
    def clean(self) -> bool:
        return self.differences == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "differences": self.differences, "unrepaired": self.unrepaired, "clean": self.clean,
                "rows_here": sum(t.rows_here for t in self.tables)}  # fmt: skip
