//! The parallel paths give exactly the sequential results. Its own test binary:
//! it changes the global thread cap.

use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use tidesync_core::{diff, digest, merge, set_max_threads, MergeMode};

/// A deterministic pseudo-random generator (no dev-dependency needed for this).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// Rows over a key space smaller than the row count (so keys repeat), with colliding
/// stamps, several nodes and bases pointing at other versions: conflicts, ties and
/// multi-version groups all occur.
fn versions(rows: usize, keys: u64, seed: u64) -> RecordBatch {
    let mut rng = Lcg(seed);
    let mut k = Vec::new();
    let (mut v, mut hlc, mut node, mut base, mut hv) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rows {
        k.push(format!("key-{:07}", rng.next(keys)));
        v.push(if rng.next(10) == 0 { None } else { Some(rng.next(5) as i64) });
        let h = 100 + rng.next(50) as i64;
        hlc.push(h);
        node.push(["a", "b", "c"][rng.next(3) as usize]);
        base.push(if rng.next(2) == 0 { None } else { Some(100 + rng.next(50) as i64) });
        hv.push(Some(h - rng.next(3) as i64));
    }
    RecordBatch::try_from_iter(vec![
        ("id", Arc::new(StringArray::from(k)) as ArrayRef),
        ("v", Arc::new(Int64Array::from(v)) as ArrayRef),
        ("_hlc", Arc::new(Int64Array::from(hlc)) as ArrayRef),
        ("_node", Arc::new(StringArray::from(node)) as ArrayRef),
        ("_base_hlc", Arc::new(Int64Array::from(base)) as ArrayRef),
        ("_hlc_v", Arc::new(Int64Array::from(hv)) as ArrayRef),
    ])
    .unwrap()
}

#[test]
fn parallel_equals_sequential() {
    // Local: one version per key (merge of versions into an empty table).
    let local = merge(&versions(0, 1, 1), &versions(400_000, 300_000, 2), "id", MergeMode::Record).unwrap().rows;
    let incoming = versions(400_000, 350_000, 3);
    for mode in [MergeMode::Record, MergeMode::Field] {
        set_max_threads(1);
        let one = merge(&local, &incoming, "id", mode).unwrap();
        set_max_threads(2);
        let two = merge(&local, &incoming, "id", mode).unwrap();
        assert!(one.rows.num_rows() > 100_000 && one.conflicts.num_rows() > 1_000, "the data exercises merge");
        assert_eq!(one.rows, two.rows, "{mode:?}");
        assert_eq!(one.inserted, two.inserted, "{mode:?}");
        assert_eq!((&one.local_row, &one.source, one.keys), (&two.local_row, &two.source, two.keys), "{mode:?}");
        assert_eq!(one.conflicts, two.conflicts, "{mode:?}");
    }
    // Diff of two versions of one table (keys unique on both sides).
    let newer = merge(&local, &incoming, "id", MergeMode::Record).unwrap().rows;
    set_max_threads(1);
    let one = diff(&local, &newer, "id").unwrap();
    set_max_threads(2);
    let two = diff(&local, &newer, "id").unwrap();
    assert!(one.updated.num_rows() > 10_000 && one.deleted.num_rows() > 10_000);
    assert_eq!((one.inserted, one.deleted, one.updated), (two.inserted, two.deleted, two.updated));

    set_max_threads(1);
    let one = digest(&incoming, "id", 256, &["_hlc", "_node", "v"]).unwrap();
    set_max_threads(2);
    assert_eq!(one, digest(&incoming, "id", 256, &["_hlc", "_node", "v"]).unwrap());
    set_max_threads(0);
}
