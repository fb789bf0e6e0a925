//! Topic administration.

use arrow_schema::Schema;
use arrowbus_wire::{ClientMessage, ClusterMetadata, CreateTopic, ServerMessage, TopicInfo};

use crate::error::{Error, Result};
use crate::schema::encode_schema;
use crate::Client;

/// What to create. Defaults: 1 partition, replication factor 1, the
/// broker's default retention, schema fixed by the first publish.
#[derive(Debug, Clone)]
pub struct NewTopic {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u16,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub schema: Option<Schema>,
}

impl NewTopic {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            partitions: 1,
            replication_factor: 1,
            retention_ms: None,
            retention_bytes: None,
            schema: None,
        }
    }
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = n;
        self
    }
    pub fn replication_factor(mut self, n: u16) -> Self {
        self.replication_factor = n;
        self
    }
    pub fn retention_ms(mut self, ms: u64) -> Self {
        self.retention_ms = Some(ms);
        self
    }
    pub fn retention_bytes(mut self, bytes: u64) -> Self {
        self.retention_bytes = Some(bytes);
        self
    }
    pub fn schema(mut self, schema: Schema) -> Self {
        self.schema = Some(schema);
        self
    }
}

#[derive(Clone)]
pub struct Admin {
    pub(crate) client: Client,
}

impl Admin {
    pub async fn create_topic(&self, t: NewTopic) -> Result<TopicInfo> {
        let schema_ipc = match &t.schema {
            Some(s) => Some(encode_schema(s)?),
            None => None,
        };
        let msg = ClientMessage::CreateTopic(CreateTopic {
            name: t.name,
            partitions: t.partitions,
            replication_factor: t.replication_factor,
            retention_ms: t.retention_ms,
            retention_bytes: t.retention_bytes,
            schema_ipc,
        });
        match self.client.conn.request(&msg).await? {
            ServerMessage::Topic(info) => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        match self
            .client
            .conn
            .request(&ClientMessage::DeleteTopic { topic: name.into() })
            .await?
        {
            ServerMessage::TopicDeleted { .. } => {
                self.client.forget_topic(name);
                Ok(())
            }
            other => Err(unexpected(other)),
        }
    }

    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        match self.client.conn.request(&ClientMessage::ListTopics).await? {
            ServerMessage::Topics(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        self.client.describe(name).await
    }

    /// Node `id`'s view of its Raft groups (roles, terms, commit and
    /// applied indexes, follower progress).
    pub async fn node_status(&self, id: u64) -> Result<arrowbus_wire::NodeStatus> {
        match self
            .client
            .conn
            .request_to(id, &ClientMessage::ClusterStatus)
            .await?
        {
            ServerMessage::Cluster(s) => Ok(s),
            ServerMessage::Error(e) => Err(crate::Error::from_reply(&e)),
            other => Err(unexpected(other)),
        }
    }

    /// Add node `id`, already running at `addr` with `cluster.join = true`,
    /// to the cluster. Returns once it is a controller voter; the partition
    /// moves it starts (in the answer) continue in the background.
    pub async fn add_node(&self, id: u64, addr: &str) -> Result<arrowbus_wire::NodeChange> {
        let msg = ClientMessage::AddNode {
            id,
            addr: addr.to_owned(),
        };
        match self.client.conn.request(&msg).await? {
            ServerMessage::NodeChange(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// Move every replica off node `id` and remove it from the cluster.
    /// One call waits a few seconds; `removed: false` in the answer means
    /// replicas are still moving (call again to keep waiting; it is
    /// idempotent). [`Admin::remove_node_wait`] loops for you.
    pub async fn remove_node(&self, id: u64) -> Result<arrowbus_wire::NodeChange> {
        match self
            .client
            .conn
            .request(&ClientMessage::RemoveNode { id })
            .await?
        {
            ServerMessage::NodeChange(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// [`Admin::remove_node`] until the node has left, or `timeout`; the
    /// moves the first call started, and the last answer.
    pub async fn remove_node_wait(
        &self,
        id: u64,
        timeout: std::time::Duration,
        mut progress: impl FnMut(&arrowbus_wire::NodeChange),
    ) -> Result<arrowbus_wire::NodeChange> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut moves = None;
        loop {
            let mut change = self.remove_node(id).await?;
            let started = moves.get_or_insert_with(|| change.moves.clone());
            change.moves = started.clone();
            progress(&change);
            if change.removed || tokio::time::Instant::now() >= deadline {
                return Ok(change);
            }
        }
    }

    pub async fn metadata(&self) -> Result<ClusterMetadata> {
        match self.client.conn.request(&ClientMessage::Metadata).await? {
            ServerMessage::Metadata(m) => Ok(m),
            other => Err(unexpected(other)),
        }
    }
}

pub(crate) fn unexpected(m: ServerMessage) -> Error {
    let name = match m {
        ServerMessage::Error(_) => "Error",
        ServerMessage::Topic(_) => "Topic",
        ServerMessage::Topics(_) => "Topics",
        ServerMessage::TopicDeleted { .. } => "TopicDeleted",
        ServerMessage::Metadata(_) => "Metadata",
        ServerMessage::Cluster(_) => "Cluster",
        ServerMessage::NodeChange(_) => "NodeChange",
        ServerMessage::Schema { .. } => "Schema",
        ServerMessage::Ack(_) => "Ack",
        ServerMessage::Subscribed(_) => "Subscribed",
        ServerMessage::Batch(_) => "Batch",
    };
    Error::Protocol(format!("unexpected {name} reply"))
}
