//! Coalescing small batches, like Kafka's `linger.ms`: enabled by
//! [`ProducerConfig::linger`](crate::ProducerConfig::linger).
//!
//! Every batch sent to a (topic, partition) then goes through that
//! partition's queue, served by one task: it takes the first batch, collects
//! more with the same schema until `linger_bytes` are together or `linger`
//! has passed, concatenates them into one batch and sends it on the
//! partition's pipeline. With a linger of zero nothing waits: the task only
//! takes what is already queued, and batches queue up exactly while the
//! partition's window is full (the previous send is blocked). So under load
//! they coalesce and a lone batch at a low rate goes out at once, as
//! librdkafka batches while its requests are in flight.
//!
//! Each caller's ack names its own rows: the partition, the offset where
//! its first row landed inside the stored batch and its row count. Order is
//! kept because everything of one partition passes through its queue, large
//! batches too (sent alone).
//!
//! Bounds: a queue holds at most [`QUEUE_ITEMS_MAX`] batches and all queues
//! of a producer [`QUEUED_BYTES_MAX`] bytes of Arrow memory; a full queue
//! makes `send` wait (backpressure), and the window bounds what is in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_select::concat::concat_batches;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::producer::{Ack, PendingAck, Producer};

/// Batches waiting in one (topic, partition) queue: enough to fill a
/// coalesced batch from 1-row batches at a high rate.
pub const QUEUE_ITEMS_MAX: usize = 4096;

/// Arrow memory waiting in all queues of one producer: what lingering may
/// hold on top of the in-flight window.
pub const QUEUED_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Largest coalesced batch (Arrow memory of its rows): half the broker's
/// batch limit, leaving room for IPC padding and dictionaries.
pub const LINGER_BYTES_MAX: usize = 8 * 1024 * 1024;

type Reply = oneshot::Sender<Result<Ack>>;

struct Queued {
    batch: RecordBatch,
    bytes: usize,
    reply: Reply,
    _permit: OwnedSemaphorePermit,
}

enum Item {
    Batch(Queued),
    /// Send what is collected now; answer once every earlier batch is acked.
    Flush(oneshot::Sender<()>),
}

/// How long to wait for more batches, and how large a coalesced batch may get.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LingerOptions {
    pub linger: Duration,
    pub bytes: usize,
}

pub(crate) struct Linger {
    opts: LingerOptions,
    /// The producer the coalesced batches go out on (itself without linger).
    producer: Producer,
    queues: Mutex<HashMap<(String, u32), mpsc::Sender<Item>>>,
    queued_kib: Arc<Semaphore>,
}

fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes / 1024 + 1).unwrap_or(u32::MAX)
}

/// Arrow memory of the rows of `batch` (slices count only their rows;
/// dictionaries count whole): close to its encoded size, known without
/// encoding it.
pub fn arrow_memory_bytes(batch: &RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|c| {
            c.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size())
        })
        .sum()
}

/// `batch` sliced by rows into zero-copy pieces of about `target` bytes of
/// Arrow memory each (one piece when it is that small already or has a
/// single row).
pub fn slice_by_memory(batch: &RecordBatch, target: usize) -> Vec<RecordBatch> {
    let bytes = arrow_memory_bytes(batch);
    let rows = batch.num_rows();
    if bytes <= target || rows <= 1 {
        return vec![batch.clone()];
    }
    let n = bytes.div_ceil(target.max(1)).min(rows);
    let per = rows.div_ceil(n);
    (0..rows)
        .step_by(per)
        .map(|start| batch.slice(start, per.min(rows - start)))
        .collect()
}

impl Linger {
    pub fn new(producer: Producer, opts: LingerOptions) -> Self {
        Self {
            opts,
            producer,
            queues: Mutex::default(),
            queued_kib: Arc::new(Semaphore::new(QUEUED_BYTES_MAX / 1024)),
        }
    }

    fn queue(&self, topic: &str, partition: u32) -> mpsc::Sender<Item> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let key = (topic.to_owned(), partition);
        if let Some(q) = queues.get(&key).filter(|q| !q.is_closed()) {
            return q.clone();
        }
        let (tx, rx) = mpsc::channel(QUEUE_ITEMS_MAX);
        // The task ends when the last sender is gone (the producer and its
        // clones dropped), after sending what is queued.
        tokio::spawn(run(
            rx,
            self.producer.clone(),
            topic.to_owned(),
            partition,
            self.opts,
        ));
        queues.insert(key, tx.clone());
        tx
    }

    /// Queue `batch` for `partition`; waits while the queues are full.
    pub async fn send(
        &self,
        topic: &str,
        partition: u32,
        batch: RecordBatch,
    ) -> Result<PendingAck> {
        let bytes = arrow_memory_bytes(&batch);
        let want = kib(bytes).min(kib(QUEUED_BYTES_MAX) - 1);
        let permit = self
            .queued_kib
            .clone()
            .acquire_many_owned(want)
            .await
            .map_err(|_| Error::Transport("the producer was closed".into()))?;
        let (reply, rx) = oneshot::channel();
        let item = Item::Batch(Queued {
            batch,
            bytes,
            reply,
            _permit: permit,
        });
        self.queue(topic, partition)
            .send(item)
            .await
            .map_err(|_| Error::Transport("the linger queue ended".into()))?;
        Ok(PendingAck::new(async move {
            rx.await.unwrap_or_else(|_| {
                Err(Error::Transport(
                    "publish outcome unknown: the linger queue ended".into(),
                ))
            })
        }))
    }

    /// Send what every queue holds now; return once all of it is acked
    /// (or failed: the failures reach the pending acks).
    pub async fn flush(&self) {
        let queues: Vec<mpsc::Sender<Item>> = self
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut done = Vec::new();
        for q in queues {
            let (tx, rx) = oneshot::channel();
            if q.send(Item::Flush(tx)).await.is_ok() {
                done.push(rx);
            }
        }
        for rx in done {
            // A task that ended has nothing left to flush.
            let _ = rx.await;
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<Item>,
    producer: Producer,
    topic: String,
    partition: u32,
    opts: LingerOptions,
) {
    let mut acks: JoinSet<()> = JoinSet::new();
    let mut carry: Option<Item> = None;
    loop {
        let first = match carry.take() {
            Some(item) => item,
            None => match rx.recv().await {
                Some(item) => item,
                None => break,
            },
        };
        let first = match first {
            Item::Flush(done) => {
                while acks.join_next().await.is_some() {}
                let _ = done.send(());
                continue;
            }
            Item::Batch(b) => b,
        };
        let mut bytes = first.bytes;
        let schema = first.batch.schema();
        let mut group = vec![first];
        let deadline = Instant::now() + opts.linger;
        while bytes < opts.bytes {
            let next = if opts.linger.is_zero() {
                rx.try_recv().ok()
            } else {
                tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .ok()
                    .flatten()
            };
            match next {
                Some(Item::Batch(b))
                    if bytes + b.bytes <= opts.bytes
                        && (Arc::ptr_eq(&b.batch.schema(), &schema)
                            || b.batch.schema() == schema) =>
                {
                    bytes += b.bytes;
                    group.push(b);
                }
                Some(other) => {
                    carry = Some(other);
                    break;
                }
                None => break,
            }
        }
        send_group(&producer, &topic, partition, group, &mut acks).await;
        while acks.try_join_next().is_some() {}
    }
    while acks.join_next().await.is_some() {}
}

/// Send one coalesced batch; answer each member with its rows' place.
async fn send_group(
    producer: &Producer,
    topic: &str,
    partition: u32,
    group: Vec<Queued>,
    acks: &mut JoinSet<()>,
) {
    let combined = if group.len() == 1 {
        Ok(group[0].batch.clone())
    } else {
        concat_batches(&group[0].batch.schema(), group.iter().map(|q| &q.batch))
    };
    let sent = match combined {
        Ok(batch) => producer.send(topic, Some(partition), &batch).await,
        Err(e) => Err(Error::Arrow(e)),
    };
    match sent {
        Ok(pending) => {
            // The queue permits are released here: the rows are encoded and
            // in flight, bounded by the window.
            let members: Vec<(u32, Reply)> = group
                .into_iter()
                .map(|q| (q.batch.num_rows() as u32, q.reply))
                .collect();
            acks.spawn(answer_members(pending, members));
        }
        Err(Error::BatchTooLarge(_)) if group.len() > 1 => {
            // Encoded, the group came out over the batch limit (padding,
            // dictionaries): send its members one by one, still in order.
            for q in group {
                match producer.send(topic, Some(partition), &q.batch).await {
                    Ok(pending) => {
                        acks.spawn(answer_members(
                            pending,
                            vec![(q.batch.num_rows() as u32, q.reply)],
                        ));
                    }
                    Err(e) => {
                        let _ = q.reply.send(Err(e));
                    }
                }
            }
        }
        Err(e) => {
            let mut members = group.into_iter();
            if let Some(last) = members.next_back() {
                for q in members {
                    let _ = q.reply.send(Err(e.duplicate()));
                }
                let _ = last.reply.send(Err(e));
            }
        }
    }
}

/// Wait for the stored batch's ack and tell every member where its rows are.
async fn answer_members(pending: PendingAck, members: Vec<(u32, Reply)>) {
    match pending.await {
        Ok(ack) => {
            let rows: Vec<u32> = members.iter().map(|(rows, _)| *rows).collect();
            for ((_, reply), part) in members.into_iter().zip(member_acks(ack, &rows)) {
                let _ = reply.send(Ok(part));
            }
        }
        Err(e) => {
            let mut members = members.into_iter();
            if let Some((_, last)) = members.next_back() {
                for (_, reply) in members {
                    let _ = reply.send(Err(e.duplicate()));
                }
                let _ = last.send(Err(e));
            }
        }
    }
}

/// The ack of each member of a coalesced batch: its rows follow the rows of
/// the members before it inside the stored batch.
pub(crate) fn member_acks(stored: Ack, member_rows: &[u32]) -> Vec<Ack> {
    let mut offset = stored.base_offset;
    member_rows
        .iter()
        .map(|&rows| {
            let a = Ack {
                partition: stored.partition,
                base_offset: offset,
                rows,
                timestamp_ms: stored.timestamp_ms,
            };
            offset += u64::from(rows);
            a
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_by_memory_cover_every_row_once() {
        use arrow_array::Int64Array;
        let b = RecordBatch::try_from_iter([(
            "v",
            Arc::new(Int64Array::from_iter_values(0..1000)) as arrow_array::ArrayRef,
        )])
        .unwrap();
        // 8,000 bytes of values in pieces of about 1,000: 8 pieces of 125 rows.
        let pieces = slice_by_memory(&b, 1000);
        assert_eq!(pieces.len(), 8);
        assert!(pieces.iter().all(|p| p.num_rows() == 125));
        let rows: Vec<i64> = pieces
            .iter()
            .flat_map(|p| {
                p.column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect();
        assert_eq!(rows, (0..1000).collect::<Vec<_>>());
        assert_eq!(slice_by_memory(&b, 1 << 20).len(), 1);
        assert_eq!(slice_by_memory(&b.slice(0, 1), 1).len(), 1);
    }

    #[test]
    fn members_get_consecutive_rows_of_the_stored_batch() {
        let stored = Ack {
            partition: 2,
            base_offset: 100,
            rows: 10,
            timestamp_ms: 7,
        };
        let got = member_acks(stored, &[3, 0, 7]);
        let at = |base_offset, rows| Ack {
            partition: 2,
            base_offset,
            rows,
            timestamp_ms: 7,
        };
        assert_eq!(got, vec![at(100, 3), at(103, 0), at(103, 7)]);
    }
}
