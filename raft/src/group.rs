//! Opening a Raft group over a partition log, and the partition applier.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::log::{LogConfig, PartitionLog};
use crate::network::{GroupNetwork, GroupRegistry, PeerPool};
use crate::sm::{Applier, StateMachine};
use crate::store::LogStore;
use crate::types::{self, Applied, Command, LogId, NodeId, Raft};

/// Raft timing for every group of a node.
#[derive(Clone, Debug)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
}

impl Default for RaftTiming {
    /// Failover under a second on a LAN while a few hundred groups'
    /// heartbeats stay cheap (one small QUIC stream each per interval).
    /// A follower campaigns only when the leader lease (openraft sets it to
    /// the maximum election timeout) *and* its own election timeout have
    /// both passed since the last heartbeat: 600–800 ms here, plus a
    /// pre-vote and a vote round. A live leader is deposed only after
    /// seven heartbeats in a row are lost.
    fn default() -> Self {
        Self {
            heartbeat_ms: 80,
            election_min_ms: 200,
            election_max_ms: 400,
        }
    }
}

impl RaftTiming {
    pub fn openraft_config(&self, name: &str) -> io::Result<Arc<openraft::Config>> {
        let cfg = openraft::Config {
            cluster_name: name.to_string(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            // openraft ties append RPC timeouts to the heartbeat interval;
            // a 16 MiB entry over a busy link needs longer than 100 ms.
            install_snapshot_timeout: 10_000,
            max_payload_entries: 256,
            // The log is the topic: retention, not snapshots, decides what
            // is deleted, so openraft never purges on its own.
            max_in_snapshot_log_to_keep: u64::MAX,
            snapshot_policy: openraft::SnapshotPolicy::Never,
            enable_pre_vote: Some(true),
            ..Default::default()
        };
        cfg.validate()
            .map(Arc::new)
            .map_err(|e| io::Error::other(format!("raft config: {e}")))
    }
}

/// A running group on this node.
pub struct Group<A: Applier> {
    pub id: u64,
    pub raft: Raft<StateMachine<A>>,
    pub store: LogStore,
    pub sm: StateMachine<A>,
}

impl<A: Applier> Clone for Group<A> {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            raft: self.raft.clone(),
            store: self.store.clone(),
            sm: self.sm.clone(),
        }
    }
}

/// Everything a node needs to start groups.
pub struct GroupEnv {
    pub node_id: NodeId,
    pub pool: Arc<PeerPool>,
    pub registry: Arc<GroupRegistry>,
    pub timing: RaftTiming,
}

impl GroupEnv {
    /// Open (or create) group `id` with its log in `dir`, and register it
    /// for incoming RPCs. `make_applier` gets the opened log.
    pub async fn open<A: Applier>(
        &self,
        id: u64,
        dir: &Path,
        log_cfg: LogConfig,
        make_applier: impl FnOnce(&Arc<PartitionLog>) -> io::Result<A>,
    ) -> io::Result<Group<A>> {
        let d = dir.to_owned();
        let (log, _report) = tokio::task::spawn_blocking(move || PartitionLog::open(&d, log_cfg))
            .await
            .map_err(io::Error::other)?
            .map_err(crate::store::io_err)?;
        let store = LogStore::open(log.clone(), dir)?;
        let applier = make_applier(&log)?;
        let sm = StateMachine::new(applier, dir)?;
        let config = self.timing.openraft_config(&format!("group-{id}"))?;
        let network = GroupNetwork::new(self.pool.clone(), id);
        let raft = Raft::new(self.node_id, config, network, store.clone(), sm.clone())
            .await
            .map_err(|e| io::Error::other(format!("start raft group {id}: {e}")))?;
        self.registry.insert(id, Arc::new(raft.clone()));
        Ok(Group {
            id,
            raft,
            store,
            sm,
        })
    }
}

impl<A: Applier> Group<A> {
    /// Stop the group (it stops answering RPCs first) and close its log.
    pub async fn shutdown(&self, registry: &GroupRegistry) {
        registry.remove(self.id);
        let _ = self.raft.shutdown().await;
        self.store.log().close();
    }
}

const APPLIED_HINT: &str = "applied";
/// How often a partition records how far it has applied (a restart
/// re-applies at most this much).
const APPLIED_HINT_INTERVAL: Duration = Duration::from_secs(1);

/// A partition's applier: the batches are already in the log, so applying
/// one only makes it visible (the high watermark moves past it).
pub struct PartitionApplier {
    log: Arc<PartitionLog>,
    dir: PathBuf,
    next_offset: u64,
    last: Option<LogId>,
    hint_written: Instant,
}

impl PartitionApplier {
    pub fn new(log: &Arc<PartitionLog>, dir: &Path) -> Self {
        Self {
            log: log.clone(),
            dir: dir.to_owned(),
            next_offset: log.purged_position().next_offset,
            last: None,
            hint_written: Instant::now(),
        }
    }

    fn note(&mut self, log_id: &LogId) {
        self.last = Some(*log_id);
        if self.hint_written.elapsed() >= APPLIED_HINT_INTERVAL {
            self.hint_written = Instant::now();
            // Best effort: a stale or missing hint only costs re-applying.
            let mut b = Vec::with_capacity(28);
            b.extend_from_slice(&log_id.leader_id.term.to_le_bytes());
            b.extend_from_slice(&log_id.leader_id.node_id.to_le_bytes());
            b.extend_from_slice(&log_id.index.to_le_bytes());
            b.extend_from_slice(&crc32c::crc32c(&b).to_le_bytes());
            let tmp = self.dir.join("applied.tmp");
            if std::fs::write(&tmp, &b).is_ok() {
                let _ = std::fs::rename(&tmp, self.dir.join(APPLIED_HINT));
            }
        }
    }
}

impl Applier for PartitionApplier {
    fn apply(&mut self, log_id: &LogId, cmd: &Command) -> io::Result<Applied> {
        self.next_offset = cmd.header.next_offset();
        self.note(log_id);
        Ok(Applied {
            base_offset: cmd.header.base_offset,
            rows: cmd.header.row_count,
            timestamp_ms: cmd.header.timestamp_ms,
            reply: bytes::Bytes::new(),
        })
    }

    fn apply_raft_entry(&mut self, log_id: &LogId) -> io::Result<()> {
        self.note(log_id);
        Ok(())
    }

    fn recovered_applied(&mut self) -> io::Result<Option<LogId>> {
        let Ok(b) = std::fs::read(self.dir.join(APPLIED_HINT)) else {
            return Ok(None);
        };
        if b.len() != 28 || crc32c::crc32c(&b[..24]).to_le_bytes() != b[24..28] {
            return Ok(None);
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        let id = types::log_id(word(0), word(1), word(2));
        // The hint must name an entry this log holds, durably, with the
        // same log id; otherwise re-apply from the start.
        match self.log.entry(types::to_log_index(id.index)) {
            Ok(Some(rec)) if types::from_stored(&rec.header.log_id) == id => {
                self.next_offset = rec.header.next_offset();
                self.last = Some(id);
                Ok(Some(id))
            }
            _ => Ok(None),
        }
    }

    fn next_offset(&self) -> u64 {
        self.next_offset
    }

    fn snapshot(&self) -> io::Result<Vec<u8>> {
        Ok(self.next_offset.to_le_bytes().to_vec())
    }

    fn restore(&mut self, _last: Option<&LogId>, _data: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "installing a partition snapshot (a replica that fell behind retention) is not \
             supported yet: re-create this replica from an empty data directory",
        ))
    }
}
