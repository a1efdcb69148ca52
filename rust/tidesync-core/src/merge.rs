//! Merge of local rows and incoming versions of one table: whole-record or
//! field-wise last-writer-wins on hybrid logical clocks, with a conflict batch
//! holding the losing values of every concurrent edit. The rules, and why they
//! make merge commutative, associative and idempotent, are in docs/semantics.md.

use std::cmp::Ordering;
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, BooleanArray, Int64Array, ListArray, OffsetSizeTrait, RecordBatch, StringArray, UInt32Array,
};
use arrow_buffer::{BooleanBuffer, Buffer, NullBuffer, OffsetBuffer};
use arrow_ord::cmp::distinct;
use arrow_ord::ord::{make_comparator, DynComparator};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use arrow_select::take::take;

use crate::error::{invalid, CoreError, Result};
use crate::join::{match_keys, NONE};
use crate::keys::{read_key_pair, KeyHash, KeyValues};
use crate::node_ranks::node_ranks;
use crate::order::VALUE_ORDER;
use crate::parallel::{par_map, par_ranges};
use crate::schema::{require_same_columns, union_nullability};
use crate::select::{interleave, Picks, Selection};

pub const HLC: &str = "_hlc";
pub const NODE: &str = "_node";
pub const BASE_HLC: &str = "_base_hlc";
/// Prefix of the per-column stamps of field-wise tables: `_hlc_<column>`.
pub const COLUMN_HLC_PREFIX: &str = "_hlc_";
pub const WINNER_HLC: &str = "_winner_hlc";
pub const WINNER_NODE: &str = "_winner_node";
pub const LOST_COLUMNS: &str = "_lost_columns";

/// How rows of a table are merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeMode {
    /// The greater (hlc, node) version wins the whole row.
    Record,
    /// Each data column is won on its own stamp `_hlc_<column>`.
    Field,
}

impl std::str::FromStr for MergeMode {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "record" => Ok(Self::Record),
            "field" => Ok(Self::Field),
            other => Err(invalid(format!("merge mode {other:?} is not one of \"record\", \"field\""))),
        }
    }
}

/// What a merge produced.
#[derive(Debug, Clone)]
pub struct MergeOutput {
    /// Merged rows that differ from the local rows (or are new), input schema; record
    /// mode: in incoming order of the version written; field mode: in order of the
    /// first appearance of the key.
    pub rows: RecordBatch,
    /// One per row of `rows`: the key had no local row.
    pub inserted: BooleanArray,
    /// One per row of `rows`: the local row of its key, null when there was none
    /// (so a caller can tell an update of a live row from a revival of a tombstone).
    pub local_row: UInt32Array,
    /// One per row of `rows`: the incoming row it is a copy of (every column equal),
    /// null when it mixes versions or keeps local parts (field mode), so a caller
    /// knows which rows are exactly a version the sender has.
    pub source: UInt32Array,
    /// Distinct keys in `incoming` (the number of groups merged).
    pub keys: usize,
    /// The losing side of every concurrent edit, with `_winner_hlc`, `_winner_node`
    /// and `_lost_columns`.
    pub conflicts: RecordBatch,
}

const LOCAL: usize = 0;
const INCOMING: usize = 1;

/// Each thread gets at least this many keys (below that, one thread is faster).
const PARALLEL_MIN_KEYS: usize = 64 * 1024;

/// Groups whose local rows are loaded together before they are decided.
const WARM_BATCH: usize = 16;

/// A version: a row of the local (side 0) or incoming (side 1) batch, packed in
/// 32 bits because field mode keeps one per output cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct V(u32);

impl V {
    const SIDE_BIT: u32 = 1 << 31;

    fn local(row: u32) -> Self {
        Self(row)
    }

    fn incoming(row: u32) -> Self {
        Self(row | Self::SIDE_BIT)
    }

    #[inline]
    fn side(self) -> usize {
        (self.0 >> 31) as usize
    }

    #[inline]
    fn row(self) -> usize {
        (self.0 & !Self::SIDE_BIT) as usize
    }
}

/// Merge `incoming` into `local` (see docs/semantics.md).
pub fn merge(local: &RecordBatch, incoming: &RecordBatch, key: &str, mode: MergeMode) -> Result<MergeOutput> {
    require_same_columns(local, incoming, "local", "incoming")?;
    if local.num_rows().max(incoming.num_rows()) >= V::SIDE_BIT as usize {
        return Err(invalid("merge takes batches below 2^31 rows; split the incoming changes into pages"));
    }
    let ctx = Ctx::new(local, incoming, key, mode)?;
    // Record mode decides on the local rows' stamps (`Groups::stamp`).
    let stamps = (mode == MergeMode::Record).then(|| ctx.local_stamps());
    let stamps = stamps.as_deref();
    let groups = match read_key_pair((local, "local"), (incoming, "incoming"), key)? {
        (KeyValues::Bytes(l), KeyValues::Bytes(i)) => group(&l, &i, key, stamps)?,
        (KeyValues::Int(l), KeyValues::Int(i)) => group(&l, &i, key, stamps)?,
        (KeyValues::Uuid(l), KeyValues::Uuid(i)) => group(&l, &i, key, stamps)?,
        _ => return Err(invalid("key columns of local and incoming differ in type")),
    };
    // Keys are independent: decide contiguous ranges of groups on separate threads,
    // then join the outputs in group order (= order of first appearance; record mode
    // then puts them in incoming order, `put_in_incoming_order`).
    let parts = par_ranges(groups.groups.len(), PARALLEL_MIN_KEYS, |start, len| {
        let mut out = Output::new(&ctx, len);
        // Buffers reused across keys: the versions of one key, and the merged row.
        let mut scratch = Vec::new();
        let mut acc = Acc { row: V::local(0), cols: Vec::with_capacity(ctx.data_cols.len()) };
        for batch in groups.groups[start..start + len].chunks(WARM_BATCH) {
            if ctx.mode == MergeMode::Field {
                ctx.warm_local_rows(batch);
            }
            for g in batch {
                if ctx.mode == MergeMode::Record && groups.next[g.first as usize] == NONE {
                    // The common case: one incoming version, decided on the local row's
                    // gathered stamp (no read of the local batch here).
                    let local = g.local.map(|l| (l, groups.stamp[g.first as usize]));
                    ctx.decide_record(local, g.first, &mut out);
                } else {
                    ctx.merge_group(g.local, g.first, &groups.next, &mut scratch, &mut acc, &mut out);
                }
            }
        }
        out
    });
    Output::concat(&ctx, parts).finish(&ctx, groups.groups.len())
}

/// Incoming rows grouped by key, in order of first appearance, each with its local row.
struct Groups {
    groups: Vec<Group>,
    /// `next[i]`: the next incoming row with the same key as row `i`, or `NONE`.
    next: Vec<u32>,
    /// `stamp[i]`: the stamp of the local row of incoming row `i`'s key, if any.
    stamp: Vec<LocalStamp>,
}

/// What record mode decides on of a key's local row, gathered for all keys before
/// the decisions.
#[derive(Clone, Copy, Default)]
struct LocalStamp {
    hlc: i64,
    base: i64,
    node: u32,
    has_base: bool,
}

struct Group {
    first: u32,
    last: u32,
    local: Option<u32>,
}

fn group<K: KeyHash + Sync>(
    local: &[K],
    incoming: &[K],
    key: &str,
    local_stamps: Option<&[LocalStamp]>,
) -> Result<Groups> {
    // Every key is hashed once, for the partitions and the tables of `match_keys`.
    let local_hash = par_map(local.len(), PARALLEL_MIN_KEYS, |row| local[row].key_hash());
    let incoming_hash = par_map(incoming.len(), PARALLEL_MIN_KEYS, |row| incoming[row].key_hash());
    let matches = match_keys(local, &local_hash, incoming, &incoming_hash, key)?;
    // Groups in order of first appearance; a later row of a key joins its leader's
    // group (a random read, but only for keys that come more than once).
    let n = incoming.len();
    let mut groups = Groups { groups: Vec::with_capacity(n), next: vec![NONE; n], stamp: Vec::new() };
    let mut group_of_leader = vec![NONE; n];
    for (row, (&lead, &l)) in matches.leader.iter().zip(&matches.local).enumerate() {
        let row = row as u32;
        if lead == row {
            group_of_leader[row as usize] = groups.groups.len() as u32;
            groups.groups.push(Group { first: row, last: row, local: (l != NONE).then_some(l) });
        } else {
            let g = &mut groups.groups[group_of_leader[lead as usize] as usize];
            groups.next[g.last as usize] = row;
            g.last = row;
        }
    }
    // The local rows' stamps, gathered in one tight loop, where their random reads
    // overlap far better than in the decisions.
    if let Some(stamps) = local_stamps {
        let stamp = |l: u32| if l == NONE { LocalStamp::default() } else { stamps[l as usize] };
        groups.stamp = matches.local.iter().map(|&l| stamp(l)).collect();
    }
    Ok(groups)
}

/// A field-wise merged row: where its row-level part and each data column come from.
#[derive(Clone)]
struct Acc {
    row: V,
    cols: Vec<V>,
}

/// Everything the per-key merge reads, prepared once per call.
struct Ctx<'a> {
    mode: MergeMode,
    batches: [&'a RecordBatch; 2],
    hlc: [&'a [i64]; 2],
    /// `rank[side][row]`: the row's node id (`_node`) as its rank among all node
    /// ids (`node_ranks`), so that comparing nodes reads no strings.
    rank: [Vec<u32>; 2],
    /// `node_names[rank]`: the node ids.
    node_names: StringArray,
    base: [&'a Int64Array; 2],
    /// `cmp[col][a_side * 2 + b_side]` compares values of column `col` across sides.
    cmp: Vec<[DynComparator; 4]>,
    /// `eq[d]`: typed equality of data column number `d`, for logging conflicts.
    eq: Vec<ValueEq>,
    /// Columns that break (hlc, node) ties, in schema order: all others in record
    /// mode, the row-level ones in field mode; but the key, which is the same in
    /// every pair of versions compared.
    tie_cols: Vec<usize>,
    /// Data columns (neither key nor `_`-prefixed) and, in field mode, their stamps.
    data_cols: Vec<usize>,
    /// Field mode: `stamps[d][side]` is the stamp column of data column `d`.
    stamps: Vec<[&'a Int64Array; 2]>,
    stamp_idx: Vec<usize>,
    data_names: Vec<String>,
}

impl<'a> Ctx<'a> {
    fn new(local: &'a RecordBatch, incoming: &'a RecordBatch, key: &str, mode: MergeMode) -> Result<Self> {
        let schema = incoming.schema();
        let idx = |name: &str, why: &str| {
            schema.index_of(name).map_err(|_| invalid(format!("merge needs a {name:?} column ({why}); it is missing")))
        };
        for reserved in [WINNER_HLC, WINNER_NODE, LOST_COLUMNS] {
            if schema.index_of(reserved).is_ok() {
                return Err(invalid(format!(
                    "column name {reserved:?} is reserved for the conflict output of merge; rename the column"
                )));
            }
        }
        let key_idx = idx(key, "the key")?;
        let (hlc_idx, node_idx, base_idx) = (
            idx(HLC, "the version's HLC stamp")?,
            idx(NODE, "the node that wrote the version")?,
            idx(BASE_HLC, "the stamp the version was derived from")?,
        );
        let batches = [local, incoming];
        let int64 = |b: &'a RecordBatch, c: usize, allow_null: bool| -> Result<&'a Int64Array> {
            let col = b.column(c);
            let arr = col.as_any().downcast_ref::<Int64Array>().ok_or_else(|| {
                CoreError::UnsupportedType(format!(
                    "column {:?} must be int64, got {}",
                    b.schema().field(c).name(),
                    col.data_type()
                ))
            })?;
            if !allow_null && arr.null_count() > 0 {
                return Err(invalid(format!(
                    "column {:?} has null stamps; every version needs one",
                    b.schema().field(c).name()
                )));
            }
            Ok(arr)
        };
        let node = |b: &'a RecordBatch| -> Result<&'a ArrayRef> {
            let col = b.column(node_idx);
            if col.null_count() > 0 {
                return Err(invalid(format!("column {NODE:?} has nulls; every version needs the node that wrote it")));
            }
            match col.data_type() {
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(col),
                other => Err(CoreError::UnsupportedType(format!("column {NODE:?} must be a string, got {other}"))),
            }
        };
        let hlc = [int64(local, hlc_idx, false)?.values().as_ref(), int64(incoming, hlc_idx, false)?.values().as_ref()];
        let (rank, node_names) = node_ranks([node(local)?, node(incoming)?])?;
        let base = [int64(local, base_idx, true)?, int64(incoming, base_idx, true)?];

        let names: Vec<&String> = schema.fields().iter().map(|f| f.name()).collect();
        let data_cols: Vec<usize> = (0..names.len()).filter(|&c| c != key_idx && !names[c].starts_with('_')).collect();
        let (mut stamps, mut stamp_idx) = (Vec::new(), Vec::new());
        if mode == MergeMode::Field {
            for &c in &data_cols {
                let s = idx(&format!("{COLUMN_HLC_PREFIX}{}", names[c]), "field-wise stamp of a data column")?;
                stamps.push([int64(local, s, true)?, int64(incoming, s, true)?]);
                stamp_idx.push(s);
            }
        }
        let tie_cols: Vec<usize> = (0..names.len())
            .filter(|&c| c != hlc_idx && c != node_idx && c != key_idx)
            .filter(|c| mode == MergeMode::Record || (!data_cols.contains(c) && !stamp_idx.contains(c)))
            .collect();
        let mut cmp = Vec::with_capacity(names.len());
        for (c, name) in names.iter().enumerate() {
            let (l, i) = (local.column(c).as_ref(), incoming.column(c).as_ref());
            let make = |a: &dyn Array, b: &dyn Array| {
                make_comparator(a, b, VALUE_ORDER)
                    .map_err(|e| CoreError::UnsupportedType(format!("column {name:?} cannot be compared: {e}")))
            };
            cmp.push([make(l, l)?, make(l, i)?, make(i, l)?, make(i, i)?]);
        }
        let eq = data_cols.iter().map(|&c| ValueEq::new([local.column(c), incoming.column(c)])).collect();
        Ok(Self {
            mode,
            batches,
            eq,
            hlc,
            rank,
            node_names,
            base,
            cmp,
            tie_cols,
            data_names: data_cols.iter().map(|&c| names[c].clone()).collect(),
            data_cols,
            stamps,
            stamp_idx,
        })
    }

    /// Read what the decisions read first of the local rows of a batch of groups.
    /// These are random reads into the local batch; issued together, their cache
    /// misses overlap instead of stalling each decision in turn (a software
    /// prefetch in safe code: `black_box` keeps the otherwise unused loads).
    fn warm_local_rows(&self, batch: &[Group]) {
        let mut sink = 0i64;
        for l in batch.iter().filter_map(|g| g.local) {
            let l = l as usize;
            sink ^= self.hlc[LOCAL][l] ^ self.base[LOCAL].values()[l];
            // The node id's rank: `sequential` compares them.
            sink ^= self.rank[LOCAL][l] as i64;
            // Field mode compares every column's stamp: without this, each is a
            // cache miss of its own, taken one after another (half the time of an
            // apply-shaped field merge).
            for stamps in &self.stamps {
                sink ^= stamps[LOCAL].values()[l];
            }
        }
        std::hint::black_box(sink);
    }

    fn hlc(&self, v: V) -> i64 {
        self.hlc[v.side()][v.row()]
    }

    /// `_base_hlc`, None when null.
    fn base(&self, v: V) -> Option<i64> {
        let a = self.base[v.side()];
        a.is_valid(v.row()).then(|| a.value(v.row()))
    }

    /// The stamp of data column number `d`, None when null.
    fn stamp(&self, v: V, d: usize) -> Option<i64> {
        let a = self.stamps[d][v.side()];
        a.is_valid(v.row()).then(|| a.value(v.row()))
    }

    fn cmp_col(&self, c: usize, a: V, b: V) -> Ordering {
        (self.cmp[c][a.side() * 2 + b.side()])(a.row(), b.row())
    }

    fn rank(&self, v: V) -> u32 {
        self.rank[v.side()][v.row()]
    }

    /// Order by (hlc, node) only.
    fn stamp_order(&self, a: V, b: V) -> Ordering {
        self.hlc(a).cmp(&self.hlc(b)).then_with(|| self.rank(a).cmp(&self.rank(b)))
    }

    /// Record mode: the full row order; field mode: the row-level order.
    fn version_order(&self, a: V, b: V) -> Ordering {
        self.stamp_order(a, b).then_with(|| {
            for &c in &self.tie_cols {
                let o = self.cmp_col(c, a, b);
                if o != Ordering::Equal {
                    return o;
                }
            }
            Ordering::Equal
        })
    }

    /// The full row order of record mode, used to sort versions before folding.
    fn full_order(&self, a: V, b: V) -> Ordering {
        self.stamp_order(a, b).then_with(|| {
            (0..self.cmp.len())
                .map(|c| self.cmp_col(c, a, b))
                .find(|o| *o != Ordering::Equal)
                .unwrap_or(Ordering::Equal)
        })
    }

    /// Field mode: order of data column number `d` by (stamp, value). A null stamp
    /// sorts below every stamp (`None < Some`), so the order stays total on what is
    /// stored: a null stamp and a 0 stamp are different contents.
    fn column_order(&self, d: usize, a: V, b: V) -> Ordering {
        self.stamp(a, d).cmp(&self.stamp(b, d)).then_with(|| self.cmp_col(self.data_cols[d], a, b))
    }

    /// Whether `w` (the greater by (hlc, node)) follows `l` without a conflict.
    fn sequential(&self, w: V, l: V) -> bool {
        self.base(w) == Some(self.hlc(l)) || self.rank(w) == self.rank(l)
    }

    /// What record mode decides on of local row `r`.
    fn local_stamp(&self, r: usize) -> LocalStamp {
        let base = self.base[LOCAL];
        LocalStamp {
            hlc: self.hlc[LOCAL][r],
            base: base.values()[r],
            node: self.rank[LOCAL][r],
            has_base: base.is_valid(r),
        }
    }

    /// `local_stamp` of every local row, in row order: a key's is then one read
    /// (`LocalStamp` packs what is in three columns).
    fn local_stamps(&self) -> Vec<LocalStamp> {
        (0..self.hlc[LOCAL].len()).map(|r| self.local_stamp(r)).collect()
    }

    /// Record mode, a key with one incoming version (incoming row `first`), decided on
    /// the local row's stamp; the same as the general fold over the two versions.
    fn decide_record(&self, local: Option<(u32, LocalStamp)>, first: u32, out: &mut Output) {
        let inc = V::incoming(first);
        let Some((l, st)) = local else {
            return out.write_record(inc, None);
        };
        let loc = V::local(l);
        let (hlc, node) = (self.hlc(inc), self.rank(inc));
        let local_base = st.has_base.then_some(st.base);
        match hlc.cmp(&st.hlc).then(node.cmp(&st.node)) {
            Ordering::Greater => {
                // `record_conflict(loc, inc)`: concurrent unless `inc` follows `loc`.
                if self.base(inc) != Some(st.hlc) && node != st.node {
                    out.concurrent.push((loc, inc));
                }
                out.write_record(inc, Some(l));
            }
            Ordering::Less => {
                if local_base != Some(hlc) && node != st.node {
                    out.concurrent.push((inc, loc));
                }
            }
            // The same (hlc, node) is never a conflict; the other columns decide
            // (`full_order`), later, for all such keys at once (`incoming_wins_ties`).
            Ordering::Equal => out.ties.push((first, l)),
        }
    }

    fn merge_group(
        &self,
        local: Option<u32>,
        first: u32,
        next: &[u32],
        scratch: &mut Vec<V>,
        acc: &mut Acc,
        out: &mut Output,
    ) {
        if next[first as usize] == NONE {
            // The common case, kept free of sorting and allocation: one incoming version.
            return match self.mode {
                MergeMode::Record => self.decide_record(local.map(|l| (l, self.local_stamp(l as usize))), first, out),
                MergeMode::Field => self.merge_single(local.map(V::local), V::incoming(first), acc, out),
            };
        }
        scratch.clear();
        scratch.extend(local.map(V::local));
        let mut row = first;
        while row != NONE {
            scratch.push(V::incoming(row));
            row = next[row as usize];
        }
        // Local first, then a stable sort: among equal versions the local one stays first.
        scratch.sort_by(|a, b| self.full_order(*a, *b));
        let loc = local.map(V::local);
        match self.mode {
            MergeMode::Record => {
                for pair in scratch.windows(2) {
                    self.record_conflict(pair[0], pair[1], out);
                }
                let winner = *scratch.last().unwrap();
                match loc {
                    Some(l) if self.full_order(winner, l) != Ordering::Greater => {}
                    _ => out.write_record(winner, local),
                }
            }
            MergeMode::Field => {
                acc.row = scratch[0];
                acc.cols.clear();
                acc.cols.resize(self.data_cols.len(), scratch[0]);
                for &b in &scratch[1..] {
                    self.field_conflict(acc, b, out);
                    if self.version_order(b, acc.row) == Ordering::Greater {
                        acc.row = b;
                    }
                    for d in 0..acc.cols.len() {
                        if self.column_order(d, b, acc.cols[d]) == Ordering::Greater {
                            acc.cols[d] = b;
                        }
                    }
                }
                // A copy of one incoming version: every part is it, or equal to it.
                let cand = acc.row;
                let copy = cand.side() == INCOMING
                    && (0..acc.cols.len())
                        .all(|d| acc.cols[d] == cand || self.column_order(d, cand, acc.cols[d]) == Ordering::Equal);
                let source = copy.then_some(cand.row() as u32);
                match loc {
                    None => out.write_field(acc, None, source),
                    Some(l) => {
                        // Parts equal to the local row's are taken from it, so "nothing
                        // changed" is simply "every part is local".
                        if self.version_order(acc.row, l) == Ordering::Equal {
                            acc.row = l;
                        }
                        for d in 0..acc.cols.len() {
                            if self.column_order(d, acc.cols[d], l) == Ordering::Equal {
                                acc.cols[d] = l;
                            }
                        }
                        if acc.row != l || acc.cols.iter().any(|c| *c != l) {
                            out.write_field(acc, local, source);
                        }
                    }
                }
            }
        }
    }

    /// Field mode: merge one incoming version with the local row, if any. Same result
    /// as the general fold over the two versions, without sorting them.
    fn merge_single(&self, loc: Option<V>, inc: V, acc: &mut Acc, out: &mut Output) {
        let Some(loc) = loc else {
            acc.row = inc;
            acc.cols.clear();
            acc.cols.resize(self.data_cols.len(), inc);
            return out.write_field(acc, None, Some(inc.row() as u32));
        };
        // Start from the local row; take each part the incoming version wins strictly
        // (ties keep the local part, so "unchanged" is "all local").
        acc.row = loc;
        acc.cols.clear();
        acc.cols.resize(self.data_cols.len(), loc);
        self.field_conflict(acc, inc, out);
        // `copy`: every part is the incoming one or equal to it.
        let (mut changed, mut copy) = (false, true);
        match self.version_order(inc, loc) {
            Ordering::Greater => {
                acc.row = inc;
                changed = true;
            }
            Ordering::Less => copy = false,
            Ordering::Equal => {}
        }
        for d in 0..acc.cols.len() {
            match self.column_order(d, inc, loc) {
                Ordering::Greater => {
                    acc.cols[d] = inc;
                    changed = true;
                }
                Ordering::Less => copy = false,
                Ordering::Equal => {}
            }
        }
        if changed {
            out.write_field(acc, Some(loc.row() as u32), copy.then_some(inc.row() as u32));
        }
    }

    /// Record mode: `w` >= `l` in row order; log `l` if the edits were concurrent.
    fn record_conflict(&self, l: V, w: V, out: &mut Output) {
        if self.stamp_order(l, w) == Ordering::Equal || self.sequential(w, l) {
            return;
        }
        // The lost columns are found later, for all pairs at once (`record_conflicts`).
        out.concurrent.push((l, w));
    }

    /// Field mode: check the merged-so-far row `acc` against the next version `b`.
    fn field_conflict(&self, acc: &Acc, b: V, out: &mut Output) {
        let a = acc.row;
        let (w, l) = match self.stamp_order(a, b) {
            Ordering::Equal => return,
            Ordering::Greater => (a, b),
            Ordering::Less => (b, a),
        };
        if self.sequential(w, l) {
            return;
        }
        let (base_a, base_b) = (self.base(a).unwrap_or(0), self.base(b).unwrap_or(0));
        let (mut lost_a, mut lost_b) = (Vec::new(), Vec::new());
        for (d, &src) in acc.cols.iter().enumerate() {
            let changed = |v: V, base: i64| self.stamp(v, d).unwrap_or(0) > base;
            let both_changed = changed(src, base_a) && changed(b, base_b);
            if !both_changed || self.eq[d].eq(src, b) {
                continue;
            }
            match self.column_order(d, src, b) {
                Ordering::Less => lost_a.push(d as u32),
                _ => lost_b.push(d as u32),
            }
        }
        if !lost_a.is_empty() {
            out.conflicts.push(Conflict { row: acc.clone(), winner: b, lost: lost_a });
        }
        if !lost_b.is_empty() {
            out.conflicts.push(Conflict { row: Acc { row: b, cols: Vec::new() }, winner: a, lost: lost_b });
        }
    }
}

/// Equality of two values of one column, on either side, as the column's
/// comparator would decide it (nulls equal each other; floats by bits, like
/// their total order), but read straight from the buffers for the usual types:
/// logging conflicts compares every data column of every concurrent pair.
struct ValueEq {
    nulls: [Option<NullBuffer>; 2],
    /// Fixed width: the values; strings and binaries: the value bytes.
    values: [Buffer; 2],
    /// Strings and binaries: the offsets (empty otherwise).
    offsets: [Buffer; 2],
    kind: EqKind,
    /// The comparators of the column (`[a_side * 2 + b_side]`), for other types.
    fallback: Option<[DynComparator; 4]>,
}

#[derive(Clone, Copy)]
enum EqKind {
    /// Fixed-width values of this many bytes.
    Fixed(usize),
    /// Strings and binaries with 32-bit offsets.
    Bytes32,
    /// Strings and binaries with 64-bit offsets.
    Bytes64,
    Other,
}

impl ValueEq {
    fn new(columns: [&ArrayRef; 2]) -> Self {
        let kind = match columns[0].data_type() {
            DataType::Utf8 | DataType::Binary => EqKind::Bytes32,
            DataType::LargeUtf8 | DataType::LargeBinary => EqKind::Bytes64,
            DataType::Boolean => EqKind::Other,
            t => t.primitive_width().map_or(EqKind::Other, EqKind::Fixed),
        };
        // Buffers that start at the column's first value (columns may be slices).
        let buffers = |col: &ArrayRef| -> (Buffer, Buffer) {
            let data = col.to_data();
            let (at, n) = (data.offset(), data.len());
            match kind {
                EqKind::Fixed(w) => {
                    (data.buffers()[0].slice_with_length(at * w, n * w), Buffer::from(Vec::<u8>::new()))
                }
                EqKind::Bytes32 => {
                    (data.buffers()[1].clone(), data.buffers()[0].slice_with_length(at * 4, (n + 1) * 4))
                }
                EqKind::Bytes64 => {
                    (data.buffers()[1].clone(), data.buffers()[0].slice_with_length(at * 8, (n + 1) * 8))
                }
                EqKind::Other => (Buffer::from(Vec::<u8>::new()), Buffer::from(Vec::<u8>::new())),
            }
        };
        let [(v0, o0), (v1, o1)] = columns.map(buffers);
        let fallback = matches!(kind, EqKind::Other).then(|| {
            let make = |a: &ArrayRef, b: &ArrayRef| {
                make_comparator(a.as_ref(), b.as_ref(), VALUE_ORDER).expect("comparable: checked in Ctx::new")
            };
            let [l, i] = columns;
            [make(l, l), make(l, i), make(i, l), make(i, i)]
        });
        Self { nulls: columns.map(|c| c.logical_nulls()), values: [v0, v1], offsets: [o0, o1], kind, fallback }
    }

    fn eq(&self, a: V, b: V) -> bool {
        let null = |v: V| self.nulls[v.side()].as_ref().is_some_and(|n| n.is_null(v.row()));
        let (na, nb) = (null(a), null(b));
        if na || nb {
            return na == nb;
        }
        match self.kind {
            // The usual widths as one load each, not a `memcmp` of `w` bytes.
            EqKind::Fixed(8) => self.word::<8>(a) == self.word::<8>(b),
            EqKind::Fixed(4) => self.word::<4>(a) == self.word::<4>(b),
            EqKind::Fixed(w) => self.fixed(a, w) == self.fixed(b, w),
            EqKind::Bytes32 => self.bytes::<i32>(a) == self.bytes::<i32>(b),
            EqKind::Bytes64 => self.bytes::<i64>(a) == self.bytes::<i64>(b),
            EqKind::Other => {
                let cmp = self.fallback.as_ref().expect("made for other types");
                cmp[a.side() * 2 + b.side()](a.row(), b.row()) == Ordering::Equal
            }
        }
    }

    #[inline]
    fn word<const W: usize>(&self, v: V) -> [u8; W] {
        self.values[v.side()].as_slice()[v.row() * W..(v.row() + 1) * W].try_into().expect("W bytes")
    }

    fn fixed(&self, v: V, width: usize) -> &[u8] {
        &self.values[v.side()].as_slice()[v.row() * width..(v.row() + 1) * width]
    }

    fn bytes<O: OffsetSizeTrait>(&self, v: V) -> &[u8] {
        let offsets = self.offsets[v.side()].typed_data::<O>();
        &self.values[v.side()].as_slice()[offsets[v.row()].as_usize()..offsets[v.row() + 1].as_usize()]
    }
}

/// Field mode: a losing row found while deciding (record mode keeps only the
/// `(loser, winner)` pairs, and finds the lost columns after, `record_conflicts`).
struct Conflict {
    /// The losing side's row, possibly assembled from several versions.
    row: Acc,
    /// The version on the other side of the pair.
    winner: V,
    /// Positions in `Ctx::data_cols` of the lost columns.
    lost: Vec<u32>,
}

/// Output under construction: sources of every output row, then assembled per column.
struct Output {
    /// Row-level source of each output row.
    rows: Vec<V>,
    /// Field mode: source of each data column of each output row, `[row][d]` flattened.
    cols: Vec<V>,
    /// Local row of each output row's key (`NONE` if none), and the incoming row it
    /// copies (`NONE` if it mixes versions).
    local: Vec<u32>,
    source: Vec<u32>,
    /// Field mode: the losing rows.
    conflicts: Vec<Conflict>,
    /// Record mode: concurrent `(loser, winner)` pairs not yet in `conflicts`.
    concurrent: Vec<(V, V)>,
    /// Record mode: `(incoming, local)` rows of keys with one incoming version whose
    /// `(hlc, node)` equals the local row's (usually a re-delivery of the same row).
    ties: Vec<(u32, u32)>,
}

impl Output {
    fn new(ctx: &Ctx, n: usize) -> Self {
        Self {
            rows: Vec::with_capacity(n),
            cols: Vec::with_capacity(if ctx.mode == MergeMode::Field { n * ctx.data_cols.len() } else { 0 }),
            local: Vec::with_capacity(n),
            source: Vec::with_capacity(n),
            conflicts: Vec::new(),
            concurrent: Vec::new(),
            ties: Vec::new(),
        }
    }

    /// Join per-thread outputs, in order.
    fn concat(ctx: &Ctx, parts: Vec<Output>) -> Output {
        let mut parts = parts.into_iter();
        let mut out = parts.next().unwrap_or_else(|| Output::new(ctx, 0));
        for p in parts {
            out.rows.extend(p.rows);
            out.cols.extend(p.cols);
            out.local.extend(p.local);
            out.source.extend(p.source);
            out.conflicts.extend(p.conflicts);
            out.concurrent.extend(p.concurrent);
            out.ties.extend(p.ties);
        }
        out
    }

    /// Record mode: the winner written is always an incoming version.
    fn write_record(&mut self, v: V, local: Option<u32>) {
        self.rows.push(v);
        self.local.push(local.unwrap_or(NONE));
        self.source.push(v.row() as u32);
    }

    fn write_field(&mut self, acc: &Acc, local: Option<u32>, source: Option<u32>) {
        self.rows.push(acc.row);
        self.cols.extend_from_slice(&acc.cols);
        self.local.push(local.unwrap_or(NONE));
        self.source.push(source.unwrap_or(NONE));
    }

    /// Record mode: put the written rows in incoming order. Each is a copy of one
    /// incoming row, so the output columns are then a `filter` of the incoming ones,
    /// which copies runs of rows at once, instead of a row-by-row `take` (the order
    /// of first appearance puts a key's later version out of order).
    fn put_in_incoming_order(&mut self, n_incoming: usize) {
        debug_assert!(self.rows.iter().all(|v| v.side() == INCOMING));
        let increasing = self.rows.windows(2).all(|w| w[0].row() < w[1].row());
        if increasing {
            return;
        }
        let mut local_of = vec![NONE; n_incoming];
        let mut written = vec![false; n_incoming];
        for (v, &l) in self.rows.iter().zip(&self.local) {
            written[v.row()] = true;
            local_of[v.row()] = l;
        }
        let rows: Vec<u32> = (0..n_incoming as u32).filter(|&r| written[r as usize]).collect();
        self.local = rows.iter().map(|&r| local_of[r as usize]).collect();
        self.rows = rows.iter().map(|&r| V::incoming(r)).collect();
        self.source = rows;
    }

    /// Field mode: the conflict batch of the losing rows logged while deciding.
    fn field_conflicts(&self, ctx: &Ctx, schema: &SchemaRef) -> Result<RecordBatch> {
        let sources: Vec<V> = self.conflicts.iter().map(|c| c.row.row).collect();
        let columns = assemble(
            ctx,
            &sources,
            |c| column_part(ctx, c),
            |part, r| {
                let row = &self.conflicts[r].row;
                match part {
                    Some(d) if !row.cols.is_empty() => row.cols[d],
                    _ => row.row,
                }
            },
        )?;
        let winners: Vec<V> = self.conflicts.iter().map(|c| c.winner).collect();
        let lost = self.conflicts.iter().map(|c| c.lost.iter().map(|&d| d as usize));
        conflict_batch(ctx, schema, columns, &winners, lost)
    }

    fn finish(mut self, ctx: &Ctx, keys: usize) -> Result<MergeOutput> {
        if ctx.mode == MergeMode::Record {
            let ties = std::mem::take(&mut self.ties);
            for (&(inc, loc), wins) in ties.iter().zip(incoming_wins_ties(ctx, &ties)?) {
                if wins {
                    self.write_record(V::incoming(inc), Some(loc));
                }
            }
            self.put_in_incoming_order(ctx.batches[INCOMING].num_rows());
        }
        let schema = union_nullability(&ctx.batches[LOCAL].schema(), &ctx.batches[INCOMING].schema());
        let nd = ctx.data_cols.len();
        let rows_cols = assemble(
            ctx,
            &self.rows,
            |c| column_part(ctx, c),
            |part, r| {
                if ctx.mode == MergeMode::Field {
                    part.map_or(self.rows[r], |d| self.cols[r * nd + d])
                } else {
                    self.rows[r]
                }
            },
        )?;
        let rows = RecordBatch::try_new(schema.clone(), rows_cols)?;

        let conflicts = match ctx.mode {
            MergeMode::Record => record_conflicts(ctx, &schema, &self.concurrent)?,
            MergeMode::Field => self.field_conflicts(ctx, &schema)?,
        };
        let inserted =
            BooleanArray::new(BooleanBuffer::collect_bool(self.local.len(), |r| self.local[r] == NONE), None);
        Ok(MergeOutput {
            rows,
            inserted,
            local_row: optional_rows(self.local),
            source: optional_rows(self.source),
            conflicts,
            keys,
        })
    }
}

/// The conflict batch: the losing rows' `columns` (input schema) with the stamp and
/// node of the other side of each pair and the names of the lost data columns.
fn conflict_batch<L: IntoIterator<Item = usize>>(
    ctx: &Ctx,
    schema: &SchemaRef,
    mut columns: Vec<ArrayRef>,
    winners: &[V],
    lost: impl Iterator<Item = L>,
) -> Result<RecordBatch> {
    let winner_hlc = Int64Array::from_iter_values(winners.iter().map(|&w| ctx.hlc(w)));
    let ranks = UInt32Array::from_iter_values(winners.iter().map(|&w| ctx.rank(w)));
    let winner_node = take(&ctx.node_names, &ranks, None)?;
    // `_lost_columns`: the names, taken from the list of data column names.
    let (mut offsets, mut which) = (vec![0i32], Vec::new());
    for columns_lost in lost {
        which.extend(columns_lost.into_iter().map(|d| d as u32));
        offsets.push(which.len() as i32);
    }
    let data_names = StringArray::from_iter_values(&ctx.data_names);
    let names = ListArray::new(
        Arc::new(Field::new_list_field(DataType::Utf8, true)),
        OffsetBuffer::new(offsets.into()),
        take(&data_names, &UInt32Array::from(which), None)?,
        None,
    );
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(WINNER_HLC, DataType::Int64, false));
    fields.push(Field::new(WINNER_NODE, DataType::Utf8, false));
    fields.push(Field::new(LOST_COLUMNS, names.data_type().clone(), false));
    columns.push(Arc::new(winner_hlc));
    columns.push(winner_node);
    columns.push(Arc::new(names));
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
}

/// Record mode: the conflict batch of the concurrent `(loser, winner)` pairs found
/// while deciding: each loser's row with the data columns where it differs from its
/// winner, unless it differs in none. Built a column at a time: the rows the pairs
/// name are read from each side in row order (`Picks`, so the reads run forward
/// through memory), the losers' and the winners' values are gathered from those
/// (`interleave`) and compared (`distinct`); the losers' values are then the output
/// column (kept to the pairs that differ), and the other columns are gathered for
/// the kept pairs only. Rows come in the order of `pairs`.
fn record_conflicts(ctx: &Ctx, schema: &SchemaRef, pairs: &[(V, V)]) -> Result<RecordBatch> {
    let ncols = ctx.batches[INCOMING].num_columns();
    let nd = ctx.data_cols.len();
    let per_thread = if pairs.len() >= PARALLEL_MIN_KEYS / 4 { 1 } else { usize::MAX };
    // Losers are picks 0..n, winners n..2n.
    let n = pairs.len();
    let rows = [ctx.batches[LOCAL].num_rows(), ctx.batches[INCOMING].num_rows()];
    let picks: Vec<(usize, usize)> =
        pairs.iter().map(|p| p.0).chain(pairs.iter().map(|p| p.1)).map(|v| (v.side(), v.row())).collect();
    let picks = Picks::new(rows, &picks);
    let (losers, winners) = (picks.places(0..n), picks.places(n..2 * n));
    let read = |c: usize| picks.read([ctx.batches[LOCAL].column(c), ctx.batches[INCOMING].column(c)]);
    // Per data column: the losers' values, and which of them differ from the winners'.
    let data: Vec<(ArrayRef, BooleanBuffer)> = par_map(nd, per_thread, |d| -> Result<_> {
        let [local, incoming] = read(ctx.data_cols[d])?;
        let sides = [local.as_ref(), incoming.as_ref()];
        let lost = interleave(sides, &losers)?;
        // `distinct` is null-aware (two nulls are equal) and compares floats by their
        // bits, as `ValueEq` does; types it does not cover are compared pair by pair.
        let differs = match distinct(&lost, &interleave(sides, &winners)?) {
            Ok(mask) => mask.values().clone(),
            Err(_) => pairs.iter().map(|&(l, w)| !ctx.eq[d].eq(l, w)).collect(),
        };
        Ok((lost, differs))
    })
    .into_iter()
    .collect::<Result<_>>()?;
    let any = data.iter().fold(BooleanBuffer::new_unset(pairs.len()), |a, (_, b)| &a | b);
    let kept: Vec<usize> = any.set_indices().collect();
    let all_kept = kept.len() == pairs.len();
    let keep = Selection::new(pairs.len(), kept.iter().map(|&p| p as u32).collect());
    let kept_losers = picks.places(kept.iter().copied());
    let columns: Vec<ArrayRef> = par_map(ncols, per_thread, |c| match ctx.data_cols.iter().position(|&x| x == c) {
        Some(d) if all_kept => Ok(data[d].0.clone()),
        Some(d) => keep.apply(&data[d].0),
        None => {
            let [local, incoming] = read(c)?;
            interleave([local.as_ref(), incoming.as_ref()], &kept_losers)
        }
    })
    .into_iter()
    .collect::<Result<_>>()?;
    let kept_winners: Vec<V> = kept.iter().map(|&p| pairs[p].1).collect();
    let data = &data;
    let lost = kept.iter().map(|&p| (0..nd).filter(move |&d| data[d].1.value(p)));
    conflict_batch(ctx, schema, columns, &kept_winners, lost)
}

/// Record mode: whether the incoming row of each `(incoming, local)` pair of equal
/// `(hlc, node)` is the greater by the other columns in schema order (`full_order`).
/// Usually the rows are equal in every column, so every column is read: a column at a
/// time, the values of both sides are gathered with `take` (a tight loop over random
/// local rows, whose cache misses overlap, where comparing row by row took each
/// local column's miss in turn), then compared in order.
fn incoming_wins_ties(ctx: &Ctx, ties: &[(u32, u32)]) -> Result<Vec<bool>> {
    let mut wins = vec![false; ties.len()];
    let mut undecided: Vec<usize> = (0..ties.len()).collect();
    for &c in &ctx.tie_cols {
        if undecided.is_empty() {
            break;
        }
        let gather = |side: usize, row: fn(&(u32, u32)) -> u32| {
            let rows = UInt32Array::from_iter_values(undecided.iter().map(|&p| row(&ties[p])));
            take(ctx.batches[side].column(c), &rows, None)
        };
        let (incoming, local) = (gather(INCOMING, |t| t.0)?, gather(LOCAL, |t| t.1)?);
        let cmp = make_comparator(incoming.as_ref(), local.as_ref(), VALUE_ORDER)?;
        let mut i = 0;
        undecided.retain(|&p| {
            let order = cmp(i, i);
            i += 1;
            wins[p] = order == Ordering::Greater;
            order == Ordering::Equal
        });
    }
    Ok(wins)
}

/// Row numbers with `NONE` as null.
fn optional_rows(rows: Vec<u32>) -> UInt32Array {
    let valid = NullBuffer::new(BooleanBuffer::collect_bool(rows.len(), |r| rows[r] != NONE));
    let nulls = (valid.null_count() > 0).then_some(valid);
    UInt32Array::new(rows.into(), nulls)
}

/// Field mode: which data column (position in `data_cols`) column `c` belongs to,
/// as the value or as its stamp; None for row-level columns.
fn column_part(ctx: &Ctx, c: usize) -> Option<usize> {
    if ctx.mode != MergeMode::Field {
        return None;
    }
    ctx.data_cols.iter().position(|&x| x == c).or_else(|| ctx.stamp_idx.iter().position(|&x| x == c))
}

/// Build every output column from per-row sources. Columns of one part (the
/// row-level columns, or a data column with its stamp) share their sources, so each
/// part's index is built once: `take` when all its rows come from the incoming side
/// (the usual case), `interleave` otherwise.
fn assemble(
    ctx: &Ctx,
    rows: &[V],
    part_of: impl Fn(usize) -> Option<usize>,
    source: impl Fn(Option<usize>, usize) -> V + Sync,
) -> Result<Vec<ArrayRef>> {
    enum Index {
        /// Every incoming row, in order: the columns are shared, not copied.
        All,
        /// Incoming rows in increasing order, copied by select.rs (the selection's
        /// runs and bit mask are found once, for every column of the part).
        Select(Selection),
        Take(UInt32Array),
        Interleave(Vec<(usize, usize)>),
    }
    let n_incoming = ctx.batches[INCOMING].num_rows();
    let index_for = |part: Option<usize>| {
        let all_incoming = (0..rows.len()).all(|r| source(part, r).side() == INCOMING);
        if all_incoming {
            // Keys seen once each come out in incoming order: most applies write a
            // subsequence of the incoming rows, often all of them.
            let increasing = (1..rows.len()).all(|r| source(part, r - 1).row() < source(part, r).row());
            if increasing && rows.len() == n_incoming {
                Index::All
            } else if increasing {
                Index::Select(Selection::new(
                    n_incoming,
                    (0..rows.len()).map(|r| source(part, r).row() as u32).collect(),
                ))
            } else {
                Index::Take(UInt32Array::from_iter_values((0..rows.len()).map(|r| source(part, r).row() as u32)))
            }
        } else {
            Index::Interleave((0..rows.len()).map(|r| source(part, r)).map(|v| (v.side(), v.row())).collect())
        }
    };
    let ncols = ctx.batches[INCOMING].num_columns();
    let column_parts: Vec<Option<usize>> = (0..ncols).map(&part_of).collect();
    let mut distinct: Vec<Option<usize>> = column_parts.clone();
    distinct.sort_unstable();
    distinct.dedup();
    // Parts, then columns, are independent: on large outputs, spread them over threads.
    let per_thread = if rows.len() >= PARALLEL_MIN_KEYS { 1 } else { usize::MAX };
    let indexes: Vec<Index> = par_map(distinct.len(), per_thread, |p| index_for(distinct[p]));
    let index_of = |c: usize| &indexes[distinct.binary_search(&column_parts[c]).expect("part listed")];
    let out: Vec<Result<ArrayRef>> = par_map(ncols, per_thread, |c| {
        Ok(match index_of(c) {
            Index::All => ctx.batches[INCOMING].column(c).clone(),
            Index::Select(selection) => selection.apply(ctx.batches[INCOMING].column(c))?,
            Index::Take(idx) => take(ctx.batches[INCOMING].column(c), idx, None)?,
            Index::Interleave(idx) => {
                let arrays = [ctx.batches[LOCAL].column(c).as_ref(), ctx.batches[INCOMING].column(c).as_ref()];
                interleave(arrays, idx)?
            }
        })
    });
    out.into_iter().collect()
}
