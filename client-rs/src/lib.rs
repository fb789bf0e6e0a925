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
pub use error::{Error, Result};
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
}

/// A connection to an arrowbus cluster.
#[derive(Clone)]
pub struct Client {
    pub(crate) conn: Arc<Conn>,
    topics: Arc<Mutex<HashMap<String, Arc<TopicState>>>>,
}

impl Client {
    pub async fn connect(config: ClientConfig) -> Result<Self> {
        Ok(Self {
            conn: Arc::new(Conn::connect(config).await?),
            topics: Arc::default(),
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
        self.conn.connection.close(0u32.into(), b"client closed");
    }

    /// A raw bidirectional stream on this connection, for tests that send
    /// hostile bytes to a broker.
    #[doc(hidden)]
    pub async fn open_raw_stream(&self) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        self.conn
            .connection
            .open_bi()
            .await
            .map_err(conn::transport)
    }

    /// Whether the connection is still open (no close reason yet).
    pub fn is_connected(&self) -> bool {
        self.conn.connection.close_reason().is_none()
    }

    pub(crate) async fn describe(&self, name: &str) -> Result<TopicInfo> {
        match self
            .conn
            .request(&ClientMessage::DescribeTopic { topic: name.into() })
            .await?
        {
            ServerMessage::Topic(info) => {
                self.remember(&info)?;
                Ok(info)
            }
            other => Err(admin::unexpected(other)),
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
        });
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
