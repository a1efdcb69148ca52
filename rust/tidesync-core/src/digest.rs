//! Range digests: hash rows into buckets of the key-hash space so that two nodes
//! can find which buckets differ by exchanging a few kilobytes, then which rows.
//!
//! A row's bucket depends on its key only (the top bits of `xxh3_64(key)`), so a
//! row stays in its bucket across versions, and bucket `b` of `2^k` splits into
//! `2b` and `2b + 1` of `2^(k+1)`. A row's hash starts from the key hash and folds
//! in each listed column; a bucket's hash is the wrapping sum of its rows' hashes,
//! so it does not depend on row order. Hashes are for finding divergence, not for
//! security: they are not cryptographic.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, RecordBatch, UInt32Array, UInt64Array};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{invalid, CoreError, Result};
use crate::keys::{check_len, column_index};

/// Per-bucket `{bucket, rows, hash}` for every bucket, empty ones included.
pub fn digest(batch: &RecordBatch, key: &str, buckets: u32, columns: &[&str]) -> Result<RecordBatch> {
    let (bucket_of, hash) = hash_rows(batch, key, buckets, columns)?;
    let mut rows = vec![0u64; buckets as usize];
    let mut sums = vec![0u64; buckets as usize];
    for (b, h) in bucket_of.iter().zip(&hash) {
        rows[*b as usize] += 1;
        sums[*b as usize] = sums[*b as usize].wrapping_add(*h);
    }
    let schema = Schema::new(vec![
        Field::new("bucket", DataType::UInt32, false),
        Field::new("rows", DataType::UInt64, false),
        Field::new("hash", DataType::UInt64, false),
    ]);
    Ok(RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(UInt32Array::from_iter_values(0..buckets)),
            Arc::new(UInt64Array::from(rows)),
            Arc::new(UInt64Array::from(sums)),
        ],
    )?)
}

/// Per-row `{key, bucket, hash}`, to narrow a differing bucket down to rows.
pub fn row_hashes(batch: &RecordBatch, key: &str, buckets: u32, columns: &[&str]) -> Result<RecordBatch> {
    let (bucket_of, hash) = hash_rows(batch, key, buckets, columns)?;
    let key_idx = column_index(batch, key, "key")?;
    let schema = Schema::new(vec![
        batch.schema().field(key_idx).clone(),
        Field::new("bucket", DataType::UInt32, false),
        Field::new("hash", DataType::UInt64, false),
    ]);
    Ok(RecordBatch::try_new(
        Arc::new(schema),
        vec![batch.column(key_idx).clone(), Arc::new(UInt32Array::from(bucket_of)), Arc::new(UInt64Array::from(hash))],
    )?)
}

/// Bucket and hash of every row.
fn hash_rows(batch: &RecordBatch, key: &str, buckets: u32, columns: &[&str]) -> Result<(Vec<u32>, Vec<u64>)> {
    if buckets == 0 || !buckets.is_power_of_two() {
        return Err(invalid(format!("buckets must be a power of two (1, 2, 4, ... 2^31), got {buckets}")));
    }
    check_len(batch.num_rows())?;
    let key_col = batch.column(column_index(batch, key, "key")?);
    if key_col.null_count() > 0 {
        return Err(invalid(format!("key column {key:?} has null values; every row needs a key")));
    }
    let bits = buckets.trailing_zeros();
    let mut hash = vec![0u64; batch.num_rows()];
    fold_column(&mut hash, key_col.as_ref(), key, true)?;
    let bucket_of: Vec<u32> =
        hash.iter().map(|h| if bits == 0 { 0 } else { (h >> (64 - bits)) as u32 }).collect();
    for name in columns {
        let col = batch.column(column_index(batch, name, "digest")?);
        fold_column(&mut hash, col.as_ref(), name, false)?;
    }
    for h in &mut hash {
        *h = avalanche(*h);
    }
    Ok((bucket_of, hash))
}

/// A marker folded in for null values, so null differs from every value.
const NULL_MARK: u64 = 0x6e75_6c6c_6e75_6c6c;

/// Combine a running row hash with a value hash (order-sensitive across columns).
#[inline]
fn mix(h: u64, v: u64) -> u64 {
    (h.rotate_left(27) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Final avalanche (murmur3's fmix64), so nearby inputs spread over all bits.
#[inline]
fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Fold one column into the row hashes. The key column seeds them with `xxh3_64`
/// of its bytes (which also picks the bucket); other columns are mixed in, fixed
/// width values directly and variable-width ones through `xxh3_64`.
fn fold_column(hash: &mut [u64], col: &dyn Array, name: &str, seed: bool) -> Result<()> {
    macro_rules! fold {
        ($values:expr, $f:expr) => {{
            let values = $values;
            let nulls = col.logical_nulls();
            for (i, h) in hash.iter_mut().enumerate() {
                let v = if nulls.as_ref().is_some_and(|n| n.is_null(i)) { NULL_MARK } else { $f(&values, i) };
                *h = if seed { v } else { mix(*h, v) };
            }
        }};
    }
    macro_rules! prim {
        ($t:ty) => {
            fold!(col.as_primitive::<$t>(), |a: &&PrimitiveArray<$t>, i| scalar(a.value(i) as i64, seed))
        };
    }
    use arrow_array::PrimitiveArray;
    match col.data_type() {
        DataType::Utf8 => fold!(col.as_string::<i32>(), |a: &&arrow_array::StringArray, i| xxh3_64(a.value(i).as_bytes())),
        DataType::LargeUtf8 => {
            fold!(col.as_string::<i64>(), |a: &&arrow_array::LargeStringArray, i| xxh3_64(a.value(i).as_bytes()))
        }
        DataType::Utf8View => fold!(col.as_string_view(), |a: &&arrow_array::StringViewArray, i| xxh3_64(a.value(i).as_bytes())),
        DataType::Binary => fold!(col.as_binary::<i32>(), |a: &&arrow_array::BinaryArray, i| xxh3_64(a.value(i))),
        DataType::LargeBinary => fold!(col.as_binary::<i64>(), |a: &&arrow_array::LargeBinaryArray, i| xxh3_64(a.value(i))),
        DataType::FixedSizeBinary(_) => {
            fold!(col.as_fixed_size_binary(), |a: &&arrow_array::FixedSizeBinaryArray, i| xxh3_64(a.value(i)))
        }
        DataType::Boolean => fold!(col.as_boolean(), |a: &&arrow_array::BooleanArray, i| scalar(a.value(i) as i64 + 2, seed)),
        DataType::Int8 => prim!(Int8Type),
        DataType::Int16 => prim!(Int16Type),
        DataType::Int32 => prim!(Int32Type),
        DataType::Int64 => prim!(Int64Type),
        DataType::UInt8 => prim!(UInt8Type),
        DataType::UInt16 => prim!(UInt16Type),
        DataType::UInt32 => prim!(UInt32Type),
        DataType::UInt64 => prim!(UInt64Type),
        DataType::Float32 => fold!(col.as_primitive::<Float32Type>(), |a: &&PrimitiveArray<Float32Type>, i| scalar(
            a.value(i).to_bits() as i64,
            seed
        )),
        DataType::Float64 => fold!(col.as_primitive::<Float64Type>(), |a: &&PrimitiveArray<Float64Type>, i| scalar(
            a.value(i).to_bits() as i64,
            seed
        )),
        DataType::Date32 => prim!(Date32Type),
        DataType::Date64 => prim!(Date64Type),
        DataType::Timestamp(unit, _) => match unit {
            TimeUnit::Second => prim!(TimestampSecondType),
            TimeUnit::Millisecond => prim!(TimestampMillisecondType),
            TimeUnit::Microsecond => prim!(TimestampMicrosecondType),
            TimeUnit::Nanosecond => prim!(TimestampNanosecondType),
        },
        other => {
            return Err(CoreError::UnsupportedType(format!(
                "column {name:?} has type {other}, which digests do not support"
            )))
        }
    }
    Ok(())
}

/// A fixed-width value as a hash input. Used raw when mixed into a row hash; as a
/// key it is hashed so that bucket prefixes are uniform.
#[inline]
fn scalar(v: i64, seed: bool) -> u64 {
    if seed {
        xxh3_64(&v.to_le_bytes())
    } else {
        v as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{ArrayRef, Int64Array, StringArray};

    fn batch(keys: Vec<&str>, hlc: Vec<i64>) -> RecordBatch {
        RecordBatch::try_from_iter(vec![
            ("id", Arc::new(StringArray::from(keys)) as ArrayRef),
            ("_hlc", Arc::new(Int64Array::from(hlc)) as ArrayRef),
        ])
        .unwrap()
    }

    #[test]
    fn order_independent_and_sensitive_to_versions() {
        let a = digest(&batch(vec!["a", "b", "c"], vec![1, 2, 3]), "id", 4, &["_hlc"]).unwrap();
        let b = digest(&batch(vec!["c", "a", "b"], vec![3, 1, 2]), "id", 4, &["_hlc"]).unwrap();
        let c = digest(&batch(vec!["c", "a", "b"], vec![3, 1, 9]), "id", 4, &["_hlc"]).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(digest(&batch(vec![], vec![]), "id", 3, &[]).is_err());
    }
}
