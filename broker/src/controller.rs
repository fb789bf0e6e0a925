//! The controller group's state machine: cluster metadata (topics, their
//! partition assignments and schemas), materialized in sled.
//!
//! sled holds nothing that cannot be rebuilt: the controller's Raft log is
//! never purged (no snapshots yet), so a node whose sled files are missing or
//! unreadable moves them aside and re-applies the whole log (see
//! [`ControllerApplier::open`]). Every apply writes the new state and the
//! applied log id in one sled batch and flushes it, so after a restart sled
//! says exactly how far it got.
//!
//! Commands and stored values are JSON: they are rare, small, and a human
//! debugging a node at 3 a.m. can read them.
//!
//! The node registry is the controller group's own Raft membership (node ids
//! and addresses, replicated in its log); this state adds which nodes are
//! being drained for removal, and the partition reassignments under way.
//!
//! A reassignment moves a partition to a new replica set in three steps, so
//! that no replica is ever dropped while Raft may still count it:
//! 1. `AddNode` / `DrainNode` record a *target* replica list for the
//!    partition (`TopicRecord::moving`). Nodes host a partition while they
//!    are in its replicas or its target.
//! 2. The partition's Raft leader adds the target's new nodes as learners,
//!    waits for them to catch up, and changes the group's voters to the
//!    target (joint consensus).
//! 3. Once that change is committed it proposes `CompleteMove`: the target
//!    becomes the replica list, and nodes outside it drop their replica.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrowbus_raft::sm::Applier;
use arrowbus_raft::types::{self, Applied, Command, LogId};
use arrowbus_wire::limits::{MAX_PARTITIONS_PER_TOPIC, MAX_TOPICS};
use arrowbus_wire::ErrorCode;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A topic as the controller records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopicRecord {
    /// Never reused: partition group ids and directories derive from it, so
    /// a re-created topic never meets the old one's replicas.
    pub id: u32,
    pub name: String,
    pub replication_factor: u16,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub created_ms: i64,
    /// Canonical schema IPC bytes; empty until the topic has a schema.
    pub schema_ipc: Vec<u8>,
    /// Replicas of each partition; the first is the preferred leader.
    pub assignments: Vec<Vec<u64>>,
    /// Partitions being moved to a new replica set: partition -> target.
    #[serde(default)]
    pub moving: BTreeMap<u32, Vec<u64>>,
    /// Partitions whose replica set has changed since the topic was
    /// created. Their groups exist already; a node never creates
    /// (initializes) one of them, even with no data for it: its current
    /// replicas were made members by the group's leader, and a second
    /// initialization would start a different group under the same id.
    #[serde(default)]
    pub moved: BTreeSet<u32>,
}

impl TopicRecord {
    /// Nodes that must host partition `p`: its replicas and, while it
    /// moves, its target replicas.
    pub fn hosts(&self, p: u32) -> impl Iterator<Item = u64> + '_ {
        let current = self.assignments.get(p as usize).into_iter().flatten();
        let target = self.moving.get(&p).into_iter().flatten();
        current
            .chain(target.filter(move |n| {
                !self
                    .assignments
                    .get(p as usize)
                    .is_some_and(|a| a.contains(n))
            }))
            .copied()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControllerCommand {
    CreateTopic {
        name: String,
        partitions: u32,
        replication_factor: u16,
        retention_ms: Option<u64>,
        retention_bytes: Option<u64>,
        created_ms: i64,
        schema_ipc: Vec<u8>,
        /// The voters at proposal time: placement must be deterministic on
        /// every replica, so the proposer fixes the candidate nodes.
        nodes: Vec<u64>,
    },
    DeleteTopic {
        name: String,
    },
    SetSchemaIfAbsent {
        name: String,
        schema_ipc: Vec<u8>,
    },
    /// A node joined the controller's voters: give it a fair share of the
    /// partition replicas. `nodes`: the voters at proposal time.
    AddNode {
        id: u64,
        nodes: Vec<u64>,
    },
    /// Move every replica off node `id` (before it is removed), onto the
    /// least loaded of `nodes` (the voters at proposal time).
    DrainNode {
        id: u64,
        nodes: Vec<u64>,
    },
    /// Node `id` left the controller's voters: forget that it was draining.
    ForgetNode {
        id: u64,
    },
    /// A partition's Raft voters now equal the target replicas of its move.
    CompleteMove {
        topic_id: u32,
        partition: u32,
        replicas: Vec<u64>,
    },
}

/// The reply of an applied command: the affected topic, or a refusal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControllerReply {
    Topic(TopicRecord),
    Deleted,
    Refused {
        code: u16,
        message: String,
    },
    /// The partition moves an `AddNode` or `DrainNode` started.
    Moves(Vec<Move>),
    Done,
}

/// One partition's move to a new replica list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Move {
    pub topic: String,
    pub partition: u32,
    pub from: Vec<u64>,
    pub to: Vec<u64>,
}

impl ControllerCommand {
    pub fn encode(&self) -> io::Result<Command> {
        let json = serde_json::to_vec(self).map_err(io::Error::other)?;
        Ok(Command::controller(&json))
    }
}

pub fn decode_reply(applied: &Applied) -> io::Result<ControllerReply> {
    serde_json::from_slice(&applied.reply)
        .map_err(|e| types::invalid(format!("controller reply: {e}")))
}

const KEY_APPLIED: &[u8] = b"m/applied";
const KEY_NEXT_TOPIC_ID: &[u8] = b"m/next_topic_id";
const KEY_DRAINING: &[u8] = b"m/draining";

/// How long `open` waits for sled's file lock. A dropped `sled::Db` lets
/// go of it only once its background flusher thread ends, a moment later:
/// reopening right away (a test, a controller restarted in-process) must
/// wait for that, not mistake it for damage and rebuild.
const SLED_LOCK_WAIT: Duration = Duration::from_secs(5);
const SLED_LOCK_RETRY: Duration = Duration::from_millis(10);

/// sled 0.34 (pinned exactly) reports a held lock only in its message.
fn is_sled_lock_error(e: &io::Error) -> bool {
    e.to_string().contains("could not acquire lock")
}
const TOPIC_PREFIX: &[u8] = b"t/";

#[derive(Serialize, Deserialize)]
struct AppliedRecord {
    term: u64,
    leader: u64,
    index: u64,
}

/// The whole controller state, as a snapshot carries it.
#[derive(Serialize, Deserialize, Default)]
struct ControllerState {
    next_topic_id: u32,
    topics: BTreeMap<String, TopicRecord>,
    /// Nodes being drained for removal: no new replicas go there.
    #[serde(default)]
    draining: BTreeSet<u64>,
}

pub struct ControllerApplier {
    db: sled::Db,
    /// In-memory copy of the topics (the state is small).
    state: ControllerState,
}

impl ControllerApplier {
    /// Open the sled state in `dir`. If it does not open, or does not
    /// decode, it is moved aside and rebuilt from the Raft log. A state
    /// another handle still holds is not damaged: that waits, then fails.
    pub fn open(dir: &Path) -> io::Result<Self> {
        Self::open_waiting(dir, SLED_LOCK_WAIT)
    }

    fn open_waiting(dir: &Path, lock_wait: Duration) -> io::Result<Self> {
        let path = dir.join("state.sled");
        let deadline = Instant::now() + lock_wait;
        let first = loop {
            match Self::try_open(&path) {
                Err(e) if is_sled_lock_error(&e) => {
                    if Instant::now() >= deadline {
                        return Err(io::Error::other(format!(
                            "controller state {} is locked: {e}. Is another busd using this data directory?",
                            path.display()
                        )));
                    }
                    std::thread::sleep(SLED_LOCK_RETRY);
                }
                other => break other,
            }
        };
        match first {
            Ok(a) => Ok(a),
            Err(e) => {
                let aside = dir.join(format!("state.sled.broken-{}", crate::topics::now_ms()));
                tracing::error!(path = %path.display(), error = %e, moved_to = %aside.display(),
                    "controller state is unreadable; rebuilding it from the controller's Raft log");
                if path.exists() {
                    std::fs::rename(&path, &aside)?;
                }
                Self::try_open(&path).map_err(|e2| {
                    io::Error::other(format!(
                        "cannot create controller state at {}: {e2} (first error: {e}); \
                         check the data directory's permissions and free space",
                        path.display()
                    ))
                })
            }
        }
    }

    fn try_open(path: &PathBuf) -> io::Result<Self> {
        let db = sled::open(path).map_err(io::Error::other)?;
        let mut state = ControllerState::default();
        if let Some(v) = db.get(KEY_NEXT_TOPIC_ID).map_err(io::Error::other)? {
            state.next_topic_id = serde_json::from_slice(&v).map_err(io::Error::other)?;
        }
        if let Some(v) = db.get(KEY_DRAINING).map_err(io::Error::other)? {
            state.draining = serde_json::from_slice(&v).map_err(io::Error::other)?;
        }
        for kv in db.scan_prefix(TOPIC_PREFIX) {
            let (_, v) = kv.map_err(io::Error::other)?;
            let t: TopicRecord = serde_json::from_slice(&v).map_err(io::Error::other)?;
            state.topics.insert(t.name.clone(), t);
        }
        Ok(Self { db, state })
    }

    pub fn topics(&self) -> Vec<TopicRecord> {
        self.state.topics.values().cloned().collect()
    }

    /// Nodes being drained for removal.
    pub fn draining(&self) -> Vec<u64> {
        self.state.draining.iter().copied().collect()
    }

    /// Partitions still moving (to or from any node).
    pub fn moving_count(&self) -> usize {
        self.state.topics.values().map(|t| t.moving.len()).sum()
    }

    /// Partitions that still have node `id` as a replica or move target.
    pub fn replicas_on(&self, id: u64) -> usize {
        self.state
            .topics
            .values()
            .map(|t| {
                (0..t.assignments.len() as u32)
                    .filter(|p| t.hosts(*p).any(|n| n == id))
                    .count()
            })
            .sum()
    }

    fn write(
        &mut self,
        log_id: &LogId,
        changed: &[TopicRecord],
        deleted: Option<&str>,
    ) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        for t in changed {
            batch.insert(
                topic_key(&t.name),
                serde_json::to_vec(t).map_err(io::Error::other)?,
            );
        }
        if let Some(name) = deleted {
            batch.remove(topic_key(name));
        }
        batch.insert(
            KEY_NEXT_TOPIC_ID,
            serde_json::to_vec(&self.state.next_topic_id).map_err(io::Error::other)?,
        );
        batch.insert(
            KEY_DRAINING,
            serde_json::to_vec(&self.state.draining).map_err(io::Error::other)?,
        );
        let applied = AppliedRecord {
            term: log_id.leader_id.term,
            leader: log_id.leader_id.node_id,
            index: log_id.index,
        };
        batch.insert(
            KEY_APPLIED,
            serde_json::to_vec(&applied).map_err(io::Error::other)?,
        );
        self.db.apply_batch(batch).map_err(io::Error::other)?;
        // sled otherwise syncs in the background every 500 ms; controller
        // commands are rare, so make each one durable before answering.
        self.db.flush().map_err(io::Error::other)?;
        Ok(())
    }

    fn execute(
        &mut self,
        cmd: ControllerCommand,
    ) -> (ControllerReply, Vec<TopicRecord>, Option<String>) {
        let refuse = |code: ErrorCode, message: String| {
            (
                ControllerReply::Refused {
                    code: code as u16,
                    message,
                },
                Vec::new(),
                None,
            )
        };
        match cmd {
            ControllerCommand::CreateTopic {
                name,
                partitions,
                replication_factor,
                retention_ms,
                retention_bytes,
                created_ms,
                schema_ipc,
                mut nodes,
            } => {
                if self.state.topics.contains_key(&name) {
                    return refuse(
                        ErrorCode::TopicAlreadyExists,
                        format!("topic '{name}' already exists"),
                    );
                }
                if self.state.topics.len() >= MAX_TOPICS {
                    return refuse(
                        ErrorCode::TooManyTopics,
                        format!("this cluster already has the maximum of {MAX_TOPICS} topics; delete unused ones"),
                    );
                }
                if partitions == 0 || partitions > MAX_PARTITIONS_PER_TOPIC {
                    return refuse(
                        ErrorCode::TooManyPartitions,
                        format!("partitions = {partitions}: a topic has 1 to {MAX_PARTITIONS_PER_TOPIC} partitions"),
                    );
                }
                nodes.sort_unstable();
                nodes.dedup();
                // Nodes on their way out get no new replicas.
                nodes.retain(|n| !self.state.draining.contains(n));
                let rf = usize::from(replication_factor);
                if rf == 0 || rf > nodes.len() {
                    return refuse(
                        ErrorCode::InvalidArgument,
                        format!(
                            "replication factor {replication_factor} needs that many nodes; this cluster has {} ({:?})",
                            nodes.len(),
                            nodes
                        ),
                    );
                }
                let id = self.state.next_topic_id.max(1);
                self.state.next_topic_id = id + 1;
                // Round-robin placement: partition p starts at node
                // (id + p) mod n, so preferred leaders spread over nodes and
                // consecutive topics do not pile onto the same node.
                let n = nodes.len();
                let assignments = (0..partitions as usize)
                    .map(|p| (0..rf).map(|r| nodes[(id as usize + p + r) % n]).collect())
                    .collect();
                let t = TopicRecord {
                    id,
                    name: name.clone(),
                    replication_factor,
                    retention_ms,
                    retention_bytes,
                    created_ms,
                    schema_ipc,
                    assignments,
                    moving: BTreeMap::new(),
                    moved: BTreeSet::new(),
                };
                self.state.topics.insert(name, t.clone());
                (ControllerReply::Topic(t.clone()), vec![t], None)
            }
            ControllerCommand::DeleteTopic { name } => {
                if self.state.topics.remove(&name).is_none() {
                    return refuse(
                        ErrorCode::TopicNotFound,
                        format!("topic '{name}' does not exist; list topics with `busctl topics`"),
                    );
                }
                (ControllerReply::Deleted, Vec::new(), Some(name))
            }
            ControllerCommand::SetSchemaIfAbsent { name, schema_ipc } => {
                let Some(t) = self.state.topics.get_mut(&name) else {
                    return refuse(
                        ErrorCode::TopicNotFound,
                        format!("topic '{name}' does not exist; create it with `busctl topics create {name}`"),
                    );
                };
                if t.schema_ipc.is_empty() {
                    t.schema_ipc = schema_ipc;
                }
                let t = t.clone();
                (ControllerReply::Topic(t.clone()), vec![t], None)
            }
            ControllerCommand::AddNode { id, nodes } => {
                if let Some(busy) = self.moves_under_way() {
                    return refuse(ErrorCode::Busy, busy);
                }
                let nodes = self.placeable(nodes);
                if !nodes.contains(&id) {
                    return refuse(
                        ErrorCode::InvalidArgument,
                        format!("node {id} is not a controller voter (voters: {nodes:?})"),
                    );
                }
                let moves = plan_add(&self.state.topics, &nodes, id);
                let changed = self.start_moves(&moves);
                (ControllerReply::Moves(moves), changed, None)
            }
            ControllerCommand::DrainNode { id, nodes } => {
                if !nodes.contains(&id) {
                    return refuse(
                        ErrorCode::InvalidArgument,
                        format!("node {id} is not in this cluster (nodes: {nodes:?})"),
                    );
                }
                if let Some(busy) = self.moves_under_way() {
                    // A retried removal waits for its own moves.
                    if self.state.draining.contains(&id) {
                        return (ControllerReply::Moves(Vec::new()), Vec::new(), None);
                    }
                    return refuse(ErrorCode::Busy, busy);
                }
                let remaining: Vec<u64> = self
                    .placeable(nodes)
                    .into_iter()
                    .filter(|n| *n != id)
                    .collect();
                let moves = match plan_drain(&self.state.topics, &remaining, id) {
                    Ok(m) => m,
                    Err(why) => return refuse(ErrorCode::InvalidArgument, why),
                };
                self.state.draining.insert(id);
                let changed = self.start_moves(&moves);
                (ControllerReply::Moves(moves), changed, None)
            }
            ControllerCommand::ForgetNode { id } => {
                self.state.draining.remove(&id);
                (ControllerReply::Done, Vec::new(), None)
            }
            ControllerCommand::CompleteMove {
                topic_id,
                partition,
                replicas,
            } => {
                let Some(t) = self.state.topics.values_mut().find(|t| t.id == topic_id) else {
                    // Deleted while it moved.
                    return (ControllerReply::Done, Vec::new(), None);
                };
                // A completion for an older target (proposed twice, or by a
                // leader that lost the race) changes nothing.
                if t.moving.get(&partition) != Some(&replicas) {
                    return (ControllerReply::Done, Vec::new(), None);
                }
                t.moving.remove(&partition);
                t.moved.insert(partition);
                if let Some(a) = t.assignments.get_mut(partition as usize) {
                    *a = replicas;
                }
                (ControllerReply::Done, vec![t.clone()], None)
            }
        }
    }

    /// Why a new rebalance must wait, if moves are still under way: two
    /// overlapping moves of one partition could drop a replica Raft still
    /// counts.
    fn moves_under_way(&self) -> Option<String> {
        let n = self.moving_count();
        (n > 0).then(|| {
            format!(
                "{n} partition(s) are still moving to new replicas; retry when \
                 `busctl topics describe` shows no moves"
            )
        })
    }

    /// The voters that may take replicas: sorted, deduplicated, not draining.
    fn placeable(&self, mut nodes: Vec<u64>) -> Vec<u64> {
        nodes.sort_unstable();
        nodes.dedup();
        nodes.retain(|n| !self.state.draining.contains(n));
        nodes
    }

    /// Record each move's target; returns the changed topics.
    fn start_moves(&mut self, moves: &[Move]) -> Vec<TopicRecord> {
        let mut changed: BTreeMap<String, ()> = BTreeMap::new();
        for m in moves {
            if let Some(t) = self.state.topics.get_mut(&m.topic) {
                t.moving.insert(m.partition, m.to.clone());
                changed.insert(m.topic.clone(), ());
            }
        }
        changed
            .keys()
            .filter_map(|name| self.state.topics.get(name).cloned())
            .collect()
    }
}

/// Replicas per node, over every partition of every topic (`nodes` start at 0).
fn load(topics: &BTreeMap<String, TopicRecord>, nodes: &[u64]) -> BTreeMap<u64, usize> {
    let mut load: BTreeMap<u64, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    for t in topics.values() {
        for replicas in &t.assignments {
            for r in replicas {
                *load.entry(*r).or_default() += 1;
            }
        }
    }
    load
}

/// Moves that give node `new` its fair share (total replicas / nodes,
/// rounded down) of the replicas: each takes one replica from the most
/// loaded node of a partition, keeping its position in the list (a moved
/// preferred leader makes `new` the preferred leader, which spreads leaders
/// too). Deterministic: every replica plans the same moves.
pub fn plan_add(topics: &BTreeMap<String, TopicRecord>, nodes: &[u64], new: u64) -> Vec<Move> {
    let mut load = load(topics, nodes);
    let total: usize = load.values().sum();
    let fair = total / nodes.len().max(1);
    let mut moves = Vec::new();
    for t in topics.values() {
        for (p, replicas) in t.assignments.iter().enumerate() {
            if load.get(&new).copied().unwrap_or(0) >= fair {
                return moves;
            }
            if replicas.contains(&new) {
                continue;
            }
            // The busiest replica of this partition, if it has more than
            // its share.
            let Some((pos, from)) = replicas
                .iter()
                .enumerate()
                .map(|(i, r)| (i, *r))
                .max_by_key(|(_, r)| (load.get(r).copied().unwrap_or(0), u64::MAX - r))
            else {
                continue;
            };
            if load.get(&from).copied().unwrap_or(0) <= fair {
                continue;
            }
            let mut to = replicas.clone();
            to[pos] = new;
            *load.entry(from).or_default() -= 1;
            *load.entry(new).or_default() += 1;
            moves.push(Move {
                topic: t.name.clone(),
                partition: p as u32,
                from: replicas.clone(),
                to,
            });
        }
    }
    moves
}

/// Moves that take every replica off node `gone`, each onto the least
/// loaded of `remaining` that does not already hold the partition. Refused
/// when a partition would have fewer replicas than its topic asks for.
pub fn plan_drain(
    topics: &BTreeMap<String, TopicRecord>,
    remaining: &[u64],
    gone: u64,
) -> Result<Vec<Move>, String> {
    let mut load = load(topics, remaining);
    let mut moves = Vec::new();
    for t in topics.values() {
        for (p, replicas) in t.assignments.iter().enumerate() {
            let Some(pos) = replicas.iter().position(|r| *r == gone) else {
                continue;
            };
            let Some(to_node) = remaining
                .iter()
                .filter(|n| !replicas.contains(n))
                .min_by_key(|n| (load.get(n).copied().unwrap_or(0), **n))
                .copied()
            else {
                return Err(format!(
                    "topic '{}' keeps {} replicas per partition, and without node {gone} the \
                     cluster has {} node(s) ({remaining:?}); add a node first \
                     (`busctl cluster add-node`) or delete the topic",
                    t.name,
                    replicas.len(),
                    remaining.len()
                ));
            };
            let mut to = replicas.clone();
            to[pos] = to_node;
            *load.entry(to_node).or_default() += 1;
            moves.push(Move {
                topic: t.name.clone(),
                partition: p as u32,
                from: replicas.clone(),
                to,
            });
        }
    }
    Ok(moves)
}

fn topic_key(name: &str) -> Vec<u8> {
    let mut k = TOPIC_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

impl Applier for ControllerApplier {
    fn apply(&mut self, log_id: &LogId, cmd: &Command) -> io::Result<Applied> {
        let reply = match cmd
            .controller_payload()
            .map(serde_json::from_slice::<ControllerCommand>)
        {
            Some(Ok(c)) => {
                let (reply, changed, deleted) = self.execute(c);
                self.write(log_id, &changed, deleted.as_deref())?;
                reply
            }
            // Every replica refuses the same bad entry the same way.
            Some(Err(e)) => ControllerReply::Refused {
                code: ErrorCode::InvalidArgument as u16,
                message: format!("controller command does not decode: {e}"),
            },
            None => ControllerReply::Refused {
                code: ErrorCode::InvalidArgument as u16,
                message: "a data batch reached the controller".into(),
            },
        };
        Ok(Applied {
            reply: Bytes::from(serde_json::to_vec(&reply).map_err(io::Error::other)?),
            ..Applied::default()
        })
    }

    fn apply_raft_entry(&mut self, log_id: &LogId) -> io::Result<()> {
        self.write(log_id, &[], None)
    }

    fn recovered_applied(&mut self) -> io::Result<Option<LogId>> {
        match self.db.get(KEY_APPLIED).map_err(io::Error::other)? {
            Some(v) => {
                let a: AppliedRecord = serde_json::from_slice(&v).map_err(io::Error::other)?;
                Ok(Some(types::log_id(a.term, a.leader, a.index)))
            }
            None => Ok(None),
        }
    }

    fn next_offset(&self) -> u64 {
        0
    }

    fn snapshot(&self) -> io::Result<Vec<u8>> {
        serde_json::to_vec(&self.state).map_err(io::Error::other)
    }

    fn restore(
        &mut self,
        last: Option<&LogId>,
        data: &[u8],
    ) -> io::Result<Option<arrowbus_raft::sm::RestoreDone>> {
        let state: ControllerState = serde_json::from_slice(data)
            .map_err(|e| types::invalid(format!("controller snapshot: {e}")))?;
        self.db.clear().map_err(io::Error::other)?;
        self.state = state;
        let topics: Vec<TopicRecord> = self.state.topics.values().cloned().collect();
        for t in &topics {
            self.db
                .insert(
                    topic_key(&t.name),
                    serde_json::to_vec(t).map_err(io::Error::other)?,
                )
                .map_err(io::Error::other)?;
        }
        match last {
            Some(l) => self.write(l, &[], None)?,
            None => self.db.flush().map(|_| ()).map_err(io::Error::other)?,
        }
        // Everything above is already durable (sled flushed).
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn topic(name: &str, id: u32, assignments: Vec<Vec<u64>>) -> TopicRecord {
        TopicRecord {
            id,
            name: name.into(),
            replication_factor: assignments.first().map_or(0, |a| a.len() as u16),
            retention_ms: None,
            retention_bytes: None,
            created_ms: 0,
            schema_ipc: Vec::new(),
            assignments,
            moving: BTreeMap::new(),
            moved: BTreeSet::new(),
        }
    }

    fn loads_after(
        topics: &BTreeMap<String, TopicRecord>,
        moves: &[Move],
        nodes: &[u64],
    ) -> BTreeMap<u64, usize> {
        let mut t = topics.clone();
        for m in moves {
            let rec = t.get_mut(&m.topic).expect("move names a known topic");
            assert_eq!(rec.assignments[m.partition as usize], m.from, "{m:?}");
            rec.assignments[m.partition as usize] = m.to.clone();
        }
        for rec in t.values() {
            for r in &rec.assignments {
                let mut d = r.clone();
                d.sort_unstable();
                d.dedup();
                assert_eq!(
                    d.len(),
                    r.len(),
                    "duplicate replica in {r:?} of {}",
                    rec.name
                );
            }
        }
        load(&t, nodes)
    }

    /// Each move swaps exactly one replica, in place.
    fn assert_single_swap(m: &Move, new: Option<u64>, gone: Option<u64>) {
        let changed: Vec<usize> = (0..m.from.len())
            .filter(|i| m.from[*i] != m.to[*i])
            .collect();
        assert_eq!(changed.len(), 1, "{m:?}");
        if let Some(n) = new {
            assert_eq!(m.to[changed[0]], n, "{m:?}");
        }
        if let Some(g) = gone {
            assert_eq!(m.from[changed[0]], g, "{m:?}");
        }
    }

    #[test]
    fn a_new_node_gets_a_fair_share() {
        // 6 partitions x 3 replicas on nodes 1..3: 6 each. A 4th node gets
        // 18 / 4 = 4 (rounded down), taken from the nodes that hold most.
        let a = (0..6)
            .map(|p| (0..3).map(|r| (p + r) % 3 + 1).collect())
            .collect();
        let topics = BTreeMap::from([("ticks".to_owned(), topic("ticks", 1, a))]);
        let moves = plan_add(&topics, &[1, 2, 3, 4], 4);
        assert_eq!(moves.len(), 4, "{moves:?}");
        for m in &moves {
            assert_single_swap(m, Some(4), None);
        }
        let l = loads_after(&topics, &moves, &[1, 2, 3, 4]);
        assert_eq!(l[&4], 4);
        assert_eq!(l.values().sum::<usize>(), 18);
        assert!(l.values().all(|n| (4..=5).contains(n)), "{l:?}");
        // Some moved replica was a preferred leader: leadership spreads too.
        assert!(moves.iter().any(|m| m.to[0] == 4), "{moves:?}");
    }

    #[test]
    fn draining_a_node_moves_every_replica_and_keeps_replication() {
        let a = (0..8)
            .map(|p| (0..2).map(|r| (p + r) % 4 + 1).collect())
            .collect();
        let topics = BTreeMap::from([("t".to_owned(), topic("t", 1, a))]);
        let moves = plan_drain(&topics, &[1, 3, 4], 2).expect("3 nodes hold 2 replicas");
        // Node 2 held 4 replicas (partitions 0,1 as second... and first).
        assert_eq!(moves.len(), 4, "{moves:?}");
        for m in &moves {
            assert_single_swap(m, None, Some(2));
        }
        let l = loads_after(&topics, &moves, &[1, 3, 4]);
        assert_eq!(l.get(&2).copied().unwrap_or(0), 0, "{l:?}");
        assert_eq!(l.values().sum::<usize>(), 16);
        let (min, max) = (l.values().min(), l.values().max());
        assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{l:?}");
    }

    #[test]
    fn draining_is_refused_when_replicas_would_not_fit() {
        let a = vec![vec![1, 2, 3]];
        let topics = BTreeMap::from([("t".to_owned(), topic("t", 1, a))]);
        let err = plan_drain(&topics, &[1, 2], 3).expect_err("3 replicas on 2 nodes");
        assert!(err.contains("topic 't' keeps 3 replicas"), "{err}");
    }

    #[test]
    fn random_layouts_stay_valid_after_add_and_drain() {
        let seed = std::env::var("ARROWBUS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        println!("seed = {seed} (replay with ARROWBUS_TEST_SEED={seed})");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for round in 0..200 {
            let n = rng.random_range(2..=6u64);
            let nodes: Vec<u64> = (1..=n).collect();
            let mut topics = BTreeMap::new();
            for t in 0..rng.random_range(1..5u32) {
                let rf = rng.random_range(1..=n.min(3)) as usize;
                let parts = rng.random_range(1..10usize);
                let start = rng.random_range(0..n) as usize;
                let a = (0..parts)
                    .map(|p| {
                        (0..rf)
                            .map(|r| nodes[(start + p + r) % nodes.len()])
                            .collect()
                    })
                    .collect();
                topics.insert(format!("t{t}"), topic(&format!("t{t}"), t + 1, a));
            }
            let total: usize = load(&topics, &nodes).values().sum();
            // Add node n+1.
            let mut with_new = nodes.clone();
            with_new.push(n + 1);
            let moves = plan_add(&topics, &with_new, n + 1);
            for m in &moves {
                assert_single_swap(m, Some(n + 1), None);
            }
            let l = loads_after(&topics, &moves, &with_new);
            assert_eq!(l.values().sum::<usize>(), total, "round {round}");
            let fair = total / with_new.len();
            assert!(l[&(n + 1)] <= fair, "round {round}: {l:?}");
            // Drain a random node.
            let gone = rng.random_range(1..=n);
            let remaining: Vec<u64> = nodes.iter().copied().filter(|x| *x != gone).collect();
            let max_rf = topics
                .values()
                .map(|t| t.assignments[0].len())
                .max()
                .unwrap_or(0);
            match plan_drain(&topics, &remaining, gone) {
                Ok(moves) => {
                    for m in &moves {
                        assert_single_swap(m, None, Some(gone));
                    }
                    let l = loads_after(&topics, &moves, &remaining);
                    assert_eq!(l.get(&gone).copied().unwrap_or(0), 0, "round {round}");
                    assert_eq!(l.values().sum::<usize>(), total, "round {round}");
                }
                Err(_) => assert!(
                    max_rf > remaining.len(),
                    "round {round}: refused needlessly"
                ),
            }
        }
    }

    fn apply(a: &mut ControllerApplier, index: u64, cmd: ControllerCommand) -> ControllerReply {
        let applied = a
            .apply(&types::log_id(1, 1, index), &cmd.encode().expect("encode"))
            .expect("apply");
        decode_reply(&applied).expect("reply")
    }

    fn create(name: &str, nodes: Vec<u64>) -> ControllerCommand {
        ControllerCommand::CreateTopic {
            name: name.into(),
            partitions: 3,
            replication_factor: 2,
            retention_ms: None,
            retention_bytes: None,
            created_ms: 0,
            schema_ipc: Vec::new(),
            nodes,
        }
    }

    #[test]
    fn moves_are_recorded_completed_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = ControllerApplier::open(dir.path()).expect("open");
        assert!(matches!(
            apply(&mut a, 1, create("t", vec![1, 2])),
            ControllerReply::Topic(_)
        ));
        let ControllerReply::Moves(moves) = apply(
            &mut a,
            2,
            ControllerCommand::AddNode {
                id: 3,
                nodes: vec![1, 2, 3],
            },
        ) else {
            panic!("AddNode answers with its moves");
        };
        // 6 replicas over 3 nodes: node 3 gets 2.
        assert_eq!(moves.len(), 2, "{moves:?}");
        assert_eq!(a.moving_count(), 2);
        let t = &a.topics()[0];
        let m = &moves[0];
        assert_eq!(t.moving.get(&m.partition), Some(&m.to));
        // Hosts: old and new replicas while the move lasts.
        let hosts: Vec<u64> = t.hosts(m.partition).collect();
        assert_eq!(hosts.len(), 3, "{hosts:?}");
        // No second rebalance while moves are under way.
        match apply(
            &mut a,
            3,
            ControllerCommand::DrainNode {
                id: 1,
                nodes: vec![1, 2, 3],
            },
        ) {
            ControllerReply::Refused { code, .. } => assert_eq!(code, ErrorCode::Busy as u16),
            other => panic!("expected Busy, got {other:?}"),
        }
        // A completion for another target changes nothing.
        apply(
            &mut a,
            4,
            ControllerCommand::CompleteMove {
                topic_id: t.id,
                partition: m.partition,
                replicas: m.from.clone(),
            },
        );
        assert_eq!(a.moving_count(), 2);
        apply(
            &mut a,
            5,
            ControllerCommand::CompleteMove {
                topic_id: t.id,
                partition: m.partition,
                replicas: m.to.clone(),
            },
        );
        assert_eq!(a.moving_count(), 1);
        assert_eq!(a.topics()[0].assignments[m.partition as usize], m.to);
        assert_eq!(a.topics()[0].moved, BTreeSet::from([m.partition]));
        drop(a);
        let a = ControllerApplier::open(dir.path()).expect("reopen");
        assert_eq!(a.moving_count(), 1);
        assert_eq!(a.topics()[0].assignments[m.partition as usize], m.to);
        assert_eq!(
            a.topics()[0].moving.get(&moves[1].partition),
            Some(&moves[1].to)
        );
        // Recorded durably: a restarted node must not create it either.
        assert_eq!(a.topics()[0].moved, BTreeSet::from([m.partition]));
    }

    #[test]
    fn a_state_held_by_another_handle_is_refused_not_rebuilt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = ControllerApplier::open(dir.path()).expect("open");
        let reply = apply(&mut a, 1, create("kept", vec![1, 2]));
        assert!(matches!(reply, ControllerReply::Topic(_)), "{reply:?}");
        let e = match ControllerApplier::open_waiting(dir.path(), Duration::from_millis(100)) {
            Err(e) => e,
            Ok(_) => panic!("a second handle opened a state that is in use"),
        };
        assert!(e.to_string().contains("is locked"), "{e}");
        // Nothing was moved aside: the first handle's state is intact.
        let entries: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|d| d.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries, vec!["state.sled".to_owned()]);
        drop(a);
        // Once the handle is gone (its flusher thread ends a moment later),
        // the state reopens with what was applied.
        let a = ControllerApplier::open(dir.path()).expect("reopen");
        assert_eq!(a.topics().len(), 1);
        assert_eq!(a.topics()[0].name, "kept");
    }

    #[test]
    fn a_draining_node_gets_no_new_topics_until_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = ControllerApplier::open(dir.path()).expect("open");
        let ControllerReply::Moves(moves) = apply(
            &mut a,
            1,
            ControllerCommand::DrainNode {
                id: 3,
                nodes: vec![1, 2, 3],
            },
        ) else {
            panic!("DrainNode answers with its moves");
        };
        assert!(moves.is_empty());
        assert_eq!(a.draining(), vec![3]);
        let ControllerReply::Topic(t) = apply(&mut a, 2, create("t", vec![1, 2, 3])) else {
            panic!("create");
        };
        assert!(
            t.assignments.iter().flatten().all(|n| *n != 3),
            "{:?}",
            t.assignments
        );
        drop(a);
        let mut a = ControllerApplier::open(dir.path()).expect("reopen");
        assert_eq!(a.draining(), vec![3]);
        apply(&mut a, 3, ControllerCommand::ForgetNode { id: 3 });
        assert!(a.draining().is_empty());
    }
}
