//! Publishing. One long-lived QUIC stream per (topic, partition) carries a
//! pipeline of publishes; acks come back in order on the same stream. The
//! window (batches and bytes in flight) is a pair of semaphores: when it is
//! full, `send` waits. That is backpressure, not an error.
//!
//! Leader changes: each pipeline goes to the node that leads its partition.
//! A publish that fails because the leader moved (`NotLeader`), stopped
//! (`ShuttingDown`) or vanished (connection lost) is sent again to the new
//! leader until [`ProducerConfig::delivery_timeout`] runs out. Until
//! idempotent producers exist this is at-least-once: a batch whose first
//! attempt was stored but not acknowledged is stored twice, and retried
//! batches of one partition may land after batches sent later. Every ack
//! still says exactly where its batch is.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arrow_array::RecordBatch;
use arrowbus_wire::limits::{
    MAX_BATCH_BYTES, MAX_INFLIGHT_BATCHES_PER_PRODUCER, MAX_INFLIGHT_BYTES_PER_PRODUCER,
};
use arrowbus_wire::{
    BatchHeader, ClientMessage, ErrorCode, Publish, ServerMessage, BATCH_HEADER_BYTES,
};
use bytes::Bytes;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::conn::{read_frame, transport, write_frame_chunks};
use crate::error::{Error, Result};
use crate::linger::{slice_by_memory, Linger, LingerOptions, LINGER_BYTES_MAX};
use crate::schema::{conform, encode_body};
use crate::Client;

/// The broker's answer to a publish: where the rows went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub partition: u32,
    /// Offset of the batch's first row.
    pub base_offset: u64,
    pub rows: u32,
    /// Append time assigned by the broker, ms since the Unix epoch.
    pub timestamp_ms: i64,
}

#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Batches in flight per partition (1 to the protocol's 5).
    pub max_inflight_batches: usize,
    /// Bytes in flight per partition.
    pub max_inflight_bytes: u64,
    /// How long a publish keeps being retried across leader changes before
    /// its error is returned.
    pub delivery_timeout: Duration,
    /// Coalesce small batches sent to the same partition into one stored
    /// batch, like Kafka's `linger.ms` (see the `linger` module): `None`
    /// (the default) sends every batch as it is; `Some(d)` waits up to `d`
    /// for more; `Some(Duration::ZERO)` waits for nothing and coalesces
    /// only the batches that queued up while the partition's window was
    /// full, which costs no latency at low rates. Each ack still names the
    /// caller's own rows. With linger on, an error of the batch itself
    /// (too large, schema mismatch) arrives with its ack, not from `send`.
    pub linger: Option<Duration>,
    /// Largest coalesced batch, in bytes of Arrow memory (up to 8 MiB).
    pub linger_bytes: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            max_inflight_batches: MAX_INFLIGHT_BATCHES_PER_PRODUCER,
            max_inflight_bytes: MAX_INFLIGHT_BYTES_PER_PRODUCER,
            delivery_timeout: Duration::from_secs(30),
            linger: None,
            linger_bytes: 1024 * 1024,
        }
    }
}

/// First and largest pause between attempts of a retried publish.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(25);
const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// A pipeline whose oldest publish has waited this long asks the other
/// nodes whether its partition has a new leader. Only a different answer
/// acts, so a slow but healthy leader costs a few small requests, nothing
/// more.
const STALL_PROBE_AFTER: Duration = Duration::from_millis(300);
/// How often a stalled pipeline asks again, and how long one ask may take.
const STALL_PROBE_EVERY: Duration = Duration::from_millis(100);
const STALL_PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// Whether a failed attempt may succeed at another (or the same, later)
/// leader, and the leader hint it carries.
fn retry_hint(e: &Error) -> Option<Option<u64>> {
    match e {
        Error::Broker {
            code, leader_hint, ..
        } if *code == ErrorCode::NotLeader.as_u16() => Some(*leader_hint),
        Error::Broker { code, .. } if *code == ErrorCode::ShuttingDown.as_u16() => Some(None),
        Error::Transport(_) | Error::Connect { .. } => Some(None),
        _ => None,
    }
}

/// Open producer streams by (topic, partition).
type Pipelines = Arc<tokio::sync::Mutex<HashMap<(String, u32), Arc<Pipeline>>>>;

#[derive(Clone)]
pub struct Producer {
    client: Client,
    cfg: ProducerConfig,
    pipelines: Pipelines,
    round_robin: Arc<AtomicU32>,
    /// The partitions' coalescing queues when linger is on. Their tasks
    /// send on a clone of this producer without it.
    linger: Option<Arc<Linger>>,
}

/// An in-flight publish; resolves to its [`Ack`] once the batch is durable
/// (on a quorum of its partition's replicas). It keeps its producer stream
/// open, so dropping the [`Producer`] does not lose the answers of publishes
/// already in flight; awaiting it also drives retries after leader changes.
pub struct PendingAck {
    fut: Pin<Box<dyn Future<Output = Result<Ack>> + Send>>,
}

impl PendingAck {
    pub(crate) fn new(fut: impl Future<Output = Result<Ack>> + Send + 'static) -> Self {
        Self { fut: Box::pin(fut) }
    }
}

impl Future for PendingAck {
    type Output = Result<Ack>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.fut.as_mut().poll(cx)
    }
}

/// One attempt: the answer of one pipeline.
struct Attempt {
    rx: oneshot::Receiver<Result<Ack>>,
    pipeline: Arc<Pipeline>,
}

impl Attempt {
    /// The answer, and the leader the pipeline's watchdog found when it
    /// ended the pipeline (so the retry goes straight there).
    async fn outcome(self) -> (Result<Ack>, Option<u64>) {
        let result = self.rx.await.unwrap_or_else(|_| {
            Err(Error::Transport(
                "publish outcome unknown: the producer stream ended".into(),
            ))
        });
        let moved_to = match self.pipeline.moved_to.load(Ordering::SeqCst) {
            0 => None,
            leader => Some(leader),
        };
        (result, moved_to)
    }
}

impl Producer {
    pub(crate) fn new(client: Client, cfg: ProducerConfig) -> Self {
        let cfg = ProducerConfig {
            max_inflight_batches: cfg
                .max_inflight_batches
                .clamp(1, MAX_INFLIGHT_BATCHES_PER_PRODUCER),
            max_inflight_bytes: cfg
                .max_inflight_bytes
                .clamp(u64::from(MAX_BATCH_BYTES), MAX_INFLIGHT_BYTES_PER_PRODUCER),
            delivery_timeout: cfg.delivery_timeout,
            linger: cfg.linger,
            linger_bytes: cfg.linger_bytes.clamp(1, LINGER_BYTES_MAX),
        };
        let direct = Self {
            client,
            cfg,
            pipelines: Arc::default(),
            round_robin: Arc::default(),
            linger: None,
        };
        match direct.cfg.linger {
            None => direct,
            Some(linger) => {
                let opts = LingerOptions {
                    linger,
                    bytes: direct.cfg.linger_bytes,
                };
                Self {
                    linger: Some(Arc::new(Linger::new(direct.clone(), opts))),
                    ..direct
                }
            }
        }
    }

    /// Send what linger holds now and wait until everything sent before is
    /// acknowledged or has failed (the outcome reaches each pending ack).
    /// Without linger there is nothing to send: it returns at once.
    pub async fn flush(&self) {
        if let Some(l) = &self.linger {
            l.flush().await;
        }
    }

    /// Publish one batch (partition chosen round-robin) and wait until it is
    /// durable. For throughput, use [`Producer::send`] and await the acks later.
    pub async fn publish(&self, topic: &str, batch: &RecordBatch) -> Result<Ack> {
        self.send(topic, None, batch).await?.await
    }

    /// Publish one batch to a given partition and wait for its ack.
    pub async fn publish_to(
        &self,
        topic: &str,
        partition: u32,
        batch: &RecordBatch,
    ) -> Result<Ack> {
        self.send(topic, Some(partition), batch).await?.await
    }

    /// Put a batch in flight. Waits only while the partition's window is
    /// full (with linger: while its queue is full); the returned
    /// [`PendingAck`] resolves when it is durable.
    pub async fn send(
        &self,
        topic: &str,
        partition: Option<u32>,
        batch: &RecordBatch,
    ) -> Result<PendingAck> {
        let state = self.client.topic_state(topic, Some(batch)).await?;
        let schema = state.schema.as_ref().ok_or_else(|| {
            Error::Protocol(format!("topic '{topic}' has no schema after setting it"))
        })?;
        let partition = match partition {
            Some(p) if p < state.partitions => p,
            Some(p) => {
                return Err(Error::Broker {
                    code: ErrorCode::PartitionNotFound.as_u16(),
                    name: ErrorCode::PartitionNotFound.name(),
                    message: format!(
                        "topic '{topic}' has partitions 0..{}; partition {p} does not exist",
                        state.partitions
                    ),
                    leader_hint: None,
                })
            }
            None => self.round_robin.fetch_add(1, Ordering::Relaxed) % state.partitions.max(1),
        };
        if let Some(l) = &self.linger {
            return l.send(topic, partition, batch.clone()).await;
        }
        let batch = conform(batch, &schema.schema)?;
        let body = encode_body(&batch)?;
        let rows = u32::try_from(batch.num_rows()).map_err(|_| {
            Error::BatchTooLarge(format!(
                "{} rows exceed the 2^32 rows of one batch",
                batch.num_rows()
            ))
        })?;
        let record_len = BATCH_HEADER_BYTES + body.len();
        if record_len > MAX_BATCH_BYTES as usize {
            return Err(Error::BatchTooLarge(format!(
                "batch of {rows} rows encodes to {record_len} bytes, over the limit of {MAX_BATCH_BYTES}; split it (Producer::send_split does)"
            )));
        }
        self.send_body(topic, partition, schema.id, rows, body)
            .await
    }

    /// Like [`Producer::send`], but a batch over the size limit is split by
    /// rows into pieces under it. Returns one pending ack per piece.
    pub async fn send_split(
        &self,
        topic: &str,
        partition: Option<u32>,
        batch: &RecordBatch,
    ) -> Result<Vec<PendingAck>> {
        let mut out = Vec::new();
        if self.linger.is_some() {
            // With linger a too-large batch is only reported with its ack,
            // too late to split it: slice by Arrow memory up front, to half
            // the limit (IPC padding and dictionaries come on top).
            for piece in slice_by_memory(batch, MAX_BATCH_BYTES as usize / 2) {
                out.push(self.send(topic, partition, &piece).await?);
            }
            return Ok(out);
        }
        let mut work = vec![batch.clone()];
        while let Some(b) = work.pop() {
            match self.send(topic, partition, &b).await {
                Ok(p) => out.push(p),
                Err(Error::BatchTooLarge(_)) if b.num_rows() > 1 => {
                    let half = b.num_rows() / 2;
                    // Pushed in reverse so the first half is sent first.
                    work.push(b.slice(half, b.num_rows() - half));
                    work.push(b.slice(0, half));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Publish an Arrow IPC body exactly as given (dictionary messages and
    /// one record batch message, no schema), claiming `rows` rows and schema
    /// `schema_id`. Nothing is checked on this side: for tests and tools that
    /// exercise the broker's validation of untrusted bodies.
    #[doc(hidden)]
    pub async fn send_raw(
        &self,
        topic: &str,
        partition: u32,
        schema_id: u32,
        rows: u32,
        body: Bytes,
    ) -> Result<PendingAck> {
        self.send_body(topic, partition, schema_id, rows, body)
            .await
    }

    /// Put an encoded body in flight behind its batch header.
    async fn send_body(
        &self,
        topic: &str,
        partition: u32,
        schema_id: u32,
        rows: u32,
        body: Bytes,
    ) -> Result<PendingAck> {
        let header = BatchHeader::for_body(&body, rows, schema_id)
            .map_err(|e| Error::BatchTooLarge(e.to_string()))?;
        let header = Bytes::copy_from_slice(&header.encode());
        let deadline = tokio::time::Instant::now() + self.cfg.delivery_timeout;
        let mut backoff = RETRY_BACKOFF_MIN;
        // The first attempt is made now (this is where the window applies
        // backpressure); later ones when the ack is awaited.
        let first = self
            .attempt_until_sent(topic, partition, &header, &body, deadline, &mut backoff)
            .await?;
        let producer = self.clone();
        let topic = topic.to_owned();
        let fut = async move {
            let mut attempt = first;
            let mut backoff = RETRY_BACKOFF_MIN;
            loop {
                let (err, moved_to) = match attempt.outcome().await {
                    (Ok(ack), _) => return Ok(ack),
                    (Err(e), moved_to) => (e, moved_to),
                };
                let Some(hint) = retry_hint(&err) else {
                    return Err(err);
                };
                let hint = hint.or(moved_to);
                tracing::debug!(topic, partition, ?hint, error = %err, "publish retried");
                // Learn the hint even when out of time: the next publish
                // then goes to the leader.
                producer.leader_moved(&topic, partition, hint).await;
                if tokio::time::Instant::now() + backoff >= deadline {
                    return Err(err);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                attempt = producer
                    .attempt_until_sent(&topic, partition, &header, &body, deadline, &mut backoff)
                    .await?;
            }
        };
        Ok(PendingAck { fut: Box::pin(fut) })
    }

    /// Put the batch on a pipeline, moving to the leader a retryable
    /// refusal names (or asking again when it names none) until `deadline`.
    async fn attempt_until_sent(
        &self,
        topic: &str,
        partition: u32,
        header: &Bytes,
        body: &Bytes,
        deadline: tokio::time::Instant,
        backoff: &mut Duration,
    ) -> Result<Attempt> {
        loop {
            let e = match self.attempt(topic, partition, header, body).await {
                Ok(a) => return Ok(a),
                Err(e) => e,
            };
            let Some(hint) = retry_hint(&e) else {
                return Err(e);
            };
            // The hint is recorded even when there is no time left to retry:
            // the caller's next publish goes to the leader (with
            // delivery_timeout 0 it would otherwise never learn).
            self.leader_moved(topic, partition, hint).await;
            if tokio::time::Instant::now() + *backoff >= deadline {
                return Err(e);
            }
            tokio::time::sleep(*backoff).await;
            *backoff = (*backoff * 2).min(RETRY_BACKOFF_MAX);
        }
    }

    async fn attempt(
        &self,
        topic: &str,
        partition: u32,
        header: &Bytes,
        body: &Bytes,
    ) -> Result<Attempt> {
        let pipeline = self.pipeline(topic, partition).await?;
        pipeline
            .send(topic, partition, header.clone(), body.clone())
            .await
    }

    /// The partition's leader is elsewhere (or unknown): drop the pipeline
    /// so the next attempt opens one at the leader.
    async fn leader_moved(&self, topic: &str, partition: u32, hint: Option<u64>) {
        self.client.note_leader(topic, partition, hint);
        let mut map = self.pipelines.lock().await;
        map.remove(&(topic.to_owned(), partition));
    }

    async fn pipeline(&self, topic: &str, partition: u32) -> Result<Arc<Pipeline>> {
        let mut map = self.pipelines.lock().await;
        let key = (topic.to_owned(), partition);
        if let Some(p) = map.get(&key) {
            if !p.dead.load(Ordering::SeqCst) {
                return Ok(p.clone());
            }
        }
        let p = Arc::new(Pipeline::open(&self.client, topic, partition, &self.cfg).await?);
        map.insert(key, p.clone());
        Ok(p)
    }
}

struct Pending {
    request_id: u64,
    sent: tokio::time::Instant,
    tx: oneshot::Sender<Result<Ack>>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

struct Pipeline {
    send: tokio::sync::Mutex<quinn::SendStream>,
    /// Publishes awaiting their ack, oldest first. `dead` is only set, and
    /// the queue only drained, under this lock, so a publish is either
    /// refused or answered, never forgotten.
    pending: Arc<Mutex<VecDeque<Pending>>>,
    count: Arc<Semaphore>,
    /// Byte window, in KiB permits (semaphore permits are u32 per acquire).
    kib: Arc<Semaphore>,
    next_id: AtomicU64,
    dead: Arc<AtomicBool>,
    /// The leader the watchdog found elsewhere (0: none).
    moved_to: Arc<AtomicU64>,
    reader: tokio::task::JoinHandle<()>,
    watchdog: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(w) = &self.watchdog {
            w.abort();
        }
    }
}

/// End a pipeline: no new publishes enter, and every one in flight learns
/// that its outcome is unknown (the retry loop resends it).
fn end_pipeline(pending: &Mutex<VecDeque<Pending>>, dead: &AtomicBool, reason: &str) {
    tracing::debug!(reason, "producer pipeline ended");
    let drained: Vec<Pending> = match pending.lock() {
        Ok(mut q) => {
            dead.store(true, Ordering::SeqCst);
            q.drain(..).collect()
        }
        Err(_) => {
            dead.store(true, Ordering::SeqCst);
            Vec::new()
        }
    };
    for p in drained {
        let _ = p.tx.send(Err(Error::Transport(format!(
            "publish outcome unknown ({reason}): the batch may or may not be stored"
        ))));
    }
}

/// Watch a pipeline to `node` for stalls (see [`STALL_PROBE_AFTER`]) and end
/// it as soon as another node names a different leader.
async fn watch_leader(
    client: Client,
    topic: String,
    partition: u32,
    node: u64,
    pending: Arc<Mutex<VecDeque<Pending>>>,
    dead: Arc<AtomicBool>,
    moved_to: Arc<AtomicU64>,
) {
    loop {
        tokio::time::sleep(STALL_PROBE_EVERY).await;
        if dead.load(Ordering::SeqCst) {
            return;
        }
        let oldest = pending.lock().ok().and_then(|q| q.front().map(|p| p.sent));
        if oldest.is_none_or(|t| t.elapsed() < STALL_PROBE_AFTER) {
            continue;
        }
        if let Some(leader) = client
            .leader_elsewhere(&topic, partition, node, STALL_PROBE_TIMEOUT)
            .await
        {
            client.note_leader(&topic, partition, Some(leader));
            moved_to.store(leader, Ordering::SeqCst);
            end_pipeline(
                &pending,
                &dead,
                &format!(
                    "node {node} stopped answering and node {leader} now leads {topic}/{partition}"
                ),
            );
            return;
        }
    }
}

impl Pipeline {
    async fn open(
        client: &Client,
        topic: &str,
        partition: u32,
        cfg: &ProducerConfig,
    ) -> Result<Self> {
        let (node, connection) = client.partition_connection(topic, partition).await?;
        tracing::debug!(topic, partition, ?node, "producer pipeline opened");
        let (send, mut recv) = connection.open_bi().await.map_err(transport)?;
        let pending: Arc<Mutex<VecDeque<Pending>>> = Arc::default();
        let dead = Arc::new(AtomicBool::new(false));
        let (p2, d2, c2, t2) = (
            pending.clone(),
            dead.clone(),
            client.clone(),
            topic.to_owned(),
        );
        let reader = tokio::spawn(async move {
            let end_reason = loop {
                let msg = match read_frame::<ServerMessage>(&mut recv).await {
                    Ok(Some(f)) => f.msg,
                    Ok(None) => break "the broker closed the producer stream".to_owned(),
                    Err(e) => break e.to_string(),
                };
                let (request_id, result) = match msg {
                    ServerMessage::Ack(a) => (
                        a.request_id,
                        Ok(Ack {
                            partition: a.partition,
                            base_offset: a.base_offset,
                            rows: a.rows,
                            timestamp_ms: a.timestamp_ms,
                        }),
                    ),
                    ServerMessage::Error(e) => {
                        if matches!(
                            ErrorCode::from_u16(e.code),
                            Some(
                                ErrorCode::SchemaMismatch
                                    | ErrorCode::SchemaNotSet
                                    | ErrorCode::TopicNotFound
                            )
                        ) {
                            // Our cached topic state is stale: refetch next time.
                            c2.forget_topic(&t2);
                        }
                        if e.request_id == 0 {
                            break format!("the broker ended the producer stream: {}", e.message);
                        }
                        (e.request_id, Err(Error::from_reply(&e)))
                    }
                    _ => break "unexpected message on a producer stream".to_owned(),
                };
                let next = p2.lock().ok().and_then(|mut q| q.pop_front());
                match next {
                    Some(p) if p.request_id == request_id => {
                        let _ = p.tx.send(result);
                    }
                    Some(p) => {
                        let _ = p.tx.send(Err(Error::Protocol(format!(
                            "ack for request {request_id} arrived while {} was expected",
                            p.request_id
                        ))));
                        break "acks arrived out of order".to_owned();
                    }
                    None => break format!("ack for request {request_id} that is not in flight"),
                }
            };
            end_pipeline(&p2, &d2, &end_reason);
        });
        let moved_to = Arc::new(AtomicU64::new(0));
        let watchdog = node.map(|node| {
            tokio::spawn(watch_leader(
                client.clone(),
                topic.to_owned(),
                partition,
                node,
                pending.clone(),
                dead.clone(),
                moved_to.clone(),
            ))
        });
        Ok(Self {
            send: tokio::sync::Mutex::new(send),
            pending,
            count: Arc::new(Semaphore::new(cfg.max_inflight_batches)),
            kib: Arc::new(Semaphore::new((cfg.max_inflight_bytes / 1024) as usize)),
            next_id: AtomicU64::new(1),
            dead,
            moved_to,
            reader,
            watchdog,
        })
    }

    async fn send(
        self: Arc<Self>,
        topic: &str,
        partition: u32,
        header: Bytes,
        body: Bytes,
    ) -> Result<Attempt> {
        let kib = ((header.len() + body.len()) / 1024 + 1) as u32;
        let closed = |_| Error::Transport("producer stream closed".into());
        let count = self.count.clone().acquire_owned().await.map_err(closed)?;
        let bytes = self
            .kib
            .clone()
            .acquire_many_owned(kib)
            .await
            .map_err(closed)?;
        // The stream lock orders frames and the pending queue identically.
        let mut send = self.send.lock().await;
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self
                .pending
                .lock()
                .map_err(|_| Error::Protocol("pending queue poisoned".into()))?;
            if self.dead.load(Ordering::SeqCst) {
                return Err(Error::Transport("producer stream closed; retry".into()));
            }
            pending.push_back(Pending {
                request_id,
                sent: tokio::time::Instant::now(),
                tx,
                _permits: (count, bytes),
            });
        }
        let msg = ClientMessage::Publish(Publish {
            request_id,
            topic: topic.to_owned(),
            partition,
        });
        if let Err(e) = write_frame_chunks(&mut send, &msg, vec![header, body]).await {
            end_pipeline(&self.pending, &self.dead, "the producer stream broke");
            return Err(e);
        }
        drop(send);
        Ok(Attempt {
            rx,
            pipeline: self.clone(),
        })
    }
}
