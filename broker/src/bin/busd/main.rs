//! busd: the arrowbus broker.
//!
//! `busd dev` runs a single node with embedded defaults (data directory,
//! certificate, port) and writes a client profile; `busd run --config F`
//! runs a configured node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use arrowbus_broker::config::{BrokerConfig, FsyncMode, DEFAULT_PORT};
use arrowbus_broker::topics::Topics;
use arrowbus_broker::{profile, server, tls, Broker};
use clap::{Parser, Subcommand};

/// Exit code for configuration errors: fix the config and start again.
const EXIT_CONFIG: u8 = 2;
/// Exit code for storage that cannot be opened or is corrupt: the log line
/// says which file; restore it or remove the node's data and let it re-sync.
const EXIT_STORAGE: u8 = 3;
/// Exit code when the network endpoint cannot be set up (port in use).
const EXIT_NETWORK: u8 = 4;

#[derive(Parser)]
#[command(
    name = "busd",
    version,
    about = "arrowbus broker: durable Arrow topic logs over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a single-node broker with embedded defaults and write a client profile.
    Dev {
        /// Data directory [default: $ARROWBUS_DATA_DIR or ~/.local/share/arrowbus/dev]
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// UDP address to listen on.
        #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)))]
        listen: SocketAddr,
        /// fsync policy: always (default; ack after fsync) or interval (weaker).
        #[arg(long, default_value = "always")]
        fsync: String,
        /// Where to write the client profile [default: $ARROWBUS_CONFIG_DIR/profile.toml or ~/.config/arrowbus/profile.toml]
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Start a local cluster of N nodes, each its own busd process: node i
        /// listens on the port of --listen plus i-1 and keeps its data in
        /// DATA_DIR/node-i. Ctrl-C stops them all.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=9))]
        nodes: u16,
        /// Start one more node, with this id, for a running `busd dev
        /// --nodes N` in the same data directory: it listens on the port of
        /// --listen plus ID-1 and waits for `busctl cluster add-node`.
        #[arg(long, value_name = "ID", conflicts_with = "nodes", value_parser = clap::value_parser!(u16).range(2..=99))]
        join: Option<u16>,
    },
    /// Run a node from a TOML config file (see broker/busd.example.toml).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
}

mod dev_cluster;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ARROWBUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let (config, dev_profile) = match cli.cmd {
        Cmd::Dev {
            data_dir,
            listen,
            fsync,
            profile,
            nodes,
            join,
        } => {
            let data_dir = data_dir
                .or_else(|| std::env::var_os("ARROWBUS_DATA_DIR").map(PathBuf::from))
                .unwrap_or_else(|| profile::home().join(".local/share/arrowbus/dev"));
            if let Some(id) = join {
                return dev_cluster::join(&data_dir, listen, id, &fsync);
            }
            if nodes > 1 {
                let profile = profile.unwrap_or_else(profile::default_profile_path);
                return dev_cluster::run(&data_dir, listen, nodes, &fsync, &profile);
            }
            let mut cfg = BrokerConfig::dev(data_dir, listen);
            cfg.log.fsync = match fsync.as_str() {
                "always" => FsyncMode::Always,
                "interval" => FsyncMode::Interval,
                other => {
                    eprintln!("busd: --fsync {other:?}: expected always or interval");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            (
                cfg,
                Some(profile.unwrap_or_else(profile::default_profile_path)),
            )
        }
        Cmd::Run { config } => {
            let text = match std::fs::read_to_string(&config) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("busd: cannot read config {}: {e}", config.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match BrokerConfig::from_toml(&text) {
                Ok(c) => (c, None),
                Err(e) => {
                    eprintln!("busd: {}: {e}", config.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
    };
    if let Err(e) = config.validate() {
        eprintln!("busd: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("busd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, dev_profile)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Storage(e)) => {
            tracing::error!("storage cannot be opened: {e:#}. Check the data directory's disk and permissions; a corrupt file named here must be restored or the node's data removed");
            ExitCode::from(EXIT_STORAGE)
        }
        Err(Failure::Stopped(e)) => {
            tracing::error!("{e:#}");
            ExitCode::from(EXIT_STORAGE)
        }
        Err(Failure::Network(e)) => {
            tracing::error!("{e:#}");
            ExitCode::from(EXIT_NETWORK)
        }
        Err(Failure::Other(e)) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Storage(anyhow::Error),
    /// A group's storage failed while running (the message says what to do).
    Stopped(anyhow::Error),
    Network(anyhow::Error),
    Other(anyhow::Error),
}

async fn run(config: BrokerConfig, dev_profile: Option<PathBuf>) -> Result<(), Failure> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))
        .map_err(Failure::Storage)?;
    let tls_files = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: config.tls.ca.clone(),
        },
        _ => {
            let mut names = vec![
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
                "::1".to_owned(),
            ];
            let ip = config.listen.ip();
            if !ip.is_unspecified() && !names.contains(&ip.to_string()) {
                names.push(ip.to_string());
            }
            tls::ensure_dev_certificates(&config.data_dir.join("tls"), &names)
                .context("creating development certificates")
                .map_err(Failure::Other)?
        }
    };
    let crypto = tls::server_crypto(&tls_files, tls_files.ca.as_deref())
        .context("loading TLS certificate")
        .map_err(Failure::Other)?;

    let endpoint = server::bind_endpoint(&config, crypto).map_err(Failure::Network)?;
    let addr = server::local_addr(&endpoint).unwrap_or(config.listen);

    let peers = config
        .peers()
        .map_err(|e| Failure::Other(anyhow::anyhow!("cluster.peers: {e}")))?;
    let peer_client = match &tls_files.ca {
        Some(ca) => tls::peer_client_config(&tls_files, ca)
            .context("peer TLS configuration")
            .map_err(Failure::Other)?,
        None if peers.len() <= 1 => {
            // A cluster of one never dials a peer; any config will do.
            tls::peer_client_config(&tls_files, &tls_files.cert)
                .context("peer TLS configuration")
                .map_err(Failure::Other)?
        }
        None => {
            return Err(Failure::Other(anyhow::anyhow!(
                "tls.ca is required for a multi-node cluster: nodes verify each other with it"
            )))
        }
    };
    let env = arrowbus_raft::group::GroupEnv {
        node_id: config.node_id,
        pool: arrowbus_raft::network::PeerPool::new(
            config.node_id,
            endpoint.clone(),
            peer_client,
            config.cluster.server_name.clone(),
        ),
        registry: Arc::default(),
        timing: config.raft_timing(),
    };
    let creates = config.creates_cluster().then_some(&peers);
    let topics = Topics::open(&config.data_dir, env, config.log_config(), creates)
        .await
        .map_err(|e| Failure::Storage(e.into()))?;
    tracing::info!(%addr, data_dir = %config.data_dir.display(), node_id = config.node_id, fsync = ?config.log.fsync, "busd listening");

    if let (Some(path), Some(ca)) = (&dev_profile, &tls_files.ca) {
        let broker_addr = if addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], addr.port())).to_string()
        } else {
            addr.to_string()
        };
        profile::write_profile(path, &[broker_addr], ca, "localhost")
            .with_context(|| format!("writing client profile {}", path.display()))
            .map_err(Failure::Other)?;
        eprintln!(
            "arrowbus dev broker on {addr} (data in {}).\nClient profile: {} (busctl and the clients use it).\nTry: busctl topics create ticks --partitions 3\nStop with Ctrl-C.",
            config.data_dir.display(),
            path.display()
        );
    }

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut removed = topics.registry().removed();
    let watched = topics.clone();
    let broker = Broker::new(config, topics);
    let serving = tokio::spawn(broker.serve(endpoint, shutdown_rx));
    let mut failed = None;
    tokio::select! {
        _ = wait_for_signal() => {}
        why = watched.controller_stopped() => {
            tracing::error!(reason = %why, "the controller group stopped; shutting down (a restart recovers it from disk)");
            failed = Some(why);
        }
        // A node removed from the cluster stops: nothing is replicated to
        // it any more, and its metadata would only grow stale.
        by = removed.wait_for(|by| by.is_some()) => tracing::warn!(
            "node {} removed this node from the cluster; shutting down (its data directory holds nothing the cluster needs)",
            by.map(|b| b.unwrap_or(0)).unwrap_or(0)
        ),
    }
    let _ = shutdown_tx.send(true);
    serving.await.map_err(|e| Failure::Other(e.into()))?;
    match failed {
        Some(why) => Err(Failure::Stopped(anyhow::anyhow!(
            "the controller group stopped: {why}. This node cannot follow the cluster's metadata; \
             fix the cause (e.g. free disk space) and start busd again: it recovers from disk"
        ))),
        None => Ok(()),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
