//! NATS JetStream through async-nats (the NATS maintainers' Rust client):
//! a file-storage stream per topic, JetStream publish with an ack per
//! message, and a pull consumer without acks reading from the first message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::ServerAddr;
use futures::StreamExt;

use crate::bus::{body_of, AckFut, BoxFut, Bus, Deliveries, PeerDecoder, Publisher, Window};

/// Longest wait for a JetStream API call or a publish ack. Acks behind a
/// full 64 MiB window of 1 MiB messages with fsync each can take seconds
/// on a busy machine; the async-nats default (5 s) would report those as
/// failures.
const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a freshly started cluster may take to elect a JetStream meta
/// leader before stream creation succeeds.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a replicated consumer may take to elect its leader.
const CONSUMER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages and bytes one pull request asks for: arrowbus's subscription
/// credit (256 batches, 8 MiB), enough to keep delivery streaming. A
/// larger pull (64 MiB before) overflows nats-server's per-connection
/// outbound buffer (`max_pending`, 64 MiB) when the subscriber falls
/// behind: the server drops the connection as a slow consumer, and with
/// `AckPolicy::None` the messages of that pull are never redelivered, which
/// the report counted as acknowledged batches lost by NATS.
const PULL_BATCH_MESSAGES: usize = 256;
const PULL_BATCH_BYTES: usize = 8 * 1024 * 1024;

pub struct Nats {
    js: jetstream::Context,
    replicas: usize,
    window: usize,
}

impl Nats {
    pub async fn connect(addrs: &[String], replicas: usize, window: usize) -> anyhow::Result<Self> {
        let servers: Vec<ServerAddr> = addrs
            .iter()
            .map(|a| format!("nats://{a}").parse::<ServerAddr>())
            .collect::<Result<_, _>>()
            .context("parsing NATS server addresses")?;
        let client = async_nats::connect(servers)
            .await
            .context("connecting to nats-server")?;
        let js = jetstream::ContextBuilder::new()
            .timeout(JETSTREAM_TIMEOUT)
            .build(client);
        Ok(Self {
            js,
            replicas,
            window,
        })
    }
}

impl Bus for Nats {
    fn create<'a>(
        &'a self,
        topic: &'a str,
        _schema: &'a SchemaRef,
        _partitions: u32,
    ) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let cfg = stream::Config {
                name: topic.to_owned(),
                subjects: vec![topic.to_owned()],
                storage: stream::StorageType::File,
                num_replicas: self.replicas,
                ..Default::default()
            };
            // A new cluster answers "no JetStream meta leader" until its
            // first election is over.
            let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
            loop {
                match self.js.create_stream(cfg.clone()).await {
                    Ok(_) => return Ok(()),
                    Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => return Err(anyhow!("creating JetStream stream {topic}: {e}")),
                }
            }
        })
    }

    fn delete<'a>(&'a self, topic: &'a str) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            self.js
                .delete_stream(topic)
                .await
                .map_err(|e| anyhow!("deleting JetStream stream {topic}: {e}"))?;
            Ok(())
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        schema: &'a SchemaRef,
    ) -> BoxFut<'a, anyhow::Result<Box<dyn Deliveries>>> {
        Box::pin(async move {
            let stream = self
                .js
                .get_stream(topic)
                .await
                .map_err(|e| anyhow!("opening JetStream stream {topic}: {e}"))?;
            let consumer = stream
                .create_consumer(consumer::pull::Config {
                    ack_policy: consumer::AckPolicy::None,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow!("creating a JetStream consumer on {topic}: {e}"))?;
            if self.replicas > 1 {
                // A replicated consumer is a Raft group of its own: pulls
                // before it has a leader get "no responders", which ended
                // the subscription of two R3 phases (2026-11-22).
                let deadline = Instant::now() + CONSUMER_READY_TIMEOUT;
                loop {
                    let info = consumer.get_info().await;
                    if let Ok(i) = &info {
                        if i.cluster.as_ref().is_some_and(|c| c.leader.is_some()) {
                            break;
                        }
                    }
                    if Instant::now() > deadline {
                        return Err(anyhow!(
                            "the JetStream consumer on {topic} has no leader after {CONSUMER_READY_TIMEOUT:?}: {:?}",
                            info.map(|i| i.cluster)
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let messages = consumer
                .stream()
                .max_messages_per_batch(PULL_BATCH_MESSAGES)
                .max_bytes_per_batch(PULL_BATCH_BYTES)
                .messages()
                .await
                .map_err(|e| anyhow!("pulling from {topic}: {e}"))?;
            Ok(Box::new(NatsDeliveries {
                messages,
                decoder: PeerDecoder::new(schema)?,
            }) as Box<dyn Deliveries>)
        })
    }

    fn publisher<'a>(&'a self, topic: &'a str) -> BoxFut<'a, anyhow::Result<Arc<dyn Publisher>>> {
        Box::pin(async move {
            Ok(Arc::new(NatsPublisher {
                js: self.js.clone(),
                subject: topic.to_owned(),
                window: Window::new(self.window),
            }) as Arc<dyn Publisher>)
        })
    }
}

struct NatsPublisher {
    js: jetstream::Context,
    subject: String,
    window: Window,
}

impl Publisher for NatsPublisher {
    fn send<'a>(&'a self, batch: &'a RecordBatch) -> BoxFut<'a, anyhow::Result<AckFut>> {
        Box::pin(async move {
            let body = body_of(batch)?;
            let permit = self.window.acquire(body.len()).await?;
            let ack = self
                .js
                .publish(self.subject.clone(), body)
                .await
                .map_err(|e| anyhow!("JetStream publish: {e}"))?;
            Ok(Box::pin(async move {
                let r = ack.await;
                drop(permit);
                r.map(|_| ())
                    .map_err(|e| anyhow!("JetStream publish ack: {e}"))
            }) as AckFut)
        })
    }
}

struct NatsDeliveries {
    messages: consumer::pull::Stream,
    decoder: PeerDecoder,
}

impl Deliveries for NatsDeliveries {
    fn next(&mut self) -> BoxFut<'_, Option<anyhow::Result<RecordBatch>>> {
        Box::pin(async move {
            match self.messages.next().await? {
                Ok(m) => Some(self.decoder.decode(m.payload.clone())),
                Err(e) => Some(Err(anyhow!("JetStream consumer: {e}"))),
            }
        })
    }
}
