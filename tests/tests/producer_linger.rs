//! A producer with linger coalesces small batches of one partition into
//! fewer stored batches, keeps their order, and gives every caller the ack
//! of its own rows; `flush` sends what lingers at once; a member that cannot
//! be stored fails alone.

use std::sync::Arc;
use std::time::Duration;

use arrow_array::{BinaryArray, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use arrowbus::{ErrorCode, NewTopic, ProducerConfig, StartAt, SubscribeOptions};
use arrowbus_tests::{read_all, read_seqs, seqs, ticks, Busd};
use futures::FutureExt;

fn lingering(linger: Duration) -> ProducerConfig {
    ProducerConfig {
        linger: Some(linger),
        ..ProducerConfig::default()
    }
}

/// Send `n` 1-row batches to partition 0 without waiting, then await every
/// ack; returns the acks in send order.
async fn send_rows(producer: &arrowbus::Producer, topic: &str, n: i64) -> Vec<arrowbus::Ack> {
    let mut pending = Vec::new();
    for i in 0..n {
        pending.push(producer.send(topic, Some(0), &ticks(i, 1)).await.unwrap());
    }
    let mut acks = Vec::new();
    for p in pending {
        acks.push(p.await.unwrap());
    }
    acks
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_linger_coalesces_what_queues_behind_a_full_window() {
    let busd = Busd::start();
    let client = busd.client().await;
    client
        .admin()
        .create_topic(NewTopic::new("t").partitions(2))
        .await
        .unwrap();
    let producer = client.producer_with(lingering(Duration::ZERO));
    let n = 500;
    let acks = send_rows(&producer, "t", n).await;
    // Every caller gets its own row's place, in send order.
    for (i, a) in acks.iter().enumerate() {
        assert_eq!(
            (a.partition, a.base_offset, a.rows),
            (0, i as u64, 1),
            "ack {i}"
        );
    }
    let got = read_all(
        &client,
        "t",
        SubscribeOptions::default().from(StartAt::Earliest),
    )
    .await;
    let rows: Vec<i64> = got.iter().flat_map(|d| seqs(&d.batch)).collect();
    assert_eq!(rows, (0..n).collect::<Vec<_>>());
    // 500 sends behind a window of 5 batches: most waited in the queue and
    // went out together.
    assert!(
        got.len() < n as usize / 2,
        "{} stored batches for {n} one-row sends",
        got.len()
    );
    // Each delivered batch's offset is its first row's ack.
    for d in &got {
        let first = seqs(&d.batch)[0] as usize;
        assert_eq!(d.offset, acks[first].base_offset);
        assert_eq!(d.timestamp_ms, acks[first].timestamp_ms);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn flush_sends_what_lingers_and_waits_for_its_acks() {
    let busd = Busd::start();
    let client = busd.client().await;
    client
        .admin()
        .create_topic(NewTopic::new("t"))
        .await
        .unwrap();
    // A linger no test waits out: only flush can send these.
    let producer = client.producer_with(lingering(Duration::from_secs(600)));
    let mut pending = Vec::new();
    for i in 0..20 {
        pending.push(producer.send("t", None, &ticks(i * 3, 3)).await.unwrap());
    }
    producer.flush().await;
    for (i, p) in pending.into_iter().enumerate() {
        let ack = p
            .now_or_never()
            .unwrap_or_else(|| panic!("ack {i} still pending after flush"))
            .unwrap();
        assert_eq!((ack.base_offset, ack.rows), (i as u64 * 3, 3));
    }
    let got = read_all(
        &client,
        "t",
        SubscribeOptions::default().from(StartAt::Earliest),
    )
    .await;
    assert_eq!(got.len(), 1, "20 sends within one linger: one stored batch");
    assert_eq!(seqs(&got[0].batch), (0..60).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_over_the_batch_limit_fails_alone() {
    let busd = Busd::start();
    let client = busd.client().await;
    let schema = Arc::new(Schema::new(vec![
        Field::new("seq", DataType::Int64, false),
        Field::new("blob", DataType::Binary, false),
    ]));
    client
        .admin()
        .create_topic(NewTopic::new("b").schema(schema.as_ref().clone()))
        .await
        .unwrap();
    let batch = |seq: i64, blob_bytes: usize| {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![seq])),
                Arc::new(BinaryArray::from(vec![vec![7u8; blob_bytes].as_slice()])),
            ],
        )
        .unwrap()
    };
    // linger_bytes at its maximum, so the small ones and the huge one are
    // considered together; the huge one (17 MiB) is over the broker's limit.
    let producer = client.producer_with(ProducerConfig {
        linger: Some(Duration::from_millis(200)),
        linger_bytes: arrowbus::LINGER_BYTES_MAX,
        ..ProducerConfig::default()
    });
    let small_before = producer.send("b", None, &batch(0, 10)).await.unwrap();
    let huge = producer
        .send("b", None, &batch(1, 17 * 1024 * 1024))
        .await
        .unwrap();
    let small_after = producer.send("b", None, &batch(2, 10)).await.unwrap();
    let a0 = small_before.await.unwrap();
    let err = huge.await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BatchTooLarge), "{err}");
    let a2 = small_after.await.unwrap();
    assert_eq!((a0.base_offset, a2.base_offset), (0, 1));
    let got = read_all(
        &client,
        "b",
        SubscribeOptions::default().from(StartAt::Earliest),
    )
    .await;
    let stored: Vec<i64> = got
        .iter()
        .flat_map(|d| {
            let c = d
                .batch
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            c.values().to_vec()
        })
        .collect();
    assert_eq!(stored, vec![0, 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn send_split_with_linger_slices_before_queueing() {
    let busd = Busd::start();
    let client = busd.client().await;
    client
        .admin()
        .create_topic(NewTopic::new("s"))
        .await
        .unwrap();
    let producer = client.producer_with(lingering(Duration::ZERO));
    // ~38 MB of Arrow memory, over two batch limits: with linger, `send`
    // would only learn BatchTooLarge from the ack.
    let rows = 1_000_000;
    let big = ticks(0, rows);
    let pending = producer.send_split("s", Some(0), &big).await.unwrap();
    assert!(pending.len() >= 3, "{} pieces", pending.len());
    let mut next = 0u64;
    for p in pending {
        let ack = p.await.unwrap();
        assert_eq!(ack.base_offset, next);
        next += u64::from(ack.rows);
    }
    assert_eq!(next, rows as u64);
    assert_eq!(
        read_seqs(&client, "s").await,
        (0..rows as i64).collect::<Vec<_>>()
    );
}
