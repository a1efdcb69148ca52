"""`tidesync bench`'s network benchmarks at a tiny size: they run to the end and check
what they moved (a benchmark that crashes or counts wrong is a defect too)."""

from __future__ import annotations

from tidesync.bench.sync_bench import run_sync_bench


def test_network_benchmarks_run_and_check_their_results(pg_server) -> None:  # type: ignore[no-untyped-def]
    results = run_sync_bench(500, 1, None, only=["sync", "incremental", "load"], dsn=pg_server.dsn)
    by_name = {r["benchmark"]: r for r in results}
    initial = by_name["initial sync of a facility (HTTP, end to end)"]
    assert initial["check"] == "ok" and initial["rows"] == 500
    incremental = [r for r in results if r["benchmark"].startswith("incremental cycle")]
    assert len(incremental) == 2 and all(r["rows"] > 0 for r in incremental)
    (load,) = [r for name, r in by_name.items() if name.startswith("load:")]
    assert load["check"] == "ok" and load["target_met"] is True  # zero errors
    assert load["rows"] > 0


def test_seed_benchmarks_run_and_check_their_results(pg_server) -> None:  # type: ignore[no-untyped-def]
    from tidesync.bench.seed_bench import run_seed_bench

    results = run_seed_bench(500, 1, None, dsn=pg_server.dsn, sizes=(500,))
    assert [r["baseline"] for r in results] == [
        "pg_dump | pg_restore", "binary COPY of pre-made files", "polars read (ADBC) + write Parquet", "—"]
    assert all(r["check"] == "ok" for r in results), [r["check"] for r in results]
    assert results[0]["rows"] == 500 and results[0]["tidesync_s"] > 0
