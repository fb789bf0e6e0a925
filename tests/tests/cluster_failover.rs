//! Replication under process faults, with real `busd` processes: a
//! three-node cluster, one partition replicated on all three.

use std::time::{Duration, Instant};

use arrowbus_tests::acked::{check_acked_present, Acked, Load, ROWS_PER_BATCH};
use arrowbus_tests::cluster::{data_records, partition_dir, Cluster};
use arrowbus_tests::{seed, seqs, ticks};

async fn leader_of(client: &arrowbus::Client, topic: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(info) = client.admin().describe_topic(topic).await {
            let l = info.partitions[0].leader;
            if l != 0 {
                return l;
            }
        }
        assert!(
            Instant::now() < deadline,
            "partition 0 of {topic} has no leader after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After the cluster is stopped: every replica's log holds the same data
/// records, and they cover every acked offset.
fn check_replicas_identical(cluster: &Cluster, topic_dir_prefix: &str, acked: &Acked) {
    let mut logs = Vec::new();
    for n in &cluster.nodes {
        let dir = partition_dir(n, topic_dir_prefix, 0);
        logs.push((n.id, data_records(&dir)));
    }
    let (first_id, first) = &logs[0];
    for (id, l) in &logs[1..] {
        assert_eq!(
            l.len(),
            first.len(),
            "node {id} holds {} data batches, node {first_id} {}",
            l.len(),
            first.len()
        );
        assert_eq!(l, first, "node {id}'s log differs from node {first_id}'s");
    }
    let offsets: std::collections::BTreeSet<u64> = first.iter().map(|r| r.0).collect();
    for (_, off) in acked.keys() {
        assert!(
            offsets.contains(off),
            "acked batch at offset {off} is not in the replicas' logs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acked_batches_survive_leader_kills_on_every_replica() {
    let seed = seed();
    let mut cluster = Cluster::start(3);
    let client = cluster.client().await;
    cluster.create_replicated_topic(&client, "ticks", 1).await;

    let mut load = Load::start(cluster.client().await, "ticks", 1);
    load.await_acks(20, "before any fault", || cluster.logs())
        .await;

    // Kill the partition's leader (varying how long it stays down), three
    // times; publishing must resume by itself each time.
    for round in 0..3u64 {
        let leader = leader_of(&client, "ticks").await;
        eprintln!("seed {seed}: round {round}: killing leader node {leader}");
        cluster.kill9(leader);
        load.await_acks(20, &format!("after killing leader {leader}"), || {
            cluster.logs()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(
            100 + (seed.wrapping_add(round) % 5) * 100,
        ))
        .await;
        cluster.restart(leader);
        load.await_acks(10, &format!("after restarting node {leader}"), || {
            cluster.logs()
        })
        .await;
    }
    let acked = load.finish().await;

    check_acked_present(&client, "ticks", &acked).await;
    cluster
        .await_converged(&client, "ticks", 0, "after the kills")
        .await;
    client.close().await;
    for id in 1..=3 {
        assert_eq!(
            cluster.terminate(id),
            Some(0),
            "node {id} did not shut down cleanly\n{}",
            cluster.logs()
        );
    }
    check_replicas_identical(&cluster, "ticks-", &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_kill9_and_restart_keeps_acked_batches() {
    let mut cluster = Cluster::start(3);
    let client = cluster.client().await;
    cluster.create_replicated_topic(&client, "ticks", 1).await;
    let producer = client.producer();
    let mut acked = Acked::new();
    for i in 0..40 {
        let batch = ticks(i * ROWS_PER_BATCH as i64, ROWS_PER_BATCH);
        let ack = producer
            .publish_to("ticks", 0, &batch)
            .await
            .unwrap_or_else(|e| panic!("publish: {e}"));
        acked.insert((0, ack.base_offset), seqs(&batch));
    }
    client.close().await;
    for id in 1..=3 {
        cluster.kill9(id);
    }
    for id in 1..=3 {
        cluster.restart(id);
    }
    let client = cluster.client().await;
    check_acked_present(&client, "ticks", &acked).await;
    let offsets: Vec<u64> = acked.keys().map(|(_, o)| *o).collect();
    let expected: Vec<u64> = (0..40).map(|i| i * ROWS_PER_BATCH as u64).collect();
    assert_eq!(
        offsets, expected,
        "acks of a sequential producer are contiguous"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_controller_state_is_rebuilt_from_the_raft_log() {
    let mut cluster = Cluster::start(3);
    let client = cluster.client().await;
    for (name, parts) in [("alpha", 2u32), ("beta", 3)] {
        cluster.create_replicated_topic(&client, name, parts).await;
    }
    client.close().await;
    // Node 2 loses its sled files while down.
    assert_eq!(cluster.terminate(2), Some(0));
    let sled_dir = cluster
        .node(2)
        .data_dir()
        .join("controller")
        .join("state.sled");
    assert!(sled_dir.exists(), "{} should exist", sled_dir.display());
    std::fs::remove_dir_all(&sled_dir).unwrap_or_else(|e| panic!("removing sled: {e}"));
    cluster.restart(2);
    // Ask node 2 alone: it must serve the same metadata as before.
    let only2 = arrowbus::Client::connect(
        arrowbus::ClientConfig::new(cluster.node(2).addr()).with_ca(cluster.ca()),
    )
    .await
    .unwrap_or_else(|e| panic!("connecting to node 2: {e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let topics = only2.admin().list_topics().await.unwrap_or_default();
        let mut got: Vec<(String, usize)> = topics
            .iter()
            .map(|t| (t.name.clone(), t.partitions.len()))
            .collect();
        got.sort();
        if got == vec![("alpha".to_owned(), 2), ("beta".to_owned(), 3)] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 2 lists {got:?} after rebuilding\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
