//! The fault schedule: which fault, against whom, when and for how long,
//! decided from a seed before the run starts. Pure: the same seed and
//! configuration always give the same plan, so a run's faults replay from
//! its printed seed (the cluster's own timing still varies between runs).
//!
//! Shape, after Jepsen's: a quiet start; then a fault about every
//! `interval`; the first round injects every enabled fault once (so even a
//! one-minute smoke sees each); after it, every `rotate` period picks a new
//! random mixture of the enabled faults, or none (a fault-free window);
//! every fault heals before the time limit.

use std::fmt;

/// A deterministic generator (SplitMix64): small, stable across versions
/// and platforms, which is what replaying a seed needs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`; 0 gives 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo))
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// A fresh generator for a sub-task, independent of later draws here.
    pub fn fork(&mut self, salt: u64) -> Rng {
        Rng(self.next_u64() ^ salt.wrapping_mul(0xD6E8_FEB8_6659_FD93))
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// SIGKILL the targets, restart them when the fault ends.
    Kill,
    /// SIGSTOP the targets, SIGCONT when it ends.
    Pause,
    /// Drop packets between groups of nodes (and the clients).
    Partition,
    /// Remove a node from the cluster (`remove-node`: its replicas move
    /// away, it stops), then wipe it and add it back as a new, empty node
    /// (`add-node`: replicas move onto it). Needs more nodes than replicas.
    Membership,
    /// Deliberately unsafe, to prove the checker catches loss: snapshot a
    /// node's data directory (while it is stopped), let it acknowledge more
    /// writes, then kill it and put the snapshot back, like a disk that
    /// ignored fsync and lost power.
    Rollback,
}

impl FaultKind {
    pub const ALL: [FaultKind; 5] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Partition,
        FaultKind::Membership,
        FaultKind::Rollback,
    ];

    /// The fault a history `f` starts, if it starts one.
    pub fn started_by(f: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.names().0 == f)
    }

    /// Whether a history `f` ends a fault (`heal-all` ends any).
    pub fn is_end(f: &str) -> bool {
        f == "heal-all" || Self::ALL.iter().any(|k| k.names().1 == f)
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "kill" => Some(FaultKind::Kill),
            "pause" => Some(FaultKind::Pause),
            "partition" => Some(FaultKind::Partition),
            "membership" => Some(FaultKind::Membership),
            "rollback" => Some(FaultKind::Rollback),
            _ => None,
        }
    }
    /// History `f` of the fault's start and end.
    pub fn names(self) -> (&'static str, &'static str) {
        match self {
            FaultKind::Kill => ("kill", "restart"),
            FaultKind::Pause => ("pause", "resume"),
            FaultKind::Partition => ("partition", "heal"),
            FaultKind::Membership => ("leave", "rejoin"),
            FaultKind::Rollback => ("snapshot", "rollback"),
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Partition => "partition",
            FaultKind::Membership => "membership",
            FaultKind::Rollback => "rollback",
        })
    }
}

/// Which nodes a process fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    One,
    Minority,
    Majority,
    All,
    /// The current leaders of the run's partitions.
    Leaders,
}

/// How a partition splits the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One node cut off from every other node and from the clients.
    IsolateOne,
    /// A minority cut off from the majority (the clients stay with the majority).
    Halves,
    /// Two halves that only one bridge node connects.
    Bridge,
    /// Each node reaches only its two ring neighbours (the clients reach all).
    Ring,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    /// Start, ms after the run starts.
    pub at_ms: u64,
    /// How long it lasts before it heals.
    pub hold_ms: u64,
    pub kind: FaultKind,
    pub target: Target,
    pub shape: Shape,
    /// Randomness for resolving targets at run time (which node is "one").
    pub pick: u64,
}

#[derive(Clone, Debug)]
pub struct ScheduleConfig {
    pub time_limit_ms: u64,
    pub quiet_start_ms: u64,
    /// Mean time between fault starts.
    pub interval_ms: u64,
    /// How often the mixture of faults changes.
    pub rotate_ms: u64,
    pub kinds: Vec<FaultKind>,
    /// Chance that a rotation period is fault-free (after the first round).
    pub quiet_window_chance: f64,
    /// Aim every fault of the first round at this target (the unsafe-ack
    /// self-test aims them at the leaders, where acknowledged-but-
    /// uncommitted writes live, so every run sees them lost).
    pub first_round_target: Option<Target>,
}

impl ScheduleConfig {
    pub fn new(time_limit_ms: u64, kinds: Vec<FaultKind>) -> Self {
        Self {
            time_limit_ms,
            quiet_start_ms: 5_000,
            interval_ms: 10_000,
            rotate_ms: 30_000,
            kinds,
            quiet_window_chance: 0.2,
            first_round_target: None,
        }
    }
}

/// Faults never start within this many ms of the time limit: each must heal
/// and the cluster settle before the clients stop.
const END_MARGIN_MS: u64 = 3_000;
/// Shortest and longest fault, as fractions of the interval (a fault shorter
/// than the clients' op timeout would go unnoticed; one as long as the
/// interval would leave no healthy time between faults).
const HOLD_MIN_FRACTION: f64 = 0.3;
const HOLD_MAX_FRACTION: f64 = 0.6;

/// The plan for a run. Faults do not overlap.
pub fn plan(seed: u64, cfg: &ScheduleConfig) -> Vec<Fault> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    if cfg.kinds.is_empty() || cfg.interval_ms == 0 {
        return out;
    }
    // The first round: each enabled fault once, in random order.
    let mut first_round = cfg.kinds.clone();
    rng.shuffle(&mut first_round);
    let mut t = cfg.quiet_start_ms;
    let mut mixture: Vec<FaultKind> = cfg.kinds.clone();
    let mut period_end = 0u64;
    let hold_lo = (cfg.interval_ms as f64 * HOLD_MIN_FRACTION) as u64;
    let hold_hi = ((cfg.interval_ms as f64 * HOLD_MAX_FRACTION) as u64).max(hold_lo + 1);
    loop {
        let hold = rng.range(hold_lo, hold_hi);
        if t + hold + END_MARGIN_MS > cfg.time_limit_ms {
            break;
        }
        let in_first_round = !first_round.is_empty();
        let kind = if !first_round.is_empty() {
            let k = first_round.remove(0);
            if first_round.is_empty() {
                period_end = t + cfg.rotate_ms;
            }
            Some(k)
        } else {
            if t >= period_end {
                period_end = t + cfg.rotate_ms;
                mixture = if rng.unit() < cfg.quiet_window_chance {
                    Vec::new()
                } else {
                    let mut m: Vec<FaultKind> = cfg
                        .kinds
                        .iter()
                        .copied()
                        .filter(|_| rng.unit() < 0.5)
                        .collect();
                    if m.is_empty() {
                        m.push(cfg.kinds[rng.below(cfg.kinds.len() as u64) as usize]);
                    }
                    m
                };
            }
            if mixture.is_empty() {
                None
            } else {
                Some(mixture[rng.below(mixture.len() as u64) as usize])
            }
        };
        if let Some(kind) = kind {
            let target = match rng.below(5) {
                0 => Target::One,
                1 => Target::Minority,
                2 => Target::Majority,
                3 => Target::All,
                _ => Target::Leaders,
            };
            let target = match cfg.first_round_target {
                Some(t) if in_first_round => t,
                _ => target,
            };
            let shape = match rng.below(4) {
                0 => Shape::IsolateOne,
                1 => Shape::Halves,
                2 => Shape::Bridge,
                _ => Shape::Ring,
            };
            out.push(Fault {
                at_ms: t,
                hold_ms: hold,
                kind,
                target: if matches!(kind, FaultKind::Rollback | FaultKind::Membership) {
                    // Both act on one node's data directory.
                    Target::One
                } else {
                    target
                },
                shape,
                pick: rng.next_u64(),
            });
        }
        // Next start: about one interval later, never before this one healed.
        let gap = rng.range(cfg.interval_ms * 7 / 10, cfg.interval_ms * 13 / 10);
        t += gap.max(hold + 1_000);
    }
    out
}

/// Nodes (1-based ids) a process fault hits among `n`; `leaders` are the
/// current partition leaders (empty when unknown).
pub fn resolve_targets(target: Target, n: u32, leaders: &[u32], pick: u64) -> Vec<u32> {
    let mut rng = Rng::new(pick);
    let mut ids: Vec<u32> = (1..=n).collect();
    rng.shuffle(&mut ids);
    let take = match target {
        Target::One => 1,
        Target::Minority => ((n.saturating_sub(1)) / 2).max(1),
        Target::Majority => n / 2 + 1,
        Target::All => n,
        Target::Leaders => {
            // With a few partitions spread over a few nodes every node
            // leads something, and "the leaders" would be "all". Take the
            // nodes leading the most partitions, at most a minority, so a
            // quorum survives and the fault is a failover, not an outage
            // ("all" and "majority" cover outages).
            let mut count: Vec<(u32, usize)> = Vec::new();
            for &l in leaders.iter().filter(|x| (1..=n).contains(*x)) {
                match count.iter_mut().find(|(id, _)| *id == l) {
                    Some(c) => c.1 += 1,
                    None => count.push((l, 1)),
                }
            }
            if !count.is_empty() {
                // Ties go by the seeded shuffle, not by node id.
                count.sort_by_key(|(id, c)| {
                    (
                        std::cmp::Reverse(*c),
                        ids.iter().position(|x| x == id).unwrap_or(0),
                    )
                });
                let cap = ((n.saturating_sub(1)) / 2).max(1) as usize;
                let mut l: Vec<u32> = count.into_iter().take(cap).map(|(id, _)| id).collect();
                l.sort_unstable();
                return l;
            }
            1
        }
    } as usize;
    let mut out: Vec<u32> = ids.into_iter().take(take.min(n as usize)).collect();
    out.sort_unstable();
    out
}

/// Links that cut `isolated` nodes from every other node, leaving the
/// clients connected to all: a leader cut off this way keeps receiving
/// publishes it cannot commit (each must time out unacknowledged; a broker
/// that acknowledges before commit loses them when the partition heals).
/// With nothing to cut from (one node, or every node isolated) it falls
/// back to isolating the first target from the clients as well.
pub fn isolate_from_nodes(isolated: &[u32], n: u32) -> Vec<(End, End)> {
    let mut cut = Vec::new();
    for &a in isolated {
        for b in (1..=n).filter(|b| !isolated.contains(b)) {
            let p = if a < b {
                (End::Node(a), End::Node(b))
            } else {
                (End::Node(b), End::Node(a))
            };
            if !cut.contains(&p) {
                cut.push(p);
            }
        }
    }
    if cut.is_empty() {
        if let Some(&a) = isolated.first() {
            cut.push((End::Node(a), End::Clients));
        }
    }
    cut.sort_unstable();
    cut
}

/// One side of a blocked link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum End {
    Node(u32),
    /// The host the clients run on.
    Clients,
}

/// The shape a partition of `n` nodes really takes: a ring needs four
/// nodes to differ from isolating one, a bridge three.
pub fn effective_shape(shape: Shape, n: u32) -> Shape {
    match shape {
        Shape::Ring if n < 4 => Shape::IsolateOne,
        Shape::Bridge if n < 3 => Shape::Halves,
        s => s,
    }
}

/// Links to cut for a partition of `n` nodes, each pair once, (a, b) with a < b.
/// Shapes that need more nodes than there are fall back to the nearest one
/// that still cuts something: with one node, every shape isolates it from
/// the clients.
pub fn partition_links(shape: Shape, n: u32, pick: u64) -> Vec<(End, End)> {
    let mut rng = Rng::new(pick);
    let mut ids: Vec<u32> = (1..=n).collect();
    rng.shuffle(&mut ids);
    let shape = effective_shape(shape, n);
    let mut cut = Vec::new();
    let mut block = |a: End, b: End| {
        let p = if a < b { (a, b) } else { (b, a) };
        if a != b && !cut.contains(&p) {
            cut.push(p);
        }
    };
    match shape {
        Shape::IsolateOne => {
            let x = ids[0];
            for &y in &ids[1..] {
                block(End::Node(x), End::Node(y));
            }
            block(End::Node(x), End::Clients);
        }
        Shape::Halves => {
            let minority = (n / 2).max(1) as usize;
            let (small, big) = ids.split_at(minority);
            for &a in small {
                for &b in big {
                    block(End::Node(a), End::Node(b));
                }
                block(End::Node(a), End::Clients);
            }
        }
        Shape::Bridge => {
            let bridge = ids[0];
            let rest = &ids[1..];
            let (a_side, b_side) = rest.split_at(rest.len() / 2);
            for &a in a_side {
                for &b in b_side {
                    block(End::Node(a), End::Node(b));
                }
                block(End::Node(a), End::Clients);
            }
            let _ = bridge; // connected to both sides and to the clients
        }
        Shape::Ring => {
            let len = ids.len();
            for i in 0..len {
                for j in i + 1..len {
                    let adjacent = j == i + 1 || (i == 0 && j == len - 1);
                    if !adjacent {
                        block(End::Node(ids[i]), End::Node(ids[j]));
                    }
                }
            }
        }
    }
    cut.sort_unstable();
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(limit_s: u64, kinds: &[FaultKind]) -> ScheduleConfig {
        ScheduleConfig::new(limit_s * 1000, kinds.to_vec())
    }

    #[test]
    fn same_seed_same_plan_and_different_seed_differs() {
        let c = cfg(
            300,
            &[FaultKind::Kill, FaultKind::Pause, FaultKind::Partition],
        );
        assert_eq!(plan(7, &c), plan(7, &c));
        assert_ne!(plan(7, &c), plan(8, &c));
    }

    #[test]
    fn plan_has_quiet_start_no_overlap_heals_before_the_end_and_rotates() {
        let c = cfg(
            300,
            &[FaultKind::Kill, FaultKind::Pause, FaultKind::Partition],
        );
        for seed in 0..50 {
            let p = plan(seed, &c);
            assert!(
                p.len() >= 10,
                "seed {seed}: only {} faults in 300 s",
                p.len()
            );
            assert!(p[0].at_ms >= c.quiet_start_ms);
            for w in p.windows(2) {
                assert!(
                    w[0].at_ms + w[0].hold_ms < w[1].at_ms,
                    "seed {seed}: overlap"
                );
            }
            for f in &p {
                assert!(f.at_ms + f.hold_ms + END_MARGIN_MS <= c.time_limit_ms);
                assert!(f.hold_ms >= 3_000 && f.hold_ms < 6_000);
            }
            // every enabled fault appears in the first round
            let first: Vec<_> = p.iter().take(3).map(|f| f.kind).collect();
            for k in &c.kinds {
                assert!(first.contains(k), "seed {seed}: first round misses {k}");
            }
            // gaps average about one interval; fault-free windows make some longer
            let mean_gap = (p[p.len() - 1].at_ms - p[0].at_ms) / (p.len() as u64 - 1);
            assert!(
                (7_000..=20_000).contains(&mean_gap),
                "seed {seed}: mean gap {mean_gap}"
            );
        }
        // Over many seeds, some rotation period is fault-free (a gap of a
        // whole rotation).
        let quiet = (0..50).any(|s| {
            plan(s, &c)
                .windows(2)
                .any(|w| w[1].at_ms - w[0].at_ms > c.rotate_ms)
        });
        assert!(quiet, "no fault-free window in 50 seeds");
    }

    #[test]
    fn first_round_can_be_aimed_at_the_leaders() {
        let mut c = cfg(60, &[FaultKind::Kill, FaultKind::Partition]);
        c.first_round_target = Some(Target::Leaders);
        for seed in 0..20 {
            let p = plan(seed, &c);
            assert!(p[..2].iter().all(|f| f.target == Target::Leaders));
        }
    }

    #[test]
    fn one_minute_smoke_sees_kill_and_partition() {
        let c = cfg(60, &[FaultKind::Kill, FaultKind::Partition]);
        for seed in 0..100 {
            let kinds: Vec<_> = plan(seed, &c).iter().map(|f| f.kind).collect();
            assert!(kinds.contains(&FaultKind::Kill) && kinds.contains(&FaultKind::Partition));
        }
    }

    #[test]
    fn targets_resolve_to_the_right_sizes() {
        assert_eq!(resolve_targets(Target::One, 5, &[], 1).len(), 1);
        assert_eq!(resolve_targets(Target::Minority, 5, &[], 1).len(), 2);
        assert_eq!(resolve_targets(Target::Majority, 5, &[], 1).len(), 3);
        assert_eq!(resolve_targets(Target::All, 5, &[], 1), vec![1, 2, 3, 4, 5]);
        assert_eq!(
            resolve_targets(Target::Leaders, 5, &[3, 3, 1], 1),
            vec![1, 3]
        );
        // At most a minority: of three nodes, the one leading the most.
        assert_eq!(
            resolve_targets(Target::Leaders, 3, &[1, 2, 2, 3], 4),
            vec![2]
        );
        assert_eq!(
            resolve_targets(Target::Leaders, 5, &[5, 4, 4, 2, 2, 2, 1], 4),
            vec![2, 4]
        );
        assert_eq!(resolve_targets(Target::Leaders, 5, &[], 1).len(), 1);
        for t in [Target::One, Target::Minority, Target::Majority, Target::All] {
            assert_eq!(resolve_targets(t, 1, &[], 9), vec![1]);
        }
    }

    #[test]
    fn isolating_leaders_from_nodes_keeps_the_clients() {
        use End::*;
        assert_eq!(
            isolate_from_nodes(&[2], 3),
            vec![(Node(1), Node(2)), (Node(2), Node(3))]
        );
        assert_eq!(isolate_from_nodes(&[1, 4], 5).len(), 6);
        assert_eq!(isolate_from_nodes(&[1], 1), vec![(Node(1), Clients)]);
    }

    #[test]
    fn every_fault_kind_round_trips_through_its_history_names() {
        for k in FaultKind::ALL {
            let (start, end) = k.names();
            assert_eq!(FaultKind::started_by(start), Some(k), "{k}");
            assert!(FaultKind::is_end(end), "{k}");
            assert!(!FaultKind::is_end(start), "{k}");
            assert_eq!(FaultKind::parse(&k.to_string()), Some(k));
        }
        assert!(FaultKind::is_end("heal-all"));
        assert_eq!(FaultKind::started_by("restart"), None);
    }

    #[test]
    fn membership_faults_act_on_one_node() {
        let cfg = ScheduleConfig::new(300_000, vec![FaultKind::Membership, FaultKind::Kill]);
        let p = plan(7, &cfg);
        let m: Vec<&Fault> = p
            .iter()
            .filter(|f| f.kind == FaultKind::Membership)
            .collect();
        assert!(m.len() >= 3, "{p:?}");
        assert!(m.iter().all(|f| f.target == Target::One), "{m:?}");
    }

    #[test]
    fn partition_shapes() {
        use End::*;
        // One node: every shape cuts it from the clients.
        for s in [Shape::IsolateOne, Shape::Halves, Shape::Bridge, Shape::Ring] {
            assert_eq!(partition_links(s, 1, 3), vec![(Node(1), Clients)]);
        }
        // Isolate one of three: two node links and the clients.
        let cut = partition_links(Shape::IsolateOne, 3, 5);
        assert_eq!(cut.len(), 3);
        // Halves of five: 2 x 3 node links plus two client links.
        let cut = partition_links(Shape::Halves, 5, 5);
        assert_eq!(cut.len(), 8);
        assert_eq!(cut.iter().filter(|(_, b)| *b == Clients).count(), 2);
        // Bridge of five: sides of 2 and 2 cut from each other (4), one side
        // from the clients (2); the bridge node keeps every link.
        let cut = partition_links(Shape::Bridge, 5, 5);
        assert_eq!(cut.len(), 6);
        let touched: std::collections::BTreeSet<End> =
            cut.iter().flat_map(|(a, b)| [*a, *b]).collect();
        assert_eq!(
            touched.len(),
            5,
            "all but the bridge node are cut somewhere: {cut:?}"
        );
        // Ring of five: each node keeps two neighbours, so 10 - 5 links cut.
        let cut = partition_links(Shape::Ring, 5, 5);
        assert_eq!(cut.len(), 5);
        assert!(cut.iter().all(|(_, b)| *b != Clients));
    }
}
