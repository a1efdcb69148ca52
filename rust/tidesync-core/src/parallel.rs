//! Splitting work over the machine's cores with scoped threads.
//!
//! The core runs with the GIL released, so its threads do not hold up Python. The
//! number of threads is capped by `set_max_threads` (0 = one per core): a facility
//! server shared with the hospital's own applications may want to keep cores free,
//! and tests use 1 to compare the parallel paths with the sequential ones.

use std::sync::atomic::{AtomicUsize, Ordering};

static MAX_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Cap the threads a core call may use; 0 means one per available core.
pub fn set_max_threads(n: usize) {
    MAX_THREADS.store(n, Ordering::Relaxed);
}

/// The current cap (0 = one per available core).
pub fn max_threads() -> usize {
    MAX_THREADS.load(Ordering::Relaxed)
}

/// Threads worth using for `items` units of work when each thread should get at
/// least `min_per_thread` of them (below that, starting threads costs more).
pub(crate) fn threads_for(items: usize, min_per_thread: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cap = match max_threads() {
        0 => cores,
        n => n,
    };
    cap.min(items / min_per_thread.max(1)).max(1)
}

/// `(start, len)` ranges splitting `0..items` into `parts` nearly equal pieces.
pub(crate) fn split(items: usize, parts: usize) -> Vec<(usize, usize)> {
    let size = items.div_ceil(parts.max(1)).max(1);
    split_by(0, items, size).collect()
}

/// `(start, len)` ranges of at most `size` covering `start..start + len`.
pub(crate) fn split_by(start: usize, len: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (start..start + len).step_by(size.max(1)).map(move |s| (s, size.min(start + len - s)))
}

/// Run `work(start, len)` over contiguous ranges of `0..items`, in parallel when
/// worthwhile; the results come back in range order.
pub(crate) fn par_ranges<T, F>(items: usize, min_per_thread: usize, work: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize, usize) -> T + Sync,
{
    let threads = threads_for(items, min_per_thread);
    if threads == 1 {
        return vec![work(0, items)];
    }
    let ranges = split(items, threads);
    on_threads(ranges.len(), |t| work(ranges[t].0, ranges[t].1))
}

/// `(0..threads).map(f)` with each call on its own thread, results in order. The
/// calling thread makes call 0 itself: one thread fewer to start, and none waiting.
fn on_threads<T, F>(threads: usize, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> T + Sync,
{
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = (1..threads).map(|t| scope.spawn(move || f(t))).collect();
        let mut out = Vec::with_capacity(threads);
        out.push(f(0));
        out.extend(handles.into_iter().map(|h| h.join().expect("tidesync worker thread panicked")));
        out
    })
}

/// Fold `0..items` in chunks of `chunk` items that the threads claim in turn, each
/// into its own accumulator (`init`), returned in no particular order: for work
/// whose results combine in any order (sums). Where `par_ranges` gives each thread
/// one fixed share, here a thread that the host deschedules for a while leaves its
/// unclaimed chunks to the others instead of holding up the call.
pub(crate) fn par_fold<T, I, F>(items: usize, min_per_thread: usize, chunk: usize, init: I, work: F) -> Vec<T>
where
    T: Send,
    I: Fn() -> T + Sync,
    F: Fn(&mut T, usize, usize) + Sync,
{
    let threads = threads_for(items, min_per_thread);
    let chunk = chunk.max(1);
    let next = AtomicUsize::new(0);
    let run = || {
        let mut acc = init();
        loop {
            let start = next.fetch_add(chunk, Ordering::Relaxed);
            if start >= items {
                return acc;
            }
            work(&mut acc, start, chunk.min(items - start));
        }
    };
    if threads == 1 {
        return vec![run()];
    }
    on_threads(threads, |_| run())
}

/// `(0..items).map(f)`, in parallel when worthwhile, results in order.
pub(crate) fn par_map<T, F>(items: usize, min_per_thread: usize, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> T + Sync,
{
    let chunks = par_ranges(items, min_per_thread, |s, l| (s..s + l).map(&f).collect::<Vec<T>>());
    let mut out = Vec::with_capacity(items);
    for chunk in chunks {
        out.extend(chunk);
    }
    out
}
