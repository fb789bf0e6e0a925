//! Quiet groups: a group with nothing to replicate stops its Raft timers on
//! every replica, and node-to-node pings stand in for its heartbeats.
//!
//! Why: every openraft instance ticks every `heartbeat × 13/64` (~20 ms) and
//! its leader sends each follower a heartbeat RPC every interval, idle or
//! not. Profiled at 300 partitions per node (3 nodes, 100 ms heartbeat) that
//! was 30 % of a core per node, about half in openraft's own loop (ticks,
//! heartbeat bookkeeping, metrics), a third in QUIC streams; batching only
//! the RPCs could not remove the per-group loop work. A quiet group costs
//! nothing: its timer task parks and nothing is sent for it.
//!
//! The protocol. Each node pings each peer once per heartbeat interval
//! ([`Ping`], one RPC whatever the number of groups); the ping carries the
//! node's incarnation (random per process) and one [`QuietClaim`] per group
//! the sender leads and wants quiet: "I lead it at this vote, its last entry
//! is this committed one". The peer answers every claim on its own
//! ([`QuietAnswer`]).
//!
//! - Leader: a group is *asked* quiet when it is led here, not joint,
//!   everything is committed and replicated to every target, and none of
//!   that changed for `idle_before`. Its timers keep running while it asks.
//!   Once every voter this node hears from answered `Quiet` (and those plus
//!   this node are a majority), it stops its own timer.
//! - Follower: it answers `Quiet` only when its replica is exactly as
//!   claimed (follower at that very vote, same last and committed entry);
//!   then it stops its timer. Each further claim renews a lease of
//!   `lease` (the election timeout maximum, openraft's own leader lease).
//!
//! Waking: any change of a quiet replica's role, vote, log, commit point or
//! membership restarts its timer at once (polled every interval; a write
//! reaches the followers as an append, which changes their log). A follower
//! whose lease runs out (the leader's node died, or it stopped claiming the
//! group) or whose leader restarted (new incarnation) restarts its timer
//! after a rank-staggered delay: openraft then finds the election timeout
//! long passed and campaigns (pre-vote first). The stagger, like openraft's
//! randomized timeout, keeps the surviving replicas from splitting the vote.
//! A leader wakes when a voter answers anything but `Quiet` or restarts, and
//! when its own Raft core stops answering a probe for seconds (a hung core
//! must not keep claiming).
//!
//! Writes: openraft 0.10 refuses a write on a leader whose quorum lease ran
//! out, which a quiet leader's has. Whoever proposes to a partition calls
//! [`crate::network::GroupRegistry::ready_to_write`] first: a quiet leader
//! restarts its timer and sends one heartbeat round (one round trip) before
//! the write goes in. The controller group never goes quiet: its writes are
//! proposed without that call, and one group's heartbeats cost nothing.
//!
//! Votes: a quiet replica has no fresh openraft lease (no heartbeats reach
//! it), so while its quiet lease holds, the network layer refuses
//! pre-votes and votes for the group itself ([`Quiescer::refuses_vote`]), as
//! openraft would within its lease. Leadership transfers are never refused.
//!
//! Safety does not depend on any of this: quiescing only starts and stops
//! timers and refuses votes, which can delay an election but never make two
//! leaders of one term or lose a committed entry. What it must get right is
//! liveness (a dead leader is replaced within about the same time as
//! without it), which `raft/tests` and the cluster tests check.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrowbus_wire::peer::{
    Ping, Pong, QuietAnswer, QuietClaim, VoteResponse, WireLogId, WireVote, CONTROLLER_GROUP,
};
use tokio::time::Instant;

use crate::lock;
use crate::network::GroupRpc;
use crate::types::NodeId;

/// A replica's role as far as quiescing cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
    /// Candidate, learner, shutting down.
    Other,
}

/// What the quiescer reads of a replica each interval (from its metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    /// False once the group's Raft core stopped with a fatal error.
    pub running: bool,
    pub role: Role,
    pub vote: WireVote,
    pub last_log_index: Option<u64>,
    /// The last entry this replica knows to be committed.
    pub committed: Option<WireLogId>,
    /// Log id of the effective membership (members are re-read when it
    /// changes).
    pub membership: Option<WireLogId>,
    /// Leader only: every replication target holds the last entry.
    pub replicated: bool,
}

/// A group's members, read when its membership changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Members {
    /// Sorted. Empty while the membership is joint (never quiet then).
    pub voters: Vec<NodeId>,
    /// Every member (voters and learners) with its address.
    pub addrs: Vec<(NodeId, String)>,
}

/// The part of a status that must not change while a group is quiet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    role: Role,
    vote: WireVote,
    last: Option<u64>,
    committed: Option<WireLogId>,
    membership: Option<WireLogId>,
}

impl Fingerprint {
    fn of(s: &GroupStatus) -> Self {
        Self {
            role: if s.running { s.role } else { Role::Other },
            vote: s.vote,
            last: s.last_log_index,
            committed: s.committed,
            membership: s.membership,
        }
    }
}

/// Timing, derived from the groups' Raft timing (see [`QuietConfig::new`]).
#[derive(Clone, Debug)]
pub struct QuietConfig {
    /// Ping interval (the heartbeat interval).
    pub ping_every: Duration,
    /// A claim holds for this long; a peer unheard for this long counts as
    /// gone (the election timeout maximum, openraft's leader lease).
    pub lease: Duration,
    /// How long after its lease ran out the first successor of a quiet
    /// leader campaigns (the election timeout minimum), and the extra delay
    /// per further rank (the width of the election timeout range): like
    /// openraft's randomized timeout after its lease, a successor campaigns
    /// 750–1000 ms after the last word from its leader.
    pub wake_base: Duration,
    pub stagger: Duration,
    /// How long a led group must stay unchanged before it is asked quiet.
    pub idle_before: Duration,
    /// How often a quiet leader's Raft core is probed, and how long it may
    /// take to answer. Generous: a core that is only slow (a loaded node)
    /// must not give up its groups; one that hangs does within seconds.
    pub probe_every: Duration,
    pub probe_timeout: Duration,
    /// How often a quiet replica's Raft state is read (see
    /// [`Quiescer::round`]).
    pub quiet_poll: Duration,
}

impl QuietConfig {
    pub fn new(
        heartbeat: Duration,
        election_min: Duration,
        election_max: Duration,
        idle_before: Duration,
    ) -> Self {
        Self {
            ping_every: heartbeat,
            lease: election_max,
            wake_base: election_min.max(heartbeat * 2),
            stagger: election_max.saturating_sub(election_min),
            idle_before,
            probe_every: (election_max * 4).max(Duration::from_secs(2)),
            probe_timeout: (election_max * 4).max(Duration::from_secs(2)),
            quiet_poll: heartbeat * 5,
        }
    }

    /// Most pings to one peer unanswered at a time: a lease's worth.
    pub fn max_in_flight(&self) -> usize {
        let n = self.lease.as_millis() / self.ping_every.as_millis().max(1);
        usize::try_from(n).unwrap_or(usize::MAX).max(1)
    }
}

/// Where a group stands on this node.
#[derive(Clone, Debug)]
enum Phase {
    /// Timers running: openraft's own behaviour. `since`: when the
    /// fingerprint last changed. `shield`: a leader woken from quiet for a
    /// voter's sake keeps refusing votes until then (see
    /// [`Quiescer::refuses_vote`]).
    Active {
        fp: Fingerprint,
        since: Instant,
        shield: Option<Instant>,
    },
    /// Led here; the voters are asked to go quiet, timers still run.
    Asking {
        fp: Fingerprint,
        since: Instant,
        quiet: BTreeSet<NodeId>,
    },
    /// Led here and quiet: timer stopped.
    QuietLeader { fp: Fingerprint, probed: Instant },
    /// Following `leader` (of incarnation `incarnation`) quietly: timer
    /// stopped; `claimed`: the last matching claim.
    QuietFollower {
        fp: Fingerprint,
        leader: NodeId,
        incarnation: u64,
        claimed: Instant,
    },
    /// A quiet leader is gone: the timer restarts at `at`.
    Waking { fp: Fingerprint, at: Instant },
}

impl Phase {
    fn fp(&self) -> &Fingerprint {
        match self {
            Phase::Active { fp, .. }
            | Phase::Asking { fp, .. }
            | Phase::QuietLeader { fp, .. }
            | Phase::QuietFollower { fp, .. }
            | Phase::Waking { fp, .. } => fp,
        }
    }
    fn is_quiet(&self) -> bool {
        matches!(
            self,
            Phase::QuietLeader { .. } | Phase::QuietFollower { .. }
        )
    }
}

struct GroupState {
    phase: Phase,
    members: Members,
    members_of: Option<Option<WireLogId>>,
    /// When its state was last read.
    polled: Instant,
}

#[derive(Default)]
struct Peer {
    addr: String,
    /// Last ping or pong received from it.
    heard: Option<Instant>,
    incarnation: Option<u64>,
    /// The highest ping sequence number seen from it (this incarnation).
    seq: u64,
    /// Pings to it not yet answered (nor timed out).
    in_flight: usize,
}

#[derive(Default)]
struct Inner {
    groups: HashMap<u64, GroupState>,
    peers: BTreeMap<NodeId, Peer>,
    /// Sequence number of the last ping sent.
    seq: u64,
    logged: (usize, usize),
    logged_at: Option<Instant>,
}

/// What a quiet replica is, for tests and diagnostics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quiet {
    /// Timers running.
    No,
    /// Led here, voters asked.
    Asking,
    Leader,
    /// Quiet under this leader.
    Follower(NodeId),
    /// Timer restarts soon (its quiet leader is gone).
    Waking,
}

/// A ping to send this round.
#[derive(Debug)]
pub struct OutPing {
    pub peer: NodeId,
    pub addr: String,
    pub ping: Ping,
}

/// One interval's work: pings to send, quiet leaders' cores to probe, and
/// timers to restart at a given time (see [`Quiescer::wake_due`]).
pub struct Round {
    pub pings: Vec<OutPing>,
    pub probes: Vec<(u64, Arc<dyn GroupRpc>)>,
    pub wakes: Vec<(u64, Arc<dyn GroupRpc>, Instant)>,
}

/// The node's quiescer: one per node, shared by every group (it lives in
/// the [`crate::network::GroupRegistry`]).
pub struct Quiescer {
    me: NodeId,
    cfg: QuietConfig,
    incarnation: u64,
    inner: Mutex<Inner>,
}

impl Quiescer {
    pub fn new(me: NodeId, cfg: QuietConfig, incarnation: u64) -> Self {
        Self {
            me,
            cfg,
            incarnation,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn config(&self) -> &QuietConfig {
        &self.cfg
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// How group `group` stands here.
    pub fn quiet(&self, group: u64) -> Quiet {
        match lock(&self.inner).groups.get(&group).map(|g| &g.phase) {
            None | Some(Phase::Active { .. }) => Quiet::No,
            Some(Phase::Asking { .. }) => Quiet::Asking,
            Some(Phase::QuietLeader { .. }) => Quiet::Leader,
            Some(Phase::QuietFollower { leader, .. }) => Quiet::Follower(*leader),
            Some(Phase::Waking { .. }) => Quiet::Waking,
        }
    }

    /// Quiet groups here: (led, followed).
    pub fn counts(&self) -> (usize, usize) {
        counts(&lock(&self.inner))
    }

    /// One interval: read every group, move it between phases, note gone
    /// peers, and say which pings to send and which cores to probe.
    pub fn round(&self, groups: &[(u64, Arc<dyn GroupRpc>)], now: Instant) -> Round {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        // Groups no longer hosted are forgotten.
        let hosted: BTreeSet<u64> = groups.iter().map(|(id, _)| *id).collect();
        let before = inner.groups.len();
        inner.groups.retain(|id, _| hosted.contains(id));
        // Whether the set of peers may have changed (members re-read).
        let mut members_changed = inner.groups.len() != before;

        let mut probes = Vec::new();
        let mut wakes = Vec::new();
        let mut woke_for_lease: BTreeMap<NodeId, usize> = BTreeMap::new();
        for (id, g) in groups {
            // A quiet replica's state is read every `quiet_poll` only (the
            // reads are most of what a quiet group costs): a change there
            // only restarts a timer that nothing is waiting for (a write
            // wakes its leader through `wake_for_write`; a vote or append
            // renewed the openraft lease it changed), and vote refusals
            // read the state afresh.
            let due = match inner.groups.get(id) {
                Some(st) if st.phase.is_quiet() => {
                    now.duration_since(st.polled) >= self.cfg.quiet_poll
                }
                _ => true,
            };
            if !due {
                let Some(st) = inner.groups.get_mut(id) else {
                    continue;
                };
                let fp = *st.phase.fp();
                self.quiet_timers(
                    *id,
                    g,
                    st,
                    fp,
                    now,
                    &inner.peers,
                    &mut probes,
                    &mut wakes,
                    &mut woke_for_lease,
                );
                continue;
            }
            let status = g.status();
            let fp = Fingerprint::of(&status);
            let st = inner.groups.entry(*id).or_insert_with(|| GroupState {
                phase: Phase::Active {
                    fp,
                    since: now,
                    shield: None,
                },
                members: Members::default(),
                members_of: None,
                polled: now,
            });
            st.polled = now;
            if st.members_of != Some(status.membership) {
                st.members = g.members();
                st.members_of = Some(status.membership);
                members_changed = true;
            }
            if *st.phase.fp() != fp {
                // Anything happened: run openraft's timers again, at once
                // (no stagger: a leader or candidate is active right now).
                if st.phase.is_quiet() || matches!(st.phase, Phase::Waking { .. }) {
                    g.set_ticking(true);
                }
                st.phase = Phase::Active {
                    fp,
                    since: now,
                    shield: None,
                };
                continue;
            }
            match &mut st.phase {
                Phase::Active { since, .. } => {
                    if now.duration_since(*since) >= self.cfg.idle_before
                        && may_ask(self.me, *id, &status, &st.members)
                    {
                        st.phase = Phase::Asking {
                            fp,
                            since: now,
                            quiet: BTreeSet::new(),
                        };
                    }
                }
                Phase::Asking { since, quiet, .. } => {
                    if self.enough_quiet(&inner.peers, &st.members, quiet, now) {
                        g.set_ticking(false);
                        st.phase = Phase::QuietLeader { fp, probed: now };
                    } else if now.duration_since(*since) >= self.cfg.lease * 20 {
                        // A voter keeps differing (say, it holds entries
                        // beyond ours that only a write will truncate):
                        // stop asking for a while.
                        st.phase = Phase::Active {
                            fp,
                            since: now,
                            shield: None,
                        };
                    }
                }
                Phase::QuietLeader { .. } | Phase::QuietFollower { .. } => {
                    self.quiet_timers(
                        *id,
                        g,
                        st,
                        fp,
                        now,
                        &inner.peers,
                        &mut probes,
                        &mut wakes,
                        &mut woke_for_lease,
                    );
                }
                // (Normally restarted on time by `wake_due`; this catches
                // wakes scheduled outside a round, e.g. a leader restart.)
                Phase::Waking { at, .. } => {
                    if now >= *at {
                        g.set_ticking(true);
                        st.phase = Phase::Active {
                            fp,
                            since: now,
                            shield: None,
                        };
                    }
                }
            }
        }
        for (leader, n) in woke_for_lease {
            tracing::info!(
                leader,
                groups = n,
                "quiet lease ran out (no claim from the leader's node): restarting election timers, staggered"
            );
        }

        // Peers: every member of a hosted group but this node (re-read
        // only when some membership changed).
        if members_changed {
            let mut addrs: BTreeMap<NodeId, &str> = BTreeMap::new();
            for st in inner.groups.values() {
                for (id, addr) in &st.members.addrs {
                    if *id != self.me {
                        addrs.insert(*id, addr);
                    }
                }
            }
            inner.peers.retain(|id, _| addrs.contains_key(id));
            for (id, addr) in addrs {
                let p = inner.peers.entry(id).or_default();
                if p.addr != addr {
                    p.addr = addr.to_owned();
                }
            }
        }

        // Claims, per peer: every group led here that is asking or quiet
        // and has that peer as a voter.
        let mut claims: BTreeMap<NodeId, Vec<QuietClaim>> = BTreeMap::new();
        let mut ids: Vec<&u64> = inner.groups.keys().collect();
        ids.sort_unstable();
        for id in ids {
            let st = &inner.groups[id];
            let fp = match &st.phase {
                Phase::Asking { fp, .. } | Phase::QuietLeader { fp, .. } => fp,
                _ => continue,
            };
            let Some(committed) = fp.committed else {
                continue;
            };
            for v in &st.members.voters {
                if *v != self.me {
                    claims.entry(*v).or_default().push(QuietClaim {
                        group: *id,
                        vote: fp.vote,
                        committed,
                    });
                }
            }
        }
        // A slow answer must not cost a lease: pings go out every interval
        // while up to a lease's worth are unanswered (a peer that answers
        // none of them is down, and each fails after the lease).
        let max_in_flight = self.cfg.max_in_flight();
        let mut pings = Vec::new();
        for (id, p) in inner.peers.iter_mut() {
            // (A node that pinged us but is no member of our groups has no
            // address here.)
            if p.in_flight >= max_in_flight || p.addr.is_empty() {
                continue;
            }
            p.in_flight += 1;
            inner.seq += 1;
            pings.push(OutPing {
                peer: *id,
                addr: p.addr.clone(),
                ping: Ping {
                    incarnation: self.incarnation,
                    seq: inner.seq,
                    claims: claims.remove(id).unwrap_or_default(),
                },
            });
        }

        let c = counts(inner);
        if c != inner.logged
            && inner
                .logged_at
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            tracing::info!(
                led = c.0,
                followed = c.1,
                hosted = inner.groups.len(),
                "quiet groups: {} led, {} followed, of {} hosted",
                c.0,
                c.1,
                inner.groups.len()
            );
            inner.logged = c;
            inner.logged_at = Some(now);
        }
        Round {
            pings,
            probes,
            wakes,
        }
    }

    /// A quiet group's timers: a quiet leader's core probe, a quiet
    /// follower's lease.
    #[allow(clippy::too_many_arguments)]
    fn quiet_timers(
        &self,
        id: u64,
        g: &Arc<dyn GroupRpc>,
        st: &mut GroupState,
        fp: Fingerprint,
        now: Instant,
        peers: &BTreeMap<NodeId, Peer>,
        probes: &mut Vec<(u64, Arc<dyn GroupRpc>)>,
        wakes: &mut Vec<(u64, Arc<dyn GroupRpc>, Instant)>,
        woke_for_lease: &mut BTreeMap<NodeId, usize>,
    ) {
        // A leader that stops hearing its voters stays quiet (waking every
        // group of a starved node at once only adds load); it stops
        // refusing votes, and if the others elected meanwhile, their
        // answers to its claims (or its next write) wake it into the higher
        // term.
        match &mut st.phase {
            Phase::QuietLeader { probed, .. }
                if now.duration_since(*probed) >= self.cfg.probe_every =>
            {
                *probed = now;
                probes.push((id, g.clone()));
            }
            Phase::QuietFollower {
                leader, claimed, ..
            } if now.duration_since(*claimed) > self.cfg.lease => {
                let leader = *leader;
                *woke_for_lease.entry(leader).or_default() += 1;
                // Counted from the last claim, like openraft's timeout from
                // the last heartbeat, and restarted on time by the pinger,
                // not at a later round.
                let at = *claimed
                    + self.cfg.lease
                    + self.wake_delay(id, leader, &st.members, peers, now);
                st.phase = Phase::Waking { fp, at };
                wakes.push((id, g.clone(), at));
            }
            _ => {}
        }
    }

    /// A ping's answer (`None`: it failed or timed out).
    pub fn on_pong(
        &self,
        peer: NodeId,
        claims: &[QuietClaim],
        pong: Option<Pong>,
        groups: &dyn Fn(u64) -> Option<Arc<dyn GroupRpc>>,
        now: Instant,
    ) {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        if let Some(p) = inner.peers.get_mut(&peer) {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
        let Some(pong) = pong else { return };
        self.heard(inner, peer, pong.incarnation, groups, now);
        for (claim, answer) in claims.iter().zip(&pong.answers) {
            let Some(st) = inner.groups.get_mut(&claim.group) else {
                continue;
            };
            let fp = *st.phase.fp();
            // Only answers to the claim as it stands count.
            if fp.vote != claim.vote || fp.committed != Some(claim.committed) {
                continue;
            }
            match (&mut st.phase, answer) {
                (Phase::Asking { quiet, .. }, QuietAnswer::Quiet) => {
                    quiet.insert(peer);
                }
                (Phase::Asking { quiet, .. }, _) => {
                    quiet.remove(&peer);
                }
                (Phase::QuietLeader { .. }, QuietAnswer::Quiet) => {}
                (Phase::QuietLeader { .. }, _) => {
                    // The voter no longer agrees (it moved on, restarted,
                    // or dropped the group): heartbeat again; a higher vote
                    // it holds reaches openraft in the heartbeat's answer.
                    tracing::debug!(
                        group = claim.group,
                        peer,
                        ?answer,
                        "quiet leader: voter differs; waking"
                    );
                    if let Some(g) = groups(claim.group) {
                        g.set_ticking(true);
                    }
                    st.phase = Phase::Active {
                        fp,
                        since: now,
                        shield: Some(now + self.cfg.lease),
                    };
                }
                _ => {}
            }
        }
    }

    /// Answer a peer's ping: renew or start quiet followers, one answer
    /// per claim.
    pub fn on_ping(
        &self,
        from: NodeId,
        ping: &Ping,
        groups: &dyn Fn(u64) -> Option<Arc<dyn GroupRpc>>,
        now: Instant,
    ) -> Pong {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        self.heard(inner, from, ping.incarnation, groups, now);
        // An overtaken ping (a later one from the same process was already
        // here) is answered from the current state and changes nothing: its
        // claims may predate the group's waking.
        let fresh = match inner.peers.get_mut(&from) {
            Some(p) if ping.seq > p.seq => {
                p.seq = ping.seq;
                true
            }
            _ => false,
        };
        let mut answers = Vec::with_capacity(ping.claims.len());
        for claim in &ping.claims {
            // Already quiet exactly as claimed: renew without reading the
            // replica (the rounds read it every `quiet_poll`; vote refusals
            // read it afresh).
            if let Some(GroupState {
                phase:
                    Phase::QuietFollower {
                        fp,
                        leader,
                        incarnation,
                        claimed,
                    },
                ..
            }) = inner.groups.get_mut(&claim.group)
            {
                if *leader == from
                    && *incarnation == ping.incarnation
                    && fp.vote == claim.vote
                    && fp.committed == Some(claim.committed)
                    && fp.last == Some(claim.committed.index)
                {
                    if fresh {
                        *claimed = now;
                    }
                    answers.push(QuietAnswer::Quiet);
                    continue;
                }
            }
            let Some(g) = groups(claim.group) else {
                answers.push(QuietAnswer::NotHosted);
                continue;
            };
            let status = g.status();
            let fp = Fingerprint::of(&status);
            let matches = fp.role == Role::Follower
                && claim.vote.committed
                && claim.vote.node == from
                && fp.vote == claim.vote
                && fp.committed == Some(claim.committed)
                && fp.last == Some(claim.committed.index);
            let st = inner
                .groups
                .entry(claim.group)
                .or_insert_with(|| GroupState {
                    phase: Phase::Active {
                        fp,
                        since: now,
                        shield: None,
                    },
                    members: Members::default(),
                    members_of: None,
                    polled: now,
                });
            if !fresh {
                let quiet_as_claimed = matches!(
                    st.phase,
                    Phase::QuietFollower { fp: q, leader, .. } if matches && q == fp && leader == from
                );
                answers.push(if quiet_as_claimed {
                    QuietAnswer::Quiet
                } else {
                    QuietAnswer::Differs
                });
                continue;
            }
            if !matches {
                if let Phase::QuietFollower { leader, .. } = st.phase {
                    if leader == from {
                        g.set_ticking(true);
                        st.phase = Phase::Active {
                            fp,
                            since: now,
                            shield: None,
                        };
                    }
                }
                answers.push(QuietAnswer::Differs);
                continue;
            }
            match &mut st.phase {
                Phase::QuietFollower {
                    fp: qfp,
                    leader,
                    incarnation,
                    claimed,
                } if *qfp == fp && *leader == from && *incarnation == ping.incarnation => {
                    *claimed = now;
                }
                _ => {
                    g.set_ticking(false);
                    st.phase = Phase::QuietFollower {
                        fp,
                        leader: from,
                        incarnation: ping.incarnation,
                        claimed: now,
                    };
                }
            }
            answers.push(QuietAnswer::Quiet);
        }
        Pong {
            incarnation: self.incarnation,
            answers,
        }
    }

    /// The refusal to send instead of handing a (pre-)vote request from
    /// `from` to group `group`, if the group is quiet here and its lease
    /// holds: a quiet follower's leader was heard from (and claimed the
    /// group) within the lease; a quiet leader hears from a majority.
    /// openraft refuses such requests within its own lease, which quiet
    /// replicas do not renew. A leadership transfer is never refused.
    pub fn refuses_vote(
        &self,
        from: NodeId,
        group: u64,
        g: &dyn GroupRpc,
        leadership_transfer: bool,
        now: Instant,
    ) -> Option<VoteResponse> {
        if leadership_transfer {
            return None;
        }
        let inner = lock(&self.inner);
        let st = inner.groups.get(&group)?;
        let status = g.status();
        if *st.phase.fp() != Fingerprint::of(&status) {
            return None;
        }
        let holds = match &st.phase {
            Phase::QuietFollower {
                leader,
                incarnation,
                claimed,
                ..
            } => {
                *leader != from
                    && now.duration_since(*claimed) <= self.cfg.lease
                    && inner
                        .peers
                        .get(leader)
                        .is_some_and(|p| p.incarnation == Some(*incarnation))
            }
            Phase::QuietLeader { .. } => self.majority_heard(&inner.peers, &st.members, now),
            // Just woken for a voter that restarted or differs: its fresh
            // replica campaigns at once, before openraft's quorum lease is
            // renewed by the first heartbeat round; the leader (still
            // leading at the same vote) refuses it until its lease is back.
            Phase::Active {
                shield: Some(until),
                ..
            } => now < *until && self.majority_heard(&inner.peers, &st.members, now),
            _ => false,
        };
        holds.then_some(VoteResponse {
            vote: status.vote,
            vote_granted: false,
            last_log_id: status.committed,
        })
    }

    /// Time has come for a waking group (scheduled at `at` by a round):
    /// restart its timer, unless something else happened to it meanwhile.
    pub fn wake_due(&self, group: u64, g: &dyn GroupRpc, at: Instant, now: Instant) {
        let mut inner = lock(&self.inner);
        let Some(st) = inner.groups.get_mut(&group) else {
            return;
        };
        if let Phase::Waking { fp, at: due } = st.phase {
            if due == at {
                g.set_ticking(true);
                st.phase = Phase::Active {
                    fp,
                    since: now,
                    shield: None,
                };
            }
        }
    }

    /// A write is about to be proposed to `group` (see
    /// [`crate::network::GroupRegistry::ready_to_write`]): a quiet leader
    /// restarts its timer; an asking one stops asking. True when it was
    /// quiet, so that its lease must be renewed before the write.
    pub fn wake_for_write(&self, group: u64, g: &dyn GroupRpc, now: Instant) -> bool {
        let mut inner = lock(&self.inner);
        let Some(st) = inner.groups.get_mut(&group) else {
            return false;
        };
        let (fp, was_quiet) = match st.phase {
            Phase::QuietLeader { fp, .. } => (fp, true),
            Phase::Asking { fp, .. } => (fp, false),
            _ => return false,
        };
        if was_quiet {
            g.set_ticking(true);
        }
        st.phase = Phase::Active {
            fp,
            since: now,
            shield: None,
        };
        was_quiet
    }

    /// A quiet leader's Raft core did not answer its probe: stop claiming
    /// the group (its followers' leases run out and they elect, unless the
    /// core recovers and heartbeats first).
    pub fn probe_failed(&self, group: u64, g: &dyn GroupRpc, now: Instant) {
        let mut inner = lock(&self.inner);
        if let Some(st) = inner.groups.get_mut(&group) {
            if let Phase::QuietLeader { fp, .. } = st.phase {
                tracing::warn!(group, "quiet leader's Raft core did not answer its probe; no longer claiming the group");
                g.set_ticking(true);
                st.phase = Phase::Active {
                    fp,
                    since: now,
                    shield: None,
                };
            }
        }
    }

    /// A ping or pong from `peer`: it is alive. A new incarnation means it
    /// restarted: groups it led quietly here get their timers back
    /// (staggered; its leadership died with the process), and groups led
    /// here that it votes in heartbeat again, so its fresh replicas hear
    /// from their leader before their own election timeout.
    fn heard(
        &self,
        inner: &mut Inner,
        peer: NodeId,
        incarnation: u64,
        groups: &dyn Fn(u64) -> Option<Arc<dyn GroupRpc>>,
        now: Instant,
    ) {
        let p = inner.peers.entry(peer).or_default();
        p.heard = Some(now);
        if incarnation == 0 {
            return; // the peer's quiescer is not started yet
        }
        let restarted = p.incarnation.is_some_and(|i| i != incarnation);
        p.incarnation = Some(incarnation);
        if !restarted {
            return;
        }
        p.seq = 0;
        let mut woke = 0;
        let ids: Vec<u64> = inner.groups.keys().copied().collect();
        for id in ids {
            let Some(st) = inner.groups.get(&id) else {
                continue;
            };
            let wake_at = match &st.phase {
                Phase::QuietFollower { leader, fp, .. } if *leader == peer => Some((
                    *fp,
                    now + self.wake_delay(id, peer, &st.members, &inner.peers, now),
                )),
                _ => None,
            };
            let lead_with_peer =
                matches!(st.phase, Phase::Asking { .. } | Phase::QuietLeader { .. })
                    && st.members.voters.contains(&peer);
            let Some(st) = inner.groups.get_mut(&id) else {
                continue;
            };
            if let Some((fp, at)) = wake_at {
                st.phase = Phase::Waking { fp, at };
                woke += 1;
            } else if lead_with_peer {
                if matches!(st.phase, Phase::QuietLeader { .. }) {
                    if let Some(g) = groups(id) {
                        g.set_ticking(true);
                    }
                }
                let fp = *st.phase.fp();
                st.phase = Phase::Active {
                    fp,
                    since: now,
                    shield: Some(now + self.cfg.lease),
                };
                woke += 1;
            }
        }
        tracing::info!(
            peer,
            groups = woke,
            "peer restarted (new incarnation): its quiet groups wake"
        );
    }

    /// How long after its quiet leader `leader` is gone this node restarts
    /// group `group`'s timer: the surviving voters take turns (an order
    /// rotated by group, so leadership spreads), one stagger step apart.
    fn wake_delay(
        &self,
        group: u64,
        leader: NodeId,
        members: &Members,
        peers: &BTreeMap<NodeId, Peer>,
        now: Instant,
    ) -> Duration {
        let alive = |id: &NodeId| {
            *id == self.me
                || peers
                    .get(id)
                    .and_then(|p| p.heard)
                    .is_some_and(|t| now.duration_since(t) <= self.cfg.lease)
        };
        let candidates: Vec<NodeId> = members
            .voters
            .iter()
            .copied()
            .filter(|v| *v != leader && alive(v))
            .collect();
        let n = candidates.len().max(1);
        let at = candidates.iter().position(|v| *v == self.me).unwrap_or(0);
        let rank = (at + n - (rotation(group) % n)) % n;
        // The other replicas got their last claim up to one ping interval
        // later (plus delivery) and refuse votes until their lease ends
        // too: the base (at least two intervals) covers that.
        self.cfg.wake_base + self.cfg.stagger * rank as u32
    }

    fn is_heard(&self, peers: &BTreeMap<NodeId, Peer>, id: NodeId, now: Instant) -> bool {
        id == self.me
            || peers
                .get(&id)
                .and_then(|p| p.heard)
                .is_some_and(|t| now.duration_since(t) <= self.cfg.lease)
    }

    fn majority_heard(&self, peers: &BTreeMap<NodeId, Peer>, m: &Members, now: Instant) -> bool {
        let heard = m
            .voters
            .iter()
            .filter(|v| self.is_heard(peers, **v, now))
            .count();
        !m.voters.is_empty() && heard * 2 > m.voters.len()
    }

    /// Every voter heard from lately answered `Quiet`, and those with this
    /// node are a majority.
    fn enough_quiet(
        &self,
        peers: &BTreeMap<NodeId, Peer>,
        m: &Members,
        quiet: &BTreeSet<NodeId>,
        now: Instant,
    ) -> bool {
        let others = m.voters.iter().filter(|v| **v != self.me);
        let mut agreeing = 1; // this node
        for v in others {
            if quiet.contains(v) {
                agreeing += 1;
            } else if self.is_heard(peers, *v, now) {
                return false;
            }
        }
        agreeing * 2 > m.voters.len()
    }
}

/// A led group may be asked quiet: a partition (not the controller, whose
/// writes do not go through [`Quiescer::wake_for_write`]; one group's
/// heartbeats cost nothing), led here at a committed vote, a plain (not
/// joint) membership with this node a voter, everything committed and
/// replicated to every target.
fn may_ask(me: NodeId, group: u64, s: &GroupStatus, m: &Members) -> bool {
    group != CONTROLLER_GROUP
        && s.running
        && s.role == Role::Leader
        && s.vote.committed
        && s.vote.node == me
        && m.voters.contains(&me)
        && s.replicated
        && s.committed
            .is_some_and(|c| Some(c.index) == s.last_log_index)
}

fn counts(inner: &Inner) -> (usize, usize) {
    inner
        .groups
        .values()
        .fold((0, 0), |(l, f), g| match g.phase {
            Phase::QuietLeader { .. } => (l + 1, f),
            Phase::QuietFollower { .. } => (l, f + 1),
            _ => (l, f),
        })
}

/// A per-group rotation of the successor order (partition groups differ in
/// their low bits, topics in their high bits).
fn rotation(group: u64) -> usize {
    (group ^ (group >> 32)) as usize
}

/// A new incarnation number for this process: nanoseconds since the epoch
/// mixed with the process id, never 0 (0 means "not started").
pub fn new_incarnation() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mixed = nanos ^ (u64::from(std::process::id()) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    mixed.max(1)
}

#[cfg(test)]
mod tests;
