//! `busctl cluster`: every node's view of its Raft groups, side by side.
//! Each node is asked separately (a node that does not answer is shown as
//! down), so an operator sees who leads the controller, which terms the
//! nodes are in, and how far behind each leader's followers are.

use std::time::Duration;

use anyhow::Result;
use arrowbus::Client;
use arrowbus_wire::{GroupStatus, NodeChange, NodeStatus};
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

/// `busctl cluster add-node ID ADDR`.
pub async fn add_node(client: &Client, id: u64, addr: &str, out: Output) -> Result<()> {
    let change = client.admin().add_node(id, addr).await?;
    if out == Output::Json {
        return print_json(&change_json(&change));
    }
    println!(
        "node {id} ({addr}) joined the cluster; {} partition(s) move to it",
        change.moves.len()
    );
    print_moves(&change);
    if !change.moves.is_empty() {
        println!("The moves run in the background: `busctl topics describe <topic>` shows MOVING-TO until each is done.");
    }
    Ok(())
}

/// `busctl cluster remove-node ID`: waits until the node holds no replica
/// and has left the controller.
pub async fn remove_node(client: &Client, id: u64, timeout_secs: u64, out: Output) -> Result<()> {
    let mut announced = false;
    let mut last_left = None;
    let change = client
        .admin()
        .remove_node_wait(id, Duration::from_secs(timeout_secs), |c| {
            if out == Output::Json {
                return;
            }
            if !announced {
                announced = true;
                println!("moving {} partition(s) off node {id}", c.moves.len());
                print_moves(c);
            }
            if !c.removed && last_left != Some(c.moving) {
                last_left = Some(c.moving);
                eprintln!("... {} partition(s) still on node {id}", c.moving);
            }
        })
        .await?;
    if out == Output::Json {
        return print_json(&change_json(&change));
    }
    if change.removed {
        println!("node {id} left the cluster; it holds no data and can be stopped");
        Ok(())
    } else {
        anyhow::bail!(
            "node {id}: {} partition(s) still moving after {timeout_secs} s; the moves continue, run the command again to wait",
            change.moving
        )
    }
}

fn print_moves(c: &NodeChange) {
    if c.moves.is_empty() {
        return;
    }
    let rows: Vec<Vec<String>> = c
        .moves
        .iter()
        .map(|m| {
            vec![
                m.topic.clone(),
                m.partition.to_string(),
                ids(&m.from),
                ids(&m.to),
            ]
        })
        .collect();
    print!("{}", table(&["TOPIC", "PARTITION", "FROM", "TO"], &rows));
}

fn ids(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn change_json(c: &NodeChange) -> Value {
    json!({
        "moves": c.moves.iter().map(|m| json!({
            "topic": m.topic,
            "partition": m.partition,
            "from": m.from,
            "to": m.to,
        })).collect::<Vec<_>>(),
        "moving": c.moving,
        "removed": c.removed,
    })
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
