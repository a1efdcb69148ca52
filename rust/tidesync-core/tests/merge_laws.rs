//! Property tests of the merge laws on table states: applying batches of versions
//! is commutative, associative and idempotent, in both merge modes.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray};
use proptest::prelude::*;
use tidesync_core::{merge, MergeMode};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Row {
    id: String,
    v: Option<i64>,
    s: Option<String>,
    hlc: i64,
    node: String,
    base: Option<i64>,
    hv: Option<i64>,
    hs: Option<i64>,
}

type State = BTreeMap<String, Row>;

fn to_batch(rows: &[Row]) -> RecordBatch {
    let col_i = |f: &dyn Fn(&Row) -> Option<i64>| Arc::new(rows.iter().map(f).collect::<Int64Array>()) as ArrayRef;
    RecordBatch::try_from_iter(vec![
        ("id", Arc::new(rows.iter().map(|r| Some(r.id.clone())).collect::<StringArray>()) as ArrayRef),
        ("v", col_i(&|r| r.v)),
        ("s", Arc::new(rows.iter().map(|r| r.s.clone()).collect::<StringArray>()) as ArrayRef),
        ("_hlc", col_i(&|r| Some(r.hlc))),
        ("_node", Arc::new(rows.iter().map(|r| Some(r.node.clone())).collect::<StringArray>()) as ArrayRef),
        ("_base_hlc", col_i(&|r| r.base)),
        ("_hlc_v", col_i(&|r| r.hv)),
        ("_hlc_s", col_i(&|r| r.hs)),
    ])
    .unwrap()
}

fn from_batch(b: &RecordBatch) -> Vec<Row> {
    let s = |c: usize| b.column(c).as_string::<i32>();
    let i = |c: usize| b.column(c).as_primitive::<Int64Type>();
    (0..b.num_rows())
        .map(|r| {
            let opt_i = |c: usize| i(c).is_valid(r).then(|| i(c).value(r));
            Row {
                id: s(0).value(r).to_string(),
                v: opt_i(1),
                s: s(2).is_valid(r).then(|| s(2).value(r).to_string()),
                hlc: i(3).value(r),
                node: s(4).value(r).to_string(),
                base: opt_i(5),
                hv: opt_i(6),
                hs: opt_i(7),
            }
        })
        .collect()
}

/// Merge a batch into a state and upsert the rows the merge says to write.
fn apply(state: &State, batch: &[Row], mode: MergeMode) -> (State, usize) {
    let local: Vec<Row> = state.values().cloned().collect();
    let out = merge(&to_batch(&local), &to_batch(batch), "id", mode).unwrap();
    let mut next = state.clone();
    let written = from_batch(&out.rows);
    let n = written.len();
    for row in written {
        next.insert(row.id.clone(), row);
    }
    (next, n)
}

fn row() -> impl Strategy<Value = Row> {
    (
        0..4u8,
        proptest::option::of(0..3i64),
        proptest::option::of(prop_oneof![Just("x".to_string()), Just("y".to_string())]),
        0..8i64,
        prop_oneof![Just("a"), Just("b"), Just("c")],
        proptest::option::of(0..8i64),
        proptest::option::of(0..8i64),
        proptest::option::of(0..8i64),
    )
        .prop_map(|(k, v, s, hlc, node, base, hv, hs)| Row {
            id: format!("k{k}"),
            v,
            s,
            hlc,
            node: node.to_string(),
            base,
            hv: hv.map(|x| x.min(hlc)),
            hs: hs.map(|x| x.min(hlc)),
        })
}

fn batch() -> impl Strategy<Value = Vec<Row>> {
    proptest::collection::vec(row(), 0..8)
}

/// A starting state: any batch applied to the empty table (so its keys are unique).
fn state(rows: Vec<Row>, mode: MergeMode) -> State {
    apply(&State::new(), &rows, mode).0
}

fn modes() -> impl Strategy<Value = MergeMode> {
    prop_oneof![Just(MergeMode::Record), Just(MergeMode::Field)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn commutative(s in batch(), a in batch(), b in batch(), mode in modes()) {
        let s = state(s, mode);
        let ab = apply(&apply(&s, &a, mode).0, &b, mode).0;
        let ba = apply(&apply(&s, &b, mode).0, &a, mode).0;
        prop_assert_eq!(ab, ba);
    }

    #[test]
    fn associative(s in batch(), a in batch(), b in batch(), mode in modes()) {
        let s = state(s, mode);
        let together: Vec<Row> = a.iter().chain(&b).cloned().collect();
        let one = apply(&s, &together, mode).0;
        let two = apply(&apply(&s, &a, mode).0, &b, mode).0;
        prop_assert_eq!(one, two);
    }

    #[test]
    fn idempotent(s in batch(), a in batch(), mode in modes()) {
        let s = state(s, mode);
        let (once, _) = apply(&s, &a, mode);
        let (twice, written) = apply(&once, &a, mode);
        prop_assert_eq!(written, 0);
        prop_assert_eq!(once, twice);
    }

    #[test]
    fn record_mode_keeps_a_whole_version(s in batch(), a in batch()) {
        let s = state(s, MergeMode::Record);
        let (next, _) = apply(&s, &a, MergeMode::Record);
        for (k, row) in &next {
            let candidates: Vec<&Row> = s.get(k).into_iter().chain(a.iter().filter(|r| &r.id == k)).collect();
            prop_assert!(candidates.contains(&row));
            let max = candidates.iter().map(|r| (r.hlc, r.node.clone())).max().unwrap();
            prop_assert_eq!((row.hlc, row.node.clone()), max);
        }
    }
}

fn version(id: &str, v: i64, hlc: i64, node: &str, base: Option<i64>) -> Row {
    Row { id: id.into(), v: Some(v), s: Some("x".into()), hlc, node: node.into(), base, hv: Some(hlc), hs: Some(1) }
}

#[test]
fn sequential_edits_are_not_conflicts() {
    let local = vec![version("k", 1, 10, "a", None)];
    let incoming = vec![version("k", 2, 20, "b", Some(10))];
    let out = merge(&to_batch(&local), &to_batch(&incoming), "id", MergeMode::Record).unwrap();
    assert_eq!(out.rows.num_rows(), 1);
    assert_eq!(out.conflicts.num_rows(), 0);
}

#[test]
fn concurrent_edits_log_the_loser() {
    let local = vec![version("k", 1, 30, "a", Some(5))];
    let incoming = vec![version("k", 2, 20, "b", Some(5))];
    let out = merge(&to_batch(&local), &to_batch(&incoming), "id", MergeMode::Record).unwrap();
    assert_eq!(out.rows.num_rows(), 0, "local wins, nothing to write");
    assert_eq!(out.conflicts.num_rows(), 1);
    let lost = out.conflicts.column_by_name("_lost_columns").unwrap().as_list::<i32>().value(0);
    assert_eq!(lost.as_string::<i32>().value(0), "v");
    let winner = out.conflicts.column_by_name("_winner_node").unwrap().as_string::<i32>().value(0).to_string();
    assert_eq!(winner, "a");
}

#[test]
fn field_mode_merges_disjoint_edits_without_conflict() {
    // Both derived from version 5; a changed v at 30, b changed s at 20.
    let mut a = version("k", 9, 30, "a", Some(5));
    a.hv = Some(30);
    a.hs = Some(1);
    let mut b = version("k", 1, 20, "b", Some(5));
    b.s = Some("y".into());
    b.hv = Some(1);
    b.hs = Some(20);
    let out = merge(&to_batch(&[a]), &to_batch(&[b]), "id", MergeMode::Field).unwrap();
    let rows = from_batch(&out.rows);
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].v, rows[0].s.as_deref(), rows[0].hlc), (Some(9), Some("y"), 30));
    assert_eq!(out.conflicts.num_rows(), 0);
}

#[test]
fn field_mode_says_which_rows_copy_an_incoming_version() {
    // Key "k": local row 0; incoming row 1 changes only s (v's stamp and value equal
    // the local ones), so the output is a copy of it. Key "m": incoming row 0 changes
    // v while local keeps the newer s: a mix of both sides, no copy. Key "n" is new.
    let mut k_local = version("k", 1, 10, "a", None);
    k_local.hv = Some(10);
    let mut k_in = k_local.clone();
    k_in.s = Some("y".into());
    (k_in.hlc, k_in.node, k_in.base, k_in.hs) = (20, "b".into(), Some(10), Some(20));
    let mut m_local = version("m", 1, 30, "a", None);
    (m_local.hv, m_local.hs) = (Some(1), Some(30));
    let mut m_in = version("m", 2, 20, "b", None);
    (m_in.hv, m_in.hs) = (Some(20), Some(1));
    let local = vec![m_local, k_local];
    let incoming = vec![m_in, k_in, version("n", 3, 5, "b", None)];
    let out = merge(&to_batch(&local), &to_batch(&incoming), "id", MergeMode::Field).unwrap();
    let ids: Vec<String> = from_batch(&out.rows).into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["m", "k", "n"]);
    assert_eq!(out.local_row.iter().collect::<Vec<_>>(), [Some(0), Some(1), None]);
    assert_eq!(out.source.iter().collect::<Vec<_>>(), [None, Some(1), Some(2)]);
    assert_eq!(out.keys, 3);
}

#[test]
fn rows_written_in_incoming_order_come_out_whole() {
    // One version per key: the output is the incoming rows that win, in order, whether
    // some lose (`b`, older than the local row) or all win (the columns are shared).
    let local = vec![version("a", 1, 10, "x", None), version("b", 2, 30, "x", None)];
    let some_win =
        vec![version("a", 3, 20, "y", Some(10)), version("b", 4, 20, "y", Some(30)), version("c", 5, 5, "y", None)];
    let all_win = vec![version("a", 3, 20, "y", Some(10)), version("c", 5, 5, "y", None)];
    for mode in [MergeMode::Record, MergeMode::Field] {
        for (incoming, written) in [(&some_win, vec![0, 2]), (&all_win, vec![0, 1])] {
            let out = merge(&to_batch(&local), &to_batch(incoming), "id", mode).unwrap();
            let expect: Vec<Row> = written.iter().map(|&i| incoming[i].clone()).collect();
            let rows = from_batch(&out.rows);
            assert_eq!(
                rows.iter().map(|r| &r.id).collect::<Vec<_>>(),
                expect.iter().map(|r| &r.id).collect::<Vec<_>>()
            );
            assert_eq!((rows[0].v, rows[1].v), (expect[0].v, expect[1].v), "{mode:?}");
            let sources: Vec<Option<u32>> = out.source.iter().collect();
            assert_eq!(sources, written.iter().map(|&i| Some(i as u32)).collect::<Vec<_>>(), "{mode:?}");
        }
    }
}

#[test]
fn record_mode_breaks_stamp_ties_on_the_other_columns() {
    // Same (hlc, node) on both sides: a re-delivery (identical: nothing to write), or
    // two contents under one stamp, where the greater row by the other columns in
    // schema order wins (`v` first, then `s`); never a conflict.
    let local =
        vec![version("same", 1, 10, "a", None), version("v_up", 1, 10, "a", None), version("s_dn", 1, 10, "a", None)];
    let mut v_up = local[1].clone();
    v_up.v = Some(2);
    let mut s_dn = local[2].clone();
    s_dn.s = Some("w".into()); // "w" < "x": the local row stays
    let incoming = vec![s_dn, local[0].clone(), v_up];
    let out = merge(&to_batch(&local), &to_batch(&incoming), "id", MergeMode::Record).unwrap();
    let rows = from_batch(&out.rows);
    assert_eq!(rows.iter().map(|r| (r.id.as_str(), r.v)).collect::<Vec<_>>(), [("v_up", Some(2))]);
    assert_eq!(out.local_row.iter().collect::<Vec<_>>(), [Some(1)]);
    assert_eq!(out.source.iter().collect::<Vec<_>>(), [Some(2)]);
    assert_eq!(out.conflicts.num_rows(), 0);
}

#[test]
fn record_mode_writes_in_incoming_order_of_the_version_written() {
    // Key "k" comes first but its winning version is the last row: the output follows
    // the rows written (1 then 2), not the first appearance of the keys (k then n).
    let incoming =
        vec![version("k", 1, 10, "a", None), version("n", 5, 10, "a", None), version("k", 2, 20, "a", Some(10))];
    let out = merge(&to_batch(&[]), &to_batch(&incoming), "id", MergeMode::Record).unwrap();
    let ids: Vec<String> = from_batch(&out.rows).into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["n", "k"]);
    assert_eq!(out.source.iter().collect::<Vec<_>>(), [Some(1), Some(2)]);
    assert_eq!(out.inserted.iter().collect::<Vec<_>>(), [Some(true), Some(true)]);
}
