//! Replication under a real network partition: three `busd` processes, each
//! in its own network namespace, one partition replicated on all three. The
//! leader is cut off from the other two nodes and from the test's own
//! address by iptables DROP rules (packets really vanish, nothing answers).
//!
//! - the isolated leader acknowledges nothing new, publishes sent to it by a
//!   client that can only reach it (a client inside its namespace) get no
//!   ack, though it appends them (an uncommitted tail);
//! - the majority elects a new leader, which acknowledges publishes;
//! - after healing, the old leader's log equals the new leader's: every
//!   acknowledged batch, none of the batches it appended while isolated.
//!
//! Needs root, `ip` and `iptables`; fails (does not skip) without them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use arrowbus::{ProducerConfig, StartAt, SubscribeOptions};
use arrowbus_tests::cluster::{data_records, Cluster, Placement};
use arrowbus_tests::netns::Netns;
use arrowbus_tests::{read_all, seqs, ticks};

const TOPIC: &str = "parted";
const ROWS: usize = 50;
/// Batches sent to the isolated leader have this many rows, which no
/// acknowledged batch has, so they can be recognised in any replica's log.
const UNACKED_ROWS: usize = 7;
/// Their seq values start here, far from the acknowledged ones.
const UNACKED_FIRST: i64 = 1_000_000;
/// How long the isolated leader gets to (wrongly) acknowledge.
const ISOLATED_ACK_WAIT: Duration = Duration::from_secs(4);

/// The leader of partition 0 as `client` sees it, once it is one of
/// `allowed` (a new election may take a moment to be visible).
async fn leader_among(client: &arrowbus::Client, allowed: &[u64], cluster: &Cluster) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(info) = client.admin().describe_topic(TOPIC).await {
            let l = info.partitions[0].leader;
            if allowed.contains(&l) {
                return l;
            }
        }
        assert!(
            Instant::now() < deadline,
            "partition 0 has no leader among {allowed:?} after 20 s\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publish `count` batches of ROWS rows from `first`; every one must be
/// acknowledged. Returns base offset -> seq values.
async fn publish_acked(
    client: &arrowbus::Client,
    first: i64,
    count: usize,
    cluster: &Cluster,
) -> BTreeMap<u64, Vec<i64>> {
    let producer = client.producer();
    let mut acked = BTreeMap::new();
    for i in 0..count {
        let batch = ticks(first + (i * ROWS) as i64, ROWS);
        let ack = producer
            .publish_to(TOPIC, 0, &batch)
            .await
            .unwrap_or_else(|e| panic!("publish {i}: {e}\n{}", cluster.logs()));
        assert_eq!(ack.rows as usize, ROWS);
        acked.insert(ack.base_offset, seqs(&batch));
    }
    acked
}

/// What the isolated leader did with publishes from a client that can only
/// reach it: the outcome of each, and its own view of the partition's Raft
/// group afterwards (role, last log index, committed index).
struct Isolated {
    outcomes: Vec<String>,
    acks: Vec<u64>,
    status: Option<(String, u64, u64)>,
}

fn publish_inside(net: &Netns, leader: u64, addr: String, ca: std::path::PathBuf) -> Isolated {
    net.run_in(leader as u32, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        rt.block_on(async move {
            let mut out = Isolated {
                outcomes: Vec::new(),
                acks: Vec::new(),
                status: None,
            };
            let cfg = arrowbus::ClientConfig::new(addr).with_ca(ca);
            let client = arrowbus::Client::connect(cfg)
                .await
                .unwrap_or_else(|e| panic!("connecting inside the leader's namespace: {e}"));
            // One attempt per publish: a retry could only reach this node anyway.
            let producer = client.producer_with(ProducerConfig {
                delivery_timeout: Duration::ZERO,
                ..Default::default()
            });
            let mut pending = Vec::new();
            for i in 0..3 {
                let batch = ticks(UNACKED_FIRST + (i * UNACKED_ROWS) as i64, UNACKED_ROWS);
                match producer.send(TOPIC, Some(0), &batch).await {
                    Ok(p) => pending.push(p),
                    Err(e) => out.outcomes.push(format!("send {i}: error {e}")),
                }
            }
            let deadline = tokio::time::Instant::now() + ISOLATED_ACK_WAIT;
            for (i, p) in pending.into_iter().enumerate() {
                match tokio::time::timeout_at(deadline, p).await {
                    Ok(Ok(ack)) => {
                        out.acks.push(ack.base_offset);
                        out.outcomes
                            .push(format!("send {i}: ACK at {}", ack.base_offset));
                    }
                    Ok(Err(e)) => out.outcomes.push(format!("send {i}: error {e}")),
                    Err(_) => out.outcomes.push(format!("send {i}: no answer")),
                }
            }
            if let Ok(s) = client.admin().node_status(leader).await {
                out.status = s
                    .partitions
                    .iter()
                    .find(|g| g.topic == TOPIC && g.partition == 0)
                    .map(|g| (g.role.clone(), g.last_log_index, g.committed));
            }
            out
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolated_leader_acks_nothing_majority_serves_old_tail_discarded() {
    // Declared first so it drops last: nodes are stopped, then the
    // namespaces go (the guard also kills anything left in them).
    let net = Netns::create(3);
    let mut cluster =
        Cluster::start_placed((1..=3).map(|i| Placement::in_netns(&net, i)).collect());
    let client = cluster.client().await;
    cluster.create_replicated_topic(&client, TOPIC, 1).await;
    let mut acked = publish_acked(&client, 0, 10, &cluster).await;
    let old = leader_among(&client, &[1, 2, 3], &cluster).await;
    let majority: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    eprintln!("isolating leader node {old}; majority {majority:?}");
    client.close().await;

    // Cut the leader from both other nodes and from this process.
    let mut peers: Vec<Ipv4Addr> = majority.iter().map(|id| net.node_ip(*id as u32)).collect();
    peers.push(net.host_ip());
    net.cut(old as u32, &peers);
    let cut_at = Instant::now();

    // 1. The isolated leader acknowledges nothing new.
    let old_addr = cluster.node(old).addr();
    let isolated = {
        let (ca, net_ref) = (cluster.ca(), &net);
        tokio::task::block_in_place(|| publish_inside(net_ref, old, old_addr, ca))
    };
    eprintln!(
        "isolated leader: {:?}; its view of partition 0 (role, last log index, committed): {:?}",
        isolated.outcomes, isolated.status
    );
    assert!(
        isolated.acks.is_empty(),
        "the isolated leader acknowledged {:?}: {:?}\n{}",
        isolated.acks,
        isolated.outcomes,
        cluster.logs()
    );
    // It did take them in: appended, never committed (the tail that must
    // go). If it had refused them, the last assertion would prove nothing.
    let (_, last, committed) = isolated
        .status
        .clone()
        .unwrap_or_else(|| panic!("no status from the isolated leader\n{}", cluster.logs()));
    assert!(
        last > committed,
        "the isolated leader holds no uncommitted tail (last {last}, committed {committed}): {:?}",
        isolated.outcomes
    );

    // 2. The majority elects a new leader, which acknowledges.
    let mut maj_cfg =
        arrowbus::ClientConfig::new(cluster.node(majority[0]).addr()).with_ca(cluster.ca());
    maj_cfg.brokers = majority.iter().map(|id| cluster.node(*id).addr()).collect();
    let maj = arrowbus::Client::connect(maj_cfg)
        .await
        .unwrap_or_else(|e| panic!("connecting to the majority: {e}"));
    let new_leader = leader_among(&maj, &majority, &cluster).await;
    let more = publish_acked(&maj, 10 * ROWS as i64, 10, &cluster).await;
    for (off, s) in more {
        assert!(acked.insert(off, s).is_none(), "two acks for offset {off}");
    }
    eprintln!("new leader: node {new_leader}");
    maj.close().await;

    // 3. Heal: the old leader rejoins as a follower and drops its tail.
    eprintln!(
        "healing after {:.1} s of partition",
        cut_at.elapsed().as_secs_f64()
    );
    net.heal();
    let healed = Instant::now();
    let client = cluster.client().await;
    let leader_after = cluster
        .await_converged(&client, TOPIC, 0, "after healing")
        .await;
    eprintln!(
        "replicas converged {:.1} s after healing",
        healed.elapsed().as_secs_f64()
    );
    assert_ne!(
        leader_after,
        0,
        "no leader after healing\n{}",
        cluster.logs()
    );
    let mut by_offset: BTreeMap<u64, i64> = BTreeMap::new();
    let opts = SubscribeOptions::default()
        .from(StartAt::Earliest)
        .partitions(vec![0]);
    for d in read_all(&client, TOPIC, opts).await {
        for (i, s) in seqs(&d.batch).into_iter().enumerate() {
            by_offset.insert(d.offset + i as u64, s);
        }
    }
    for (off, sent) in &acked {
        let got: Vec<Option<i64>> = (0..sent.len() as u64)
            .map(|i| by_offset.get(&(off + i)).copied())
            .collect();
        let want: Vec<Option<i64>> = sent.iter().map(|s| Some(*s)).collect();
        assert_eq!(got, want, "acknowledged batch at offset {off}");
    }
    let leaked: Vec<(u64, i64)> = by_offset
        .iter()
        .filter(|(_, s)| **s >= UNACKED_FIRST)
        .map(|(o, s)| (*o, *s))
        .collect();
    assert!(
        leaked.is_empty(),
        "rows of batches the isolated leader never acknowledged were committed: {leaked:?}"
    );
    client.close().await;

    // Byte-level: stop every node, then every replica's log holds the same
    // data records, the acknowledged ones, and no UNACKED_ROWS batch.
    for id in 1..=3 {
        assert_eq!(
            cluster.terminate(id),
            Some(0),
            "node {id} did not stop cleanly\n{}",
            cluster.logs()
        );
    }
    let mut logs = Vec::new();
    for n in &cluster.nodes {
        let topics = n.data_dir().join("topics");
        let dir = std::fs::read_dir(&topics)
            .unwrap_or_else(|e| panic!("{}: {e}", topics.display()))
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(TOPIC))
            .unwrap_or_else(|| panic!("node {} has no {TOPIC} directory", n.id))
            .path()
            .join("p-0");
        logs.push((n.id, data_records(&dir)));
    }
    let new_log = &logs[(new_leader - 1) as usize].1;
    for (id, log) in &logs {
        assert_eq!(
            log, new_log,
            "node {id}'s log differs from the new leader's (node {new_leader}); old leader was {old}"
        );
        let tail: Vec<_> = log
            .iter()
            .filter(|r| r.1 as usize == UNACKED_ROWS)
            .collect();
        assert!(
            tail.is_empty(),
            "node {id} still holds unacknowledged batches {tail:?}"
        );
    }
    let offsets: std::collections::BTreeSet<u64> = new_log.iter().map(|r| r.0).collect();
    for off in acked.keys() {
        assert!(
            offsets.contains(off),
            "acknowledged batch at {off} missing from the logs"
        );
    }
}
