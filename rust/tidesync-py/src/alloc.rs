//! The allocator of the native module: mimalloc, keeping freed memory for a while.
//!
//! Why: a merge of a million-row page allocates a few hundred MB of buffers (its
//! output among them) and frees them when Python drops the result. With the
//! process's default allocator (glibc) whether that memory is kept for the next
//! call depends on the heap's history; when it is not, the next call faults in and
//! zeroes every page again (25k+ page faults, about a fifth of a merge's time in
//! our measurements; docs/benchmarks.md). mimalloc keeps freed memory for reuse and
//! returns it to the system only after it has stayed unused for `PURGE_DELAY_MS`.
//! Only allocations of this module go through it: Python and pyarrow keep theirs.

use libmimalloc_sys::{mi_option_set, mi_option_t};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` of mimalloc v2's `mi_option_e` (mimalloc.h; the Rust
/// binding does not name it).
const MI_OPTION_PURGE_DELAY: mi_option_t = 15;

/// Memory unused for this long goes back to the system (mimalloc's default is
/// 10 ms, shorter than the gap between two pages of a sync).
const PURGE_DELAY_MS: i64 = 1000;

/// Set the allocator's options; called once, when the module is imported.
pub fn configure() {
    // SAFETY: a plain setter of a mimalloc option, valid at any time.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) };
}
