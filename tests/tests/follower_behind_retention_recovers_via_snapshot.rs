//! Retention goes through Raft: a partition is snapshotted at the retention
//! cut and only then purged. A follower that was down while retention
//! deleted what it missed installs the leader's snapshot and continues; a
//! cluster of one still sees retention delete old segments. Real `busd`
//! processes with 1 MiB segments and a 3 MiB retention.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use arrowbus::{NewTopic, StartAt, SubscribeOptions};
use arrowbus_raft::log::{LogConfig, PartitionLog};
use arrowbus_raft::snapshot::{self, PartitionState};
use arrowbus_raft::types;
use arrowbus_tests::cluster::{data_records, partition_dir, Cluster};
use arrowbus_tests::{read_all, seqs, ticks};

/// Smallest segments busd accepts, and a retention check every 200 ms, so
/// a few MiB of publishing makes retention delete segments quickly.
const LOG_TOML: &str = "[log]\nsegment_bytes = 1048576\nretention_check_interval_ms = 200\n";
const RETENTION_BYTES: u64 = 3 * 1024 * 1024;
/// ~44 bytes a row: batches of ~66 KB, 16 per segment.
const ROWS: usize = 1500;
/// Upper bound on batches published while waiting for retention to cut
/// past the dead follower (~26 MB): far more than the 3 MiB retention. The
/// leader's cut lags the other follower's by its replication back-off to
/// the dead node (measured: ~80 batches, 0.4 s); before the network failed
/// replication sessions to unreachable peers up front, the leader never
/// purged within this bound.
const MAX_BATCHES_WHILE_DOWN: usize = 400;
/// Pause after each round of 10 batches while waiting for that cut: the 40
/// rounds then span at least 2 s, ten retention checks.
const RETENTION_ROUND_PAUSE: Duration = Duration::from_millis(50);

/// Acks: base offset -> the seq values of the batch acknowledged there.
type Acked = BTreeMap<u64, Vec<i64>>;

struct Publisher {
    producer: arrowbus::Producer,
    next_seq: i64,
    acked: Acked,
}

impl Publisher {
    /// Publish `n` batches to partition 0, one after another; each must be
    /// acknowledged at the offset after the previous one.
    async fn publish(&mut self, n: usize, cluster: &Cluster) {
        for _ in 0..n {
            let batch = ticks(self.next_seq, ROWS);
            self.next_seq += ROWS as i64;
            let ack = self
                .producer
                .publish_to("ticks", 0, &batch)
                .await
                .unwrap_or_else(|e| panic!("publish: {e}\n{}", cluster.logs()));
            assert_eq!(ack.rows as usize, ROWS);
            if let Some((last, s)) = self.acked.iter().next_back() {
                assert_eq!(
                    ack.base_offset,
                    last + s.len() as u64,
                    "acks of a sequential producer are contiguous"
                );
            }
            assert!(self.acked.insert(ack.base_offset, seqs(&batch)).is_none());
        }
    }

    fn next_offset(&self) -> u64 {
        self.acked
            .iter()
            .next_back()
            .map_or(0, |(o, s)| o + s.len() as u64)
    }
}

/// A client that talks to node `id` only: its answers describe that node's
/// own replica (earliest offset, bytes).
async fn node_client(cluster: &Cluster, id: u64) -> arrowbus::Client {
    arrowbus::Client::connect(
        arrowbus::ClientConfig::new(cluster.node(id).addr()).with_ca(cluster.ca()),
    )
    .await
    .unwrap_or_else(|e| panic!("connecting to node {id}: {e}"))
}

/// Node `id`'s replica of partition 0: (earliest, latest) offsets.
async fn replica_offsets(client: &arrowbus::Client) -> Option<(u64, u64)> {
    let info = client.admin().describe_topic("ticks").await.ok()?;
    let p = info.partitions.first()?;
    Some((p.earliest_offset, p.latest_offset))
}

async fn leader_of(client: &arrowbus::Client, cluster: &Cluster) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(info) = client.admin().describe_topic("ticks").await {
            if info.partitions[0].leader != 0 {
                return info.partitions[0].leader;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader after 20 s\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every acknowledged batch the leader still retains is read back, from
/// the current leader, with the acknowledged values; returns how many.
/// Retention keeps running meanwhile: the read must start no later than
/// what `leader` (a client of the leader node) retains right after it, and
/// every acked batch from there on must be read.
async fn check_acked_readable(
    client: &arrowbus::Client,
    acked: &Acked,
    leader: &arrowbus::Client,
) -> usize {
    let opts = SubscribeOptions::default()
        .from(StartAt::Earliest)
        .partitions(vec![0]);
    let mut by_offset: BTreeMap<u64, i64> = BTreeMap::new();
    let deliveries = read_all(client, "ticks", opts).await;
    let (retained_after, _) = replica_offsets(leader)
        .await
        .unwrap_or_else(|| panic!("the leader does not describe its replica"));
    let first = deliveries
        .first()
        .map(|d| d.offset)
        .unwrap_or_else(|| panic!("nothing delivered (the leader retains from {retained_after})"));
    for d in deliveries {
        for (i, s) in seqs(&d.batch).into_iter().enumerate() {
            by_offset.insert(d.offset + i as u64, s);
        }
    }
    assert!(
        first <= retained_after,
        "earliest delivered offset {first} is after {retained_after}, which the leader still retains"
    );
    let mut n = 0;
    for (off, sent) in acked.range(first..) {
        let got: Vec<i64> = (0..sent.len() as u64)
            .map(|i| {
                *by_offset
                    .get(&(off + i))
                    .unwrap_or_else(|| panic!("acked offset {} is missing", off + i))
            })
            .collect();
        assert_eq!(&got, sent, "rows at acked offset {off}");
        n += 1;
    }
    n
}

/// A stopped node's partition log: (start offset, last purged log id).
fn log_start(dir: &Path) -> (u64, Option<arrowbus_wire::LogId>) {
    let (log, _) = PartitionLog::open(dir, LogConfig::default())
        .unwrap_or_else(|e| panic!("opening {}: {e}", dir.display()));
    let out = (log.start_offset(), log.purged_position().last_log_id);
    log.close();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_behind_retention_recovers_via_snapshot() {
    let mut cluster = Cluster::start_with(3, LOG_TOML);
    let client = cluster.client().await;
    client
        .admin()
        .create_topic(
            NewTopic::new("ticks")
                .partitions(1)
                .replication_factor(3)
                .retention_bytes(RETENTION_BYTES),
        )
        .await
        .unwrap_or_else(|e| panic!("create: {e}\n{}", cluster.logs()));
    let mut publisher = Publisher {
        producer: client.producer(),
        next_seq: 0,
        acked: Acked::new(),
    };
    publisher.publish(10, &cluster).await;
    cluster
        .await_converged(&client, "ticks", 0, "before the fault")
        .await;

    let leader = leader_of(&client, &cluster).await;
    let down = (1..=3u64).find(|id| *id != leader).unwrap_or(1);
    let live: Vec<u64> = (1..=3u64).filter(|id| *id != down).collect();
    // Everything the follower holds ends here.
    let down_had = publisher.next_offset();
    eprintln!("leader {leader}; killing follower {down} (it holds offsets 0..{down_had})");
    cluster.kill9(down);

    // Publish until retention on both live replicas has deleted offsets the
    // dead follower never received.
    let live_clients = [
        node_client(&cluster, live[0]).await,
        node_client(&cluster, live[1]).await,
    ];
    let mut published = 0;
    loop {
        publisher.publish(10, &cluster).await;
        published += 10;
        // Retention acts on a timer (every 200 ms here), not per batch: a
        // pause per round keeps the bound below about time as well as
        // bytes, however fast the cluster takes the batches.
        tokio::time::sleep(RETENTION_ROUND_PAUSE).await;
        let mut earliest = Vec::new();
        for c in &live_clients {
            earliest.push(replica_offsets(c).await.map_or(0, |o| o.0));
        }
        if earliest.iter().all(|e| *e > down_had) {
            eprintln!("after {published} batches the live replicas start at {earliest:?}");
            break;
        }
        assert!(
            published < MAX_BATCHES_WHILE_DOWN,
            "retention did not cut past offset {down_had} after {published} batches \
             (live replicas start at {earliest:?})\n{}",
            cluster.logs()
        );
    }

    let installs_before = cluster
        .node(down)
        .log()
        .matches("snapshot installed")
        .count();
    cluster.restart(down);
    cluster
        .await_converged(&client, "ticks", 0, "after the follower restarted")
        .await;
    let installs = cluster
        .node(down)
        .log()
        .matches("snapshot installed")
        .count();
    assert!(
        installs > installs_before,
        "node {down} caught up without installing a snapshot\n{}",
        cluster.logs()
    );
    // Its own replica now starts past the gap and ends where the leader's does.
    let down_client = node_client(&cluster, down).await;
    let (earliest, latest) = replica_offsets(&down_client)
        .await
        .unwrap_or_else(|| panic!("node {down} does not describe its replica"));
    assert!(
        earliest > down_had,
        "node {down}'s replica starts at {earliest}, inside the range it already had"
    );
    assert_eq!(
        latest,
        publisher.next_offset(),
        "node {down}'s high watermark"
    );
    assert!(
        publisher.acked.contains_key(&earliest),
        "node {down}'s earliest offset {earliest} is not a batch boundary"
    );

    // Publishing continues, and the recovered follower takes part.
    publisher.publish(10, &cluster).await;
    cluster
        .await_converged(&client, "ticks", 0, "after publishing again")
        .await;
    let final_leader = leader_of(&client, &cluster).await;
    let leader_client = node_client(&cluster, final_leader).await;
    let readable = check_acked_readable(&client, &publisher.acked, &leader_client).await;
    leader_client.close().await;
    assert!(
        readable >= 10,
        "only {readable} acked batches inside retention"
    );
    down_client.close().await;
    for c in live_clients {
        c.close().await;
    }
    client.close().await;
    for id in 1..=3 {
        assert_eq!(
            cluster.terminate(id),
            Some(0),
            "node {id} did not shut down cleanly\n{}",
            cluster.logs()
        );
    }

    // On disk: the follower's log starts exactly at its snapshot, and from
    // there it is the leader's log, batch for batch.
    let dirs: BTreeMap<u64, std::path::PathBuf> = (1..=3)
        .map(|id| (id, partition_dir(cluster.node(id), "ticks-", 0)))
        .collect();
    let (meta, data) = snapshot::read_file(&dirs[&down])
        .unwrap_or_else(|e| panic!("node {down}'s snapshot: {e}"))
        .unwrap_or_else(|| panic!("node {down} has no snapshot file"));
    let state = PartitionState::decode(&data).unwrap_or_else(|e| panic!("{e}"));
    let (start, purged) = log_start(&dirs[&down]);
    assert_eq!(
        start, state.next_offset,
        "log start vs snapshot next offset"
    );
    assert_eq!(
        purged,
        meta.last_log_id.as_ref().map(types::stored_log_id),
        "log's last purged id vs snapshot's last log id"
    );
    let records: BTreeMap<u64, BTreeMap<u64, (u32, u32)>> = dirs
        .iter()
        .map(|(id, d)| {
            (
                *id,
                data_records(d)
                    .into_iter()
                    .map(|(o, rows, crc)| (o, (rows, crc)))
                    .collect(),
            )
        })
        .collect();
    let mine = &records[&down];
    assert_eq!(mine.keys().next().copied(), Some(start));
    let theirs = &records[&final_leader];
    let common = start.max(theirs.keys().next().copied().unwrap_or(0));
    assert_eq!(
        mine.range(common..).collect::<Vec<_>>(),
        theirs.range(common..).collect::<Vec<_>>(),
        "node {down}'s log differs from the leader's (node {final_leader}) from offset {common}"
    );
    assert_eq!(
        mine.keys().next_back(),
        Some(&(publisher.next_offset() - ROWS as u64))
    );
    // Every acknowledged batch from its start on is in it, whole.
    for (off, sent) in publisher.acked.range(start..) {
        let (rows, _) = mine
            .get(off)
            .unwrap_or_else(|| panic!("acked batch at {off} is not on node {down}"));
        assert_eq!(*rows as usize, sent.len(), "rows of the batch at {off}");
    }
    // The other live replica agrees too.
    let other = live
        .iter()
        .copied()
        .find(|id| *id != final_leader)
        .unwrap_or(live[0]);
    let o = &records[&other];
    let common = common.max(o.keys().next().copied().unwrap_or(0));
    assert_eq!(
        o.range(common..).collect::<Vec<_>>(),
        theirs.range(common..).collect::<Vec<_>>(),
        "node {other}'s log differs from the leader's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_on_a_single_node_moves_earliest_and_survives_restart() {
    let mut cluster = Cluster::start_with(1, LOG_TOML);
    let client = cluster.client().await;
    client
        .admin()
        .create_topic(NewTopic::new("ticks").retention_bytes(RETENTION_BYTES))
        .await
        .unwrap_or_else(|e| panic!("create: {e}\n{}", cluster.logs()));
    let mut publisher = Publisher {
        producer: client.producer(),
        next_seq: 0,
        acked: Acked::new(),
    };
    publisher.publish(100, &cluster).await;
    // ~6.6 MB published, 3 MiB kept: retention deletes whole segments.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (earliest, bytes) = loop {
        let info = client
            .admin()
            .describe_topic("ticks")
            .await
            .unwrap_or_else(|e| panic!("describe: {e}"));
        let p = &info.partitions[0];
        if p.earliest_offset > 0 && p.bytes <= RETENTION_BYTES + 1024 * 1024 {
            break (p.earliest_offset, p.bytes);
        }
        assert!(
            Instant::now() < deadline,
            "retention did not delete segments in 30 s: {p:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        publisher.acked.contains_key(&earliest),
        "earliest {earliest} is not a batch boundary"
    );
    assert!(
        bytes > RETENTION_BYTES - 1024 * 1024,
        "kept only {bytes} bytes"
    );
    let n = check_acked_readable(&client, &publisher.acked, &client).await;
    assert_eq!(n, publisher.acked.range(earliest..).count());
    client.close().await;

    // kill -9: the snapshot and the cut survive; offsets continue.
    cluster.restart(1);
    let client = cluster.client().await;
    let info = client
        .admin()
        .describe_topic("ticks")
        .await
        .unwrap_or_else(|e| panic!("describe after restart: {e}\n{}", cluster.logs()));
    let p = &info.partitions[0];
    assert!(
        p.earliest_offset >= earliest,
        "earliest went back from {earliest} to {}",
        p.earliest_offset
    );
    assert_eq!(p.latest_offset, publisher.next_offset());
    publisher.producer = client.producer();
    publisher.publish(5, &cluster).await;
    check_acked_readable(&client, &publisher.acked, &client).await;
    client.close().await;
    assert_eq!(cluster.terminate(1), Some(0));
    let dir = partition_dir(cluster.node(1), "ticks-", 0);
    let (meta, data) = snapshot::read_file(&dir)
        .unwrap_or_else(|e| panic!("snapshot: {e}"))
        .unwrap_or_else(|| panic!("retention left no snapshot file"));
    let state = PartitionState::decode(&data).unwrap_or_else(|e| panic!("{e}"));
    let (start, purged) = log_start(&dir);
    assert_eq!(
        start, state.next_offset,
        "log start vs snapshot next offset"
    );
    assert_eq!(purged, meta.last_log_id.as_ref().map(types::stored_log_id));
}
