//! Logical-clock ordering of a batch of changes.

use std::cmp::Ordering;

use arrow_array::{Array, Int64Array, RecordBatch, UInt32Array};
use arrow_ord::ord::make_comparator;
use arrow_ord::sort::{lexsort_to_indices, SortColumn};
use arrow_schema::SortOptions;

use crate::error::{invalid, Result};
use crate::keys::{check_len, column_index};

/// How values order wherever the core sorts or compares them: ascending, nulls first
/// (docs/semantics.md); merge's tie-breaks use it too.
pub(crate) const VALUE_ORDER: SortOptions = SortOptions { descending: false, nulls_first: true };

/// Indices that sort `batch` by the named columns, most significant first, nulls
/// first: with `["_hlc", "_node", "_table", key]` this is the order in which the
/// changes happened, ties broken the same way on every node.
pub fn logical_order(batch: &RecordBatch, by: &[&str]) -> Result<UInt32Array> {
    if by.is_empty() {
        return Err(invalid("logical_order needs at least one column to sort by"));
    }
    check_len(batch.num_rows())?;
    let columns = by
        .iter()
        .map(|name| Ok(batch.column(column_index(batch, name, "sort")?).clone()))
        .collect::<Result<Vec<_>>>()?;
    if let Some(stamps) = columns[0].as_any().downcast_ref::<Int64Array>().filter(|a| a.null_count() == 0) {
        return by_stamp_then_rest(stamps, &columns[1..]);
    }
    let sort_columns: Vec<SortColumn> =
        columns.into_iter().map(|values| SortColumn { values, options: Some(VALUE_ORDER) }).collect();
    Ok(lexsort_to_indices(&sort_columns, None)?)
}

/// The usual case, a null-free int64 stamp first: sort plain `(stamp, row)` pairs,
/// then order only the runs of equal stamps by the remaining columns. Stamps rarely
/// tie, so the dynamic comparators seldom run. Rows equal in every column keep
/// their input order, so the result is deterministic.
fn by_stamp_then_rest(stamps: &Int64Array, rest: &[arrow_array::ArrayRef]) -> Result<UInt32Array> {
    let values = stamps.values();
    let mut pairs: Vec<(i64, u32)> = values.iter().enumerate().map(|(i, v)| (*v, i as u32)).collect();
    pairs.sort_unstable();
    let mut order: Vec<u32> = pairs.iter().map(|p| p.1).collect();
    if !rest.is_empty() {
        let comparators =
            rest.iter().map(|c| make_comparator(c.as_ref(), c.as_ref(), VALUE_ORDER)).collect::<Result<Vec<_>, _>>()?;
        let mut start = 0;
        while start < pairs.len() {
            let end = start + pairs[start..].iter().take_while(|p| p.0 == pairs[start].0).count();
            if end - start > 1 {
                // Stable within the run: `(stamp, row)` sorted rows ascending already.
                order[start..end].sort_by(|&a, &b| {
                    comparators
                        .iter()
                        .map(|c| c(a as usize, b as usize))
                        .find(|o| *o != Ordering::Equal)
                        .unwrap_or(Ordering::Equal)
                });
            }
            start = end;
        }
    }
    Ok(UInt32Array::from(order))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{ArrayRef, StringArray};
    use std::sync::Arc;

    #[test]
    fn stamp_then_node_then_input_order() {
        let b = RecordBatch::try_from_iter(vec![
            ("_hlc", Arc::new(Int64Array::from(vec![3, 1, 3, 2, 3])) as ArrayRef),
            ("_node", Arc::new(StringArray::from(vec!["b", "z", "a", "a", "a"])) as ArrayRef),
        ])
        .unwrap();
        let fast = logical_order(&b, &["_hlc", "_node"]).unwrap();
        assert_eq!(fast.values().to_vec(), vec![1, 3, 2, 4, 0]);
        // The general path (node first) agrees with arrow's lexsort.
        let general = logical_order(&b, &["_node", "_hlc"]).unwrap();
        assert_eq!(general.values().to_vec(), vec![3, 2, 4, 0, 1]);
    }
}
