//! Published batches come back from a subscription bit-for-bit, at the
//! offsets their acks named, from every kind of start position; schema rules
//! and request errors are enforced with stable codes.

use std::sync::Arc;

use arrow_array::{Array, Int64Array, LargeStringArray, RecordBatch, StringViewArray};
use arrow_schema::{DataType, Field, Schema};
use arrowbus::{ErrorCode, NewTopic, StartAt, SubscribeOptions};
use arrowbus_tests::{read_all, seqs, ticks, Busd};
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread")]
async fn published_batches_are_delivered_at_their_acked_offsets() {
    let busd = Busd::start();
    let client = busd.client().await;
    client
        .admin()
        .create_topic(NewTopic::new("ticks").partitions(3))
        .await
        .unwrap();
    let producer = client.producer();
    let mut acks = Vec::new();
    for i in 0..12 {
        let b = ticks(i * 10, 10);
        acks.push((producer.publish("ticks", &b).await.unwrap(), b));
    }
    // Round robin over 3 partitions, offsets count rows.
    for (i, (ack, _)) in acks.iter().enumerate() {
        assert_eq!(ack.partition, (i % 3) as u32);
        assert_eq!(ack.base_offset, (i / 3) as u64 * 10);
        assert_eq!(ack.rows, 10);
    }
    let got = read_all(
        &client,
        "ticks",
        SubscribeOptions::default().from(StartAt::Earliest),
    )
    .await;
    assert_eq!(got.len(), 12);
    for d in &got {
        let (ack, sent) = acks
            .iter()
            .find(|(a, _)| a.partition == d.partition && a.base_offset == d.offset)
            .unwrap_or_else(|| {
                panic!(
                    "delivery at p{} offset {} was never acked",
                    d.partition, d.offset
                )
            });
        assert_eq!(&d.batch, sent);
        assert_eq!(d.timestamp_ms, ack.timestamp_ms);
    }

    let info = client.admin().describe_topic("ticks").await.unwrap();
    assert_eq!(info.partitions.len(), 3);
    for p in &info.partitions {
        assert_eq!((p.earliest_offset, p.latest_offset), (0, 40));
        // Four data batches, plus the Raft group's own entries.
        assert!((4..=7).contains(&p.batches), "{p:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn start_positions_offset_latest_and_timestamp() {
    let busd = Busd::start();
    let client = busd.client().await;
    client
        .admin()
        .create_topic(NewTopic::new("t"))
        .await
        .unwrap();
    let producer = client.producer();
    let mut acks = Vec::new();
    for i in 0..5 {
        acks.push(producer.publish("t", &ticks(i * 100, 100)).await.unwrap());
        // Distinct append times, so a timestamp start is unambiguous.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    // An offset inside the third batch: that batch is sliced.
    let got = read_all(
        &client,
        "t",
        SubscribeOptions::default().from(StartAt::Offset(250)),
    )
    .await;
    let rows: Vec<i64> = got.iter().flat_map(|d| seqs(&d.batch)).collect();
    assert_eq!(rows, (250..500).collect::<Vec<_>>());
    assert_eq!(got[0].offset, 250);
    assert_eq!(got[0].batch.num_rows(), 50);

    // At a batch boundary: no slicing.
    let got = read_all(
        &client,
        "t",
        SubscribeOptions::default().from(StartAt::Offset(300)),
    )
    .await;
    assert_eq!(
        got.iter().map(|d| d.offset).collect::<Vec<_>>(),
        vec![300, 400]
    );

    // By timestamp: the fourth batch and later.
    let got = read_all(
        &client,
        "t",
        SubscribeOptions::default().from(StartAt::Timestamp(acks[3].timestamp_ms)),
    )
    .await;
    assert_eq!(got.first().map(|d| d.offset), Some(300));

    // Latest with until_end: nothing. Latest tailing: only what comes next.
    assert!(read_all(
        &client,
        "t",
        SubscribeOptions::default().from(StartAt::Latest)
    )
    .await
    .is_empty());
    let mut tail = client
        .subscribe("t", SubscribeOptions::default().from(StartAt::Latest))
        .await
        .unwrap();
    // The subscription is set up once its stream answers; give it a moment
    // to reach the broker before publishing.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    producer.publish("t", &ticks(500, 7)).await.unwrap();
    let d = tail.next().await.unwrap().unwrap();
    assert_eq!((d.offset, seqs(&d.batch)), (500, (500..507).collect()));

    // Beyond the end, or a partition that does not exist: clear codes.
    let mut sub = client
        .subscribe(
            "t",
            SubscribeOptions::default().from(StartAt::Offset(10_000)),
        )
        .await
        .unwrap();
    let e = sub.next().await.unwrap().unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::OffsetOutOfRange), "{e}");
    let mut sub = client
        .subscribe("t", SubscribeOptions::default().partitions(vec![7]))
        .await
        .unwrap();
    let e = sub.next().await.unwrap().unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PartitionNotFound), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn topic_schema_is_fixed_by_first_publish_and_enforced() {
    let busd = Busd::start();
    let client = busd.client().await;
    client
        .admin()
        .create_topic(NewTopic::new("typed"))
        .await
        .unwrap();
    let info = client.admin().describe_topic("typed").await.unwrap();
    assert_eq!(info.schema_id, 0);

    let producer = client.producer();
    producer.publish("typed", &ticks(0, 3)).await.unwrap();
    let info = client.admin().describe_topic("typed").await.unwrap();
    assert_eq!(info.schema_id, 1);

    // Same values with string_view / large_string symbols: cast, accepted, and
    // read back as the topic's Utf8.
    let base = ticks(3, 2);
    for symbol in [
        Arc::new(StringViewArray::from(vec!["AAPL", "MSFT"])) as Arc<dyn Array>,
        Arc::new(LargeStringArray::from(vec!["AAPL", "MSFT"])),
    ] {
        let mut fields: Vec<Field> = base
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields[1] = Field::new("symbol", symbol.data_type().clone(), false);
        let mut cols = base.columns().to_vec();
        cols[1] = symbol;
        let b = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
        producer.publish("typed", &b).await.unwrap();
    }

    // A different type is refused, naming the field.
    let wrong = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(
            "price",
            DataType::Int64,
            false,
        )])),
        vec![Arc::new(Int64Array::from(vec![1]))],
    )
    .unwrap();
    let e = producer.publish("typed", &wrong).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::SchemaMismatch));
    let text = e.to_string();
    assert!(
        text.contains("'price'") && text.contains("Float64") && text.contains("Int64"),
        "{text}"
    );
    assert!(
        text.contains("'symbol'"),
        "missing fields are named too: {text}"
    );

    let got = read_all(
        &client,
        "typed",
        SubscribeOptions::default().from(StartAt::Earliest),
    )
    .await;
    let rows: Vec<i64> = got.iter().flat_map(|d| seqs(&d.batch)).collect();
    assert_eq!(rows, vec![0, 1, 2, 3, 4, 3, 4]);
    assert!(got
        .iter()
        .all(|d| d.batch.schema().field(1).data_type() == &DataType::Utf8));
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_errors_have_stable_codes() {
    let busd = Busd::start();
    let client = busd.client().await;
    let admin = client.admin();
    fn code<T>(r: arrowbus::Result<T>) -> Option<ErrorCode> {
        r.map(|_| ()).unwrap_err().code()
    }
    assert_eq!(
        code(admin.describe_topic("nope").await),
        Some(ErrorCode::TopicNotFound)
    );
    assert_eq!(
        code(admin.create_topic(NewTopic::new("bad/name")).await),
        Some(ErrorCode::InvalidTopicName)
    );
    assert_eq!(
        code(admin.create_topic(NewTopic::new("p0").partitions(0)).await),
        Some(ErrorCode::TooManyPartitions)
    );
    assert_eq!(
        code(
            admin
                .create_topic(NewTopic::new("p").partitions(5000))
                .await
        ),
        Some(ErrorCode::TooManyPartitions)
    );
    admin.create_topic(NewTopic::new("dup")).await.unwrap();
    assert_eq!(
        code(admin.create_topic(NewTopic::new("dup")).await),
        Some(ErrorCode::TopicAlreadyExists)
    );
    assert_eq!(
        code(client.producer().publish("nope", &ticks(0, 1)).await),
        Some(ErrorCode::TopicNotFound)
    );
    assert_eq!(
        code(client.producer().publish_to("dup", 3, &ticks(0, 1)).await),
        Some(ErrorCode::PartitionNotFound)
    );

    let names: Vec<String> = admin
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["dup".to_string()]);
    admin.delete_topic("dup").await.unwrap();
    assert!(admin.list_topics().await.unwrap().is_empty());
    assert_eq!(
        code(admin.delete_topic("dup").await),
        Some(ErrorCode::TopicNotFound)
    );
    // A deleted name can be used again, empty.
    admin.create_topic(NewTopic::new("dup")).await.unwrap();
    assert_eq!(
        admin.describe_topic("dup").await.unwrap().partitions[0].latest_offset,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_and_data_survive_a_graceful_restart() {
    let mut busd = Busd::start();
    {
        let client = busd.client().await;
        client
            .admin()
            .create_topic(NewTopic::new("keep").partitions(2))
            .await
            .unwrap();
        let p = client.producer();
        for i in 0..6 {
            p.publish("keep", &ticks(i * 5, 5)).await.unwrap();
        }
    }
    assert_eq!(
        busd.terminate(),
        Some(0),
        "SIGTERM must exit cleanly; log:\n{}",
        busd.log()
    );
    busd.restart();
    let client = busd.client().await;
    let got = read_all(
        &client,
        "keep",
        SubscribeOptions::default().from(StartAt::Earliest),
    )
    .await;
    let mut rows: Vec<i64> = got.iter().flat_map(|d| seqs(&d.batch)).collect();
    rows.sort();
    assert_eq!(rows, (0..30).collect::<Vec<_>>());
    let info = client.admin().describe_topic("keep").await.unwrap();
    assert_eq!(info.schema_id, 1);
}
