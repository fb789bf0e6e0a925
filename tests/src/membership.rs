//! Helpers for tests that add and remove nodes through `busctl cluster`:
//! running busctl, reading its JSON, and waiting for partition moves.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::Cluster;

/// Run busctl against `cluster` with `args`: (exit code, stdout, stderr).
pub fn busctl(cluster: &Cluster, args: &[&str]) -> (i32, String, String) {
    let out = cluster
        .busctl()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running busctl: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// busctl's `--output json` answer.
pub fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("busctl JSON {stdout:?}: {e}"))
}

/// The node ids `busctl cluster` lists.
pub fn listed_nodes(cluster: &Cluster) -> std::collections::BTreeSet<u64> {
    let (code, out, err) = busctl(cluster, &["--output", "json", "cluster"]);
    assert_eq!(code, 0, "{err}");
    json(&out)["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("{out}"))
        .iter()
        .filter_map(|n| n["id"].as_u64())
        .collect()
}

/// A JSON array of node ids.
pub fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("{v} is not an array"))
        .iter()
        .map(|x| x.as_u64().unwrap_or_else(|| panic!("{x} is not a node id")))
        .collect()
}

/// Wait (up to 60 s) until no partition of `topic` is moving; returns each
/// partition's replicas.
pub async fn await_moves_done(
    client: &arrowbus::Client,
    topic: &str,
    cluster: &Cluster,
) -> Vec<Vec<u64>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(info) = client.admin().describe_topic(topic).await {
            if info.partitions.iter().all(|p| p.moving_to.is_empty()) {
                return info.partitions.iter().map(|p| p.replicas.clone()).collect();
            }
            assert!(
                Instant::now() < deadline,
                "moves of {topic} did not finish in 60 s: {:?}\n{}",
                info.partitions
                    .iter()
                    .map(|p| (&p.replicas, &p.moving_to))
                    .collect::<Vec<_>>(),
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `n` nodes, topic `topic` with `partitions` partitions of 3 replicas, and
/// a producer publishing to all of them (20 acks in).
pub async fn loaded_cluster(
    n: usize,
    topic: &'static str,
    partitions: u32,
) -> (Cluster, arrowbus::Client, crate::acked::Load) {
    let cluster = Cluster::start(n);
    let client = cluster.client().await;
    cluster
        .create_replicated_topic(&client, topic, partitions)
        .await;
    let mut load = crate::acked::Load::start(cluster.client().await, topic, partitions);
    load.await_acks(20, "before any change", || cluster.logs())
        .await;
    (cluster, client, load)
}

/// `busctl cluster add-node ID ADDR` (ADDR: node `id`'s own address) must
/// succeed; its JSON answer.
pub fn add_node(cluster: &Cluster, id: u64) -> Value {
    let addr = cluster.node(id).addr();
    let (code, out, err) = busctl(
        cluster,
        &[
            "--output",
            "json",
            "cluster",
            "add-node",
            &id.to_string(),
            &addr,
        ],
    );
    assert_eq!(code, 0, "add-node {id} failed: {err}\n{}", cluster.logs());
    json(&out)
}

/// `busctl cluster remove-node ID` must succeed and report the node gone;
/// its JSON answer.
pub fn remove_node(cluster: &Cluster, id: u64) -> Value {
    let (code, out, err) = busctl(
        cluster,
        &[
            "--output",
            "json",
            "cluster",
            "remove-node",
            &id.to_string(),
        ],
    );
    assert_eq!(
        code,
        0,
        "remove-node {id} failed: {err}\n{}",
        cluster.logs()
    );
    let change = json(&out);
    assert_eq!(change["removed"], Value::Bool(true), "{change}");
    change
}
