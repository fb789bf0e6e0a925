//! The arrowbus Rust client: [`Producer`] publishes Arrow `RecordBatch`es,
//! [`Subscriber`] is a `Stream` of delivered batches with their offsets, and
//! [`Admin`] manages topics. One [`Client`] holds one QUIC connection; clone it
//! freely.
//!
//! ```no_run
//! # async fn demo(batch: arrow_array::RecordBatch) -> arrowbus::Result<()> {
//! use futures::StreamExt;
//! let client = arrowbus::Client::connect_default().await?; // profile from `busd dev`
//! let ack = client.producer().publish("ticks", &batch).await?;
//! println!("stored at partition {} offset {}", ack.partition, ack.base_offset);
//! let mut sub = client
//!     .subscribe("ticks", arrowbus::SubscribeOptions::default().from(arrowbus::StartAt::Earliest))
//!     .await?;
//! while let Some(d) = sub.next().await {
//!     let d = d?;
//!     println!("partition {} offset {}: {} rows", d.partition, d.offset, d.batch.num_rows());
//! }
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod admin;
mod config;
mod conn;
mod error;
mod linger;
mod producer;
pub mod schema;
mod subscriber;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;
pub use arrowbus_wire::{
    ClusterMetadata, ErrorCode, Isolation, NodeInfo, PartitionInfo, StartAt, TopicInfo,
};

pub use admin::{Admin, NewTopic};
pub use config::{ClientConfig, Profile};
#[doc(hidden)]
pub use conn::quic_client_config;
pub use error::{Error, Result};
pub use linger::{arrow_memory_bytes, slice_by_memory, LINGER_BYTES_MAX};
pub use producer::{Ack, PendingAck, Producer, ProducerConfig};
pub use subscriber::{Delivery, SubscribeOptions, Subscriber};

use arrowbus_wire::{ClientMessage, ServerMessage};
use conn::Conn;
use schema::TopicSchema;

/// What a client caches about a topic.
#[derive(Debug)]
pub(crate) struct TopicState {
    pub partitions: u32,
    pub schema: Option<Arc<TopicSchema>>,
    /// Leader of each partition as last described (0: unknown).
    pub leaders: Vec<u64>,
}

/// A connection to an arrowbus cluster.
#[derive(Clone)]
pub struct Client {
    pub(crate) conn: Arc<Conn>,
    topics: Arc<Mutex<HashMap<String, Arc<TopicState>>>>,
    /// Partition leaders learned from `NotLeader` hints (newer than
    /// [`TopicState::leaders`]).
    leader_hints: Arc<Mutex<HashMap<(String, u32), u64>>>,
}

/// How long `describe` waits for a replica's view of partitions the first
/// node it asked does not host.
const REPLICA_DESCRIBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Client {
    pub async fn connect(config: ClientConfig) -> Result<Self> {
        Ok(Self {
            conn: Arc::new(Conn::connect(config).await?),
            topics: Arc::default(),
            leader_hints: Arc::default(),
        })
    }

    /// Connect using `ARROWBUS_BROKER` / `ARROWBUS_CA`, else the profile
    /// written by `busd dev`.
    pub async fn connect_default() -> Result<Self> {
        Self::connect(ClientConfig::resolve(None, None)?).await
    }

    pub fn admin(&self) -> Admin {
        Admin {
            client: self.clone(),
        }
    }

    pub fn producer(&self) -> Producer {
        Producer::new(self.clone(), ProducerConfig::default())
    }

    pub fn producer_with(&self, cfg: ProducerConfig) -> Producer {
        Producer::new(self.clone(), cfg)
    }

    /// Close the connection after the broker has received everything sent.
    /// Await outstanding acks first: a close drops what is still unsent.
    pub async fn close(&self) {
        self.conn.close();
    }

    /// A raw bidirectional stream on this connection, for tests that send
    /// hostile bytes to a broker.
    #[doc(hidden)]
    pub async fn open_raw_stream(&self) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        self.conn
            .primary()
            .await?
            .open_bi()
            .await
            .map_err(conn::transport)
    }

    /// Whether the connection is still open (no close reason yet).
    pub fn is_connected(&self) -> bool {
        self.conn.is_connected()
    }

    /// Node ids and addresses of the cluster, as last learned.
    pub async fn nodes(&self) -> Result<std::collections::BTreeMap<u64, String>> {
        self.conn.refresh_nodes().await?;
        Ok(self.conn.known_nodes())
    }

    /// One request to one node (for per-node status such as `busctl cluster`).
    #[doc(hidden)]
    pub async fn request_node(&self, node: u64, msg: &ClientMessage) -> Result<ServerMessage> {
        self.conn.request_to(node, msg).await
    }

    /// A connection to the node leading `topic`/`partition`: the last hint,
    /// else the described leader, else any node (which redirects).
    pub(crate) async fn partition_connection(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(Option<u64>, quinn::Connection)> {
        let hint = self
            .leader_hints
            .lock()
            .ok()
            .and_then(|m| m.get(&(topic.to_owned(), partition)).copied());
        let leader = match hint {
            Some(l) => Some(l),
            None => {
                let st = self.topic_state(topic, None).await?;
                st.leaders
                    .get(partition as usize)
                    .copied()
                    .filter(|l| *l != 0)
            }
        };
        match leader {
            Some(id) => Ok((Some(id), self.conn.connection_to(id).await?)),
            None => Ok((None, self.conn.primary().await?)),
        }
    }

    /// Ask every known node except `except` who leads `topic`/`partition`;
    /// the first answer naming another node wins. For a stalled stream: a
    /// leader killed without a word (kill -9, power loss, partition) sends
    /// nothing, and its connection only dies at the idle timeout, while the
    /// surviving replicas know the new leader within an election timeout.
    pub(crate) async fn leader_elsewhere(
        &self,
        topic: &str,
        partition: u32,
        except: u64,
        timeout: std::time::Duration,
    ) -> Option<u64> {
        let others: Vec<u64> = self
            .conn
            .known_nodes()
            .into_keys()
            .filter(|id| *id != except)
            .collect();
        let asks = others.into_iter().map(|node| {
            let msg = ClientMessage::DescribeTopic {
                topic: topic.to_owned(),
            };
            Box::pin(async move {
                match tokio::time::timeout(timeout, self.conn.request_to(node, &msg)).await {
                    Ok(Ok(ServerMessage::Topic(info))) => info
                        .partitions
                        .get(partition as usize)
                        .map(|p| p.leader)
                        .filter(|l| *l != 0 && *l != except),
                    _ => None,
                }
            })
        });
        let mut asks: Vec<_> = asks.collect();
        while !asks.is_empty() {
            let (found, _, rest) = futures::future::select_all(asks).await;
            if found.is_some() {
                return found;
            }
            asks = rest;
        }
        None
    }

    /// Record what a `NotLeader` said about a partition's leader; without a
    /// hint, forget what we knew so the next attempt asks again.
    pub(crate) fn note_leader(&self, topic: &str, partition: u32, hint: Option<u64>) {
        if let Ok(mut m) = self.leader_hints.lock() {
            match hint {
                Some(l) => {
                    m.insert((topic.to_owned(), partition), l);
                }
                None => {
                    m.remove(&(topic.to_owned(), partition));
                }
            }
        }
        if hint.is_none() {
            self.forget_topic(topic);
        }
    }

    pub(crate) async fn describe(&self, name: &str) -> Result<TopicInfo> {
        match self
            .conn
            .request(&ClientMessage::DescribeTopic { topic: name.into() })
            .await?
        {
            ServerMessage::Topic(mut info) => {
                self.fill_from_replicas(&mut info).await;
                self.remember(&info)?;
                Ok(info)
            }
            other => Err(admin::unexpected(other)),
        }
    }

    /// A node knows the leader and offsets only of the partitions it hosts
    /// (it answers leader 0 for the others), and the in-sync replicas only
    /// of those it leads: ask the leader (or, when unknown, the first
    /// replica) of each other partition, concurrently and briefly, and take
    /// its view. Partitions whose nodes do not answer keep what the first
    /// node said (a producer then tries the replicas in turn).
    async fn fill_from_replicas(&self, info: &mut TopicInfo) {
        let incomplete = |p: &PartitionInfo| p.leader == 0 || p.in_sync.is_empty();
        let mut ask: Vec<u64> = info
            .partitions
            .iter()
            .filter(|p| incomplete(p))
            .filter_map(|p| match p.leader {
                0 => p.replicas.first().copied(),
                l => Some(l),
            })
            .collect();
        ask.sort_unstable();
        ask.dedup();
        if ask.is_empty() {
            return;
        }
        let msg = ClientMessage::DescribeTopic {
            topic: info.name.clone(),
        };
        let answers = futures::future::join_all(ask.iter().map(|node| {
            tokio::time::timeout(REPLICA_DESCRIBE_TIMEOUT, self.conn.request_to(*node, &msg))
        }))
        .await;
        for answer in answers {
            let Ok(Ok(ServerMessage::Topic(theirs))) = answer else {
                continue;
            };
            for p in theirs.partitions {
                let Some(mine) = info
                    .partitions
                    .iter_mut()
                    .find(|m| m.partition == p.partition)
                else {
                    continue;
                };
                // A leader's own view, or any hosting replica's over none.
                let better = (!p.in_sync.is_empty() && mine.in_sync.is_empty())
                    || (p.leader != 0 && mine.leader == 0);
                if better {
                    *mine = p;
                }
            }
        }
    }

    fn remember(&self, info: &TopicInfo) -> Result<Arc<TopicState>> {
        let schema = if info.schema_id != 0 {
            Some(Arc::new(TopicSchema::from_ipc(
                info.schema_id,
                info.schema_ipc.clone(),
            )?))
        } else {
            None
        };
        let state = Arc::new(TopicState {
            partitions: info.partitions.len() as u32,
            schema,
            leaders: info.partitions.iter().map(|p| p.leader).collect(),
        });
        if let Ok(mut m) = self.leader_hints.lock() {
            m.retain(|(t, _), _| t != &info.name);
        }
        if let Ok(mut m) = self.topics.lock() {
            m.insert(info.name.clone(), state.clone());
        }
        Ok(state)
    }

    pub(crate) async fn refresh_topic(&self, name: &str) -> Result<Arc<TopicState>> {
        let info = self.describe(name).await?;
        self.remember(&info)
    }

    /// The topic's partitions and schema; with `first_batch`, a topic without
    /// a schema gets the batch's.
    pub(crate) async fn topic_state(
        &self,
        name: &str,
        first_batch: Option<&RecordBatch>,
    ) -> Result<Arc<TopicState>> {
        let cached = self.topics.lock().ok().and_then(|m| m.get(name).cloned());
        let state = match cached {
            Some(s) => s,
            None => self.refresh_topic(name).await?,
        };
        match (first_batch, &state.schema) {
            (Some(batch), None) => {
                let ipc = schema::encode_schema(&batch.schema())?;
                match self
                    .conn
                    .request(&ClientMessage::SetSchemaIfAbsent {
                        topic: name.into(),
                        schema_ipc: ipc,
                    })
                    .await?
                {
                    ServerMessage::Schema {
                        schema_id,
                        schema_ipc,
                    } => {
                        let s = Arc::new(TopicState {
                            partitions: state.partitions,
                            schema: Some(Arc::new(TopicSchema::from_ipc(schema_id, schema_ipc)?)),
                            leaders: state.leaders.clone(),
                        });
                        if let Ok(mut m) = self.topics.lock() {
                            m.insert(name.to_owned(), s.clone());
                        }
                        Ok(s)
                    }
                    other => Err(admin::unexpected(other)),
                }
            }
            _ => Ok(state),
        }
    }

    pub(crate) fn forget_topic(&self, name: &str) {
        if let Ok(mut m) = self.topics.lock() {
            m.remove(name);
        }
    }
}
