//! Criterion benchmarks of the core on synthetic patient-like rows:
//! `cargo bench -p tidesync-core`. Python-side ratios against DuckDB, polars and the
//! reference are in `tidesync bench` (docs/benchmarks.md).

use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tidesync_core::{diff, digest, merge, MergeMode};

const ROWS: usize = 200_000;

/// Rows with a uuid-like string key, a few data columns and field-wise stamps.
/// `version` shifts stamps and changes every 2nd row's `weight` and every 5th
/// row's `name`, so diffs and merges have real work to do.
fn table(rows: usize, version: i64, node: &str) -> RecordBatch {
    let ids: StringArray = (0..rows).map(|i| Some(format!("{i:08x}-7000-4000-8000-{:012x}", i * 7919))).collect();
    let name: StringArray = (0..rows)
        .map(|i| Some(format!("patient-{}", if i % 5 == 0 { i as i64 + version } else { i as i64 })))
        .collect();
    let weight: Float64Array = (0..rows)
        .map(|i| if i % 17 == 0 { None } else { Some((i % 90) as f64 + (version * (i % 2) as i64) as f64) })
        .collect();
    let hlc = Int64Array::from_iter_values((0..rows).map(|i| (1 << 40) + version * 1000 + (i % 7) as i64));
    let col = |a: ArrayRef| a;
    RecordBatch::try_from_iter(vec![
        ("id", col(Arc::new(ids))),
        ("name", col(Arc::new(name))),
        ("weight", col(Arc::new(weight))),
        ("_hlc", col(Arc::new(hlc.clone()))),
        ("_node", col(Arc::new(StringArray::from_iter_values((0..rows).map(|_| node))))),
        ("_base_hlc", col(Arc::new(Int64Array::from(vec![None; rows])))),
        ("_hlc_name", col(Arc::new(hlc.clone()))),
        ("_hlc_weight", col(Arc::new(hlc))),
    ])
    .unwrap()
}

fn benches(c: &mut Criterion) {
    let old = table(ROWS, 0, "facility-a");
    let new = table(ROWS, 1, "facility-b");
    let mut group = c.benchmark_group("core");
    group.sample_size(20);
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function(BenchmarkId::new("diff", ROWS), |b| b.iter(|| diff(&old, &new, "id").unwrap()));
    for (label, mode) in [("merge_record", MergeMode::Record), ("merge_field", MergeMode::Field)] {
        group.bench_function(BenchmarkId::new(label, ROWS), |b| b.iter(|| merge(&old, &new, "id", mode).unwrap()));
    }
    group.bench_function(BenchmarkId::new("digest", ROWS), |b| {
        b.iter(|| digest(&new, "id", 4096, &["_hlc", "_node"]).unwrap())
    });
    group.finish();
}

criterion_group!(core, benches);
criterion_main!(core);
