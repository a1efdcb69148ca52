//! The `_node` columns of a merge as small integers ordered as the strings are.
//!
//! Why: merge orders versions by `(_hlc, _node)` and asks whether two versions come
//! from the same node. Comparing the strings reads bytes stored out of line, and for
//! a key's local row that is a random read of the local batch. A network has few
//! nodes, so each row's node id is read once, in row order, and replaced by its rank
//! among the distinct ids of both batches: ranks compare as the strings do.

use std::collections::HashMap;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, OffsetSizeTrait, StringArray};
use arrow_schema::DataType;

use crate::error::{CoreError, Result};
use crate::hash::{short, MASK_HIGH, MASK_LOW};

/// For each of `columns` (string columns without nulls), every row's rank among
/// the distinct values of all of them, in byte order; and those values, in that
/// order (`names[rank]`).
pub(crate) fn node_ranks<const N: usize>(columns: [&ArrayRef; N]) -> Result<([Vec<u32>; N], StringArray)> {
    let mut dict = Dict::default();
    let mut ids = Vec::with_capacity(N);
    for col in columns {
        ids.push(match col.data_type() {
            DataType::Utf8 => {
                let a = col.as_string::<i32>();
                dict.ids_of(a.value_offsets(), a.value_data())
            }
            DataType::LargeUtf8 => {
                let a = col.as_string::<i64>();
                dict.ids_of(a.value_offsets(), a.value_data())
            }
            DataType::Utf8View => {
                let a = col.as_string_view();
                (0..a.len()).map(|i| dict.id(a.value(i).as_bytes())).collect()
            }
            other => return Err(CoreError::UnsupportedType(format!("node ids must be strings, got {other}"))),
        });
    }
    let (rank, order) = dict.ranks();
    let mut out = ids.into_iter().map(|mut v| {
        v.iter_mut().for_each(|id| *id = rank[*id as usize]);
        v
    });
    let ranks = std::array::from_fn(|_| out.next().expect("one per column"));
    // The values came from string arrays, so they are UTF-8.
    let text = |id: &u32| std::str::from_utf8(dict.strings[*id as usize]).expect("read from a string array");
    Ok((ranks, StringArray::from_iter_values(order.iter().map(text))))
}

/// Distinct strings with ids in order of first appearance. Strings of up to 16 bytes
/// (node ids usually are) are looked up by their bytes as two words in a small
/// open-addressing table, with no per-row branch on their length; longer ones in a
/// `HashMap`.
#[derive(Default)]
struct Dict<'a> {
    strings: Vec<&'a [u8]>,
    /// `(low word, high word, length, id)`; `id == u32::MAX` is a free slot.
    short: Vec<(u64, u64, u32, u32)>,
    short_len: usize,
    long: HashMap<&'a [u8], u32>,
}

impl<'a> Dict<'a> {
    fn ids_of<O: OffsetSizeTrait>(&mut self, offsets: &[O], data: &'a [u8]) -> Vec<u32> {
        let rd = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
        offsets
            .windows(2)
            .map(|w| {
                let (from, to) = (w[0].as_usize(), w[1].as_usize());
                let len = to - from;
                if len <= 16 && from + 16 <= data.len() {
                    // Reads past the string stay in the buffer; the masks drop those bytes.
                    let (low, high) = (rd(from) & MASK_LOW[len], rd(from + 8) & MASK_HIGH[len]);
                    self.short_id(low, high, len as u32, &data[from..to])
                } else {
                    self.id(&data[from..to])
                }
            })
            .collect()
    }

    fn id(&mut self, s: &'a [u8]) -> u32 {
        if s.len() <= 16 {
            let mut bytes = [0u8; 16];
            bytes[..s.len()].copy_from_slice(s);
            let low = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
            let high = u64::from_le_bytes(bytes[8..].try_into().expect("8 bytes"));
            return self.short_id(low, high, s.len() as u32, s);
        }
        let next = self.strings.len() as u32;
        *self.long.entry(s).or_insert_with(|| {
            self.strings.push(s);
            next
        })
    }

    #[inline]
    fn short_id(&mut self, low: u64, high: u64, len: u32, s: &'a [u8]) -> u32 {
        if self.short_len * 2 >= self.short.len() {
            self.grow();
        }
        let mask = self.short.len() - 1;
        let mut pos = short(low, high, len as usize) as usize & mask;
        loop {
            let (l, h, n, id) = self.short[pos];
            if id == u32::MAX {
                let id = self.strings.len() as u32;
                self.strings.push(s);
                self.short[pos] = (low, high, len, id);
                self.short_len += 1;
                return id;
            }
            if (l, h, n) == (low, high, len) {
                return id;
            }
            pos = (pos + 1) & mask;
        }
    }

    fn grow(&mut self) {
        let len = (self.short.len() * 2).max(64);
        let old = std::mem::replace(&mut self.short, vec![(0, 0, 0, u32::MAX); len]);
        let mask = self.short.len() - 1;
        for e in old.into_iter().filter(|e| e.3 != u32::MAX) {
            let mut pos = short(e.0, e.1, e.2 as usize) as usize & mask;
            while self.short[pos].3 != u32::MAX {
                pos = (pos + 1) & mask;
            }
            self.short[pos] = e;
        }
    }

    /// `rank[id]`: the position of string `id` in byte order; and the ids in that order.
    fn ranks(&self) -> (Vec<u32>, Vec<u32>) {
        let mut order: Vec<u32> = (0..self.strings.len() as u32).collect();
        order.sort_unstable_by_key(|&id| self.strings[id as usize]);
        let mut rank = vec![0; order.len()];
        for (r, &id) in order.iter().enumerate() {
            rank[id as usize] = r as u32;
        }
        (rank, order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{LargeStringArray, StringArray, StringViewArray};
    use std::sync::Arc;

    #[test]
    fn ranks_compare_as_the_strings_do_across_columns_and_types() {
        let long = "a-node-id-longer-than-sixteen-bytes";
        let values = ["clinic-b", "", "hub", long, "clinic-a", "hub", "clinic-a\0", "exactly-16-bytes", "zz"];
        let a: ArrayRef = Arc::new(StringArray::from(values.to_vec()));
        let b: ArrayRef = Arc::new(LargeStringArray::from(vec!["zz", long, "clinic-b", "clinic"]));
        let c: ArrayRef = Arc::new(StringViewArray::from(vec!["hub", "exactly-16-bytes", "aaa"]));
        let ([ra, rb, rc], names) = node_ranks([&a, &b, &c]).unwrap();
        let all: Vec<(&str, u32)> = values
            .iter()
            .copied()
            .zip(ra)
            .chain(["zz", long, "clinic-b", "clinic"].into_iter().zip(rb))
            .chain(["hub", "exactly-16-bytes", "aaa"].into_iter().zip(rc))
            .collect();
        for (x, rx) in &all {
            assert_eq!(names.value(*rx as usize), *x);
            for (y, ry) in &all {
                assert_eq!(x.cmp(y), rx.cmp(ry), "{x:?} vs {y:?}");
            }
        }
        assert_eq!(names.len(), 10);
    }

    #[test]
    fn many_distinct_ids_and_strings_at_the_end_of_the_buffer() {
        // Every string is short and the last ones sit at the end of the value buffer,
        // where the two-word read would run past it.
        let values: Vec<String> = (0..5000).map(|i| format!("n{}", i % 1700)).collect();
        let a: ArrayRef = Arc::new(StringArray::from(values.clone()));
        let ([r], names) = node_ranks([&a]).unwrap();
        assert_eq!(names.len(), 1700);
        for i in 0..values.len() {
            for j in [0, 1, 17, 1699, 4999] {
                assert_eq!(values[i].cmp(&values[j]), r[i].cmp(&r[j]));
            }
        }
    }
}
