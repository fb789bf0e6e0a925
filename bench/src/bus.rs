//! What a measured phase needs from a message bus, so the same pacer, ack
//! collector, subscriber and latency accounting (`run`) drive arrowbus and
//! its peers (`compare`): create a fresh topic, publish a tick batch and get
//! a future for its durable ack, and receive delivered batches back.
//!
//! Every bus sends the Arrow IPC body of the batch ([`encode_body`]: its
//! dictionary messages and the record batch message, no schema) and every
//! subscriber decodes it back into a `RecordBatch` before the phase reads
//! the batch's sequence number and intended send time: identical bytes and
//! identical client work on every system.
//!
//! Peers that have no window of their own get one from [`Window`] (`peer`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use arrowbus::{Client, NewTopic, StartAt, SubscribeOptions};
use futures::StreamExt;

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// Resolves once the bus reports the batch stored (with its durability setting).
pub type AckFut = BoxFut<'static, anyhow::Result<()>>;

/// A message bus under test.
pub trait Bus: Send + Sync {
    /// A fresh topic (stream, key) holding batches of `schema`, one partition
    /// (or `partitions` where the bus has them).
    fn create<'a>(
        &'a self,
        topic: &'a str,
        schema: &'a SchemaRef,
        partitions: u32,
    ) -> BoxFut<'a, anyhow::Result<()>>;
    /// Remove the topic and its data.
    fn delete<'a>(&'a self, topic: &'a str) -> BoxFut<'a, anyhow::Result<()>>;
    /// A subscriber from the topic's first batch.
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        schema: &'a SchemaRef,
    ) -> BoxFut<'a, anyhow::Result<Box<dyn Deliveries>>>;
    /// A publisher to the topic. Dropping it may abandon pending acks, so the
    /// phase keeps it until every ack is in.
    fn publisher<'a>(&'a self, topic: &'a str) -> BoxFut<'a, anyhow::Result<Arc<dyn Publisher>>>;
}

pub trait Publisher: Send + Sync {
    /// Put a batch in flight. Resolves when the bus accepted it (waiting
    /// while its window is full: backpressure), to a future of its ack.
    fn send<'a>(&'a self, batch: &'a RecordBatch) -> BoxFut<'a, anyhow::Result<AckFut>>;
}

pub trait Deliveries: Send {
    /// The next delivered batch; `None` when the subscription ended.
    fn next(&mut self) -> BoxFut<'_, Option<anyhow::Result<RecordBatch>>>;
}

// Used by the peer drivers, which only the `compare` feature compiles; its
// unit tests exercise them in every build.
#[cfg_attr(not(feature = "compare"), allow(unused_imports))]
pub use peer::{body_of, PeerDecoder, Window, WINDOW_BYTES};
#[cfg_attr(not(feature = "compare"), allow(dead_code))]
mod peer;

/// arrowbus through its Rust client: the producer's own window (5 batches
/// and 64 MiB in flight per partition), acks after fdatasync.
pub struct Arrowbus {
    pub client: Client,
    /// Replication factor of the topics it creates.
    pub replication_factor: u16,
    /// The producer's linger (`ProducerConfig::linger`); `None`: every
    /// send is stored as its own batch.
    pub linger: Option<std::time::Duration>,
}

impl Bus for Arrowbus {
    fn create<'a>(
        &'a self,
        topic: &'a str,
        schema: &'a SchemaRef,
        partitions: u32,
    ) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let mut t = NewTopic::new(topic)
                .partitions(partitions)
                .schema(schema.as_ref().clone());
            if self.replication_factor > 1 {
                t = t.replication_factor(self.replication_factor);
            }
            self.client
                .admin()
                .create_topic(t)
                .await
                .with_context(|| format!("creating topic {topic}"))?;
            if self.replication_factor > 1 {
                self.await_leaders(topic).await?;
            }
            Ok(())
        })
    }

    fn delete<'a>(&'a self, topic: &'a str) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            self.client
                .admin()
                .delete_topic(topic)
                .await
                .with_context(|| format!("deleting topic {topic}"))
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        _schema: &'a SchemaRef,
    ) -> BoxFut<'a, anyhow::Result<Box<dyn Deliveries>>> {
        Box::pin(async move {
            let sub = self
                .client
                .subscribe(topic, SubscribeOptions::default().from(StartAt::Earliest))
                .await
                .with_context(|| format!("subscribing to {topic}"))?;
            Ok(Box::new(ArrowbusDeliveries(sub)) as Box<dyn Deliveries>)
        })
    }

    fn publisher<'a>(&'a self, topic: &'a str) -> BoxFut<'a, anyhow::Result<Arc<dyn Publisher>>> {
        Box::pin(async move {
            Ok(Arc::new(ArrowbusPublisher {
                producer: self.client.producer_with(arrowbus::ProducerConfig {
                    linger: self.linger,
                    ..arrowbus::ProducerConfig::default()
                }),
                topic: topic.to_owned(),
            }) as Arc<dyn Publisher>)
        })
    }
}

/// How long a new replicated partition may take to elect its leader.
const LEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Arrowbus {
    /// Wait until every partition of a new replicated topic has a leader
    /// that all its replicas agree on and that has committed an entry of
    /// its term, and until the client's metadata names it. A new partition
    /// is a new Raft group whose election takes 250–500 ms after creation;
    /// the topic's metadata can name a leader before the group has one.
    /// Publishing earlier would charge the election to the first batches
    /// of every phase, and their NotLeader retries can land after batches
    /// sent later.
    async fn await_leaders(&self, topic: &str) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + LEADER_TIMEOUT;
        let admin = self.client.admin();
        loop {
            let mut state = String::new();
            // Describing also refreshes the leaders the producer uses.
            if let Ok(info) = admin.describe_topic(topic).await {
                let mut ready = true;
                for p in &info.partitions {
                    let mut views = Vec::new();
                    for &node in &p.replicas {
                        let g = admin.node_status(node).await.ok().and_then(|s| {
                            s.partitions
                                .into_iter()
                                .find(|g| g.topic == topic && g.partition == p.partition)
                        });
                        views.push(
                            g.map(|g| (node, g.role, g.leader, g.committed, g.last_log_index)),
                        );
                    }
                    let agreed = views.iter().all(|v| {
                        v.as_ref()
                            .is_some_and(|(_, _, leader, _, _)| *leader != 0 && *leader == p.leader)
                    });
                    let established =
                        views
                            .iter()
                            .flatten()
                            .any(|(node, role, _, committed, last)| {
                                *node == p.leader
                                    && role == "leader"
                                    && committed >= last
                                    && *last > 0
                            });
                    if !(agreed && established) {
                        ready = false;
                        state = format!("partition {}: metadata leader {}, replicas (node, role, leader, committed, last) {views:?}", p.partition, p.leader);
                        break;
                    }
                }
                if ready {
                    return Ok(());
                }
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "topic {topic}: no established leader within {LEADER_TIMEOUT:?}: {state}"
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

struct ArrowbusPublisher {
    producer: arrowbus::Producer,
    topic: String,
}

impl Publisher for ArrowbusPublisher {
    fn send<'a>(&'a self, batch: &'a RecordBatch) -> BoxFut<'a, anyhow::Result<AckFut>> {
        Box::pin(async move {
            // Round-robin over the topic's partitions, as `run` always did.
            let ack = self.producer.send(&self.topic, None, batch).await?;
            Ok(Box::pin(async move {
                ack.await?;
                Ok(())
            }) as AckFut)
        })
    }
}

struct ArrowbusDeliveries(arrowbus::Subscriber);

impl Deliveries for ArrowbusDeliveries {
    fn next(&mut self) -> BoxFut<'_, Option<anyhow::Result<RecordBatch>>> {
        Box::pin(async move {
            self.0
                .next()
                .await
                .map(|d| d.map(|d| d.batch).map_err(anyhow::Error::from))
        })
    }
}
