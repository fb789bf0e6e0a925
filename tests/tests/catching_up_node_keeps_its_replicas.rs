//! A node that was down while one of its partitions moved away and back
//! catches up with the controller's log when it restarts. It must act only
//! on the state it catches up to, never on the states in between: while
//! it replays them the partition's Raft group already counts this node as a
//! voter again (the move back made it one while it was down), so deleting
//! its replica because an old entry says "moved away" throws away entries
//! Raft counts on (jepsen-like run n5-s512: node 4 deleted a live replica
//! while replaying, its leader panicked on the follower's log reversion,
//! and acknowledged batches were later lost).
//!
//! Real `busd` processes: 3 nodes, node 1 killed; node 4 joins (a replica
//! of node 1 moves to it) and is removed again (that replica moves back to
//! node 1, which is still down). In between, a few hundred controller
//! entries, so that node 1 receives the history in several appends and
//! sees the "moved away" state for a while. A file left in node 1's replica
//! directory must survive its restart and catch-up.

use std::time::Duration;

use arrowbus_tests::acked::check_acked_present;
use arrowbus_tests::cluster::partition_dir;
use arrowbus_tests::membership::{add_node, await_moves_done, ids, loaded_cluster, remove_node};

const PARTITIONS: u32 = 4;
/// Controller entries between the move away and the move back: more than
/// one append's worth (openraft sends at most 256 entries per append).
const FILLER_ENTRIES: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_catching_up_never_deletes_a_replica_raft_counts() {
    let (mut cluster, client, mut load) = loaded_cluster(3, "ticks", PARTITIONS).await;

    // Node 1 goes down, and stays down while its partitions move.
    cluster.kill9(1);

    // Node 4 joins: 12 replicas over 4 nodes, and every node holds 4, so
    // the first partition's move takes its replica from node 1 (ties go to
    // the lowest id).
    let new = cluster.start_joining_node();
    assert_eq!(new, 4);
    let change = add_node(&cluster, 4);
    let moved_from_1: Vec<u32> = change["moves"]
        .as_array()
        .unwrap_or_else(|| panic!("{change}"))
        .iter()
        .filter(|m| ids(&m["from"]).contains(&1) && !ids(&m["to"]).contains(&1))
        .map(|m| m["partition"].as_u64().unwrap_or_else(|| panic!("{m}")) as u32)
        .collect();
    assert_eq!(moved_from_1.len(), 1, "{change}");
    let p = moved_from_1[0];
    let replicas = await_moves_done(&client, "ticks", &cluster).await;
    assert!(
        !replicas[p as usize].contains(&1),
        "partition {p} still on node 1: {replicas:?}"
    );

    // Controller entries that change nothing (deleting a topic that does
    // not exist is refused, but goes through the controller's log).
    // The client may still try the dead node 1 first: a few transport
    // errors are fine, the refusals are what count.
    let (mut refused, mut other) = (0, Vec::new());
    while refused < FILLER_ENTRIES {
        let e = client
            .admin()
            .delete_topic("no-such-topic")
            .await
            .expect_err("deleting a topic that does not exist must fail");
        if e.to_string().contains("does not exist") {
            refused += 1;
        } else {
            other.push(e.to_string());
            assert!(other.len() < 50, "delete_topic keeps failing: {other:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Node 4 leaves: its replicas move back, partition `p`'s to node 1
    // (the only node without one), which is still down: the group makes it
    // a voter again on the other two replicas' say.
    remove_node(&cluster, 4);
    let replicas = await_moves_done(&client, "ticks", &cluster).await;
    assert!(
        replicas[p as usize].contains(&1),
        "partition {p} did not move back to node 1: {replicas:?}"
    );

    // Node 1's replica of `p` is still on its disk from before; mark it.
    let dir = partition_dir(cluster.node(1), "ticks-", p);
    let sentinel = dir.join("replica-sentinel");
    std::fs::write(&sentinel, b"node 1's replica from before its crash")
        .unwrap_or_else(|e| panic!("{}: {e}", sentinel.display()));

    // Node 1 comes back and catches up: the history says its replica of
    // `p` moved away, then back. It was a voter all along.
    cluster.restart(1);
    load.await_acks(20, "after node 1 restarted", || cluster.logs())
        .await;
    let acked = load.finish().await;
    for q in 0..PARTITIONS {
        cluster
            .await_converged_on(&client, "ticks", q, &[1, 2, 3], "after node 1 caught up")
            .await;
    }
    assert!(
        sentinel.exists(),
        "node 1 deleted its replica of partition {p} while catching up, though the \
         group counted it as a voter\n{}",
        cluster.node(1).log()
    );
    check_acked_present(&client, "ticks", &acked).await;
}
