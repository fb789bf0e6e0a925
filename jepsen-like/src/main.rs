//! jepsen-like: run a fault-injection test against real busd processes, or
//! re-check a stored history.
//!
//! Exit codes: 0 valid (or, with `--expect`, every expected anomaly class
//! found), 1 anomalies found (or an expected class missing), 2 the harness
//! itself failed (setup, I/O, malformed history), 130 interrupted.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use jepsen_like::checker::{check, CheckOptions, CheckResult, CLASSES};
use jepsen_like::history::read_history;
use jepsen_like::report::write_reports;
use jepsen_like::run::{run, run_dir, RunConfig};
use jepsen_like::schedule::FaultKind;

#[derive(Parser)]
#[command(
    name = "jepsen-like",
    version,
    about = "Fault-injection harness and history checker for arrowbus"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a cluster, run the workload under faults, check the history.
    Run(RunArgs),
    /// Check a stored history (JSON lines) and write its reports beside it.
    Check {
        history: PathBuf,
        /// Where to write summary.txt, results.json, timeline.png [default: the history's directory]
        #[arg(long)]
        out: Option<PathBuf>,
        /// Succeed only if these anomaly classes are found (self-tests of the checker).
        #[arg(long, value_delimiter = ',')]
        expect: Vec<String>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Number of busd nodes (more than one needs the cluster mode of busd).
    #[arg(long, default_value_t = 1)]
    nodes: u32,
    /// Seconds of workload under faults (recovery and final reads come after).
    #[arg(long, default_value_t = 60)]
    time_limit: u64,
    /// Faults: any of kill, pause, partition, membership (remove a node and add it back empty; needs more nodes than replicas), rollback (deliberately loses data), or none.
    #[arg(long, value_delimiter = ',', default_value = "kill,pause,partition")]
    nemesis: Vec<String>,
    /// Client operations per second, over all workers.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seed of every random choice (printed; a fresh one when omitted).
    #[arg(long)]
    seed: Option<u64>,
    /// Client workers (half producers, half consumers).
    #[arg(long, default_value_t = 8)]
    concurrency: u32,
    /// Keys: partitions of the test topic.
    #[arg(long, default_value_t = 4)]
    keys: u32,
    /// Replication factor of the test topic [default: min(3, nodes)].
    #[arg(long)]
    replicas: Option<u16>,
    /// The busd binary [default: busd next to this binary, else on PATH].
    #[arg(long)]
    busd: Option<PathBuf>,
    /// Runs are stored in <store>/<time>-s<seed>.
    #[arg(long, default_value = "target/jepsen-like")]
    store: PathBuf,
    /// Exact run directory (overrides --store).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Harness instance (0-199): separate namespaces and subnet, so runs can go side by side.
    #[arg(long, default_value_t = 0)]
    instance: u8,
    /// Mean seconds between fault starts.
    #[arg(long, default_value_t = 10.0)]
    interval: f64,
    /// Seconds between healing and the final reads.
    #[arg(long, default_value_t = 10)]
    recovery: u64,
    /// Milliseconds before an unanswered operation counts as indeterminate.
    #[arg(long, default_value_t = 5000)]
    op_timeout_ms: u64,
    /// Seconds a final read of one node may take.
    #[arg(long, default_value_t = 60)]
    final_read_timeout: u64,
    /// Extra KEY=VALUE environment for every busd.
    #[arg(long = "busd-env")]
    busd_env: Vec<String>,
    /// Run busd in its test-only unsafe mode (ARROWBUS_UNSAFE_ACK_BEFORE_COMMIT=1): the harness must report lost writes.
    /// Implies --leaders-first.
    #[arg(long)]
    unsafe_ack: bool,
    /// Aim the first round of faults (one of each kind) at the partition
    /// leaders: a leader kill and a partition that cuts the leaders from
    /// the other nodes while clients keep publishing to them.
    #[arg(long)]
    leaders_first: bool,
    /// Succeed only if these anomaly classes are found (self-tests of the harness).
    #[arg(long, value_delimiter = ',')]
    expect: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jepsen-like: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let r = rt.block_on(async {
        match cli.cmd {
            Cmd::Check {
                history,
                out,
                expect,
            } => cmd_check(history, out, &expect),
            Cmd::Run(args) => {
                let instance = args.instance;
                tokio::select! {
                    r = cmd_run(args) => r,
                    _ = interrupted() => {
                        jepsen_like::cluster::cleanup_instance(instance);
                        eprintln!("jepsen-like: interrupted; nodes stopped and namespaces removed");
                        Ok(ExitCode::from(130))
                    }
                }
            }
        }
    });
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("jepsen-like: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn validate_expect(expect: &[String]) -> Result<()> {
    for e in expect {
        if !CLASSES.contains(&e.as_str()) {
            bail!(
                "--expect {e}: unknown anomaly class (known: {})",
                CLASSES.join(", ")
            );
        }
    }
    Ok(())
}

/// The exit code for a result, honouring `--expect`.
fn verdict(result: &CheckResult, expect: &[String]) -> ExitCode {
    if expect.is_empty() {
        return if result.valid {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        };
    }
    let missing: Vec<&String> = expect
        .iter()
        .filter(|c| result.anomaly_counts.get(c.as_str()).copied().unwrap_or(0) == 0)
        .collect();
    if missing.is_empty() {
        println!("expected anomalies found: {}", expect.join(", "));
        ExitCode::SUCCESS
    } else {
        println!(
            "EXPECTED anomalies NOT found: {}",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        ExitCode::from(1)
    }
}

fn cmd_check(history: PathBuf, out: Option<PathBuf>, expect: &[String]) -> Result<ExitCode> {
    validate_expect(expect)?;
    let f =
        std::fs::File::open(&history).with_context(|| format!("opening {}", history.display()))?;
    let ops = read_history(std::io::BufReader::new(f))?;
    let result = check(&ops, &CheckOptions::default())?;
    let dir = out.unwrap_or_else(|| {
        history
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| PathBuf::from("."))
    });
    std::fs::create_dir_all(&dir)?;
    let meta = std::fs::read_to_string(dir.join("run.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    let text = write_reports(&dir, &meta, &ops, &result, "JEPSEN-LIKE")?;
    print!("{text}");
    println!("reports in {}", dir.display());
    Ok(verdict(&result, expect))
}

fn default_busd() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("busd")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("busd"))
}

async fn cmd_run(a: RunArgs) -> Result<ExitCode> {
    validate_expect(&a.expect)?;
    let mut nemesis = Vec::new();
    for n in &a.nemesis {
        if n == "none" || n.is_empty() {
            continue;
        }
        nemesis.push(FaultKind::parse(n).with_context(|| {
            format!("--nemesis {n}: expected kill, pause, partition, membership, rollback or none")
        })?);
    }
    let replicas = a.replicas.unwrap_or(a.nodes.min(3) as u16);
    if nemesis.contains(&FaultKind::Membership) && u32::from(replicas) >= a.nodes {
        bail!(
            "--nemesis membership removes a node, which needs more nodes than replicas: --nodes {} with {replicas} replicas",
            a.nodes
        );
    }
    if a.nodes == 0 || a.keys == 0 || a.concurrency < 2 || a.rate <= 0.0 || a.interval <= 0.0 {
        bail!("--nodes and --keys must be at least 1, --concurrency at least 2, --rate and --interval positive");
    }
    if a.instance >= 200 {
        bail!("--instance {}: use 0-199", a.instance);
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let mut env = Vec::new();
    for kv in &a.busd_env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--busd-env {kv}: expected KEY=VALUE"))?;
        env.push((k.to_owned(), v.to_owned()));
    }
    if a.unsafe_ack {
        env.push(("ARROWBUS_UNSAFE_ACK_BEFORE_COMMIT".into(), "1".into()));
    }
    let dir = a.dir.clone().unwrap_or_else(|| run_dir(&a.store, seed));
    let cfg = RunConfig {
        busd: a.busd.clone().unwrap_or_else(default_busd),
        nodes: a.nodes,
        time_limit: Duration::from_secs(a.time_limit),
        nemesis,
        rate: a.rate,
        seed,
        concurrency: a.concurrency,
        keys: a.keys,
        dir: dir.clone(),
        instance: a.instance,
        recovery: Duration::from_secs(a.recovery),
        op_timeout: Duration::from_millis(a.op_timeout_ms),
        interval: Duration::from_secs_f64(a.interval),
        final_read_timeout: Duration::from_secs(a.final_read_timeout),
        busd_env: env,
        replicas,
        leaders_first: a.leaders_first || a.unsafe_ack,
    };
    println!(
        "seed = {seed} (replay: jepsen-like run --nodes {} --time-limit {} --nemesis {} --rate {}{} --seed {seed})",
        a.nodes,
        a.time_limit,
        if a.nemesis.is_empty() { "none".into() } else { a.nemesis.join(",") },
        a.rate,
        // Flags that change the plan or the broker, so the replay is one.
        [
            (a.unsafe_ack, " --unsafe-ack"),
            (a.leaders_first && !a.unsafe_ack, " --leaders-first"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, f)| *f)
        .collect::<String>()
    );
    // Checked here too (run() checks again), so an earlier run's run.json
    // is not overwritten before the refusal.
    if dir.join("nodes").exists() {
        bail!(
            "{} holds an earlier run (its nodes/ would be reused): choose a new --dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("run.json"),
        serde_json::to_string_pretty(&cfg.meta())?,
    )?;
    let history = run(cfg.clone()).await?;
    let f = std::fs::File::open(&history)?;
    let ops = read_history(std::io::BufReader::new(f))?;
    let result = check(&ops, &CheckOptions::default())?;
    let title = format!(
        "JEPSEN-LIKE {} NODE(S) SEED {seed} NEMESIS {}",
        a.nodes,
        a.nemesis.join(",")
    );
    let text = write_reports(&dir, &cfg.meta(), &ops, &result, &title)?;
    print!("{text}");
    println!("reports in {}", dir.display());
    Ok(verdict(&result, &a.expect))
}
