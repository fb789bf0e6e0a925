//! Every stream of the Arrow project's malformed-IPC corpus (inputs that once
//! crashed a real Arrow reader), published raw: its schema as a topic
//! schema, its messages as a batch body, and the whole file as a body for an
//! existing topic. Each is refused with a specific error code (or accepted
//! if it is in fact valid); the broker keeps serving and every batch stored
//! before is intact.

use std::path::PathBuf;

use arrowbus::{ErrorCode, NewTopic, StartAt, SubscribeOptions};
use arrowbus_tests::{seqs, ticks, Busd};
use arrowbus_wire::codec::decode_frame;
use arrowbus_wire::{encode_frame, ClientMessage, CreateTopic, ServerMessage};
use bytes::Bytes;
use futures::StreamExt;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/arrow-ipc/malformed");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 40,
        "corpus incomplete: {} files",
        files.len()
    );
    files
        .into_iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// Split an IPC stream after its first message (the schema, body length 0 in
/// any well-formed stream). Lengths come from untrusted bytes: bounded here.
fn split_first_message(b: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut at = 0;
    if b.len() >= 4 && b[..4] == [0xFF; 4] {
        at = 4;
    }
    let len = b
        .get(at..at + 4)
        .map(|x| i32::from_le_bytes([x[0], x[1], x[2], x[3]]))
        .unwrap_or(0);
    let end = (at + 4).saturating_add(len.max(0) as usize).min(b.len());
    let mut rest = b[end..].to_vec();
    if rest.ends_with(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]) {
        rest.truncate(rest.len() - 8);
    }
    (b[..end].to_vec(), rest)
}

/// Rows of the first batch, if the Arrow reader on this side can read it.
fn first_batch_rows(b: &[u8]) -> Option<u32> {
    // arrow's reader may still panic on some of these inputs: contain it.
    std::panic::catch_unwind(|| first_batch_rows_inner(b))
        .ok()
        .flatten()
}

fn first_batch_rows_inner(b: &[u8]) -> Option<u32> {
    let reader =
        arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(b.to_vec()), None).ok()?;
    let mut it = reader;
    let batch = it.next()?.ok()?;
    Some(batch.num_rows() as u32)
}

async fn raw_request(client: &arrowbus::Client, msg: &ClientMessage) -> ServerMessage {
    let (mut send, mut recv) = client.open_raw_stream().await.unwrap();
    send.write_all(&encode_frame(msg, 0).unwrap())
        .await
        .unwrap();
    send.finish().unwrap();
    let bytes = recv.read_to_end(8 << 20).await.unwrap();
    decode_frame::<ServerMessage>(&bytes).unwrap().0.msg
}

const REFUSALS: &[ErrorCode] = &[
    ErrorCode::InvalidArrowIpc,
    ErrorCode::UnsupportedArrowType,
    ErrorCode::CorruptBatch,
    ErrorCode::SchemaMismatch,
];

#[tokio::test(flavor = "multi_thread")]
async fn malformed_ipc_is_refused_and_stored_batches_are_intact() {
    let busd = Busd::start();
    let client = busd.client().await;
    client
        .admin()
        .create_topic(NewTopic::new("canary"))
        .await
        .unwrap();
    let producer = client.producer();
    let mut expected = Vec::new();
    let mut accepted = 0;
    let mut refused = 0;
    for (i, (name, bytes)) in corpus().into_iter().enumerate() {
        // A good batch before each hostile input.
        producer
            .publish("canary", &ticks(i as i64 * 4, 4))
            .await
            .unwrap();
        expected.extend(i as i64 * 4..i as i64 * 4 + 4);

        // 1. The whole file as the body of a batch for the canary topic.
        let rows = first_batch_rows(&bytes).unwrap_or(1);
        match producer
            .send_raw("canary", 0, 1, rows, Bytes::from(bytes.clone()))
            .await
            .unwrap()
            .await
        {
            Ok(_) => panic!(
                "{name}: a whole IPC stream (with its own schema) was stored as a canary batch"
            ),
            Err(e) => assert!(
                e.code().is_some_and(|c| REFUSALS.contains(&c)),
                "{name} as canary body: unexpected error {e}"
            ),
        }

        // 2. Its first message as a topic schema, the rest as one body.
        let (schema, rest) = split_first_message(&bytes);
        let topic = format!("m{i}");
        let created = raw_request(
            &client,
            &ClientMessage::CreateTopic(CreateTopic {
                name: topic.clone(),
                partitions: 1,
                replication_factor: 1,
                retention_ms: None,
                retention_bytes: None,
                schema_ipc: Some(schema),
            }),
        )
        .await;
        match created {
            ServerMessage::Topic(_) => {
                let rows = first_batch_rows(&bytes).unwrap_or(0);
                match producer
                    .send_raw(&topic, 0, 1, rows, Bytes::from(rest))
                    .await
                    .unwrap()
                    .await
                {
                    Ok(_) => accepted += 1,
                    Err(e) => {
                        refused += 1;
                        assert!(
                            e.code().is_some_and(|c| REFUSALS.contains(&c)),
                            "{name} body: unexpected error {e}"
                        );
                    }
                }
            }
            ServerMessage::Error(e) => {
                refused += 1;
                let code = ErrorCode::from_u16(e.code);
                assert!(
                    code.is_some_and(|c| REFUSALS.contains(&c)),
                    "{name} schema: unexpected error {code:?}: {}",
                    e.message
                );
                assert!(!e.message.is_empty());
            }
            other => panic!("{name}: unexpected answer {other:?}"),
        }
        // The broker still answers.
        assert!(
            client.admin().describe_topic("canary").await.is_ok(),
            "{name}: broker stopped answering"
        );
    }
    println!("malformed corpus: {refused} refused, {accepted} accepted as valid");
    assert!(
        refused > 30,
        "most of the corpus must be refused, {refused} were"
    );

    // Every canary batch stored before, during and after: intact, in order.
    let mut sub = client
        .subscribe(
            "canary",
            SubscribeOptions::default()
                .from(StartAt::Earliest)
                .until_end(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(d) = sub.next().await {
        got.extend(seqs(&d.unwrap().batch));
    }
    assert_eq!(got, expected);
}
