"""The interface every node database offers the sync engine (PostgreSQL and SQLite).

A store knows its registry, installs and removes the engine's metadata, hands out
windows of changes, applies incoming change batches atomically, and keeps cursors,
the conflict log and the quarantine (with retry and discard). ``tidesync.pg.PostgresStore`` (facility and
central servers) and ``tidesync.sqlite.SQLiteStore`` (mobile devices) implement it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa

from tidesync.changes import NO_OPTIONS, ApplyOptions, ApplyPlan, ApplyResult, TableApplyStats, Window
from tidesync.registry import Registry

if TYPE_CHECKING:  # tidesync.quarantine imports this module (through review)
    from tidesync.quarantine import RetryOutcome


class VerbatimWrite(Protocol):
    """One write transaction of :meth:`Store.write_verbatim`: versions put in place as
    they are, without merging (stamps can be equal while values differ, so a merge could
    keep the damaged copy), marked with the transaction's ``origin`` so the next push does
    not send them back. ``tidesync verify --repair`` writes central's copies with it."""

    def current(self, table: str, keys: pa.Array) -> pa.Table:
        """The local versions of ``keys`` (live rows, else tombstones; wire schema),
        locked against application writes until the transaction ends."""

    def set_aside(self, table: str, rows: pa.Table, reason: str) -> list[int]:
        """Keep live wire ``rows`` whole in the quarantine with ``reason`` (no peer), then
        delete them without a tombstone (call children before parents); returns the new
        quarantine entry ids."""

    def upsert(self, plan: ApplyPlan, stats: TableApplyStats) -> None:
        """Write ``plan.inserts`` (their tombstones, ``plan.revived``, go) and
        ``plan.updates`` as they are (call parents before children). Rows the database
        refuses go to the quarantine with the reason, counted in ``stats``."""

    def delete(self, plan: ApplyPlan, stats: TableApplyStats) -> None:
        """Delete the live rows of ``plan.deletes`` and record those tombstones as they
        are (call children before parents)."""


class Store(Protocol):
    registry: Registry

    def install(self, node_id: str) -> None:
        """Add metadata columns, triggers, tombstones and bookkeeping. Idempotent."""

    def uninstall(self) -> None:
        """Remove everything ``install`` added; application data stays as it is."""

    def node_id(self) -> str:
        """The id this node stamps its versions with."""

    def read_window(self, cursor: int, *, peer: str | None = None, tables: Iterable[str] | None = None) -> Window:
        """Every change in ``[cursor, watermark)``, per table in foreign-key order.

        Versions that arrived from ``peer`` are left out (no echo). The next window
        starts at the returned watermark; no committed change is ever skipped.
        """

    def apply(
        self,
        batches: Mapping[str, pa.Table],
        *,
        peer: str | None,
        cursor: tuple[str, int] | None = None,
        options: ApplyOptions = NO_OPTIONS,
    ) -> ApplyResult:
        """Merge and write incoming change batches in one transaction.

        Conflicts go to the conflict log, rows the database rejects to the quarantine;
        ``cursor=(name, value)`` is saved in the same transaction. ``options`` carry the
        hub's clock clamping (see :class:`tidesync.changes.ApplyOptions`).
        """

    def apply_parts(
        self,
        parts: Iterable[tuple[str, pa.Table]],
        *,
        peer: str | None,
        cursor: tuple[str, int] | None = None,
        options: ApplyOptions = NO_OPTIONS,
    ) -> ApplyResult:
        """Like :meth:`apply`, for a stream of ``(table, batch)`` parts in foreign-key
        order (the pages of a pull), still in one transaction. PostgreSQL holds one part
        at a time; SQLite gathers them (a mobile's scope is small)."""

    def read_rows(self, table: str, keys: pa.Array) -> pa.Table:
        """The current versions of ``keys`` in the wire schema: live rows, else
        tombstones; keys never seen are absent. For people and tests, not a hot path."""

    def forget(self, table: str, keys: pa.Array, *, below: int) -> int:
        """Delete rows by key without tombstones (push-then-delete), if unchanged since ``below``."""

    def get_setting(self, name: str) -> str | None:
        """A saved text setting (the sync client keeps its central URL and token here)."""

    def set_setting(self, name: str, value: str) -> None: ...

    def get_cursor(self, name: str) -> int:
        """A saved cursor (0 if never saved)."""

    def set_cursor(self, name: str, value: int) -> None: ...

    def conflicts(self, table: str | None = None, *, conflict_id: int | None = None) -> pa.Table:
        """The conflict log (of ``table``, or the one entry ``conflict_id``): table, key,
        loser and winner stamps, lost columns, losing row (JSON)."""

    def quarantine(
        self, table: str | None = None, *, status: str | None = None, entry_id: int | None = None
    ) -> pa.Table:
        """Versions that could not be written (of ``table``, with ``status``, or the one
        entry ``entry_id``), every status unless one is given: id, table, key, stamp
        (``hlc``, ``node``), row (JSON), reason, peer, recorded_at, status (held,
        retried, discarded), attempts, resolved_at, note, and the version itself (Arrow
        IPC; null for entries an older install wrote). See :mod:`tidesync.quarantine`."""

    def retry_quarantined(
        self, ids: Sequence[int] | None = None, *, table: str | None = None
    ) -> list[RetryOutcome]:
        """Apply held entries again (``ids``, or every held one of ``table``) through the
        normal apply, in one transaction with their new statuses: applied ones become
        ``retried``, rejected ones stay held (one entry, ``attempts`` + 1, new reason)."""

    def discard_quarantined(self, ids: Sequence[int], note: str) -> list[int]:
        """Mark held entries ``discarded`` with ``note`` (who decided and why); never deletes."""

    def clock_ms(self) -> int:
        """The database's clock (the one its capture triggers stamp with), in Unix ms.
        The sync client reports it so the central server can measure the node's skew."""

    def write_verbatim(self, origin: str) -> AbstractContextManager[VerbatimWrite]:
        """One transaction that writes versions as they are, bypassing the merge, marked
        as coming from ``origin`` (see :class:`VerbatimWrite`); committed when the block
        ends (deferred constraints checked then), rolled back if it raises."""


def open_store(db: str, registry: Registry, *, create: bool = False) -> Store:
    """The store for ``db``: a PostgreSQL DSN (``postgresql://...``) or a SQLite file path.

    A SQLite file must exist unless ``create`` (setting up a node creates it).
    """
    if db.startswith(("postgres://", "postgresql://")) or "host=" in db or "dbname=" in db:
        from tidesync.pg import PostgresStore

        return PostgresStore(db, registry)
    from pathlib import Path

    from tidesync.errors import SyncError
    from tidesync.sqlite import SQLiteStore

    if not create and not Path(db).exists():
        raise SyncError(f"no database at {db}: give a PostgreSQL URL or an existing SQLite file (.db/.sqlite)")

    return SQLiteStore(db, registry)
