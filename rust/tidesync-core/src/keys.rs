//! Primary-key columns as hashable values, and hash indexes over them.
//!
//! Keys are read once into a vector of a small `Copy` type (`&[u8]`, `i64` or
//! `u128`) so that diff and merge can be written once, generic over the key type,
//! and run without per-row dynamic dispatch.

use std::hash::Hash;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use hashbrown::hash_table::Entry;
use hashbrown::{DefaultHashBuilder, HashTable};
use std::hash::BuildHasher;

use crate::error::{invalid, CoreError, Result};
use crate::uuid_text;

/// The key column of a batch, read into hashable values.
pub(crate) enum KeyValues<'a> {
    Bytes(Vec<&'a [u8]>),
    Int(Vec<i64>),
    Uuid(Vec<u128>),
}

/// Position of a named column, or a clear error naming the columns there are.
pub(crate) fn column_index(batch: &RecordBatch, name: &str, what: &str) -> Result<usize> {
    batch.schema().index_of(name).map_err(|_| {
        let names: Vec<String> = batch.schema().fields().iter().map(|f| f.name().clone()).collect();
        invalid(format!("{what} column {name:?} is not in the batch (columns: {})", names.join(", ")))
    })
}

/// Read the key columns of two batches that are matched against each other. Text
/// keys that are all canonical UUIDs on both sides are read as the UUIDs' 128-bit
/// values, as binary UUID keys are: they then hash cheaply and compare in place,
/// where text keys are compared by reading their bytes, which on large batches is
/// a cache miss per comparison. The rows come out the same either way.
pub(crate) fn read_key_pair<'a>(
    a: (&'a RecordBatch, &str),
    b: (&'a RecordBatch, &str),
    key: &str,
) -> Result<(KeyValues<'a>, KeyValues<'a>)> {
    let (ca, cb) = (a.0.column(column_index(a.0, key, "key")?), b.0.column(column_index(b.0, key, "key")?));
    // Null keys are left to `read_keys`, which says which side has them.
    if ca.null_count() == 0 && cb.null_count() == 0 {
        if let Some(x) = uuid_values(ca) {
            if let Some(y) = uuid_values(cb) {
                return Ok((KeyValues::Uuid(x), KeyValues::Uuid(y)));
            }
        }
    }
    Ok((read_keys(a.0, key, a.1)?, read_keys(b.0, key, b.1)?))
}

/// A text key column without nulls as UUID values, if all its values are UUID texts.
fn uuid_values(col: &ArrayRef) -> Option<Vec<u128>> {
    match col.data_type() {
        DataType::Utf8 => {
            let a = col.as_string::<i32>();
            uuid_text::parse_all(a.value_offsets(), a.value_data())
        }
        DataType::LargeUtf8 => {
            let a = col.as_string::<i64>();
            uuid_text::parse_all(a.value_offsets(), a.value_data())
        }
        _ => None,
    }
}

/// Read the key column of `batch`. Null keys are an error: a row without a key
/// cannot be matched with anything.
pub(crate) fn read_keys<'a>(batch: &'a RecordBatch, key: &str, side: &str) -> Result<KeyValues<'a>> {
    let col = batch.column(column_index(batch, key, "key")?);
    if col.null_count() > 0 {
        return Err(invalid(format!(
            "key column {key:?} of the {side} batch has {} null value(s); every row needs a key",
            col.null_count()
        )));
    }
    Ok(match col.data_type() {
        DataType::Utf8 => KeyValues::Bytes(col.as_string::<i32>().iter().map(|v| v.unwrap_or("").as_bytes()).collect()),
        DataType::LargeUtf8 => {
            KeyValues::Bytes(col.as_string::<i64>().iter().map(|v| v.unwrap_or("").as_bytes()).collect())
        }
        DataType::Utf8View => {
            KeyValues::Bytes(col.as_string_view().iter().map(|v| v.unwrap_or("").as_bytes()).collect())
        }
        DataType::Binary => KeyValues::Bytes(col.as_binary::<i32>().iter().map(|v| v.unwrap_or(&[])).collect()),
        DataType::LargeBinary => KeyValues::Bytes(col.as_binary::<i64>().iter().map(|v| v.unwrap_or(&[])).collect()),
        DataType::FixedSizeBinary(16) => {
            let a = col.as_fixed_size_binary();
            KeyValues::Uuid((0..a.len()).map(|i| u128::from_be_bytes(a.value(i).try_into().unwrap())).collect())
        }
        DataType::FixedSizeBinary(_) => {
            let a = col.as_fixed_size_binary();
            KeyValues::Bytes((0..a.len()).map(|i| a.value(i)).collect())
        }
        DataType::Int32 => KeyValues::Int(col.as_primitive::<Int32Type>().values().iter().map(|v| *v as i64).collect()),
        DataType::Int64 => KeyValues::Int(col.as_primitive::<Int64Type>().values().to_vec()),
        other => {
            return Err(CoreError::UnsupportedType(format!(
                "key column {key:?} has type {other}; keys must be utf8, large_utf8, binary, \
                 fixed_size_binary (uuid), int32 or int64"
            )))
        }
    })
}

/// A hash index from key to row. Entries are 4-byte row numbers that point back
/// into the key vector (a `HashMap<K, u32>` would store the key too): on million-row
/// batches the smaller table means far fewer cache misses.
pub(crate) struct KeyIndex<'a, K> {
    keys: &'a [K],
    table: HashTable<u32>,
    state: DefaultHashBuilder,
}

impl<'a, K: Hash + Eq + Copy> KeyIndex<'a, K> {
    /// Index `keys`, refusing duplicates.
    pub(crate) fn unique(keys: &'a [K], key: &str, side: &str) -> Result<Self> {
        check_len(keys.len())?;
        let state = DefaultHashBuilder::default();
        let mut table = HashTable::with_capacity(keys.len());
        for (row, k) in keys.iter().enumerate() {
            let hash = state.hash_one(k);
            match table.entry(hash, |&i: &u32| keys[i as usize] == *k, |&i: &u32| state.hash_one(keys[i as usize])) {
                Entry::Occupied(e) => return Err(duplicate(key, side, *e.get() as usize, row)),
                Entry::Vacant(e) => {
                    e.insert(row as u32);
                }
            }
        }
        Ok(Self { keys, table, state })
    }

    /// The row holding `k`.
    #[inline]
    pub(crate) fn get(&self, k: &K) -> Option<u32> {
        self.table.find(self.state.hash_one(k), |&i| self.keys[i as usize] == *k).copied()
    }
}

/// A growing set of keys, each mapped to the first row it was seen at.
pub(crate) struct FirstSeen<'a, K> {
    keys: &'a [K],
    table: HashTable<u32>,
    state: DefaultHashBuilder,
}

impl<'a, K: Hash + Eq + Copy> FirstSeen<'a, K> {
    pub(crate) fn new(keys: &'a [K], capacity: usize) -> Self {
        Self { keys, table: HashTable::with_capacity(capacity), state: DefaultHashBuilder::default() }
    }

    /// The first row with the key of `row`, recording `row` if the key is new.
    #[inline]
    pub(crate) fn first_row(&mut self, row: u32) -> u32 {
        let (keys, state) = (self.keys, &self.state);
        let k = &keys[row as usize];
        let entry =
            self.table.entry(state.hash_one(k), |&i| keys[i as usize] == *k, |&i| state.hash_one(keys[i as usize]));
        *entry.or_insert(row).get()
    }
}

pub(crate) fn duplicate(key: &str, side: &str, first: usize, second: usize) -> CoreError {
    CoreError::DuplicateKey(format!(
        "duplicate key in column {key:?} of the {side} batch (rows {first} and {second}); \
         keys must be unique: deduplicate the batch first"
    ))
}

/// Row positions are `u32`: a batch larger than that must be split into pages.
pub(crate) fn check_len(len: usize) -> Result<()> {
    if len > u32::MAX as usize {
        return Err(invalid(format!("batch of {len} rows is too large; split it into batches below 2^32 rows")));
    }
    Ok(())
}

/// A key's 64-bit hash, computed once per row and then shared by every table
/// lookup of that row (merge hashes each key once instead of once per table).
pub(crate) trait KeyHash: Copy + Eq {
    fn key_hash(&self) -> u64;

    /// Read what comparing this key reads first (bytes stored out of line), so
    /// that the read can be issued early, together with those of other keys.
    fn warm(&self) -> u64 {
        0
    }
}

impl KeyHash for &[u8] {
    #[inline]
    fn key_hash(&self) -> u64 {
        crate::hash::hash_bytes(self)
    }

    #[inline]
    fn warm(&self) -> u64 {
        self.first().copied().unwrap_or(0) as u64
    }
}

impl KeyHash for i64 {
    #[inline]
    fn key_hash(&self) -> u64 {
        fmix64(*self as u64)
    }
}

impl KeyHash for u128 {
    #[inline]
    fn key_hash(&self) -> u64 {
        // One 128-bit product of the two halves (wyhash's fold): every input bit
        // reaches the top bits (partitions) and the low bits (table slots).
        let p = (*self as u64 ^ 0x2d35_8dcc_aa6c_78a5) as u128 * ((*self >> 64) as u64 ^ 0x8bb8_4b93_962e_acc9) as u128;
        p as u64 ^ (p >> 64) as u64
    }
}

/// murmur3's 64-bit finalizer: a bijection that spreads every input bit over the output.
#[inline]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}
