//! `busctl produce`: stream a file's batches to a topic. The file is read on
//! a blocking thread a few batches ahead; publishes are pipelined, with a
//! bounded queue of pending acks, so memory stays at a few batches whatever
//! the file size.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arrow_array::RecordBatch;
use arrowbus::{Ack, Client, PendingAck};
use serde_json::json;

use crate::cli::{Output, ProduceArgs};
use crate::format::{self, BatchFile};
use crate::output::{human_bytes, print_json};
use crate::topics::topic_schema;

/// Publishes awaiting their ack before `produce` waits for the oldest. The
/// producer's own window (5 batches per partition) is the real flow control;
/// this bounds the acks we hold across all partitions of a topic.
const MAX_PENDING_ACKS: usize = 16;

/// How often the progress line on a terminal is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// Offsets written to one partition.
#[derive(Debug, Clone, Copy)]
struct Written {
    first: u64,
    /// One past the last offset written.
    end: u64,
    rows: u64,
}

#[derive(Debug, Default)]
struct Tally {
    rows: u64,
    batches: u64,
    partitions: BTreeMap<u32, Written>,
}

impl Tally {
    fn record(&mut self, ack: Ack) {
        let rows = u64::from(ack.rows);
        self.rows += rows;
        self.batches += 1;
        if rows == 0 {
            return; // an empty batch occupies no offsets
        }
        let end = ack.base_offset + rows;
        self.partitions
            .entry(ack.partition)
            .and_modify(|w| {
                w.first = w.first.min(ack.base_offset);
                w.end = w.end.max(end);
                w.rows += rows;
            })
            .or_insert(Written {
                first: ack.base_offset,
                end,
                rows,
            });
    }
}

/// A one-line progress report on stderr, redrawn in place; only when stderr
/// is a terminal, so scripts and logs never see it.
struct Progress {
    enabled: bool,
    /// Size of the file, for the percentage.
    total_bytes: u64,
    start: Instant,
    last: Instant,
}

impl Progress {
    fn new(total_bytes: u64) -> Self {
        let now = Instant::now();
        Self {
            enabled: std::io::stderr().is_terminal(),
            total_bytes,
            start: now,
            last: now,
        }
    }

    fn tick(&mut self, rows: u64, bytes: u64) {
        if !self.enabled || self.last.elapsed() < PROGRESS_INTERVAL {
            return;
        }
        self.last = Instant::now();
        let mb = bytes as f64 / 1e6;
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let pct = (bytes as f64 * 100.0 / self.total_bytes.max(1) as f64).min(100.0);
        eprint!(
            "\r\x1b[K{rows} rows, {mb:.1} MB ({pct:.0}%), {:.1} MB/s",
            mb / secs
        );
    }

    fn clear(&self) {
        if self.enabled {
            eprint!("\r\x1b[K");
        }
    }
}

pub async fn run(client: &Client, args: ProduceArgs, out: Output) -> Result<()> {
    let topic = args.name.as_str();
    // Fail on an unknown topic before reading anything.
    let info = client.admin().describe_topic(topic).await?;
    if let Some(p) = args.partition {
        let n = info.partitions.len();
        if p as usize >= n {
            anyhow::bail!("topic '{topic}' has partitions 0..{n}; partition {p} does not exist");
        }
    }
    let path = args.file.clone();
    let (p2, fmt) = (path.clone(), args.format);
    let file = tokio::task::spawn_blocking(move || BatchFile::open(&p2, fmt)).await??;
    let file_schema = file.schema.clone();
    let mut progress = Progress::new(file.len);
    let bytes_read = file.bytes_read.clone();
    let (mut rx, reader) = format::spawn_batches(file, path.clone());

    let producer = client.producer();
    // Each pending ack with the index and row count of the file batch it came from.
    let mut pending: VecDeque<(u64, usize, PendingAck)> = VecDeque::with_capacity(MAX_PENDING_ACKS);
    let mut tally = Tally::default();
    let (mut rows_sent, mut batches_read) = (0u64, 0u64);
    let result: Result<()> = async {
        while let Some(item) = rx.recv().await {
            let batch = item?;
            let acks = producer
                .send_split(topic, args.partition, &batch)
                .await
                .with_context(|| {
                    format!(
                        "batch {batches_read} ({} rows) of {} was not stored",
                        batch.num_rows(),
                        path.display()
                    )
                })?;
            for ack in acks {
                if pending.len() >= MAX_PENDING_ACKS {
                    if let Some(oldest) = pending.pop_front() {
                        tally.record(settle(oldest, &path).await?);
                    }
                }
                pending.push_back((batches_read, batch.num_rows(), ack));
            }
            batches_read += 1;
            rows_sent += batch.num_rows() as u64;
            progress.tick(rows_sent, bytes_read.load(Ordering::Relaxed));
        }
        while let Some(p) = pending.pop_front() {
            tally.record(settle(p, &path).await?);
        }
        Ok(())
    }
    .await;
    progress.clear();
    drop(rx); // stops the reader thread if we bailed out early
    reader.await.context("the file reader thread failed")?;
    result?;

    // A file with a schema but no batches: give a topic without a schema the
    // file's, by publishing one empty batch (the producer sets the schema
    // when the topic has none; the batch occupies no offsets).
    let mut schema_set = false;
    if batches_read == 0 && topic_schema(&info)?.is_none() {
        let empty = RecordBatch::new_empty(file_schema);
        let ack = producer
            .publish_to(topic, args.partition.unwrap_or(0), &empty)
            .await
            .context("setting the topic schema from the file")?;
        tally.record(ack);
        schema_set = true;
    }
    client.close().await;

    if out == Output::Json {
        let parts: Vec<_> = tally
            .partitions
            .iter()
            .map(|(p, w)| json!({"partition": p, "first_offset": w.first, "last_offset": w.end - 1, "rows": w.rows}))
            .collect();
        return print_json(&json!({
            "rows": tally.rows,
            "batches": tally.batches,
            "file_batches": batches_read,
            "schema_set": schema_set,
            "partitions": parts,
        }));
    }
    let secs = progress.start.elapsed().as_secs_f64();
    println!(
        "produced {} rows in {} batches to '{topic}' from {} ({}, {secs:.2} s)",
        tally.rows,
        tally.batches,
        path.display(),
        human_bytes(bytes_read.load(Ordering::Relaxed)),
    );
    if schema_set {
        println!("the file has no batches; it set the topic schema");
    }
    for (p, w) in &tally.partitions {
        println!(
            "  partition {p}: offsets {}..={} ({} rows)",
            w.first,
            w.end - 1,
            w.rows
        );
    }
    Ok(())
}

/// Await one publish; a refusal names the file batch it came from.
async fn settle((index, rows, ack): (u64, usize, PendingAck), path: &Path) -> Result<Ack> {
    ack.await.with_context(|| {
        format!(
            "batch {index} ({rows} rows) of {} was not stored",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(partition: u32, base_offset: u64, rows: u32) -> Ack {
        Ack {
            partition,
            base_offset,
            rows,
            timestamp_ms: 0,
        }
    }

    #[test]
    fn tally_keeps_offset_ranges_per_partition() {
        let mut t = Tally::default();
        t.record(ack(0, 0, 10));
        t.record(ack(1, 5, 3));
        t.record(ack(0, 10, 0));
        t.record(ack(0, 10, 5));
        assert_eq!((t.rows, t.batches), (18, 4));
        let w = t.partitions[&0];
        assert_eq!((w.first, w.end, w.rows), (0, 15, 15));
        let w = t.partitions[&1];
        assert_eq!((w.first, w.end, w.rows), (5, 8, 3));
    }
}
