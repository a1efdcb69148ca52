"""The Python face of the core: inputs from every Arrow producer, zero-copy outputs,
errors from one hierarchy, the GIL released during heavy calls."""

from __future__ import annotations

import threading
import time

import duckdb
import polars as pl
import pyarrow as pa
import pytest

import tidesync
from tidesync import errors


def patients(n: int, node: str = "a", hlc: int = 10) -> pa.Table:
    return pa.table(
        {
            "id": [f"p{i:07d}" for i in range(n)],
            "name": [f"name {i}" for i in range(n)],
            "weight": pa.array([float(i % 90) for i in range(n)]),
            "_hlc": pa.array([hlc] * n, pa.int64()),
            "_node": [node] * n,
            "_base_hlc": pa.nulls(n, pa.int64()),
        }
    )


def test_version_is_exposed() -> None:
    assert tidesync.__version__ == tidesync._core.__version__
    assert tidesync.__version__.count(".") == 2


def test_polars_and_duckdb_inputs_give_the_same_merge_as_pyarrow() -> None:
    local, incoming = patients(50), patients(50, node="b", hlc=20)
    expected = tidesync.merge(local, incoming, "id").rows
    from_polars = tidesync.merge(pl.from_arrow(local), pl.from_arrow(incoming), "id").rows
    from_duckdb = tidesync.merge(duckdb.sql("select * from local").arrow(), incoming, "id").rows
    assert from_polars.equals(expected)
    assert from_duckdb.equals(expected)
    assert expected.num_rows == 50


def test_record_batches_and_chunked_tables_are_accepted() -> None:
    t = patients(30)
    chunked = pa.concat_tables([t.slice(0, 10), t.slice(10)])
    assert chunked.column(0).num_chunks == 2
    d = tidesync.diff(t.to_batches()[0], chunked, "id")
    assert (d.inserted.num_rows, d.deleted.num_rows, d.updated.num_rows) == (0, 0, 0)


def test_outputs_are_read_by_polars_and_duckdb() -> None:
    result = tidesync.merge(patients(20), patients(20, node="b", hlc=20), "id")
    rows = result.rows
    assert pl.from_arrow(rows).height == 20
    assert duckdb.sql("select count(*) from rows").fetchall() == [(20,)]
    # The native result exports the C stream interface itself, too.
    native, *_ = tidesync._core.merge(patients(5), patients(5, "b", 20), "id", "record")
    assert hasattr(native, "__arrow_c_stream__")
    assert pa.table(native).num_rows == 5


def test_errors_share_one_root_and_say_what_to_do() -> None:
    t = patients(3)
    with pytest.raises(errors.SchemaMismatchError, match="same table schema"):
        tidesync.diff(t, t.drop_columns(["weight"]), "id")
    with pytest.raises(errors.InvalidInputError, match="not in the batch"):
        tidesync.diff(t, t, "nope")
    with pytest.raises(errors.InvalidInputError, match="Arrow tabular data"):
        tidesync.diff([1, 2], t, "id")
    with pytest.raises(errors.InvalidInputError, match="merge mode"):
        tidesync.merge(t, t, "id", mode="newest")  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidInputError, match="_base_hlc"):
        tidesync.merge(t.drop_columns(["_base_hlc"]), t.drop_columns(["_base_hlc"]), "id")
    with pytest.raises(errors.InvalidInputError, match="_hlc_name"):
        tidesync.merge(t, t, "id", mode="field")
    with pytest.raises(errors.DuplicateKeyError, match="deduplicate"):
        tidesync.merge(pa.concat_tables([t, t]), t, "id")
    with pytest.raises(errors.UnsupportedTypeError, match="keys must be"):
        tidesync.diff(t, t, "weight")
    with pytest.raises(errors.InvalidInputError, match="reserved for the conflict output"):
        renamed = t.append_column("_lost_columns", pa.array(["x"] * 3))
        tidesync.merge(renamed, renamed, "id")
    with pytest.raises(errors.InvalidInputError, match="reserved for diff output"):
        renamed = t.append_column("_new_index", pa.array([1] * 3))
        tidesync.diff(renamed, renamed, "id")
    with pytest.raises(errors.InvalidInputError, match="power of two"):
        tidesync.digest(t, "id", buckets=1000)
    for cls in (errors.SchemaMismatchError, errors.InvalidInputError, errors.DuplicateKeyError,
                errors.UnsupportedTypeError, errors.ClockSkewError, errors.AuthError, errors.ProtocolError):
        assert issubclass(cls, tidesync.SyncError)


def test_heavy_calls_release_the_gil() -> None:
    """While a large diff runs in a thread, the main thread keeps executing Python."""
    big = patients(400_000)
    other = patients(400_000, node="b", hlc=20)
    done = threading.Event()
    elapsed: list[float] = []

    def work() -> None:
        t0 = time.perf_counter()
        for _ in range(3):
            tidesync.diff(big, other, "id")
        elapsed.append(time.perf_counter() - t0)
        done.set()

    thread = threading.Thread(target=work)
    ticks = 0
    thread.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0)
    thread.join()
    # With the GIL held for the whole native call the loop could only run between
    # calls; released, it spins throughout.
    assert elapsed and ticks > 1000 * max(elapsed[0], 0.01)


def test_clock_skew_is_reported_or_clamped() -> None:
    clock = tidesync.HybridClock(max_drift_ms=1_000)
    now = 1_700_000_000_000
    far = tidesync.hlc_pack(now + 60_000)
    with pytest.raises(errors.ClockSkewError, match="ahead"):
        clock.observe(far, now)
    clamped = clock.observe(far, now, clamp=True)
    assert tidesync.hlc_unpack(clamped)[0] <= now + 1_001
    stamps, mask = tidesync.clamp_hlcs(pa.array([far, tidesync.hlc_pack(now)], pa.int64()), now, 1_000)
    assert mask.to_pylist() == [True, False]
    assert stamps[1].as_py() == tidesync.hlc_pack(now)


def test_logical_order_sorts_by_stamp_then_node() -> None:
    changes = pa.table({"_hlc": pa.array([3, 1, 3, 2], pa.int64()), "_node": ["b", "z", "a", "a"],
                        "_table": ["t"] * 4, "id": ["1", "2", "3", "4"]})
    order = tidesync.logical_order(changes, ["_hlc", "_node", "_table", "id"])
    assert order.to_pylist() == [1, 3, 2, 0]
    assert tidesync.max_hlc(changes.column("_hlc")) == 3
    assert tidesync.max_hlc(pa.array([], pa.int64())) is None


def test_thread_cap_changes_speed_not_results() -> None:
    local = patients(200_000)
    incoming = patients(200_000, node="b", hlc=20).slice(50_000)
    previous = tidesync.max_threads()
    try:
        tidesync.set_max_threads(1)
        one = tidesync.merge(local, incoming, "id")
        one_digest = tidesync.digest(incoming, "id", 64)
        tidesync.set_max_threads(2)
        assert tidesync.max_threads() == 2
        two = tidesync.merge(local, incoming, "id")
        assert one.rows.equals(two.rows) and one.inserted.equals(two.inserted)
        assert tidesync.digest(incoming, "id", 64).equals(one_digest)
        with pytest.raises(errors.InvalidInputError):
            tidesync.set_max_threads(-1)
    finally:
        tidesync.set_max_threads(previous)


def test_every_native_export_has_a_public_face() -> None:
    """Nothing of the native module is reachable only through `tidesync._core`."""
    for name in tidesync._core.__all__:
        if name.endswith("Error"):
            assert getattr(errors, name) is getattr(tidesync._core, name)
            assert name in tidesync.__all__
        elif name != "__version__":
            assert name in tidesync.__all__, f"tidesync._core.{name} has no typed wrapper in tidesync"
