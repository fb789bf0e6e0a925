//! Read a topic from the beginning to its current end and print each batch.
//!
//! `cargo run -p arrowbus-client --example subscribe -- ticks`
//! (add `--follow` to keep tailing new batches)

use arrowbus::{Client, StartAt, SubscribeOptions};
use futures::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let topic = std::env::args().nth(1).unwrap_or_else(|| "ticks".into());
    let follow = std::env::args().any(|a| a == "--follow");
    let client = Client::connect_default().await?;

    let mut opts = SubscribeOptions::default().from(StartAt::Earliest);
    if !follow {
        opts = opts.until_end();
    }
    let mut sub = client.subscribe(&topic, opts).await?;
    while let Some(delivery) = sub.next().await {
        let d = delivery?;
        println!(
            "partition {} offsets {}..{} ({} rows, appended at {} ms)",
            d.partition,
            d.offset,
            d.next_offset(),
            d.batch.num_rows(),
            d.timestamp_ms
        );
    }
    Ok(())
}
