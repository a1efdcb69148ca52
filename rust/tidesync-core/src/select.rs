//! Copying an increasing subset of rows out of Arrow arrays.
//!
//! A record-mode merge writes most incoming rows and drops a few here and there (the
//! versions that lose or change nothing), so its output is the incoming columns
//! minus short gaps. Arrow's `filter` copies such a selection run by run (slow when
//! runs are ~10 rows) and its `take` copies validity bits one at a time. Here the
//! selection is prepared once for every column: values are gathered by row, byte
//! strings copied run by run with their offsets rebuilt in one pass, and validity
//! bits compacted 64 at a time.
//!
//! `interleave` gathers rows from two arrays (a merge's local and incoming columns)
//! in one pass per column, where arrow's `interleave` reads each string's offsets
//! twice (once to size the output) and appends validity bits one builder call at a
//! time: on the conflict rows of a merge, random rows of both sides, it took 40 ns a
//! string.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{BinaryType, ByteArrayType, LargeBinaryType, LargeUtf8Type, Utf8Type};
use arrow_array::OffsetSizeTrait;
use arrow_array::{
    downcast_primitive_array, Array, ArrayRef, ArrowPrimitiveType, BooleanArray, GenericByteArray, PrimitiveArray,
    UInt32Array,
};
use arrow_buffer::{ArrowNativeType, BooleanBuffer, Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::DataType;
use arrow_select::take::take;

use crate::error::{invalid, Result};

/// Rows to keep, in increasing order, in the three forms the copies use.
pub(crate) struct Selection {
    /// The kept rows.
    rows: Vec<u32>,
    /// Bit `r % 64` of word `r / 64` is set when row `r` is kept; only for dense
    /// selections (empty otherwise: bits are then read a row at a time).
    mask: Vec<u64>,
    /// Maximal runs `start..end` of kept rows.
    runs: Vec<(usize, usize)>,
}

impl Selection {
    /// `rows` must be strictly increasing and below `n`, the length of the arrays.
    pub(crate) fn new(n: usize, rows: Vec<u32>) -> Self {
        debug_assert!(rows.windows(2).all(|w| w[0] < w[1]) && rows.last().is_none_or(|&r| (r as usize) < n));
        // A word at a time pays when at least one row in 8 is kept.
        let dense = rows.len() >= n / 8;
        let mut mask = vec![0u64; if dense { n.div_ceil(64) } else { 0 }];
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for &r in &rows {
            let r = r as usize;
            if dense {
                mask[r / 64] |= 1 << (r % 64);
            }
            match runs.last_mut() {
                Some(run) if run.1 == r => run.1 = r + 1,
                _ => runs.push((r, r + 1)),
            }
        }
        Self { rows, mask, runs }
    }

    /// The kept rows of `array`.
    pub(crate) fn apply(&self, array: &ArrayRef) -> Result<ArrayRef> {
        let nulls = array.logical_nulls().filter(|n| n.null_count() > 0).map(|n| NullBuffer::new(self.bits(n.inner())));
        let a: &dyn Array = array.as_ref();
        Ok(downcast_primitive_array!(
            a => { Arc::new(self.primitive(a, nulls)) }
            DataType::Boolean => { Arc::new(BooleanArray::new(self.bits(a.as_boolean().values()), nulls)) }
            DataType::Utf8 => { Arc::new(self.bytes::<Utf8Type>(a.as_string::<i32>(), nulls)) }
            DataType::LargeUtf8 => { Arc::new(self.bytes::<LargeUtf8Type>(a.as_string::<i64>(), nulls)) }
            DataType::Binary => { Arc::new(self.bytes::<BinaryType>(a.as_binary::<i32>(), nulls)) }
            DataType::LargeBinary => { Arc::new(self.bytes::<LargeBinaryType>(a.as_binary::<i64>(), nulls)) }
            _ => { take(a, &UInt32Array::from(self.rows.clone()), None)? }
        ))
    }

    fn primitive<T: ArrowPrimitiveType>(
        &self,
        array: &PrimitiveArray<T>,
        nulls: Option<NullBuffer>,
    ) -> PrimitiveArray<T> {
        let values = array.values();
        let kept: ScalarBuffer<T::Native> = self.rows.iter().map(|&r| values[r as usize]).collect();
        // The input's type, not T's default: a timestamp keeps its zone.
        PrimitiveArray::new(kept, nulls).with_data_type(array.data_type().clone())
    }

    /// Byte strings: the offsets rebuilt from the kept values' lengths, the bytes
    /// copied a run of rows at a time.
    fn bytes<T: ByteArrayType>(&self, array: &GenericByteArray<T>, nulls: Option<NullBuffer>) -> GenericByteArray<T> {
        let offsets = array.value_offsets();
        let data = array.value_data();
        let mut out = Vec::with_capacity(self.rows.len() + 1);
        let mut end = T::Offset::usize_as(0);
        out.push(end);
        for &r in &self.rows {
            end += offsets[r as usize + 1] - offsets[r as usize];
            out.push(end);
        }
        let mut bytes = Vec::with_capacity(end.as_usize());
        for &(s, e) in &self.runs {
            bytes.extend_from_slice(&data[offsets[s].as_usize()..offsets[e].as_usize()]);
        }
        // SAFETY: each kept value's bytes are copied whole and in order from a valid
        // array of the same type (so they are valid UTF-8 for text), and the offsets
        // are the running sums of those values' lengths, which the input's offsets
        // bound, so they are increasing and end at `bytes.len()`.
        unsafe {
            GenericByteArray::new_unchecked(
                OffsetBuffer::new_unchecked(ScalarBuffer::from(out)),
                Buffer::from_vec(bytes),
                nulls,
            )
        }
    }

    /// The kept bits of `bits`: for a dense selection, each 64-row word's kept bits
    /// packed at the bottom and appended to the output words; for a sparse one, a
    /// kept row at a time.
    fn bits(&self, bits: &BooleanBuffer) -> BooleanBuffer {
        if self.mask.is_empty() {
            return BooleanBuffer::collect_bool(self.rows.len(), |i| bits.value(self.rows[i] as usize));
        }
        let mut out = Vec::with_capacity(self.rows.len().div_ceil(64));
        let (mut acc, mut filled) = (0u64, 0u32);
        for (word, &m) in bits.bit_chunks().iter_padded().zip(&self.mask) {
            let (v, k) = (extract(word, m), m.count_ones());
            acc |= v << filled;
            if filled + k >= 64 {
                out.push(acc);
                // The bits of `v` that did not fit (none when `filled` was 0).
                acc = if filled == 0 { 0 } else { v >> (64 - filled) };
                filled = filled + k - 64;
            } else {
                filled += k;
            }
        }
        if filled > 0 {
            out.push(acc);
        }
        BooleanBuffer::new(Buffer::from_vec(out), 0, self.rows.len())
    }
}

/// Rows picked at random from two arrays (the two sides of a merge's conflict
/// pairs), read a side at a time in increasing row order, so that the reads run
/// forward through memory and the hardware prefetches them, then put in pick order
/// from the small gathered arrays. Gathering each pick straight from the big arrays
/// waited on a cache miss per value (~45 ns a string).
pub(crate) struct Picks {
    sides: [Selection; 2],
    /// Each pick's side and place among that side's gathered rows.
    places: Vec<(usize, usize)>,
}

impl Picks {
    /// `picks` are `(side, row)` with `row < lens[side]`; repeats are read once.
    pub(crate) fn new(lens: [usize; 2], picks: &[(usize, usize)]) -> Self {
        let mut places = vec![(0, 0); picks.len()];
        let sides = [0, 1].map(|side| {
            // (row, pick) pairs of this side, by row (usually already in order for the
            // incoming side, whose rows the decisions visit in order).
            let mut refs: Vec<u64> = (0..picks.len())
                .filter(|&i| picks[i].0 == side)
                .map(|i| (picks[i].1 as u64) << 32 | i as u64)
                .collect();
            if !refs.is_sorted() {
                refs.sort_unstable();
            }
            let mut rows: Vec<u32> = Vec::with_capacity(refs.len());
            for r in refs {
                let row = (r >> 32) as u32;
                if rows.last() != Some(&row) {
                    rows.push(row);
                }
                places[r as u32 as usize] = (side, rows.len() - 1);
            }
            Selection::new(lens[side], rows)
        });
        Self { sides, places }
    }

    /// The picked rows of both sides of a column, each side's in row order.
    pub(crate) fn read(&self, arrays: [&ArrayRef; 2]) -> Result<[ArrayRef; 2]> {
        Ok([self.sides[0].apply(arrays[0])?, self.sides[1].apply(arrays[1])?])
    }

    /// Where picks `which` are in what `read` returns: the indices for `interleave`.
    pub(crate) fn places(&self, which: impl IntoIterator<Item = usize>) -> Vec<(usize, usize)> {
        which.into_iter().map(|i| self.places[i]).collect()
    }
}

/// Rows `(side, row)` of `arrays[side]`, in order (the arrays have one data type).
pub(crate) fn interleave(arrays: [&dyn Array; 2], indices: &[(usize, usize)]) -> Result<ArrayRef> {
    let nulls = if arrays.iter().any(|a| a.null_count() > 0) {
        let sides = arrays.map(|a| a.logical_nulls());
        let valid = BooleanBuffer::collect_bool(indices.len(), |i| {
            let (side, row) = indices[i];
            sides[side].as_ref().is_none_or(|n| n.is_valid(row))
        });
        Some(NullBuffer::new(valid)).filter(|n| n.null_count() > 0)
    } else {
        None
    };
    let [a, b] = arrays;
    Ok(downcast_primitive_array!(
        a => { Arc::new(interleave_primitive([a, b.as_primitive()], indices, nulls)) }
        DataType::Boolean => {
            let sides = [a.as_boolean(), b.as_boolean()];
            let values = BooleanBuffer::collect_bool(indices.len(), |i| sides[indices[i].0].value(indices[i].1));
            Arc::new(BooleanArray::new(values, nulls))
        }
        DataType::Utf8 => { Arc::new(interleave_bytes::<Utf8Type>([a.as_string(), b.as_string()], indices, nulls)?) }
        DataType::LargeUtf8 => { Arc::new(interleave_bytes::<LargeUtf8Type>([a.as_string(), b.as_string()], indices, nulls)?) }
        DataType::Binary => { Arc::new(interleave_bytes::<BinaryType>([a.as_binary(), b.as_binary()], indices, nulls)?) }
        DataType::LargeBinary => {
            Arc::new(interleave_bytes::<LargeBinaryType>([a.as_binary(), b.as_binary()], indices, nulls)?)
        }
        _ => { arrow_select::interleave::interleave(&arrays, indices)? }
    ))
}

fn interleave_primitive<T: ArrowPrimitiveType>(
    arrays: [&PrimitiveArray<T>; 2],
    indices: &[(usize, usize)],
    nulls: Option<NullBuffer>,
) -> PrimitiveArray<T> {
    let values = arrays.map(|a| a.values());
    let out: ScalarBuffer<T::Native> = indices.iter().map(|&(side, row)| values[side][row]).collect();
    PrimitiveArray::new(out, nulls).with_data_type(arrays[0].data_type().clone())
}

fn interleave_bytes<T: ByteArrayType>(
    arrays: [&GenericByteArray<T>; 2],
    indices: &[(usize, usize)],
    nulls: Option<NullBuffer>,
) -> Result<GenericByteArray<T>> {
    let sides = arrays.map(|a| (a.value_offsets(), a.value_data()));
    // Sized for values of the arrays' average length, so it rarely grows.
    let average = sides.iter().map(|(o, d)| d.len() / o.len().max(1)).max().unwrap_or(0);
    let mut bytes = Vec::with_capacity(indices.len() * (average + 1));
    let mut offsets = Vec::with_capacity(indices.len() + 1);
    offsets.push(T::Offset::usize_as(0));
    for &(side, row) in indices {
        let (o, d) = sides[side];
        bytes.extend_from_slice(&d[o[row].as_usize()..o[row + 1].as_usize()]);
        offsets.push(T::Offset::from_usize(bytes.len()).ok_or_else(|| {
            invalid(format!(
                "more than {} bytes of {} values in one column; split the batch",
                T::Offset::MAX_OFFSET,
                T::DATA_TYPE
            ))
        })?);
    }
    // SAFETY: whole values of valid arrays of this type, copied in order (valid UTF-8
    // for text); the offsets are the running lengths, checked to fit above.
    Ok(unsafe {
        GenericByteArray::new_unchecked(
            OffsetBuffer::new_unchecked(ScalarBuffer::from(offsets)),
            Buffer::from_vec(bytes),
            nulls,
        )
    })
}

/// The bits of `word` where `mask` is set, packed at the bottom (what BMI2's `pext`
/// does), a run of set mask bits at a time: a selection that drops a few rows has a
/// few long runs per word. (`pext` itself saved ~0.3 ms a column here, but is
/// microcoded and far slower on AMD CPUs before Zen 3.)
#[inline(always)]
fn extract(word: u64, mut mask: u64) -> u64 {
    let (mut out, mut at) = (0u64, 0u32);
    while mask != 0 {
        let start = mask.trailing_zeros();
        let len = (!(mask >> start)).trailing_zeros();
        let run = if len == 64 { u64::MAX } else { (1u64 << len) - 1 };
        out |= ((word >> start) & run) << at;
        at += len;
        mask &= !(run << start);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int32Array, StringArray, TimestampMicrosecondArray};
    use arrow_select::filter::filter;

    fn check(sel: &Selection, keep: &[bool], array: ArrayRef) {
        let want = filter(array.as_ref(), &BooleanArray::from(keep.to_vec())).unwrap();
        let got = sel.apply(&array).unwrap();
        assert_eq!(got.to_data(), want.to_data(), "{}", array.data_type());
    }

    #[test]
    fn same_as_filter_for_every_layout() {
        // Selections with long and short runs and gaps, over lengths that do and do
        // not end on a word boundary, of sliced arrays (validity bits at an offset).
        for n in [0usize, 1, 63, 64, 65, 200, 1000] {
            for pattern in 0..7u64 {
                let keep: Vec<bool> = (0..n as u64)
                    .map(|i| match pattern {
                        0 => true,
                        1 => false,
                        2 => i % 7 != 3,
                        3 => (i * 0x9e37_79b9) >> 7 & 1 == 1,
                        4 => i % 97 < 60,
                        5 => i % 50 == 7,
                        _ => i % 2 == 0,
                    })
                    .collect();
                let rows: Vec<u32> = (0..n as u32).filter(|&r| keep[r as usize]).collect();
                let sel = Selection::new(n, rows);
                let ints: Int32Array = (0..n as i32 + 3).map(|i| (i % 5 != 0).then_some(i)).collect();
                let texts: StringArray =
                    (0..n + 3).map(|i| (i % 3 != 0).then(|| "é".repeat(i % 4) + &i.to_string())).collect();
                let flags: BooleanArray = (0..n + 3).map(|i| (i % 4 != 1).then_some(i % 3 == 0)).collect();
                let stamps = TimestampMicrosecondArray::from_iter_values(0..n as i64 + 3).with_timezone("UTC");
                check(&sel, &keep, Arc::new(ints.slice(3, n)));
                check(&sel, &keep, Arc::new(texts.slice(3, n)));
                check(&sel, &keep, Arc::new(flags.slice(3, n)));
                check(&sel, &keep, Arc::new(stamps.slice(3, n)));
                check(&sel, &keep, arrow_array::new_null_array(&DataType::Float64, n));
            }
        }
    }

    #[test]
    fn interleave_is_arrows() {
        // Two sides with and without nulls, sliced, in every supported layout and one
        // that falls back (fixed-size binary); random (side, row) picks.
        let n = 300usize;
        let picks: Vec<(usize, usize)> = (0..2000u64)
            .map(|i| (((i * 0x9e37_79b9) >> 11) as usize % 2, ((i * 0x2545_f491) >> 9) as usize % n))
            .collect();
        let sides = |f: &dyn Fn(usize, usize) -> ArrayRef| [f(0, 5), f(1, 0)];
        let cases: Vec<[ArrayRef; 2]> = vec![
            sides(&|s, k| {
                Arc::new(
                    Int32Array::from_iter((0..n + k).map(|i| (s == 0 || i % 4 != 0).then_some(i as i32))).slice(k, n),
                )
            }),
            sides(&|s, k| {
                Arc::new(
                    StringArray::from_iter(
                        (0..n + k).map(|i| (s == 1 || i % 3 != 0).then(|| "ü".repeat(i % 5) + &i.to_string())),
                    )
                    .slice(k, n),
                )
            }),
            sides(&|s, k| {
                Arc::new(
                    arrow_array::LargeBinaryArray::from_iter(
                        (0..n + k).map(|i| (i % (s + 2) != 0).then(|| vec![i as u8; i % 7])),
                    )
                    .slice(k, n),
                )
            }),
            sides(&|s, k| {
                Arc::new(BooleanArray::from_iter((0..n + k).map(|i| (i % 5 != s).then_some(i % 3 == 0))).slice(k, n))
            }),
            sides(&|_, k| {
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(0..(n + k) as i64).with_timezone("UTC").slice(k, n),
                )
            }),
            sides(&|s, k| {
                Arc::new(
                    arrow_array::FixedSizeBinaryArray::try_from_sparse_iter_with_size(
                        (0..n + k).map(|i| (i % 3 != s).then_some([i as u8; 4])),
                        4,
                    )
                    .unwrap()
                    .slice(k, n),
                )
            }),
        ];
        for [a, b] in &cases {
            let arrays = [a.as_ref(), b.as_ref()];
            let want = arrow_select::interleave::interleave(&arrays, &picks).unwrap();
            assert_eq!(interleave(arrays, &picks).unwrap().to_data(), want.to_data(), "{}", a.data_type());
            assert_eq!(interleave(arrays, &[]).unwrap().len(), 0);
        }
    }

    #[test]
    fn extract_is_pext() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (word, mask) = (x, x.rotate_left(29) | x.rotate_left(3));
            let want = (0..64)
                .filter(|&b| mask >> b & 1 == 1)
                .enumerate()
                .fold(0u64, |acc, (k, b)| acc | (word >> b & 1) << k);
            assert_eq!(extract(word, mask), want);
        }
        assert_eq!(extract(u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(extract(0x8000_0000_0000_0001, 0x8000_0000_0000_0001), 0b11);
    }
}
