"""The one exception hierarchy of tidesync.

Every error tidesync raises, from Rust or from Python, is a :class:`SyncError`.
The classes are created in the native module (so Rust raises them directly) and
re-exported here; Python-only errors subclass them.
"""

from tidesync._core import (
    ClockSkewError,
    DuplicateKeyError,
    InvalidInputError,
    SchemaMismatchError,
    SyncError,
    UnsupportedTypeError,
)


class AuthError(SyncError):
    """A node presented a missing, wrong or revoked token."""


class NotInstalledError(SyncError):
    """tidesync is not installed in this database; run `tidesync schema install` first."""


class ProtocolError(SyncError):
    """A peer sent something the sync protocol does not allow (bad page, bad version)."""


class SeedError(SyncError):
    """A seed file is damaged, tampered with or truncated, or does not fit this node."""


__all__ = [
    "AuthError",
    "ClockSkewError",
    "DuplicateKeyError",
    "InvalidInputError",
    "NotInstalledError",
    "ProtocolError",
    "SchemaMismatchError",
    "SeedError",
    "SyncError",
    "UnsupportedTypeError",
]
