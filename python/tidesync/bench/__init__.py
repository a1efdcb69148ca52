"""Benchmarks of the native core against general-purpose baselines.

``tidesync.bench.data`` generates deterministic EMR-like synthetic tables (vectorized,
so a million rows take a second or two); ``tidesync.bench.core_bench`` times the core
against DuckDB, polars, pyarrow, xxhash/blake3 and the plain-Python reference. The
baselines (duckdb, polars, xxhash, blake3) come with the ``bench`` extra.
"""

from __future__ import annotations

__all__ = ["core_bench", "data"]
