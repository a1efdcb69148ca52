//! Matching incoming keys to local keys by radix partitioning.
//!
//! Why partition: on million-row batches a hash table of either side is larger than
//! the caches, so each lookup of a shuffled key is a cache miss (100-200 ns on the
//! machines we measured, and only a few overlap). Two sequential passes first split
//! both sides by the top bits of the key hash into partitions of about a thousand
//! rows; each partition's tables then sit in L1/L2 while its keys are matched, and
//! the only random reads left are of the key bytes themselves, to confirm a match.
//!
//! Matching inside a partition compares full 64-bit hashes only; the keys of every
//! match are compared after, in incoming order, with the reads of a batch of rows
//! issued together so that their cache misses overlap. Should two different keys
//! share a hash (with a million keys a side, about once in ten million merges), the
//! match is redone comparing keys as it goes.

use crate::error::Result;
use crate::keys::{duplicate, KeyHash};
use crate::parallel::par_ranges;

/// No row.
pub(crate) const NONE: u32 = u32::MAX;

/// Rows of the larger side per partition (the tables of a partition then take
/// ~16-32 KiB).
const PARTITION_ROWS: usize = 1024;
/// At most 2^12 partitions: the scatter pass writes to one stream per partition,
/// and more streams than this thrash the TLB and the write-combining buffers.
const MAX_BITS: u32 = 12;
/// Partitions per thread at least (below that, one thread is faster).
const PARALLEL_MIN_PARTITIONS: usize = 64;

/// For every incoming row: the local row with its key, and the first incoming row
/// with its key.
pub(crate) struct Matches {
    /// `local[i]`: the local row holding incoming row `i`'s key, or `NONE`.
    pub local: Vec<u32>,
    /// `leader[i]`: the first incoming row with row `i`'s key (`i` for the first).
    pub leader: Vec<u32>,
}

/// Match `incoming` keys against `local` keys, given every key's hash
/// (`KeyHash::key_hash`). A key found twice on the local side is an error naming
/// the first such pair of rows in row order.
pub(crate) fn match_keys<K: KeyHash + Sync>(
    local: &[K],
    local_hash: &[u64],
    incoming: &[K],
    incoming_hash: &[u64],
    key: &str,
) -> Result<Matches> {
    let larger = local.len().max(incoming.len());
    let bits = (larger / PARTITION_ROWS).max(1).ilog2().min(MAX_BITS);
    let (lp, ip) = (Partitions::new(local_hash, bits), Partitions::new(incoming_hash, bits));
    let mut matches = match_partitions(local, incoming, &lp, &ip, Compare::Hashes, key)?;
    if matches.as_ref().is_none_or(|m| !verify(local, incoming, m)) {
        matches = match_partitions(local, incoming, &lp, &ip, Compare::Keys, key)?;
    }
    Ok(matches.expect("matching by keys always completes"))
}

/// How a partition's rows are matched.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Compare {
    /// Equal hashes are taken for equal keys, to be verified after (`verify`).
    Hashes,
    /// Keys are compared whenever hashes are equal.
    Keys,
}

/// Match every partition; `None` when, comparing hashes, two different local keys
/// share one (then only comparing keys gives the right answer).
fn match_partitions<K: KeyHash + Sync>(
    local: &[K],
    incoming: &[K],
    lp: &Partitions,
    ip: &Partitions,
    compare: Compare,
    key: &str,
) -> Result<Option<Matches>> {
    let parts = par_ranges(lp.count(), PARALLEL_MIN_PARTITIONS, |start, len| {
        let mut found = PartMatches::default();
        let (mut local_table, mut new_keys) = (SmallTable::default(), SmallTable::default());
        for q in start..start + len {
            let tables = (&mut local_table, &mut new_keys);
            match_partition(local, incoming, lp.part(q), ip.part(q), compare, tables, &mut found);
        }
        found
    });
    // Duplicates are reported as a scan in row order would find them: the pair
    // whose second row comes first.
    if let Some((first, second)) = parts.iter().filter_map(|p| p.duplicate).min_by_key(|&(_, second)| second) {
        return Err(duplicate(key, "local", first as usize, second as usize));
    }
    if parts.iter().any(|p| p.collided) {
        return Ok(None);
    }
    // Back from partition order to incoming order (sequential reads, scattered writes).
    let (mut local_of, mut leader) = (vec![NONE; incoming.len()], vec![NONE; incoming.len()]);
    let found = parts.iter().flat_map(|p| p.local.iter().zip(&p.leader));
    for (&row, (&l, &lead)) in ip.row.iter().zip(found) {
        local_of[row as usize] = l;
        leader[row as usize] = lead;
    }
    Ok(Some(Matches { local: local_of, leader }))
}

/// Whether every match found by hash is a match of keys. Works through a batch of
/// rows at a time: first it reads each candidate local key (`KeyHash::warm`), then
/// compares, so that the cache misses of a batch overlap instead of queueing.
fn verify<K: KeyHash + Sync>(local: &[K], incoming: &[K], m: &Matches) -> bool {
    const BATCH: usize = 16;
    par_ranges(incoming.len(), PARALLEL_MIN_PARTITIONS * PARTITION_ROWS, |start, len| {
        (start..start + len).step_by(BATCH).all(|from| {
            let rows = from..(from + BATCH).min(start + len);
            let warm =
                rows.clone().filter(|&i| m.local[i] != NONE).fold(0, |a, i| a ^ local[m.local[i] as usize].warm());
            std::hint::black_box(warm);
            rows.into_iter().all(|i| {
                let (l, lead) = (m.local[i], m.leader[i] as usize);
                (l == NONE || local[l as usize] == incoming[i]) && (lead == i || incoming[lead] == incoming[i])
            })
        })
    })
    .into_iter()
    .all(|ok| ok)
}

/// Results of a run of partitions, in partition order of the incoming rows.
#[derive(Default)]
struct PartMatches {
    local: Vec<u32>,
    leader: Vec<u32>,
    /// The duplicate local pair with the earliest second row.
    duplicate: Option<(u32, u32)>,
    /// Two different local keys share a hash (comparing hashes only).
    collided: bool,
}

fn match_partition<K: KeyHash>(
    local: &[K],
    incoming: &[K],
    (local_hash, local_row): (&[u64], &[u32]),
    (in_hash, in_row): (&[u64], &[u32]),
    compare: Compare,
    (table, new_keys): (&mut SmallTable, &mut SmallTable),
    out: &mut PartMatches,
) {
    // Rows of a partition are in increasing order, so the first duplicate met is
    // the earliest in row order, and a key's leader is its first incoming row.
    table.reset(local_row.len());
    for (&h, &r) in local_hash.iter().zip(local_row) {
        let k = &local[r as usize];
        // Local keys are always compared on equal hashes: a duplicate is an error,
        // a shared hash sends the whole match to comparing keys.
        match table.find(h, |x| compare == Compare::Hashes || local[x as usize] == *k) {
            Ok(pos) if local[table.row(pos) as usize] == *k => {
                if out.duplicate.is_none_or(|(_, second)| r < second) {
                    out.duplicate = Some((table.row(pos), r));
                }
                break; // later rows of this partition cannot give an earlier pair
            }
            Ok(_) => {
                out.collided = true;
                return;
            }
            Err(pos) => table.put(pos, h, r),
        }
    }
    let same = |a: &K, b: &K| compare == Compare::Hashes || a == b;
    new_keys.reset(in_row.len());
    for (&h, &i) in in_hash.iter().zip(in_row) {
        let k = &incoming[i as usize];
        let (l, lead) = match table.find(h, |x| same(&local[x as usize], k)) {
            Ok(pos) => (table.row(pos), table.claim(pos, i)),
            Err(_) => match new_keys.find(h, |x| same(&incoming[x as usize], k)) {
                Ok(pos) => (NONE, new_keys.row(pos)),
                Err(pos) => {
                    new_keys.put(pos, h, i);
                    (NONE, i)
                }
            },
        };
        out.local.push(l);
        out.leader.push(lead);
    }
}

/// Rows grouped by partition (a stable counting sort on the hash's top bits), each
/// with its hash.
struct Partitions {
    /// Partition `q` is `hash[bounds[q]..bounds[q + 1]]` (and the same of `row`).
    bounds: Vec<usize>,
    hash: Vec<u64>,
    row: Vec<u32>,
}

impl Partitions {
    fn new(hashes: &[u64], bits: u32) -> Self {
        let part = |h: u64| h.checked_shr(64 - bits).unwrap_or(0) as usize;
        let mut bounds = vec![0usize; (1 << bits) + 1];
        for &h in hashes {
            bounds[part(h) + 1] += 1;
        }
        for q in 1..bounds.len() {
            bounds[q] += bounds[q - 1];
        }
        let mut next = bounds[..bounds.len() - 1].to_vec();
        let (mut hash, mut row) = (vec![0u64; hashes.len()], vec![0u32; hashes.len()]);
        for (r, &h) in hashes.iter().enumerate() {
            let at = &mut next[part(h)];
            hash[*at] = h;
            row[*at] = r as u32;
            *at += 1;
        }
        Self { bounds, hash, row }
    }

    fn count(&self) -> usize {
        self.bounds.len() - 1
    }

    fn part(&self, q: usize) -> (&[u64], &[u32]) {
        let r = self.bounds[q]..self.bounds[q + 1];
        (&self.hash[r.clone()], &self.row[r])
    }
}

/// A small open-addressing (linear probing) table of rows with their full hashes,
/// reused across partitions; `first` holds, per slot, the first incoming row that
/// matched it. At most half full.
#[derive(Default)]
struct SmallTable {
    hash: Vec<u64>,
    row: Vec<u32>,
    first: Vec<u32>,
    mask: usize,
}

impl SmallTable {
    /// Empty the table, sized for `rows` rows.
    fn reset(&mut self, rows: usize) {
        let len = (rows * 2).next_power_of_two().max(16);
        if self.row.len() < len {
            self.hash.resize(len, 0);
            self.row.resize(len, NONE);
            self.first.resize(len, NONE);
        }
        self.row[..len].fill(NONE);
        self.first[..len].fill(NONE);
        self.mask = len - 1;
    }

    /// The slot of the row with this hash whose key `is_key` accepts, or else the
    /// free slot where it belongs. The position comes from the hash's low bits: the
    /// partition already fixed its top bits.
    #[inline]
    fn find(&self, hash: u64, mut is_key: impl FnMut(u32) -> bool) -> std::result::Result<usize, usize> {
        let mut pos = hash as usize & self.mask;
        loop {
            let row = self.row[pos];
            if row == NONE {
                return Err(pos);
            }
            if self.hash[pos] == hash && is_key(row) {
                return Ok(pos);
            }
            pos = (pos + 1) & self.mask;
        }
    }

    #[inline]
    fn row(&self, pos: usize) -> u32 {
        self.row[pos]
    }

    #[inline]
    fn put(&mut self, pos: usize, hash: u64, row: u32) {
        debug_assert!(self.row[pos] == NONE && row != NONE);
        self.hash[pos] = hash;
        self.row[pos] = row;
    }

    /// The first incoming row matched to slot `pos`, which is `row` if none was.
    #[inline]
    fn claim(&mut self, pos: usize, row: u32) -> u32 {
        if self.first[pos] == NONE {
            self.first[pos] = row;
        }
        self.first[pos]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(local: &[i64], incoming: &[i64]) -> Result<Matches> {
        let lh: Vec<u64> = local.iter().map(|k| k.key_hash()).collect();
        let ih: Vec<u64> = incoming.iter().map(|k| k.key_hash()).collect();
        match_keys(local, &lh, incoming, &ih, "id")
    }

    #[test]
    fn matches_local_rows_and_leaders_across_many_partitions() {
        // Large enough for several threads (when the machine has them).
        let local: Vec<i64> = (0..200_000).map(|k| k * 3).collect();
        // Every third key exists locally; each incoming key comes twice.
        let incoming: Vec<i64> = (0..300_000).chain(0..300_000).collect();
        let m = run(&local, &incoming).unwrap();
        for (i, &k) in incoming.iter().enumerate() {
            let want = if k % 3 == 0 && k < 600_000 { (k / 3) as u32 } else { NONE };
            assert_eq!(m.local[i], want, "row {i}");
            assert_eq!(m.leader[i] as usize, i % 300_000, "row {i}");
        }
    }

    #[test]
    fn the_first_local_duplicate_in_row_order_is_reported() {
        let mut local: Vec<i64> = (0..50_000).collect();
        local[40_000] = 7; // duplicates row 7
        local[30_000] = 9_999; // duplicates row 9_999, and comes first
        let err = run(&local, &[1, 2]).err().expect("duplicate keys").to_string();
        assert!(err.contains("rows 9999 and 30000"), "{err}");
    }

    #[test]
    fn colliding_tags_fall_back_to_the_keys() {
        // One hash for every key: one partition, every probe walks the sequence.
        let local: Vec<i64> = (0..100).collect();
        let incoming: Vec<i64> = vec![99, 100, 0, 100, 50];
        let m = match_keys(&local, &[5; 100], &incoming, &[5; 5], "id").unwrap();
        assert_eq!(m.local, vec![99, NONE, 0, NONE, 50]);
        assert_eq!(m.leader, vec![0, 1, 2, 1, 4]);
    }

    #[test]
    fn an_incoming_key_sharing_a_hash_with_another_key_is_not_matched_to_it() {
        // Distinct local hashes, so matching by hash completes; incoming key 100
        // has local key 7's hash and key 200 has key 100's, so only the check of
        // the keys after catches them.
        let local: Vec<i64> = (0..10).collect();
        let lh: Vec<u64> = local.iter().map(|k| k.key_hash()).collect();
        let incoming: Vec<i64> = vec![100, 7, 200, 100];
        let ih = vec![lh[7], lh[7], lh[7], lh[7]];
        let m = match_keys(&local, &lh, &incoming, &ih, "id").unwrap();
        assert_eq!(m.local, vec![NONE, 7, NONE, NONE]);
        assert_eq!(m.leader, vec![0, 1, 2, 0]);
    }
}
