//! The Rust side of the Python-vs-Rust benchmark (`bench/python/pybench.py`):
//! publish the batches of an Arrow IPC file exactly as the Python benchmark
//! does (pipelined `send`, a bounded number of acks outstanding), or read a
//! topic to its end, and print the elapsed time as one JSON line.
//!
//! ```sh
//! cargo run --release -p arrowbus-client --example bench_ipc -- publish FILE TOPIC [MAX_PENDING] [REPEAT]
//! cargo run --release -p arrowbus-client --example bench_ipc -- subscribe TOPIC
//! ```
//! Connects with the profile `busd dev` wrote (or `ARROWBUS_BROKER`/`ARROWBUS_CA`).

use std::collections::VecDeque;
use std::fs::File;
use std::time::Instant;

use anyhow::{bail, Context};
use arrow_array::RecordBatch;
use arrowbus::{Client, StartAt, SubscribeOptions};
use futures::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let client = Client::connect_default().await?;
    match args.first().map(String::as_str) {
        Some("publish") if args.len() >= 3 => {
            let max_pending: usize = match args.get(3) {
                Some(s) => s.parse().context("MAX_PENDING")?,
                None => 64,
            };
            // The file's batches are sent this many times over (a small
            // file stands for a long stream of the same frames).
            let repeat: usize = match args.get(4) {
                Some(s) => s.parse().context("REPEAT")?,
                None => 1,
            };
            // Loaded before the clock starts, as the Python side does.
            let reader = arrow_ipc::reader::FileReader::try_new(
                File::open(&args[1]).with_context(|| args[1].clone())?,
                None,
            )?;
            let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>()?;
            let producer = client.producer();
            let start = Instant::now();
            let mut pending = VecDeque::new();
            let mut rows = 0u64;
            for b in std::iter::repeat_n(&batches, repeat).flatten() {
                pending.push_back(producer.send(&args[2], None, b).await?);
                while pending.len() > max_pending {
                    if let Some(p) = pending.pop_front() {
                        rows += u64::from(p.await?.rows);
                    }
                }
            }
            while let Some(p) = pending.pop_front() {
                rows += u64::from(p.await?.rows);
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{{\"batches\": {}, \"rows\": {rows}, \"seconds\": {secs}}}",
                batches.len() * repeat
            );
        }
        Some("subscribe") if args.len() >= 2 => {
            let start = Instant::now();
            let mut sub = client
                .subscribe(
                    &args[1],
                    SubscribeOptions::default()
                        .from(StartAt::Earliest)
                        .until_end(),
                )
                .await?;
            let (mut batches, mut rows) = (0u64, 0u64);
            while let Some(d) = sub.next().await {
                let d = d?;
                batches += 1;
                rows += d.batch.num_rows() as u64;
            }
            let secs = start.elapsed().as_secs_f64();
            println!("{{\"batches\": {batches}, \"rows\": {rows}, \"seconds\": {secs}}}");
        }
        _ => bail!("usage: bench_ipc publish FILE TOPIC [MAX_PENDING] [REPEAT] | bench_ipc subscribe TOPIC"),
    }
    client.close().await;
    Ok(())
}
