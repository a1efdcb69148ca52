"""The oracle's own accounting, on hand-made histories (fast; no databases)."""

from __future__ import annotations

import uuid
from typing import Any

from tidesync.registry import stamp_column
from tidesync.schemas.demo import REGISTRY
from tests.convergence.oracle import Oracle, Written

SPEC = REGISTRY["patients"]
KEY = uuid.UUID("00005eed-0000-4000-8000-0000000008f0").bytes
DAY = 24 * 3600 * 1000 << 16


def version(node: str, hlc: int, values: dict[str, Any], stamps: dict[str, int]) -> dict[str, Any]:
    row: dict[str, Any] = {f.name: None for f in SPEC.wire_schema()}
    row.update(id=KEY, _hlc=hlc, _node=node, _base_hlc=hlc, _deleted=False, **values)
    for c in SPEC.data_columns:
        row[stamp_column(c.name)] = stamps.get(c.name, stamps["*"])
    return row


def test_an_update_that_changed_nothing_on_a_clock_days_ahead_is_not_a_lost_write() -> None:
    """Regression (soak run of 2026-11-22): fac-a, its clock 3 days ahead, wrote a
    patient (x1), changed a field (x2), then ran an UPDATE that changed no value (x3: a
    new row stamp, field stamps as before). Central clamped x2 when it was pushed; fac-a
    took that clamped copy back before pushing x3, and a later edit on mob-b won every
    field. Nothing fac-a wrote was lost, but the oracle counted x3 as lost."""
    now_ms = 1_795_000_000_000
    x1, bound = (now_ms + 3 * 86_400_000) << 16, now_ms << 16
    x2, x3 = x1 + 50_000, x1 + 500_000
    values = {"first_name": "Ana", "middle_name": "K"}
    oracle = Oracle(REGISTRY)
    oracle.writes += [
        Written("patients", KEY, version("fac-a", x1, values, {"*": x1}), skewed_ahead=True),
        Written("patients", KEY, version("fac-a", x2, values | {"middle_name": "J"}, {"*": x1, "middle_name": x2}),
                skewed_ahead=True),
        Written("patients", KEY, version("fac-a", x3, values | {"middle_name": "J"}, {"*": x1, "middle_name": x2}),
                skewed_ahead=True),
    ]  # fmt: skip
    final = {"patients": {KEY: version("mob-b", bound + 3, {"first_name": "Bea"}, {"*": bound + 3})}}
    clamps = {("patients", KEY, x2): bound}
    counts, lost = oracle.lost_writes(final, set(), clamps)
    assert lost == []
    assert counts["unchanged"] == 1 and counts["superseded"] == 2

    # The check still bites: had mob-b's edit come before the clamp, fac-a's middle
    # name (clamped to `bound`) must have survived.
    early = {"patients": {KEY: version("mob-b", bound - 3, {"first_name": "Bea"}, {"*": bound - 3})}}
    _, lost = oracle.lost_writes(early, set(), clamps)
    assert len(lost) == 1 and "fac-a's version at" in lost[0]
