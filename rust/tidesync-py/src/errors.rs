//! The exception hierarchy, created here so Rust raises it directly; Python
//! re-exports it from `tidesync.errors`. One mapping from core errors to classes.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use tidesync_core::CoreError;

create_exception!(tidesync, SyncError, PyException, "Base class of every error tidesync raises.");
create_exception!(tidesync, InvalidInputError, SyncError, "Input that cannot be processed as given.");
create_exception!(tidesync, SchemaMismatchError, SyncError, "Two sides of an operation disagree on the table schema.");
create_exception!(tidesync, DuplicateKeyError, SyncError, "A key occurs twice where keys must be unique.");
create_exception!(tidesync, UnsupportedTypeError, SyncError, "A column type the operation does not support.");
create_exception!(tidesync, ClockSkewError, SyncError, "A clock is further ahead than the tolerance allows.");

pub fn to_pyerr(err: CoreError) -> PyErr {
    let msg = err.to_string();
    match err {
        CoreError::InvalidInput(_) => InvalidInputError::new_err(msg),
        CoreError::SchemaMismatch(_) => SchemaMismatchError::new_err(msg),
        CoreError::DuplicateKey(_) => DuplicateKeyError::new_err(msg),
        CoreError::UnsupportedType(_) => UnsupportedTypeError::new_err(msg),
        CoreError::ClockSkew(_) => ClockSkewError::new_err(msg),
        CoreError::Arrow(_) => SyncError::new_err(msg),
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SyncError", py.get_type::<SyncError>())?;
    m.add("InvalidInputError", py.get_type::<InvalidInputError>())?;
    m.add("SchemaMismatchError", py.get_type::<SchemaMismatchError>())?;
    m.add("DuplicateKeyError", py.get_type::<DuplicateKeyError>())?;
    m.add("UnsupportedTypeError", py.get_type::<UnsupportedTypeError>())?;
    m.add("ClockSkewError", py.get_type::<ClockSkewError>())?;
    Ok(())
}
