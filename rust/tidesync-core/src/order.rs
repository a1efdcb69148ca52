//! Logical-clock ordering of a batch of changes.

use arrow_array::{RecordBatch, UInt32Array};
use arrow_ord::sort::{lexsort_to_indices, SortColumn};
use arrow_schema::SortOptions;

use crate::error::{invalid, Result};
use crate::keys::column_index;

/// Indices that sort `batch` by the named columns, most significant first, nulls
/// first: with `["_hlc", "_node", "_table", key]` this is the order in which the
/// changes happened, ties broken the same way on every node.
pub fn logical_order(batch: &RecordBatch, by: &[&str]) -> Result<UInt32Array> {
    if by.is_empty() {
        return Err(invalid("logical_order needs at least one column to sort by"));
    }
    let opts = SortOptions { descending: false, nulls_first: true };
    let columns = by
        .iter()
        .map(|name| Ok(SortColumn { values: batch.column(column_index(batch, name, "sort")?).clone(), options: Some(opts) }))
        .collect::<Result<Vec<_>>>()?;
    Ok(lexsort_to_indices(&columns, None)?)
}
