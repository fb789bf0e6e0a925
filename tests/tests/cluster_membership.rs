//! Adding and removing nodes at runtime (`busctl cluster add-node /
//! remove-node`), with real `busd` processes and a producer publishing
//! throughout: partitions move to the new node and off the removed one, and
//! every acknowledged batch stays where its ack said.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use arrowbus_tests::acked::check_acked_present;
use arrowbus_tests::cluster::Cluster;
use arrowbus_tests::membership::{
    add_node, await_moves_done, busctl, ids, listed_nodes, loaded_cluster, remove_node,
};

const PARTITIONS: u32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_join_and_leave_under_load_and_no_acked_batch_is_lost() {
    let (mut cluster, client, mut load) = loaded_cluster(3, "ticks", PARTITIONS).await;

    // Node 4 starts empty and joins: 12 replicas over 4 nodes, so 3 move
    // to it, each replacing one replica of a different partition.
    let new = cluster.start_joining_node();
    assert_eq!(new, 4);
    let change = add_node(&cluster, 4);
    let moves = change["moves"]
        .as_array()
        .unwrap_or_else(|| panic!("{change}"));
    assert_eq!(moves.len(), 3, "{change}");
    let mut moved_partitions = BTreeSet::new();
    for m in moves {
        let (from, to) = (ids(&m["from"]), ids(&m["to"]));
        assert!(to.contains(&4) && !from.contains(&4), "{m}");
        assert_eq!(from.iter().filter(|n| !to.contains(n)).count(), 1, "{m}");
        moved_partitions.insert(m["partition"].as_u64().unwrap_or(u64::MAX));
    }
    assert_eq!(moved_partitions.len(), 3, "{change}");

    let replicas = await_moves_done(&client, "ticks", &cluster).await;
    assert_eq!(
        replicas.iter().filter(|r| r.contains(&4)).count(),
        3,
        "{replicas:?}"
    );
    for r in &replicas {
        assert_eq!(r.iter().collect::<BTreeSet<_>>().len(), 3, "{replicas:?}");
    }
    // Node 4 runs those three groups and has caught up with their leaders.
    for p in 0..PARTITIONS {
        if replicas[p as usize].contains(&4) {
            cluster
                .await_converged_on(&client, "ticks", p, &replicas[p as usize], "after add-node")
                .await;
        }
    }
    // Every partition's leader is known, wherever the client asks (node 1,
    // its first broker, no longer hosts some partitions), with the leader's
    // view of its in-sync replicas.
    let info = client
        .admin()
        .describe_topic("ticks")
        .await
        .unwrap_or_else(|e| panic!("describe: {e}"));
    for p in &info.partitions {
        assert!(p.leader != 0 && p.in_sync.contains(&p.leader), "{p:?}");
    }
    load.await_acks(20, "after add-node", || cluster.logs())
        .await;

    // Node 1 leaves: it created the controller and is a replica of every
    // partition it had, some of which it leads.
    remove_node(&cluster, 1);
    let info = client
        .admin()
        .describe_topic("ticks")
        .await
        .unwrap_or_else(|e| panic!("describe: {e}"));
    for p in &info.partitions {
        assert!(!p.replicas.contains(&1) && p.moving_to.is_empty(), "{p:?}");
        assert_eq!(p.replicas.len(), 3, "{p:?}");
    }
    // Node 1's replicas are gone from its disk.
    let topics_dir = cluster.node(1).data_dir().join("topics");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<_> = std::fs::read_dir(&topics_dir)
            .map(|d| {
                d.flatten()
                    .flat_map(|t| std::fs::read_dir(t.path()).into_iter().flatten().flatten())
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "node 1 still holds {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Node 1 was told it left, and stopped by itself, cleanly.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster
        .node(1)
        .log()
        .contains("removed this node from the cluster")
    {
        assert!(
            Instant::now() < deadline,
            "node 1 did not learn it was removed\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        cluster.terminate(1),
        Some(0),
        "node 1 did not stop cleanly\n{}",
        cluster.node(1).log()
    );
    // The cluster lists the nodes it has now.
    assert_eq!(listed_nodes(&cluster), BTreeSet::from([2, 3, 4]));
    load.await_acks(20, "after remove-node", || cluster.logs())
        .await;

    let acked = load.finish().await;
    let members = [2, 3, 4];
    for p in 0..PARTITIONS {
        cluster
            .await_converged_on(&client, "ticks", p, &members, "at the end")
            .await;
    }
    check_acked_present(&client, "ticks", &acked).await;
    for p in 0..PARTITIONS {
        assert!(
            acked.keys().any(|(q, _)| *q == p),
            "partition {p} never acknowledged a batch"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_changes_that_would_lose_replicas_are_refused() {
    let cluster = Cluster::start(3);
    let client = cluster.client().await;
    cluster.create_replicated_topic(&client, "full", 2).await;
    // Three replicas need three nodes.
    let (code, _, err) = busctl(&cluster, &["cluster", "remove-node", "3"]);
    assert_eq!(code, 1, "remove-node must fail: {err}");
    assert!(
        err.contains("InvalidArgument") && err.contains("topic 'full' keeps 3 replicas"),
        "{err}"
    );
    // An unknown node cannot be removed; a node cannot take another's address.
    let (code, _, err) = busctl(&cluster, &["cluster", "remove-node", "9"]);
    assert_eq!(code, 1);
    assert!(err.contains("node 9 is not in this cluster"), "{err}");
    let taken = cluster.node(2).addr();
    let (code, _, err) = busctl(&cluster, &["cluster", "add-node", "5", &taken]);
    assert_eq!(code, 1);
    assert!(err.contains("is node 2's address"), "{err}");
    // Nothing changed: every partition still has its three replicas, and
    // nothing is moving.
    let info = client
        .admin()
        .describe_topic("full")
        .await
        .unwrap_or_else(|e| panic!("describe: {e}"));
    for p in &info.partitions {
        let mut r = p.replicas.clone();
        r.sort_unstable();
        assert_eq!(r, vec![1, 2, 3], "{p:?}");
        assert!(p.moving_to.is_empty(), "{p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_node_can_be_removed_and_stops_when_it_comes_back() {
    let (mut cluster, client, mut load) = loaded_cluster(4, "ticks", PARTITIONS).await;
    // Node 2 crashes for good; the operator removes it.
    cluster.kill9(2);
    let change = remove_node(&cluster, 2);
    // Node 2 held 3 of the 12 replicas; each moved to the one node of 1, 3,
    // 4 that did not hold the partition yet.
    let moves = change["moves"]
        .as_array()
        .unwrap_or_else(|| panic!("{change}"));
    assert_eq!(moves.len(), 3, "{change}");
    let replicas = await_moves_done(&client, "ticks", &cluster).await;
    for r in &replicas {
        let set: BTreeSet<u64> = r.iter().copied().collect();
        assert_eq!(set.len(), 3, "{replicas:?}");
        assert!(!set.contains(&2), "{replicas:?}");
    }
    load.await_acks(20, "after removing node 2", || cluster.logs())
        .await;
    let acked = load.finish().await;
    for (p, r) in replicas.iter().enumerate() {
        cluster
            .await_converged_on(&client, "ticks", p as u32, r, "after the rebuild")
            .await;
    }
    check_acked_present(&client, "ticks", &acked).await;

    // Node 2 comes back on its old data. The removal's notice could not
    // reach it, and its controller log still makes it a voter: it campaigns.
    // The controller leader, seeing a vote request from a non-member, tells
    // it it was removed, and it stops cleanly instead of campaigning for
    // ever.
    let log_before = cluster.node(2).log().len();
    cluster.respawn(2);
    let code = cluster.wait_exit(2, Duration::from_secs(60));
    assert_eq!(
        code,
        Some(0),
        "node 2 should have stopped by itself\n{}",
        cluster.logs()
    );
    assert!(
        cluster.node(2).log()[log_before..].contains("removed this node from the cluster"),
        "{}",
        cluster.node(2).log()
    );
    // The cluster kept its data and its three nodes.
    check_acked_present(&client, "ticks", &acked).await;
    assert_eq!(listed_nodes(&cluster), BTreeSet::from([1, 3, 4]));
}
