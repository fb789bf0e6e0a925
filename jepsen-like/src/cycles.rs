//! Dependency graphs between operations and the cycles in them (G0: only
//! write-write edges; G1c: write-write and write-read edges). Pure: nodes
//! are history op indices, edges carry their dependency kind.
//!
//! With the send/poll workloads of today a cycle cannot form (a poll only
//! reads, a send only writes), so these checks find something only once
//! `txn` operations mix sends and polls; the checker still runs them on
//! every history so transactional workloads need no new plumbing.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dep {
    /// The first op wrote a version the second op's write directly follows.
    Ww,
    /// The second op read a version the first op wrote.
    Wr,
}

#[derive(Default, Debug)]
pub struct Graph {
    /// from → to → kinds of dependency between them
    edges: BTreeMap<u64, BTreeMap<u64, BTreeSet<Dep>>>,
}

/// A cycle: ops in order, and the dependency from each op to the next (the
/// last one closes the cycle back to the first).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Cycle {
    pub ops: Vec<u64>,
    pub deps: Vec<Dep>,
}

impl Cycle {
    /// G0 when every step is write-write, G1c otherwise.
    pub fn class(&self) -> &'static str {
        if self.deps.iter().all(|d| *d == Dep::Ww) {
            "G0"
        } else {
            "G1c"
        }
    }
}

impl Graph {
    pub fn add(&mut self, from: u64, to: u64, dep: Dep) {
        if from != to {
            self.edges
                .entry(from)
                .or_default()
                .entry(to)
                .or_default()
                .insert(dep);
            self.edges.entry(to).or_default();
        }
    }

    /// Strongly connected components with more than one node (iterative
    /// Tarjan: histories have chains of tens of thousands of writes, too
    /// deep for recursion).
    pub fn sccs(&self) -> Vec<Vec<u64>> {
        let nodes: Vec<u64> = self.edges.keys().copied().collect();
        let pos: HashMap<u64, usize> = nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let succ: Vec<Vec<usize>> = nodes
            .iter()
            .map(|n| {
                self.edges
                    .get(n)
                    .map(|m| m.keys().filter_map(|t| pos.get(t).copied()).collect())
                    .unwrap_or_default()
            })
            .collect();
        let n = nodes.len();
        let mut index = vec![usize::MAX; n];
        let mut low = vec![0usize; n];
        let mut on_stack = vec![false; n];
        let mut stack = Vec::new();
        let mut next = 0usize;
        let mut out = Vec::new();
        for root in 0..n {
            if index[root] != usize::MAX {
                continue;
            }
            // (node, next successor position to visit)
            let mut work: Vec<(usize, usize)> = vec![(root, 0)];
            index[root] = next;
            low[root] = next;
            next += 1;
            stack.push(root);
            on_stack[root] = true;
            while let Some(&mut (v, ref mut i)) = work.last_mut() {
                if let Some(&w) = succ[v].get(*i) {
                    *i += 1;
                    if index[w] == usize::MAX {
                        index[w] = next;
                        low[w] = next;
                        next += 1;
                        stack.push(w);
                        on_stack[w] = true;
                        work.push((w, 0));
                    } else if on_stack[w] {
                        low[v] = low[v].min(index[w]);
                    }
                } else {
                    work.pop();
                    if let Some(&(parent, _)) = work.last() {
                        low[parent] = low[parent].min(low[v]);
                    }
                    if low[v] == index[v] {
                        let mut comp = Vec::new();
                        while let Some(w) = stack.pop() {
                            on_stack[w] = false;
                            comp.push(nodes[w]);
                            if w == v {
                                break;
                            }
                        }
                        if comp.len() > 1 {
                            comp.sort_unstable();
                            out.push(comp);
                        }
                    }
                }
            }
        }
        out
    }

    /// One shortest cycle through the first node of each component,
    /// staying inside the component.
    pub fn cycles(&self) -> Vec<Cycle> {
        self.sccs()
            .into_iter()
            .filter_map(|comp| self.cycle_in(&comp))
            .collect()
    }

    fn cycle_in(&self, comp: &[u64]) -> Option<Cycle> {
        let members: BTreeSet<u64> = comp.iter().copied().collect();
        let start = *comp.first()?;
        // Breadth-first from start until an edge returns to it.
        let mut parent: HashMap<u64, u64> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        let mut closing = None;
        while let Some(v) = queue.pop_front() {
            for to in self.edges.get(&v).into_iter().flat_map(|m| m.keys()) {
                if !members.contains(to) {
                    continue;
                }
                if *to == start {
                    closing = Some(v);
                    break;
                }
                if !parent.contains_key(to) {
                    parent.insert(*to, v);
                    queue.push_back(*to);
                }
            }
            if closing.is_some() {
                break;
            }
        }
        let mut path = vec![closing?];
        while let Some(p) = parent.get(path.last()?) {
            path.push(*p);
        }
        if path.last() != Some(&start) {
            path.push(start);
        }
        path.reverse();
        // Prefer the weakest dependency for the class (ww before wr), so a
        // pure write-write cycle is reported as G0.
        let deps = path
            .iter()
            .zip(path.iter().cycle().skip(1))
            .map(|(a, b)| {
                self.edges
                    .get(a)
                    .and_then(|m| m.get(b))
                    .and_then(|s| s.iter().next().copied())
                    .unwrap_or(Dep::Wr)
            })
            .collect();
        Some(Cycle { ops: path, deps })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ww_cycle_as_g0_and_mixed_as_g1c() {
        let mut g = Graph::default();
        g.add(1, 2, Dep::Ww);
        g.add(2, 1, Dep::Ww);
        g.add(10, 11, Dep::Ww);
        g.add(11, 12, Dep::Wr);
        g.add(12, 10, Dep::Ww);
        g.add(20, 21, Dep::Wr); // acyclic tail
        let mut classes: Vec<_> = g.cycles().iter().map(|c| c.class()).collect();
        classes.sort_unstable();
        assert_eq!(classes, vec!["G0", "G1c"]);
        let c = g
            .cycles()
            .into_iter()
            .find(|c| c.ops.contains(&10))
            .unwrap();
        assert_eq!(c.ops, vec![10, 11, 12]);
        assert_eq!(c.deps, vec![Dep::Ww, Dep::Wr, Dep::Ww]);
    }

    #[test]
    fn long_chain_is_acyclic_and_does_not_overflow() {
        let mut g = Graph::default();
        for i in 0..200_000u64 {
            g.add(i, i + 1, Dep::Ww);
        }
        assert!(g.cycles().is_empty());
        g.add(200_000, 0, Dep::Wr);
        let cs = g.cycles();
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].ops.len(), 200_001);
        assert_eq!(cs[0].class(), "G1c");
    }
}
