//! Hybrid logical clock: 64-bit stamps, milliseconds in the high 48 bits and a
//! counter in the low 16. A clock never goes backwards and always moves above every
//! stamp it observes, so an edit made after seeing a change orders after it,
//! whatever the wall clocks say.

use arrow_array::{Array, ArrayRef, BooleanArray, Int64Array, UInt64Array};

use crate::error::{CoreError, Result};

/// Bits of the counter part of a stamp.
pub const COUNTER_BITS: u32 = 16;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;
/// Largest millisecond value a stamp can carry.
pub const MAX_MS: u64 = (1 << (64 - COUNTER_BITS)) - 1;

/// Pack milliseconds and a counter into a stamp.
pub fn pack(ms: u64, counter: u16) -> u64 {
    (ms << COUNTER_BITS) | counter as u64
}

/// Split a stamp into (milliseconds, counter).
pub fn unpack(hlc: u64) -> (u64, u16) {
    (hlc >> COUNTER_BITS, (hlc & COUNTER_MASK) as u16)
}

/// A node's clock.
#[derive(Debug, Clone)]
pub struct HybridClock {
    last: u64,
    max_drift_ms: u64,
}

impl HybridClock {
    pub fn new(max_drift_ms: u64, last: u64) -> Self {
        Self { last, max_drift_ms }
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    pub fn max_drift_ms(&self) -> u64 {
        self.max_drift_ms
    }

    /// Stamp a local event. A counter overflow carries into the milliseconds: the
    /// clock runs slightly ahead rather than backwards.
    pub fn tick(&mut self, now_ms: u64) -> Result<u64> {
        let wall = wall_stamp(now_ms)?;
        self.last = wall.max(self.advance(self.last)?);
        Ok(self.last)
    }

    /// Fold in a stamp received from another node; the result is above it.
    ///
    /// A stamp further ahead of `now_ms` than the drift tolerance is an error,
    /// unless `clamp` is set: then it counts as the tolerance bound itself, so a
    /// node whose clock runs far ahead cannot drag every other clock along.
    pub fn observe(&mut self, remote: u64, now_ms: u64, clamp: bool) -> Result<u64> {
        let wall = wall_stamp(now_ms)?;
        let bound = self.drift_bound(now_ms);
        let remote = if remote > bound {
            if !clamp {
                return Err(CoreError::ClockSkew(format!(
                    "remote stamp {remote} is {} ms ahead of local time {now_ms}, beyond the tolerance of {} ms; \
                     fix the sending node's clock, or observe with clamp=True to bound it",
                    unpack(remote).0.saturating_sub(now_ms),
                    self.max_drift_ms
                )));
            }
            bound
        } else {
            remote
        };
        let next = self.advance(self.last.max(remote))?;
        self.last = wall.max(next);
        Ok(self.last)
    }

    /// The greatest stamp accepted from elsewhere at wall time `now_ms`.
    pub fn drift_bound(&self, now_ms: u64) -> u64 {
        drift_bound(now_ms, self.max_drift_ms)
    }

    fn advance(&self, stamp: u64) -> Result<u64> {
        stamp
            .checked_add(1)
            .filter(|s| unpack(*s).0 <= MAX_MS)
            .ok_or_else(|| CoreError::InvalidInput("clock exhausted: stamp at its maximum".into()))
    }
}

fn wall_stamp(now_ms: u64) -> Result<u64> {
    if now_ms > MAX_MS {
        return Err(CoreError::InvalidInput(format!(
            "wall time {now_ms} ms does not fit in the 48-bit millisecond part of a stamp"
        )));
    }
    Ok(pack(now_ms, 0))
}

/// Largest stamp allowed at wall time `now_ms` with a drift tolerance.
pub fn drift_bound(now_ms: u64, max_drift_ms: u64) -> u64 {
    let ms = now_ms.saturating_add(max_drift_ms).min(MAX_MS);
    pack(ms, COUNTER_MASK as u16)
}

/// The greatest non-null stamp of an int64 or uint64 column.
pub fn max_stamp(array: &dyn Array) -> Result<Option<u64>> {
    Ok(stamps(array)?.into_iter().flatten().max())
}

/// Bound every stamp by `now_ms + max_drift_ms`. Returns the clamped column (same
/// type as the input) and a mask of the stamps that were clamped.
pub fn clamp_stamps(array: &dyn Array, now_ms: u64, max_drift_ms: u64) -> Result<(ArrayRef, BooleanArray)> {
    let bound = drift_bound(now_ms, max_drift_ms);
    let values = stamps(array)?;
    // A null stamp is not ahead of anything: not clamped, and stays null.
    let mask: BooleanArray = values.iter().map(|v| Some(v.is_some_and(|s| s > bound))).collect();
    let clamped: Vec<Option<u64>> = values.iter().map(|v| v.map(|s| s.min(bound))).collect();
    let out: ArrayRef = match array.data_type() {
        arrow_schema::DataType::Int64 => {
            std::sync::Arc::new(clamped.into_iter().map(|v| v.map(|s| s as i64)).collect::<Int64Array>())
        }
        _ => std::sync::Arc::new(clamped.into_iter().collect::<UInt64Array>()),
    };
    Ok((out, mask))
}

/// Read a stamp column (int64 or uint64) as optional u64 values.
pub(crate) fn stamps(array: &dyn Array) -> Result<Vec<Option<u64>>> {
    if let Some(a) = array.as_any().downcast_ref::<Int64Array>() {
        if let Some(neg) = a.iter().flatten().find(|v| *v < 0) {
            return Err(CoreError::InvalidInput(format!("negative HLC stamp {neg}: stamps are non-negative")));
        }
        return Ok(a.iter().map(|v| v.map(|s| s as u64)).collect());
    }
    if let Some(a) = array.as_any().downcast_ref::<UInt64Array>() {
        return Ok(a.iter().collect());
    }
    Err(CoreError::UnsupportedType(format!("HLC stamps must be int64 or uint64, got {}", array.data_type())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_follows_wall_clock_and_never_goes_back() {
        let mut c = HybridClock::new(1000, 0);
        let a = c.tick(100).unwrap();
        assert_eq!(a, pack(100, 0));
        let b = c.tick(100).unwrap();
        assert_eq!(b, pack(100, 1));
        let d = c.tick(50).unwrap(); // wall clock went backwards
        assert!(d > b);
        assert_eq!(c.tick(200).unwrap(), pack(200, 0));
    }

    #[test]
    fn counter_overflow_carries_into_ms() {
        let mut c = HybridClock::new(1000, pack(100, u16::MAX));
        assert_eq!(c.tick(100).unwrap(), pack(101, 0));
    }

    #[test]
    fn observe_moves_above_remote() {
        let mut c = HybridClock::new(1000, 0);
        let remote = pack(5000, 7);
        let s = c.observe(remote, 100, false).unwrap_err();
        assert!(matches!(s, CoreError::ClockSkew(_)));
        let s = c.observe(remote, 4500, false).unwrap();
        assert!(s > remote);
        assert!(c.tick(300).unwrap() > s);
    }

    #[test]
    fn observe_clamps_skewed_remote() {
        let mut c = HybridClock::new(1000, 0);
        let s = c.observe(pack(1_000_000, 0), 100, true).unwrap();
        assert_eq!(unpack(s).0, 1101); // (100 + 1000, 0xffff) + 1 carries
    }

    #[test]
    fn clamp_column() {
        let a = Int64Array::from(vec![Some(pack(10, 0) as i64), None, Some(pack(5000, 0) as i64)]);
        let (out, mask) = clamp_stamps(&a, 10, 100).unwrap();
        let out = out.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(out.value(2) as u64, drift_bound(10, 100));
        assert_eq!(mask.iter().collect::<Vec<_>>(), vec![Some(false), Some(false), Some(true)]);
        assert_eq!(max_stamp(&a).unwrap(), Some(pack(5000, 0)));
    }
}
