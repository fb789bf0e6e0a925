//! The command-line surface: every flag and subcommand, parsed by clap.
//! Owns no behaviour; `main.rs` dispatches to the module of each command.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const LONG_ABOUT: &str = "\
busctl: the arrowbus admin CLI. Lists, creates, describes and deletes topics,
publishes Arrow IPC / Parquet / CSV files, and reads topics back as a table,
JSON lines or one Arrow IPC stream.

Connection: --broker / ARROWBUS_BROKER and --ca / ARROWBUS_CA, else the profile
written by `busd dev`.

Exit codes:
  0  success
  1  any failure (broker error, unreadable file, connection failure); one line
     `busctl: <error>` on stderr, broker errors with their name and code,
     e.g. `busctl: TopicNotFound (10): ...`
  2  usage error (unknown flag, bad value)";

#[derive(Debug, Parser)]
#[command(name = "busctl", version, about = "busctl: the arrowbus admin CLI", long_about = LONG_ABOUT)]
pub struct Cli {
    /// Broker address HOST:PORT (comma-separated for several).
    #[arg(long, env = "ARROWBUS_BROKER", global = true)]
    pub broker: Option<String>,
    /// PEM file with the CA that signed the broker certificates.
    #[arg(long, env = "ARROWBUS_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Output format. `arrow` (one Arrow IPC stream on stdout) is for `consume` only.
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Arrow,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage topics (`busctl topics` alone lists them).
    Topics {
        #[command(subcommand)]
        cmd: Option<TopicsCmd>,
    },
    /// Publish the batches of a file to a topic.
    Produce(ProduceArgs),
    /// Read a topic (to its current end, or tail it with --follow).
    Consume(ConsumeArgs),
    /// Show the cluster's nodes with their Raft roles, terms, commit and
    /// applied indexes, and replication lag; add or remove nodes.
    Cluster {
        #[command(subcommand)]
        cmd: Option<ClusterCmd>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Add a node that is already running with `cluster.join = true`, and
    /// move a fair share of partition replicas onto it (in the background:
    /// `busctl topics describe` shows moves under way).
    AddNode {
        /// The node's id (its `node_id`).
        id: u64,
        /// The address it listens on, HOST:PORT, as the other nodes reach it.
        addr: String,
    },
    /// Move every partition replica off a node, then remove it from the
    /// cluster. Waits for the moves; the node can be stopped afterwards.
    RemoveNode {
        id: u64,
        /// Give up waiting after this many seconds (the moves continue; run
        /// the command again to wait more).
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum TopicsCmd {
    /// List topics with their size and schema.
    List,
    /// Create a topic.
    Create(CreateArgs),
    /// Show a topic's retention, schema and partitions.
    Describe { name: String },
    /// Delete a topic and its data.
    Delete { name: String },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    pub name: String,
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// Copies of each partition, on distinct nodes (at most the node count).
    #[arg(long, visible_alias = "replication-factor", default_value_t = 1)]
    pub replicas: u16,
    /// Take the schema from an Arrow IPC (stream or file), Parquet or CSV (inferred) file.
    #[arg(long, value_name = "FILE")]
    pub schema_from: Option<PathBuf>,
    #[arg(long, value_name = "MS")]
    pub retention_ms: Option<u64>,
    #[arg(long, value_name = "BYTES")]
    pub retention_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FileFormat {
    /// By extension, then by magic bytes (ARROW1, 0xFFFFFFFF, PAR1), else CSV.
    Auto,
    Ipc,
    Parquet,
    Csv,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    pub name: String,
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// Publish every batch to this partition (default: round-robin).
    #[arg(long)]
    pub partition: Option<u32>,
    #[arg(long, value_enum, default_value_t = FileFormat::Auto)]
    pub format: FileFormat,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    pub name: String,
    /// Read only this partition (default: all).
    #[arg(long)]
    pub partition: Option<u32>,
    /// Where to start: earliest, latest, an offset, or @TIMESTAMP_MS.
    #[arg(long, default_value = "earliest", value_parser = parse_start)]
    pub from: arrowbus::StartAt,
    /// Stop after this many rows (the last batch is sliced).
    #[arg(long, value_name = "N")]
    pub max_rows: Option<u64>,
    /// Keep tailing new data until Ctrl-C instead of stopping at the current end.
    #[arg(long)]
    pub follow: bool,
}

fn parse_start(s: &str) -> Result<arrowbus::StartAt, String> {
    use arrowbus::StartAt;
    match s {
        "earliest" => Ok(StartAt::Earliest),
        "latest" => Ok(StartAt::Latest),
        _ => {
            if let Some(ts) = s.strip_prefix('@') {
                ts.parse::<i64>().map(StartAt::Timestamp).map_err(|_| {
                    format!("'{s}': expected @TIMESTAMP_MS (milliseconds since the Unix epoch)")
                })
            } else {
                s.parse::<u64>().map(StartAt::Offset).map_err(|_| {
                    format!("'{s}': expected earliest, latest, an offset, or @TIMESTAMP_MS")
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrowbus::StartAt;

    #[test]
    fn start_positions_parse() {
        assert_eq!(parse_start("earliest"), Ok(StartAt::Earliest));
        assert_eq!(parse_start("latest"), Ok(StartAt::Latest));
        assert_eq!(parse_start("42"), Ok(StartAt::Offset(42)));
        assert_eq!(
            parse_start("@1700000000000"),
            Ok(StartAt::Timestamp(1_700_000_000_000))
        );
        assert!(parse_start("-1").is_err());
        assert!(parse_start("@x").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn topics_alone_lists() {
        let c = Cli::try_parse_from(["busctl", "topics"]).unwrap();
        assert!(matches!(c.command, Command::Topics { cmd: None }));
        let c = Cli::try_parse_from([
            "busctl", "consume", "t", "--output", "arrow", "--from", "@5",
        ])
        .unwrap();
        assert_eq!(c.output, Output::Arrow);
    }
}
