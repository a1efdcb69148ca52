//! Arrow in and out through the PyCapsule interface, and the one GIL-release helper.

use arrow_array::{ArrayRef, RecordBatch};
use arrow_select::concat::{concat, concat_batches};
use pyo3::prelude::*;
use pyo3_arrow::input::{AnyArray, AnyRecordBatch};
use pyo3_arrow::{PyArray, PyTable};
use tidesync_core::CoreError;

use crate::errors::{to_pyerr, InvalidInputError};

/// Run heavy core work with the GIL released, mapping core errors to exceptions.
/// Every binding that does more than trivial work goes through here.
pub fn detached<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> Result<T, CoreError> + Send,
{
    py.detach(work).map_err(to_pyerr)
}

/// Any Arrow tabular producer (`__arrow_c_array__` or `__arrow_c_stream__`: pyarrow
/// Table/RecordBatch, polars DataFrame, ...) as one record batch.
pub fn batch_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<RecordBatch> {
    let input: AnyRecordBatch = obj.extract().map_err(|e| {
        InvalidInputError::new_err(format!(
            "{what}: expected Arrow tabular data (a pyarrow Table or RecordBatch, a polars DataFrame, \
             or anything with __arrow_c_stream__), got {}: {e}",
            type_name(obj)
        ))
    })?;
    let reader = input.into_reader()?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>().map_err(|e| to_pyerr(e.into()))?;
    let batch = match batches.len() {
        1 => batches.into_iter().next().unwrap(),
        _ => concat_batches(&schema, &batches).map_err(|e| to_pyerr(e.into()))?,
    };
    without_views(batch).map_err(|e| to_pyerr(e.into()))
}

/// Producers differ in how they lay out strings (polars exports `string_view`,
/// pyarrow and PostgreSQL drivers `string`). Normalise views to the plain layouts
/// so that the same table compares equal whoever produced it.
fn without_views(batch: RecordBatch) -> Result<RecordBatch, arrow_schema::ArrowError> {
    use arrow_schema::{DataType, Field, Schema};
    let plain = |t: &DataType| match t {
        DataType::Utf8View => Some(DataType::Utf8),
        DataType::BinaryView => Some(DataType::Binary),
        _ => None,
    };
    if !batch.schema().fields().iter().any(|f| plain(f.data_type()).is_some()) {
        return Ok(batch);
    }
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        match plain(field.data_type()) {
            Some(t) => {
                columns.push(arrow_cast::cast(column, &t)?);
                fields.push(Field::new(field.name(), t, field.is_nullable()));
            }
            None => {
                columns.push(column.clone());
                fields.push(field.as_ref().clone());
            }
        }
    }
    RecordBatch::try_new(
        std::sync::Arc::new(Schema::new_with_metadata(fields, batch.schema().metadata().clone())),
        columns,
    )
}

/// Any Arrow array producer (a pyarrow Array or ChunkedArray, a polars Series) as one array.
pub fn array_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<ArrayRef> {
    let input: AnyArray = obj.extract().map_err(|e| {
        InvalidInputError::new_err(format!("{what}: expected an Arrow array, got {}: {e}", type_name(obj)))
    })?;
    let (chunks, _field) = input.into_chunked_array()?.into_inner();
    match chunks.len() {
        1 => Ok(chunks.into_iter().next().unwrap()),
        _ => {
            let refs: Vec<&dyn arrow_array::Array> = chunks.iter().map(|c| c.as_ref()).collect();
            concat(&refs).map_err(|e| to_pyerr(e.into()))
        }
    }
}

/// A batch out, as an object with `__arrow_c_stream__` (pyarrow, polars and duckdb
/// import it without a copy).
pub fn table_out(py: Python<'_>, batch: RecordBatch) -> PyResult<Py<PyAny>> {
    let schema = batch.schema();
    Ok(PyTable::try_new(vec![batch], schema)?.into_pyobject(py)?.into_any().unbind())
}

/// An array out, as an object with `__arrow_c_array__`.
pub fn array_out(py: Python<'_>, array: ArrayRef) -> PyResult<Py<PyAny>> {
    Ok(PyArray::from_array_ref(array).into_pyobject(py)?.into_any().unbind())
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "an unknown object".into())
}
