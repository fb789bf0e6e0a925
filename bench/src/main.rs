//! busbench: throughput, latency and memory of an arrowbus broker, measured
//! against the machine's own disk limits. See `bench/README.md`.
//!
//! - `run`: closed-loop publish throughput per batch size, then
//!   publish→deliver latency at fixed offered rates (no coordinated omission);
//! - `backlog`: publish N GB with a slow subscriber, record busd's peak RSS;
//! - `disk`: `dd` bandwidth and append+fdatasync rates of a directory;
//! - `smoke`: a few seconds of every workload; exits 1 on loss or errors;
//! - `compare`: the same phases against Kafka, NATS JetStream and Redis
//!   Streams, started on loopback (see `compare`).

mod bus;
mod compare;
mod devcluster;
mod disk;
mod failover;
mod heartbeat;
mod latency;
mod report;
mod run;
mod spawn;
mod transport;
mod transport_disk;
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::disk::{DiskBaselineArgs, DiskReport};
use crate::latency::parse_duration;
use crate::report::{BacklogInfo, BrokerInfo, Environment, Report};
use crate::run::{BrokerWatch, Limit, PhaseConfig, PhaseResult};
use crate::spawn::{Busd, RssWatch};
use crate::workload::SizeSpec;

/// Exit code when a smoke run finds loss, errors or no deliveries.
const EXIT_SMOKE_FAILED: u8 = 1;
/// Exit code when busbench itself cannot run (bad flags, no broker).
const EXIT_ERROR: u8 = 2;
/// Paced rates above this fraction of the measured closed-loop capacity are
/// skipped: the sender could only fall further behind for the whole phase.
const MAX_PACED_FRACTION_OF_CAPACITY: f64 = 0.95;

#[derive(Parser)]
#[command(
    name = "busbench",
    version,
    about = "arrowbus load generator: throughput, latency without coordinated omission, broker RSS, disk baselines"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Throughput per batch size, then latency at fixed offered rates; writes a report.
    Run(RunArgs),
    /// Publish N GB with a slow subscriber and record busd's peak RSS; writes a report.
    Backlog(BacklogArgs),
    /// Sequential write bandwidth (dd) and append+fdatasync rates of a directory.
    Disk(DiskArgs),
    /// A few seconds of every workload at small sizes; exit 1 on loss, errors or no deliveries.
    Smoke(SmokeArgs),
    /// Kill a 3-replica partition's leader repeatedly in a local 3-node
    /// cluster; report the time to the first ack on the new leader.
    Failover(failover::FailoverArgs),
    /// CPU and memory of an idle three-node cluster as the number of
    /// 3-replica partitions (Raft groups) grows.
    Heartbeat(heartbeat::HeartbeatArgs),
    /// arrowbus side by side with Apache Kafka, NATS JetStream and Redis
    /// Streams on this machine (peers need `--features compare`).
    Compare(compare::CompareArgs),
    /// The transport alone: producer → relay → subscriber over QUIC with
    /// busd's and the client's own settings, no broker work; the ceiling
    /// for `run`'s throughput and the floor for its latency.
    Transport(transport::TransportArgs),
    /// The relay process of `transport` (started by it).
    #[command(hide = true)]
    TransportRelay(transport::RelayArgs),
}

#[derive(Args, Clone)]
struct TargetArgs {
    /// Start a busd (`busd dev --fsync always`) in a fresh directory under
    /// --work-dir on a free port, measure it, stop it.
    #[arg(long, value_name = "PATH_TO_BUSD", conflicts_with = "broker")]
    spawn_busd: Option<PathBuf>,
    /// Broker address (host:port) when not spawning; else ARROWBUS_BROKER or the `busd dev` profile.
    #[arg(long)]
    broker: Option<String>,
    /// CA certificate (PEM) for --broker; else ARROWBUS_CA or the profile.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Pid of an external broker, to sample its RSS and CPU.
    #[arg(long)]
    busd_pid: Option<u32>,
    /// Where the spawned busd keeps its data (a fresh sub-directory) and
    /// where the disk baseline runs. Put it on the disk you want measured:
    /// a tmpfs makes fsync free.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    work_dir: PathBuf,
    /// Partitions of each benchmark topic (the producer keeps 5 batches in
    /// flight per partition).
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// After publishing, how long to wait for missing acks and deliveries.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    drain_timeout: Duration,
    /// Producer linger in milliseconds (`ProducerConfig::linger`): `0`
    /// coalesces the sends that queue up while the window is full into one
    /// stored batch; unset, every send is its own batch.
    #[arg(long, value_name = "MS")]
    linger: Option<f64>,
    /// Replication factor of the benchmark topics, for an external cluster
    /// (`busd dev --nodes 3`, then `--broker`/the profile and `--replicas 3`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=7), conflicts_with = "spawn_busd")]
    replicas: u16,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    disk: DiskBaselineArgs,
    /// Batch sizes: row counts (1, 1000) or encoded sizes (64k, 1m).
    #[arg(long, value_delimiter = ',', value_parser = SizeSpec::parse, default_value = "1,1000,64k,1m")]
    sizes: Vec<SizeSpec>,
    /// Length of each phase (one closed-loop phase and one per rate, per size).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Offered rates in batches/s, or a percentage of the size's measured
    /// closed-loop capacity (50%). Rates above 95 % of capacity are skipped.
    #[arg(long, value_delimiter = ',', value_parser = RateSpec::parse, default_value = "100,1000,50%")]
    rates: Vec<RateSpec>,
    /// Report path (.md; the .json goes next to it).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct BacklogArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Gigabytes (10^9 bytes of Arrow body) to publish.
    #[arg(long, default_value_t = 10.0)]
    gb: f64,
    /// Batch size.
    #[arg(long, value_parser = SizeSpec::parse, default_value = "1m")]
    size: SizeSpec,
    /// The slow subscriber pauses this long after each batch.
    #[arg(long, value_parser = parse_duration, default_value = "10ms")]
    subscriber_delay: Duration,
    /// Keep the slow subscriber reading this long after the last ack.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    hold: Duration,
    /// Report path (.md; the .json goes next to it).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct DiskArgs {
    /// Directory to measure (put it where the broker's data lives).
    #[arg(long)]
    dir: PathBuf,
    #[command(flatten)]
    disk: DiskBaselineArgs,
    /// Also write a report here (.md and .json).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct SmokeArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', value_parser = SizeSpec::parse, default_value = "1,1000,64k,1m")]
    sizes: Vec<SizeSpec>,
    /// Length of each phase.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    duration: Duration,
    /// Offered rate of the paced phases, batches/s.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Bytes published by the slow-subscriber phase.
    #[arg(long, value_parser = SizeSpec::parse, default_value = "8m")]
    backlog: SizeSpec,
    /// Also write a report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// An offered rate: absolute, or relative to the measured capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RateSpec {
    PerSec(f64),
    PercentOfCapacity(f64),
}

impl RateSpec {
    fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (num, pct) = match t.strip_suffix('%') {
            Some(n) => (n, true),
            None => (t, false),
        };
        let v: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: expected batches/s (1000) or a percentage (50%)"))?;
        if !v.is_finite() || v <= 0.0 {
            return Err(format!("{s:?}: a rate must be positive"));
        }
        Ok(if pct {
            RateSpec::PercentOfCapacity(v)
        } else {
            RateSpec::PerSec(v)
        })
    }

    fn resolve(self, capacity: Option<f64>) -> Option<f64> {
        match self {
            RateSpec::PerSec(r) => Some(r),
            RateSpec::PercentOfCapacity(p) => capacity.map(|c| (c * p / 100.0).max(1.0).round()),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Client-side events (handshakes, pipeline ends, retries) on stderr
    // when asked for with RUST_LOG, e.g. RUST_LOG=arrowbus=debug.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let result = match cli.cmd {
        Cmd::Run(a) => cmd_run(a).map(|()| true),
        Cmd::Backlog(a) => cmd_backlog(a).map(|()| true),
        Cmd::Disk(a) => cmd_disk(a).map(|()| true),
        Cmd::Smoke(a) => cmd_smoke(a),
        Cmd::Failover(a) => failover::cmd_failover(a).map(|()| true),
        Cmd::Heartbeat(a) => heartbeat::cmd_heartbeat(a).map(|()| true),
        Cmd::Compare(a) => compare::cmd_compare(a).map(|()| true),
        Cmd::Transport(a) => transport::cmd_transport(a).map(|()| true),
        Cmd::TransportRelay(a) => transport::cmd_relay(a).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_SMOKE_FAILED),
        Err(e) => {
            eprintln!("busbench: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn default_out(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("results")
        .join(format!("{}-{kind}.md", report::utc_date(SystemTime::now())))
}

/// The broker under test: spawned (and owned) or external.
struct Target {
    busd: Option<Busd>,
    config: arrowbus::ClientConfig,
    info: BrokerInfo,
    /// Where the broker's data lives, when known: the disk baseline runs there.
    data_dir: Option<PathBuf>,
    pid: Option<u32>,
    linger: Option<Duration>,
    replicas: u16,
}

impl Target {
    fn open(a: &TargetArgs) -> anyhow::Result<Self> {
        let linger = match a.linger {
            None => None,
            Some(ms) if ms.is_finite() && ms >= 0.0 => Some(Duration::from_secs_f64(ms / 1000.0)),
            Some(ms) => bail!("--linger {ms}: milliseconds, 0 or more"),
        };
        let mut t = Self::start(a)?;
        t.linger = linger;
        t.replicas = a.replicas;
        if a.replicas > 1 {
            t.info
                .how
                .push_str(&format!("; topics with {} replicas", a.replicas));
        }
        if let Some(ms) = a.linger {
            t.info.how.push_str(&format!(
                "; producer linger {ms} ms (sends queued behind a full window are stored as one batch)"
            ));
        }
        Ok(t)
    }

    fn start(a: &TargetArgs) -> anyhow::Result<Self> {
        match &a.spawn_busd {
            Some(path) => {
                let busd = Busd::start(path, &a.work_dir)?;
                eprintln!(
                    "busbench: started busd (pid {}) on {} with data in {}",
                    busd.pid,
                    busd.addr,
                    busd.data_dir.display()
                );
                Ok(Self {
                    config: busd.client_config(),
                    info: BrokerInfo {
                        how: format!("spawned: `{}`", busd.command),
                        fsync: "always (ack after fdatasync)".into(),
                        pid: Some(busd.pid),
                        ..BrokerInfo::default()
                    },
                    data_dir: Some(busd.dir.path().to_path_buf()),
                    pid: Some(busd.pid),
                    busd: Some(busd),
                    linger: None,
                    replicas: 1,
                })
            }
            None => {
                let config = arrowbus::ClientConfig::resolve(a.broker.clone(), a.ca.clone())?;
                Ok(Self {
                    info: BrokerInfo {
                        how: format!("external: {}", config.brokers.join(",")),
                        fsync: "as configured on the external broker (not known to busbench)"
                            .into(),
                        pid: a.busd_pid,
                        ..BrokerInfo::default()
                    },
                    config,
                    data_dir: None,
                    pid: a.busd_pid,
                    busd: None,
                    linger: None,
                    replicas: 1,
                })
            }
        }
    }

    /// Final memory figures and shutdown.
    fn finish(&mut self, rss: Option<&RssWatch>) {
        if let Some(pid) = self.pid {
            let s = spawn::group_stats(&[pid]);
            if s.vm_hwm_kb > 0 {
                self.info.peak_rss_kb = Some(s.vm_hwm_kb);
            }
        }
        if let Some(w) = rss {
            self.info.max_sampled_rss_kb = Some(w.run_max_kb.load(Ordering::Relaxed));
            self.info.rss_samples = w.samples.lock().map(|v| v.clone()).unwrap_or_default();
        }
        if let Some(b) = self.busd.as_mut() {
            let alive = b.alive();
            self.info.stop = Some(match b.stop() {
                Ok(s) if alive => s,
                Ok(s) => format!(
                    "busd had already exited before the end of the run ({s}); log:\n{}",
                    b.log_tail()
                ),
                Err(e) => format!("stopping busd failed: {e:#}"),
            });
        }
    }
}

fn phase(
    name: String,
    size: SizeSpec,
    rate: Option<f64>,
    limit: Limit,
    t: &TargetArgs,
) -> PhaseConfig {
    PhaseConfig {
        name,
        size,
        rate,
        limit,
        partitions: t.partitions,
        drain_timeout: t.drain_timeout,
        subscriber_delay: None,
        wait_for_delivery: true,
        hold_after: Duration::ZERO,
        keep_topic: false,
    }
}

fn disk_baseline(
    dir: Option<&Path>,
    a: &DiskBaselineArgs,
    notes: &mut Vec<String>,
) -> Option<DiskReport> {
    if a.no_disk {
        return None;
    }
    let Some(dir) = dir else {
        notes.push("no disk baseline: the broker's data directory is unknown (external broker; run `busbench disk --dir` there)".into());
        return None;
    };
    eprintln!("busbench: disk baseline in {} ...", dir.display());
    let r = disk::measure(dir, a.dd_mib, a.sync_for);
    if r.filesystem.as_ref().is_some_and(|m| m.fs_type == "tmpfs") {
        notes.push(format!(
            "{} is on tmpfs: fsync costs nothing there; these numbers do not describe a disk",
            dir.display()
        ));
    }
    Some(r)
}

fn print_phase(p: &PhaseResult) {
    let e2e = p.e2e_latency.map_or(String::new(), |l| {
        format!(
            " e2e p50 {:.0} µs p99 {:.0} µs p99.9 {:.0} µs",
            l.p50_us, l.p99_us, l.p999_us
        )
    });
    eprintln!(
        "busbench: {:<24} sent {} acked {} delivered {} lost {} errors {} | {:.0} batches/s {:.1} MB/s{e2e}",
        p.name,
        p.sent,
        p.acked,
        p.delivered,
        p.lost,
        p.errors_total,
        p.acked_batches_per_s(),
        p.acked_mb_per_s()
    );
    for e in p.errors.iter().take(3) {
        eprintln!("busbench:   {e}");
    }
}

async fn connect(
    t: &Target,
) -> anyhow::Result<(
    bus::Arrowbus,
    Option<BrokerWatch>,
    Option<tokio::task::JoinHandle<()>>,
)> {
    let client = arrowbus::Client::connect(t.config.clone())
        .await
        .context("connecting to the broker")?;
    let (watch, task) = match t.pid {
        Some(pid) => {
            let (w, task) = RssWatch::spawn(vec![pid], Instant::now());
            (
                Some(BrokerWatch {
                    pids: vec![pid],
                    rss: w,
                }),
                Some(task),
            )
        }
        None => (None, None),
    };
    let bus = bus::Arrowbus {
        client,
        replication_factor: t.replicas,
        linger: t.linger,
    };
    Ok((bus, watch, task))
}

fn cmd_run(a: RunArgs) -> anyhow::Result<()> {
    let env = Environment::probe();
    let mut target = Target::open(&a.target)?;
    let mut notes = Vec::new();
    let disk = disk_baseline(target.data_dir.as_deref(), &a.disk, &mut notes);
    let rt = runtime()?;
    let (phases, watch) = rt.block_on(async {
        let (bus, watch, task) = connect(&target).await?;
        let mut phases = Vec::new();
        for size in &a.sizes {
            let cfg = phase(format!("{}-max", size.slug()), *size, None, Limit::Duration(a.duration), &a.target);
            let max = run::run_phase(&bus, watch.as_ref(), &cfg).await?;
            print_phase(&max);
            let capacity = (max.acked > 0).then(|| max.acked_batches_per_s());
            phases.push(max);
            let mut rates: Vec<f64> = a.rates.iter().filter_map(|r| r.resolve(capacity)).collect();
            rates.sort_by(f64::total_cmp);
            rates.dedup();
            for rate in rates {
                if let Some(c) = capacity.filter(|c| rate > c * MAX_PACED_FRACTION_OF_CAPACITY) {
                    notes.push(format!(
                        "{}: offered {rate:.0} batches/s skipped: above 95 % of the measured closed-loop capacity of {c:.0} batches/s",
                        size.label()
                    ));
                    continue;
                }
                let cfg = phase(format!("{}-{rate:.0}ps", size.slug()), *size, Some(rate), Limit::Duration(a.duration), &a.target);
                let p = run::run_phase(&bus, watch.as_ref(), &cfg).await?;
                print_phase(&p);
                phases.push(p);
            }
        }
        bus.client.close().await;
        if let Some(t) = task {
            t.abort();
        }
        anyhow::Ok((phases, watch))
    })?;
    target.finish(watch.as_ref().map(|w| w.rss.as_ref()));
    notes.push(format!(
        "load average (1/5/15 min) at the end of the run: {}",
        report::load_average()
    ));
    let report = Report {
        title: "busbench run: single node".into(),
        env,
        broker: target.info.clone(),
        disk,
        phases,
        backlog: None,
        notes,
    };
    let out = a.out.unwrap_or_else(|| default_out("single-node"));
    let (md, json) = report.write(&out)?;
    println!("{}", report.markdown());
    eprintln!("busbench: wrote {} and {}", md.display(), json.display());
    Ok(())
}

fn cmd_backlog(a: BacklogArgs) -> anyhow::Result<()> {
    if !(a.gb > 0.0 && a.gb.is_finite()) {
        bail!("--gb {}: must be positive", a.gb);
    }
    let env = Environment::probe();
    let mut target = Target::open(&a.target)?;
    let mut notes = Vec::new();
    if target.pid.is_none() {
        notes.push(
            "busd RSS not measured: pass --spawn-busd, or --busd-pid for an external broker".into(),
        );
    }
    let bytes = (a.gb * 1e9) as u64;
    let rt = runtime()?;
    let (phases, watch) = rt.block_on(async {
        let (bus, watch, task) = connect(&target).await?;
        let mut cfg = phase(
            format!("backlog-{}", a.size.slug()),
            a.size,
            None,
            Limit::Bytes(bytes),
            &a.target,
        );
        cfg.subscriber_delay = Some(a.subscriber_delay);
        cfg.wait_for_delivery = false;
        cfg.hold_after = a.hold;
        cfg.keep_topic = true;
        let p = run::run_phase(&bus, watch.as_ref(), &cfg).await?;
        print_phase(&p);
        bus.client.close().await;
        if let Some(t) = task {
            t.abort();
        }
        anyhow::Ok((vec![p], watch))
    })?;
    let data_dir_bytes = target.data_dir.as_deref().map(dir_bytes);
    target.finish(watch.as_ref().map(|w| w.rss.as_ref()));
    notes.push(format!(
        "load average (1/5/15 min) at the end of the run: {}",
        report::load_average()
    ));
    if let Some(p) = phases.first() {
        notes.push(format!(
            "slow subscriber delivered {} of {} acked batches by the end ({} behind)",
            p.delivered,
            p.acked,
            p.acked.saturating_sub(p.delivered)
        ));
    }
    let report = Report {
        title: format!("busbench backlog: {} GB with a slow subscriber", a.gb),
        env,
        broker: target.info.clone(),
        disk: None,
        phases,
        backlog: Some(BacklogInfo {
            gb_requested: a.gb,
            subscriber_delay_ms: a.subscriber_delay.as_secs_f64() * 1000.0,
            data_dir_bytes,
        }),
        notes,
    };
    let out = a.out.unwrap_or_else(|| default_out("backlog"));
    let (md, json) = report.write(&out)?;
    println!("{}", report.markdown());
    eprintln!("busbench: wrote {} and {}", md.display(), json.display());
    Ok(())
}

fn cmd_disk(a: DiskArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let env = Environment::probe();
    let mut notes = Vec::new();
    let disk = disk_baseline(Some(&a.dir), &a.disk, &mut notes);
    let report = Report {
        title: "busbench disk baseline".into(),
        env,
        broker: BrokerInfo {
            how: "none (disk baseline only)".into(),
            fsync: "n/a".into(),
            ..BrokerInfo::default()
        },
        disk,
        phases: Vec::new(),
        backlog: None,
        notes,
    };
    println!("{}", report.markdown());
    if let Some(out) = a.out {
        let (md, json) = report.write(&out)?;
        eprintln!("busbench: wrote {} and {}", md.display(), json.display());
    }
    Ok(())
}

/// Returns whether the smoke run passed.
fn cmd_smoke(a: SmokeArgs) -> anyhow::Result<bool> {
    let env = Environment::probe();
    let mut target = Target::open(&a.target)?;
    let backlog_bytes = match a.backlog {
        SizeSpec::Bytes(b) => b as u64,
        SizeSpec::Rows(_) => bail!("--backlog takes a size in bytes (8m)"),
    };
    let rt = runtime()?;
    let outcome = rt.block_on(async {
        let (bus, watch, task) = connect(&target).await?;
        let mut phases = Vec::new();
        for size in &a.sizes {
            let d = Limit::Duration(a.duration);
            for (name, rate) in [
                (format!("smoke-{}-max", size.slug()), None),
                (format!("smoke-{}-paced", size.slug()), Some(a.rate)),
            ] {
                let p = run::run_phase(
                    &bus,
                    watch.as_ref(),
                    &phase(name, *size, rate, d, &a.target),
                )
                .await?;
                print_phase(&p);
                phases.push(p);
            }
        }
        // Slow subscriber: delivery must still be complete once it catches up.
        let mut cfg = phase(
            "smoke-slow-subscriber".into(),
            SizeSpec::Bytes(64 * 1024),
            None,
            Limit::Bytes(backlog_bytes),
            &a.target,
        );
        cfg.subscriber_delay = Some(Duration::from_millis(2));
        let p = run::run_phase(&bus, watch.as_ref(), &cfg).await?;
        print_phase(&p);
        phases.push(p);
        bus.client.close().await;
        if let Some(t) = task {
            t.abort();
        }
        anyhow::Ok((phases, watch))
    });
    let (phases, watch) = match outcome {
        Ok(x) => x,
        Err(e) => {
            target.finish(None);
            if let Some(b) = &target.busd {
                eprintln!("busbench: busd log tail:\n{}", b.log_tail());
            }
            return Err(e);
        }
    };
    target.finish(watch.as_ref().map(|w| w.rss.as_ref()));
    let mut failures: Vec<String> = phases
        .iter()
        .flat_map(|p| {
            p.failures()
                .into_iter()
                .map(move |f| format!("{}: {f}", p.name))
        })
        .collect();
    if let Some(stop) = target
        .info
        .stop
        .as_ref()
        .filter(|s| !s.starts_with("exited after SIGTERM"))
    {
        failures.push(format!("busd shutdown: {stop}"));
    }
    if let Some(out) = a.out {
        let report = Report {
            title: "busbench smoke".into(),
            env,
            broker: target.info.clone(),
            disk: None,
            phases,
            backlog: None,
            notes: failures.clone(),
        };
        report.write(&out)?;
    }
    for f in &failures {
        eprintln!("busbench: SMOKE FAILURE: {f}");
    }
    if failures.is_empty() {
        eprintln!("busbench: smoke passed");
    }
    Ok(failures.is_empty())
}

/// Total bytes of the files under `dir` (best effort).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_resolve() {
        assert_eq!(RateSpec::parse("1000"), Ok(RateSpec::PerSec(1000.0)));
        assert_eq!(
            RateSpec::parse("50%"),
            Ok(RateSpec::PercentOfCapacity(50.0))
        );
        assert!(RateSpec::parse("0").is_err());
        assert!(RateSpec::parse("fast").is_err());
        assert_eq!(
            RateSpec::PercentOfCapacity(50.0).resolve(Some(300.0)),
            Some(150.0)
        );
        assert_eq!(RateSpec::PercentOfCapacity(50.0).resolve(None), None);
        assert_eq!(RateSpec::PerSec(7.0).resolve(None), Some(7.0));
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn target_flags_conflict() {
        let r = Cli::try_parse_from([
            "busbench",
            "run",
            "--spawn-busd",
            "/bin/busd",
            "--broker",
            "127.0.0.1:1",
        ]);
        assert!(r.is_err());
    }
}
