//! The digest's fast path for the shape the sync protocol hashes: a text or binary
//! key, then an integer column and a text column (`_hlc`, `_node`), none with nulls.
//!
//! The general path folds one column at a time over a chunk of row hashes, which
//! works for any list of columns but stores and reloads every row hash once per
//! column and once more to sum it into its bucket. Here each row's hash is computed
//! in registers from its three values and added to its bucket in the same loop:
//! about 40 % fewer instructions per row. The result is the same by construction
//! (the same `value_hash`, `mix` and `avalanche`), and a test holds the two paths to it.

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, OffsetSizeTrait};
use arrow_schema::{DataType, TimeUnit};

use super::{avalanche, mix, value_hash, Column, Input};

/// Text or binary values, read through their offsets.
enum Strings<'a> {
    Small(&'a [i32], &'a [u8]),
    Large(&'a [i64], &'a [u8]),
}

impl<'a> Strings<'a> {
    /// The column's offsets and bytes, if it is text or binary without nulls.
    fn of(col: &Column<'a>) -> Option<Self> {
        if col.nulls.is_some() {
            return None;
        }
        let a = col.array.as_ref();
        Some(match a.data_type() {
            DataType::Utf8 => Self::Small(a.as_string::<i32>().value_offsets(), a.as_string::<i32>().value_data()),
            DataType::Binary => Self::Small(a.as_binary::<i32>().value_offsets(), a.as_binary::<i32>().value_data()),
            DataType::LargeUtf8 => Self::Large(a.as_string::<i64>().value_offsets(), a.as_string::<i64>().value_data()),
            DataType::LargeBinary => {
                Self::Large(a.as_binary::<i64>().value_offsets(), a.as_binary::<i64>().value_data())
            }
            _ => return None,
        })
    }
}

/// The values of a column of 64-bit integers (or timestamps) without nulls.
fn ints<'a>(col: &Column<'a>) -> Option<&'a [i64]> {
    if col.nulls.is_some() {
        return None;
    }
    let a: &'a dyn Array = col.array.as_ref();
    Some(match a.data_type() {
        DataType::Int64 => a.as_primitive::<Int64Type>().values(),
        DataType::Date64 => a.as_primitive::<Date64Type>().values(),
        DataType::Timestamp(TimeUnit::Second, _) => a.as_primitive::<TimestampSecondType>().values(),
        DataType::Timestamp(TimeUnit::Millisecond, _) => a.as_primitive::<TimestampMillisecondType>().values(),
        DataType::Timestamp(TimeUnit::Microsecond, _) => a.as_primitive::<TimestampMicrosecondType>().values(),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => a.as_primitive::<TimestampNanosecondType>().values(),
        _ => return None,
    })
}

/// Hand `each` the bucket and hash of rows `start..start + len` if the input has
/// this path's shape; false (and nothing done) if not.
pub(super) fn each_row(input: &Input, start: usize, len: usize, each: &mut impl FnMut(u32, u64)) -> bool {
    let [a, b] = input.columns.as_slice() else { return false };
    let (Some(key), Some(ints), Some(b)) = (Strings::of(&input.key), ints(a), Strings::of(b)) else {
        return false;
    };
    match (key, b) {
        (Strings::Small(ko, kd), Strings::Small(bo, bd)) => rows(ko, kd, ints, bo, bd, start, len, input.bits, each),
        (Strings::Small(ko, kd), Strings::Large(bo, bd)) => rows(ko, kd, ints, bo, bd, start, len, input.bits, each),
        (Strings::Large(ko, kd), Strings::Small(bo, bd)) => rows(ko, kd, ints, bo, bd, start, len, input.bits, each),
        (Strings::Large(ko, kd), Strings::Large(bo, bd)) => rows(ko, kd, ints, bo, bd, start, len, input.bits, each),
    }
    true
}

/// The loop itself: a row's bucket is the top `bits` of its key hash, its hash the
/// key hash with the integer and then the text value mixed in.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rows<K: OffsetSizeTrait, T: OffsetSizeTrait>(
    key_offsets: &[K],
    key_data: &[u8],
    ints: &[i64],
    text_offsets: &[T],
    text_data: &[u8],
    start: usize,
    len: usize,
    bits: u32,
    each: &mut impl FnMut(u32, u64),
) {
    let (keys, ints, texts) =
        (&key_offsets[start..=start + len], &ints[start..start + len], &text_offsets[start..=start + len]);
    // `>> 1 >> (63 - bits)` is `>> (64 - bits)` without the overflow at 0 bits.
    let shift = 63 - bits;
    for (j, &v) in ints.iter().enumerate() {
        let k = value_hash(key_data, &keys[j..j + 2]);
        let t = value_hash(text_data, &texts[j..j + 2]);
        each(((k >> 1) >> shift) as u32, avalanche(mix(mix(k, v as u64), t)));
    }
}
