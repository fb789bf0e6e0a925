//! Control messages, rkyv-encoded in a frame's control section.
//!
//! Streams:
//! - unary: the client opens a bidirectional stream, sends one request frame
//!   and finishes; the broker answers with one frame and finishes.
//! - producer pipeline: a long-lived stream of `Publish` frames (each with a
//!   batch body), answered in order by `Ack` or `Error` frames with the same
//!   `request_id`.
//! - subscription: `Subscribe`, answered by `Subscribed` and then `Batch`
//!   frames while the subscriber's credit lasts; the subscriber sends `Credit`
//!   frames on the same stream to receive more.

use rkyv::{Archive, Deserialize, Serialize};

use crate::error::ErrorCode;

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum ClientMessage {
    CreateTopic(CreateTopic),
    DeleteTopic {
        topic: String,
    },
    ListTopics,
    DescribeTopic {
        topic: String,
    },
    /// Cluster nodes and, per topic, partition leaders.
    Metadata,
    /// This node's view of the cluster: its Raft groups, roles, terms,
    /// commit and applied indexes and follower lag (`busctl cluster`).
    ClusterStatus,
    /// Add a running node (started with `cluster.join = true`) to the
    /// cluster and move a fair share of partition replicas to it. Answered
    /// by `NodeChange` once the node is a controller voter; the moves go on
    /// in the background (`moving_to` in `DescribeTopic`).
    AddNode {
        id: u64,
        addr: String,
    },
    /// Move every replica off a node, then remove it from the cluster.
    /// Answered by `NodeChange` within a few seconds; `removed: false` means
    /// replicas are still moving: send it again to keep waiting.
    RemoveNode {
        id: u64,
    },
    /// Fix the topic's schema if it has none; answered with the topic's schema
    /// (the given one, or the one already there). Races between two first
    /// publishers are settled here, by whoever reaches the broker first.
    SetSchemaIfAbsent {
        topic: String,
        schema_ipc: Vec<u8>,
    },
    /// Body: one batch (header + Arrow IPC messages: dictionaries, then one record batch).
    Publish(Publish),
    Subscribe(Subscribe),
    Credit(Credit),
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CreateTopic {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u16,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    /// Arrow IPC schema message; `None`: the first publish fixes the schema.
    pub schema_ipc: Option<Vec<u8>>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Chosen by the client, echoed in the Ack or Error.
    pub request_id: u64,
    pub topic: String,
    pub partition: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    Earliest,
    /// The partition's next offset when the subscription starts.
    Latest,
    /// A row offset; a batch that contains it is sliced to start there.
    Offset(u64),
    /// The first batch appended at or after this time (ms since the Unix epoch).
    Timestamp(i64),
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Everything up to the high watermark (committed in Raft).
    ReadUncommitted,
    /// Up to the last stable offset, aborted transactions filtered.
    ReadCommitted,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Subscribe {
    pub topic: String,
    pub partition: u32,
    pub start: StartAt,
    pub isolation: Isolation,
    pub credit: Credit,
}

/// Credit added to a subscription. The broker sends a batch while both
/// counters are positive; the last batch may overshoot the byte credit (a
/// batch is never split), so a subscription holds at most its byte credit plus
/// one batch.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Credit {
    pub bytes: u64,
    pub batches: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Error(ErrorReply),
    Topic(TopicInfo),
    Topics(Vec<TopicInfo>),
    TopicDeleted {
        topic: String,
    },
    Metadata(ClusterMetadata),
    Cluster(NodeStatus),
    NodeChange(NodeChange),
    Schema {
        schema_id: u32,
        schema_ipc: Vec<u8>,
    },
    Ack(Ack),
    Subscribed(Subscribed),
    /// Body: one stored batch, verbatim.
    Batch(BatchDelivery),
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorReply {
    pub code: u16,
    pub message: String,
    /// The request it answers in a producer pipeline; 0 elsewhere.
    pub request_id: u64,
    /// With NotLeader: the node that leads the partition, if known.
    pub leader_hint: Option<u64>,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.len() > crate::limits::MAX_ERROR_MESSAGE_BYTES {
            let mut cut = crate::limits::MAX_ERROR_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self {
            code: code.as_u16(),
            message,
            request_id: 0,
            leader_hint: None,
        }
    }
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TopicInfo {
    pub name: String,
    pub replication_factor: u16,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    /// 0: no schema yet.
    pub schema_id: u32,
    /// Arrow IPC schema message; empty when `schema_id` is 0.
    pub schema_ipc: Vec<u8>,
    pub created_ms: i64,
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: u32,
    pub leader: u64,
    pub replicas: Vec<u64>,
    /// While the partition moves to a new replica set (a node added or
    /// being removed): that set; empty otherwise.
    pub moving_to: Vec<u64>,
    /// Replicas holding everything committed (known on the leader only).
    pub in_sync: Vec<u64>,
    /// First retained offset.
    pub earliest_offset: u64,
    /// The high watermark: the offset after the last committed batch.
    pub latest_offset: u64,
    pub bytes: u64,
    /// Log entries retained: data batches plus the partition's Raft entries
    /// (one per leader election, one per membership change).
    pub batches: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ClusterMetadata {
    pub nodes: Vec<NodeInfo>,
}

/// The answer to `AddNode` / `RemoveNode`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeChange {
    /// Partition moves the request started.
    pub moves: Vec<PartitionMove>,
    /// Partitions still moving (all of them for `AddNode`; those still on
    /// the node for `RemoveNode`).
    pub moving: u64,
    /// `RemoveNode`: the node has left the cluster.
    pub removed: bool,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PartitionMove {
    pub topic: String,
    pub partition: u32,
    pub from: Vec<u64>,
    pub to: Vec<u64>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: u64,
    pub addr: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub request_id: u64,
    pub partition: u32,
    pub base_offset: u64,
    pub rows: u32,
    pub timestamp_ms: i64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Subscribed {
    pub schema_id: u32,
    pub schema_ipc: Vec<u8>,
    /// The offset delivery starts at (resolved from StartAt).
    pub start_offset: u64,
    /// The high watermark when the subscription started.
    pub high_watermark: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchDelivery {
    /// Leading rows of this batch the subscriber must drop (they lie before
    /// its start offset). The batch itself is sent as stored, never re-encoded.
    pub skip_rows: u32,
    /// The high watermark when the batch was sent (lag = hw - batch end).
    pub high_watermark: u64,
}

/// One Raft group as a node sees it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct GroupStatus {
    /// 0: the controller; otherwise a partition group.
    pub group: u64,
    /// Empty for the controller.
    pub topic: String,
    pub partition: u32,
    /// "leader", "follower", "candidate", "learner" or "shutdown".
    pub role: String,
    /// 0 when unknown.
    pub leader: u64,
    pub term: u64,
    pub last_log_index: u64,
    pub committed: u64,
    pub applied: u64,
    /// On the leader: (follower id, matched log index) per follower.
    pub followers: Vec<(u64, u64)>,
}

/// A node's answer to `ClusterStatus`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct NodeStatus {
    pub id: u64,
    pub addr: String,
    /// Every node of the cluster as this node knows it.
    pub nodes: Vec<NodeInfo>,
    pub controller: GroupStatus,
    pub partitions: Vec<GroupStatus>,
}
