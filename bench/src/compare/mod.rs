//! `busbench compare`: arrowbus side by side with Apache Kafka, NATS
//! JetStream and Redis Streams on this machine, with the same frames.
//!
//! For every repetition, the systems run one after another, the order
//! rotating between repetitions (so none always runs first or on the hotter
//! machine). Each system gets freshly started servers in a temporary
//! directory, a warm-up phase that is thrown away (JIT, page cache,
//! connections), then per batch size: a closed-loop phase for its maximum
//! publish throughput, and paced phases at fixed fractions of that maximum
//! for publish→deliver latency (measured from intended send times: no
//! coordinated omission). Its servers are stopped before the next system
//! starts. The report gives medians over repetitions, each number next to
//! its durability setting.
//!
//! The phases are the ones `busbench run` measures (`run::run_phase` over
//! the `bus::Bus` of each system): same tick batches, same Arrow IPC bodies,
//! same accounting of loss and latency.
//!
//! Peer clients (rdkafka, async-nats, redis) are compiled only with the
//! `compare` feature; without it the peers are reported as not built.

mod python;
mod report;
mod servers;

#[cfg(feature = "compare")]
mod kafka;
#[cfg(feature = "compare")]
mod nats;
#[cfg(feature = "compare")]
mod redis_streams;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::bus::{Arrowbus, Bus};
use crate::latency::parse_duration;
use crate::report::Environment;
use crate::run::{self, BrokerWatch, Limit, PhaseConfig, PhaseResult};
use crate::spawn::{group_stats, RssWatch};
use crate::workload::SizeSpec;

use servers::{PeerPaths, Servers};

#[derive(Args)]
pub struct CompareArgs {
    /// Peers to measure beside arrowbus: kafka, nats, redis; `none` for
    /// arrowbus alone (e.g. `--peers none --replicas 1,3`).
    #[arg(long, value_delimiter = ',', default_value = "kafka,nats,redis")]
    peers: Vec<Peer>,
    /// Replication factors: 1 (single node) and/or 3 (three nodes on loopback).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    replicas: Vec<usize>,
    /// Durability settings of the peers: `default` (each system's own
    /// default), `strong` (fsync per write: Kafka flush.messages=1, NATS
    /// sync_interval always, Redis appendfsync always). arrowbus always
    /// fsyncs before the ack.
    #[arg(long, value_delimiter = ',', default_value = "default,strong")]
    durability: Vec<Durability>,
    /// The busd binary (default: next to busbench, i.e. target/release/busd).
    #[arg(long, value_name = "PATH")]
    busd: Option<PathBuf>,
    /// Batch sizes: row counts (1, 1000) or encoded sizes (64k, 1m).
    #[arg(long, value_delimiter = ',', value_parser = SizeSpec::parse, default_value = "1,1000,64k,1m")]
    sizes: Vec<SizeSpec>,
    /// Offered rates of the latency phases, in percent of the system's
    /// maximum just measured for that size.
    #[arg(long, value_delimiter = ',', default_value = "10,50,80")]
    load: Vec<f64>,
    /// Length of each measured phase.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Closed-loop warm-up of each started system, not reported.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    warmup: Duration,
    /// Repetitions; the report gives medians.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Unacknowledged batches a peer producer may have in flight (all
    /// peers are also held to arrowbus's 64 MiB of unacknowledged bytes).
    /// arrowbus's own client allows 5 batches per partition.
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// arrowbus producer linger in milliseconds (`ProducerConfig::linger`),
    /// or `off`. The default `0` coalesces the sends that queue up while the
    /// partition's window is full into one stored batch, as librdkafka (the
    /// Kafka driver) batches the messages that queue up while its requests
    /// are in flight; it adds no wait. `off`: every send is its own batch.
    #[arg(long, value_name = "MS|off", default_value = "0", value_parser = parse_linger)]
    arrowbus_linger: LingerMs,
    /// Where servers keep their data (fresh sub-directories, removed after).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    work_dir: PathBuf,
    /// Where bench/peers/fetch.sh put the peers (its peers.env).
    #[arg(long, env = "BUSBENCH_PEERS")]
    peers_dir: Option<PathBuf>,
    /// Do not run bench/peers/fetch.sh when peers.env is missing.
    #[arg(long)]
    no_fetch: bool,
    /// After publishing, how long to wait for missing acks and deliveries.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    drain_timeout: Duration,
    #[command(flatten)]
    disk: crate::disk::DiskBaselineArgs,
    /// The Python producers row: a Python interpreter with pyarrow,
    /// confluent-kafka, nats-py and maturin (default: the virtualenv
    /// bench/peers/fetch.sh makes, `BENCH_PYTHON` in its peers.env).
    /// busbench builds arrowbus's Python package from this tree into it.
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    /// Leave out the Python producers row.
    #[arg(long)]
    no_python: bool,
    /// Report path (.md; the .json and the PNG plots go next to it).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Peer {
    Kafka,
    Nats,
    Redis,
    /// No peer: arrowbus alone.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Durability {
    Default,
    Strong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum System {
    Arrowbus,
    Kafka,
    Nats,
    Redis,
}

/// One system in one configuration: what a row of the report is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Contender {
    pub replicas: usize,
    pub system: System,
    /// Fsync before every ack (arrowbus always).
    pub strong: bool,
}

impl Contender {
    pub fn label(&self) -> String {
        let r = self.replicas;
        match (self.system, self.strong) {
            (System::Arrowbus, _) => format!("arrowbus R{r}"),
            (System::Kafka, false) => format!("Kafka R{r}"),
            (System::Kafka, true) => format!("Kafka R{r} flush"),
            (System::Nats, false) => format!("NATS JetStream R{r}"),
            (System::Nats, true) => format!("NATS JetStream R{r} sync"),
            (System::Redis, false) => "Redis everysec".into(),
            (System::Redis, true) => "Redis always".into(),
        }
    }

    /// When an ack is sent, in words: stated next to every number.
    pub fn durability(&self) -> String {
        let quorum = if self.replicas > 1 {
            format!(" on a quorum (2 of {})", self.replicas)
        } else {
            String::new()
        };
        match (self.system, self.strong) {
            (System::Arrowbus, _) => format!("fsync always: ack after fdatasync{quorum}"),
            (System::Kafka, false) => format!(
                "acks=all, idempotent; Kafka default: no fsync, ack after the page cache{}",
                if self.replicas > 1 { " of all in-sync replicas (min.insync.replicas=2)" } else { "" }
            ),
            (System::Kafka, true) => format!(
                "acks=all, idempotent, flush.messages=1: every replica fsyncs each append{}",
                if self.replicas > 1 { "; ack when all in-sync replicas have it (min.insync.replicas=2)" } else { "" }
            ),
            (System::Nats, false) => format!("file storage, default sync_interval (fsync every 2 min): ack after the page cache{quorum}"),
            (System::Nats, true) => format!("file storage, sync_interval: always: ack after fsync{quorum}"),
            (System::Redis, false) => "AOF, appendfsync everysec: ack after write(), fsync once a second".into(),
            (System::Redis, true) => "AOF, appendfsync always: ack after the AOF write and fsync".into(),
        }
    }
}

/// A measured phase of one contender.
pub struct Measured {
    pub contender: Contender,
    pub rep: usize,
    /// `None`: the closed-loop (maximum) phase; else percent of that maximum.
    pub load_pct: Option<f64>,
    pub size: SizeSpec,
    pub phase: PhaseResult,
    /// The warm-up after the servers started: not in any median, only in
    /// the accounting of acknowledged batches.
    pub warmup: bool,
    /// Published by the Python driver (`python`), not busbench's Rust one.
    pub python: bool,
}

/// What was learnt about a contender's servers.
#[derive(Default, Clone)]
pub struct ServerInfo {
    pub version: String,
    pub commands: Vec<String>,
    pub configs: Vec<(String, String)>,
    /// Largest summed VmRSS sampled over a whole run of the contender.
    pub peak_rss_kb: Vec<u64>,
    pub stops: Vec<String>,
    /// The load average (1/5/15 min) when each repetition of it started.
    pub loads: Vec<String>,
    /// The Python client that published its Python row, with its version.
    pub python_client: Option<String>,
    /// Parts of a run that failed without failing the run (for the notes).
    pub failures: Vec<String>,
}

pub fn cmd_compare(mut a: CompareArgs) -> anyhow::Result<()> {
    a.peers.retain(|&p| p != Peer::None);
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if let Some(r) = a.replicas.iter().find(|&&r| r != 1 && r != 3) {
        bail!("--replicas {r}: use 1 and/or 3");
    }
    if let Some(l) = a.load.iter().find(|&&l| !(l > 0.0 && l < 100.0)) {
        bail!("--load {l}: percentages of the maximum, between 0 and 100");
    }
    let env = Environment::probe();
    let busd = match &a.busd {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating busbench")?
            .with_file_name("busd"),
    };
    if !busd.exists() {
        bail!(
            "no busd at {} (cargo build --release -p arrowbus-broker, or pass --busd)",
            busd.display()
        );
    }
    let mut notes = Vec::new();
    let peers = peer_paths(&a, &mut notes)?;
    let contenders = contenders(&a, &mut notes);
    let python = if a.no_python {
        Err("not measured: --no-python".to_owned())
    } else {
        prepare_python(&a, peers.as_ref())
    };
    if let Err(why) = &python {
        eprintln!("busbench: Python producers {why}");
    }
    let rt = crate::runtime()?;
    let started = Instant::now();
    let mut measured = Vec::new();
    let mut infos: Vec<(Contender, ServerInfo)> = Vec::new();
    let mut disks = Vec::new();
    for rep in 0..a.reps {
        if !a.disk.no_disk {
            // The disk every server writes to, measured in the same run (per
            // repetition: neighbours on a shared machine change it).
            std::fs::create_dir_all(&a.work_dir)
                .with_context(|| format!("creating {}", a.work_dir.display()))?;
            eprintln!(
                "busbench: compare rep {}/{}: disk baseline in {}",
                rep + 1,
                a.reps,
                a.work_dir.display()
            );
            disks.push(crate::disk::measure(
                &a.work_dir,
                a.disk.dd_mib,
                a.disk.sync_for,
            ));
        }
        // Rotate the order each repetition: systems alternate.
        let mut order = contenders.clone();
        let n = order.len().max(1);
        order.rotate_left(rep % n);
        for c in order {
            let load = crate::report::load_average();
            eprintln!(
                "busbench: compare rep {}/{}: {} (load {load})",
                rep + 1,
                a.reps,
                c.label(),
            );
            match run_contender(&rt, &a, &busd, peers.as_ref(), python.as_ref().ok(), c, rep) {
                Ok(Some((phases, mut info))) => {
                    measured.extend(phases);
                    notes.append(&mut info.failures);
                    info.loads.push(load);
                    match infos.iter_mut().find(|(k, _)| *k == c) {
                        Some((_, i)) => {
                            i.peak_rss_kb.extend(info.peak_rss_kb);
                            i.stops.extend(info.stops);
                            i.loads.extend(info.loads);
                            i.python_client = i.python_client.take().or(info.python_client);
                        }
                        None => infos.push((c, info)),
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    eprintln!("busbench: {}: {e:#}", c.label());
                    notes.push(format!("{} (rep {}): failed: {e:#}", c.label(), rep + 1));
                }
            }
        }
    }
    notes.push(format!(
        "load average (1/5/15 min) at the end: {}; the comparison took {:.0} min",
        crate::report::load_average(),
        started.elapsed().as_secs_f64() / 60.0
    ));
    let mut unavailable = unavailable(&a, &busd, &contenders);
    if let Err(why) = &python {
        unavailable.push(("Python producers".to_owned(), why.clone()));
    }
    let r = report::CompareReport {
        env,
        args: report::ArgsSummary {
            sizes: a.sizes.clone(),
            load: a.load.clone(),
            duration: a.duration,
            warmup: a.warmup,
            reps: a.reps,
            window: a.window,
            arrowbus_linger_ms: a.arrowbus_linger.0,
            python: python.as_ref().ok().map(|p| p.versions.clone()),
        },
        contenders,
        infos,
        measured,
        disks,
        unavailable,
        notes,
    };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| crate::default_out("compare"));
    // The plots need fetch.sh's matplotlib, also when no peer was measured.
    let plot_python = peers.as_ref().map(|p| p.plot_python.clone()).or_else(|| {
        PeerPaths::load(&peers_dir(&a).join("peers.env"))
            .ok()
            .map(|p| p.plot_python)
    });
    let written = r.write(&out, plot_python.as_deref())?;
    println!("{}", r.markdown());
    for w in written {
        eprintln!("busbench: wrote {}", w.display());
    }
    Ok(())
}

/// `--arrowbus-linger`: milliseconds, `None` for `off`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LingerMs(pub Option<f64>);

fn parse_linger(s: &str) -> Result<LingerMs, String> {
    if s == "off" {
        return Ok(LingerMs(None));
    }
    match s.parse::<f64>() {
        Ok(ms) if ms.is_finite() && ms >= 0.0 => Ok(LingerMs(Some(ms))),
        _ => Err(format!("{s:?}: milliseconds (0 or more) or `off`")),
    }
}

/// Rows that cannot be measured, with the reason (for the report).
fn unavailable(a: &CompareArgs, busd: &Path, _c: &[Contender]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if a.replicas.contains(&3) {
        if let Ok(Err(na)) = servers::start_arrowbus_cluster_probe(busd) {
            out.push(("arrowbus R3".to_owned(), na.0));
        }
        if a.peers.contains(&Peer::Redis) {
            out.push((
                "Redis R3".to_owned(),
                "not measured: Redis replication is asynchronous (no acknowledged write waits for a replica), so there is no equal-durability three-replica row".to_owned(),
            ));
        }
    }
    out
}

/// The interpreter of the Python producers row, with arrowbus's Python
/// package freshly built from this tree (release) and installed into it.
/// `Err` says why the row cannot be measured.
fn prepare_python(
    a: &CompareArgs,
    peers: Option<&PeerPaths>,
) -> Result<python::PythonDriver, String> {
    let from_env = || {
        peers
            .cloned()
            .or_else(|| PeerPaths::load(&peers_dir(a).join("peers.env")).ok())
            .map(|p| p.bench_python)
            .filter(|p| !p.as_os_str().is_empty())
    };
    let Some(py) = a.python.clone().or_else(from_env) else {
        return Err(format!(
            "not measured: no Python given (--python PATH, or run bench/peers/fetch.sh {} for its BENCH_PYTHON)",
            peers_dir(a).display()
        ));
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let maturin = py.with_file_name("maturin");
    let wheels =
        tempfile::tempdir().map_err(|e| format!("not measured: a temporary directory: {e}"))?;
    eprintln!(
        "busbench: building arrowbus's Python package (release) for {}",
        py.display()
    );
    let run = |cmd: &mut std::process::Command, what: &str| -> Result<(), String> {
        let out = cmd
            .output()
            .map_err(|e| format!("not measured: {what}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "not measured: {what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    run(
        std::process::Command::new(&maturin)
            .args(["build", "--release", "-q", "-m"])
            .arg(repo.join("client-py/Cargo.toml"))
            .arg("-o")
            .arg(wheels.path()),
        &format!("{} build (arrowbus's Python package)", maturin.display()),
    )?;
    let wheel = std::fs::read_dir(wheels.path())
        .map_err(|e| format!("not measured: reading the built wheel: {e}"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or("not measured: maturin built no wheel")?;
    run(
        std::process::Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--force-reinstall",
                "--no-deps",
            ])
            .arg(&wheel),
        "installing the arrowbus wheel",
    )?;
    python::PythonDriver::probe(&py).map_err(|e| format!("not measured: {e}"))
}

/// `--peers-dir`, `$BUSBENCH_PEERS`, or `~/.cache/busbench-peers`.
fn peers_dir(a: &CompareArgs) -> PathBuf {
    a.peers_dir.clone().unwrap_or_else(|| {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(".cache/busbench-peers")
    })
}

fn peer_paths(a: &CompareArgs, notes: &mut Vec<String>) -> anyhow::Result<Option<PeerPaths>> {
    if a.peers.is_empty() {
        return Ok(None);
    }
    if !cfg!(feature = "compare") {
        notes.push("peers not measured: this busbench was built without its `compare` feature (cargo build --release -p arrowbus-bench --features compare)".into());
        return Ok(None);
    }
    let dir = peers_dir(a);
    let env_file = dir.join("peers.env");
    // A peers.env from before the Python producers row has no BENCH_PYTHON:
    // fetch.sh keeps what is there and adds it.
    let stale = || {
        !a.no_python
            && a.python.is_none()
            && PeerPaths::load(&env_file).is_ok_and(|p| p.bench_python.as_os_str().is_empty())
    };
    if !env_file.exists() || stale() {
        if a.no_fetch {
            bail!(
                "{} is missing: run bench/peers/fetch.sh {}",
                env_file.display(),
                dir.display()
            );
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/fetch.sh");
        eprintln!(
            "busbench: fetching peers: {} {}",
            script.display(),
            dir.display()
        );
        let status = std::process::Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() {
            bail!("{} failed ({status})", script.display());
        }
    }
    let p = PeerPaths::load(&env_file)?;
    if !p.nats_note.is_empty() {
        notes.push(format!("NATS: {}", p.nats_note));
    }
    Ok(Some(p))
}

fn contenders(a: &CompareArgs, notes: &mut Vec<String>) -> Vec<Contender> {
    let mut out = Vec::new();
    let mut reps = a.replicas.clone();
    reps.sort_unstable();
    reps.dedup();
    let mut peers = a.peers.clone();
    peers.retain(|&p| p != Peer::None);
    peers.sort();
    peers.dedup();
    let mut dur = a.durability.clone();
    dur.sort();
    dur.dedup();
    for &r in &reps {
        out.push(Contender {
            replicas: r,
            system: System::Arrowbus,
            strong: true,
        });
        for &p in &peers {
            let system = match p {
                Peer::Kafka => System::Kafka,
                Peer::Nats => System::Nats,
                Peer::Redis => System::Redis,
                Peer::None => continue,
            };
            if system == System::Redis && r > 1 {
                continue;
            }
            for &d in &dur {
                out.push(Contender {
                    replicas: r,
                    system,
                    strong: d == Durability::Strong,
                });
            }
        }
    }
    if out.iter().all(|c| c.system == System::Arrowbus) && !peers.is_empty() {
        notes.push("no peer contender selected".into());
    }
    out
}

type ContenderRun = (Vec<Measured>, ServerInfo);

/// What one run of a contender measured.
struct ContenderMeasured {
    phases: Vec<Measured>,
    /// Largest summed VmRSS of the servers over the run.
    peak_rss_kb: u64,
    python_client: Option<String>,
    /// Python phases that could not be measured, for the notes.
    python_failures: Vec<String>,
}

/// Start one contender's servers, measure every size, stop them. `None`
/// when the contender cannot run in this build (reported separately).
fn run_contender(
    rt: &tokio::runtime::Runtime,
    a: &CompareArgs,
    busd: &Path,
    peers: Option<&PeerPaths>,
    python: Option<&python::PythonDriver>,
    c: Contender,
    rep: usize,
) -> anyhow::Result<Option<ContenderRun>> {
    let mut info = ServerInfo::default();
    let (mut servers, arrowbus_cfg) = match c.system {
        System::Arrowbus if c.replicas == 1 => {
            let (s, cfg) = servers::start_arrowbus(busd, &a.work_dir)?;
            info.version = "busd (this tree)".into();
            (s, Some(cfg))
        }
        System::Arrowbus => match servers::start_arrowbus_cluster(busd, &a.work_dir)? {
            Ok((s, cfg)) => {
                info.version = "busd (this tree), 3 nodes: `busd dev --nodes 3`".into();
                (s, Some(cfg))
            }
            Err(_) => return Ok(None),
        },
        _ => {
            let Some(p) = peers else { return Ok(None) };
            let s = match c.system {
                System::Kafka => {
                    info.version = format!("Apache Kafka {} (KRaft)", p.kafka_version);
                    servers::start_kafka(p, &a.work_dir, c.replicas)?
                }
                System::Nats => {
                    info.version = tool_version(&p.nats_server, &["--version"]);
                    servers::start_nats(p, &a.work_dir, c.replicas, c.strong)?
                }
                _ => {
                    info.version = tool_version(&p.redis_server, &["--version"]);
                    servers::start_redis(
                        p,
                        &a.work_dir,
                        if c.strong { "always" } else { "everysec" },
                    )?
                }
            };
            (s, None)
        }
    };
    info.commands = servers.commands.clone();
    info.configs = servers.configs.clone();
    let result = rt.block_on(measure_contender(a, c, rep, &servers, arrowbus_cfg, python));
    let rss = group_stats(&servers.pids());
    info.stops = servers.stop();
    match result {
        Ok(m) => {
            info.peak_rss_kb.push(m.peak_rss_kb.max(rss.vm_rss_kb));
            info.python_client = m.python_client;
            info.failures = m.python_failures;
            Ok(Some((m.phases, info)))
        }
        Err(e) => Err(e.context(format!("server log tail:\n{}", servers.log_tail()))),
    }
}

async fn make_bus(
    a: &CompareArgs,
    c: Contender,
    servers: &Servers,
    arrowbus_cfg: Option<arrowbus::ClientConfig>,
) -> anyhow::Result<Box<dyn Bus>> {
    let _ = (a, servers);
    match (c.system, arrowbus_cfg) {
        (System::Arrowbus, Some(cfg)) => {
            let client = arrowbus::Client::connect(cfg)
                .await
                .context("connecting to busd")?;
            if c.replicas > 1 {
                await_nodes(&client, c.replicas).await?;
            }
            Ok(Box::new(Arrowbus {
                client,
                replication_factor: c.replicas as u16,
                linger: a
                    .arrowbus_linger
                    .0
                    .map(|ms| Duration::from_secs_f64(ms / 1000.0)),
            }))
        }
        #[cfg(feature = "compare")]
        (System::Kafka, _) => Ok(Box::new(kafka::Kafka::connect(
            &servers.addrs,
            c.replicas,
            c.strong,
            a.window,
        )?)),
        #[cfg(feature = "compare")]
        (System::Nats, _) => Ok(Box::new(
            nats::Nats::connect(&servers.addrs, c.replicas, a.window).await?,
        )),
        #[cfg(feature = "compare")]
        (System::Redis, _) => Ok(Box::new(
            redis_streams::Redis::connect(&servers.addrs, a.window).await?,
        )),
        _ => bail!("{} is not built into this busbench", c.label()),
    }
}

/// Wait until every node of a `busd dev --nodes N` cluster answers a
/// status request (the supervisor writes the profile as soon as it has
/// started the processes, before they listen and elect a controller).
async fn await_nodes(client: &arrowbus::Client, nodes: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
    loop {
        let mut up = 0;
        for id in 1..=nodes as u64 {
            if client.admin().node_status(id).await.is_ok() {
                up += 1;
            }
        }
        if up == nodes && client.admin().list_topics().await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{up} of {nodes} nodes answered within {CLUSTER_READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a fresh local cluster may take until every node answers.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(60);

fn phase_cfg(
    a: &CompareArgs,
    name: String,
    size: SizeSpec,
    rate: Option<f64>,
    d: Duration,
) -> PhaseConfig {
    PhaseConfig {
        name,
        size,
        rate,
        limit: Limit::Duration(d),
        partitions: 1,
        drain_timeout: a.drain_timeout,
        subscriber_delay: None,
        wait_for_delivery: true,
        hold_after: Duration::ZERO,
        keep_topic: false,
    }
}

async fn measure_contender(
    a: &CompareArgs,
    c: Contender,
    rep: usize,
    servers: &Servers,
    arrowbus_cfg: Option<arrowbus::ClientConfig>,
    python: Option<&python::PythonDriver>,
) -> anyhow::Result<ContenderMeasured> {
    let target = python::Target {
        system: c.system,
        servers: servers.addrs.join(","),
        ca: arrowbus_cfg.as_ref().and_then(|c| c.ca.clone()),
        server_name: arrowbus_cfg.as_ref().and_then(|c| c.server_name.clone()),
    };
    let bus = make_bus(a, c, servers, arrowbus_cfg).await?;
    let pids = servers.pids();
    let (rss, task) = RssWatch::spawn(pids.clone(), Instant::now());
    let watch = BrokerWatch { pids, rss };
    let mut out = Vec::new();
    let mut python_client = None;
    let mut python_failures = Vec::new();
    let slug = format!(
        "r{}-{:?}{}",
        c.replicas,
        c.system,
        if c.strong { "s" } else { "d" }
    )
    .to_ascii_lowercase();
    let result = async {
        if !a.warmup.is_zero() {
            let w = run::run_phase(
                bus.as_ref(),
                Some(&watch),
                &phase_cfg(
                    a,
                    format!("{slug}-warmup"),
                    SizeSpec::Rows(1000),
                    None,
                    a.warmup,
                ),
            )
            .await?;
            if !w.failures().is_empty() {
                eprintln!("busbench:   warm-up: {}", w.failures().join("; "));
            }
            out.push(Measured {
                contender: c,
                rep,
                load_pct: None,
                size: SizeSpec::Rows(1000),
                phase: w,
                warmup: true,
                python: false,
            });
        }
        for &size in &a.sizes {
            let max = run::run_phase(
                bus.as_ref(),
                Some(&watch),
                &phase_cfg(
                    a,
                    format!("{slug}-{}-max", size.slug()),
                    size,
                    None,
                    a.duration,
                ),
            )
            .await?;
            crate::print_phase(&max);
            let capacity = (max.acked > 0).then(|| max.acked_batches_per_s());
            out.push(Measured {
                contender: c,
                rep,
                load_pct: None,
                size,
                phase: max,
                warmup: false,
                python: false,
            });
            let Some(capacity) = capacity else { continue };
            for &pct in &a.load {
                let rate = (capacity * pct / 100.0).max(1.0).round();
                let p = run::run_phase(
                    bus.as_ref(),
                    Some(&watch),
                    &phase_cfg(
                        a,
                        format!("{slug}-{}-{pct:.0}pct", size.slug()),
                        size,
                        Some(rate),
                        a.duration,
                    ),
                )
                .await?;
                crate::print_phase(&p);
                out.push(Measured {
                    contender: c,
                    rep,
                    load_pct: Some(pct),
                    size,
                    phase: p,
                    warmup: false,
                    python: false,
                });
            }
        }
        // The Python producers, on the same servers (no Python driver for
        // Redis: the Python row is arrowbus, Kafka and NATS).
        let Some(py) = python.filter(|_| c.system != System::Redis) else {
            return anyhow::Ok(());
        };
        for &size in &a.sizes {
            let run = python::run_phase(
                py,
                bus.as_ref(),
                &watch,
                &target,
                c,
                size,
                &python::Settings {
                    duration: a.duration,
                    drain_timeout: a.drain_timeout,
                    window: a.window,
                    files_dir: servers.dir.path(),
                },
            )
            .await;
            // A failing Python driver costs its own row, not the Rust
            // phases already measured.
            let (p, client) = match run {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("busbench:   python {}: {e:#}", size.label());
                    python_failures.push(format!(
                        "{} rep {} Python producer, {}: {e:#}",
                        c.label(),
                        rep + 1,
                        size.label()
                    ));
                    continue;
                }
            };
            eprintln!(
                "busbench:   python {} {}: {:.1} MB/s, {:.0} batches/s, acked {}/{} sent, lost {}, errors {}",
                client,
                size.label(),
                p.acked_mb_per_s(),
                p.acked_batches_per_s(),
                p.acked,
                p.sent,
                p.lost,
                p.errors_total
            );
            out.push(Measured {
                contender: c,
                rep,
                load_pct: None,
                size,
                phase: p,
                warmup: false,
                python: true,
            });
            python_client = Some(client);
        }
        anyhow::Ok(())
    }
    .await;
    task.abort();
    drop(bus);
    result?;
    Ok(ContenderMeasured {
        phases: out,
        peak_rss_kb: watch.rss.run_max_kb.load(Ordering::Relaxed),
        python_client,
        python_failures,
    })
}

fn tool_version(bin: &Path, args: &[&str]) -> String {
    std::process::Command::new(bin)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{} (version unknown)", bin.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: CompareArgs,
    }

    fn arrowbus(replicas: usize) -> Contender {
        Contender {
            replicas,
            system: System::Arrowbus,
            strong: true,
        }
    }

    #[test]
    fn peers_none_is_arrowbus_alone() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["busbench", "--peers", "none", "--replicas", "3,1"])?;
        let mut notes = Vec::new();
        assert_eq!(
            contenders(&cli.a, &mut notes),
            vec![arrowbus(1), arrowbus(3)]
        );
        assert!(notes.is_empty(), "{notes:?}");
        assert!(!cli.a.disk.no_disk);
        assert_eq!(cli.a.disk.dd_mib, 1024);
        assert_eq!(cli.a.disk.sync_for, Duration::from_secs(3));
        Ok(())
    }

    #[test]
    fn arrowbus_linger_defaults_to_zero_and_can_be_off() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["busbench"])?;
        assert_eq!(cli.a.arrowbus_linger, LingerMs(Some(0.0)));
        let cli = Cli::try_parse_from(["busbench", "--arrowbus-linger", "off"])?;
        assert_eq!(cli.a.arrowbus_linger, LingerMs(None));
        let cli = Cli::try_parse_from(["busbench", "--arrowbus-linger", "2.5"])?;
        assert_eq!(cli.a.arrowbus_linger, LingerMs(Some(2.5)));
        assert!(Cli::try_parse_from(["busbench", "--arrowbus-linger", "-1"]).is_err());
        Ok(())
    }

    #[test]
    fn peers_at_three_replicas_skip_redis() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from([
            "busbench",
            "--peers",
            "kafka,nats,redis",
            "--replicas",
            "3",
            "--durability",
            "strong",
            "--no-disk",
        ])?;
        let c = contenders(&cli.a, &mut Vec::new());
        let labels: Vec<String> = c.iter().map(Contender::label).collect();
        assert_eq!(
            labels,
            ["arrowbus R3", "Kafka R3 flush", "NATS JetStream R3 sync"]
        );
        assert!(cli.a.disk.no_disk);
        Ok(())
    }
}
