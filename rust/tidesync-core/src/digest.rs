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
use arrow_array::{Array, ArrayRef, RecordBatch, UInt32Array, UInt64Array};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{invalid, CoreError, Result};
use crate::keys::{check_len, column_index};
use crate::parallel::{par_ranges, split_by};

/// Rows hashed per slice: big enough to amortize slicing, small enough to stay in cache.
const SLICE_ROWS: usize = 64 * 1024;
/// Each thread gets at least this many rows (below that, one thread is faster).
const PARALLEL_MIN_ROWS: usize = 64 * 1024;

/// Per-bucket `{bucket, rows, hash}` for every bucket, empty ones included.
pub fn digest(batch: &RecordBatch, key: &str, buckets: u32, columns: &[&str]) -> Result<RecordBatch> {
    let input = Input::new(batch, key, buckets, columns)?;
    // Each thread sums its rows into its own buckets; the sums are added after.
    let partials = par_ranges(batch.num_rows(), PARALLEL_MIN_ROWS, |start, len| {
        let mut rows = vec![0u64; buckets as usize];
        let mut sums = vec![0u64; buckets as usize];
        let (mut bucket_of, mut hash) = (Vec::new(), Vec::new());
        for (s, l) in split_by(start, len, SLICE_ROWS) {
            input.hash_slice(s, l, &mut bucket_of, &mut hash)?;
            for (b, h) in bucket_of.iter().zip(&hash) {
                rows[*b as usize] += 1;
                sums[*b as usize] = sums[*b as usize].wrapping_add(*h);
            }
        }
        Ok::<_, CoreError>((rows, sums))
    });
    let mut rows = vec![0u64; buckets as usize];
    let mut sums = vec![0u64; buckets as usize];
    for partial in partials {
        let (r, h) = partial?;
        for b in 0..buckets as usize {
            rows[b] += r[b];
            sums[b] = sums[b].wrapping_add(h[b]);
        }
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
    let input = Input::new(batch, key, buckets, columns)?;
    let (mut bucket_of, mut hash) = (Vec::new(), Vec::new());
    input.hash_slice(0, batch.num_rows(), &mut bucket_of, &mut hash)?;
    let schema = Schema::new(vec![
        batch.schema().field(input.key_idx).clone(),
        Field::new("bucket", DataType::UInt32, false),
        Field::new("hash", DataType::UInt64, false),
    ]);
    Ok(RecordBatch::try_new(
        Arc::new(schema),
        vec![
            batch.column(input.key_idx).clone(),
            Arc::new(UInt32Array::from(bucket_of)),
            Arc::new(UInt64Array::from(hash)),
        ],
    )?)
}

/// The validated columns a digest reads.
struct Input<'a> {
    key_idx: usize,
    key: &'a str,
    key_col: &'a ArrayRef,
    columns: Vec<(&'a str, &'a ArrayRef)>,
    bits: u32,
}

impl<'a> Input<'a> {
    fn new(batch: &'a RecordBatch, key: &'a str, buckets: u32, columns: &[&'a str]) -> Result<Self> {
        if buckets == 0 || !buckets.is_power_of_two() {
            return Err(invalid(format!("buckets must be a power of two (1, 2, 4, ... 2^31), got {buckets}")));
        }
        check_len(batch.num_rows())?;
        let key_idx = column_index(batch, key, "key")?;
        let key_col = batch.column(key_idx);
        if key_col.null_count() > 0 {
            return Err(invalid(format!("key column {key:?} has null values; every row needs a key")));
        }
        let columns = columns
            .iter()
            .map(|name| Ok((*name, batch.column(column_index(batch, name, "digest")?))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { key_idx, key, key_col, columns, bits: buckets.trailing_zeros() })
    }

    /// Bucket and hash of rows `start..start + len`, into reused buffers.
    fn hash_slice(&self, start: usize, len: usize, bucket_of: &mut Vec<u32>, hash: &mut Vec<u64>) -> Result<()> {
        hash.clear();
        hash.resize(len, 0);
        fold_column(hash, self.key_col.slice(start, len).as_ref(), self.key, true)?;
        let bits = self.bits;
        bucket_of.clear();
        bucket_of.extend(hash.iter().map(|h| if bits == 0 { 0 } else { (h >> (64 - bits)) as u32 }));
        for (name, col) in &self.columns {
            fold_column(hash, col.slice(start, len).as_ref(), name, false)?;
        }
        for h in hash.iter_mut() {
            *h = avalanche(*h);
        }
        Ok(())
    }
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
        DataType::Utf8 => {
            fold!(col.as_string::<i32>(), |a: &&arrow_array::StringArray, i| xxh3_64(a.value(i).as_bytes()))
        }
        DataType::LargeUtf8 => {
            fold!(col.as_string::<i64>(), |a: &&arrow_array::LargeStringArray, i| xxh3_64(a.value(i).as_bytes()))
        }
        DataType::Utf8View => {
            fold!(col.as_string_view(), |a: &&arrow_array::StringViewArray, i| xxh3_64(a.value(i).as_bytes()))
        }
        DataType::Binary => fold!(col.as_binary::<i32>(), |a: &&arrow_array::BinaryArray, i| xxh3_64(a.value(i))),
        DataType::LargeBinary => {
            fold!(col.as_binary::<i64>(), |a: &&arrow_array::LargeBinaryArray, i| xxh3_64(a.value(i)))
        }
        DataType::FixedSizeBinary(_) => {
            fold!(col.as_fixed_size_binary(), |a: &&arrow_array::FixedSizeBinaryArray, i| xxh3_64(a.value(i)))
        }
        DataType::Boolean => {
            fold!(col.as_boolean(), |a: &&arrow_array::BooleanArray, i| scalar(a.value(i) as i64 + 2, seed))
        }
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
    use arrow_array::{Int64Array, StringArray};

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

    #[test]
    fn parallel_digest_agrees_with_row_hashes() {
        let n = 300_000; // above PARALLEL_MIN_ROWS, several slices per thread
        let keys: Vec<String> = (0..n).map(|i| format!("key-{i}")).collect();
        let b = batch(keys.iter().map(String::as_str).collect(), (0..n as i64).collect());
        let d = digest(&b, "id", 64, &["_hlc"]).unwrap();
        let r = row_hashes(&b, "id", 64, &["_hlc"]).unwrap();
        let buckets = r.column(1).as_any().downcast_ref::<UInt32Array>().unwrap();
        let hashes = r.column(2).as_any().downcast_ref::<UInt64Array>().unwrap();
        let mut sums = vec![0u64; 64];
        let mut rows = vec![0u64; 64];
        for i in 0..n {
            sums[buckets.value(i) as usize] = sums[buckets.value(i) as usize].wrapping_add(hashes.value(i));
            rows[buckets.value(i) as usize] += 1;
        }
        let d_rows = d.column(1).as_any().downcast_ref::<UInt64Array>().unwrap();
        let d_sums = d.column(2).as_any().downcast_ref::<UInt64Array>().unwrap();
        assert_eq!(d_rows.values().to_vec(), rows);
        assert_eq!(d_sums.values().to_vec(), sums);
    }
}
