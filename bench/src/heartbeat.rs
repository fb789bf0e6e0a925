//! `busbench heartbeat`: what an idle cluster costs as its partition count
//! grows. Every partition is its own Raft group, and each leader sends each
//! follower a heartbeat every interval even when no data flows; this mode
//! puts a number on that. For each partition count it starts a fresh local
//! three-node cluster, creates one topic with that many 3-replica
//! partitions (every node hosts every partition and leads a third of them),
//! waits until every partition has a leader, and then measures the nodes'
//! CPU time and memory over an idle window.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use arrowbus::NewTopic;
use clap::Args;

use crate::devcluster::DevCluster;
use crate::latency::parse_duration;
use crate::spawn::proc_stats;

#[derive(Args, Clone)]
pub struct HeartbeatArgs {
    /// The busd binary (release build for meaningful numbers).
    #[arg(long, value_name = "PATH_TO_BUSD")]
    pub busd: PathBuf,
    /// Partition counts to measure, each on a fresh cluster.
    #[arg(long, value_delimiter = ',', default_value = "0,100,300")]
    pub partitions: Vec<u32>,
    /// Length of each idle measurement window.
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    pub idle: Duration,
    /// Scratch directory for the clusters' data (wiped first).
    #[arg(long, default_value = "/tmp/busbench-heartbeat")]
    pub work_dir: PathBuf,
    /// First of three consecutive UDP ports.
    #[arg(long, default_value_t = 17900)]
    pub port: u16,
    /// Where to write the markdown report (default: print only).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

struct Row {
    partitions: u32,
    cpu_pct_per_node: Vec<f64>,
    rss_mib_per_node: Vec<f64>,
}

pub fn cmd_heartbeat(a: HeartbeatArgs) -> anyhow::Result<()> {
    let rt = crate::runtime()?;
    rt.block_on(run(a))
}

async fn run(a: HeartbeatArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for &p in &a.partitions {
        let row = measure(&a, p).await?;
        eprintln!(
            "{p} partitions: CPU per node {:?} %",
            row.cpu_pct_per_node
                .iter()
                .map(|c| format!("{c:.1}"))
                .collect::<Vec<_>>()
        );
        rows.push(row);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut md = format!(
        "# busbench heartbeat — idle cluster cost by partition count\n\n\
         Command: `busbench heartbeat --busd {} --partitions {} --idle {}s`\n\n\
         Three local nodes (`busd dev --nodes 3`, heartbeat 100 ms), one topic of N partitions \
         with 3 replicas (every node hosts every partition and leads about a third), no data \
         flowing. CPU is the nodes' user + system time over the idle window, in percent of \
         one core; the machine has {} cores.\n\n\
         | partitions | Raft groups per node | CPU % per node (each) | CPU % per node (mean) | \
         CPU % per 100 partitions per node | RSS MiB per node (each) |\n\
         |---:|---:|---|---:|---:|---|\n",
        a.busd.display(),
        a.partitions
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        a.idle.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let base = rows
        .first()
        .filter(|r| r.partitions == 0)
        .map(|r| mean(&r.cpu_pct_per_node));
    for r in &rows {
        let m = mean(&r.cpu_pct_per_node);
        let per100 = match base {
            Some(b) if r.partitions > 0 => {
                format!("{:.2}", (m - b) * 100.0 / f64::from(r.partitions))
            }
            _ => "–".to_owned(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {m:.1} | {per100} | {} |\n",
            r.partitions,
            r.partitions + 1,
            join(&r.cpu_pct_per_node, 1),
            join(&r.rss_mib_per_node, 0),
        ));
    }
    md.push_str(&format!(
        "\n\"Raft groups per node\" counts the controller group. \"Per 100 partitions\" \
         subtracts the 0-partition row.\n\nLoad at the end: {}\n",
        load.trim()
    ));
    print!("{md}");
    if let Some(out) = &a.out {
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

async fn measure(a: &HeartbeatArgs, partitions: u32) -> anyhow::Result<Row> {
    let dir = a.work_dir.join(format!("p{partitions}"));
    let (cluster, client) = DevCluster::start(&a.busd, &dir, a.port).await?;
    if partitions > 0 {
        client
            .admin()
            .create_topic(
                NewTopic::new("idle")
                    .partitions(partitions)
                    .replication_factor(3),
            )
            .await
            .context("creating the topic")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let t = client.admin().describe_topic("idle").await?;
            if t.partitions.iter().all(|p| p.leader != 0) {
                break;
            }
            if Instant::now() > deadline {
                bail!("{partitions} partitions: not every partition had a leader after 120 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    client.close().await;
    // Let creation, elections and catch-up finish before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pids: Vec<u32> = (1..=3)
        .map(|id| {
            cluster
                .node_pid(id)
                .and_then(|p| u32::try_from(p).ok())
                .with_context(|| format!("no process for node {id}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let before: Vec<f64> = pids
        .iter()
        .map(|&p| proc_stats(p).map(|s| s.cpu_s))
        .collect::<anyhow::Result<_>>()?;
    let t0 = Instant::now();
    tokio::time::sleep(a.idle).await;
    let wall = t0.elapsed().as_secs_f64();
    let after: Vec<_> = pids
        .iter()
        .map(|&p| proc_stats(p))
        .collect::<anyhow::Result<_>>()?;
    drop(cluster);
    Ok(Row {
        partitions,
        cpu_pct_per_node: after
            .iter()
            .zip(&before)
            .map(|(s, b)| (s.cpu_s - b) * 100.0 / wall)
            .collect(),
        rss_mib_per_node: after.iter().map(|s| s.vm_rss_kb as f64 / 1024.0).collect(),
    })
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn join(v: &[f64], decimals: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.decimals$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}
