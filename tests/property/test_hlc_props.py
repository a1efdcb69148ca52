"""The hybrid logical clock: native matches the reference step by step, never goes
backwards, stays above what it observed, and bounds skewed remote clocks."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import tidesync
from tidesync import reference
from tidesync.errors import ClockSkewError, SyncError

T0 = 1_700_000_000_000  # a realistic "now" in ms
COUNTER_MAX = 0xFFFF


def stamp(ms: int, counter: int = 0) -> int:
    return (ms << 16) | counter


# Wall-clock readings around T0: they wander, and jump backwards (NTP corrections).
_wall = st.integers(T0 - 2_000, T0 + 2_000)
# Counters concentrated on the edges, where the carry into milliseconds happens.
_counter = st.one_of(st.sampled_from([0, 1, COUNTER_MAX - 1, COUNTER_MAX]), st.integers(0, COUNTER_MAX))
_drift = st.sampled_from([0, 1, 500, tidesync.DEFAULT_MAX_DRIFT_MS])


@dataclass(frozen=True)
class Tick:
    now: int


@dataclass(frozen=True)
class Observe:
    remote: int
    now: int
    clamp: bool


@st.composite
def _observe(draw: st.DrawFn) -> Observe:
    now = draw(_wall)
    remote_ms = draw(st.integers(now - 3_000, now + 3_000))  # often skewed with small drift
    return Observe(stamp(remote_ms, draw(_counter)), now, draw(st.booleans()))


_ops = st.lists(st.one_of(_wall.map(Tick), _observe()), min_size=1, max_size=40)
_start = st.one_of(st.just(0), st.builds(stamp, _wall, _counter))


@given(start=_start, drift=_drift, ops=_ops)
def test_native_clock_matches_reference(start: int, drift: int, ops: list[Tick | Observe]) -> None:
    clock = tidesync.HybridClock(max_drift_ms=drift, last=start)
    assert clock.last == start
    assert clock.max_drift_ms == drift
    last = start
    for op in ops:
        if isinstance(op, Tick):
            want = reference.tick(last, op.now)
            got = clock.tick(op.now)
        else:
            try:
                want = reference.observe(last, op.remote, op.now, drift, clamp=op.clamp)
            except ClockSkewError:
                with pytest.raises(ClockSkewError):
                    clock.observe(op.remote, op.now, clamp=op.clamp)
                assert clock.last == last, "a refused stamp must leave the clock as it was"
                continue
            got = clock.observe(op.remote, op.now, clamp=op.clamp)
        note(f"{op} -> {got} (reference {want})")
        assert got == want
        assert clock.last == got
        last = got


@given(start=_start, drift=_drift, ops=_ops)
def test_clock_is_monotonic_and_above_what_it_saw(
    start: int, drift: int, ops: list[Tick | Observe]
) -> None:
    clock = tidesync.HybridClock(max_drift_ms=drift, last=start)
    prev = start
    seen = 0  # greatest remote stamp folded in so far (after clamping)
    for op in ops:
        if isinstance(op, Tick):
            new = clock.tick(op.now)
            assert new >= op.now << 16, "a tick is at least the wall clock"
        else:
            skewed = (op.remote >> 16) - op.now > drift
            if skewed and not op.clamp:
                with pytest.raises(ClockSkewError):
                    clock.observe(op.remote, op.now)
                continue
            new = clock.observe(op.remote, op.now, clamp=op.clamp)
            effective = stamp(op.now + drift, COUNTER_MAX) if skewed else op.remote
            assert new > effective, "observe returns a stamp above the remote one"
            if not skewed:
                assert new > op.remote
            seen = max(seen, effective)
        assert new > prev, "the clock never repeats or goes backwards"
        assert new > seen, "causality: every later stamp is above everything observed"
        prev = new


def test_counter_overflow_carries_into_milliseconds() -> None:
    last = stamp(T0, COUNTER_MAX)
    assert reference.tick(last, T0) == stamp(T0 + 1, 0)
    assert tidesync.HybridClock(last=last).tick(T0) == stamp(T0 + 1, 0)
    assert tidesync.HybridClock(last=0).observe(last, T0) == stamp(T0 + 1, 0)


def test_clock_ignores_a_wall_clock_going_backwards() -> None:
    clock = tidesync.HybridClock(last=0)
    a = clock.tick(T0)
    b = clock.tick(T0 - 10_000)
    assert a == stamp(T0) and b == stamp(T0, 1)


@pytest.mark.parametrize("drift", [0, 1, 500])
def test_skew_boundary(drift: int) -> None:
    """Skewed means the millisecond part is *more than* max_drift_ms ahead; the counter
    does not count."""
    at_limit = stamp(T0 + drift, COUNTER_MAX)
    clock = tidesync.HybridClock(max_drift_ms=drift, last=0)
    assert clock.observe(at_limit, T0) == at_limit + 1
    assert reference.observe(0, at_limit, T0, drift) == at_limit + 1

    beyond = stamp(T0 + drift + 1)
    before = clock.last
    with pytest.raises(ClockSkewError):
        clock.observe(beyond, T0)
    assert clock.last == before
    with pytest.raises(ClockSkewError):
        reference.observe(0, beyond, T0, drift)
    assert issubclass(ClockSkewError, SyncError)

    # Clamped to the greatest stamp that is not skewed; the result is just above it.
    clock = tidesync.HybridClock(max_drift_ms=drift, last=0)
    assert clock.observe(beyond, T0, clamp=True) == stamp(T0 + drift, COUNTER_MAX) + 1
    assert reference.observe(0, beyond, T0, drift, clamp=True) == stamp(T0 + drift + 1)


@given(
    values=st.lists(st.builds(stamp, st.integers(T0 - 1_000, T0 + 1_000), _counter), max_size=30),
    now=st.integers(T0 - 500, T0 + 500),
    drift=st.sampled_from([0, 1, 250]),
)
def test_clamp_hlcs(values: list[int], now: int, drift: int) -> None:
    clamped, mask = tidesync.clamp_hlcs(pa.array(values, pa.int64()), now, drift)
    want_clamped, want_mask = reference.clamp_hlcs(values, now, drift)
    assert clamped.to_pylist() == want_clamped
    assert mask.to_pylist() == want_mask
    assert mask.type == pa.bool_()
    limit = stamp(now + drift, COUNTER_MAX)  # the greatest stamp that is not skewed
    for v, c, m in zip(values, clamped.to_pylist(), mask.to_pylist(), strict=True):
        assert m == ((v >> 16) - now > drift)
        assert c == (limit if m else v)
    # A chunked column is accepted too.
    chunked = pa.chunked_array([values[:3], values[3:]], pa.int64())
    assert tidesync.clamp_hlcs(chunked, now, drift)[0].to_pylist() == want_clamped


@given(ms=st.integers(0, (1 << 47) - 1), counter=st.integers(0, COUNTER_MAX))
def test_pack_unpack_roundtrip(ms: int, counter: int) -> None:
    packed = tidesync.hlc_pack(ms, counter)
    assert packed == ms << 16 | counter == reference.hlc_pack(ms, counter)
    assert tidesync.hlc_unpack(packed) == (ms, counter) == reference.hlc_unpack(packed)


@given(values=st.lists(st.one_of(st.none(), st.integers(0, (1 << 63) - 1)), max_size=20))
def test_max_hlc(values: list[int | None]) -> None:
    present = [v for v in values if v is not None]
    assert tidesync.max_hlc(pa.array(values, pa.int64())) == (max(present) if present else None)
