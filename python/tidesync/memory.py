"""Which allocator Arrow uses in the processes tidesync runs itself (the CLI, the
central server, the node client, the benchmarks).

pyarrow allocates with mimalloc by default. On the virtual machines we measure on,
mimalloc hands a large buffer back to the system soon after it is freed, and the next
one faults in fresh pages, which is slow there: an apply of 1M rows spent 1.1-1.4 s
merging and splitting its batches with mimalloc against 0.8-1.0 s with jemalloc,
the same work, alternate runs; one cold ``Table.filter`` of 1M demo patients took
0.6 s against 0.17 s. jemalloc keeps freed pages for reuse a little longer and is
made for long-running, multi-threaded processes like the server.

A library should not pick its host's allocator, so importing tidesync changes
nothing; applications that embed tidesync can call :func:`prefer_jemalloc` too.
``ARROW_DEFAULT_MEMORY_POOL``, when set, always wins.
"""

from __future__ import annotations

import os

import pyarrow as pa


def prefer_jemalloc() -> str:
    """Make jemalloc Arrow's default pool unless the environment chose one; returns
    the backend in use."""
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        try:
            pa.set_memory_pool(pa.jemalloc_memory_pool())
        except NotImplementedError:  # a pyarrow built without jemalloc: keep its default
            pass
    return str(pa.default_memory_pool().backend_name)
