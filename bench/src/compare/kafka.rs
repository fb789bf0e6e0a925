//! Apache Kafka through rdkafka (librdkafka): the fastest maintained Kafka
//! client usable from Rust. Producer `acks=all` with idempotence; the
//! consumer is assigned partition 0 from the beginning (no group, no offset
//! commits: the arrowbus subscriber commits nothing either) and polled on its
//! own thread, the usual librdkafka consumer loop (rdkafka's `StreamConsumer`
//! showed a ~0.5 s tail here that the plain poll loop does not).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::servers::MAX_MESSAGE_BYTES;
use crate::bus::{body_of, AckFut, BoxFut, Bus, Deliveries, PeerDecoder, Publisher, Window};

/// Admin operations (create, delete) may take this long: a new topic on a
/// three-node KRaft cluster needs a metadata round and leader election.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response the consumer accepts (librdkafka requires it above
/// `fetch.max.bytes` + 512).
const RECEIVE_MESSAGE_MAX_BYTES: usize = 100 * 1024 * 1024;
/// How long the broker may hold an empty fetch, and the consumer's back-off
/// after one, in ms: librdkafka's documented low-latency setting.
const FETCH_WAIT_MAX_MS: &str = "10";
/// How long one `poll` of the consumer thread blocks when nothing arrives
/// (a message wakes it at once); bounds how long the thread outlives its
/// subscriber.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// Delivered payloads queued between the poll thread and the subscriber.
const DELIVERY_QUEUE_MESSAGES: usize = 256;
/// Bytes one fetch may return (all partitions).
const FETCH_MAX_BYTES: usize = 64 * 1024 * 1024;

pub struct Kafka {
    bootstrap: String,
    replicas: usize,
    flush_every_message: bool,
    admin: AdminClient<DefaultClientContext>,
    producer: FutureProducer,
    window: Window,
}

impl Kafka {
    pub fn connect(
        addrs: &[String],
        replicas: usize,
        flush_every_message: bool,
        window: usize,
    ) -> anyhow::Result<Self> {
        let bootstrap = addrs.join(",");
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .context("creating a Kafka admin client")?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // Send as soon as possible: batching still happens while the
            // 5 requests idempotence allows are in flight.
            .set("linger.ms", "0")
            .set("compression.type", "none")
            .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string())
            // Room for the window (librdkafka's own queue must never be the
            // limit: the bench's window is).
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .create()
            .context("creating a Kafka producer")?;
        Ok(Self {
            bootstrap,
            replicas,
            flush_every_message,
            admin,
            producer,
            window: Window::new(window),
        })
    }
}

impl Bus for Kafka {
    fn create<'a>(
        &'a self,
        topic: &'a str,
        _schema: &'a SchemaRef,
        partitions: u32,
    ) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let parts = i32::try_from(partitions).context("partition count")?;
            let rf = i32::try_from(self.replicas).context("replication factor")?;
            let max = MAX_MESSAGE_BYTES.to_string();
            let mut t = NewTopic::new(topic, parts, TopicReplication::Fixed(rf));
            if self.flush_every_message {
                // fsync after every append (the topic-level name of
                // log.flush.interval.messages).
                t = t.set("flush.messages", "1");
            }
            t = t.set("max.message.bytes", &max);
            let res = self
                .admin
                .create_topics(
                    [&t],
                    &AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)),
                )
                .await
                .context("creating a Kafka topic")?;
            for r in res {
                if let Err((name, code)) = r {
                    bail!("creating Kafka topic {name}: {code}");
                }
            }
            Ok(())
        })
    }

    fn delete<'a>(&'a self, topic: &'a str) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let res = self
                .admin
                .delete_topics(
                    &[topic],
                    &AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)),
                )
                .await
                .context("deleting a Kafka topic")?;
            for r in res {
                if let Err((name, code)) = r {
                    bail!("deleting Kafka topic {name}: {code}");
                }
            }
            Ok(())
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        schema: &'a SchemaRef,
    ) -> BoxFut<'a, anyhow::Result<Box<dyn Deliveries>>> {
        Box::pin(async move {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &self.bootstrap)
                // Required by librdkafka even without group membership.
                .set("group.id", format!("{topic}-reader"))
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("fetch.min.bytes", "1")
                // librdkafka's advice for low end-to-end latency: bound how
                // long the broker holds a fetch (default 500 ms), and the
                // back-off after a fetch that came back empty (default 500 ms).
                .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS)
                .set("fetch.error.backoff.ms", FETCH_WAIT_MAX_MS)
                .set("max.partition.fetch.bytes", MAX_MESSAGE_BYTES.to_string())
                .set("fetch.max.bytes", FETCH_MAX_BYTES.to_string())
                .set(
                    "receive.message.max.bytes",
                    RECEIVE_MESSAGE_MAX_BYTES.to_string(),
                )
                .create()
                .context("creating a Kafka consumer")?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, 0, Offset::Beginning)
                .context("building the assignment")?;
            consumer.assign(&tpl).context("assigning partition 0")?;
            let (tx, rx) = mpsc::channel(DELIVERY_QUEUE_MESSAGES);
            // The classic librdkafka consumer loop on its own thread:
            // `poll` returns as soon as a message is there.
            let poller = std::thread::Builder::new()
                .name("busbench-kafka-poll".into())
                .spawn(move || poll_loop(consumer, tx))
                .context("starting the Kafka poll thread")?;
            let mut d = KafkaDeliveries {
                rx,
                decoder: PeerDecoder::new(schema)?,
                _poller: poller,
            };
            // librdkafka starts fetching an assigned partition of a new
            // topic only after metadata and offset round trips; a phase
            // started before that would charge Kafka for its setup. So a
            // marker (an empty message) is produced and awaited here; the
            // deliveries skip it.
            let marker: FutureRecord<'_, (), [u8]> =
                FutureRecord::to(topic).partition(0).payload(&[]);
            self.producer
                .send_result(marker)
                .map_err(|(e, _)| anyhow!("enqueueing the Kafka start marker: {e}"))?
                .await
                .map_err(|_| anyhow!("the Kafka start marker's delivery report was dropped"))?
                .map_err(|(e, _)| anyhow!("producing the Kafka start marker: {e}"))?;
            match tokio::time::timeout(ADMIN_TIMEOUT, d.rx.recv()).await {
                Ok(Some(Ok(None))) => {}
                Ok(Some(Ok(Some(_)))) => {
                    bail!("the first message of a new Kafka topic is not the start marker")
                }
                Ok(Some(Err(e))) => return Err(e.context("waiting for the Kafka start marker")),
                Ok(None) => bail!("the Kafka poll thread stopped"),
                Err(_) => bail!("the Kafka consumer saw nothing within {ADMIN_TIMEOUT:?}"),
            }
            Ok(Box::new(d) as Box<dyn Deliveries>)
        })
    }

    fn publisher<'a>(&'a self, topic: &'a str) -> BoxFut<'a, anyhow::Result<Arc<dyn Publisher>>> {
        Box::pin(async move {
            Ok(Arc::new(KafkaPublisher {
                producer: self.producer.clone(),
                topic: topic.to_owned(),
                window: self.window.clone(),
            }) as Arc<dyn Publisher>)
        })
    }
}

struct KafkaPublisher {
    producer: FutureProducer,
    topic: String,
    window: Window,
}

impl Publisher for KafkaPublisher {
    fn send<'a>(&'a self, batch: &'a RecordBatch) -> BoxFut<'a, anyhow::Result<AckFut>> {
        Box::pin(async move {
            let body = body_of(batch)?;
            let permit = self.window.acquire(body.len()).await?;
            // librdkafka copies the payload into its queue.
            let record: FutureRecord<'_, (), [u8]> = FutureRecord::to(&self.topic)
                .partition(0)
                .payload(&body[..]);
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(e, _)| anyhow!("enqueueing a Kafka message: {e}"))?;
            Ok(Box::pin(async move {
                let r = delivery.await;
                drop(permit);
                match r {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(anyhow!("Kafka delivery failed: {e}")),
                    Err(_) => Err(anyhow!("Kafka producer dropped the delivery report")),
                }
            }) as AckFut)
        })
    }
}

/// A payload (`None`: the empty start marker) or a consumer error.
type Polled = anyhow::Result<Option<Bytes>>;

fn poll_loop(consumer: BaseConsumer, tx: mpsc::Sender<Polled>) {
    while !tx.is_closed() {
        let item = match consumer.poll(POLL_TIMEOUT) {
            None => continue,
            Some(Ok(m)) => Ok(m
                .payload()
                .filter(|p| !p.is_empty())
                .map(Bytes::copy_from_slice)),
            Some(Err(e)) => Err(anyhow!("Kafka consumer: {e}")),
        };
        if tx.blocking_send(item).is_err() {
            break;
        }
    }
}

struct KafkaDeliveries {
    rx: mpsc::Receiver<Polled>,
    decoder: PeerDecoder,
    /// Ends by itself once `rx` is dropped (within one poll timeout).
    _poller: std::thread::JoinHandle<()>,
}

impl Deliveries for KafkaDeliveries {
    fn next(&mut self) -> BoxFut<'_, Option<anyhow::Result<RecordBatch>>> {
        Box::pin(async move {
            loop {
                match self.rx.recv().await? {
                    Ok(Some(body)) => return Some(self.decoder.decode(body)),
                    Ok(None) => continue, // the start marker
                    Err(e) => return Some(Err(e)),
                }
            }
        })
    }
}
