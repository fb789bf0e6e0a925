//! Adding and removing nodes, and the partition moves that follow.
//!
//! `add_node` makes a running, empty `busd` (started with
//! `cluster.join = true`) a controller voter and then asks the controller to
//! move a fair share of partition replicas onto it; `remove_node` moves every
//! replica off a node and then removes it from the controller's voters. The
//! controller only records each move's target (see [`crate::controller`]);
//! the partition's Raft leader carries it out here: new nodes become
//! learners and catch up, the group's voters change to the target by joint
//! consensus, and the leader records the finished move in the controller
//! (forwarding it to the controller leader when that is another node).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrowbus_raft::types::NodeId;
use arrowbus_raft::{BasicNode, ServerState};
use arrowbus_wire::ErrorCode;
use bytes::Bytes;
use openraft::async_runtime::WatchReceiver;
use openraft::ChangeMembers;

use super::{refused, Partition, Topics};
use crate::controller::{ControllerCommand, ControllerReply, Move};
use crate::error::BrokerError;

/// How often a leader looks for moves to drive, besides controller changes.
const MOVE_CHECK_EVERY: Duration = Duration::from_millis(500);
/// A move that failed (target node down, leadership lost) is retried after
/// this long, not at every check.
const MOVE_RETRY_AFTER: Duration = Duration::from_secs(3);
/// How long a new replica gets to catch up before the attempt is retried.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node being added gets to receive the controller's log (below
/// a client's request timeout, so the caller hears why).
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one `remove_node` call waits for the node's replicas to move
/// away before answering with the count left; the caller asks again.
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// How long the removed node gets to take note of its removal.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of one forwarded controller proposal.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a leader gets to confirm its leadership with a quorum before
/// recording a move as complete.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// The moves this node is driving (by partition group), and when failed
/// ones may be retried.
#[derive(Default)]
pub(super) struct Running {
    active: Mutex<HashSet<u64>>,
    retry_at: Mutex<HashMap<u64, Instant>>,
}

/// What `add_node` / `remove_node` did.
#[derive(Debug, Clone)]
pub struct NodeChange {
    /// Partition moves this call started (they complete in the background).
    pub moves: Vec<Move>,
    /// Partitions still moving in the cluster.
    pub moving: usize,
    /// `remove_node`: whether the node has left the controller (it holds no
    /// replica any more); until then, call again to keep waiting.
    pub removed: bool,
}

/// Succeeds only if this replica leads its group now (confirmed by a
/// quorum) and the group's committed voters are exactly `wanted`, with no
/// membership change pending.
///
/// `CompleteMove` makes the target the partition's replica list, and nodes
/// outside it delete their replicas; it must never be recorded while Raft
/// still counts one of them. The metrics the move started from are not
/// enough: a replica whose Raft core stopped (it panicked) keeps showing
/// its last metrics, "leader" with its old voters, forever (run n5-s512:
/// node 5's dead core still showed voters {1, 4, 5} and recorded a move to
/// [4, 1, 5] as complete, while the group's voters were {3, 4, 5}; node 3
/// then deleted its replica and only node 4 kept the acknowledged
/// entries). Both reads below go through the Raft core, and the read index
/// needs a quorum: a dead core or a deposed leader fails here.
async fn confirm_voters(
    raft: &PartitionRaft,
    wanted: &BTreeSet<NodeId>,
) -> Result<(), BrokerError> {
    tokio::time::timeout(
        CONFIRM_TIMEOUT,
        raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex),
    )
    .await
    .map_err(|_| {
        BrokerError::new(
            ErrorCode::Timeout,
            format!("leadership not confirmed by a quorum within {CONFIRM_TIMEOUT:?}"),
        )
    })?
    .map_err(|e| {
        BrokerError::new(
            ErrorCode::NotLeader,
            format!("leadership not confirmed: {e}"),
        )
    })?;
    let (committed, effective) = raft
        .with_raft_state(|st| {
            (
                st.membership_state.committed().clone(),
                st.membership_state.effective().clone(),
            )
        })
        .await
        .map_err(|e| BrokerError::internal(format!("reading the group's membership: {e}")))?;
    let voters: BTreeSet<NodeId> = committed.voter_ids().collect();
    let uniform = committed.get_joint_config().len() == 1;
    if committed.log_id() != effective.log_id() || !uniform || &voters != wanted {
        return Err(BrokerError::new(
            ErrorCode::Busy,
            format!(
                "the group's committed voters are {voters:?} (joint: {}, change pending: {}), not {wanted:?}",
                !uniform,
                committed.log_id() != effective.log_id()
            ),
        ));
    }
    Ok(())
}

type PartitionRaft = arrowbus_raft::types::Raft<
    arrowbus_raft::sm::StateMachine<arrowbus_raft::group::PartitionApplier>,
>;

/// How long a new replica may make no progress before a move stops
/// waiting for it to catch up (see [`caught_up`]).
const CATCH_UP_STALL: Duration = Duration::from_secs(5);

/// Wait until this leader has replicated to `node` every entry it held when
/// the wait began. A replica that makes no progress for [`CATCH_UP_STALL`]
/// (its node is down) is not waited for: the move goes on as Raft allows,
/// with the group's other voters a majority, and the replica catches up
/// when its node returns. `Err(None)` at `deadline`; `Err(Some(NotLeader))`
/// as soon as this replica stops leading (a new leader resumes the move).
async fn caught_up(
    raft: &PartitionRaft,
    node: NodeId,
    deadline: tokio::time::Instant,
    topic: &str,
    partition: u32,
) -> Result<(), Option<BrokerError>> {
    let matched = |m: &openraft::RaftMetrics<arrowbus_raft::types::TypeConfig>| {
        m.replication
            .as_ref()
            .and_then(|r| r.get(&node))
            .and_then(|l| l.as_ref())
            .map(|l| l.index)
    };
    let mut rx = raft.metrics();
    let target = rx.borrow_watched().last_log_index;
    let mut last = (matched(&rx.borrow_watched()), tokio::time::Instant::now());
    loop {
        let m = rx.borrow_watched().clone();
        if m.state != ServerState::Leader {
            let hint = m.current_leader.filter(|l| *l != m.id);
            return Err(Some(super::not_leader(
                hint,
                format!("partition {topic}/{partition} (moving it)"),
            )));
        }
        let now_matched = matched(&m);
        if now_matched >= target {
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        if now_matched > last.0 {
            last = (now_matched, now);
        } else if now.duration_since(last.1) >= CATCH_UP_STALL {
            tracing::warn!(topic, partition, node, matched = ?now_matched, target = ?target,
                "new replica makes no progress (node down?); moving without waiting for it");
            return Ok(());
        }
        if now >= deadline {
            tracing::warn!(topic, partition, node, matched = ?now_matched, target = ?target,
                "new replica still catching up");
            return Err(None);
        }
        // Wake for a metrics change, or to look at the stall and deadline.
        let wake = deadline.min(last.1 + CATCH_UP_STALL);
        if let Ok(Err(_)) = tokio::time::timeout_at(wake, rx.changed()).await {
            return Err(None); // the group is gone
        }
    }
}

/// A failed membership change: leadership lost or not yet known (an
/// election under way) is a retriable `NotLeader`, which clients retry;
/// anything else is internal.
fn membership_error(
    what: String,
    e: openraft::errors::RaftError<
        arrowbus_raft::types::TypeConfig,
        openraft::errors::ClientWriteError<arrowbus_raft::types::TypeConfig>,
    >,
) -> BrokerError {
    match e {
        openraft::errors::RaftError::APIError(
            openraft::errors::ClientWriteError::ForwardToLeader(f),
        ) => super::not_leader(f.leader_id, format!("the group ({what})")),
        e => BrokerError::internal(format!("{what}: {e}")),
    }
}

impl Topics {
    /// Drive the moves of partitions this node leads, at every controller
    /// change and every [`MOVE_CHECK_EVERY`].
    pub(super) async fn move_loop(self: Arc<Self>) {
        let mut pos = self.controller.sm.position();
        let mut tick = tokio::time::interval(MOVE_CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = pos.changed() => if changed.is_err() { return },
            }
            self.start_moves();
        }
    }

    fn start_moves(self: &Arc<Self>) {
        for topic in self.list() {
            for (&p, target) in &topic.meta.moving {
                let Some(Some(part)) = topic.local.get(p as usize) else {
                    continue;
                };
                if part.group.raft.metrics().borrow_watched().state != ServerState::Leader {
                    continue;
                }
                let gid = part.group.id;
                if self
                    .moves
                    .retry_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&gid)
                    .is_some_and(|at| Instant::now() < *at)
                {
                    continue;
                }
                if !self
                    .moves
                    .active
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(gid)
                {
                    continue;
                }
                let this = self.clone();
                let part = part.clone();
                let target = target.clone();
                let topic_id = topic.meta.id;
                tokio::spawn(async move {
                    let r = this.move_partition(&part, topic_id, &target).await;
                    let mut retry = this
                        .moves
                        .retry_at
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    match r {
                        Ok(()) => {
                            retry.remove(&gid);
                            tracing::info!(topic = %part.topic, partition = part.id, replicas = ?target,
                                "partition move complete");
                        }
                        Err(e) => {
                            retry.insert(gid, Instant::now() + MOVE_RETRY_AFTER);
                            tracing::warn!(topic = %part.topic, partition = part.id, ?target, error = %e,
                                "partition move did not finish; retrying in {MOVE_RETRY_AFTER:?}");
                        }
                    }
                    drop(retry);
                    this.moves
                        .active
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&gid);
                });
            }
        }
    }

    /// Make the group's voters `target`, then record the move as complete.
    /// Idempotent: a new leader resumes a move its predecessor left in joint
    /// consensus, or only records it if the voters already match.
    async fn move_partition(
        &self,
        part: &Partition,
        topic_id: u32,
        target: &[NodeId],
    ) -> Result<(), BrokerError> {
        let raft = &part.group.raft;
        // Learners and voter changes are writes: a quiet leader must renew
        // its lease first (see `GroupRegistry::ready_to_write`).
        self.env.registry.ready_to_write(part.group.id).await;
        let membership = raft.metrics().borrow_watched().membership_config.clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let wanted: BTreeSet<NodeId> = target.iter().copied().collect();
        let joint = membership.get_joint_config().len() > 1;
        if voters != wanted || joint {
            tracing::info!(topic = %part.topic, partition = part.id, from = ?voters, to = ?wanted,
                "moving partition");
            let known: HashSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
            let addrs = self.node_addrs();
            let deadline = tokio::time::Instant::now() + CATCH_UP_TIMEOUT;
            let too_slow = |n: &NodeId| {
                BrokerError::new(
                    ErrorCode::Timeout,
                    format!("node {n} did not catch up within {CATCH_UP_TIMEOUT:?}"),
                )
            };
            for n in wanted.iter().filter(|n| !known.contains(n)) {
                let addr = addrs.get(n).cloned().ok_or_else(|| {
                    BrokerError::internal(format!("node {n} has no address in the controller"))
                })?;
                tokio::time::timeout_at(deadline, raft.add_learner(*n, BasicNode { addr }, true))
                    .await
                    .map_err(|_| too_slow(n))?
                    .map_err(|e| membership_error(format!("adding node {n} as learner"), e))?;
            }
            // A blocking add_learner returns once the learner is within
            // openraft's replication lag threshold (thousands of entries),
            // and a learner left by an earlier attempt was not waited for
            // at all. Every new voter must hold what the leader holds now,
            // or right after the voter change the group's commits would
            // wait for a replica still copying its backlog.
            for n in wanted.iter().filter(|n| !voters.contains(n)) {
                caught_up(raft, *n, deadline, &part.topic, part.id)
                    .await
                    .map_err(|e| e.unwrap_or_else(|| too_slow(n)))?;
            }
            raft.change_membership(ChangeMembers::ReplaceAllVoters(wanted.clone()), false)
                .await
                .map_err(|e| membership_error(format!("changing voters to {wanted:?}"), e))?;
        }
        confirm_voters(raft, &wanted).await?;
        self.propose_anywhere(ControllerCommand::CompleteMove {
            topic_id,
            partition: part.id,
            replicas: target.to_vec(),
        })
        .await
        .map(|_| ())
    }

    /// Propose at the controller leader, wherever it is: here, or forwarded
    /// over the peer protocol.
    pub(super) async fn propose_anywhere(
        &self,
        cmd: ControllerCommand,
    ) -> Result<ControllerReply, BrokerError> {
        let payload = serde_json::to_vec(&cmd).map_err(|e| BrokerError::internal(e.to_string()))?;
        let mut leader = self
            .controller
            .raft
            .metrics()
            .borrow_watched()
            .current_leader;
        // A leader hint may be one election stale; follow it a few times.
        for _ in 0..3 {
            let Some(l) = leader else { break };
            if l == self.node_id {
                return self.propose(cmd).await;
            }
            let addr = self.node_addrs().get(&l).cloned().ok_or_else(|| {
                BrokerError::internal(format!("controller leader {l} has no address"))
            })?;
            match self
                .env
                .pool
                .propose_controller(&addr, Bytes::from(payload.clone()), FORWARD_TIMEOUT)
                .await
            {
                Ok(Ok(reply)) => {
                    return serde_json::from_slice(&reply).map_err(|e| {
                        BrokerError::internal(format!("controller reply does not decode: {e}"))
                    })
                }
                Ok(Err(hint)) => leader = hint,
                Err(e) => return Err(BrokerError::new(ErrorCode::Timeout, e.0)),
            }
        }
        Err(BrokerError::new(
            ErrorCode::NotLeader,
            "the controller has no leader right now (is a majority of nodes up?)",
        ))
    }

    /// Add node `id` at `addr` (a running `busd` with `cluster.join = true`)
    /// to the cluster: controller voter first, then a fair share of
    /// partition replicas moves to it. Must run on the controller leader.
    /// Idempotent: adding a node that is already a voter only rebalances.
    pub async fn add_node(&self, id: NodeId, addr: &str) -> Result<NodeChange, BrokerError> {
        if id == 0 {
            return Err(BrokerError::new(
                ErrorCode::InvalidArgument,
                "node ids start at 1",
            ));
        }
        crate::config::check_host_port(addr)
            .map_err(|why| BrokerError::new(ErrorCode::InvalidArgument, why))?;
        self.ensure_controller_leader()?;
        let membership = self.controller_membership();
        if let Some((_, n)) = membership.nodes().find(|(n, _)| **n == id) {
            if n.addr != addr {
                return Err(BrokerError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "node {id} is already in the cluster at {}; remove it first to move it to {addr}",
                        n.addr
                    ),
                ));
            }
        }
        if let Some((other, _)) = membership
            .nodes()
            .find(|(n, a)| **n != id && a.addr == addr)
        {
            return Err(BrokerError::new(
                ErrorCode::InvalidArgument,
                format!("{addr} is node {other}'s address"),
            ));
        }
        if !membership.voter_ids().any(|v| v == id) {
            let raft = &self.controller.raft;
            tokio::time::timeout(
                JOIN_TIMEOUT,
                raft.add_learner(id, BasicNode { addr: addr.to_owned() }, true),
            )
            .await
            .map_err(|_| {
                BrokerError::new(
                    ErrorCode::Timeout,
                    format!(
                        "node {id} at {addr} did not answer within {JOIN_TIMEOUT:?}: start it first \
                         (`busd run` with node_id = {id}, listen = {addr} and cluster.join = true, \
                         and a certificate signed by this cluster's CA)"
                    ),
                )
            })?
            .map_err(|e| membership_error(format!("adding node {id} as learner"), e))?;
            raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(|e| membership_error(format!("making node {id} a voter"), e))?;
            tracing::info!(node = id, %addr, "node added to the controller");
        }
        let nodes = self.controller_voters();
        match self
            .propose(ControllerCommand::AddNode { id, nodes })
            .await?
        {
            ControllerReply::Moves(moves) => Ok(NodeChange {
                moving: self.controller.sm.with_applier(|a| a.moving_count()),
                moves,
                removed: false,
            }),
            ControllerReply::Refused { code, message } => Err(refused(code, message)),
            other => Err(BrokerError::internal(format!(
                "controller answered AddNode with {other:?}"
            ))),
        }
    }

    /// Move every partition replica off node `id`, then remove it from the
    /// controller's voters. Must run on the controller leader. Waits up to
    /// [`DRAIN_WAIT`] for the moves; while they last it answers with
    /// `removed: false`, and calling again keeps waiting (idempotent).
    pub async fn remove_node(&self, id: NodeId) -> Result<NodeChange, BrokerError> {
        self.ensure_controller_leader()?;
        let voters = self.controller_voters();
        if !voters.contains(&id) {
            return Err(BrokerError::new(
                ErrorCode::InvalidArgument,
                format!("node {id} is not in this cluster (nodes: {voters:?})"),
            ));
        }
        if voters.len() == 1 {
            return Err(BrokerError::new(
                ErrorCode::InvalidArgument,
                format!("node {id} is the cluster's only node"),
            ));
        }
        if id == self.node_id {
            // A controller leader that removed itself would not hear who
            // leads next; hand leadership over and let the client ask there.
            if let Some(to) = voters.iter().copied().find(|v| *v != id) {
                let raft = &self.controller.raft;
                let _ = raft.trigger().transfer_leader(to).await;
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    super::wait_metrics(raft, |m| m.state != ServerState::Leader),
                )
                .await;
                return Err(super::not_leader(
                    Some(to),
                    format!("removing node {id} (it led the controller; leadership moved)"),
                ));
            }
        }
        let moves = match self
            .propose(ControllerCommand::DrainNode {
                id,
                nodes: voters.clone(),
            })
            .await?
        {
            ControllerReply::Moves(moves) => moves,
            ControllerReply::Refused { code, message } => return Err(refused(code, message)),
            other => {
                return Err(BrokerError::internal(format!(
                    "controller answered DrainNode with {other:?}"
                )))
            }
        };
        let deadline = tokio::time::Instant::now() + DRAIN_WAIT;
        let mut pos = self.controller.sm.position();
        loop {
            let left = self.controller.sm.with_applier(|a| a.replicas_on(id));
            if left == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, pos.changed())
                .await
                .is_err()
            {
                return Ok(NodeChange {
                    moves,
                    moving: left,
                    removed: false,
                });
            }
        }
        let membership_addr = self.node_addrs().get(&id).cloned();
        // Its replicas are gone; now the controller itself. A leader that
        // removes itself steps down once the change is committed.
        self.controller
            .raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(|e| membership_error(format!("removing node {id} from the controller"), e))?;
        tracing::info!(node = id, "node removed from the cluster");
        // It no longer hears from the controller: tell it, so that it stops
        // instead of serving stale metadata. Best effort (it may be down).
        if let Some(addr) = membership_addr {
            if let Err(e) = self.env.pool.notify_removed(&addr, NOTIFY_TIMEOUT).await {
                tracing::warn!(node = id, error = %e, "could not tell the removed node; stop it by hand");
            }
        }
        self.propose_anywhere(ControllerCommand::ForgetNode { id })
            .await?;
        Ok(NodeChange {
            moves,
            moving: 0,
            removed: true,
        })
    }

    fn ensure_controller_leader(&self) -> Result<(), BrokerError> {
        let m = self.controller.raft.metrics().borrow_watched().clone();
        if m.state == ServerState::Leader {
            return Ok(());
        }
        Err(super::not_leader(
            m.current_leader.filter(|l| *l != self.node_id),
            "the cluster metadata (controller)".into(),
        ))
    }
}
