//! The core's one error type. The binding maps each variant to a Python exception
//! class of the `tidesync.SyncError` family, so every message must say what is wrong
//! and what to do about it.

use arrow_schema::ArrowError;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// Input that cannot be processed as given (null keys, missing columns, bad arguments).
    #[error("{0}")]
    InvalidInput(String),
    /// Two batches that must share a schema do not.
    #[error("{0}")]
    SchemaMismatch(String),
    /// A key occurs twice where keys must be unique.
    #[error("{0}")]
    DuplicateKey(String),
    /// A column type the operation cannot handle.
    #[error("{0}")]
    UnsupportedType(String),
    /// A remote clock is further ahead of ours than the tolerance allows.
    #[error("{0}")]
    ClockSkew(String),
    /// An error from an Arrow kernel.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

pub(crate) fn invalid(msg: impl Into<String>) -> CoreError {
    CoreError::InvalidInput(msg.into())
}
