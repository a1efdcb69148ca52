//! Changeset diff of two versions of a table, keyed by a primary-key column.

use std::hash::Hash;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch, UInt32Array};
use arrow_buffer::BooleanBuffer;
use arrow_schema::{DataType, Field, Schema};
use arrow_select::take::take;

use crate::compare;
use crate::error::{invalid, Result};
use crate::keys::{check_len, column_index, duplicate, read_key_pair, FirstSeen, KeyIndex, KeyValues};
use crate::parallel::par_map;
use crate::schema::require_same_columns;

/// Each thread gets at least this many rows (below that, one thread is faster).
const PARALLEL_MIN_ROWS: usize = 64 * 1024;

/// Column names the diff adds to its outputs.
pub const OLD_INDEX: &str = "_old_index";
pub const NEW_INDEX: &str = "_new_index";

/// What changed from `old` to `new` (see docs/semantics.md).
#[derive(Debug, Clone)]
pub struct Diff {
    /// `{key, _new_index}`: keys only in `new`, in `new`'s order.
    pub inserted: RecordBatch,
    /// `{key, _old_index}`: keys only in `old`, in `old`'s order.
    pub deleted: RecordBatch,
    /// `{key, _old_index, _new_index, <col>: bool...}`: keys in both whose rows differ.
    pub updated: RecordBatch,
}

/// Diff two batches with the same schema by `key`.
pub fn diff(old: &RecordBatch, new: &RecordBatch, key: &str) -> Result<Diff> {
    require_same_columns(old, new, "old", "new")?;
    let key_idx = column_index(new, key, "key")?;
    for reserved in [OLD_INDEX, NEW_INDEX] {
        if new.schema().index_of(reserved).is_ok() {
            return Err(invalid(format!("column name {reserved:?} is reserved for diff output; rename it")));
        }
    }
    let matches = match read_key_pair((old, "old"), (new, "new"), key)? {
        (KeyValues::Bytes(a), KeyValues::Bytes(b)) => match_keys(&a, &b, key)?,
        (KeyValues::Int(a), KeyValues::Int(b)) => match_keys(&a, &b, key)?,
        (KeyValues::Uuid(a), KeyValues::Uuid(b)) => match_keys(&a, &b, key)?,
        // Same schema means same key type; this arm only guards that invariant.
        _ => return Err(invalid("key columns of old and new differ in type")),
    };
    build(old, new, key_idx, matches)
}

/// Row positions matched between the two sides.
struct Matches {
    inserted: Vec<u32>,
    deleted: Vec<u32>,
    old_rows: Vec<u32>,
    new_rows: Vec<u32>,
}

fn match_keys<K: Hash + Eq + Copy + Sync>(old: &[K], new: &[K], key: &str) -> Result<Matches> {
    check_len(new.len())?;
    let index = KeyIndex::unique(old, key, "old")?;
    let mut matched_by = vec![u32::MAX; old.len()];
    let mut inserted_seen = FirstSeen::new(new, 0);
    let mut m = Matches { inserted: Vec::new(), deleted: Vec::new(), old_rows: Vec::new(), new_rows: Vec::new() };
    m.old_rows.reserve(new.len().min(old.len()));
    m.new_rows.reserve(new.len().min(old.len()));
    // The probes only read the index: run them in parallel, then walk the results.
    let probes: Vec<Option<u32>> = par_map(new.len(), PARALLEL_MIN_ROWS, |row| index.get(&new[row]));
    for (row, probe) in probes.into_iter().enumerate() {
        match probe {
            Some(o) => {
                let prev = std::mem::replace(&mut matched_by[o as usize], row as u32);
                if prev != u32::MAX {
                    return Err(duplicate(key, "new", prev as usize, row));
                }
                m.old_rows.push(o);
                m.new_rows.push(row as u32);
            }
            None => {
                let first = inserted_seen.first_row(row as u32);
                if first != row as u32 {
                    return Err(duplicate(key, "new", first as usize, row));
                }
                m.inserted.push(row as u32);
            }
        }
    }
    m.deleted = (0..old.len() as u32).filter(|&o| matched_by[o as usize] == u32::MAX).collect();
    Ok(m)
}

fn build(old: &RecordBatch, new: &RecordBatch, key_idx: usize, m: Matches) -> Result<Diff> {
    let key_field = new.schema().field(key_idx).clone();
    let index_field = |name: &str| Field::new(name, DataType::UInt32, false);
    let keyed = |source: &RecordBatch, rows: Vec<u32>, index_name: &str| -> Result<RecordBatch> {
        let rows = UInt32Array::from(rows);
        let keys = take(source.column(key_idx), &rows, None)?;
        let schema = Schema::new(vec![key_field.clone(), index_field(index_name)]);
        Ok(RecordBatch::try_new(Arc::new(schema), vec![keys, Arc::new(rows)])?)
    };
    let inserted = keyed(new, m.inserted, NEW_INDEX)?;
    let deleted = keyed(old, m.deleted, OLD_INDEX)?;

    // Compare matched rows column by column through the index pairs (nulls are
    // values: IS DISTINCT FROM), then keep the pairs where any column changed.
    // Columns are independent: on large diffs, compare them on several threads.
    let schema = new.schema();
    let compared: Vec<usize> = (0..schema.fields().len()).filter(|&c| c != key_idx).collect();
    let per_thread = if m.new_rows.len() >= PARALLEL_MIN_ROWS { 1 } else { usize::MAX };
    let changed: Vec<Result<BooleanBuffer>> = par_map(compared.len(), per_thread, |i| {
        let c = compared[i];
        compare::changed(old.column(c).as_ref(), new.column(c).as_ref(), &m.old_rows, &m.new_rows)
    });
    let mut masks: Vec<(Field, BooleanArray)> = Vec::new();
    let mut any = BooleanBuffer::new_unset(m.new_rows.len());
    for (&c, changed) in compared.iter().zip(changed) {
        let changed = changed?;
        any = &any | &changed;
        masks.push((Field::new(schema.field(c).name(), DataType::Boolean, false), BooleanArray::new(changed, None)));
    }
    let (old_rows, new_rows) = (UInt32Array::from(m.old_rows), UInt32Array::from(m.new_rows));
    let keep = BooleanArray::new(any, None);
    let filter = |a: &dyn Array| arrow_select::filter::filter(a, &keep);
    let mut fields = vec![key_field, index_field(OLD_INDEX), index_field(NEW_INDEX)];
    let mut columns: Vec<ArrayRef> =
        vec![filter(&take(new.column(key_idx), &new_rows, None)?)?, filter(&old_rows)?, filter(&new_rows)?];
    for (field, mask) in masks {
        fields.push(field);
        columns.push(filter(&mask)?);
    }
    let updated = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    Ok(Diff { inserted, deleted, updated })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int64Array, StringArray};

    fn batch(keys: Vec<&str>, vals: Vec<Option<i64>>) -> RecordBatch {
        RecordBatch::try_from_iter(vec![
            ("id", Arc::new(StringArray::from(keys)) as ArrayRef),
            ("v", Arc::new(Int64Array::from(vals)) as ArrayRef),
        ])
        .unwrap()
    }

    #[test]
    fn finds_inserts_deletes_updates() {
        let old = batch(vec!["a", "b", "c"], vec![Some(1), None, Some(3)]);
        let new = batch(vec!["d", "c", "b", "a"], vec![Some(4), Some(3), Some(2), Some(1)]);
        let d = diff(&old, &new, "id").unwrap();
        assert_eq!(d.inserted.num_rows(), 1);
        assert_eq!(d.deleted.num_rows(), 0);
        assert_eq!(d.updated.num_rows(), 1); // b: null -> 2
        let k = d.updated.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(k.value(0), "b");
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let old = batch(vec!["a", "a"], vec![Some(1), Some(2)]);
        let new = batch(vec!["a"], vec![Some(1)]);
        assert!(matches!(diff(&old, &new, "id"), Err(crate::CoreError::DuplicateKey(_))));
        assert!(matches!(diff(&new, &old, "id"), Err(crate::CoreError::DuplicateKey(_))));
        let new2 = batch(vec!["z", "z"], vec![Some(1), Some(2)]);
        assert!(matches!(diff(&new, &new2, "id"), Err(crate::CoreError::DuplicateKey(_))));
    }
}
