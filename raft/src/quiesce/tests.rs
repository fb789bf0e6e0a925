use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arrowbus_wire::peer::{PeerResponse, PeerRpc};
use bytes::Bytes;
use futures::future::BoxFuture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::types::TypeConfig;

const MS: Duration = Duration::from_millis(1);

fn cfg() -> QuietConfig {
    QuietConfig::new(MS * 100, MS * 250, MS * 500, MS * 1000)
}

fn vote(term: u64, node: NodeId) -> WireVote {
    WireVote {
        term,
        node,
        committed: true,
    }
}

fn log_id(term: u64, leader: NodeId, index: u64) -> WireLogId {
    WireLogId {
        term,
        leader,
        index,
    }
}

/// A replica with settable status that records what it was told.
struct Mock {
    status: Mutex<GroupStatus>,
    members: Members,
    ticking: AtomicBool,
    tick_calls: AtomicUsize,
    probe_ok: AtomicBool,
    handled: AtomicUsize,
    renewed: AtomicUsize,
}

impl Mock {
    fn new(me: NodeId, leader: NodeId, voters: &[NodeId]) -> Arc<Self> {
        Arc::new(Self {
            status: Mutex::new(GroupStatus {
                running: true,
                role: if me == leader {
                    Role::Leader
                } else {
                    Role::Follower
                },
                vote: vote(3, leader),
                last_log_index: Some(9),
                committed: Some(log_id(3, leader, 9)),
                membership: Some(log_id(1, 1, 0)),
                replicated: me == leader,
            }),
            members: Members {
                voters: voters.to_vec(),
                addrs: voters.iter().map(|v| (*v, format!("n{v}"))).collect(),
            },
            ticking: AtomicBool::new(true),
            tick_calls: AtomicUsize::new(0),
            probe_ok: AtomicBool::new(true),
            handled: AtomicUsize::new(0),
            renewed: AtomicUsize::new(0),
        })
    }
    fn ticking(&self) -> bool {
        self.ticking.load(Ordering::SeqCst)
    }
    fn edit(&self, f: impl FnOnce(&mut GroupStatus)) {
        f(&mut lock(&self.status));
    }
}

impl GroupRpc for Mock {
    fn handle(&self, _rpc: PeerRpc, _body: Bytes) -> BoxFuture<'_, PeerResponse> {
        self.handled.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {
            PeerResponse::Error {
                code: 0,
                message: "mock".into(),
            }
        })
    }
    fn append_stream(
        &self,
        _input: futures::stream::BoxStream<
            'static,
            openraft::raft::AppendEntriesRequest<TypeConfig>,
        >,
    ) -> futures::stream::BoxStream<'static, PeerResponse> {
        self.handled.fetch_add(1, Ordering::SeqCst);
        Box::pin(futures::stream::iter([PeerResponse::Error {
            code: 0,
            message: "mock".into(),
        }]))
    }
    fn status(&self) -> GroupStatus {
        lock(&self.status).clone()
    }
    fn members(&self) -> Members {
        self.members.clone()
    }
    fn set_ticking(&self, on: bool) {
        self.tick_calls.fetch_add(1, Ordering::SeqCst);
        self.ticking.store(on, Ordering::SeqCst);
    }
    fn probe(&self, _timeout: Duration) -> BoxFuture<'_, bool> {
        let ok = self.probe_ok.load(Ordering::SeqCst);
        Box::pin(async move { ok })
    }
    fn renew_lease(&self, _timeout: Duration) -> BoxFuture<'_, bool> {
        self.renewed.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { true })
    }
}

/// One node: its quiescer and its replicas.
struct Node {
    q: Quiescer,
    groups: BTreeMap<u64, Arc<Mock>>,
}

impl Node {
    fn new(me: NodeId, incarnation: u64) -> Self {
        Self {
            q: Quiescer::new(me, cfg(), incarnation),
            groups: BTreeMap::new(),
        }
    }
    fn add(&mut self, group: u64, g: Arc<Mock>) {
        self.groups.insert(group, g);
    }
    fn list(&self) -> Vec<(u64, Arc<dyn GroupRpc>)> {
        self.groups
            .iter()
            .map(|(id, g)| (*id, g.clone() as Arc<dyn GroupRpc>))
            .collect()
    }
    fn lookup(&self) -> impl Fn(u64) -> Option<Arc<dyn GroupRpc>> + '_ {
        |id| self.groups.get(&id).map(|g| g.clone() as Arc<dyn GroupRpc>)
    }
    fn round(&self, now: Instant) -> Round {
        self.q.round(&self.list(), now)
    }
    fn on_ping(&self, from: NodeId, ping: &Ping, now: Instant) -> Pong {
        self.q.on_ping(from, ping, &self.lookup(), now)
    }
    fn on_pong(&self, peer: NodeId, claims: &[QuietClaim], pong: Option<Pong>, now: Instant) {
        self.q.on_pong(peer, claims, pong, &self.lookup(), now)
    }
}

fn claim(group: u64, leader: NodeId) -> QuietClaim {
    QuietClaim {
        group,
        vote: vote(3, leader),
        committed: log_id(3, leader, 9),
    }
}

#[test]
fn one_ping_answers_every_claim_on_its_own() {
    let t0 = Instant::now();
    let mut f = Node::new(2, 22);
    for g in 1..=3 {
        f.add(g, Mock::new(2, 1, &[1, 2, 3]));
    }
    // Group 3's replica has not heard of the last commit yet.
    f.groups[&3].edit(|s| s.committed = Some(log_id(3, 1, 8)));
    let ping = Ping {
        incarnation: 11,
        seq: 1,
        claims: vec![claim(1, 1), claim(2, 1), claim(3, 1), claim(99, 1)],
    };
    let pong = f.on_ping(1, &ping, t0);
    assert_eq!(pong.incarnation, 22);
    assert_eq!(
        pong.answers,
        vec![
            QuietAnswer::Quiet,
            QuietAnswer::Quiet,
            QuietAnswer::Differs,
            QuietAnswer::NotHosted
        ]
    );
    assert!(!f.groups[&1].ticking() && !f.groups[&2].ticking());
    assert!(
        f.groups[&3].ticking(),
        "a replica that differs keeps its timer"
    );
    assert_eq!(f.groups[&3].tick_calls.load(Ordering::SeqCst), 0);
    assert_eq!(f.q.quiet(1), Quiet::Follower(1));
    assert_eq!(f.q.quiet(3), Quiet::No);
    assert_eq!(f.q.counts(), (0, 2));
}

#[test]
fn a_claim_must_name_the_sender_and_this_very_state() {
    let t0 = Instant::now();
    let mut f = Node::new(2, 22);
    f.add(1, Mock::new(2, 1, &[1, 2, 3]));
    let bad = [
        // Not sent by the leader it names.
        (3, claim(1, 1)),
        // Another term.
        (
            1,
            QuietClaim {
                vote: vote(4, 1),
                ..claim(1, 1)
            },
        ),
        // An uncommitted vote (a candidate's).
        (
            1,
            QuietClaim {
                vote: WireVote {
                    committed: false,
                    ..vote(3, 1)
                },
                ..claim(1, 1)
            },
        ),
        // A later last entry than this replica holds.
        (
            1,
            QuietClaim {
                committed: log_id(3, 1, 10),
                ..claim(1, 1)
            },
        ),
    ];
    for (seq, (from, c)) in (1..).zip(bad) {
        let pong = f.on_ping(
            from,
            &Ping {
                incarnation: 5,
                seq,
                claims: vec![c],
            },
            t0,
        );
        assert_eq!(pong.answers, vec![QuietAnswer::Differs], "{from} {c:?}");
        assert!(f.groups[&1].ticking());
    }
    // A replica that is a candidate (or leader) never goes quiet.
    f.groups[&1].edit(|s| s.role = Role::Other);
    let pong = f.on_ping(
        1,
        &Ping {
            incarnation: 5,
            seq: 10,
            claims: vec![claim(1, 1)],
        },
        t0,
    );
    assert_eq!(pong.answers, vec![QuietAnswer::Differs]);
}

#[test]
fn an_overtaken_ping_renews_nothing() {
    let t0 = Instant::now();
    let mut f = Node::new(2, 22);
    f.add(1, Mock::new(2, 1, &[1, 2, 3]));
    let ping = |seq| Ping {
        incarnation: 11,
        seq,
        claims: vec![claim(1, 1)],
    };
    // Ping 5 arrives first and quiets the replica; ping 4 was overtaken.
    assert_eq!(f.on_ping(1, &ping(5), t0).answers, vec![QuietAnswer::Quiet]);
    assert_eq!(
        f.on_ping(1, &ping(4), t0 + MS * 450).answers,
        vec![QuietAnswer::Quiet],
        "answered from the current state"
    );
    // The lease still counts from ping 5.
    f.round(t0 + MS * 501);
    assert_eq!(f.q.quiet(1), Quiet::Waking);
    // An overtaken ping does not quiet a replica either.
    let mut f = Node::new(2, 22);
    f.add(1, Mock::new(2, 1, &[1, 2, 3]));
    f.on_ping(
        1,
        &Ping {
            claims: vec![],
            ..ping(5)
        },
        t0,
    );
    assert_eq!(
        f.on_ping(1, &ping(4), t0).answers,
        vec![QuietAnswer::Differs]
    );
    assert!(f.groups[&1].ticking());
}

/// Leader 1 of group 7, voters 1, 2, 3.
fn leader_and_followers() -> (Node, Node, Node) {
    let mut l = Node::new(1, 11);
    let mut a = Node::new(2, 22);
    let mut b = Node::new(3, 33);
    l.add(7, Mock::new(1, 1, &[1, 2, 3]));
    a.add(7, Mock::new(2, 1, &[1, 2, 3]));
    b.add(7, Mock::new(3, 1, &[1, 2, 3]));
    (l, a, b)
}

/// Deliver `round`'s pings from `from` to the nodes in `to` and their pongs
/// back, at once.
fn exchange(from: &Node, from_id: NodeId, round: Round, to: &[(&Node, NodeId)], now: Instant) {
    for out in round.pings {
        let Some((peer, _)) = to.iter().find(|(_, id)| *id == out.peer) else {
            from.on_pong(out.peer, &out.ping.claims, None, now);
            continue;
        };
        let pong = peer.on_ping(from_id, &out.ping, now);
        from.on_pong(out.peer, &out.ping.claims, Some(pong), now);
    }
}

#[test]
fn a_leader_goes_quiet_only_once_every_voter_it_hears_agrees() {
    let t0 = Instant::now();
    let (l, a, b) = leader_and_followers();
    // Everyone hears everyone.
    for (n, id) in [(&l, 1), (&a, 2), (&b, 3)] {
        let r = n.round(t0);
        exchange(n, id, r, &[(&l, 1), (&a, 2), (&b, 3)], t0);
    }
    assert_eq!(l.q.quiet(7), Quiet::No, "not idle for long enough yet");
    let t1 = t0 + MS * 1000;
    let r = l.round(t1);
    assert_eq!(l.q.quiet(7), Quiet::Asking);
    let claims: Vec<_> = r
        .pings
        .iter()
        .map(|p| (p.peer, p.ping.claims.len()))
        .collect();
    assert_eq!(claims, vec![(2, 1), (3, 1)]);
    // Node 3 has not applied the last commit yet: it differs.
    b.groups[&7].edit(|s| s.committed = Some(log_id(3, 1, 8)));
    exchange(&l, 1, r, &[(&a, 2), (&b, 3)], t1);
    assert_eq!(a.q.quiet(7), Quiet::Follower(1));
    assert_eq!(b.q.quiet(7), Quiet::No);
    l.round(t1 + MS * 100);
    assert_eq!(l.q.quiet(7), Quiet::Asking, "node 3 is heard and differs");
    assert!(l.groups[&7].ticking());
    // Node 3 catches up (the leader's heartbeats still flow).
    b.groups[&7].edit(|s| s.committed = Some(log_id(3, 1, 9)));
    let r = l.round(t1 + MS * 100);
    exchange(&l, 1, r, &[(&a, 2), (&b, 3)], t1 + MS * 100);
    l.round(t1 + MS * 200);
    assert_eq!(l.q.quiet(7), Quiet::Leader);
    assert!(!l.groups[&7].ticking());
    assert!(!a.groups[&7].ticking() && !b.groups[&7].ticking());
    assert_eq!(l.q.counts(), (1, 0));
}

#[test]
fn a_gone_voter_is_excused_but_a_majority_must_agree() {
    let t0 = Instant::now();
    let (l, a, _b) = leader_and_followers();
    let r = l.round(t0);
    exchange(&l, 1, r, &[(&a, 2)], t0);
    let t1 = t0 + MS * 1000;
    let r = l.round(t1);
    exchange(&l, 1, r, &[(&a, 2)], t1);
    l.round(t1 + MS * 100);
    assert_eq!(
        l.q.quiet(7),
        Quiet::Leader,
        "node 3 never answered: 1 and 2 are a majority"
    );
    assert!(l
        .q
        .refuses_vote(3, 7, &*l.groups[&7], false, t1 + MS * 100)
        .is_some());
    // Node 2 goes silent too: the leader stays quiet (waking every group of
    // a starved node at once would only add load) but no longer refuses
    // votes: without a majority it holds no lease.
    let mut t = t1 + MS * 100;
    for _ in 0..7 {
        t += MS * 100;
        let r = l.round(t);
        exchange(&l, 1, r, &[], t);
    }
    assert_eq!(l.q.quiet(7), Quiet::Leader);
    assert!(l.q.refuses_vote(3, 7, &*l.groups[&7], false, t).is_none());
}

/// Bring group 7 quiet on all three nodes; returns the time reached.
fn quiet_all(l: &Node, a: &Node, b: &Node, t0: Instant) -> Instant {
    let nodes = [(l, 1), (a, 2), (b, 3)];
    let mut t = t0;
    for _ in 0..15 {
        for (n, id) in nodes {
            let r = n.round(t);
            exchange(n, id, r, &nodes, t);
        }
        t += MS * 100;
    }
    assert_eq!(l.q.quiet(7), Quiet::Leader);
    assert_eq!(a.q.quiet(7), Quiet::Follower(1));
    assert_eq!(b.q.quiet(7), Quiet::Follower(1));
    t
}

#[test]
fn when_the_leader_goes_silent_the_followers_wake_one_after_the_other() {
    let (l, a, b) = leader_and_followers();
    let t = quiet_all(&l, &a, &b, Instant::now());
    // Node 1 dies: 2 and 3 keep pinging each other, every 100 ms, and
    // restart timers when a round says so (as the pinger does).
    let mut woke: BTreeMap<NodeId, Instant> = BTreeMap::new();
    let mut due: Vec<(NodeId, Instant)> = Vec::new();
    let mut now = t;
    while now < t + MS * 2000 {
        for (n, id) in [(&a, 2), (&b, 3)] {
            if now.duration_since(t).as_millis().is_multiple_of(100) {
                let r = n.round(now);
                for (g, _, at) in &r.wakes {
                    assert_eq!(*g, 7);
                    due.push((id, *at));
                }
                exchange(
                    n,
                    id,
                    Round { wakes: vec![], ..r },
                    &[(&a, 2), (&b, 3)],
                    now,
                );
            }
            for (_, at) in due.iter().filter(|(d, at)| *d == id && *at <= now) {
                n.q.wake_due(7, &*n.groups[&7], *at, now);
            }
            if n.groups[&7].ticking() {
                woke.entry(id).or_insert(now);
            }
        }
        now += MS * 10;
    }
    // Scheduled from the last claim (t - 100 ms): lease 500 ms, then 250 ms
    // (the election timeout minimum), the other rank 250 ms later.
    due.sort_by_key(|(_, at)| *at);
    let at: Vec<Duration> = due.iter().map(|(_, at)| at.duration_since(t)).collect();
    assert_eq!(at, vec![MS * 650, MS * 900], "{due:?}");
    let first = woke.values().min().copied().unwrap();
    let last = woke.values().max().copied().unwrap();
    assert_eq!(woke.len(), 2, "both survivors restart their timers");
    assert_eq!(first.duration_since(t), MS * 650, "restarted on time");
    assert_eq!(last.duration_since(first), MS * 250);
    // Once awake, neither refuses the other's vote.
    for (n, other) in [(&a, 3), (&b, 2)] {
        assert!(n
            .q
            .refuses_vote(other, 7, &*n.groups[&7], false, now)
            .is_none());
    }
}

#[test]
fn a_scheduled_wake_is_void_once_the_group_moved_on() {
    let (l, a, b) = leader_and_followers();
    let t = quiet_all(&l, &a, &b, Instant::now());
    // Node 1's claims stop; node 2's lease runs out.
    let r = a.round(t + MS * 450);
    assert_eq!(r.wakes.len(), 1);
    let at = r.wakes[0].2;
    assert_eq!(a.q.quiet(7), Quiet::Waking);
    // Meanwhile node 3 won an election and node 2 voted for it.
    a.groups[&7].edit(|s| s.vote = vote(4, 3));
    a.round(t + MS * 500);
    assert_eq!(a.q.quiet(7), Quiet::No);
    assert!(a.groups[&7].ticking());
    // The stale wake changes nothing (a later park would stay parked).
    a.groups[&7].set_ticking(false);
    a.q.wake_due(7, &*a.groups[&7], at, at);
    assert!(!a.groups[&7].ticking());
}

#[test]
fn the_successor_order_rotates_with_the_group() {
    let first: Vec<NodeId> = (1..=6u64)
        .map(|g| {
            let mut a = Node::new(2, 22);
            a.add(g, Mock::new(2, 1, &[1, 2, 3]));
            let mut b = Node::new(3, 33);
            b.add(g, Mock::new(3, 1, &[1, 2, 3]));
            let t = Instant::now();
            // Both hear each other; node 1 is gone.
            for (n, id) in [(&a, 2), (&b, 3)] {
                let r = n.round(t);
                exchange(n, id, r, &[(&a, 2), (&b, 3)], t);
            }
            let members = a.groups[&g].members.clone();
            let (da, db) = (
                a.q.wake_delay(g, 1, &members, &lock(&a.q.inner).peers, t),
                b.q.wake_delay(g, 1, &members, &lock(&b.q.inner).peers, t),
            );
            assert_ne!(da, db, "group {g}: both would campaign at once");
            if da < db {
                2
            } else {
                3
            }
        })
        .collect();
    assert!(first.contains(&2) && first.contains(&3), "{first:?}");
}

#[test]
fn quiet_replicas_refuse_votes_only_while_the_lease_holds() {
    let (l, a, b) = leader_and_followers();
    let t = quiet_all(&l, &a, &b, Instant::now());
    let g = &*a.groups[&7];
    // Node 3 campaigns (say it restarted): node 2 refuses while node 1's
    // claims are fresh...
    let r = a.q.refuses_vote(3, 7, g, false, t).unwrap();
    assert!(!r.vote_granted);
    assert_eq!(r.vote, vote(3, 1));
    assert_eq!(r.last_log_id, Some(log_id(3, 1, 9)));
    // ...and the quiet leader too, hearing a majority...
    assert!(l.q.refuses_vote(3, 7, &*l.groups[&7], false, t).is_some());
    // ...but never a leadership transfer...
    assert!(a.q.refuses_vote(3, 7, g, true, t).is_none());
    // ...nor once the lease ran out (last claim at t - 100 ms).
    assert!(a.q.refuses_vote(3, 7, g, false, t + MS * 401).is_none());
    // A replica that changed is not quiet any more, whatever its phase says.
    g.edit(|s| s.vote = vote(4, 3));
    assert!(a.q.refuses_vote(3, 7, g, false, t).is_none());
}

#[test]
fn any_change_wakes_a_quiet_replica_within_a_poll() {
    let (l, a, b) = leader_and_followers();
    let t = quiet_all(&l, &a, &b, Instant::now());
    // Say the leader stepped down (a vote came in): quiet replicas are read
    // every 500 ms (a write does not wait for that: `wake_for_write`).
    l.groups[&7].edit(|s| {
        s.role = Role::Follower;
        s.vote = vote(4, 3);
    });
    l.round(t);
    assert_eq!(l.q.quiet(7), Quiet::Leader, "not read again yet");
    l.round(t + MS * 400);
    assert_eq!(l.q.quiet(7), Quiet::No);
    assert!(l.groups[&7].ticking());
    // A follower that took the new leader's entries.
    a.groups[&7].edit(|s| {
        s.vote = vote(4, 3);
        s.last_log_index = Some(10);
    });
    // Until it is read, a stale claim may renew its quiet phase, but it
    // refuses no vote: refusals read the replica afresh.
    let stale = |seq| Ping {
        incarnation: 11,
        seq,
        claims: vec![claim(7, 1)],
    };
    assert_eq!(
        a.on_ping(1, &stale(1000), t).answers,
        vec![QuietAnswer::Quiet]
    );
    assert!(a.q.refuses_vote(3, 7, &*a.groups[&7], false, t).is_none());
    a.round(t + MS * 400);
    assert!(a.groups[&7].ticking());
    assert_eq!(a.q.quiet(7), Quiet::No);
    // Once read, a stale claim does not quiet it again.
    let pong = a.on_ping(1, &stale(1001), t + MS * 400);
    assert_eq!(pong.answers, vec![QuietAnswer::Differs]);
    assert!(a.groups[&7].ticking());
}

#[test]
fn a_restarted_leader_wakes_its_quiet_followers_and_a_restarted_voter_its_leader() {
    let (l, a, b) = leader_and_followers();
    let t = quiet_all(&l, &a, &b, Instant::now());
    // Node 1 restarts: its first ping carries a new incarnation.
    let l2 = Node::new(1, 111);
    let pong = a.on_ping(
        1,
        &Ping {
            incarnation: l2.q.incarnation(),
            seq: 1,
            claims: vec![],
        },
        t,
    );
    assert!(pong.answers.is_empty());
    assert_eq!(a.q.quiet(7), Quiet::Waking);
    assert!(
        a.q.refuses_vote(1, 7, &*a.groups[&7], false, t).is_none(),
        "the restarted node may campaign"
    );
    // Node 3 restarts: the leader heartbeats again.
    let (l, a, b) = leader_and_followers();
    let t = quiet_all(&l, &a, &b, Instant::now());
    l.on_ping(
        3,
        &Ping {
            incarnation: 333,
            seq: 1,
            claims: vec![],
        },
        t,
    );
    assert_eq!(l.q.quiet(7), Quiet::No);
    assert!(l.groups[&7].ticking());
    // Node 3's fresh replica campaigns at once; the leader refuses it until
    // its own lease is back (one lease), then leaves it to openraft.
    let lg = &*l.groups[&7];
    assert!(l.q.refuses_vote(3, 7, lg, false, t + MS * 10).is_some());
    assert!(l.q.refuses_vote(3, 7, lg, false, t + MS * 501).is_none());
    // A leader that stepped down meanwhile refuses nothing.
    lg.edit(|s| {
        s.role = Role::Follower;
        s.vote = vote(4, 3);
    });
    assert!(l.q.refuses_vote(3, 7, lg, false, t + MS * 10).is_none());
}

#[tokio::test]
async fn a_write_wakes_a_quiet_leader_and_renews_its_lease_first() {
    use crate::network::GroupRegistry;
    let (mut l, a, b) = leader_and_followers();
    let t = quiet_all(&l, &a, &b, Instant::now());
    // Through the registry, as the broker calls it before proposing.
    let reg = GroupRegistry::default();
    let lq = std::mem::replace(&mut l.q, Quiescer::new(1, cfg(), 11));
    reg.set_quiescer(lq);
    reg.insert(7, l.groups[&7].clone());
    let q = reg.quiescer().unwrap();
    assert_eq!(q.quiet(7), Quiet::Leader);
    reg.ready_to_write(7).await;
    assert_eq!(q.quiet(7), Quiet::No);
    assert!(l.groups[&7].ticking());
    assert_eq!(l.groups[&7].renewed.load(Ordering::SeqCst), 1);
    // Awake already: nothing to renew.
    reg.ready_to_write(7).await;
    assert_eq!(l.groups[&7].renewed.load(Ordering::SeqCst), 1);
    // It is asked quiet again only after a full idle period (the registry
    // woke it at the real now).
    let woke = Instant::now();
    let list = vec![(7u64, l.groups[&7].clone() as Arc<dyn GroupRpc>)];
    q.round(&list, woke + MS * 900);
    assert_eq!(q.quiet(7), Quiet::No);
    q.round(&list, woke + MS * 1100);
    assert_eq!(q.quiet(7), Quiet::Asking);
    // Followers and unknown groups: nothing to do.
    assert!(!a.q.wake_for_write(7, &*a.groups[&7], t));
    assert!(!a.q.wake_for_write(8, &*a.groups[&7], t));
}

#[test]
fn the_controller_group_never_goes_quiet() {
    let t0 = Instant::now();
    let mut l = Node::new(1, 11);
    l.add(CONTROLLER_GROUP, Mock::new(1, 1, &[1, 2, 3]));
    l.round(t0);
    l.round(t0 + MS * 5000);
    assert_eq!(l.q.quiet(CONTROLLER_GROUP), Quiet::No);
}

#[test]
fn a_quiet_leader_wakes_when_a_voter_differs_or_its_core_hangs() {
    let (l, a, b) = leader_and_followers();
    let t = quiet_all(&l, &a, &b, Instant::now());
    // Node 3 dropped the group (say it was deleted there first); its next
    // round forgets it.
    let mut b = b;
    b.groups.clear();
    b.round(t);
    let r = l.round(t);
    exchange(&l, 1, r, &[(&a, 2), (&b, 3)], t);
    assert_eq!(l.q.quiet(7), Quiet::No);
    assert!(l.groups[&7].ticking());

    let (l, a, b) = leader_and_followers();
    let mut t = quiet_all(&l, &a, &b, Instant::now());
    let mut probes = 0;
    for _ in 0..42 {
        let r = l.round(t);
        probes += r.probes.len();
        exchange(
            &l,
            1,
            Round {
                probes: vec![],
                ..r
            },
            &[(&a, 2), (&b, 3)],
            t,
        );
        t += MS * 100;
    }
    assert_eq!(probes, 2, "probed every 2 s");
    assert_eq!(l.q.quiet(7), Quiet::Leader);
    l.q.probe_failed(7, &*l.groups[&7], t);
    assert_eq!(l.q.quiet(7), Quiet::No);
    assert!(l.groups[&7].ticking());
    let r = l.round(t + MS * 100);
    assert!(
        r.pings.iter().all(|p| p.ping.claims.is_empty()),
        "no more claims for it"
    );
}

#[test]
fn a_node_that_cannot_read_pings_is_never_taken_for_gone() {
    let t0 = Instant::now();
    let (l, a, _b) = leader_and_followers();
    let mut t = t0;
    for _ in 0..15 {
        let r = l.round(t);
        for out in r.pings {
            let pong = match out.peer {
                2 => a.on_ping(1, &out.ping, t),
                // What the pinger makes of an Error answer.
                _ => Pong {
                    incarnation: 0,
                    answers: vec![QuietAnswer::Differs; out.ping.claims.len()],
                },
            };
            l.on_pong(out.peer, &out.ping.claims, Some(pong), t);
        }
        t += MS * 100;
    }
    assert_eq!(l.q.quiet(7), Quiet::Asking);
    assert!(l.groups[&7].ticking());
}

/// The server side: pings go to the quiescer (one answer per claim, an
/// unknown group answered on its own), votes for quiet groups are refused
/// before they reach openraft, everything else reaches its group.
#[tokio::test]
async fn dispatch_answers_pings_and_shields_quiet_groups() {
    use crate::network::{dispatch, GroupRegistry};
    use arrowbus_wire::peer::{PeerRequest, VoteRequest};
    use arrowbus_wire::ErrorCode;

    let reg = GroupRegistry::default();
    reg.set_quiescer(Quiescer::new(2, cfg(), 22));
    let (g1, g2) = (Mock::new(2, 1, &[1, 2, 3]), Mock::new(2, 1, &[1, 2, 3]));
    reg.insert(1, g1.clone());
    reg.insert(2, g2.clone());
    let ping = PeerRequest {
        from: 1,
        group: 0,
        rpc: PeerRpc::Ping(Ping {
            incarnation: 11,
            seq: 1,
            claims: vec![claim(1, 1), claim(99, 1), claim(2, 1)],
        }),
    };
    match dispatch(&reg, ping, Bytes::new()).await {
        PeerResponse::Pong(p) => assert_eq!(
            p.answers,
            vec![
                QuietAnswer::Quiet,
                QuietAnswer::NotHosted,
                QuietAnswer::Quiet
            ]
        ),
        other => panic!("{other:?}"),
    }
    assert!(!g1.ticking() && !g2.ticking());
    let vote_req = |group, leadership_transfer| PeerRequest {
        from: 3,
        group,
        rpc: PeerRpc::PreVote(VoteRequest {
            vote: WireVote {
                term: 4,
                node: 3,
                committed: false,
            },
            last_log_id: Some(log_id(3, 1, 9)),
            leadership_transfer,
        }),
    };
    match dispatch(&reg, vote_req(1, false), Bytes::new()).await {
        PeerResponse::Vote(v) => {
            assert!(!v.vote_granted);
            assert_eq!(v.vote, vote(3, 1));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        g1.handled.load(Ordering::SeqCst),
        0,
        "openraft never saw it"
    );
    // A leadership transfer goes through.
    dispatch(&reg, vote_req(1, true), Bytes::new()).await;
    assert_eq!(g1.handled.load(Ordering::SeqCst), 1);
    // An unknown group: an error for that request alone.
    match dispatch(&reg, vote_req(99, false), Bytes::new()).await {
        PeerResponse::Error { code, .. } => {
            assert_eq!(code, ErrorCode::PartitionNotFound as u16)
        }
        other => panic!("{other:?}"),
    }
}

/// Three nodes, eight groups led round-robin, pings delivered with random
/// delays and losses; one node dies at a random time. Checks: with no
/// losses every group goes quiet everywhere; a parked timer always belongs
/// to a quiet (or waking) replica; after the kill, every group the dead node
/// led has, in time, a live replica with its timer running whose vote the
/// other live replica does not refuse (so it can be elected).
#[test]
fn randomized_three_nodes_and_a_kill() {
    let seed = std::env::var("ARROWBUS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("seed = {seed} (replay with ARROWBUS_TEST_SEED={seed})");
    for run in 0..20u64 {
        simulate(seed.wrapping_add(run));
    }
}

struct Msg {
    at: Instant,
    from: NodeId,
    to: NodeId,
    ping: Ping,
    /// None: a ping; Some: the pong to it.
    pong: Option<Pong>,
}

fn simulate(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let t0 = Instant::now();
    let mut nodes: BTreeMap<NodeId, Node> = BTreeMap::new();
    for id in 1..=3u64 {
        let mut n = Node::new(id, 100 + id);
        for g in 1..=8u64 {
            let leader = g % 3 + 1;
            n.add(g, Mock::new(id, leader, &[1, 2, 3]));
        }
        nodes.insert(id, n);
    }
    let phase: BTreeMap<NodeId, u64> = (1..=3).map(|id| (id, rng.random_range(0..100))).collect();
    let warmup = MS * 3000;
    let kill_at = warmup + MS * rng.random_range(0..1000);
    let victim: NodeId = rng.random_range(1..=3);
    let loss = rng.random_range(0.0..0.2);
    // The last claim from the victim came at most one ping interval (plus
    // a 20 ms delivery) before the kill; the lease runs out, seen at the
    // next round (100 ms); the first successor wakes 250 ms later, at the
    // round after that (100 ms). The second successor is not needed.
    let deadline = kill_at + MS * (100 + 20 + 500 + 100 + 250 + 100 + 30);
    let mut queue: VecDeque<Msg> = VecDeque::new();
    let mut checked_quiet = false;
    let mut ok_at: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut ms = 0u64;
    while Duration::from_millis(ms) < deadline + MS * 200 {
        let now = t0 + Duration::from_millis(ms);
        let after_kill = Duration::from_millis(ms) >= kill_at;
        let alive = |id: NodeId| !(after_kill && id == victim);
        // Deliver due messages (the queue is unordered by design: random
        // delays reorder pings and pongs).
        let mut keep = VecDeque::new();
        while let Some(m) = queue.pop_front() {
            if m.at > now {
                keep.push_back(m);
                continue;
            }
            match m.pong {
                None if alive(m.to) => {
                    let pong = nodes[&m.to].on_ping(m.from, &m.ping, now);
                    let lost = Duration::from_millis(ms) >= warmup && rng.random_bool(loss);
                    let at = now + MS * rng.random_range(0..20);
                    if !lost && alive(m.from) {
                        keep.push_back(Msg {
                            at,
                            from: m.to,
                            to: m.from,
                            ping: m.ping,
                            pong: Some(pong),
                        });
                    } else if alive(m.from) {
                        // The pinger's timeout (the lease) reports a failure.
                        keep.push_back(Msg {
                            at: now + MS * 500,
                            from: m.to,
                            to: m.from,
                            ping: m.ping,
                            pong: Some(Pong {
                                incarnation: u64::MAX,
                                answers: vec![],
                            }),
                        });
                    }
                }
                None => {
                    if alive(m.from) {
                        let at = m.at + MS * 500;
                        keep.push_back(Msg {
                            at: at.max(now),
                            from: m.to,
                            to: m.from,
                            ping: m.ping,
                            pong: Some(Pong {
                                incarnation: u64::MAX,
                                answers: vec![],
                            }),
                        });
                    }
                }
                Some(p) if alive(m.to) => {
                    let pong = (p.incarnation != u64::MAX).then_some(p);
                    nodes[&m.to].on_pong(m.from, &m.ping.claims, pong, now);
                }
                Some(_) => {}
            }
        }
        queue = keep;
        // Rounds, every 100 ms per node at its own phase.
        for (id, n) in &nodes {
            if !alive(*id) || !(ms + phase[id]).is_multiple_of(100) {
                continue;
            }
            for out in n.round(now).pings {
                let lost = Duration::from_millis(ms) >= warmup && rng.random_bool(loss);
                let at = now + MS * rng.random_range(0..20);
                if lost {
                    queue.push_back(Msg {
                        at: now + MS * 500,
                        from: out.peer,
                        to: *id,
                        ping: out.ping,
                        pong: Some(Pong {
                            incarnation: u64::MAX,
                            answers: vec![],
                        }),
                    });
                } else {
                    queue.push_back(Msg {
                        at,
                        from: *id,
                        to: out.peer,
                        ping: out.ping,
                        pong: None,
                    });
                }
            }
        }
        // Invariant: a parked timer belongs to a quiet or waking replica.
        for (id, n) in &nodes {
            if !alive(*id) {
                continue;
            }
            for (g, m) in &n.groups {
                let q = n.q.quiet(*g);
                if !m.ticking() {
                    assert!(
                        matches!(q, Quiet::Leader | Quiet::Follower(_) | Quiet::Waking),
                        "seed {seed}: node {id} group {g} parked while {q:?}"
                    );
                }
                if q == Quiet::Leader {
                    assert_eq!(m.status().role, Role::Leader, "seed {seed}");
                }
            }
        }
        // Without losses, everything goes quiet before the warm-up ends.
        if !checked_quiet && Duration::from_millis(ms) == warmup - MS * 1 {
            checked_quiet = true;
            for (id, n) in &nodes {
                for g in 1..=8u64 {
                    let want = if g % 3 + 1 == *id {
                        Quiet::Leader
                    } else {
                        Quiet::Follower(g % 3 + 1)
                    };
                    assert_eq!(n.q.quiet(g), want, "seed {seed}: node {id} group {g}");
                }
            }
        }
        // Liveness: a live replica ticks and the other would vote for it.
        if after_kill {
            for g in (1..=8u64).filter(|g| g % 3 + 1 == victim) {
                if ok_at.contains_key(&g) {
                    continue;
                }
                let live: Vec<NodeId> = (1..=3).filter(|id| *id != victim).collect();
                let electable = live.iter().any(|c| {
                    let other = live.iter().find(|o| *o != c).copied().unwrap_or(*c);
                    nodes[c].groups[&g].ticking()
                        && nodes[&other]
                            .q
                            .refuses_vote(*c, g, &*nodes[&other].groups[&g], false, now)
                            .is_none()
                });
                if electable {
                    ok_at.insert(g, now);
                }
            }
        }
        ms += 1;
    }
    for g in (1..=8u64).filter(|g| g % 3 + 1 == victim) {
        let at = ok_at.get(&g).copied();
        assert!(
            at.is_some_and(|t| t <= t0 + deadline),
            "seed {seed}: group {g} led by killed node {victim} (kill at {kill_at:?}, loss {loss:.2}) \
             not electable by {deadline:?}: {:?}",
            at.map(|t| t.duration_since(t0))
        );
    }
}
