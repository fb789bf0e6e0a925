//! Random bytes, truncated frames, oversized length prefixes and wrong
//! versions on QUIC streams: the stream gets an error frame with a stable
//! code, and the broker keeps serving everyone, this connection included.

use arrowbus::{ErrorCode, NewTopic, StartAt, SubscribeOptions};
use arrowbus_tests::{ticks, Busd};
use arrowbus_wire::codec::decode_frame;
use arrowbus_wire::{encode_frame, ClientMessage, Credit, Isolation, ServerMessage, Subscribe};
use futures::StreamExt;
use rand::{Rng, RngCore, SeedableRng};

/// Send `bytes` on a fresh stream, finish it, and return the broker's answer
/// frame (None: the broker closed or reset the stream without one).
async fn exchange(client: &arrowbus::Client, bytes: &[u8]) -> Option<ServerMessage> {
    let (mut send, mut recv) = client.open_raw_stream().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        recv.read_to_end(1 << 20),
    )
    .await
    .expect("broker neither answered nor closed the stream within 10 s")
    .ok()?;
    decode_frame::<ServerMessage>(&answer)
        .ok()
        .map(|(f, _)| f.msg)
}

fn error_code(m: Option<ServerMessage>) -> Option<ErrorCode> {
    match m {
        Some(ServerMessage::Error(e)) => ErrorCode::from_u16(e.code),
        _ => None,
    }
}

fn frame(msg: &ClientMessage) -> Vec<u8> {
    encode_frame(msg, 0).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_frames_get_error_codes_and_the_broker_keeps_serving() {
    let busd = Busd::start();
    let client = busd.client().await;
    client
        .admin()
        .create_topic(NewTopic::new("t"))
        .await
        .unwrap();
    let ack = client.producer().publish("t", &ticks(0, 10)).await.unwrap();

    let good = frame(&ClientMessage::ListTopics);

    // Wrong protocol version.
    let mut v = good.clone();
    v[2] = 42;
    assert_eq!(
        error_code(exchange(&client, &v).await),
        Some(ErrorCode::UnsupportedVersion)
    );
    // Oversized length prefixes: refused before any allocation.
    let mut v = good.clone();
    v[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        error_code(exchange(&client, &v).await),
        Some(ErrorCode::FrameTooLarge)
    );
    let mut v = good.clone();
    v[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        error_code(exchange(&client, &v).await),
        Some(ErrorCode::FrameTooLarge)
    );
    // Truncated frames: every cut of a valid request.
    for cut in 1..good.len() {
        assert_eq!(
            error_code(exchange(&client, &good[..cut]).await),
            Some(ErrorCode::MalformedFrame),
            "cut at {cut}"
        );
    }
    // Bad magic, and a control section that is not a valid message.
    assert_eq!(
        error_code(exchange(&client, b"GET / HTTP/1.1\r\n\r\n").await),
        Some(ErrorCode::MalformedFrame)
    );
    let mut v = good.clone();
    let n = v.len();
    v[16..n].fill(0xEE);
    assert_eq!(
        error_code(exchange(&client, &v).await),
        Some(ErrorCode::MalformedFrame)
    );
    // Credit outside a subscription.
    let credit = frame(&ClientMessage::Credit(Credit {
        bytes: 1,
        batches: 1,
    }));
    assert_eq!(
        error_code(exchange(&client, &credit).await),
        Some(ErrorCode::UnexpectedMessage)
    );

    // Seeded random bytes, with and without a valid frame header in front.
    let seed = arrowbus_tests::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..200 {
        let mut junk = vec![0u8; rng.random_range(0..2048)];
        rng.fill_bytes(&mut junk);
        if i % 2 == 0 && junk.len() >= 16 {
            junk[..16].copy_from_slice(&good[..16]);
        }
        // Random bytes behind a valid header can form a valid (tiny) request;
        // only junk that is not a valid frame must be answered with an error.
        let valid = decode_frame::<ClientMessage>(&junk).is_ok();
        let answer = exchange(&client, &junk).await;
        assert!(
            valid || answer.is_none() || matches!(answer, Some(ServerMessage::Error(_))),
            "junk #{i} got a non-error answer: {answer:?}"
        );
    }

    // Still serving, on this connection and on a new one; data intact.
    assert_eq!(client.admin().list_topics().await.unwrap().len(), 1);
    let other = busd.client().await;
    let mut sub = other
        .subscribe(
            "t",
            SubscribeOptions::default()
                .from(StartAt::Earliest)
                .until_end(),
        )
        .await
        .unwrap();
    let d = sub.next().await.unwrap().unwrap();
    assert_eq!((d.offset, d.batch.num_rows()), (ack.base_offset, 10));
    assert_eq!(d.batch, ticks(0, 10));
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_after_a_valid_publish_ends_only_that_stream() {
    let busd = Busd::start();
    let client = busd.client().await;
    client
        .admin()
        .create_topic(NewTopic::new("t"))
        .await
        .unwrap();
    client.producer().publish("t", &ticks(0, 1)).await.unwrap();
    // A corrupt batch body on a producer stream: refused with CorruptBatch.
    let producer = client.producer();
    let e = producer
        .send_raw("t", 0, 1, 5, bytes::Bytes::from_static(b"not arrow at all"))
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidArrowIpc), "{e}");
    // Wrong schema id: SchemaMismatch, not stored.
    let e = producer
        .send_raw("t", 0, 9, 1, bytes::Bytes::from_static(b"x"))
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::SchemaMismatch), "{e}");
    let info = client.admin().describe_topic("t").await.unwrap();
    // One row stored: the refused batches took no offsets.
    assert_eq!(info.partitions[0].latest_offset, 1);
}

/// Read one frame from a raw subscription stream, or None if nothing
/// arrives within `wait` (the broker is holding back for lack of credit).
async fn next_frame(
    recv: &mut quinn::RecvStream,
    wait: std::time::Duration,
) -> Option<ServerMessage> {
    let mut head = [0u8; 16];
    match tokio::time::timeout(wait, recv.read_exact(&mut head)).await {
        Err(_) => return None,
        Ok(r) => r.unwrap(),
    }
    let header =
        arrowbus_wire::FrameHeader::decode(&head, arrowbus_wire::Direction::BrokerToClient)
            .unwrap();
    let mut rest = vec![0u8; (header.control_len + header.body_len) as usize];
    recv.read_exact(&mut rest).await.unwrap();
    let mut all = head.to_vec();
    all.extend_from_slice(&rest);
    Some(decode_frame::<ServerMessage>(&all).unwrap().0.msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_sends_only_what_the_credit_allows() {
    let busd = Busd::start();
    let client = busd.client().await;
    client
        .admin()
        .create_topic(NewTopic::new("t"))
        .await
        .unwrap();
    for i in 0..10 {
        client
            .producer()
            .publish("t", &ticks(i * 3, 3))
            .await
            .unwrap();
    }
    let quiet = std::time::Duration::from_millis(500);
    let subscribe = |credit: Credit| {
        frame(&ClientMessage::Subscribe(Subscribe {
            topic: "t".into(),
            partition: 0,
            start: arrowbus_wire::StartAt::Earliest,
            isolation: Isolation::ReadUncommitted,
            credit,
        }))
    };

    // Two batches of credit: exactly two batches, then silence.
    let (mut send, mut recv) = client.open_raw_stream().await.unwrap();
    send.write_all(&subscribe(Credit {
        bytes: 1 << 20,
        batches: 2,
    }))
    .await
    .unwrap();
    assert!(matches!(
        next_frame(&mut recv, quiet * 10).await,
        Some(ServerMessage::Subscribed(_))
    ));
    for _ in 0..2 {
        assert!(matches!(
            next_frame(&mut recv, quiet * 10).await,
            Some(ServerMessage::Batch(_))
        ));
    }
    assert!(
        next_frame(&mut recv, quiet).await.is_none(),
        "sent beyond the batch credit"
    );
    // Three more: three more batches, then silence again.
    send.write_all(&frame(&ClientMessage::Credit(Credit {
        bytes: 0,
        batches: 3,
    })))
    .await
    .unwrap();
    for _ in 0..3 {
        assert!(matches!(
            next_frame(&mut recv, quiet * 10).await,
            Some(ServerMessage::Batch(_))
        ));
    }
    assert!(
        next_frame(&mut recv, quiet).await.is_none(),
        "sent beyond the added credit"
    );

    // One byte of credit: one whole batch (batches are never split), then silence.
    let (mut send, mut recv) = client.open_raw_stream().await.unwrap();
    send.write_all(&subscribe(Credit {
        bytes: 1,
        batches: 100,
    }))
    .await
    .unwrap();
    assert!(matches!(
        next_frame(&mut recv, quiet * 10).await,
        Some(ServerMessage::Subscribed(_))
    ));
    assert!(matches!(
        next_frame(&mut recv, quiet * 10).await,
        Some(ServerMessage::Batch(_))
    ));
    assert!(
        next_frame(&mut recv, quiet).await.is_none(),
        "sent beyond the byte credit"
    );

    // Credit beyond the per-subscription maximum is refused.
    let (mut send, mut recv) = client.open_raw_stream().await.unwrap();
    send.write_all(&subscribe(Credit {
        bytes: u64::MAX,
        batches: 1,
    }))
    .await
    .unwrap();
    match next_frame(&mut recv, quiet * 10).await {
        Some(ServerMessage::Error(e)) => {
            assert_eq!(ErrorCode::from_u16(e.code), Some(ErrorCode::CreditTooLarge))
        }
        other => panic!("expected CreditTooLarge, got {other:?}"),
    }
}
