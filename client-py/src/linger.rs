//! Coalescing small publishes (like Kafka's `linger.ms`), enabled by
//! `bus.producer(linger_ms=...)`.
//!
//! Each (topic, partition) gets a queue and a task. The task takes the
//! first batch, then waits up to `linger` for more with the same schema
//! until `bytes` are collected, concatenates them into one batch and sends
//! it. Every caller gets back its own rows' place: the partition and the
//! offset where its rows landed inside the coalesced batch. Everything of
//! one (topic, partition) goes through its queue, large batches too (sent
//! alone), so order is kept.
//!
//! Bounds: the queue holds at most `LINGER_QUEUE_ITEMS_MAX` batches and
//! `LINGER_QUEUED_BYTES_MAX` bytes; a full queue makes `publish`/`send`
//! wait (backpressure), then the Rust producer's window bounds what is in
//! flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;
use arrow_select::concat::concat_batches;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::errors::BusError;
use crate::producer::{estimated_bytes, LingerOptions, Piece};
use crate::rt::runtime;

/// Batches waiting in one (topic, partition) queue. Enough to fill a
/// coalesced batch from small frames at a high rate; beyond it callers wait.
const LINGER_QUEUE_ITEMS_MAX: usize = 4096;

/// Bytes (Arrow memory) waiting in all queues of one producer: the memory
/// that lingering may hold on top of the in-flight window.
const LINGER_QUEUED_BYTES_MAX: usize = 64 * 1024 * 1024;

type Reply = oneshot::Sender<Result<Vec<Piece>, BusError>>;

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

pub struct Linger {
    opts: LingerOptions,
    producer: arrowbus::Producer,
    queues: Mutex<HashMap<(String, u32), mpsc::Sender<Item>>>,
    queued_kib: Arc<Semaphore>,
    tasks: Mutex<JoinSet<()>>,
}

impl Drop for Linger {
    fn drop(&mut self) {
        // Batches already accepted must still be sent: let each task drain
        // its queue (it ends when the queue's last sender is gone) instead
        // of aborting it with the JoinSet.
        if let Ok(t) = self.tasks.get_mut() {
            t.detach_all();
        }
    }
}

fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes / 1024 + 1).unwrap_or(u32::MAX)
}

impl Linger {
    pub fn new(producer: arrowbus::Producer, opts: LingerOptions) -> Self {
        Self {
            opts,
            producer,
            queues: Mutex::default(),
            queued_kib: Arc::new(Semaphore::new(LINGER_QUEUED_BYTES_MAX / 1024)),
            tasks: Mutex::default(),
        }
    }

    pub fn options(&self) -> LingerOptions {
        self.opts
    }

    fn queue(&self, topic: &str, partition: u32) -> Result<mpsc::Sender<Item>, BusError> {
        let mut queues = self
            .queues
            .lock()
            .map_err(|_| BusError::new("other", "linger queues poisoned"))?;
        let key = (topic.to_owned(), partition);
        if let Some(q) = queues.get(&key) {
            if !q.is_closed() {
                return Ok(q.clone());
            }
        }
        let (tx, rx) = mpsc::channel(LINGER_QUEUE_ITEMS_MAX);
        let run = run(
            rx,
            self.producer.clone(),
            topic.to_owned(),
            partition,
            self.opts,
        );
        self.tasks
            .lock()
            .map_err(|_| BusError::new("other", "linger tasks poisoned"))?
            .spawn_on(run, runtime()?.handle());
        queues.insert(key, tx.clone());
        Ok(tx)
    }

    pub async fn enqueue(
        &self,
        topic: &str,
        partition: u32,
        batch: RecordBatch,
    ) -> Result<oneshot::Receiver<Result<Vec<Piece>, BusError>>, BusError> {
        let bytes = estimated_bytes(&batch);
        let want = kib(bytes).min(kib(LINGER_QUEUED_BYTES_MAX) - 1);
        let permit = self
            .queued_kib
            .clone()
            .acquire_many_owned(want)
            .await
            .map_err(|_| BusError::new("transport", "producer closed"))?;
        let (reply, rx) = oneshot::channel();
        let q = self.queue(topic, partition)?;
        q.send(Item::Batch(Queued {
            batch,
            bytes,
            reply,
            _permit: permit,
        }))
        .await
        .map_err(|_| BusError::new("transport", "the linger queue ended"))?;
        Ok(rx)
    }

    pub async fn flush(&self) -> Result<(), BusError> {
        let queues: Vec<mpsc::Sender<Item>> = self
            .queues
            .lock()
            .map(|q| q.values().cloned().collect())
            .unwrap_or_default();
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
        Ok(())
    }
}

async fn run(
    mut rx: mpsc::Receiver<Item>,
    producer: arrowbus::Producer,
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
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Item::Batch(b)))
                    if bytes + b.bytes <= opts.bytes
                        && (Arc::ptr_eq(&b.batch.schema(), &schema)
                            || b.batch.schema() == schema) =>
                {
                    bytes += b.bytes;
                    group.push(b);
                }
                Ok(Some(other)) => {
                    carry = Some(other);
                    break;
                }
                Ok(None) | Err(_) => break,
            }
        }
        send_group(&producer, &topic, partition, group, &mut acks).await;
        while acks.try_join_next().is_some() {}
    }
    while acks.join_next().await.is_some() {}
}

/// Send one coalesced batch; answer each member with the rows it owns.
async fn send_group(
    producer: &arrowbus::Producer,
    topic: &str,
    partition: u32,
    group: Vec<Queued>,
    acks: &mut JoinSet<()>,
) {
    let schema = group[0].batch.schema();
    let combined = if group.len() == 1 {
        Ok(group[0].batch.clone())
    } else {
        concat_batches(&schema, group.iter().map(|q| &q.batch)).map_err(BusError::arrow)
    };
    let sent = match combined {
        Ok(batch) => producer
            .send_split(topic, Some(partition), &batch)
            .await
            .map_err(BusError::from),
        Err(e) => Err(e),
    };
    let mut members = Vec::with_capacity(group.len());
    for q in group {
        // The permit is released here: the batch is encoded and in flight
        // (bounded by the producer window) or refused.
        members.push((q.batch.num_rows() as u64, q.reply));
    }
    match sent {
        Err(e) => {
            for (_, reply) in members {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Ok(pending) => {
            acks.spawn(async move {
                let mut stored = Vec::with_capacity(pending.len());
                for p in pending {
                    match p.await {
                        Ok(a) => stored.push(Piece::from(a)),
                        Err(e) => {
                            let e = BusError::from(e);
                            for (_, reply) in members {
                                let _ = reply.send(Err(e.clone()));
                            }
                            return;
                        }
                    }
                }
                let rows: Vec<u64> = members.iter().map(|(r, _)| *r).collect();
                for ((_, reply), pieces) in members.into_iter().zip(split_rows(&stored, &rows)) {
                    let _ = reply.send(Ok(pieces));
                }
            });
        }
    }
}

/// The stored batches cover the members' rows in order; give each member
/// the parts of the stored batches its rows fell into.
pub fn split_rows(stored: &[Piece], member_rows: &[u64]) -> Vec<Vec<Piece>> {
    let mut out = Vec::with_capacity(member_rows.len());
    let mut s = 0usize; // stored batch index
    let mut used = 0u64; // rows of stored[s] already given out
    for &want in member_rows {
        let mut mine = Vec::new();
        let mut left = want;
        while left > 0 && s < stored.len() {
            let p = stored[s];
            let avail = u64::from(p.rows) - used;
            let take = avail.min(left);
            mine.push(Piece {
                partition: p.partition,
                base_offset: p.base_offset + used,
                rows: take as u32,
                timestamp_ms: p.timestamp_ms,
            });
            used += take;
            left -= take;
            if used == u64::from(p.rows) {
                s += 1;
                used = 0;
            }
        }
        if mine.is_empty() {
            // A zero-row member still learns where it would have been.
            if let Some(p) = stored.get(s).or(stored.last()) {
                mine.push(Piece {
                    partition: p.partition,
                    base_offset: p.base_offset + used,
                    rows: 0,
                    timestamp_ms: p.timestamp_ms,
                });
            }
        }
        out.push(mine);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(base: u64, rows: u32) -> Piece {
        Piece {
            partition: 2,
            base_offset: base,
            rows,
            timestamp_ms: 7,
        }
    }

    #[test]
    fn members_get_their_rows_in_one_stored_batch() {
        let got = split_rows(&[piece(100, 10)], &[3, 0, 7]);
        assert_eq!(got[0], vec![piece(100, 3)]);
        assert_eq!(got[1], vec![piece(103, 0)]);
        assert_eq!(got[2], vec![piece(103, 7)]);
    }

    #[test]
    fn a_member_spanning_two_stored_batches_gets_both_parts() {
        // Split batches need not be contiguous: another producer's batch
        // may sit between them.
        let got = split_rows(&[piece(0, 4), piece(50, 6)], &[3, 5, 2]);
        assert_eq!(got[0], vec![piece(0, 3)]);
        assert_eq!(got[1], vec![piece(3, 1), piece(50, 4)]);
        assert_eq!(got[2], vec![piece(54, 2)]);
    }
}
