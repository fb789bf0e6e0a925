//! One test run: start the cluster, create the topic, run the workload and
//! the nemesis side by side until the time limit, heal, let the cluster
//! recover, read every partition from every node with fresh clients, and
//! leave a history behind (checked by the caller).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arrowbus::{Client, NewTopic};
use serde_json::json;
use tokio::sync::mpsc;

use crate::cluster::{Cluster, ClusterConfig};
use crate::history::{write_op, MicroOp, OpType, OpValue, Process};
use crate::schedule::{self, Fault, FaultKind, Rng, ScheduleConfig};
use crate::workload::{self, Extra, Recorder, Role, Shared, WorkloadConfig};

/// History events buffered between the workers and the file writer.
const HISTORY_QUEUE: usize = 65_536;
/// Final-read attempts per node: a node still catching up gets this many
/// chances before it counts as behind.
const FINAL_READ_ATTEMPTS: u32 = 3;
/// Process numbers of final reads start here, far above any worker's.
const FINAL_PROCESS_BASE: u64 = 1 << 40;

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub busd: PathBuf,
    pub nodes: u32,
    pub time_limit: Duration,
    pub nemesis: Vec<FaultKind>,
    pub rate: f64,
    pub seed: u64,
    pub concurrency: u32,
    pub keys: u32,
    pub dir: PathBuf,
    pub instance: u8,
    pub recovery: Duration,
    pub op_timeout: Duration,
    pub interval: Duration,
    pub final_read_timeout: Duration,
    pub busd_env: Vec<(String, String)>,
    pub replicas: u16,
    /// Aim the first round of faults at the partition leaders.
    pub leaders_first: bool,
}

impl RunConfig {
    pub fn meta(&self) -> serde_json::Value {
        json!({
            "seed": self.seed,
            "nodes": self.nodes,
            "time_limit_s": self.time_limit.as_secs(),
            "nemesis": self.nemesis.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            "rate": self.rate,
            "concurrency": self.concurrency,
            "keys": self.keys,
            "replicas": self.replicas,
            "leaders_first": self.leaders_first,
            "interval_s": self.interval.as_secs_f64(),
            "busd_env": self.busd_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "dir": self.dir.display().to_string(),
        })
    }
}

/// Run the test; returns the history file.
pub async fn run(cfg: RunConfig) -> Result<PathBuf> {
    if cfg.dir.join("nodes").exists() {
        anyhow::bail!(
            "{} holds an earlier run (its nodes/ would be reused): choose a new --dir",
            cfg.dir.display()
        );
    }
    std::fs::create_dir_all(&cfg.dir).with_context(|| format!("creating {}", cfg.dir.display()))?;
    let needs_netns = cfg.nemesis.contains(&FaultKind::Partition);
    let cluster_cfg = ClusterConfig {
        busd: cfg.busd.clone(),
        nodes: cfg.nodes,
        dir: cfg.dir.join("nodes"),
        netns: needs_netns,
        instance: cfg.instance,
        env: cfg.busd_env.clone(),
    };
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(cluster_cfg))
        .await
        .context("cluster start task")??;
    let client_cfg = cluster.client_config(None, cfg.op_timeout);
    let ids = cluster.ids();
    let cluster = Arc::new(Mutex::new(cluster));
    let topic = "jepsen".to_owned();
    create_topic(&client_cfg, &topic, cfg.keys, cfg.replicas).await?;

    let history_path = cfg.dir.join("history.jsonl");
    let file = std::fs::File::create(&history_path)
        .with_context(|| format!("creating {}", history_path.display()))?;
    let (tx, rx) = mpsc::channel(HISTORY_QUEUE);
    let writer = tokio::spawn(write_history(rx, BufWriter::new(file)));
    let start = Instant::now();
    let rec = Recorder::new(tx, start);

    let wl = WorkloadConfig {
        topic: topic.clone(),
        keys: cfg.keys,
        rate: cfg.rate,
        concurrency: cfg.concurrency,
        op_timeout: cfg.op_timeout,
        poll_wait: Duration::from_millis(100),
        client: client_cfg.clone(),
    };
    let shared = Shared::new(cfg.keys);
    let deadline = start + cfg.time_limit;
    let mut rng = Rng::new(cfg.seed);
    let plan_seed = rng.next_u64();
    let mut sched = ScheduleConfig::new(cfg.time_limit.as_millis() as u64, cfg.nemesis.clone());
    sched.interval_ms = cfg.interval.as_millis() as u64;
    if cfg.leaders_first {
        sched.first_round_target = Some(schedule::Target::Leaders);
    }
    let plan = schedule::plan(plan_seed, &sched);
    println!(
        "jepsen-like: {} nodes, {} s, nemesis {:?}, {} faults planned; history {}",
        cfg.nodes,
        cfg.time_limit.as_secs(),
        cfg.nemesis
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>(),
        plan.len(),
        history_path.display()
    );

    let mut workers = tokio::task::JoinSet::new();
    for id in 0..cfg.concurrency {
        // Half the workers produce, half consume (at least one of each).
        let role = if id % 2 == 0 {
            Role::Producer
        } else {
            Role::Consumer
        };
        workers.spawn(workload::worker(
            id,
            role,
            wl.clone(),
            shared.clone(),
            rec.clone(),
            rng.fork(u64::from(id)),
            deadline,
        ));
    }
    let nemesis = tokio::spawn(run_nemesis(
        plan,
        cluster.clone(),
        rec.clone(),
        client_cfg.clone(),
        start,
        ids.len() as u32,
    ));

    while workers.join_next().await.is_some() {}
    nemesis.await.context("nemesis task")?;

    // Heal everything, let the cluster recover, then read it all.
    rec.nemesis(OpType::Invoke, "heal-all", json!({}), None)
        .await;
    let c2 = cluster.clone();
    let healed = tokio::task::spawn_blocking(move || match c2.lock() {
        Ok(mut c) => c.heal_all(),
        Err(_) => Err(anyhow::anyhow!("cluster lock poisoned")),
    })
    .await
    .context("heal task")?;
    rec.nemesis(
        OpType::Info,
        "heal-all",
        json!({}),
        healed.err().map(|e| format!("{e:#}")),
    )
    .await;
    tokio::time::sleep(cfg.recovery).await;

    let mut process = FINAL_PROCESS_BASE;
    for id in &ids {
        let node_cfg = match cluster.lock() {
            Ok(c) => c.client_config(Some(*id), cfg.op_timeout),
            Err(_) => anyhow::bail!("cluster lock poisoned"),
        };
        for attempt in 1..=FINAL_READ_ATTEMPTS {
            let p = Process::Client(process);
            process += 1;
            rec.record(
                p,
                OpType::Invoke,
                "poll",
                OpValue::Mops(vec![MicroOp::Poll { reads: None }]),
                Extra {
                    error: None,
                    node: Some(*id),
                    final_read: true,
                },
            )
            .await;
            let r = workload::final_read(&wl, node_cfg.clone(), cfg.final_read_timeout).await;
            let caught_up = match &r {
                Ok(reads) => {
                    let acked = shared
                        .acked_end
                        .lock()
                        .map(|m| m.clone())
                        .unwrap_or_default();
                    acked.iter().all(|(k, end)| {
                        reads
                            .get(k)
                            .and_then(|v| v.last())
                            .is_some_and(|(o, _)| o + 1 >= *end)
                    })
                }
                Err(_) => false,
            };
            match r {
                Ok(reads) => {
                    rec.record(
                        p,
                        OpType::Ok,
                        "poll",
                        OpValue::Mops(vec![MicroOp::Poll { reads: Some(reads) }]),
                        Extra {
                            error: None,
                            node: Some(*id),
                            final_read: true,
                        },
                    )
                    .await
                }
                Err(e) => {
                    rec.record(
                        p,
                        OpType::Fail,
                        "poll",
                        OpValue::Mops(vec![MicroOp::Poll { reads: None }]),
                        Extra {
                            error: Some(e),
                            node: Some(*id),
                            final_read: true,
                        },
                    )
                    .await
                }
            }
            if caught_up || attempt == FINAL_READ_ATTEMPTS {
                break;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    read_node_logs(&cfg, &cluster, &client_cfg, &topic, &rec, process).await;
    drop(rec);
    writer.await.context("history writer")??;
    // Stop the nodes and remove the namespaces now, not at exit.
    if let Ok(c) = Arc::try_unwrap(cluster) {
        drop(c);
    }
    Ok(history_path)
}

/// How long replicas get, after the network final reads, to report the
/// same last log index, all applied, before their logs are read anyway.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node gets to stop gracefully before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// The per-node final reads: wait until the replicas report the same log
/// (recorded as a `replica-status` event either way), stop every node, and
/// read each node's own partition logs from disk into the history as
/// `log-read` final reads of that node.
async fn read_node_logs(
    cfg: &RunConfig,
    cluster: &Arc<Mutex<Cluster>>,
    client_cfg: &arrowbus::ClientConfig,
    topic: &str,
    rec: &Recorder,
    mut process: u64,
) {
    let (converged, status) = await_replicas(client_cfg, topic, cfg.nodes).await;
    rec.nemesis(
        OpType::Info,
        "replica-status",
        json!({"converged": converged, "groups": status}),
        None,
    )
    .await;
    let schema = topic_schema(client_cfg, topic).await;
    let c2 = cluster.clone();
    let dirs = tokio::task::spawn_blocking(move || match c2.lock() {
        Ok(mut c) => {
            c.stop_all(STOP_GRACE);
            c.ids()
                .into_iter()
                .filter_map(|id| c.data_dir(id).map(|d| (id, d)))
                .collect::<Vec<_>>()
        }
        Err(_) => Vec::new(),
    })
    .await
    .unwrap_or_default();
    for (id, dir) in dirs {
        let p = Process::Client(process);
        process += 1;
        let extra = || Extra {
            error: None,
            node: Some(id),
            final_read: true,
        };
        rec.record(
            p,
            OpType::Invoke,
            "log-read",
            OpValue::Mops(vec![MicroOp::Poll { reads: None }]),
            extra(),
        )
        .await;
        let topic = topic.to_owned();
        let keys = cfg.keys;
        let r = match &schema {
            Ok(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || {
                    // Beside the node's data: `nodes/<id>/log-dump.txt`.
                    let dump = dir.parent().map(|d| d.join("log-dump.txt"));
                    crate::disk::read_node_log(&dir, &topic, keys, &s, dump.as_deref())
                })
                .await
                .unwrap_or_else(|e| Err(format!("log read task: {e}")))
            }
            Err(e) => Err(e.clone()),
        };
        match r {
            Ok(reads) => {
                rec.record(
                    p,
                    OpType::Ok,
                    "log-read",
                    OpValue::Mops(vec![MicroOp::Poll { reads: Some(reads) }]),
                    extra(),
                )
                .await
            }
            Err(e) => {
                rec.record(
                    p,
                    OpType::Fail,
                    "log-read",
                    OpValue::Mops(vec![MicroOp::Poll { reads: None }]),
                    Extra {
                        error: Some(e),
                        ..extra()
                    },
                )
                .await
            }
        }
    }
}

/// Wait until, for every partition of `topic`, every node that holds it
/// reports one leader and the same last log index, all applied. Returns
/// whether that happened and the last status seen: per group, per node,
/// (leader, term, last log index, committed, applied).
async fn await_replicas(
    cfg: &arrowbus::ClientConfig,
    topic: &str,
    nodes: u32,
) -> (bool, serde_json::Value) {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let mut last = json!(null);
    loop {
        let attempt = async {
            let c = Client::connect(cfg.clone()).await.ok()?;
            let mut groups: std::collections::BTreeMap<u32, Vec<(u32, [u64; 5])>> =
                Default::default();
            for id in 1..=nodes {
                if let Ok(s) = c.admin().node_status(u64::from(id)).await {
                    for g in s.partitions.iter().filter(|g| g.topic == topic) {
                        groups.entry(g.partition).or_default().push((
                            id,
                            [g.leader, g.term, g.last_log_index, g.committed, g.applied],
                        ));
                    }
                }
            }
            c.close().await;
            Some(groups)
        };
        let groups = tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        let converged = !groups.is_empty()
            && groups.values().all(|rs| {
                let first = rs.first().map(|r| r.1);
                rs.iter().all(|(_, v)| {
                    Some(v[0]) == first.map(|f| f[0])
                        && v[0] != 0
                        && Some(v[2]) == first.map(|f| f[2])
                        && v[4] == v[2]
                })
            });
        let mut m = serde_json::Map::new();
        for (p, rs) in &groups {
            let mut per = serde_json::Map::new();
            for (id, v) in rs {
                per.insert(
                    id.to_string(),
                    json!({"leader": v[0], "term": v[1], "last": v[2], "committed": v[3], "applied": v[4]}),
                );
            }
            m.insert(p.to_string(), serde_json::Value::Object(per));
        }
        last = serde_json::Value::Object(m);
        if converged || Instant::now() >= deadline {
            return (converged, last);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn topic_schema(
    cfg: &arrowbus::ClientConfig,
    topic: &str,
) -> Result<Arc<arrowbus::schema::TopicSchema>, String> {
    let c = Client::connect(cfg.clone())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let info = c.admin().describe_topic(topic).await;
    c.close().await;
    let info = info.map_err(|e| format!("describing {topic}: {e}"))?;
    arrowbus::schema::TopicSchema::from_ipc(info.schema_id, info.schema_ipc)
        .map(Arc::new)
        .map_err(|e| format!("schema of {topic}: {e}"))
}

async fn create_topic(
    cfg: &arrowbus::ClientConfig,
    topic: &str,
    keys: u32,
    replicas: u16,
) -> Result<()> {
    // The cluster may still be electing leaders: retry for a while.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let c = Client::connect(cfg.clone()).await?;
            let r = c
                .admin()
                .create_topic(
                    NewTopic::new(topic)
                        .partitions(keys)
                        .replication_factor(replicas)
                        .schema(workload::schema()),
                )
                .await;
            c.close().await;
            r
        };
        match attempt.await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                eprintln!("jepsen-like: creating topic: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("creating topic {topic}: {e}")),
        }
    }
}

async fn write_history(
    mut rx: mpsc::Receiver<workload::Event>,
    mut w: BufWriter<std::fs::File>,
) -> Result<()> {
    let mut index = 0u64;
    while let Some(mut op) = rx.recv().await {
        op.index = index;
        index += 1;
        write_op(&mut w, &op).context("writing history")?;
    }
    w.flush().context("flushing history")?;
    Ok(())
}

/// Current partition leaders (node ids), empty when unknown.
async fn leaders(cfg: &arrowbus::ClientConfig) -> Vec<u32> {
    let fut = async {
        let c = Client::connect(cfg.clone()).await.ok()?;
        let info = c.admin().describe_topic("jepsen").await.ok();
        c.close().await;
        info
    };
    match tokio::time::timeout(Duration::from_secs(2), fut).await {
        Ok(Some(info)) => info
            .partitions
            .iter()
            .filter_map(|p| u32::try_from(p.leader).ok())
            .collect(),
        _ => Vec::new(),
    }
}

async fn run_nemesis(
    plan: Vec<Fault>,
    cluster: Arc<Mutex<Cluster>>,
    rec: Recorder,
    client_cfg: arrowbus::ClientConfig,
    start: Instant,
    n: u32,
) {
    for fault in plan {
        let at = start + Duration::from_millis(fault.at_ms);
        tokio::time::sleep_until(at.into()).await;
        let (begin, end) = fault.kind.names();
        let leaders = if fault.target == schedule::Target::Leaders {
            leaders(&client_cfg).await
        } else {
            Vec::new()
        };
        let targets = schedule::resolve_targets(fault.target, n, &leaders, fault.pick);
        // A partition aimed at the leaders cuts them from the other nodes
        // only: clients keep publishing to a leader that cannot commit.
        let (shape, links) = if fault.target == schedule::Target::Leaders {
            (
                "IsolateLeaders".to_owned(),
                schedule::isolate_from_nodes(&targets, n),
            )
        } else {
            (
                format!("{:?}", schedule::effective_shape(fault.shape, n)),
                schedule::partition_links(fault.shape, n, fault.pick),
            )
        };
        let value = match fault.kind {
            FaultKind::Partition => json!({
                "shape": shape,
                "leaders": if fault.target == schedule::Target::Leaders { targets.clone() } else { Vec::new() },
                "cut": links.iter().map(|(a, b)| format!("{a:?}-{b:?}")).collect::<Vec<_>>(),
            }),
            _ => json!({"target": format!("{:?}", fault.target), "nodes": targets}),
        };
        rec.nemesis(OpType::Invoke, begin, value.clone(), None)
            .await;
        let r = if fault.kind == FaultKind::Membership {
            membership(&cluster, &client_cfg, true, &targets).await
        } else {
            apply(&cluster, fault.kind, true, targets.clone(), links.clone()).await
        };
        rec.nemesis(OpType::Info, begin, value.clone(), r.err())
            .await;
        tokio::time::sleep(Duration::from_millis(fault.hold_ms)).await;
        rec.nemesis(OpType::Invoke, end, value.clone(), None).await;
        let r = if fault.kind == FaultKind::Membership {
            membership(&cluster, &client_cfg, false, &targets).await
        } else {
            apply(&cluster, fault.kind, false, targets, links).await
        };
        rec.nemesis(OpType::Info, end, value, r.err()).await;
    }
}

/// Start (`begin`) or end a fault. Blocking cluster calls run off the runtime.
async fn apply(
    cluster: &Arc<Mutex<Cluster>>,
    kind: FaultKind,
    begin: bool,
    targets: Vec<u32>,
    links: Vec<(schedule::End, schedule::End)>,
) -> Result<(), String> {
    let cluster = cluster.clone();
    let r = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut c = cluster
            .lock()
            .map_err(|_| anyhow::anyhow!("cluster lock poisoned"))?;
        match (kind, begin) {
            (FaultKind::Kill, true) => targets.iter().try_for_each(|t| c.kill(*t)),
            (FaultKind::Kill, false) => targets.iter().try_for_each(|t| c.restart(*t)),
            (FaultKind::Pause, true) => targets.iter().try_for_each(|t| c.pause(*t)),
            (FaultKind::Pause, false) => targets.iter().try_for_each(|t| c.resume(*t)),
            (FaultKind::Partition, true) => c.partition(&links),
            (FaultKind::Partition, false) => c.heal_network(),
            (FaultKind::Rollback, true) => targets.iter().try_for_each(|t| c.snapshot_data(*t)),
            (FaultKind::Rollback, false) => targets.iter().try_for_each(|t| c.rollback_data(*t)),
            (FaultKind::Membership, _) => Err(anyhow::anyhow!(
                "membership faults run through `membership`"
            )),
        }
    })
    .await;
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(e) => Err(format!("nemesis task: {e}")),
    }
}

/// How long one membership step may wait for partition moves.
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(30);

/// The membership fault. Begin: `remove-node` (replicas move off the node,
/// it leaves the controller and stops by itself). End: make sure it is out
/// (the moves may have outlasted the begin step), then wipe it, start it
/// with `cluster.join = true` and `add-node` it back, empty: replicas move
/// onto it again.
async fn membership(
    cluster: &Arc<Mutex<Cluster>>,
    client_cfg: &arrowbus::ClientConfig,
    begin: bool,
    targets: &[u32],
) -> Result<(), String> {
    let Some(&id) = targets.first() else {
        return Ok(());
    };
    let mut cfg = client_cfg.clone();
    // Admin requests wait on the controller (up to 20 s for a joining node).
    cfg.request_timeout = cfg.request_timeout.max(MEMBERSHIP_WAIT);
    let client = Client::connect(cfg)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let r = membership_step(cluster, &client, begin, id).await;
    client.close().await;
    r
}

async fn membership_step(
    cluster: &Arc<Mutex<Cluster>>,
    client: &Client,
    begin: bool,
    id: u32,
) -> Result<(), String> {
    let admin = client.admin();
    let removed = match admin
        .remove_node_wait(u64::from(id), MEMBERSHIP_WAIT, |_| {})
        .await
    {
        Ok(c) => c.removed,
        // A retry after the node already left.
        Err(e) if e.to_string().contains("is not in this cluster") => true,
        Err(e) => return Err(format!("remove-node {id}: {e}")),
    };
    if !removed {
        return Err(format!(
            "remove-node {id}: replicas still moving after {MEMBERSHIP_WAIT:?}"
        ));
    }
    let c = cluster.clone();
    let addr = blocking(move || {
        let mut c = c
            .lock()
            .map_err(|_| anyhow::anyhow!("cluster lock poisoned"))?;
        // It stops by itself once told it left (kill it if it was not told).
        if c.pid(id).is_some() && c.reap(id, Duration::from_secs(10)).is_err() {
            c.kill(id)?;
        }
        if begin {
            return Ok(String::new());
        }
        c.restart_empty_joining(id)?;
        c.spec(id)
            .map(|s| s.addr.to_string())
            .ok_or_else(|| anyhow::anyhow!("no node {id}"))
    })
    .await?;
    if begin {
        return Ok(());
    }
    // Busy while the last moves finish: retry a little.
    let deadline = Instant::now() + MEMBERSHIP_WAIT;
    loop {
        match admin.add_node(u64::from(id), &addr).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                eprintln!("jepsen-like: add-node {id}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("add-node {id} {addr}: {e}")),
        }
    }
}

/// Run a blocking cluster operation off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(e) => Err(format!("nemesis task: {e}")),
    }
}

/// Default run directory: `<store>/<unix time>-s<seed>`.
pub fn run_dir(store: &Path, seed: u64) -> PathBuf {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    store.join(format!("{now}-s{seed}"))
}
