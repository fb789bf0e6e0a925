//! Node configuration: what `busd run --config F.toml` reads and what
//! `busd dev` fills in with embedded defaults. Every field documents its unit
//! and what it costs; `validate()` names the bad value. The commented default
//! file is `broker/busd.example.toml`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Default client port. Unassigned by IANA; "AB" on a phone pad is 2-2.
pub const DEFAULT_PORT: u16 = 7447;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// This node's id in the cluster (non-zero).
    pub node_id: u64,
    /// Where topic logs, topic metadata and dev certificates live.
    pub data_dir: PathBuf,
    /// UDP address the QUIC endpoint binds to.
    pub listen: SocketAddr,
    /// Address clients are told to use for this node (defaults to `listen`).
    #[serde(default)]
    pub advertised_addr: Option<String>,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default)]
    pub quic: QuicSettings,
    #[serde(default)]
    pub cluster: ClusterSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// The initial controller voters as "<id>@<host:port>", this node
    /// included. Empty: a cluster of this node alone. Read only on first
    /// start (an empty controller log); later membership lives in the log.
    pub peers: Vec<String>,
    /// Join an existing cluster instead of creating one: the node starts
    /// empty and waits until `busctl cluster add-node` adds it (`peers` is
    /// then not needed).
    pub join: bool,
    /// TLS server name the nodes' certificates carry (nodes verify each
    /// other with `tls.ca`).
    pub server_name: String,
    /// Raft heartbeat interval, in ms.
    pub heartbeat_ms: u64,
    /// Raft election timeout range, in ms: a follower that hears nothing
    /// from its leader for this long starts an election.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// A partition (or the controller) with nothing to replicate for this
    /// long goes quiet: its replicas stop their Raft timers and one ping
    /// per node pair stands in for its heartbeats. 0 turns this off.
    pub quiesce_after_idle_ms: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        let t = arrowbus_raft::group::RaftTiming::default();
        Self {
            peers: Vec::new(),
            join: false,
            server_name: "localhost".into(),
            heartbeat_ms: t.heartbeat_ms,
            election_timeout_min_ms: t.election_min_ms,
            election_timeout_max_ms: t.election_max_ms,
            quiesce_after_idle_ms: t.quiesce_after_ms,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of this node.
    pub cert: Option<PathBuf>,
    /// PEM private key of this node.
    pub key: Option<PathBuf>,
    /// PEM CA certificate that signed the nodes' certificates: nodes verify
    /// each other with it (and it is what clients should be given).
    pub ca: Option<PathBuf>,
    /// Generate a private CA and certificate in `data_dir/tls` when `cert`
    /// and `key` are not given. For development: clients must be given the
    /// generated `ca.pem`.
    #[serde(default)]
    pub self_signed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// A publish is acknowledged only after its batch is fsynced (default).
    #[default]
    Always,
    /// Acknowledge after the write reaches the page cache and fsync every
    /// `fsync_interval_ms`. WEAKER: a power loss or kernel crash loses what
    /// was acknowledged in the last interval.
    Interval,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub fsync: FsyncMode,
    /// With `fsync = "interval"`: time between fsyncs, in ms.
    pub fsync_interval_ms: u64,
    /// Segment files roll at this size. Retention deletes whole segments, so
    /// smaller segments free space sooner but cost more files.
    pub segment_bytes: u64,
    /// Sparse offset index density: one index entry per this many bytes.
    /// Smaller: faster seeks, larger index files.
    pub index_interval_bytes: u64,
    /// Most bytes written per fsync group (group commit). Larger groups mean
    /// fewer fsyncs under load and longer tail latency for the group's first batch.
    pub max_group_bytes: u64,
    /// Bytes of each partition's newest batches kept in memory after they
    /// are written, so subscribers at the head and replication to followers
    /// read them without touching the file. Held only while the partition
    /// is written (dropped after 2 s idle). 0 disables it.
    pub tail_cache_bytes: u64,
    /// With `fsync = "always"`, write segment files with O_DIRECT: no copy
    /// into the page cache (falls back to buffered writes on file systems
    /// without O_DIRECT, such as tmpfs).
    pub direct_io: bool,
    /// How often retention is enforced, in ms.
    pub retention_check_interval_ms: u64,
    /// Default topic retention by age, in ms (none: keep forever).
    pub default_retention_ms: Option<u64>,
    /// Default topic retention by size per partition, in bytes (none: unbounded).
    pub default_retention_bytes: Option<u64>,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            fsync: FsyncMode::Always,
            fsync_interval_ms: 1000,
            segment_bytes: 128 * 1024 * 1024,
            index_interval_bytes: 64 * 1024,
            max_group_bytes: 64 * 1024 * 1024,
            tail_cache_bytes: 8 * 1024 * 1024,
            direct_io: true,
            retention_check_interval_ms: 30_000,
            default_retention_ms: None,
            default_retention_bytes: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicSettings {
    /// Connection receive window in bytes: the most a client can have in
    /// flight to this node on one connection (quinn's default is unbounded).
    pub connection_receive_window_bytes: u64,
    /// Per-stream receive window in bytes.
    pub stream_receive_window_bytes: u64,
    /// Per-connection send buffer in bytes: bounds memory for fast
    /// subscribers; slow ones are bounded by their credit.
    pub send_window_bytes: u64,
    /// Close connections idle this long, in ms.
    pub idle_timeout_ms: u64,
    /// Keep-alive ping interval, in ms (must be below the idle timeout).
    pub keep_alive_ms: u64,
    /// Concurrent bidirectional streams per connection (requests, producer
    /// pipelines and subscriptions).
    pub max_concurrent_streams: u32,
    /// UDP socket send and receive buffer, in bytes (the kernel caps it at
    /// net.core.{r,w}mem_max unless busd has CAP_NET_ADMIN; busd warns
    /// at start when it got less).
    pub socket_buffer_bytes: usize,
}

impl Default for QuicSettings {
    fn default() -> Self {
        Self {
            connection_receive_window_bytes: 64 * 1024 * 1024,
            stream_receive_window_bytes: 32 * 1024 * 1024,
            send_window_bytes: 32 * 1024 * 1024,
            idle_timeout_ms: 30_000,
            keep_alive_ms: 5_000,
            max_concurrent_streams: 1024,
            socket_buffer_bytes: arrowbus_quic::DEFAULT_SOCKET_BUFFER_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid config: {field} = {value}: {why}")]
pub struct ConfigError {
    pub field: &'static str,
    pub value: String,
    pub why: String,
}

fn bad(field: &'static str, value: impl ToString, why: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        value: value.to_string(),
        why: why.into(),
    }
}

impl BrokerConfig {
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let cfg: BrokerConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(bad("node_id", 0, "node ids start at 1"));
        }
        let l = &self.log;
        if l.segment_bytes < 1024 * 1024 || l.segment_bytes > 4 * 1024 * 1024 * 1024 {
            return Err(bad(
                "log.segment_bytes",
                l.segment_bytes,
                "must be between 1 MiB and 4 GiB",
            ));
        }
        if l.index_interval_bytes < 1024 || l.index_interval_bytes > l.segment_bytes {
            return Err(bad(
                "log.index_interval_bytes",
                l.index_interval_bytes,
                "must be between 1 KiB and segment_bytes",
            ));
        }
        if l.max_group_bytes < u64::from(arrowbus_wire::limits::MAX_BATCH_BYTES) {
            return Err(bad(
                "log.max_group_bytes",
                l.max_group_bytes,
                "must hold at least one maximal batch (16 MiB)",
            ));
        }
        if l.tail_cache_bytes > arrowbus_raft::log::MAX_TAIL_CACHE_BYTES {
            return Err(bad(
                "log.tail_cache_bytes",
                l.tail_cache_bytes,
                "must be at most 1 GiB",
            ));
        }
        if l.fsync == FsyncMode::Interval && l.fsync_interval_ms == 0 {
            return Err(bad("log.fsync_interval_ms", 0, "must be positive"));
        }
        if l.retention_check_interval_ms < 100 {
            return Err(bad(
                "log.retention_check_interval_ms",
                l.retention_check_interval_ms,
                "must be at least 100 ms",
            ));
        }
        let q = &self.quic;
        if q.keep_alive_ms == 0 || q.keep_alive_ms >= q.idle_timeout_ms {
            return Err(bad(
                "quic.keep_alive_ms",
                q.keep_alive_ms,
                "must be positive and below quic.idle_timeout_ms",
            ));
        }
        if q.stream_receive_window_bytes < 1024 * 1024
            || q.stream_receive_window_bytes > q.connection_receive_window_bytes
        {
            return Err(bad(
                "quic.stream_receive_window_bytes",
                q.stream_receive_window_bytes,
                "must be at least 1 MiB and at most connection_receive_window_bytes",
            ));
        }
        if q.max_concurrent_streams == 0 {
            return Err(bad("quic.max_concurrent_streams", 0, "must be positive"));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(bad(
                "tls.cert/tls.key",
                "one of them",
                "give both a certificate and a key, or neither",
            ));
        }
        let c = &self.cluster;
        if c.heartbeat_ms == 0 || c.election_timeout_min_ms <= 2 * c.heartbeat_ms {
            return Err(bad(
                "cluster.election_timeout_min_ms",
                c.election_timeout_min_ms,
                "must exceed two heartbeat intervals (cluster.heartbeat_ms)",
            ));
        }
        if c.election_timeout_max_ms <= c.election_timeout_min_ms {
            return Err(bad(
                "cluster.election_timeout_max_ms",
                c.election_timeout_max_ms,
                "must exceed cluster.election_timeout_min_ms",
            ));
        }
        let peers = self
            .peers()
            .map_err(|why| bad("cluster.peers", format!("{:?}", c.peers), why))?;
        if !c.join && !c.peers.is_empty() && !peers.contains_key(&self.node_id) {
            return Err(bad(
                "cluster.peers",
                format!("{:?}", c.peers),
                "must list this node (node_id) too",
            ));
        }
        if self.tls.cert.is_some() && !peers.is_empty() && peers.len() > 1 && self.tls.ca.is_none()
        {
            return Err(bad(
                "tls.ca",
                "unset",
                "a multi-node cluster with its own certificates needs the CA that signed them",
            ));
        }
        if self.tls.cert.is_none() && !self.tls.self_signed {
            return Err(bad(
                "tls",
                "no certificate",
                "set tls.cert and tls.key, or tls.self_signed = true for development",
            ));
        }
        Ok(())
    }

    /// The embedded defaults of `busd dev`.
    pub fn dev(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            node_id: 1,
            data_dir,
            listen,
            advertised_addr: None,
            tls: TlsConfig {
                cert: None,
                key: None,
                ca: None,
                self_signed: true,
            },
            log: LogSettings::default(),
            quic: QuicSettings::default(),
            cluster: ClusterSettings::default(),
        }
    }

    /// Initial controller voters by id (this node alone when none are given).
    pub fn peers(&self) -> Result<std::collections::BTreeMap<u64, String>, String> {
        let mut out = std::collections::BTreeMap::new();
        for p in &self.cluster.peers {
            let (id, addr) = p
                .split_once('@')
                .ok_or_else(|| format!("{p:?} is not \"<id>@<host:port>\""))?;
            let id: u64 = id
                .parse()
                .ok()
                .filter(|i| *i > 0)
                .ok_or_else(|| format!("{p:?}: the id must be a positive integer"))?;
            check_host_port(addr).map_err(|why| format!("{p:?}: {why}"))?;
            if out.insert(id, addr.to_owned()).is_some() {
                return Err(format!("node id {id} is listed twice"));
            }
        }
        if out.is_empty() {
            out.insert(self.node_id, self.advertised());
        }
        Ok(out)
    }

    /// Whether this node may create a cluster: not when it joins one.
    pub fn creates_cluster(&self) -> bool {
        !self.cluster.join
    }

    pub fn raft_timing(&self) -> arrowbus_raft::group::RaftTiming {
        arrowbus_raft::group::RaftTiming {
            heartbeat_ms: self.cluster.heartbeat_ms,
            election_min_ms: self.cluster.election_timeout_min_ms,
            election_max_ms: self.cluster.election_timeout_max_ms,
            quiesce_after_ms: self.cluster.quiesce_after_idle_ms,
        }
    }

    pub fn advertised(&self) -> String {
        self.advertised_addr
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    pub fn log_config(&self) -> arrowbus_raft::log::LogConfig {
        arrowbus_raft::log::LogConfig {
            segment_max_bytes: self.log.segment_bytes,
            index_interval_bytes: self.log.index_interval_bytes,
            fsync: match self.log.fsync {
                FsyncMode::Always => arrowbus_raft::log::FsyncPolicy::Always,
                FsyncMode::Interval => arrowbus_raft::log::FsyncPolicy::Interval(
                    Duration::from_millis(self.log.fsync_interval_ms),
                ),
            },
            max_group_bytes: self.log.max_group_bytes,
            tail_cache_bytes: self.log.tail_cache_bytes,
            direct_io: self.log.direct_io,
        }
    }
}

/// `Ok` when `addr` is `host:port` with a valid port.
pub fn check_host_port(addr: &str) -> Result<(), String> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => Err(format!("{addr:?}: the address must be host:port")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../busd.example.toml");
        let cfg = BrokerConfig::from_toml(text).unwrap();
        assert_eq!(cfg.node_id, 1);
        assert_eq!(cfg.log.fsync, FsyncMode::Always);
        assert_eq!(cfg.listen.port(), DEFAULT_PORT);
    }

    #[test]
    fn bad_values_are_named() {
        let mut cfg = BrokerConfig::dev("/tmp/x".into(), "127.0.0.1:1".parse().unwrap());
        cfg.validate().unwrap();
        cfg.log.segment_bytes = 10;
        let e = cfg.validate().unwrap_err();
        assert_eq!(e.field, "log.segment_bytes");
        assert_eq!(e.value, "10");
        let mut cfg = BrokerConfig::dev("/tmp/x".into(), "127.0.0.1:1".parse().unwrap());
        cfg.tls.self_signed = false;
        assert_eq!(cfg.validate().unwrap_err().field, "tls");
        let err = BrokerConfig::from_toml("node_id = 1\nbogus = 2\n").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
    }
}
