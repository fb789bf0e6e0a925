//! Writes valid seed inputs for every fuzz target into `<dir>/<target>/`.
//! Usage: gen_seeds <corpus dir> [<arrow malformed IPC dir>]
use std::fs;
use std::path::Path;

use arrowbus_broker::ipc::encode_schema;
use arrowbus_fuzz::{body_of, sample_batches, topic_schemas};
use arrowbus_wire::msg::*;
use arrowbus_wire::codec::{encode_frame, Message};
use arrowbus_wire::{BatchHeader, BatchKind, ErrorCode, LogId};

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join(name), bytes).unwrap();
}

fn frame<M: Message>(m: &M, body: &[u8]) -> Vec<u8> {
    let mut f = encode_frame(m, body.len()).unwrap();
    f.extend_from_slice(body);
    f
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(1).map(String::as_str).unwrap_or("corpus"));
    let batches = sample_batches();
    let schemas = topic_schemas();

    // schema_decode: canonical schemas, plus one with end-of-stream marker.
    for (i, (name, b)) in batches.iter().enumerate() {
        let s = encode_schema(&b.schema()).unwrap();
        put(dir, "schema_decode", &format!("seed-{name}"), &s);
        let mut eos = s.clone();
        eos.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]);
        put(dir, "schema_decode", &format!("seed-{name}-eos"), &eos);
        assert_eq!(&schemas[i].ipc[..], &s[..]);
    }

    // publish_body: selector byte + body, one per fixed schema; and the
    // attacker-chosen-schema form (selector N, u16 len, schema, body).
    let n = schemas.len() as u8;
    for (i, (name, b)) in batches.iter().enumerate() {
        let body = body_of(b);
        let mut v = vec![i as u8];
        v.extend_from_slice(&body);
        put(dir, "publish_body", &format!("seed-{name}"), &v);
        // A zero-row batch and a sliced one.
        let mut v = vec![i as u8];
        v.extend_from_slice(&body_of(&b.slice(0, 0)));
        put(dir, "publish_body", &format!("seed-{name}-empty"), &v);
        let mut v = vec![i as u8];
        v.extend_from_slice(&body_of(&b.slice(1, b.num_rows() - 1)));
        put(dir, "publish_body", &format!("seed-{name}-sliced"), &v);
        let s = encode_schema(&b.schema()).unwrap();
        let mut v = vec![n];
        v.extend_from_slice(&(s.len() as u16).to_le_bytes());
        v.extend_from_slice(&s);
        v.extend_from_slice(&body);
        put(dir, "publish_body", &format!("seed-{name}-ownschema"), &v);
    }
    // Arrow's malformed IPC streams: as a body (schema by selector) and as
    // an attacker-chosen schema + body (the stream as the client sends it).
    if let Some(m) = args.get(2) {
        for e in fs::read_dir(m).unwrap() {
            let p = e.unwrap().path();
            let bytes = fs::read(&p).unwrap();
            let fname = p.file_name().unwrap().to_string_lossy().into_owned();
            put(dir, "schema_decode", &format!("arrow-{fname}"), &bytes);
            // Split after the first message (the schema): continuation
            // marker, i32 metadata length, metadata; a schema has no body.
            let (pre, at) = if bytes.get(..4) == Some(&[0xFF; 4][..]) { (8, 4) } else { (4, 0) };
            let meta = bytes
                .get(at..at + 4)
                .map_or(0, |l| i32::from_le_bytes(l.try_into().unwrap()).max(0) as usize);
            let split = (pre + meta).min(bytes.len()).min(u16::MAX as usize);
            let mut v = vec![n];
            v.extend_from_slice(&(split as u16).to_le_bytes());
            v.extend_from_slice(&bytes);
            put(dir, "publish_body", &format!("arrow-{fname}"), &v);
        }
    }

    // frame_decode: every message kind, both directions.
    let client = vec![
        ClientMessage::CreateTopic(CreateTopic {
            name: "ticks".into(),
            partitions: 3,
            replication_factor: 1,
            retention_ms: Some(60_000),
            retention_bytes: None,
            schema_ipc: Some(schemas[0].ipc.to_vec()),
        }),
        ClientMessage::DeleteTopic { topic: "ticks".into() },
        ClientMessage::ListTopics,
        ClientMessage::DescribeTopic { topic: "a-long-topic-name-over-8".into() },
        ClientMessage::Metadata,
        ClientMessage::SetSchemaIfAbsent { topic: "t".into(), schema_ipc: vec![1, 2, 3] },
        ClientMessage::Publish(Publish { request_id: 77, topic: "ticks".into(), partition: 2 }),
        ClientMessage::Subscribe(Subscribe {
            topic: "ticks".into(),
            partition: 1,
            start: StartAt::Offset(1234),
            isolation: Isolation::ReadCommitted,
            credit: Credit { bytes: 1 << 20, batches: 16 },
        }),
        ClientMessage::Subscribe(Subscribe {
            topic: "t".into(),
            partition: 0,
            start: StartAt::Timestamp(-5),
            isolation: Isolation::ReadUncommitted,
            credit: Credit::default(),
        }),
        ClientMessage::Credit(Credit { bytes: 4096, batches: 1 }),
    ];
    for (i, m) in client.iter().enumerate() {
        put(dir, "frame_decode", &format!("seed-client-{i}"), &frame(m, if i == 6 { b"body" } else { b"" }));
    }
    let partition = PartitionInfo {
        partition: 0,
        leader: 1,
        replicas: vec![1, 2, 3],
        earliest_offset: 0,
        latest_offset: 99,
        bytes: 1234,
        batches: 5,
    };
    let topic = TopicInfo {
        name: "ticks".into(),
        replication_factor: 3,
        retention_ms: None,
        retention_bytes: Some(1 << 30),
        schema_id: 1,
        schema_ipc: schemas[1].ipc.to_vec(),
        created_ms: 1_700_000_000_000,
        partitions: vec![partition.clone(), partition],
    };
    let mut err = ErrorReply::new(ErrorCode::SchemaMismatch, "field price: topic has float64, batch has utf8");
    err.leader_hint = Some(2);
    let server = vec![
        ServerMessage::Error(err),
        ServerMessage::Topic(topic.clone()),
        ServerMessage::Topics(vec![topic.clone(), topic]),
        ServerMessage::TopicDeleted { topic: "x".into() },
        ServerMessage::Metadata(ClusterMetadata {
            nodes: vec![NodeInfo { id: 1, addr: "127.0.0.1:7000".into() }],
        }),
        ServerMessage::Schema { schema_id: 3, schema_ipc: schemas[2].ipc.to_vec() },
        ServerMessage::Ack(Ack { request_id: 1, partition: 0, base_offset: 10, rows: 3, timestamp_ms: 5 }),
        ServerMessage::Subscribed(Subscribed {
            schema_id: 1,
            schema_ipc: vec![],
            start_offset: 0,
            high_watermark: 7,
        }),
        ServerMessage::Batch(BatchDelivery { skip_rows: 1, high_watermark: 9 }),
    ];
    for (i, m) in server.iter().enumerate() {
        put(dir, "frame_decode", &format!("seed-server-{i}"), &frame(m, if i == 8 { b"batchbody" } else { b"" }));
    }

    // batch_header: real records (header + body) of each kind.
    for (i, (name, b)) in batches.iter().enumerate() {
        let body = body_of(b);
        let mut h = BatchHeader::for_body(&body, b.num_rows() as u32, i as u32 + 1).unwrap();
        h.base_offset = 1000;
        h.timestamp_ms = 1_700_000_000_000;
        h.log_id = LogId { term: 2, leader: 1, index: 17 };
        let mut rec = h.encode().to_vec();
        rec.extend_from_slice(&body);
        put(dir, "batch_header", &format!("seed-{name}"), &rec);
    }
    for kind in [BatchKind::Commit, BatchKind::Abort, BatchKind::Raft] {
        let mut h = BatchHeader::for_body(b"", 0, 0).unwrap();
        h.kind = kind;
        h.flags = 1;
        h.producer_id = 42;
        h.base_sequence = 3;
        put(dir, "batch_header", &format!("seed-{kind:?}"), &h.encode());
    }
    println!("seeds written to {}", dir.display());
}
