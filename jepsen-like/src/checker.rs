//! The history checker: pure functions from a history to the anomalies in
//! it. No I/O, no clocks; everything it knows comes from the ops.
//!
//! The model is Jepsen's Kafka queue workload. Per key (partition) a
//! *version order* maps offsets to the values seen there, built from every
//! poll and from every send that *must have committed*: an `ok` send, or an
//! `info` one some `ok` poll observed a write of. Offsets may have gaps
//! (control batches, aborted transactions), so positions are compared by
//! *index*, the rank of an offset among those known to hold values.
//!
//! Anomaly classes (names as in Jepsen where Jepsen has one):
//! - `inconsistent-offsets`: two values at one offset.
//! - `duplicate`: one value at two offsets.
//! - `lost-write`: a committed write below the highest index some `ok` poll
//!   read, that no `ok` poll read.
//! - `unseen`: a committed write that no `ok` poll read by the end, although
//!   final reads ran (checked only when the history has final reads).
//! - `final-read-failed`: a final read that did not complete.
//! - `unexpected`: a value read that no send ever attempted.
//! - `G1a` (aborted read): a value read whose send certainly failed.
//! - `precommitted-read`: an operation that read its own send (invisible
//!   until commit in Kafka's transactional model).
//! - `nonmonotonic-send` / `int-nonmonotonic-send`: a process's sends to a
//!   key got a lower or equal offset than its previous send (across / within
//!   one operation).
//! - `poll-skip` / `int-poll-skip`: a process's successive reads of a key
//!   skip a known index; `nonmonotonic-poll` / `int-nonmonotonic-poll`: they
//!   go back or repeat.
//! - `node-divergence`: final reads from two nodes disagree at an offset
//!   (`conflict`), or a node's final read ends below the highest
//!   acknowledged offset (`behind`).
//! - `G0` / `G1c`: cycles of write-write / write-read dependencies between
//!   operations (possible only with multi-op `txn`s).
//!
//! Exactly-once consume counts (a transform's input rows each reflected
//! exactly once in its output) need consumer groups and transactional
//! offsets; they will be one more pass over the same `Analysis`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::cycles::{Dep, Graph};
use crate::history::{Key, MicroOp, Offset, Op, OpType, Process, Reads, Value};

/// Every anomaly class the checker reports, in report order.
pub const CLASSES: &[&str] = &[
    "lost-write",
    "unseen",
    "duplicate",
    "inconsistent-offsets",
    "unexpected",
    "G1a",
    "precommitted-read",
    "nonmonotonic-send",
    "int-nonmonotonic-send",
    "poll-skip",
    "int-poll-skip",
    "nonmonotonic-poll",
    "int-nonmonotonic-poll",
    "node-divergence",
    "final-read-failed",
    "G0",
    "G1c",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckError {
    /// The history itself is broken (not a property of the system under test).
    #[error("malformed history at op index {index}: {reason}")]
    Malformed { index: u64, reason: String },
}

#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Examples kept per anomaly class in the result (all are counted).
    pub max_examples: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self { max_examples: 20 }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct CheckResult {
    /// No anomaly of any class.
    pub valid: bool,
    /// Completed client operations by `f` and outcome (`invoke` counts
    /// every attempt).
    pub ops: BTreeMap<String, BTreeMap<String, u64>>,
    /// Anomalies found, by class (every class listed, zero included).
    pub anomaly_counts: BTreeMap<String, u64>,
    /// Up to `max_examples` anomalies per class, each naming the op indices
    /// involved.
    pub anomalies: BTreeMap<String, Vec<Json>>,
    /// Things the checker could not check, and why.
    pub warnings: Vec<String>,
    /// Distinct values acknowledged (`ok` sends) and read (`ok` polls).
    pub acknowledged_values: u64,
    pub read_values: u64,
}

/// One client operation: its invocation and (unless the history ends
/// first) its completion.
#[derive(Debug)]
struct Pair<'a> {
    invoke: &'a Op,
    done: Option<&'a Op>,
}

impl Pair<'_> {
    /// An operation without completion is indeterminate.
    fn kind(&self) -> OpType {
        self.done.map_or(OpType::Info, |d| d.kind)
    }
    fn index(&self) -> u64 {
        self.done.map_or(self.invoke.index, |d| d.index)
    }
    fn process(&self) -> u64 {
        match self.invoke.process {
            Process::Client(p) => p,
            Process::Nemesis => u64::MAX,
        }
    }
    /// (key, value) of every send, from the invocation (what was attempted).
    fn writes(&self) -> impl Iterator<Item = (Key, Value)> + '_ {
        self.invoke.mops().iter().filter_map(|m| match m {
            MicroOp::Send { key, value, .. } => Some((*key, *value)),
            _ => None,
        })
    }
    /// Sends with the offsets the completion reports.
    fn acked_sends(&self) -> impl Iterator<Item = (Key, Value, Offset)> + '_ {
        self.done.into_iter().flat_map(|d| {
            d.mops().iter().filter_map(|m| match m {
                MicroOp::Send {
                    key,
                    value,
                    offset: Some(o),
                } => Some((*key, *value, *o)),
                _ => None,
            })
        })
    }
    /// Every poll result of the completion, in micro-op order.
    fn polls(&self) -> impl Iterator<Item = &Reads> + '_ {
        self.done.into_iter().flat_map(|d| {
            d.mops().iter().filter_map(|m| match m {
                MicroOp::Poll { reads: Some(r) } => Some(r),
                _ => None,
            })
        })
    }
    fn is_final(&self) -> bool {
        self.invoke.final_read
    }
}

/// The version order of one key.
#[derive(Debug, Default)]
struct VersionOrder {
    /// offset → values seen there
    log: BTreeMap<Offset, BTreeSet<Value>>,
    /// offset → dense index (rank among offsets with values)
    index_of: HashMap<Offset, usize>,
    /// value → lowest / highest index it appears at
    first_index: HashMap<Value, usize>,
    last_index: HashMap<Value, usize>,
    /// value → lowest offset it appears at
    first_offset: HashMap<Value, Offset>,
    /// dense index → offset
    offsets: Vec<Offset>,
}

impl VersionOrder {
    fn finish(&mut self) {
        for (i, (o, vs)) in self.log.iter().enumerate() {
            self.index_of.insert(*o, i);
            self.offsets.push(*o);
            for v in vs {
                self.first_index.entry(*v).or_insert(i);
                self.first_offset.entry(*v).or_insert(*o);
                self.last_index.insert(*v, i);
            }
        }
    }
}

/// What the checks share: pairs, writers, reads, version orders.
struct Analysis<'a> {
    pairs: Vec<Pair<'a>>,
    /// (key, value) → index into `pairs` of the op that sent it
    writer: HashMap<(Key, Value), usize>,
    /// key → values read by `ok` polls
    ok_reads: HashMap<Key, HashSet<Value>>,
    /// (key, value) → indices into `pairs` of `ok` ops that read it
    readers: HashMap<(Key, Value), Vec<usize>>,
    orders: BTreeMap<Key, VersionOrder>,
}

impl<'a> Analysis<'a> {
    fn new(history: &'a [Op]) -> Result<Self, CheckError> {
        let mut pairs: Vec<Pair<'a>> = Vec::new();
        let mut open: HashMap<u64, usize> = HashMap::new();
        for op in history {
            let Process::Client(p) = op.process else {
                continue;
            };
            if op.kind == OpType::Invoke {
                if open.contains_key(&p) {
                    return Err(CheckError::Malformed {
                        index: op.index,
                        reason: format!("process {p} invoked while its previous op is open"),
                    });
                }
                open.insert(p, pairs.len());
                pairs.push(Pair {
                    invoke: op,
                    done: None,
                });
            } else {
                let Some(i) = open.remove(&p) else {
                    return Err(CheckError::Malformed {
                        index: op.index,
                        reason: format!("completion of process {p} without an invoke"),
                    });
                };
                pairs[i].done = Some(op);
            }
        }
        let mut writer = HashMap::new();
        for (i, pair) in pairs.iter().enumerate() {
            for kv in pair.writes() {
                if writer.insert(kv, i).is_some() {
                    return Err(CheckError::Malformed {
                        index: pair.invoke.index,
                        reason: format!(
                            "value {} sent to key {} twice: values must be unique per key",
                            kv.1, kv.0
                        ),
                    });
                }
            }
        }
        let mut ok_reads: HashMap<Key, HashSet<Value>> = HashMap::new();
        let mut readers: HashMap<(Key, Value), Vec<usize>> = HashMap::new();
        for (i, pair) in pairs.iter().enumerate() {
            if pair.kind() != OpType::Ok {
                continue;
            }
            for reads in pair.polls() {
                for (k, pairs_read) in reads {
                    for (_, v) in pairs_read {
                        ok_reads.entry(*k).or_default().insert(*v);
                        let r = readers.entry((*k, *v)).or_default();
                        if r.last() != Some(&i) {
                            r.push(i);
                        }
                    }
                }
            }
        }
        let mut a = Analysis {
            pairs,
            writer,
            ok_reads,
            readers,
            orders: BTreeMap::new(),
        };
        // Version orders: every poll (whatever its outcome: a read is an
        // observation even if the op later failed), and sends that must
        // have committed.
        let mut orders: BTreeMap<Key, VersionOrder> = BTreeMap::new();
        for (i, pair) in a.pairs.iter().enumerate() {
            for reads in pair.polls() {
                for (k, rs) in reads {
                    for (o, v) in rs {
                        orders
                            .entry(*k)
                            .or_default()
                            .log
                            .entry(*o)
                            .or_default()
                            .insert(*v);
                    }
                }
            }
            if a.must_have_committed(i) {
                for (k, v, o) in pair.acked_sends() {
                    orders
                        .entry(k)
                        .or_default()
                        .log
                        .entry(o)
                        .or_default()
                        .insert(v);
                }
            }
        }
        for vo in orders.values_mut() {
            vo.finish();
        }
        a.orders = orders;
        Ok(a)
    }

    /// Jepsen's rule: `ok`, or `info` with some write observed by an `ok` poll.
    fn must_have_committed(&self, i: usize) -> bool {
        let pair = &self.pairs[i];
        match pair.kind() {
            OpType::Ok => true,
            OpType::Info => pair
                .writes()
                .any(|(k, v)| self.ok_reads.get(&k).is_some_and(|vals| vals.contains(&v))),
            _ => false,
        }
    }

    fn op_ref(&self, i: usize) -> Json {
        let p = &self.pairs[i];
        json!({
            "index": p.index(),
            "invoke_index": p.invoke.index,
            "process": p.process(),
            "type": p.kind(),
            "f": p.invoke.f,
        })
    }

    fn writer_ref(&self, k: Key, v: Value) -> Json {
        self.writer
            .get(&(k, v))
            .map_or(Json::Null, |i| self.op_ref(*i))
    }
}

/// Accumulates anomalies by class, keeping a bounded number of examples.
struct Found {
    counts: BTreeMap<String, u64>,
    examples: BTreeMap<String, Vec<Json>>,
    max_examples: usize,
}

impl Found {
    fn add(&mut self, class: &str, detail: Json) {
        *self.counts.entry(class.to_owned()).or_default() += 1;
        let ex = self.examples.entry(class.to_owned()).or_default();
        if ex.len() < self.max_examples {
            ex.push(detail);
        }
    }
}

/// Check a history. `Err` only for a malformed history.
pub fn check(history: &[Op], opts: &CheckOptions) -> Result<CheckResult, CheckError> {
    let a = Analysis::new(history)?;
    let mut found = Found {
        counts: CLASSES.iter().map(|c| (c.to_string(), 0)).collect(),
        examples: BTreeMap::new(),
        max_examples: opts.max_examples,
    };
    let mut warnings = Vec::new();

    offsets_and_duplicates(&a, &mut found);
    let lost = lost_writes(&a, &mut found);
    unseen(&a, &lost, &mut found, &mut warnings);
    unexpected_and_aborted(&a, &mut found);
    sends_monotonic(&a, &mut found);
    polls_monotonic(&a, &mut found);
    node_divergence(&a, &mut found);
    cycles(&a, &mut found);

    let mut ops: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for p in &a.pairs {
        let per_f = ops.entry(p.invoke.f.clone()).or_default();
        *per_f.entry("invoke".into()).or_default() += 1;
        let t = serde_json::to_value(p.kind())
            .ok()
            .and_then(|j| j.as_str().map(str::to_owned))
            .unwrap_or_default();
        *per_f.entry(t).or_default() += 1;
    }
    let acknowledged_values = a
        .pairs
        .iter()
        .filter(|p| p.kind() == OpType::Ok)
        .flat_map(|p| p.writes())
        .count() as u64;
    let read_values = a.ok_reads.values().map(|s| s.len() as u64).sum();
    let valid = found.counts.values().all(|c| *c == 0);
    Ok(CheckResult {
        valid,
        ops,
        anomaly_counts: found.counts,
        anomalies: found.examples,
        warnings,
        acknowledged_values,
        read_values,
    })
}

fn offsets_and_duplicates(a: &Analysis, found: &mut Found) {
    for (k, vo) in &a.orders {
        let mut offsets_of: BTreeMap<Value, Vec<Offset>> = BTreeMap::new();
        for (o, vs) in &vo.log {
            if vs.len() > 1 {
                found.add(
                    "inconsistent-offsets",
                    json!({
                        "key": k, "offset": o, "values": vs,
                        "writers": vs.iter().map(|v| a.writer_ref(*k, *v)).collect::<Vec<_>>(),
                    }),
                );
            }
            for v in vs {
                offsets_of.entry(*v).or_default().push(*o);
            }
        }
        for (v, os) in offsets_of {
            if os.len() > 1 {
                found.add(
                    "duplicate",
                    json!({"key": k, "value": v, "offsets": os, "writer": a.writer_ref(*k, v)}),
                );
            }
        }
    }
}

/// Committed writes below the highest index an `ok` poll read, never read.
/// Returns them so `unseen` does not report them twice.
fn lost_writes(a: &Analysis, found: &mut Found) -> HashSet<(Key, Value)> {
    let mut lost_all = HashSet::new();
    for (k, vo) in &a.orders {
        let Some(read) = a.ok_reads.get(k) else {
            continue;
        };
        // The highest of the lowest indices of values read: everything up
        // to it must have been readable.
        let Some(bound) = read.iter().filter_map(|v| vo.first_index.get(v)).max() else {
            continue;
        };
        let bound_offset = vo.offsets.get(*bound).copied();
        for (v, last) in &vo.last_index {
            if last > bound || read.contains(v) {
                continue;
            }
            let Some(w) = a.writer.get(&(*k, *v)) else {
                continue; // read by no ok poll and sent by nobody: `unexpected` reports it
            };
            if !a.must_have_committed(*w) {
                continue;
            }
            let offset = vo.first_offset.get(v).copied();
            lost_all.insert((*k, *v));
            found.add(
                "lost-write",
                json!({
                    "key": k, "value": v, "offset": offset, "index": vo.first_index.get(v),
                    "max_read_index": bound, "max_read_offset": bound_offset,
                    "writer": a.op_ref(*w),
                }),
            );
        }
    }
    lost_all
}

fn unseen(
    a: &Analysis,
    lost: &HashSet<(Key, Value)>,
    found: &mut Found,
    warnings: &mut Vec<String>,
) {
    let finals: Vec<&Pair> = a.pairs.iter().filter(|p| p.is_final()).collect();
    if finals.is_empty() {
        warnings.push(
            "no final reads in the history: unseen acknowledged writes were not checked".into(),
        );
        return;
    }
    for (i, p) in a.pairs.iter().enumerate() {
        if p.is_final() && p.kind() != OpType::Ok {
            found.add(
                "final-read-failed",
                json!({"op": a.op_ref(i), "node": p.invoke.node,
                       "error": p.done.and_then(|d| d.error.clone())}),
            );
        }
    }
    for (i, p) in a.pairs.iter().enumerate() {
        if !a.must_have_committed(i) {
            continue;
        }
        for (k, v) in p.writes() {
            let seen = a.ok_reads.get(&k).is_some_and(|s| s.contains(&v));
            if !seen && !lost.contains(&(k, v)) {
                let offset = p
                    .acked_sends()
                    .find(|(kk, vv, _)| (*kk, *vv) == (k, v))
                    .map(|t| t.2);
                found.add(
                    "unseen",
                    json!({"key": k, "value": v, "offset": offset, "writer": a.op_ref(i)}),
                );
            }
        }
    }
}

fn unexpected_and_aborted(a: &Analysis, found: &mut Found) {
    for (i, p) in a.pairs.iter().enumerate() {
        let own: HashSet<(Key, Value)> = p.writes().collect();
        let mut precommitted_reported = false;
        for reads in p.polls() {
            for (k, rs) in reads {
                for (o, v) in rs {
                    match a.writer.get(&(*k, *v)) {
                        None => found.add(
                            "unexpected",
                            json!({"key": k, "value": v, "offset": o, "reader": a.op_ref(i)}),
                        ),
                        Some(w) => {
                            if p.kind() == OpType::Ok && a.pairs[*w].kind() == OpType::Fail {
                                found.add(
                                    "G1a",
                                    json!({"key": k, "value": v, "offset": o,
                                           "writer": a.op_ref(*w), "reader": a.op_ref(i)}),
                                );
                            }
                        }
                    }
                    if own.contains(&(*k, *v)) && !precommitted_reported {
                        precommitted_reported = true;
                        found.add(
                            "precommitted-read",
                            json!({"key": k, "value": v, "op": a.op_ref(i)}),
                        );
                    }
                }
            }
        }
    }
}

/// Ops of each process in completion order (indices into `pairs`).
fn by_process(a: &Analysis) -> BTreeMap<u64, Vec<usize>> {
    let mut order: Vec<usize> = (0..a.pairs.len()).collect();
    order.sort_by_key(|i| a.pairs[*i].index());
    let mut m: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for i in order {
        m.entry(a.pairs[i].process()).or_default().push(i);
    }
    m
}

fn sends_monotonic(a: &Analysis, found: &mut Found) {
    for ops in by_process(a).values() {
        let mut last: HashMap<Key, (Offset, usize)> = HashMap::new();
        for &i in ops {
            let p = &a.pairs[i];
            if p.kind() != OpType::Ok {
                continue;
            }
            let mut within: HashMap<Key, Offset> = HashMap::new();
            for (k, v, o) in p.acked_sends() {
                if let Some(prev) = within.get(&k) {
                    if o <= *prev {
                        found.add(
                            "int-nonmonotonic-send",
                            json!({"key": k, "value": v, "offsets": [prev, o], "op": a.op_ref(i)}),
                        );
                    }
                } else if let Some((prev, j)) = last.get(&k) {
                    if o <= *prev {
                        found.add(
                            "nonmonotonic-send",
                            json!({"key": k, "value": v, "offsets": [prev, o],
                                   "ops": [a.op_ref(*j), a.op_ref(i)]}),
                        );
                    }
                }
                within.insert(k, o);
            }
            for (k, o) in within {
                last.insert(k, (o, i));
            }
        }
    }
}

fn polls_monotonic(a: &Analysis, found: &mut Found) {
    for ops in by_process(a).values() {
        // key → (index of the last offset read, op that read it)
        let mut last: HashMap<Key, (usize, Offset, usize)> = HashMap::new();
        for &i in ops {
            let p = &a.pairs[i];
            if p.kind() != OpType::Ok {
                continue;
            }
            for reads in p.polls() {
                for (k, rs) in reads {
                    let Some(vo) = a.orders.get(k) else {
                        continue;
                    };
                    for (n, (o, _v)) in rs.iter().enumerate() {
                        let Some(&idx) = vo.index_of.get(o) else {
                            continue;
                        };
                        if let Some(&(prev_idx, prev_o, j)) = last.get(k) {
                            let internal = n > 0 && j == i;
                            let delta = idx as i64 - prev_idx as i64;
                            let class = match (delta, internal) {
                                (d, false) if d > 1 => Some("poll-skip"),
                                (d, true) if d > 1 => Some("int-poll-skip"),
                                (d, false) if d < 1 => Some("nonmonotonic-poll"),
                                (d, true) if d < 1 => Some("int-nonmonotonic-poll"),
                                _ => None,
                            };
                            if let Some(class) = class {
                                let skipped: Vec<Offset> = if delta > 1 {
                                    vo.log.range(prev_o + 1..*o).map(|(x, _)| *x).collect()
                                } else {
                                    Vec::new()
                                };
                                found.add(
                                    class,
                                    json!({"key": k, "offsets": [prev_o, o], "delta": delta,
                                           "skipped_offsets": skipped,
                                           "ops": [a.op_ref(j), a.op_ref(i)]}),
                                );
                            }
                        }
                        last.insert(*k, (idx, *o, i));
                    }
                }
            }
        }
    }
}

fn node_divergence(a: &Analysis, found: &mut Found) {
    // key → reader → offset → value, from ok final reads. A reader is a
    // node and how it was read: "3" through the network (node 3 as the
    // entry point), "3 (log-read)" from node 3's own log files.
    let mut per: BTreeMap<Key, BTreeMap<String, BTreeMap<Offset, Value>>> = BTreeMap::new();
    for p in &a.pairs {
        let (true, Some(node), OpType::Ok) = (p.is_final(), p.invoke.node, p.kind()) else {
            continue;
        };
        let reader = if p.invoke.f == "poll" {
            node.to_string()
        } else {
            format!("{node} ({})", p.invoke.f)
        };
        for reads in p.polls() {
            for (k, rs) in reads {
                let m = per
                    .entry(*k)
                    .or_default()
                    .entry(reader.clone())
                    .or_default();
                for (o, v) in rs {
                    m.insert(*o, *v);
                }
            }
        }
    }
    // Highest acknowledged offset per key: every node must reach it.
    let mut acked_max: HashMap<Key, Offset> = HashMap::new();
    for p in &a.pairs {
        if p.kind() == OpType::Ok {
            for (k, _, o) in p.acked_sends() {
                let e = acked_max.entry(k).or_insert(o);
                *e = (*e).max(o);
            }
        }
    }
    for (k, nodes) in &per {
        let list: Vec<(&String, &BTreeMap<Offset, Value>)> = nodes.iter().collect();
        for (x, (na, la)) in list.iter().enumerate() {
            for (nb, lb) in &list[x + 1..] {
                for (o, va) in la.iter() {
                    if let Some(vb) = lb.get(o) {
                        if va != vb {
                            found.add(
                                "node-divergence",
                                json!({"kind": "conflict", "key": k, "offset": o,
                                       "nodes": {na.as_str(): va, nb.as_str(): vb}}),
                            );
                        }
                    }
                }
            }
            if let Some(max) = acked_max.get(k) {
                let end = la.keys().next_back().copied();
                if end.is_none_or(|e| e < *max) {
                    found.add(
                        "node-divergence",
                        json!({"kind": "behind", "key": k, "node": na,
                               "last_offset_read": end, "highest_acked_offset": max}),
                    );
                }
            }
        }
    }
}

fn cycles(a: &Analysis, found: &mut Found) {
    let mut g = Graph::default();
    for (k, vo) in &a.orders {
        // ww: writers of successive single-valued indices.
        let mut prev: Option<usize> = None;
        for vs in vo.log.values() {
            let w = if vs.len() == 1 {
                vs.iter()
                    .next()
                    .and_then(|v| a.writer.get(&(*k, *v)).copied())
                    .filter(|w| a.must_have_committed(*w))
            } else {
                None
            };
            if let (Some(p), Some(w)) = (prev, w) {
                g.add(a.pairs[p].index(), a.pairs[w].index(), Dep::Ww);
            }
            prev = w;
        }
    }
    for ((k, v), readers) in &a.readers {
        let Some(&w) = a.writer.get(&(*k, *v)) else {
            continue;
        };
        if !a.must_have_committed(w) {
            continue;
        }
        for r in readers {
            g.add(a.pairs[w].index(), a.pairs[*r].index(), Dep::Wr);
        }
    }
    for c in g.cycles() {
        found.add(c.class(), json!({"ops": c.ops, "deps": c.deps}));
    }
}

#[cfg(test)]
mod tests {
    //! One hand-written history per anomaly class, plus clean histories
    //! that must pass. `H` builds them in Jepsen's notation.
    use super::*;
    use crate::history::OpValue;

    #[derive(Default)]
    struct H {
        ops: Vec<Op>,
    }

    impl H {
        fn push(&mut self, p: u64, kind: OpType, f: &str, mops: Vec<MicroOp>) -> &mut Self {
            let i = self.ops.len() as u64;
            self.ops.push(Op {
                index: i,
                time: i * 1000,
                process: Process::Client(p),
                kind,
                f: f.into(),
                value: OpValue::Mops(mops),
                error: None,
                node: None,
                final_read: false,
            });
            self
        }
        /// A send of `v` to `k` by process `p` with outcome `kind` (offset if ok).
        fn send(&mut self, p: u64, k: Key, v: Value, kind: OpType, o: Option<Offset>) -> &mut Self {
            self.push(p, OpType::Invoke, "send", vec![send(k, v, None)]);
            let done = if kind == OpType::Ok { o } else { None };
            self.push(p, kind, "send", vec![send(k, v, done)])
        }
        /// An ok poll by `p` returning `reads`.
        fn poll(&mut self, p: u64, reads: &[(Key, &[(Offset, Value)])]) -> &mut Self {
            self.push(
                p,
                OpType::Invoke,
                "poll",
                vec![MicroOp::Poll { reads: None }],
            );
            self.push(p, OpType::Ok, "poll", vec![poll(reads)])
        }
        /// A final read from `node`.
        fn final_read(
            &mut self,
            p: u64,
            node: u32,
            reads: &[(Key, &[(Offset, Value)])],
        ) -> &mut Self {
            self.poll(p, reads);
            let n = self.ops.len();
            for op in &mut self.ops[n - 2..] {
                op.final_read = true;
                op.node = Some(node);
            }
            self
        }
        fn check(&self) -> CheckResult {
            check(&self.ops, &CheckOptions::default()).unwrap()
        }
    }

    fn send(k: Key, v: Value, o: Option<Offset>) -> MicroOp {
        MicroOp::Send {
            key: k,
            value: v,
            offset: o,
        }
    }

    fn poll(reads: &[(Key, &[(Offset, Value)])]) -> MicroOp {
        MicroOp::Poll {
            reads: Some(reads.iter().map(|(k, r)| (*k, r.to_vec())).collect()),
        }
    }

    /// The only classes with a non-zero count.
    fn classes(r: &CheckResult) -> Vec<(&str, u64)> {
        r.anomaly_counts
            .iter()
            .filter(|(_, c)| **c > 0)
            .map(|(k, c)| (k.as_str(), *c))
            .collect()
    }

    /// A clean history: three sends, polls in order, final reads of both nodes.
    fn clean() -> H {
        let mut h = H::default();
        h.send(1, 0, 10, OpType::Ok, Some(0))
            .send(1, 0, 11, OpType::Ok, Some(1))
            .send(2, 1, 20, OpType::Ok, Some(0))
            .poll(3, &[(0, &[(0, 10)])])
            .poll(3, &[(0, &[(1, 11)]), (1, &[(0, 20)])])
            .final_read(10, 1, &[(0, &[(0, 10), (1, 11)]), (1, &[(0, 20)])])
            .final_read(11, 2, &[(0, &[(0, 10), (1, 11)]), (1, &[(0, 20)])]);
        h
    }

    #[test]
    fn clean_history_is_valid() {
        let r = clean().check();
        assert!(r.valid, "{:?}", classes(&r));
        assert_eq!(r.acknowledged_values, 3);
        assert_eq!(r.read_values, 3);
        assert_eq!(r.ops["send"]["ok"], 3);
        assert_eq!(r.ops["poll"]["invoke"], 4);
        assert!(r.warnings.is_empty());
    }

    #[test]
    fn lost_write_below_the_highest_read() {
        let mut h = H::default();
        h.send(1, 0, 10, OpType::Ok, Some(0))
            .send(1, 0, 11, OpType::Ok, Some(1))
            .send(1, 0, 12, OpType::Ok, Some(2))
            .poll(3, &[(0, &[(0, 10), (2, 12)])]);
        let r = h.check();
        // 11 at offset 1 was acknowledged; a poll read offset 2 but never 11.
        assert_eq!(r.anomaly_counts["lost-write"], 1);
        let ex = &r.anomalies["lost-write"][0];
        assert_eq!(ex["value"], 11);
        assert_eq!(ex["offset"], 1);
        assert_eq!(ex["writer"]["index"], 3);
        // the same process's poll jumped over offset 1 too
        assert_eq!(r.anomaly_counts["int-poll-skip"], 1);
        assert!(!r.valid);
    }

    #[test]
    fn info_send_observed_by_a_read_must_have_committed() {
        // Process 2's info send of 21 is proved committed because an ok poll
        // read the other value of the same op (a two-send txn); its own
        // value 21 sits below the highest read, unread: lost.
        let mut h = H::default();
        h.push(
            2,
            OpType::Invoke,
            "txn",
            vec![send(0, 21, None), send(0, 22, None)],
        )
        .push(
            2,
            OpType::Info,
            "txn",
            vec![send(0, 21, None), send(0, 22, None)],
        )
        .poll(3, &[(0, &[(1, 22)])])
        .poll(4, &[(0, &[(0, 21)])]);
        // With 21 read by process 4, nothing is lost.
        assert!(h.check().valid, "{:?}", classes(&h.check()));
        // Without that read, 21's offset is unknown (no ack): it cannot be
        // placed in the version order, so it is unseen, not lost, and only
        // with final reads present.
        let mut h2 = H::default();
        h2.push(
            2,
            OpType::Invoke,
            "txn",
            vec![send(0, 21, None), send(0, 22, None)],
        )
        .push(
            2,
            OpType::Info,
            "txn",
            vec![send(0, 21, None), send(0, 22, None)],
        )
        .final_read(3, 1, &[(0, &[(1, 22)])]);
        let r = h2.check();
        assert_eq!(classes(&r), vec![("unseen", 1)]);
        assert_eq!(r.anomalies["unseen"][0]["value"], 21);
        // An info send nobody read is not required to exist.
        let mut h3 = H::default();
        h3.send(2, 0, 30, OpType::Info, None).final_read(3, 1, &[]);
        assert!(h3.check().valid);
    }

    #[test]
    fn unseen_acknowledged_write_at_the_end() {
        let mut h = H::default();
        h.send(1, 0, 10, OpType::Ok, Some(0))
            .send(1, 0, 11, OpType::Ok, Some(1))
            .final_read(5, 1, &[(0, &[(0, 10)])]);
        let r = h.check();
        assert_eq!(r.anomaly_counts["unseen"], 1);
        assert_eq!(r.anomalies["unseen"][0]["value"], 11);
        // the node's final read also stops below the highest ack
        assert_eq!(r.anomaly_counts["node-divergence"], 1);
        assert_eq!(r.anomalies["node-divergence"][0]["kind"], "behind");
        // Without final reads the check is skipped, with a warning.
        let mut h2 = H::default();
        h2.send(1, 0, 10, OpType::Ok, Some(0));
        let r2 = h2.check();
        assert!(r2.valid);
        assert_eq!(r2.warnings.len(), 1);
    }

    #[test]
    fn failed_final_read_is_reported() {
        let mut h = clean();
        h.push(
            12,
            OpType::Invoke,
            "poll",
            vec![MicroOp::Poll { reads: None }],
        );
        let n = h.ops.len();
        h.ops[n - 1].final_read = true;
        h.ops[n - 1].node = Some(3);
        h.push(
            12,
            OpType::Fail,
            "poll",
            vec![MicroOp::Poll { reads: None }],
        );
        h.ops[n].final_read = true;
        assert_eq!(classes(&h.check()), vec![("final-read-failed", 1)]);
    }

    #[test]
    fn duplicate_value_at_two_offsets() {
        let mut h = H::default();
        h.send(1, 0, 10, OpType::Ok, Some(0))
            .send(1, 0, 11, OpType::Ok, Some(1))
            .poll(3, &[(0, &[(0, 10), (1, 11), (2, 10)])]);
        let r = h.check();
        assert_eq!(r.anomaly_counts["duplicate"], 1);
        assert_eq!(r.anomalies["duplicate"][0]["offsets"], json!([0, 2]));
    }

    #[test]
    fn inconsistent_offsets_two_values_at_one_offset() {
        let mut h = H::default();
        h.send(1, 0, 10, OpType::Ok, Some(0))
            .send(2, 0, 20, OpType::Ok, Some(0));
        let r = h.check();
        assert_eq!(classes(&r), vec![("inconsistent-offsets", 1)]);
        assert_eq!(
            r.anomalies["inconsistent-offsets"][0]["values"],
            json!([10, 20])
        );
        // Reads alone are enough to see it too.
        let mut h2 = H::default();
        h2.send(1, 0, 10, OpType::Info, None)
            .send(2, 0, 20, OpType::Info, None)
            .poll(3, &[(0, &[(0, 10)])])
            .poll(4, &[(0, &[(0, 20)])]);
        assert_eq!(h2.check().anomaly_counts["inconsistent-offsets"], 1);
    }

    #[test]
    fn unexpected_value_never_sent() {
        let mut h = H::default();
        h.send(1, 0, 10, OpType::Ok, Some(0))
            .poll(3, &[(0, &[(0, 10), (1, 99)])]);
        let r = h.check();
        assert_eq!(classes(&r), vec![("unexpected", 1)]);
        assert_eq!(r.anomalies["unexpected"][0]["value"], 99);
    }

    #[test]
    fn aborted_read_of_a_failed_send() {
        let mut h = H::default();
        h.send(1, 0, 10, OpType::Fail, None)
            .poll(3, &[(0, &[(0, 10)])]);
        let r = h.check();
        assert_eq!(classes(&r), vec![("G1a", 1)]);
    }

    #[test]
    fn precommitted_read_of_own_send() {
        let mut h = H::default();
        h.push(
            1,
            OpType::Invoke,
            "txn",
            vec![send(0, 10, None), MicroOp::Poll { reads: None }],
        )
        .push(
            1,
            OpType::Ok,
            "txn",
            vec![send(0, 10, Some(0)), poll(&[(0, &[(0, 10)])])],
        );
        assert_eq!(classes(&h.check()), vec![("precommitted-read", 1)]);
    }

    #[test]
    fn nonmonotonic_send_across_and_within_ops() {
        let mut h = H::default();
        h.send(1, 0, 10, OpType::Ok, Some(5))
            .send(1, 0, 11, OpType::Ok, Some(3))
            .poll(2, &[(0, &[(3, 11), (5, 10)])]);
        assert_eq!(classes(&h.check()), vec![("nonmonotonic-send", 1)]);
        let mut h2 = H::default();
        h2.push(
            1,
            OpType::Invoke,
            "txn",
            vec![send(0, 10, None), send(0, 11, None)],
        )
        .push(
            1,
            OpType::Ok,
            "txn",
            vec![send(0, 10, Some(4)), send(0, 11, Some(2))],
        );
        assert_eq!(classes(&h2.check()), vec![("int-nonmonotonic-send", 1)]);
        // Different processes may interleave freely.
        let mut h3 = H::default();
        h3.send(1, 0, 10, OpType::Ok, Some(5))
            .send(2, 0, 11, OpType::Ok, Some(3))
            .poll(3, &[(0, &[(3, 11), (5, 10)])]);
        assert!(h3.check().valid);
    }

    #[test]
    fn poll_skip_and_nonmonotonic_poll() {
        let base = || {
            let mut h = H::default();
            for (v, o) in [(10, 0), (11, 1), (12, 2)] {
                h.send(1, 0, v, OpType::Ok, Some(o));
            }
            h
        };
        // across polls: read 0, then 2 (skipping 1, which another read saw)
        let mut h = base();
        h.poll(3, &[(0, &[(0, 10)])])
            .poll(3, &[(0, &[(2, 12)])])
            .poll(4, &[(0, &[(0, 10), (1, 11), (2, 12)])]);
        assert_eq!(classes(&h.check()), vec![("poll-skip", 1)]);
        assert_eq!(
            h.check().anomalies["poll-skip"][0]["skipped_offsets"],
            json!([1])
        );
        // backwards across polls
        let mut h = base();
        h.poll(3, &[(0, &[(0, 10), (1, 11)])])
            .poll(3, &[(0, &[(1, 11), (2, 12)])]);
        assert_eq!(classes(&h.check()), vec![("nonmonotonic-poll", 1)]);
        // backwards within one poll
        let mut h = base();
        h.poll(3, &[(0, &[(0, 10), (2, 12), (1, 11)])]);
        let r = h.check();
        assert_eq!(r.anomaly_counts["int-nonmonotonic-poll"], 1);
        assert_eq!(r.anomaly_counts["int-poll-skip"], 1);
        // Gaps in offsets that hold no value are not skips (control batches).
        let mut h = H::default();
        h.send(1, 0, 10, OpType::Ok, Some(0))
            .send(1, 0, 11, OpType::Ok, Some(5))
            .poll(3, &[(0, &[(0, 10)])])
            .poll(3, &[(0, &[(5, 11)])]);
        assert!(h.check().valid);
    }

    #[test]
    fn a_node_log_that_differs_from_the_network_read_of_that_node_diverges() {
        let mut h = H::default();
        h.send(1, 0, 10, OpType::Ok, Some(0))
            .send(1, 0, 11, OpType::Ok, Some(1))
            .final_read(5, 1, &[(0, &[(0, 10), (1, 11)])])
            .final_read(6, 1, &[(0, &[(0, 10), (1, 11)])]);
        let n = h.ops.len();
        for op in &mut h.ops[n - 2..] {
            op.f = "log-read".into();
        }
        assert!(h.check().valid, "{:?}", h.check().anomalies);
        // Node 2's own log holds another value at offset 1 than the leader served.
        h.final_read(7, 2, &[(0, &[(0, 10), (1, 12)])]);
        let n = h.ops.len();
        for op in &mut h.ops[n - 2..] {
            op.f = "log-read".into();
        }
        let r = h.check();
        assert!(r.anomaly_counts["node-divergence"] >= 1);
        assert_eq!(r.anomalies["node-divergence"][0]["kind"], "conflict");
    }

    #[test]
    fn node_divergence_in_final_reads() {
        let mut h = H::default();
        h.send(1, 0, 10, OpType::Ok, Some(0))
            .send(1, 0, 11, OpType::Info, None)
            .final_read(5, 1, &[(0, &[(0, 10), (1, 11)])])
            .final_read(6, 2, &[(0, &[(0, 10), (1, 12)])]);
        let r = h.check();
        // node 2 holds a value nobody sent at offset 1
        assert_eq!(r.anomaly_counts["node-divergence"], 1);
        assert_eq!(r.anomalies["node-divergence"][0]["kind"], "conflict");
        assert_eq!(r.anomaly_counts["inconsistent-offsets"], 1);
        assert_eq!(r.anomaly_counts["unexpected"], 1);
    }

    #[test]
    fn g0_and_g1c_cycles_between_transactions() {
        // T1 writes x=1 then T2 writes x=2 (x: 1 before 2); T2 writes y=1
        // then T1 writes y=2 (y: T2 before T1): a write-write cycle.
        let mut h = H::default();
        h.push(
            1,
            OpType::Invoke,
            "txn",
            vec![send(0, 1, None), send(1, 2, None)],
        )
        .push(
            2,
            OpType::Invoke,
            "txn",
            vec![send(0, 2, None), send(1, 1, None)],
        )
        .push(
            1,
            OpType::Ok,
            "txn",
            vec![send(0, 1, Some(0)), send(1, 2, Some(1))],
        )
        .push(
            2,
            OpType::Ok,
            "txn",
            vec![send(0, 2, Some(1)), send(1, 1, Some(0))],
        );
        let r = h.check();
        assert_eq!(classes(&r), vec![("G0", 1)]);
        // T1 sends x=1 and reads y=1; T2 sends y=1 and reads x=1: each read
        // the other's write, a write-read cycle.
        let mut h = H::default();
        h.push(
            1,
            OpType::Invoke,
            "txn",
            vec![send(0, 1, None), MicroOp::Poll { reads: None }],
        )
        .push(
            2,
            OpType::Invoke,
            "txn",
            vec![send(1, 1, None), MicroOp::Poll { reads: None }],
        )
        .push(
            1,
            OpType::Ok,
            "txn",
            vec![send(0, 1, Some(0)), poll(&[(1, &[(0, 1)])])],
        )
        .push(
            2,
            OpType::Ok,
            "txn",
            vec![send(1, 1, Some(0)), poll(&[(0, &[(0, 1)])])],
        );
        let r = h.check();
        assert_eq!(classes(&r), vec![("G1c", 1)]);
        assert_eq!(r.anomalies["G1c"][0]["deps"], json!(["wr", "wr"]));
    }

    #[test]
    fn malformed_histories_are_errors_not_anomalies() {
        let mut h = H::default();
        h.send(1, 0, 10, OpType::Ok, Some(0))
            .send(2, 0, 10, OpType::Ok, Some(1));
        assert!(matches!(
            check(&h.ops, &CheckOptions::default()),
            Err(CheckError::Malformed { .. })
        ));
        let mut h = H::default();
        h.push(1, OpType::Ok, "send", vec![send(0, 1, Some(0))]);
        assert!(check(&h.ops, &CheckOptions::default()).is_err());
    }

    #[test]
    fn open_invocations_count_as_info() {
        // The history ends while a send is in flight: indeterminate, so its
        // absence is fine, and a read of it counts as a commit.
        let mut h = H::default();
        h.send(1, 0, 10, OpType::Ok, Some(0))
            .push(2, OpType::Invoke, "send", vec![send(0, 11, None)])
            .poll(3, &[(0, &[(0, 10), (1, 11)])]);
        let r = h.check();
        assert!(r.valid, "{:?}", classes(&r));
        assert_eq!(r.ops["send"]["info"], 1);
    }
}
