//! The queue workload: producer processes send unique values to keyed
//! partitions, consumer processes poll them, and every step goes into the
//! history. Each worker is one Jepsen process at a time: one operation in
//! flight, and after an indeterminate (`info`) outcome it continues as a new
//! process with a fresh client, so no later op of a process can overlap an
//! earlier one that might still take effect.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use arrowbus::{Client, ClientConfig, ErrorCode, StartAt, SubscribeOptions, Subscriber};
use futures::stream::{SelectAll, StreamExt};
use serde_json::Value as Json;
use tokio::sync::mpsc;

use crate::history::{Key, MicroOp, Offset, Op, OpType, OpValue, Process, Reads, Value};
use crate::schedule::Rng;

/// Most (offset, value) pairs one poll returns: bounds an op's size in the
/// history and the time one poll holds the worker.
const MAX_POLL_RECORDS: usize = 500;
/// Longest pause between two ops of one worker (bounds the exponential
/// draw's tail, so a worker never sleeps through a whole fault).
const MAX_STAGGER: Duration = Duration::from_secs(2);

/// The topic's schema: the value column is what the checker follows.
pub fn schema() -> Schema {
    Schema::new(vec![Field::new("value", DataType::Int64, false)])
}

/// A history event before the recorder gives it its index.
pub type Event = Op;

/// The optional fields of a history event.
#[derive(Default)]
pub struct Extra {
    pub error: Option<String>,
    pub node: Option<u32>,
    pub final_read: bool,
}

/// Stamps and forwards history events.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Event>,
    start: Instant,
}

impl Recorder {
    pub fn new(tx: mpsc::Sender<Event>, start: Instant) -> Self {
        Self { tx, start }
    }

    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub async fn record(
        &self,
        process: Process,
        kind: OpType,
        f: &str,
        value: OpValue,
        extra: Extra,
    ) {
        let op = Op {
            index: 0,
            time: self.now_ns(),
            process,
            kind,
            f: f.into(),
            value,
            error: extra.error,
            node: extra.node,
            final_read: extra.final_read,
        };
        // The recorder task lives until every worker is done; a closed
        // channel means the run is being torn down.
        let _ = self.tx.send(op).await;
    }

    pub async fn nemesis(&self, kind: OpType, f: &str, value: Json, error: Option<String>) {
        self.record(
            Process::Nemesis,
            kind,
            f,
            OpValue::Other(value),
            Extra {
                error,
                node: None,
                final_read: false,
            },
        )
        .await;
    }
}

#[derive(Clone)]
pub struct WorkloadConfig {
    pub topic: String,
    pub keys: u32,
    /// Total ops per second over all workers.
    pub rate: f64,
    pub concurrency: u32,
    /// An op without an answer by then is indeterminate.
    pub op_timeout: Duration,
    /// How long a poll waits for its first record.
    pub poll_wait: Duration,
    pub client: ClientConfig,
}

/// Values handed out per key (unique by construction), and the highest
/// acknowledged offset per key (so final reads know how far to read).
#[derive(Default)]
pub struct Shared {
    next_value: BTreeMap<Key, AtomicI64>,
    pub acked_end: std::sync::Mutex<BTreeMap<Key, Offset>>,
}

impl Shared {
    pub fn new(keys: u32) -> Arc<Self> {
        Arc::new(Shared {
            next_value: (0..keys).map(|k| (k, AtomicI64::new(0))).collect(),
            acked_end: Default::default(),
        })
    }
    fn next_value(&self, k: Key) -> Value {
        self.next_value
            .get(&k)
            .map_or(0, |a| a.fetch_add(1, Ordering::Relaxed))
    }
    fn acked(&self, k: Key, offset: Offset) {
        if let Ok(mut m) = self.acked_end.lock() {
            let e = m.entry(k).or_insert(offset + 1);
            *e = (*e).max(offset + 1);
        }
    }
}

/// Whether an error proves the operation had no effect. Anything not
/// listed is indeterminate: NotLeader, ShuttingDown, storage errors and lost
/// connections may all follow an append (the Jepsen lesson: treating them
/// as failures hides lost or duplicated writes). A `fail` the checker later
/// sees read is reported as an aborted read (G1a), so this list is itself
/// under test.
pub fn definite_failure(e: &arrowbus::Error) -> bool {
    if let arrowbus::Error::Connect { .. }
    | arrowbus::Error::Config(_)
    | arrowbus::Error::Arrow(_) = e
    {
        return true;
    }
    // NotLeader is definite when the node refused before appending: it has
    // no replica of the partition, or Raft forwarded the write (not the
    // leader). It is indefinite when the leader changed after the append,
    // which the broker says in so many words ("may or may not have been
    // stored"); a code of its own would be better than matching text.
    if let arrowbus::Error::Broker { message, .. } = e {
        if e.code() == Some(ErrorCode::NotLeader) {
            return !message.contains("may or may not");
        }
    }
    matches!(
        e.code(),
        Some(
            ErrorCode::TopicNotFound
                | ErrorCode::PartitionNotFound
                | ErrorCode::SchemaMismatch
                | ErrorCode::SchemaNotSet
                | ErrorCode::InvalidArgument
                | ErrorCode::InvalidTopicName
                | ErrorCode::BatchTooLarge
                | ErrorCode::Unauthorized
                | ErrorCode::TooManyConnections
                | ErrorCode::Busy
        )
    )
}

pub enum Role {
    Producer,
    Consumer,
}

/// One worker: a sequence of processes `first, first + concurrency, ...`.
pub async fn worker(
    id: u32,
    role: Role,
    mut cfg: WorkloadConfig,
    shared: Arc<Shared>,
    rec: Recorder,
    mut rng: Rng,
    deadline: Instant,
) {
    // Each worker's clients try the nodes starting at a different one, so
    // metadata requests are spread and a dead first node does not cost
    // every new client a connect timeout.
    let n = cfg.client.brokers.len();
    if n > 1 {
        cfg.client.brokers.rotate_left(id as usize % n);
    }
    let mut process = u64::from(id);
    let mut client: Option<Client> = None;
    // Consumer state: where each key continues, and the open subscriptions.
    let mut position: BTreeMap<Key, Offset> = (0..cfg.keys).map(|k| (k, 0)).collect();
    let mut subs: Option<SelectAll<Subscriber>> = None;
    let mean_gap = f64::from(cfg.concurrency) / cfg.rate.max(0.001);
    let mut next_at = Instant::now();
    loop {
        // Exponential gaps (a Poisson stream per worker), bounded, counted
        // from the previous op's planned start so fast ops reach the rate.
        // A worker that fell behind (an op waited out a fault) starts
        // afresh instead of bursting to catch up.
        let gap = (-mean_gap * (1.0 - rng.unit()).ln()).min(MAX_STAGGER.as_secs_f64());
        next_at += Duration::from_secs_f64(gap);
        let now = Instant::now();
        if next_at + MAX_STAGGER < now {
            next_at = now;
        }
        tokio::time::sleep_until(next_at.into()).await;
        if Instant::now() >= deadline {
            break;
        }
        let p = Process::Client(process);
        match role {
            Role::Producer => {
                let k = rng.below(u64::from(cfg.keys)) as Key;
                let v = shared.next_value(k);
                let invoke = vec![MicroOp::Send {
                    key: k,
                    value: v,
                    offset: None,
                }];
                rec.record(
                    p,
                    OpType::Invoke,
                    "send",
                    OpValue::Mops(invoke.clone()),
                    Extra {
                        error: None,
                        node: None,
                        final_read: false,
                    },
                )
                .await;
                let outcome = match connected(&mut client, &cfg).await {
                    Err(e) => Err(e),
                    Ok(c) => publish(c, &cfg, k, v).await,
                };
                match outcome {
                    Ok(offset) => {
                        shared.acked(k, offset);
                        let done = vec![MicroOp::Send {
                            key: k,
                            value: v,
                            offset: Some(offset),
                        }];
                        rec.record(
                            p,
                            OpType::Ok,
                            "send",
                            OpValue::Mops(done),
                            Extra {
                                error: None,
                                node: None,
                                final_read: false,
                            },
                        )
                        .await;
                    }
                    Err(Failure::Definite(msg)) => {
                        rec.record(
                            p,
                            OpType::Fail,
                            "send",
                            OpValue::Mops(invoke),
                            Extra {
                                error: Some(msg),
                                node: None,
                                final_read: false,
                            },
                        )
                        .await;
                        // A refusal that named the leader is kept in the
                        // client (its next publish goes there); other
                        // definite failures start from a fresh client.
                        if client.as_ref().is_some_and(|c| !c.is_connected()) {
                            client = None;
                        }
                    }
                    Err(Failure::Unknown(msg)) => {
                        rec.record(
                            p,
                            OpType::Info,
                            "send",
                            OpValue::Mops(invoke),
                            Extra {
                                error: Some(msg),
                                node: None,
                                final_read: false,
                            },
                        )
                        .await;
                        client = None;
                        process += u64::from(cfg.concurrency);
                    }
                }
            }
            Role::Consumer => {
                rec.record(
                    p,
                    OpType::Invoke,
                    "poll",
                    OpValue::Mops(vec![MicroOp::Poll { reads: None }]),
                    Extra {
                        error: None,
                        node: None,
                        final_read: false,
                    },
                )
                .await;
                let (reads, error) = poll(&mut client, &mut subs, &mut position, &cfg).await;
                let got = reads.values().any(|v| !v.is_empty());
                let kind = if error.is_some() && !got {
                    OpType::Fail
                } else {
                    OpType::Ok
                };
                let value = if kind == OpType::Ok {
                    vec![MicroOp::Poll { reads: Some(reads) }]
                } else {
                    vec![MicroOp::Poll { reads: None }]
                };
                if error.is_some() {
                    // Resubscribe from the positions reached, on a new
                    // connection if the old one is gone. The process stays:
                    // it must continue exactly where it was.
                    subs = None;
                    if client.as_ref().is_some_and(|c| !c.is_connected()) {
                        client = None;
                    }
                }
                rec.record(
                    p,
                    kind,
                    "poll",
                    OpValue::Mops(value),
                    Extra {
                        error,
                        ..Extra::default()
                    },
                )
                .await;
            }
        }
    }
    if let Some(c) = client {
        c.close().await;
    }
}

enum Failure {
    Definite(String),
    Unknown(String),
}

async fn connected<'a>(
    client: &'a mut Option<Client>,
    cfg: &WorkloadConfig,
) -> Result<&'a Client, Failure> {
    if client.as_ref().is_some_and(|c| !c.is_connected()) {
        *client = None;
    }
    if client.is_none() {
        match tokio::time::timeout(cfg.op_timeout, Client::connect(cfg.client.clone())).await {
            Ok(Ok(c)) => *client = Some(c),
            // Nothing was sent: a definite failure.
            Ok(Err(e)) => return Err(Failure::Definite(format!("connect: {e}"))),
            Err(_) => return Err(Failure::Definite("connect: timed out".into())),
        }
    }
    client
        .as_ref()
        .ok_or_else(|| Failure::Definite("no client".into()))
}

async fn publish(c: &Client, cfg: &WorkloadConfig, k: Key, v: Value) -> Result<Offset, Failure> {
    let batch = RecordBatch::try_new(
        Arc::new(schema()),
        vec![Arc::new(Int64Array::from(vec![v]))],
    )
    .map_err(|e| Failure::Definite(format!("building the batch: {e}")))?;
    match tokio::time::timeout(
        cfg.op_timeout,
        // No retries inside the client: without idempotent producers a
        // retry can store a value twice, and each op here must be one
        // attempt whose outcome the history records (ok, fail or info).
        c.producer_with(arrowbus::ProducerConfig {
            delivery_timeout: std::time::Duration::ZERO,
            ..Default::default()
        })
        .publish_to(&cfg.topic, k, &batch),
    )
    .await
    {
        Ok(Ok(ack)) if ack.rows == 1 && ack.partition == k => Ok(ack.base_offset),
        Ok(Ok(ack)) => Err(Failure::Unknown(format!(
            "ack for partition {} with {} rows, expected partition {k} and 1 row",
            ack.partition, ack.rows
        ))),
        Ok(Err(e)) if definite_failure(&e) => Err(Failure::Definite(e.to_string())),
        Ok(Err(e)) => Err(Failure::Unknown(e.to_string())),
        Err(_) => Err(Failure::Unknown(format!(
            "no ack within {} ms",
            cfg.op_timeout.as_millis()
        ))),
    }
}

/// One poll: wait up to `poll_wait` for the first delivery, then take what
/// is ready, up to `MAX_POLL_RECORDS`. Returns what was read and the error
/// that ended the poll, if any.
async fn poll(
    client: &mut Option<Client>,
    subs: &mut Option<SelectAll<Subscriber>>,
    position: &mut BTreeMap<Key, Offset>,
    cfg: &WorkloadConfig,
) -> (Reads, Option<String>) {
    let mut reads = Reads::new();
    if subs.is_none() {
        let c = match connected(client, cfg).await {
            Ok(c) => c,
            Err(Failure::Definite(m) | Failure::Unknown(m)) => return (reads, Some(m)),
        };
        let mut all = SelectAll::new();
        for (k, from) in position.iter() {
            let opts = SubscribeOptions::default()
                .from(StartAt::Offset(*from))
                .partitions(vec![*k]);
            match tokio::time::timeout(cfg.op_timeout, c.subscribe(&cfg.topic, opts)).await {
                Ok(Ok(s)) => all.push(s),
                Ok(Err(e)) => return (reads, Some(format!("subscribe to key {k}: {e}"))),
                Err(_) => return (reads, Some(format!("subscribe to key {k}: timed out"))),
            }
        }
        *subs = Some(all);
    }
    let Some(s) = subs.as_mut() else {
        return (reads, Some("no subscription".into()));
    };
    let mut count = 0usize;
    let mut wait = cfg.poll_wait;
    while count < MAX_POLL_RECORDS {
        let item = match tokio::time::timeout(wait, s.next()).await {
            Ok(Some(item)) => item,
            Ok(None) => return (reads, Some("subscription ended".into())),
            Err(_) => break, // nothing more within the wait: the poll is done
        };
        // After the first record, only take what is already there.
        wait = Duration::from_millis(1);
        let d = match item {
            Ok(d) => d,
            Err(e) => return (reads, Some(e.to_string())),
        };
        let values = match d
            .batch
            .column_by_name("value")
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
        {
            Some(a) => a,
            None => {
                return (
                    reads,
                    Some(format!(
                        "batch at partition {} offset {} has no Int64 value column",
                        d.partition, d.offset
                    )),
                )
            }
        };
        let out = reads.entry(d.partition).or_default();
        for i in 0..values.len() {
            out.push((d.offset + i as u64, values.value(i)));
        }
        count += values.len();
        position.insert(d.partition, d.next_offset());
    }
    (reads, None)
}

/// A final read: a fresh client to one node, every key from the earliest
/// offset to the end as the node has it now.
pub async fn final_read(
    cfg: &WorkloadConfig,
    client_cfg: ClientConfig,
    timeout: Duration,
) -> Result<Reads, String> {
    let fut = async {
        let c = Client::connect(client_cfg)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut reads = Reads::new();
        for k in 0..cfg.keys {
            let opts = SubscribeOptions::default()
                .from(StartAt::Earliest)
                .partitions(vec![k])
                .until_end();
            let mut sub = c
                .subscribe(&cfg.topic, opts)
                .await
                .map_err(|e| format!("subscribe to key {k}: {e}"))?;
            let out = reads.entry(k).or_default();
            while let Some(d) = sub.next().await {
                let d = d.map_err(|e| format!("reading key {k}: {e}"))?;
                let values = d
                    .batch
                    .column_by_name("value")
                    .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
                    .ok_or_else(|| format!("key {k} offset {}: no Int64 value column", d.offset))?;
                for i in 0..values.len() {
                    out.push((d.offset + i as u64, values.value(i)));
                }
            }
        }
        c.close().await;
        Ok(reads)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "final read did not finish within {} s",
            timeout.as_secs()
        )),
    }
}
