//! Merge of local rows and incoming versions of one table: whole-record or
//! field-wise last-writer-wins on hybrid logical clocks, with a conflict batch
//! holding the losing values of every concurrent edit. The rules, and why they
//! make merge commutative, associative and idempotent, are in docs/semantics.md.

use std::cmp::Ordering;
use std::hash::Hash;
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray, UInt32Array};
use arrow_ord::ord::{make_comparator, DynComparator};
use arrow_schema::{DataType, Field, Schema, SortOptions};
use arrow_select::interleave::interleave;
use arrow_select::take::take;

use crate::error::{invalid, CoreError, Result};
use crate::keys::{read_keys, FirstSeen, KeyIndex, KeyValues};
use crate::parallel::{par_map, par_ranges};
use crate::schema::{require_same_columns, union_nullability};

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
    /// Merged rows that differ from the local rows (or are new), input schema.
    pub rows: RecordBatch,
    /// One per row of `rows`: the key had no local row.
    pub inserted: BooleanArray,
    /// The losing side of every concurrent edit, with `_winner_hlc`, `_winner_node`
    /// and `_lost_columns`.
    pub conflicts: RecordBatch,
}

const LOCAL: usize = 0;
const INCOMING: usize = 1;

/// Each thread gets at least this many keys (below that, one thread is faster).
const PARALLEL_MIN_KEYS: usize = 64 * 1024;

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
    let groups = match (read_keys(local, key, "local")?, read_keys(incoming, key, "incoming")?) {
        (KeyValues::Bytes(l), KeyValues::Bytes(i)) => group(&l, &i, key)?,
        (KeyValues::Int(l), KeyValues::Int(i)) => group(&l, &i, key)?,
        (KeyValues::Uuid(l), KeyValues::Uuid(i)) => group(&l, &i, key)?,
        _ => return Err(invalid("key columns of local and incoming differ in type")),
    };
    // Keys are independent: decide contiguous ranges of groups on separate threads,
    // then join the outputs in group order (= order of first appearance).
    let parts = par_ranges(groups.groups.len(), PARALLEL_MIN_KEYS, |start, len| {
        let mut out = Output::new(&ctx, len);
        // Buffers reused across keys: the versions of one key, and the merged row.
        let mut scratch = Vec::new();
        let mut acc = Acc { row: V::local(0), cols: Vec::with_capacity(ctx.data_cols.len()) };
        for g in &groups.groups[start..start + len] {
            ctx.merge_group(g.local, g.first, &groups.next, &mut scratch, &mut acc, &mut out);
        }
        out
    });
    Output::concat(&ctx, parts).finish(&ctx)
}

/// Incoming rows grouped by key, in order of first appearance, each with its local row.
struct Groups {
    groups: Vec<Group>,
    /// `next[i]`: the next incoming row with the same key as row `i`, or `u32::MAX`.
    next: Vec<u32>,
}

struct Group {
    first: u32,
    last: u32,
    local: Option<u32>,
}

fn group<K: Hash + Eq + Copy + Sync>(local: &[K], incoming: &[K], key: &str) -> Result<Groups> {
    let local_index = KeyIndex::unique(local, key, "local")?;
    let mut next = vec![u32::MAX; incoming.len()];
    let mut groups: Vec<Group> = Vec::with_capacity(incoming.len());
    // One probe of the local index per incoming row; only keys new to the local
    // side need a second table. Either way we learn the key's group, if it has one.
    let mut group_of_local = vec![u32::MAX; local.len()];
    let mut group_of_first = vec![u32::MAX; incoming.len()];
    // The probes only read the index: run them in parallel, assign groups after.
    let probes: Vec<Option<u32>> = par_map(incoming.len(), PARALLEL_MIN_KEYS, |row| local_index.get(&incoming[row]));
    // Sized from the misses, so the table of new keys never rehashes while growing.
    let mut new_keys = FirstSeen::new(incoming, probes.iter().filter(|p| p.is_none()).count());
    for row in 0..incoming.len() as u32 {
        let local_row = probes[row as usize];
        let existing = match local_row {
            Some(l) => group_of_local[l as usize],
            None => match new_keys.first_row(row) {
                first if first == row => u32::MAX,
                first => group_of_first[first as usize],
            },
        };
        if existing == u32::MAX {
            let g = groups.len() as u32;
            match local_row {
                Some(l) => group_of_local[l as usize] = g,
                None => group_of_first[row as usize] = g,
            }
            groups.push(Group { first: row, last: row, local: local_row });
        } else {
            let g = &mut groups[existing as usize];
            next[g.last as usize] = row;
            g.last = row;
        }
    }
    Ok(Groups { groups, next })
}

/// The node-id column, whichever string type it has.
enum NodeCol<'a> {
    Utf8(&'a StringArray),
    Large(&'a arrow_array::LargeStringArray),
    View(&'a arrow_array::StringViewArray),
}

impl NodeCol<'_> {
    fn get(&self, row: usize) -> &str {
        match self {
            Self::Utf8(a) => a.value(row),
            Self::Large(a) => a.value(row),
            Self::View(a) => a.value(row),
        }
    }
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
    node: [NodeCol<'a>; 2],
    base: [&'a Int64Array; 2],
    /// `cmp[col][a_side * 2 + b_side]` compares values of column `col` across sides.
    cmp: Vec<[DynComparator; 4]>,
    /// Columns that break (hlc, node) ties, in schema order: all others in record
    /// mode, the row-level ones in field mode.
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
        let node = |b: &'a RecordBatch| -> Result<NodeCol<'a>> {
            let col = b.column(node_idx);
            if col.null_count() > 0 {
                return Err(invalid(format!("column {NODE:?} has nulls; every version needs the node that wrote it")));
            }
            Ok(match col.data_type() {
                DataType::Utf8 => NodeCol::Utf8(col.as_string::<i32>()),
                DataType::LargeUtf8 => NodeCol::Large(col.as_string::<i64>()),
                DataType::Utf8View => NodeCol::View(col.as_string_view()),
                other => {
                    return Err(CoreError::UnsupportedType(format!("column {NODE:?} must be a string, got {other}")))
                }
            })
        };
        let hlc = [int64(local, hlc_idx, false)?.values().as_ref(), int64(incoming, hlc_idx, false)?.values().as_ref()];
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
            .filter(|&c| c != hlc_idx && c != node_idx)
            .filter(|c| mode == MergeMode::Record || (!data_cols.contains(c) && !stamp_idx.contains(c)))
            .collect();
        let opts = SortOptions { descending: false, nulls_first: true };
        let mut cmp = Vec::with_capacity(names.len());
        for (c, name) in names.iter().enumerate() {
            let (l, i) = (local.column(c).as_ref(), incoming.column(c).as_ref());
            let make = |a: &dyn Array, b: &dyn Array| {
                make_comparator(a, b, opts)
                    .map_err(|e| CoreError::UnsupportedType(format!("column {name:?} cannot be compared: {e}")))
            };
            cmp.push([make(l, l)?, make(l, i)?, make(i, l)?, make(i, i)?]);
        }
        Ok(Self {
            mode,
            batches,
            hlc,
            node: [node(local)?, node(incoming)?],
            base,
            cmp,
            tie_cols,
            data_names: data_cols.iter().map(|&c| names[c].clone()).collect(),
            data_cols,
            stamps,
            stamp_idx,
        })
    }

    fn hlc(&self, v: V) -> i64 {
        self.hlc[v.side()][v.row()]
    }

    fn node(&self, v: V) -> &str {
        self.node[v.side()].get(v.row())
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

    /// Order by (hlc, node) only.
    fn stamp_order(&self, a: V, b: V) -> Ordering {
        self.hlc(a).cmp(&self.hlc(b)).then_with(|| self.node(a).as_bytes().cmp(self.node(b).as_bytes()))
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
        self.base(w) == Some(self.hlc(l)) || self.node(w) == self.node(l)
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
        if next[first as usize] == u32::MAX {
            // The common case, kept free of sorting and allocation: one incoming version.
            return self.merge_single(local.map(V::local), V::incoming(first), acc, out);
        }
        scratch.clear();
        scratch.extend(local.map(V::local));
        let mut row = first;
        while row != u32::MAX {
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
                    None => out.write_record(winner, true),
                    Some(l) if self.full_order(winner, l) == Ordering::Greater => out.write_record(winner, false),
                    Some(_) => {}
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
                match loc {
                    None => out.write_field(acc, true),
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
                            out.write_field(acc, false);
                        }
                    }
                }
            }
        }
    }

    /// Merge one incoming version with the local row, if any. Same result as the
    /// general fold over the two versions, without sorting them.
    fn merge_single(&self, loc: Option<V>, inc: V, acc: &mut Acc, out: &mut Output) {
        let Some(loc) = loc else {
            match self.mode {
                MergeMode::Record => out.write_record(inc, true),
                MergeMode::Field => {
                    acc.row = inc;
                    acc.cols.clear();
                    acc.cols.resize(self.data_cols.len(), inc);
                    out.write_field(acc, true);
                }
            }
            return;
        };
        match self.mode {
            MergeMode::Record => match self.full_order(inc, loc) {
                Ordering::Greater => {
                    self.record_conflict(loc, inc, out);
                    out.write_record(inc, false);
                }
                Ordering::Less => self.record_conflict(inc, loc, out),
                Ordering::Equal => {}
            },
            MergeMode::Field => {
                // Start from the local row; take each part the incoming version wins
                // strictly (ties keep the local part, so "unchanged" is "all local").
                acc.row = loc;
                acc.cols.clear();
                acc.cols.resize(self.data_cols.len(), loc);
                self.field_conflict(acc, inc, out);
                let mut changed = false;
                if self.version_order(inc, loc) == Ordering::Greater {
                    acc.row = inc;
                    changed = true;
                }
                for d in 0..acc.cols.len() {
                    if self.column_order(d, inc, loc) == Ordering::Greater {
                        acc.cols[d] = inc;
                        changed = true;
                    }
                }
                if changed {
                    out.write_field(acc, false);
                }
            }
        }
    }

    /// Record mode: `w` >= `l` in row order; log `l` if the edits were concurrent.
    fn record_conflict(&self, l: V, w: V, out: &mut Output) {
        if self.stamp_order(l, w) == Ordering::Equal || self.sequential(w, l) {
            return;
        }
        let lost: Vec<u32> = (0..self.data_cols.len())
            .filter(|&d| self.cmp_col(self.data_cols[d], l, w) != Ordering::Equal)
            .map(|d| d as u32)
            .collect();
        if !lost.is_empty() {
            out.conflicts.push(Conflict { row: Acc { row: l, cols: Vec::new() }, winner: w, lost });
        }
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
            if !both_changed || self.cmp_col(self.data_cols[d], src, b) == Ordering::Equal {
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

struct Conflict {
    /// The losing side's row (field mode: possibly assembled from several versions).
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
    inserted: Vec<bool>,
    conflicts: Vec<Conflict>,
}

impl Output {
    fn new(ctx: &Ctx, n: usize) -> Self {
        Self {
            rows: Vec::with_capacity(n),
            cols: Vec::with_capacity(if ctx.mode == MergeMode::Field { n * ctx.data_cols.len() } else { 0 }),
            inserted: Vec::with_capacity(n),
            conflicts: Vec::new(),
        }
    }

    /// Join per-thread outputs, in order.
    fn concat(ctx: &Ctx, parts: Vec<Output>) -> Output {
        let mut parts = parts.into_iter();
        let mut out = parts.next().unwrap_or_else(|| Output::new(ctx, 0));
        for p in parts {
            out.rows.extend(p.rows);
            out.cols.extend(p.cols);
            out.inserted.extend(p.inserted);
            out.conflicts.extend(p.conflicts);
        }
        out
    }

    fn write_record(&mut self, v: V, inserted: bool) {
        self.rows.push(v);
        self.inserted.push(inserted);
    }

    fn write_field(&mut self, acc: &Acc, inserted: bool) {
        self.rows.push(acc.row);
        self.cols.extend_from_slice(&acc.cols);
        self.inserted.push(inserted);
    }

    fn finish(self, ctx: &Ctx) -> Result<MergeOutput> {
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

        let sources: Vec<V> = self.conflicts.iter().map(|c| c.row.row).collect();
        let mut columns = assemble(
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
        let winner_hlc: Int64Array = self.conflicts.iter().map(|c| Some(ctx.hlc(c.winner))).collect();
        let winner_node: StringArray = self.conflicts.iter().map(|c| Some(ctx.node(c.winner))).collect();
        let mut lost = ListBuilder::new(StringBuilder::new());
        for c in &self.conflicts {
            for &d in &c.lost {
                lost.values().append_value(&ctx.data_names[d as usize]);
            }
            lost.append(true);
        }
        let lost = lost.finish();
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(WINNER_HLC, DataType::Int64, false));
        fields.push(Field::new(WINNER_NODE, DataType::Utf8, false));
        fields.push(Field::new(LOST_COLUMNS, lost.data_type().clone(), false));
        columns.push(Arc::new(winner_hlc));
        columns.push(Arc::new(winner_node));
        columns.push(Arc::new(lost));
        let conflicts = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
        Ok(MergeOutput { rows, inserted: BooleanArray::from(self.inserted), conflicts })
    }
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
        Take(UInt32Array),
        Interleave(Vec<(usize, usize)>),
    }
    let index_for = |part: Option<usize>| {
        let all_incoming = (0..rows.len()).all(|r| source(part, r).side() == INCOMING);
        if all_incoming {
            Index::Take(UInt32Array::from_iter_values((0..rows.len()).map(|r| source(part, r).row() as u32)))
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
            Index::Take(idx) => take(ctx.batches[INCOMING].column(c), idx, None)?,
            Index::Interleave(idx) => {
                let arrays = [ctx.batches[LOCAL].column(c).as_ref(), ctx.batches[INCOMING].column(c).as_ref()];
                interleave(&arrays, idx)?
            }
        })
    });
    out.into_iter().collect()
}
