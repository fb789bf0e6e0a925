//! `busbench failover`: how long a partition is unavailable when its leader
//! dies. Starts a local three-node cluster (`busd dev --nodes 3`), publishes
//! to a 3-replica partition without pause, and `kill -9`s the partition's
//! leader N times. Each sample is the time from the kill to the first
//! acknowledgement received after it (necessarily from the new leader). The
//! killed node is restarted (`busd run` on its config) and given time to
//! catch up before the next kill. At the end every acknowledged batch is
//! read back and checked to be where its ack said.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use arrowbus::{NewTopic, StartAt, SubscribeOptions};
use clap::Args;
use futures::StreamExt;

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
}

struct Cluster {
    supervisor: Child,
    restarted: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: signalling our own child has no memory effects.
        unsafe {
            libc::kill(self.supervisor.id() as libc::pid_t, libc::SIGTERM);
        }
        for c in &mut self.restarted {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.supervisor.wait();
    }
}

/// Pid of the `busd run` process of node `id` (started by the supervisor or
/// by us), found by its config path.
fn node_pid(dir: &Path, id: u64) -> Option<i32> {
    let needle = dir.join(format!("node-{id}")).join("busd.toml");
    let needle = needle.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        let mut args = cmd.split('\0');
        if args.any(|a| a == "run") && cmd.split('\0').any(|a| a == needle) {
            return Some(pid);
        }
    }
    None
}

pub fn cmd_failover(a: FailoverArgs) -> anyhow::Result<()> {
    let rt = crate::runtime()?;
    rt.block_on(run(a))
}

async fn run(a: FailoverArgs) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(&a.work_dir);
    std::fs::create_dir_all(&a.work_dir).context("creating the work dir")?;
    let profile = a.work_dir.join("profile.toml");
    let log = std::fs::File::create(a.work_dir.join("cluster.log"))?;
    let supervisor = Command::new(&a.busd)
        .args(["dev", "--nodes", "3", "--listen"])
        .arg(format!("127.0.0.1:{}", a.port))
        .arg("--data-dir")
        .arg(&a.work_dir)
        .arg("--profile")
        .arg(&profile)
        .env("ARROWBUS_LOG", "warn")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting busd dev --nodes 3")?;
    let mut cluster = Cluster {
        supervisor,
        restarted: Vec::new(),
    };
    let start = Instant::now();
    while !profile.exists() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "the cluster did not start in 30 s (see {}/cluster.log)",
                a.work_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let prof = arrowbus::Profile::load(&profile)?;
    let first = prof
        .brokers
        .first()
        .cloned()
        .context("the profile lists no broker")?;
    let mut cfg = arrowbus::ClientConfig::new(first);
    cfg.brokers = prof.brokers.clone();
    cfg.ca = prof.ca.clone();
    cfg.server_name = prof.server_name.clone();
    let client = arrowbus::Client::connect(cfg).await?;
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
    let acks: Arc<Mutex<Vec<(Instant, u64, u64)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (client, acks, stop, template) = (client.clone(), acks.clone(), stop.clone(), template);
        tokio::spawn(async move {
            let producer = client.producer();
            let mut seq = 0u64;
            let mut failures = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let batch = match template.stamp(seq, 0) {
                    Ok(b) => b,
                    Err(_) => return failures,
                };
                match producer.publish_to("failover", 0, &batch).await {
                    Ok(ack) => {
                        if let Ok(mut v) = acks.lock() {
                            v.push((Instant::now(), ack.base_offset, seq));
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
        let leader = client.admin().describe_topic("failover").await?.partitions[0].leader;
        let Some(pid) = node_pid(&a.work_dir, leader) else {
            bail!("round {round}: no process for leader node {leader}");
        };
        let killed_at = Instant::now();
        // SAFETY: SIGKILL to a process we started (directly or via busd dev).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        let deadline = killed_at + Duration::from_secs(30);
        let first = loop {
            let hit = acks.lock().ok().and_then(|v| {
                v.iter()
                    .rev()
                    .take_while(|x| x.0 > killed_at)
                    .last()
                    .map(|x| x.0)
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
        let config = a.work_dir.join(format!("node-{leader}")).join("busd.toml");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(a.work_dir.join(format!("node-{leader}.restart.log")))?;
        let child = Command::new(&a.busd)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("ARROWBUS_LOG", "warn")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("restarting the killed node")?;
        cluster.restarted.push(child);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let failures = publisher.await.unwrap_or(u64::MAX);

    // Every acknowledged batch is where its ack says.
    let acked: BTreeMap<u64, u64> = acks
        .lock()
        .map(|v| v.iter().map(|(_, off, seq)| (*off, *seq)).collect())
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
         Command: `busbench failover --busd {} --kills {}`\n\n\
         Three local nodes (`busd dev --nodes 3`, fsync always, heartbeat 100 ms, election timeout 400–800 ms), \
         one partition with 3 replicas, one producer publishing 100-row batches back to back. \
         Sample = time from `kill -9` of the partition leader to the first acknowledgement after it.\n\n\
         | kills | median ms | max ms | acked batches | lost acked | publishes failed after retries |\n\
         |---|---|---|---|---|---|\n\
         | {} | {median:.0} | {max:.0} | {} | {} | {failures} |\n\n\
         Samples (ms): {}\n\nLoad: {}\n",
        chrono_like_date(),
        a.busd.display(),
        a.kills,
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
