//! The pipelined append stream between nodes (`PeerRpc::AppendStream`) is
//! fed bad frames by a client holding the cluster's own peer certificate:
//! each gets an error with a stable code before anything reaches a log, a
//! stale leader's entries are refused, and the cluster keeps replicating
//! with every acknowledged batch in place on every replica.

use std::path::Path;
use std::time::Duration;

use arrowbus_tests::acked::{check_acked_present, Load};
use arrowbus_tests::cluster::Cluster;
use arrowbus_wire::peer::{
    partition_group, AppendRequest, AppendResponse, PeerRequest, PeerResponse, PeerRpc, WireEntry,
    WireLogId, WireVote, PEER_ALPN,
};
use arrowbus_wire::{encode_frame, BatchHeader, BatchKind, ErrorCode, LogId};

const TOPIC: &str = "streamed";

/// A QUIC connection to node `id`'s peer endpoint, as a fellow node.
async fn peer_connection(cluster: &Cluster, id: u64) -> (quinn::Endpoint, quinn::Connection) {
    let tls = cluster.root().join("tls");
    let files = arrowbus_broker::tls::TlsFiles {
        cert: tls.join("node.pem"),
        key: tls.join("node.key"),
        ca: Some(tls.join("ca.pem")),
    };
    let config = arrowbus_broker::tls::peer_client_config(&files, &tls.join("ca.pem"))
        .unwrap_or_else(|e| panic!("peer client config: {e}"));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap())
        .unwrap_or_else(|e| panic!("endpoint: {e}"));
    endpoint.set_default_client_config(config);
    let addr = cluster.node(id).addr().parse().unwrap();
    let conn = endpoint
        .connect(addr, "localhost")
        .unwrap_or_else(|e| panic!("connect: {e}"))
        .await
        .unwrap_or_else(|e| panic!("handshake with node {id}: {e}"));
    assert_eq!(
        conn.handshake_data()
            .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|h| h.protocol),
        Some(PEER_ALPN.to_vec())
    );
    (endpoint, conn)
}

/// Write `bytes` on a fresh stream, finish it, and decode every answer
/// frame until the node finishes its side.
async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Vec<PeerResponse> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
        .await
        .expect("the node neither answered nor closed the stream within 10 s")
        .unwrap_or_else(|e| panic!("reading answers: {e}"));
    let mut out = Vec::new();
    let mut at = 0;
    while at < answer.len() {
        let (frame, used) = arrowbus_wire::codec::decode_frame::<PeerResponse>(&answer[at..])
            .unwrap_or_else(|e| panic!("answer frame at byte {at}: {e}"));
        out.push(frame.msg);
        at += used;
    }
    out
}

fn frame(group: u64, append: AppendRequest, body: &[u8]) -> Vec<u8> {
    let req = PeerRequest {
        from: 2,
        group,
        rpc: PeerRpc::AppendStream(append),
    };
    let mut f = encode_frame(&req, body.len()).unwrap();
    f.extend_from_slice(body);
    f
}

/// One data entry at `index` (term `term`) with a correct header.
fn append(term: u64, index: u64, body: &[u8]) -> AppendRequest {
    let header = BatchHeader {
        kind: BatchKind::Data,
        flags: 0,
        producer_epoch: 0,
        body_len: body.len() as u32,
        body_crc: crc32c::crc32c(body),
        row_count: 1,
        base_offset: 0,
        timestamp_ms: 0,
        producer_id: -1,
        base_sequence: -1,
        schema_id: 1,
        log_id: LogId::default(),
    };
    let id = WireLogId {
        term,
        leader: 2,
        index,
    };
    AppendRequest {
        vote: WireVote {
            term,
            node: 2,
            committed: true,
        },
        prev_log_id: Some(WireLogId {
            index: index - 1,
            ..id
        }),
        leader_commit: None,
        entries: vec![WireEntry::Data {
            log_id: id,
            header: header.encode().to_vec(),
            body_len: body.len() as u32,
        }],
    }
}

fn error_code(r: &PeerResponse) -> Option<ErrorCode> {
    match r {
        PeerResponse::Error { code, .. } => ErrorCode::from_u16(*code),
        _ => None,
    }
}

/// The topic's id, from its directory name (`<name>-<id>`).
fn topic_id(data_dir: &Path) -> u32 {
    let topics = data_dir.join("topics");
    std::fs::read_dir(&topics)
        .unwrap_or_else(|e| panic!("{}: {e}", topics.display()))
        .filter_map(|e| e.ok())
        .find_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix(&format!("{TOPIC}-"))?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {TOPIC}-* directory in {}", topics.display()))
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_append_stream_frames_are_refused_and_replication_goes_on() {
    let cluster = Cluster::start(3);
    let client = cluster.client().await;
    cluster.create_replicated_topic(&client, TOPIC, 1).await;
    let mut load = Load::start(cluster.client().await, TOPIC, 1);
    load.await_acks(20, "before the bad frames", || cluster.logs())
        .await;

    let leader = cluster.await_converged(&client, TOPIC, 0, "warm-up").await;
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    let group = partition_group(topic_id(&cluster.node(follower).data_dir()), 0);
    let (_endpoint, conn) = peer_connection(&cluster, follower).await;
    let body = b"not arrow, but the CRC matches".to_vec();

    // A group the node does not host.
    let answers = exchange(&conn, &frame(group + 1000, append(1, 5, &body), &body)).await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(error_code(&answers[0]), Some(ErrorCode::PartitionNotFound));

    // A body that does not match its header's CRC.
    let mut bad = body.clone();
    bad[0] ^= 0xff;
    let answers = exchange(&conn, &frame(group, append(1, 5, &body), &bad)).await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(error_code(&answers[0]), Some(ErrorCode::CorruptBatch));

    // A frame cut short (its body never arrives).
    let mut cut = frame(group, append(1, 5, &body), &body);
    cut.truncate(cut.len() - 5);
    let answers = exchange(&conn, &cut).await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(error_code(&answers[0]), Some(ErrorCode::MalformedFrame));

    // A stream from a leader of term 0 (older than any the group had):
    // its first frame is refused with the follower's higher vote, which
    // ends the stream; the frames behind it (a node-level `Removed`, which
    // must never be taken from inside a stream, then garbage) are not
    // acted on.
    let mut stale = frame(group, append(0, 5, &body), &body);
    stale.extend_from_slice(
        &encode_frame(
            &PeerRequest {
                from: 2,
                group,
                rpc: PeerRpc::Removed,
            },
            0,
        )
        .unwrap(),
    );
    stale.extend_from_slice(&[0xAB; 64]);
    let answers = exchange(&conn, &stale).await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert!(
        matches!(&answers[0], PeerResponse::Append(AppendResponse::HigherVote(v)) if v.term >= 1),
        "{answers:?}"
    );

    // The node was not told it was removed, and replication goes on.
    load.await_acks(20, "after the bad frames", || cluster.logs())
        .await;
    let acked = load.finish().await;
    let leader_after = cluster.await_converged(&client, TOPIC, 0, "after").await;
    assert_eq!(leader_after, leader, "the bad frames moved leadership");
    for n in 1..=3 {
        assert!(cluster.node(n).is_running(), "node {n} stopped");
        let single = arrowbus::Client::connect(
            arrowbus::ClientConfig::new(cluster.node(n).addr()).with_ca(cluster.ca()),
        )
        .await
        .unwrap_or_else(|e| panic!("connect to node {n}: {e}"));
        let status = single
            .admin()
            .node_status(n)
            .await
            .unwrap_or_else(|e| panic!("status of node {n}: {e}"));
        assert!(
            status.partitions.iter().any(|p| p.topic == TOPIC),
            "node {n} no longer hosts {TOPIC}"
        );
    }
    check_acked_present(&client, TOPIC, &acked).await;
}
