//! tidesync-core: the pure sync core of tidesync, with no Python in it.
//!
//! - [`hlc`]: the hybrid logical clock and its vectorized helpers;
//! - [`diff`]: changeset diff of two Arrow batches by key;
//! - [`merge`]: whole-record and field-wise merge with a conflict batch;
//! - [`digest`]: range digests for verification without re-syncing;
//! - [`order`]: logical-clock ordering of a batch of changes;
//! - [`parallel`]: scoped-thread helpers and the global thread cap.
//!
//! The semantics are specified in `docs/semantics.md` at the repository root.

mod compare;
pub mod diff;
pub mod digest;
pub mod error;
mod hash;
pub mod hlc;
mod join;
mod keys;
pub mod merge;
mod node_ranks;
pub mod order;
pub mod parallel;
mod schema;
mod select;
mod uuid_text;

pub use diff::{diff, Diff};
pub use digest::{digest, row_hashes};
pub use error::{CoreError, Result};
pub use hlc::HybridClock;
pub use merge::{merge, MergeMode, MergeOutput};
pub use order::logical_order;
pub use parallel::{max_threads, set_max_threads};
