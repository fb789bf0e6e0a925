//! Subscribing. One QUIC stream per partition; the broker pushes batches
//! while this side's credit lasts. Credit is returned only after the
//! application has taken a batch from the [`Subscriber`] stream, so a slow
//! application stops the broker instead of filling memory anywhere.

use std::pin::Pin;

use std::task::{Context, Poll};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use arrowbus_wire::limits::{
    MAX_CREDIT_BATCHES_PER_SUBSCRIPTION, MAX_CREDIT_BYTES_PER_SUBSCRIPTION,
};
use arrowbus_wire::{
    BatchHeader, ClientMessage, Credit, Isolation, ServerMessage, StartAt, Subscribe,
    BATCH_HEADER_BYTES,
};
use bytes::Bytes;
use futures::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::conn::{read_frame, transport, write_frame};
use crate::error::{Error, Result};
use crate::schema::{BodyDecoder, TopicSchema};
use crate::Client;

#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// Partitions to read; `None`: all of the topic's.
    pub partitions: Option<Vec<u32>>,
    pub start: StartAt,
    pub isolation: Isolation,
    /// Bytes the broker may send ahead of what the application has taken.
    pub credit_bytes: u64,
    /// Batches the broker may send ahead of what the application has taken.
    pub credit_batches: u32,
    /// Stop at the end of each partition as it was when the subscription
    /// started, instead of tailing new data.
    pub until_end: bool,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            partitions: None,
            start: StartAt::Latest,
            isolation: Isolation::ReadUncommitted,
            credit_bytes: 8 * 1024 * 1024,
            credit_batches: 256,
            until_end: false,
        }
    }
}

impl SubscribeOptions {
    pub fn from(mut self, start: StartAt) -> Self {
        self.start = start;
        self
    }
    pub fn partitions(mut self, p: Vec<u32>) -> Self {
        self.partitions = Some(p);
        self
    }
    pub fn until_end(mut self) -> Self {
        self.until_end = true;
        self
    }
    pub fn credit(mut self, bytes: u64, batches: u32) -> Self {
        self.credit_bytes = bytes;
        self.credit_batches = batches;
        self
    }
}

/// One delivered batch.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub partition: u32,
    /// Offset of the first row of `batch`.
    pub offset: u64,
    pub batch: RecordBatch,
    /// Append time of the batch, ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// The partition's high watermark when the batch was sent.
    pub high_watermark: u64,
}

impl Delivery {
    /// The offset after this batch: where to resume.
    pub fn next_offset(&self) -> u64 {
        self.offset + self.batch.num_rows() as u64
    }
}

/// A stream of [`Delivery`] from one or more partitions of a topic. In order
/// within a partition; partitions interleave.
pub struct Subscriber {
    rx: mpsc::Receiver<Result<Delivery>>,
    schema: Option<SchemaRef>,
    _tasks: JoinSet<()>,
}

impl Subscriber {
    /// The topic's schema when the subscription started (`None`: the topic
    /// has no schema yet).
    pub fn schema(&self) -> Option<SchemaRef> {
        self.schema.clone()
    }
}

impl Stream for Subscriber {
    type Item = Result<Delivery>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

pub(crate) async fn subscribe(
    client: &Client,
    topic: &str,
    opts: SubscribeOptions,
) -> Result<Subscriber> {
    if opts.credit_bytes == 0
        || opts.credit_batches == 0
        || opts.credit_bytes > MAX_CREDIT_BYTES_PER_SUBSCRIPTION
        || opts.credit_batches > MAX_CREDIT_BATCHES_PER_SUBSCRIPTION
    {
        return Err(Error::Config(format!(
            "credit of {} bytes / {} batches: use 1..={MAX_CREDIT_BYTES_PER_SUBSCRIPTION} bytes and 1..={MAX_CREDIT_BATCHES_PER_SUBSCRIPTION} batches",
            opts.credit_bytes, opts.credit_batches
        )));
    }
    let state = client.topic_state(topic, None).await?;
    let partitions = match &opts.partitions {
        Some(p) => p.clone(),
        None => (0..state.partitions).collect(),
    };
    let (tx, rx) = mpsc::channel(partitions.len().max(2));
    let mut tasks = JoinSet::new();
    for p in partitions {
        let (client, topic, opts, tx) =
            (client.clone(), topic.to_owned(), opts.clone(), tx.clone());
        tasks.spawn(async move {
            if let Err(e) = run_partition(&client, &topic, p, &opts, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
    }
    Ok(Subscriber {
        rx,
        schema: state.schema.as_ref().map(|s| s.schema.clone()),
        _tasks: tasks,
    })
}

/// How long a partition's subscription keeps trying to reach a leader
/// without delivering anything before it reports the error.
const RESUBSCRIBE_BUDGET: std::time::Duration = std::time::Duration::from_secs(30);

/// Where a partition's subscription stands across re-subscriptions.
#[derive(Default)]
struct Progress {
    /// Offset after the last delivered row.
    next: Option<u64>,
    /// With `until_end`: the high watermark at the first subscription.
    end: Option<u64>,
}

/// Follow one partition, re-subscribing at the new leader from the next
/// undelivered offset when the leader changes or its node goes away.
async fn run_partition(
    client: &Client,
    topic: &str,
    partition: u32,
    opts: &SubscribeOptions,
    tx: &mpsc::Sender<Result<Delivery>>,
) -> Result<()> {
    let mut progress = Progress::default();
    let mut backoff = std::time::Duration::from_millis(25);
    let mut budget_from = tokio::time::Instant::now();
    loop {
        let before = progress.next;
        let err = match run_partition_once(client, topic, partition, opts, tx, &mut progress).await
        {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let hint = match &err {
            Error::Broker {
                code, leader_hint, ..
            } if *code == arrowbus_wire::ErrorCode::NotLeader.as_u16() => *leader_hint,
            Error::Broker { code, .. }
                if *code == arrowbus_wire::ErrorCode::ShuttingDown.as_u16() =>
            {
                None
            }
            Error::Transport(_) | Error::Connect { .. } => None,
            _ => return Err(err),
        };
        if progress.next != before {
            budget_from = tokio::time::Instant::now();
            backoff = std::time::Duration::from_millis(25);
        }
        if budget_from.elapsed() > RESUBSCRIBE_BUDGET {
            return Err(err);
        }
        client.note_leader(topic, partition, hint);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_millis(500));
    }
}

async fn run_partition_once(
    client: &Client,
    topic: &str,
    partition: u32,
    opts: &SubscribeOptions,
    tx: &mpsc::Sender<Result<Delivery>>,
    progress: &mut Progress,
) -> Result<()> {
    let (_, connection) = client.partition_connection(topic, partition).await?;
    let (mut send, mut recv) = connection.open_bi().await.map_err(transport)?;
    let credit = Credit {
        bytes: opts.credit_bytes,
        batches: opts.credit_batches,
    };
    let sub = ClientMessage::Subscribe(Subscribe {
        topic: topic.to_owned(),
        partition,
        start: progress.next.map_or(opts.start, StartAt::Offset),
        isolation: opts.isolation,
        credit,
    });
    write_frame(&mut send, &sub, &[]).await?;
    let subscribed = match read_frame::<ServerMessage>(&mut recv).await? {
        Some(f) => match f.msg {
            ServerMessage::Subscribed(s) => s,
            ServerMessage::Error(e) => return Err(Error::from_reply(&e)),
            other => return Err(crate::admin::unexpected(other)),
        },
        None => {
            return Err(Error::Protocol(
                "broker closed the subscription before answering".into(),
            ))
        }
    };
    let end = *progress.end.get_or_insert(subscribed.high_watermark);
    if opts.until_end && subscribed.start_offset >= end {
        let _ = send.finish();
        return Ok(());
    }
    let mut schema = if subscribed.schema_id != 0 {
        Some(TopicSchema::from_ipc(
            subscribed.schema_id,
            subscribed.schema_ipc,
        )?)
    } else {
        None
    };
    let mut decoder = match &schema {
        Some(s) => Some(BodyDecoder::new(s)?),
        None => None,
    };
    let mut returned = Credit::default();
    loop {
        let frame = match read_frame::<ServerMessage>(&mut recv).await? {
            Some(f) => f,
            None => return Err(Error::Transport("the broker ended the subscription".into())),
        };
        let delivery = match frame.msg {
            ServerMessage::Batch(d) => d,
            ServerMessage::Error(e) => return Err(Error::from_reply(&e)),
            other => return Err(crate::admin::unexpected(other)),
        };
        let record = Bytes::from(frame.body);
        let record_len = record.len() as u64;
        let header = BatchHeader::decode(&record)
            .map_err(|e| Error::Protocol(format!("delivered batch: {e}")))?;
        let body = record.slice(BATCH_HEADER_BYTES..);
        header.verify_body(&body).map_err(|e| {
            Error::Protocol(format!(
                "delivered batch at offset {}: {e}",
                header.base_offset
            ))
        })?;
        if schema.as_ref().map(|s| s.id) != Some(header.schema_id) {
            let state = client.refresh_topic(topic).await?;
            let s = state
                .schema
                .clone()
                .filter(|s| s.id == header.schema_id)
                .ok_or_else(|| {
                    Error::Protocol(format!(
                        "batch uses schema id {} the topic does not have",
                        header.schema_id
                    ))
                })?;
            decoder = Some(BodyDecoder::new(&s)?);
            schema = Some(TopicSchema::clone(&s));
        }
        let Some(dec) = decoder.as_mut() else {
            return Err(Error::Protocol("no decoder for the topic schema".into()));
        };
        let mut batch = dec.decode(body)?;
        let skip = (delivery.skip_rows as usize).min(batch.num_rows());
        if skip > 0 {
            batch = batch.slice(skip, batch.num_rows() - skip);
        }
        let next_offset = header.next_offset();
        let d = Delivery {
            partition,
            offset: header.base_offset + skip as u64,
            batch,
            timestamp_ms: header.timestamp_ms,
            high_watermark: delivery.high_watermark,
        };
        if tx.send(Ok(d)).await.is_err() {
            return Ok(()); // the application dropped the subscriber
        }
        progress.next = Some(next_offset);
        if opts.until_end && next_offset >= end {
            let _ = send.finish();
            return Ok(());
        }
        // The application has taken the batch: return its credit, in chunks
        // of half the window to keep Credit frames rare.
        returned.bytes += record_len;
        returned.batches += 1;
        if returned.batches >= credit.batches.div_ceil(2)
            || returned.bytes >= credit.bytes.div_ceil(2)
        {
            write_frame(&mut send, &ClientMessage::Credit(returned), &[]).await?;
            returned = Credit::default();
        }
    }
}

impl Client {
    /// Subscribe to a topic. See [`SubscribeOptions`] for where to start and
    /// how much the broker may send ahead.
    pub async fn subscribe(&self, topic: &str, opts: SubscribeOptions) -> Result<Subscriber> {
        subscribe(self, topic, opts).await
    }
}
