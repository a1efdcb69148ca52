//! Primary-key columns as hashable values, and hash indexes over them.
//!
//! Keys are read once into a vector of a small `Copy` type (`&[u8]`, `i64` or
//! `u128`) so that diff and merge can be written once, generic over the key type,
//! and run without per-row dynamic dispatch.

use std::hash::Hash;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use hashbrown::hash_table::Entry;
use hashbrown::{DefaultHashBuilder, HashTable};
use std::hash::BuildHasher;

use crate::error::{invalid, CoreError, Result};

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
        xxhash_rust::xxh3::xxh3_64(self)
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
        fmix64(*self as u64 ^ fmix64((*self >> 64) as u64).rotate_left(32))
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

/// An open-addressing (linear probing) hash table of row numbers for keys whose
/// hashes were computed up front. A slot packs the hash's high 32 bits with the
/// row, so a probe reads one 8-byte slot and looks at a key only when those bits
/// match; at most half full, so probe sequences stay short. Rows must be below
/// `u32::MAX` (merge allows 2^31).
pub(crate) struct RowTable {
    slots: Vec<u64>,
    mask: usize,
}

impl RowTable {
    const EMPTY: u64 = u64::MAX;

    pub(crate) fn with_capacity(rows: usize) -> Self {
        let len = (rows * 2).next_power_of_two().max(16);
        Self { slots: vec![Self::EMPTY; len], mask: len - 1 }
    }

    /// The row whose key `is_key` accepts, or else the free slot where it belongs.
    #[inline]
    pub(crate) fn find(&self, hash: u64, mut is_key: impl FnMut(u32) -> bool) -> Result<u32, usize> {
        let tag = hash >> 32;
        let mut pos = hash as usize & self.mask;
        loop {
            let slot = self.slots[pos];
            if slot == Self::EMPTY {
                return Err(pos);
            }
            if slot >> 32 == tag && is_key(slot as u32) {
                return Ok(slot as u32);
            }
            pos = (pos + 1) & self.mask;
        }
    }

    /// For each of `keys` (with their `hashes`), the row of `table_keys` holding it.
    /// Works through a batch of keys at a time: first the home slot of every key
    /// of the batch, then every candidate key, so that the cache misses of a batch
    /// overlap instead of queueing one after another (`black_box` keeps the early
    /// reads of candidate keys, a software prefetch in safe code); anything unusual
    /// (a taken home slot holding another key) falls back to `find`.
    pub(crate) fn find_rows<K: KeyHash>(&self, hashes: &[u64], keys: &[K], table_keys: &[K]) -> Vec<Option<u32>> {
        const BATCH: usize = 16;
        let mut out = Vec::with_capacity(keys.len());
        for (hashes, keys) in hashes.chunks(BATCH).zip(keys.chunks(BATCH)) {
            let mut home = [Self::EMPTY; BATCH];
            for (slot, &h) in home.iter_mut().zip(hashes) {
                *slot = self.slots[h as usize & self.mask];
            }
            let mut candidate: [Option<K>; BATCH] = [None; BATCH];
            for ((c, &slot), &h) in candidate.iter_mut().zip(&home).zip(hashes) {
                if slot != Self::EMPTY && slot >> 32 == h >> 32 {
                    *c = Some(table_keys[slot as u32 as usize]);
                }
            }
            std::hint::black_box(candidate.iter().flatten().fold(0, |acc, c| acc ^ c.warm()));
            for (j, (k, &h)) in keys.iter().zip(hashes).enumerate() {
                out.push(match (home[j], candidate[j]) {
                    (Self::EMPTY, _) => None,
                    (slot, Some(c)) if c == *k => Some(slot as u32),
                    _ => self.find(h, |r| table_keys[r as usize] == *k).ok(),
                });
            }
        }
        out
    }

    /// The slot a key with this hash is looked for first (read to warm the cache).
    #[inline]
    pub(crate) fn home_slot(&self, hash: u64) -> u64 {
        self.slots[hash as usize & self.mask]
    }

    /// Store `row` in the free slot `pos` returned by `find` for this hash.
    #[inline]
    pub(crate) fn put(&mut self, pos: usize, hash: u64, row: u32) {
        debug_assert!(self.slots[pos] == Self::EMPTY && row != u32::MAX);
        self.slots[pos] = (hash >> 32) << 32 | row as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_table_finds_every_key_and_only_those() {
        let keys: Vec<&[u8]> = ["a", "b", "c", "dd", ""].iter().map(|s| s.as_bytes()).collect();
        let hashes: Vec<u64> = keys.iter().map(|k| k.key_hash()).collect();
        let mut table = RowTable::with_capacity(keys.len());
        for (row, (k, &h)) in keys.iter().zip(&hashes).enumerate() {
            let free = table.find(h, |r| keys[r as usize] == *k).expect_err("keys are unique");
            table.put(free, h, row as u32);
        }
        let probes: Vec<&[u8]> = ["dd", "x", "a", "", "c", "b", "ddd"].iter().map(|s| s.as_bytes()).collect();
        let probe_hashes: Vec<u64> = probes.iter().map(|k| k.key_hash()).collect();
        let found = table.find_rows(&probe_hashes, &probes, &keys);
        assert_eq!(found, vec![Some(3), None, Some(0), Some(4), Some(2), Some(1), None]);
    }

    #[test]
    fn row_table_falls_back_when_high_bits_collide() {
        // Same hash for every key: every probe but the first walks the sequence.
        let keys: Vec<i64> = (0..40).collect();
        let mut table = RowTable::with_capacity(keys.len());
        for (row, k) in keys.iter().enumerate() {
            let free = table.find(7, |r| keys[r as usize] == *k).expect_err("keys are unique");
            table.put(free, 7, row as u32);
        }
        let probes: Vec<i64> = vec![39, 0, 41, 17];
        let found = table.find_rows(&[7; 4], &probes, &keys);
        assert_eq!(found, vec![Some(39), Some(0), None, Some(17)]);
    }
}
