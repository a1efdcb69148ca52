//! Column comparison through row-index pairs: which aligned pairs differ, with nulls
//! compared as values (IS DISTINCT FROM) and floats by their bits (total order).
//!
//! Diff used to `take` both sides into alignment and run Arrow's `distinct` kernel;
//! on wide tables that materialized two copies of every column. Comparing through
//! the index pairs reads the values in place. Types without a fast path still go
//! the take + distinct way.

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrowPrimitiveType, BooleanArray, UInt32Array};
use arrow_buffer::BooleanBuffer;
use arrow_schema::{DataType, TimeUnit};
use arrow_select::take::take;

use crate::error::Result;

/// `out[i]` = row `ia[i]` of `a` differs from row `ib[i]` of `b` (same data type).
pub(crate) fn changed(a: &dyn Array, b: &dyn Array, ia: &[u32], ib: &[u32]) -> Result<BooleanBuffer> {
    macro_rules! prim {
        ($t:ty) => {
            pairs(a, b, ia, ib, |x, y| {
                let (x, y) = (x.as_primitive::<$t>(), y.as_primitive::<$t>());
                move |i: usize, j: usize| !eq_native::<$t>(x.value(i), y.value(j))
            })
        };
    }
    Ok(match a.data_type() {
        DataType::Int8 => prim!(Int8Type),
        DataType::Int16 => prim!(Int16Type),
        DataType::Int32 => prim!(Int32Type),
        DataType::Int64 => prim!(Int64Type),
        DataType::UInt8 => prim!(UInt8Type),
        DataType::UInt16 => prim!(UInt16Type),
        DataType::UInt32 => prim!(UInt32Type),
        DataType::UInt64 => prim!(UInt64Type),
        DataType::Float32 => prim!(Float32Type),
        DataType::Float64 => prim!(Float64Type),
        DataType::Date32 => prim!(Date32Type),
        DataType::Date64 => prim!(Date64Type),
        DataType::Timestamp(TimeUnit::Second, _) => prim!(TimestampSecondType),
        DataType::Timestamp(TimeUnit::Millisecond, _) => prim!(TimestampMillisecondType),
        DataType::Timestamp(TimeUnit::Microsecond, _) => prim!(TimestampMicrosecondType),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => prim!(TimestampNanosecondType),
        DataType::Boolean => pairs(a, b, ia, ib, |x, y| {
            let (x, y) = (x.as_boolean(), y.as_boolean());
            move |i: usize, j: usize| x.value(i) != y.value(j)
        }),
        DataType::Utf8 => pairs(a, b, ia, ib, |x, y| {
            let (x, y) = (x.as_string::<i32>(), y.as_string::<i32>());
            move |i: usize, j: usize| x.value(i) != y.value(j)
        }),
        DataType::LargeUtf8 => pairs(a, b, ia, ib, |x, y| {
            let (x, y) = (x.as_string::<i64>(), y.as_string::<i64>());
            move |i: usize, j: usize| x.value(i) != y.value(j)
        }),
        DataType::Binary => pairs(a, b, ia, ib, |x, y| {
            let (x, y) = (x.as_binary::<i32>(), y.as_binary::<i32>());
            move |i: usize, j: usize| x.value(i) != y.value(j)
        }),
        DataType::LargeBinary => pairs(a, b, ia, ib, |x, y| {
            let (x, y) = (x.as_binary::<i64>(), y.as_binary::<i64>());
            move |i: usize, j: usize| x.value(i) != y.value(j)
        }),
        DataType::FixedSizeBinary(_) => pairs(a, b, ia, ib, |x, y| {
            let (x, y) = (x.as_fixed_size_binary(), y.as_fixed_size_binary());
            move |i: usize, j: usize| x.value(i) != y.value(j)
        }),
        _ => {
            let (ia, ib) = (UInt32Array::from(ia.to_vec()), UInt32Array::from(ib.to_vec()));
            let (x, y) = (take(a, &ia, None)?, take(b, &ib, None)?);
            let d: BooleanArray = arrow_ord::cmp::distinct(&x, &y)?;
            d.values().clone()
        }
    })
}

/// Equality of native values as Arrow's kernels define it (floats by total order).
#[inline]
fn eq_native<T: ArrowPrimitiveType>(x: T::Native, y: T::Native) -> bool {
    use arrow_array::ArrowNativeTypeOp;
    x.is_eq(y)
}

/// Evaluate `differs` on every pair, handling nulls first: a pair differs when one
/// side is null and the other is not; two nulls are equal.
fn pairs<'a, F>(
    a: &'a dyn Array,
    b: &'a dyn Array,
    ia: &[u32],
    ib: &[u32],
    make: impl FnOnce(&'a dyn Array, &'a dyn Array) -> F,
) -> BooleanBuffer
where
    F: Fn(usize, usize) -> bool,
{
    let differs = make(a, b);
    let (na, nb) = (a.logical_nulls(), b.logical_nulls());
    match (na, nb) {
        (None, None) => BooleanBuffer::collect_bool(ia.len(), |k| differs(ia[k] as usize, ib[k] as usize)),
        (na, nb) => BooleanBuffer::collect_bool(ia.len(), |k| {
            let (i, j) = (ia[k] as usize, ib[k] as usize);
            let (va, vb) = (na.as_ref().is_none_or(|n| n.is_valid(i)), nb.as_ref().is_none_or(|n| n.is_valid(j)));
            match (va, vb) {
                (true, true) => differs(i, j),
                (false, false) => false,
                _ => true,
            }
        }),
    }
}
