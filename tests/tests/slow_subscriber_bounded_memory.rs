//! A subscriber that reads slowly while more than 2 GB flow through its
//! topic costs the broker its credit, not the backlog: busd's peak RSS stays
//! far below the data that piled up. (The real figure is measured by
//! `busbench backlog`; this test asserts a generous bound.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrowbus::{NewTopic, StartAt, SubscribeOptions};
use arrowbus_tests::{ticks, Busd};
use futures::StreamExt;

/// Data pushed through the topic.
const TOTAL_BYTES: u64 = 2200 * 1024 * 1024;
/// Bound asserted on busd's peak RSS: the backlog is ~10x larger.
const RSS_BOUND_KIB: u64 = 300 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn slow_subscriber_keeps_broker_memory_bounded() {
    let busd = Busd::start();
    let client = busd.client().await;
    client
        .admin()
        .create_topic(NewTopic::new("flood"))
        .await
        .unwrap();
    // ~1 MiB per batch.
    let batch = ticks(0, 26_000);
    let producer = client.producer();
    let first = producer.publish("flood", &batch).await.unwrap();
    let info = client.admin().describe_topic("flood").await.unwrap();
    let batch_bytes = info.partitions[0].bytes;
    assert!(batch_bytes > 900_000, "batch is {batch_bytes} bytes");

    // The slow reader: 4 MiB / 4 batches of credit, 50 ms per batch.
    let delivered = Arc::new(AtomicU64::new(0));
    let reader = {
        let delivered = delivered.clone();
        let client = busd.client().await;
        tokio::spawn(async move {
            let mut sub = client
                .subscribe(
                    "flood",
                    SubscribeOptions::default()
                        .from(StartAt::Offset(first.base_offset))
                        .credit(4 << 20, 4),
                )
                .await
                .unwrap();
            let mut next = first.base_offset;
            while let Some(d) = sub.next().await {
                let d = d.unwrap();
                assert_eq!(d.offset, next, "out of order or lost");
                next = d.next_offset();
                delivered.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let total_batches = TOTAL_BYTES / batch_bytes;
    let mut pending = std::collections::VecDeque::new();
    let mut peak_rss = 0;
    for i in 0..total_batches {
        pending.push_back(producer.send("flood", Some(0), &batch).await.unwrap());
        if pending.len() >= 5 {
            pending.pop_front().unwrap().await.unwrap();
        }
        if i % 64 == 0 {
            peak_rss = peak_rss.max(busd.rss_kib().0);
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    let (rss, hwm) = busd.rss_kib();
    peak_rss = peak_rss.max(rss).max(hwm);
    let taken = delivered.load(Ordering::Relaxed);
    let info = client.admin().describe_topic("flood").await.unwrap();
    let stored = info.partitions[0].bytes;
    println!(
        "stored {} MiB, subscriber took {taken} of {} batches, busd peak RSS {} MiB",
        stored >> 20,
        total_batches + 1,
        peak_rss >> 10
    );
    assert!(
        stored >= 2 << 30,
        "only {stored} bytes stored; the test promises more than 2 GiB"
    );
    // The subscriber really was slow: most of the data is backlog.
    assert!(
        taken * batch_bytes < stored / 2,
        "subscriber kept up ({taken} batches): no backlog to test"
    );
    assert!(
        peak_rss < RSS_BOUND_KIB,
        "busd peak RSS {} MiB with a {} MiB backlog",
        peak_rss >> 10,
        (stored - taken * batch_bytes) >> 20
    );
    reader.abort();
}
