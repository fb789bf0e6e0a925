//! `busbench failover`: how long a partition is unavailable when its leader
//! dies. Starts a local three-node cluster (`busd dev --nodes 3`), publishes
//! to a 3-replica partition without pause, and `kill -9`s the partition's
//! leader N times. Each sample is the time from the kill to the first
//! acknowledgement received after it (necessarily from the new leader). The
//! killed node is restarted (`busd run` on its config) and given time to
//! catch up before the next kill. At the end every acknowledged batch is
//! read back and checked to be where its ack said.
//!
//! With `--pause-before-kill D` the publisher stops D before each kill and
//! resumes at the kill: the partition is idle when its leader dies (quiet,
//! see `arrowbus_raft::quiesce`, when D exceeds `quiesce_after_idle_ms`),
//! so the sample covers the election of an idle group's successor.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use arrowbus::{NewTopic, StartAt, SubscribeOptions};
use clap::Args;
use futures::StreamExt;

use crate::devcluster::DevCluster;
use crate::workload::Template;

#[derive(Args, Clone)]
pub struct FailoverArgs {
    /// The busd binary (release build for meaningful numbers).
    #[arg(long, value_name = "PATH_TO_BUSD")]
    pub busd: PathBuf,
    /// Scratch directory for the cluster's data (wiped first).
    #[arg(long, default_value = "/tmp/busbench-failover")]
    pub work_dir: PathBuf,
    /// Leader kills.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// First of three consecutive UDP ports.
    #[arg(long, default_value_t = 17800)]
    pub port: u16,
    /// Where to write the markdown report (default: print only).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Stop publishing this long before each kill (resume at the kill):
    /// the leader dies while its partition is idle. 0: publish throughout.
    #[arg(long, value_parser = crate::latency::parse_duration, default_value = "0s")]
    pub pause_before_kill: Duration,
}

/// One acknowledgement as the publisher saw it.
struct AckSeen {
    at: Instant,
    offset: u64,
    seq: u64,
    /// The broker's append time (ms since the epoch).
    appended_ms: i64,
}

pub fn cmd_failover(a: FailoverArgs) -> anyhow::Result<()> {
    let rt = crate::runtime()?;
    rt.block_on(run(a))
}

async fn run(a: FailoverArgs) -> anyhow::Result<()> {
    let (mut cluster, client) = DevCluster::start(&a.busd, &a.work_dir, a.port).await?;
    client
        .admin()
        .create_topic(
            NewTopic::new("failover")
                .partitions(1)
                .replication_factor(3),
        )
        .await?;
    let template = Template::with_rows(100)?;

    // Publisher: sequential publishes, each ack's time and offset recorded.
    let acks: Arc<Mutex<Vec<AckSeen>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (client, acks, stop, paused, template) = (
            client.clone(),
            acks.clone(),
            stop.clone(),
            paused.clone(),
            template,
        );
        tokio::spawn(async move {
            let producer = client.producer();
            let mut seq = 0u64;
            let mut failures = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if paused.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                let batch = match template.stamp(seq, 0) {
                    Ok(b) => b,
                    Err(_) => return failures,
                };
                match producer.publish_to("failover", 0, &batch).await {
                    Ok(ack) => {
                        if let Ok(mut v) = acks.lock() {
                            v.push(AckSeen {
                                at: Instant::now(),
                                offset: ack.base_offset,
                                seq,
                                appended_ms: ack.timestamp_ms,
                            });
                        }
                    }
                    Err(_) => failures += 1,
                }
                seq += 1;
            }
            failures
        })
    };

    let mut samples = Vec::new();
    for round in 0..a.kills {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if !a.pause_before_kill.is_zero() {
            paused.store(true, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(a.pause_before_kill).await;
        }
        let leader = client.admin().describe_topic("failover").await?.partitions[0].leader;
        let Some(pid) = cluster.node_pid(leader) else {
            bail!("round {round}: no process for leader node {leader}");
        };
        let killed_at = Instant::now();
        let killed_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let killed_ms = i64::try_from(killed_unix.as_millis()).unwrap_or(i64::MAX);
        eprintln!(
            "kill {:>2}: SIGKILL to node {leader} (pid {pid}) at unix {:.3} s",
            round + 1,
            killed_unix.as_secs_f64()
        );
        // SAFETY: SIGKILL to a process we started (directly or via busd dev).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        paused.store(false, std::sync::atomic::Ordering::SeqCst);
        let deadline = killed_at + Duration::from_secs(30);
        let first = loop {
            let hit = acks.lock().ok().and_then(|v| {
                // The first batch the new leader appended: an ack that was
                // already on its way from the killed leader does not count
                // (its broker append time predates the kill).
                v.iter()
                    .rev()
                    .take_while(|x| x.at > killed_at)
                    .filter(|x| x.appended_ms >= killed_ms)
                    .last()
                    .map(|x| x.at)
            });
            if let Some(t) = hit {
                break t;
            }
            if Instant::now() > deadline {
                bail!("round {round}: no ack within 30 s after killing node {leader}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let ms = first.duration_since(killed_at).as_secs_f64() * 1000.0;
        eprintln!(
            "kill {:>2}: leader node {leader}, first ack after {ms:.0} ms",
            round + 1
        );
        samples.push(ms);
        // Bring the node back for the next round.
        cluster.restart(&a.busd, leader)?;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let failures = publisher.await.unwrap_or(u64::MAX);

    // Every acknowledged batch is where its ack says.
    let acked: BTreeMap<u64, u64> = acks
        .lock()
        .map(|v| v.iter().map(|a| (a.offset, a.seq)).collect())
        .unwrap_or_default();
    let mut found: BTreeMap<u64, u64> = BTreeMap::new();
    let mut sub = client
        .subscribe(
            "failover",
            SubscribeOptions::default()
                .from(StartAt::Earliest)
                .until_end(),
        )
        .await?;
    while let Some(d) = sub.next().await {
        let d = d?;
        let seq = crate::workload::identify(&d.batch).map_or(u64::MAX, |(s, _)| s);
        found.insert(d.offset, seq);
    }
    let lost: Vec<u64> = acked
        .iter()
        .filter(|(off, seq)| found.get(off) != Some(seq))
        .map(|(off, _)| *off)
        .collect();

    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let max = sorted.last().copied().unwrap_or(f64::NAN);
    let report = format!(
        "# busbench failover — {}\n\n\
         Command: `busbench failover --busd {} --kills {}{}`\n\n\
         Three local nodes (`busd dev --nodes 3`, fsync always, heartbeat 100 ms, election timeout 250–500 ms), \
         one partition with 3 replicas, one producer publishing 100-row batches back to back{}. \
         Sample = time from `kill -9` of the partition leader to the first acknowledgement after it.\n\n\
         | kills | median ms | max ms | acked batches | lost acked | publishes failed after retries |\n\
         |---|---|---|---|---|---|\n\
         | {} | {median:.0} | {max:.0} | {} | {} | {failures} |\n\n\
         Samples (ms): {}\n\nLoad: {}\n",
        chrono_like_date(),
        a.busd.display(),
        a.kills,
        if a.pause_before_kill.is_zero() {
            String::new()
        } else {
            format!(" --pause-before-kill {}ms", a.pause_before_kill.as_millis())
        },
        if a.pause_before_kill.is_zero() {
            String::new()
        } else {
            format!(
                ", paused for {} ms before each kill (the partition is idle when its leader dies) and resumed at the kill",
                a.pause_before_kill.as_millis()
            )
        },
        samples.len(),
        acked.len(),
        lost.len(),
        samples.iter().map(|s| format!("{s:.0}")).collect::<Vec<_>>().join(", "),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    );
    print!("{report}");
    if let Some(out) = &a.out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    drop(cluster);
    if !lost.is_empty() {
        bail!(
            "{} acknowledged batches are missing or wrong: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
    }
    Ok(())
}

fn chrono_like_date() -> String {
    Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
