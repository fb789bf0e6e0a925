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

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

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
}

/// The reply of an applied command: the affected topic, or a refusal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControllerReply {
    Topic(TopicRecord),
    Deleted,
    Refused { code: u16, message: String },
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
}

pub struct ControllerApplier {
    db: sled::Db,
    /// In-memory copy of the topics (the state is small).
    state: ControllerState,
}

impl ControllerApplier {
    /// Open the sled state in `dir`. If it does not open, or does not
    /// decode, it is moved aside and rebuilt from the Raft log.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let path = dir.join("state.sled");
        match Self::try_open(&path) {
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

    fn write(
        &mut self,
        log_id: &LogId,
        changed: Option<&TopicRecord>,
        deleted: Option<&str>,
    ) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        if let Some(t) = changed {
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
    ) -> (ControllerReply, Option<TopicRecord>, Option<String>) {
        let refuse = |code: ErrorCode, message: String| {
            (
                ControllerReply::Refused {
                    code: code as u16,
                    message,
                },
                None,
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
                };
                self.state.topics.insert(name, t.clone());
                (ControllerReply::Topic(t.clone()), Some(t), None)
            }
            ControllerCommand::DeleteTopic { name } => {
                if self.state.topics.remove(&name).is_none() {
                    return refuse(
                        ErrorCode::TopicNotFound,
                        format!("topic '{name}' does not exist; list topics with `busctl topics`"),
                    );
                }
                (ControllerReply::Deleted, None, Some(name))
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
                (ControllerReply::Topic(t.clone()), Some(t), None)
            }
        }
    }
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
                self.write(log_id, changed.as_ref(), deleted.as_deref())?;
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
        self.write(log_id, None, None)
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
            Some(l) => self.write(l, None, None)?,
            None => self.db.flush().map(|_| ()).map_err(io::Error::other)?,
        }
        // Everything above is already durable (sled flushed).
        Ok(None)
    }
}
