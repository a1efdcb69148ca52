//! Schema checks shared by diff and merge.

use arrow_array::RecordBatch;
use arrow_schema::{Field, Schema, SchemaRef};
use std::sync::Arc;

use crate::error::{CoreError, Result};

/// Two batches must have the same column names and types, in the same order.
/// Nullability and metadata may differ (PostgreSQL and SQLite report them differently).
pub(crate) fn require_same_columns(a: &RecordBatch, b: &RecordBatch, a_name: &str, b_name: &str) -> Result<()> {
    let (sa, sb) = (a.schema(), b.schema());
    let describe = |s: &Schema| {
        s.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect::<Vec<_>>().join(", ")
    };
    let same = sa.fields().len() == sb.fields().len()
        && sa.fields().iter().zip(sb.fields()).all(|(x, y)| x.name() == y.name() && x.data_type() == y.data_type());
    if !same {
        return Err(CoreError::SchemaMismatch(format!(
            "the {a_name} and {b_name} batches have different columns: [{}] vs [{}]; \
             both sides must use the same table schema",
            describe(&sa),
            describe(&sb)
        )));
    }
    Ok(())
}

/// The schema of rows assembled from both sides: a column is nullable if either side's is.
pub(crate) fn union_nullability(a: &Schema, b: &Schema) -> SchemaRef {
    let fields: Vec<Field> = a
        .fields()
        .iter()
        .zip(b.fields())
        .map(|(x, y)| x.as_ref().clone().with_nullable(x.is_nullable() || y.is_nullable()))
        .collect();
    Arc::new(Schema::new_with_metadata(fields, a.metadata().clone()))
}
