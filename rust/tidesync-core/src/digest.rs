//! Range digests: hash rows into buckets of the key-hash space so that two nodes
//! can find which buckets differ by exchanging a few kilobytes, then which rows.
//!
//! A row's bucket depends on its key only (the top bits of the key's hash,
//! `hash::hash_bytes` for text and binary keys), so a row stays in its bucket across
//! versions, and bucket `b` of `2^k` splits into
//! `2b` and `2b + 1` of `2^(k+1)`. A row's hash starts from the key hash and folds
//! in each listed column; a bucket's hash is the wrapping sum of its rows' hashes,
//! so it does not depend on row order. Hashes are for finding divergence, not for
//! security: they are not cryptographic.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrayRef, ArrowPrimitiveType, OffsetSizeTrait, RecordBatch, UInt32Array, UInt64Array};
use arrow_buffer::NullBuffer;
use arrow_schema::{DataType, Field, Schema, TimeUnit};

use crate::error::{invalid, CoreError, Result};
use crate::hash::{hash_bytes, hash_in, hash_u64, mum};
use crate::keys::{check_len, column_index};
use crate::parallel::{par_fold, split_by};

/// Rows hashed per chunk: the chunk's row hashes and buckets (48 KiB) stay in L1/L2
/// while every column is folded into them, one tight typed loop per column.
const CHUNK_ROWS: usize = 4 * 1024;
/// Each thread gets at least this many rows (below that, one thread is faster).
const PARALLEL_MIN_ROWS: usize = 64 * 1024;
/// Rows a thread claims at a time (`par_fold`): small enough to even out a thread
/// the host holds up, large enough that claiming costs nothing.
const CLAIM_ROWS: usize = 32 * 1024;

/// Per-bucket `{bucket, rows, hash}` for every bucket, empty ones included.
pub fn digest(batch: &RecordBatch, key: &str, buckets: u32, columns: &[&str]) -> Result<RecordBatch> {
    let input = Input::new(batch, key, buckets, columns)?;
    // Each thread sums its rows into its own buckets; the sums are added after.
    // A bucket's count and sum side by side: one cache line to update per row.
    let init = || vec![(0u64, 0u64); buckets as usize];
    let partials = par_fold(batch.num_rows(), PARALLEL_MIN_ROWS, CLAIM_ROWS, init, |acc, start, len| {
        input.each_row(start, len, |b, h| {
            let a = &mut acc[b as usize];
            *a = (a.0 + 1, a.1.wrapping_add(h));
        });
    });
    let mut rows = vec![0u64; buckets as usize];
    let mut sums = vec![0u64; buckets as usize];
    for part in partials {
        for (b, (r, h)) in part.into_iter().enumerate() {
            rows[b] += r;
            sums[b] = sums[b].wrapping_add(h);
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
    let (mut bucket_of, mut hash) = (Vec::with_capacity(batch.num_rows()), Vec::with_capacity(batch.num_rows()));
    input.each_row(0, batch.num_rows(), |b, h| {
        bucket_of.push(b);
        hash.push(h);
    });
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
    key: Column<'a>,
    columns: Vec<Column<'a>>,
    bits: u32,
}

impl<'a> Input<'a> {
    fn new(batch: &'a RecordBatch, key: &str, buckets: u32, columns: &[&str]) -> Result<Self> {
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
            .map(|name| Column::new(batch.column(column_index(batch, name, "digest")?), name))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { key_idx, key: Column::new(key_col, key)?, columns, bits: buckets.trailing_zeros() })
    }

    /// Bucket and hash of each of rows `start..start + len`, in row order.
    fn each_row(&self, start: usize, len: usize, mut each: impl FnMut(u32, u64)) {
        if !fused::each_row(self, start, len, &mut each) {
            self.hash_rows(start, len, |bucket_of, hash| {
                bucket_of.iter().zip(hash).for_each(|(&b, &h)| each(b, h));
            });
        }
    }

    /// The general path: bucket and hash of rows `start..start + len`, handed to
    /// `each_chunk` a chunk at a time, so that each column's loop runs over
    /// cache-resident hashes.
    fn hash_rows(&self, start: usize, len: usize, mut each_chunk: impl FnMut(&[u32], &[u64])) {
        let mut bucket_of = vec![0u32; CHUNK_ROWS.min(len)];
        let mut hash = vec![0u64; CHUNK_ROWS.min(len)];
        for (s, l) in split_by(start, len, CHUNK_ROWS) {
            let (bucket_of, hash) = (&mut bucket_of[..l], &mut hash[..l]);
            self.key.fold(hash, s, Fold::Seed);
            // The bucket is a prefix of the key hash; `checked_shr` is None for 0 bits.
            let shift = 64 - self.bits;
            for (b, h) in bucket_of.iter_mut().zip(hash.iter()) {
                *b = h.checked_shr(shift).unwrap_or(0) as u32;
            }
            for col in &self.columns {
                col.fold(hash, s, Fold::Mix);
            }
            for h in hash.iter_mut() {
                *h = avalanche(*h);
            }
            each_chunk(bucket_of, hash);
        }
    }
}

mod fused;

/// A marker folded in for null values, so null differs from every value.
const NULL_MARK: u64 = 0x6e75_6c6c_6e75_6c6c;

/// Combine a running row hash with a value hash (order-sensitive across columns).
#[inline]
fn mix(h: u64, v: u64) -> u64 {
    (h.rotate_left(27) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Final mixing of a row hash: one folded 128-bit multiply, which spreads every
/// input bit over the result's bits (the sums of buckets need all of them).
#[inline]
fn avalanche(h: u64) -> u64 {
    mum(h ^ 0x2d35_8dcc_aa6c_78a5, 0x8bb8_4b93_962e_acc9)
}

/// How a column's value hashes enter the row hashes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fold {
    /// The key column: its hash starts the row hash (and picks the bucket).
    Seed,
    /// Any other column: mixed into the running row hash.
    Mix,
}

/// A column to hash, with its nulls (None when it has none, for a branch-free loop).
struct Column<'a> {
    array: &'a ArrayRef,
    nulls: Option<NullBuffer>,
}

impl<'a> Column<'a> {
    fn new(array: &'a ArrayRef, name: &str) -> Result<Self> {
        if !supported(array.data_type()) {
            return Err(CoreError::UnsupportedType(format!(
                "column {name:?} has type {}, which digests do not support",
                array.data_type()
            )));
        }
        let nulls = array.logical_nulls().filter(|n| n.null_count() > 0);
        Ok(Self { array, nulls })
    }

    /// Fold rows `start..start + hash.len()` into the row hashes. Variable-width
    /// values go through `hash_bytes`; fixed-width ones are used raw when mixed in, and
    /// hashed as their 8 little-endian bytes as a key (so that bucket
    /// prefixes are uniform).
    fn fold(&self, hash: &mut [u64], start: usize, how: Fold) {
        let col = self.array.as_ref();
        let n = self.nulls.as_ref();
        match col.data_type() {
            DataType::Utf8 => {
                let a = col.as_string::<i32>();
                fold_offsets(hash, n, start, how, a.value_offsets(), a.value_data())
            }
            DataType::LargeUtf8 => {
                let a = col.as_string::<i64>();
                fold_offsets(hash, n, start, how, a.value_offsets(), a.value_data())
            }
            DataType::Binary => {
                let a = col.as_binary::<i32>();
                fold_offsets(hash, n, start, how, a.value_offsets(), a.value_data())
            }
            DataType::LargeBinary => {
                let a = col.as_binary::<i64>();
                fold_offsets(hash, n, start, how, a.value_offsets(), a.value_data())
            }
            DataType::Utf8View => {
                let a = col.as_string_view();
                fold_values(hash, n, start, how, |i| hash_bytes(a.value(i).as_bytes()))
            }
            DataType::FixedSizeBinary(_) => {
                let a = col.as_fixed_size_binary();
                fold_values(hash, n, start, how, |i| hash_bytes(a.value(i)))
            }
            DataType::Boolean => {
                let a = col.as_boolean();
                fold_values(hash, n, start, how, |i| scalar(a.value(i) as i64 + 2, how))
            }
            DataType::Int8 => fold_primitive::<Int8Type>(hash, n, start, how, col, |v| v as i64),
            DataType::Int16 => fold_primitive::<Int16Type>(hash, n, start, how, col, |v| v as i64),
            DataType::Int32 => fold_primitive::<Int32Type>(hash, n, start, how, col, |v| v as i64),
            DataType::Int64 => fold_primitive::<Int64Type>(hash, n, start, how, col, |v| v),
            DataType::UInt8 => fold_primitive::<UInt8Type>(hash, n, start, how, col, |v| v as i64),
            DataType::UInt16 => fold_primitive::<UInt16Type>(hash, n, start, how, col, |v| v as i64),
            DataType::UInt32 => fold_primitive::<UInt32Type>(hash, n, start, how, col, |v| v as i64),
            DataType::UInt64 => fold_primitive::<UInt64Type>(hash, n, start, how, col, |v| v as i64),
            DataType::Float32 => fold_primitive::<Float32Type>(hash, n, start, how, col, |v| v.to_bits() as i64),
            DataType::Float64 => fold_primitive::<Float64Type>(hash, n, start, how, col, |v| v.to_bits() as i64),
            DataType::Date32 => fold_primitive::<Date32Type>(hash, n, start, how, col, |v| v as i64),
            DataType::Date64 => fold_primitive::<Date64Type>(hash, n, start, how, col, |v| v),
            DataType::Timestamp(TimeUnit::Second, _) => {
                fold_primitive::<TimestampSecondType>(hash, n, start, how, col, |v| v)
            }
            DataType::Timestamp(TimeUnit::Millisecond, _) => {
                fold_primitive::<TimestampMillisecondType>(hash, n, start, how, col, |v| v)
            }
            DataType::Timestamp(TimeUnit::Microsecond, _) => {
                fold_primitive::<TimestampMicrosecondType>(hash, n, start, how, col, |v| v)
            }
            DataType::Timestamp(TimeUnit::Nanosecond, _) => {
                fold_primitive::<TimestampNanosecondType>(hash, n, start, how, col, |v| v)
            }
            other => unreachable!("type {other} was checked by supported()"),
        }
    }
}

/// The column types `Column::fold` handles.
fn supported(t: &DataType) -> bool {
    use DataType::*;
    matches!(
        t,
        Utf8 | LargeUtf8
            | Utf8View
            | Binary
            | LargeBinary
            | FixedSizeBinary(_)
            | Boolean
            | Int8
            | Int16
            | Int32
            | Int64
            | UInt8
            | UInt16
            | UInt32
            | UInt64
            | Float32
            | Float64
            | Date32
            | Date64
            | Timestamp(_, _)
    )
}

/// The common loop: `value(row)` is the hash input of a non-null row. Written
/// three ways so that the usual cases (no nulls) run without a per-row branch.
#[inline(always)]
fn fold_values(hash: &mut [u64], nulls: Option<&NullBuffer>, start: usize, how: Fold, value: impl Fn(usize) -> u64) {
    match (nulls, how) {
        (None, Fold::Seed) => hash.iter_mut().enumerate().for_each(|(j, h)| *h = value(start + j)),
        (None, Fold::Mix) => hash.iter_mut().enumerate().for_each(|(j, h)| *h = mix(*h, value(start + j))),
        (Some(nulls), _) => {
            for (j, h) in hash.iter_mut().enumerate() {
                let v = if nulls.is_null(start + j) { NULL_MARK } else { value(start + j) };
                *h = if how == Fold::Seed { v } else { mix(*h, v) };
            }
        }
    }
}

/// Strings and binaries: `hash_in` of each value's bytes, read through the offsets.
#[inline(always)]
fn fold_offsets<O: OffsetSizeTrait>(
    hash: &mut [u64],
    nulls: Option<&NullBuffer>,
    start: usize,
    how: Fold,
    offsets: &[O],
    data: &[u8],
) {
    let offsets = &offsets[start..=start + hash.len()];
    // The usual cases (no nulls) walk the offsets pairwise, with no index to check.
    match (nulls, how) {
        (None, Fold::Seed) => {
            for (h, w) in hash.iter_mut().zip(offsets.windows(2)) {
                *h = value_hash(data, w);
            }
        }
        (None, Fold::Mix) => {
            for (h, w) in hash.iter_mut().zip(offsets.windows(2)) {
                *h = mix(*h, value_hash(data, w));
            }
        }
        (Some(_), _) => fold_values(hash, nulls, start, how, |i| value_hash(data, &offsets[i - start..i - start + 2])),
    }
}

/// `hash_in` of the value between a pair of offsets.
#[inline(always)]
fn value_hash<O: OffsetSizeTrait>(data: &[u8], bounds: &[O]) -> u64 {
    hash_in(data, bounds[0].as_usize(), bounds[1].as_usize())
}

/// Fixed-width values, read straight from the values buffer as i64.
#[inline(always)]
fn fold_primitive<T: ArrowPrimitiveType>(
    hash: &mut [u64],
    nulls: Option<&NullBuffer>,
    start: usize,
    how: Fold,
    col: &dyn Array,
    as_i64: impl Fn(T::Native) -> i64,
) {
    let values = &col.as_primitive::<T>().values()[start..start + hash.len()];
    fold_values(hash, nulls, start, how, |i| scalar(as_i64(values[i - start]), how))
}

/// A fixed-width value as a hash input. Used raw when mixed into a row hash; as a
/// key it is hashed so that bucket prefixes are uniform.
#[inline]
fn scalar(v: i64, how: Fold) -> u64 {
    match how {
        Fold::Seed => hash_u64(v as u64),
        Fold::Mix => v as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int64Array, LargeStringArray, StringArray};

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
    fn fused_path_agrees_with_the_general_one() {
        // Keys and node ids of every length from 0 to 70 (short, medium and long
        // strings), in both offset widths: each row's bucket and hash must be the same
        // from the fused loop as from the column-at-a-time one.
        let n = 10_000;
        let keys: Vec<String> = (0..n).map(|i| "k".repeat(i % 71) + &i.to_string()).collect();
        let nodes: Vec<String> = (0..n).map(|i| "node-".repeat(i % 15)).collect();
        let hlc: Vec<i64> = (0..n as i64).map(|i| i.wrapping_mul(0x1e37_79b9_7f4a_7c15)).collect();
        let small = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(StringArray::from_iter_values(&keys)) as ArrayRef),
            ("_hlc", Arc::new(Int64Array::from(hlc.clone())) as ArrayRef),
            ("_node", Arc::new(StringArray::from_iter_values(&nodes)) as ArrayRef),
        ])
        .unwrap();
        let large = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(LargeStringArray::from_iter_values(&keys)) as ArrayRef),
            ("_hlc", Arc::new(Int64Array::from(hlc)) as ArrayRef),
            ("_node", Arc::new(LargeStringArray::from_iter_values(&nodes)) as ArrayRef),
        ])
        .unwrap();
        for (batch, bits) in [(&small, 0), (&small, 10), (&large, 31)] {
            let input = Input::new(batch, "id", 1 << bits, &["_hlc", "_node"]).unwrap();
            let (mut fused, mut general) = (vec![], vec![]);
            assert!(fused::each_row(&input, 7, n - 7, &mut |b, h| fused.push((b, h))));
            input.hash_rows(7, n - 7, |b, h| general.extend(b.iter().copied().zip(h.iter().copied())));
            assert_eq!(fused, general, "{bits} bits");
        }
        // Other shapes take the general path.
        let input = Input::new(&small, "id", 4, &["_node", "_hlc"]).unwrap();
        assert!(!fused::each_row(&input, 0, n, &mut |_, _| {}));
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
