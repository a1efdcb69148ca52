"""tidesync: offline-first sync for health records.

The public API of the core: a hybrid logical clock, changeset diff, field-wise
merge and range digests, all over Arrow data (see docs/semantics.md).
"""

from tidesync._core import __version__
from tidesync.core import (
    DEFAULT_MAX_DRIFT_MS,
    Diff,
    HybridClock,
    MergeMode,
    MergeResult,
    clamp_hlcs,
    diff,
    differing_buckets,
    digest,
    hlc_pack,
    hlc_unpack,
    logical_order,
    max_hlc,
    max_threads,
    merge,
    now_ms,
    row_hashes,
    set_max_threads,
)
from tidesync.errors import (
    AuthError,
    ClockSkewError,
    DuplicateKeyError,
    InvalidInputError,
    NotInstalledError,
    ProtocolError,
    SchemaMismatchError,
    SeedError,
    SyncError,
    UnsupportedTypeError,
)

__all__ = [
    "DEFAULT_MAX_DRIFT_MS",
    "AuthError",
    "ClockSkewError",
    "Diff",
    "DuplicateKeyError",
    "HybridClock",
    "InvalidInputError",
    "MergeMode",
    "MergeResult",
    "NotInstalledError",
    "ProtocolError",
    "SchemaMismatchError",
    "SeedError",
    "SyncError",
    "UnsupportedTypeError",
    "__version__",
    "clamp_hlcs",
    "diff",
    "differing_buckets",
    "digest",
    "hlc_pack",
    "hlc_unpack",
    "logical_order",
    "max_hlc",
    "max_threads",
    "merge",
    "now_ms",
    "row_hashes",
    "set_max_threads",
]
