//! `busctl cluster`: every node's view of its Raft groups, side by side.
//! Each node is asked separately (a node that does not answer is shown as
//! down), so an operator sees who leads the controller, which terms the
//! nodes are in, and how far behind each leader's followers are.

use std::time::Duration;

use anyhow::Result;
use arrowbus::Client;
use arrowbus_wire::{GroupStatus, NodeStatus};
use serde_json::{json, Value};

use crate::cli::Output;
use crate::output::{print_json, table};

/// How long one node gets to answer before it is shown as down.
const NODE_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn run(client: &Client, out: Output) -> Result<()> {
    let nodes = client.nodes().await?;
    let admin = client.admin();
    let mut statuses: Vec<(u64, String, Result<NodeStatus, String>)> = Vec::new();
    for (id, addr) in &nodes {
        let r = match tokio::time::timeout(NODE_TIMEOUT, admin.node_status(*id)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} s", NODE_TIMEOUT.as_secs())),
        };
        statuses.push((*id, addr.clone(), r));
    }
    if out == Output::Json {
        let v: Vec<Value> = statuses
            .iter()
            .map(|(id, addr, r)| node_json(*id, addr, r))
            .collect();
        return print_json(&json!({ "nodes": v }));
    }
    let rows: Vec<Vec<String>> = statuses
        .iter()
        .map(|(id, addr, r)| match r {
            Ok(s) => {
                let c = &s.controller;
                vec![
                    id.to_string(),
                    addr.clone(),
                    "up".into(),
                    c.role.clone(),
                    c.term.to_string(),
                    c.committed.to_string(),
                    c.applied.to_string(),
                    led(s).to_string(),
                    s.partitions.len().to_string(),
                    max_lag(s).to_string(),
                ]
            }
            Err(e) => {
                let mut row = vec![id.to_string(), addr.clone(), "DOWN".into()];
                row.extend(std::iter::repeat_n("-".to_owned(), 7));
                eprintln!("node {id} ({addr}): {e}");
                row
            }
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "NODE",
                "ADDR",
                "STATUS",
                "CONTROLLER",
                "TERM",
                "COMMIT",
                "APPLIED",
                "LEADS",
                "REPLICAS",
                "MAX-LAG",
            ],
            &rows
        )
    );
    Ok(())
}

/// Partition groups this node leads.
fn led(s: &NodeStatus) -> usize {
    s.partitions.iter().filter(|p| p.role == "leader").count()
}

/// Largest number of entries any follower of a group this node leads is
/// behind that group's last log index.
fn max_lag(s: &NodeStatus) -> u64 {
    std::iter::once(&s.controller)
        .chain(s.partitions.iter())
        .filter(|g| g.role == "leader")
        .flat_map(|g| {
            g.followers
                .iter()
                .map(|(_, m)| g.last_log_index.saturating_sub(*m))
        })
        .max()
        .unwrap_or(0)
}

fn group_json(g: &GroupStatus) -> Value {
    json!({
        "group": g.group,
        "topic": g.topic,
        "partition": g.partition,
        "role": g.role,
        "leader": g.leader,
        "term": g.term,
        "last_log_index": g.last_log_index,
        "committed": g.committed,
        "applied": g.applied,
        "followers": g.followers.iter().map(|(id, m)| json!({
            "id": id,
            "matched": m,
            "lag": g.last_log_index.saturating_sub(*m),
        })).collect::<Vec<_>>(),
    })
}

fn node_json(id: u64, addr: &str, r: &Result<NodeStatus, String>) -> Value {
    match r {
        Ok(s) => json!({
            "id": id,
            "addr": addr,
            "up": true,
            "controller": group_json(&s.controller),
            "partitions_led": led(s),
            "partitions_hosted": s.partitions.len(),
            "max_lag": max_lag(s),
            "partitions": s.partitions.iter().map(group_json).collect::<Vec<_>>(),
        }),
        Err(e) => json!({ "id": id, "addr": addr, "up": false, "error": e }),
    }
}
