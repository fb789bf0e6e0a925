//! Publish a few batches of ticks to a topic, creating it if needed.
//!
//! Run against `busd dev` (which writes the client profile):
//! `cargo run -p arrowbus-client --example publish -- ticks`

use std::sync::Arc;

use arrow_array::{Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use arrowbus::{Client, ErrorCode, NewTopic};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let topic = std::env::args().nth(1).unwrap_or_else(|| "ticks".into());
    let client = Client::connect_default().await?;

    match client
        .admin()
        .create_topic(NewTopic::new(&topic).partitions(3))
        .await
    {
        Ok(_) => println!("created topic {topic}"),
        Err(e) if e.code() == Some(ErrorCode::TopicAlreadyExists) => {}
        Err(e) => return Err(e.into()),
    }

    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("symbol", DataType::Utf8, false),
        Field::new("price", DataType::Float64, false),
        Field::new("size", DataType::Int64, false),
    ]));
    let producer = client.producer();
    for i in 0..5i64 {
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(
                    TimestampMicrosecondArray::from(vec![1_700_000_000_000_000 + i; 3])
                        .with_timezone("UTC"),
                ),
                Arc::new(StringArray::from(vec!["AAPL", "MSFT", "NVDA"])),
                Arc::new(Float64Array::from(vec![189.5 + i as f64, 411.0, 875.25])),
                Arc::new(Int64Array::from(vec![100, 250, 10])),
            ],
        )?;
        // Returns once the batch is fsynced on the broker.
        let ack = producer.publish(&topic, &batch).await?;
        println!(
            "partition {} offsets {}..{}",
            ack.partition,
            ack.base_offset,
            ack.base_offset + u64::from(ack.rows)
        );
    }
    Ok(())
}
