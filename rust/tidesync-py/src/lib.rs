//! `tidesync._core`: the Python binding of tidesync-core. Conversions only: every
//! function here unpacks Python arguments, calls the core with the GIL released,
//! and packs the result. Semantics live in the core crate.

mod alloc;
mod convert;
mod errors;

use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch};
use pyo3::prelude::*;
use tidesync_core::hlc;

use convert::{array_arg, array_out, batch_arg, detached, table_out};
use errors::to_pyerr;

/// A node's hybrid logical clock.
#[pyclass(module = "tidesync._core", name = "HybridClock")]
struct PyHybridClock(hlc::HybridClock);

#[pymethods]
impl PyHybridClock {
    #[new]
    #[pyo3(signature = (max_drift_ms, last=0))]
    fn new(max_drift_ms: u64, last: u64) -> Self {
        Self(hlc::HybridClock::new(max_drift_ms, last))
    }

    #[getter]
    fn last(&self) -> u64 {
        self.0.last()
    }

    #[getter]
    fn max_drift_ms(&self) -> u64 {
        self.0.max_drift_ms()
    }

    fn tick(&mut self, now_ms: u64) -> PyResult<u64> {
        self.0.tick(now_ms).map_err(to_pyerr)
    }

    fn observe(&mut self, remote: u64, now_ms: u64, clamp: bool) -> PyResult<u64> {
        self.0.observe(remote, now_ms, clamp).map_err(to_pyerr)
    }
}

#[pyfunction]
fn hlc_pack(ms: u64, counter: u16) -> PyResult<u64> {
    if ms > hlc::MAX_MS {
        return Err(errors::InvalidInputError::new_err(format!("{ms} ms does not fit in 48 bits")));
    }
    Ok(hlc::pack(ms, counter))
}

#[pyfunction]
fn hlc_unpack(stamp: u64) -> (u64, u16) {
    hlc::unpack(stamp)
}

#[pyfunction]
fn max_hlc(py: Python<'_>, values: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
    let array = array_arg(values, "max_hlc")?;
    detached(py, || hlc::max_stamp(array.as_ref()))
}

#[pyfunction]
fn clamp_hlcs(
    py: Python<'_>,
    values: &Bound<'_, PyAny>,
    now_ms: u64,
    max_drift_ms: u64,
) -> PyResult<(Py<PyAny>, Py<PyAny>)> {
    let array = array_arg(values, "clamp_hlcs")?;
    let (clamped, mask) = detached(py, || hlc::clamp_stamps(array.as_ref(), now_ms, max_drift_ms))?;
    Ok((array_out(py, clamped)?, array_out(py, Arc::new(mask) as ArrayRef)?))
}

#[pyfunction]
fn logical_order(py: Python<'_>, batch: &Bound<'_, PyAny>, by: Vec<String>) -> PyResult<Py<PyAny>> {
    let batch = batch_arg(batch, "logical_order")?;
    let order = detached(py, || {
        let by: Vec<&str> = by.iter().map(String::as_str).collect();
        tidesync_core::logical_order(&batch, &by)
    })?;
    array_out(py, Arc::new(order))
}

#[pyfunction]
fn diff(
    py: Python<'_>,
    old: &Bound<'_, PyAny>,
    new: &Bound<'_, PyAny>,
    key: String,
) -> PyResult<(Py<PyAny>, Py<PyAny>, Py<PyAny>)> {
    let (old, new) = (batch_arg(old, "diff(old)")?, batch_arg(new, "diff(new)")?);
    let d = detached(py, || tidesync_core::diff(&old, &new, &key))?;
    Ok((table_out(py, d.inserted)?, table_out(py, d.deleted)?, table_out(py, d.updated)?))
}

/// `merge`'s result: rows, inserted, local_row, source, conflicts, distinct keys.
type MergeTuple = (Py<PyAny>, Py<PyAny>, Py<PyAny>, Py<PyAny>, Py<PyAny>, usize);

#[pyfunction]
fn merge(
    py: Python<'_>,
    local: &Bound<'_, PyAny>,
    incoming: &Bound<'_, PyAny>,
    key: String,
    mode: &str,
) -> PyResult<MergeTuple> {
    let mode = mode.parse().map_err(to_pyerr)?;
    let (local, incoming) = (batch_arg(local, "merge(local)")?, batch_arg(incoming, "merge(incoming)")?);
    let out = detached(py, || tidesync_core::merge(&local, &incoming, &key, mode))?;
    Ok((
        table_out(py, out.rows)?,
        array_out(py, Arc::new(out.inserted))?,
        array_out(py, Arc::new(out.local_row))?,
        array_out(py, Arc::new(out.source))?,
        table_out(py, out.conflicts)?,
        out.keys,
    ))
}

#[pyfunction]
fn digest(
    py: Python<'_>,
    batch: &Bound<'_, PyAny>,
    key: String,
    buckets: u32,
    columns: Vec<String>,
) -> PyResult<Py<PyAny>> {
    hash_rows(py, batch, &key, buckets, &columns, "digest", tidesync_core::digest)
}

#[pyfunction]
fn row_hashes(
    py: Python<'_>,
    batch: &Bound<'_, PyAny>,
    key: String,
    buckets: u32,
    columns: Vec<String>,
) -> PyResult<Py<PyAny>> {
    hash_rows(py, batch, &key, buckets, &columns, "row_hashes", tidesync_core::row_hashes)
}

type HashRowsFn = fn(&RecordBatch, &str, u32, &[&str]) -> tidesync_core::Result<RecordBatch>;

/// The shared body of `digest` and `row_hashes`.
fn hash_rows(
    py: Python<'_>,
    batch: &Bound<'_, PyAny>,
    key: &str,
    buckets: u32,
    columns: &[String],
    what: &str,
    run: HashRowsFn,
) -> PyResult<Py<PyAny>> {
    let batch = batch_arg(batch, what)?;
    let out = detached(py, || {
        let columns: Vec<&str> = columns.iter().map(String::as_str).collect();
        run(&batch, key, buckets, &columns)
    })?;
    table_out(py, out)
}

/// Cap the threads a core call may use (0 = one per core).
#[pyfunction]
fn set_max_threads(n: usize) {
    tidesync_core::set_max_threads(n)
}

#[pyfunction]
fn max_threads() -> usize {
    tidesync_core::max_threads()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    alloc::configure();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_class::<PyHybridClock>()?;
    m.add_function(wrap_pyfunction!(hlc_pack, m)?)?;
    m.add_function(wrap_pyfunction!(hlc_unpack, m)?)?;
    m.add_function(wrap_pyfunction!(max_hlc, m)?)?;
    m.add_function(wrap_pyfunction!(clamp_hlcs, m)?)?;
    m.add_function(wrap_pyfunction!(logical_order, m)?)?;
    m.add_function(wrap_pyfunction!(diff, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(digest, m)?)?;
    m.add_function(wrap_pyfunction!(row_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(set_max_threads, m)?)?;
    m.add_function(wrap_pyfunction!(max_threads, m)?)?;
    Ok(())
}
