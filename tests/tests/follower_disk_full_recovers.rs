//! A follower's disk fills up while the leader keeps taking writes: the
//! follower's replica fails its log write (openraft then stops that group's
//! core for good), the partition goes on with the other two replicas, and
//! once space returns the node reopens the replica on its own and catches
//! up, without a restart. Nothing acknowledged is lost and the three logs
//! end identical. Real `busd` processes; the follower's partition directory
//! is a real, small tmpfs (needs root, as CI and the dev machines have).

use std::path::Path;
use std::time::{Duration, Instant};

use arrowbus_tests::cluster::{data_records, partition_dir, Cluster};
use arrowbus_tests::ticks;
use arrowbus_tests::tmpfs::Tmpfs;

const TOPIC: &str = "full";
/// Rows per batch: about 96 KiB of IPC each.
const ROWS: usize = 2500;
/// Free space left on the follower's file system before the load.
const LEFT_FREE: u64 = 512 * 1024;
/// Batches published while the follower's disk is full: well over
/// `LEFT_FREE`.
const BATCHES_WHILE_FULL: i64 = 20;

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name()))
            .unwrap_or_else(|err| panic!("copy {}: {err}", e.path().display()));
    }
}

async fn await_log(cluster: &Cluster, node: u64, needle: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cluster.node(node).log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{what}: node {node} never logged {needle:?} in 60 s\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_whose_disk_filled_reopens_its_replica_and_catches_up() {
    let mut cluster = Cluster::start(3);
    let client = cluster.client().await;
    cluster.create_replicated_topic(&client, TOPIC, 1).await;
    let producer = client.producer();
    let mut acked = Vec::new();
    let mut next = 0i64;
    let mut batch = || {
        let b = ticks(next, ROWS);
        next += ROWS as i64;
        b
    };
    let ack = producer.publish(TOPIC, &batch()).await.unwrap();
    acked.push(ack.base_offset);
    let leader = cluster
        .await_converged(&client, TOPIC, 0, "after create")
        .await;
    let f = (1..=3).find(|id| *id != leader).unwrap();

    // Move the follower's replica onto a 16 MiB tmpfs (while it is down).
    assert_eq!(cluster.terminate(f), Some(0), "stopping node {f}");
    let pdir = partition_dir(cluster.node(f), &format!("{TOPIC}-"), 0);
    let saved = tempfile::tempdir().unwrap();
    copy_dir(&pdir, saved.path());
    for e in std::fs::read_dir(&pdir).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let fs = Tmpfs::mount(&pdir, 16);
    copy_dir(saved.path(), &pdir);
    cluster.restart(f);
    cluster
        .await_converged(&client, TOPIC, 0, "follower back on its tmpfs")
        .await;

    // Fill it up, then keep publishing: the leader and the other follower
    // make every batch durable on a majority.
    let filler = pdir.join("filler");
    let fill = fs.free_bytes().saturating_sub(LEFT_FREE);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();
    println!(
        "node {f}'s replica: {} bytes free after the filler",
        fs.free_bytes()
    );
    for i in 0..BATCHES_WHILE_FULL {
        let ack = producer
            .publish(TOPIC, &batch())
            .await
            .unwrap_or_else(|e| panic!("publish {i} with node {f}'s disk full: {e}"));
        acked.push(ack.base_offset);
    }
    await_log(
        &cluster,
        f,
        "partition replica stopped",
        "the follower's full disk",
    )
    .await;

    // Space returns: the node reopens the replica by itself and catches up.
    std::fs::remove_file(&filler).unwrap();
    await_log(
        &cluster,
        f,
        "reopening a stopped partition replica",
        "space returned",
    )
    .await;
    for _ in 0..3 {
        let ack = producer.publish(TOPIC, &batch()).await.unwrap();
        acked.push(ack.base_offset);
    }
    cluster
        .await_converged(&client, TOPIC, 0, "after space returned")
        .await;
    drop(producer);
    drop(client);

    for id in 1..=3 {
        assert_eq!(cluster.terminate(id), Some(0), "stopping node {id}");
    }
    // (base offset, rows, body CRC) of each data record, per node.
    let logs: Vec<_> = (1..=3u64)
        .map(|id| data_records(&partition_dir(cluster.node(id), &format!("{TOPIC}-"), 0)))
        .collect();
    drop(fs);
    let lead = &logs[(leader - 1) as usize];
    for (l, id) in logs.iter().zip(1..) {
        assert_eq!(
            l, lead,
            "node {id}'s log differs from the leader's ({leader})"
        );
    }
    let offsets: Vec<u64> = lead.iter().map(|r| r.0).collect();
    assert_eq!(
        offsets, acked,
        "the log holds exactly the acked batches, in order"
    );
}
