//! Opening a Raft group over a partition log, and the partition applier.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;

use crate::hint::HintFile;
use crate::log::{LogConfig, PartitionLog};
use crate::network::{GroupNetwork, GroupRegistry, PeerPool};
use crate::quiesce::{new_incarnation, Quiescer, QuietConfig};
use crate::sm::{Applier, RestoreDone, StateMachine};
use crate::snapshot::PartitionState;
use crate::store::LogStore;
use crate::types::{self, Applied, Command, LogId, NodeId, Raft};

/// Raft timing for every group of a node.
#[derive(Clone, Debug)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// A led group with nothing to replicate for this long goes quiet
    /// (see [`crate::quiesce`]); 0: groups never go quiet.
    pub quiesce_after_ms: u64,
}

impl Default for RaftTiming {
    /// Failover under a second on a LAN while a few hundred groups'
    /// heartbeats stay cheap (one small QUIC stream each per interval).
    /// A follower campaigns only when the leader lease (openraft sets it to
    /// the maximum election timeout) *and* its own election timeout have
    /// both passed since the last heartbeat: 750–1000 ms here, plus a
    /// pre-vote and a vote round. Shorter timings were measured to tip a
    /// loaded 2-core node with a hundred groups into election storms
    /// (heartbeat RPCs late, pre-votes timing out), since every group
    /// heartbeats on its own.
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_min_ms: 250,
            election_max_ms: 500,
            // Ten heartbeats with nothing to say.
            quiesce_after_ms: 1000,
        }
    }
}

impl RaftTiming {
    /// The quiescer's timing, or `None` when groups never go quiet.
    pub fn quiet_config(&self) -> Option<QuietConfig> {
        (self.quiesce_after_ms > 0).then(|| {
            QuietConfig::new(
                Duration::from_millis(self.heartbeat_ms),
                Duration::from_millis(self.election_min_ms),
                Duration::from_millis(self.election_max_ms),
                Duration::from_millis(self.quiesce_after_ms),
            )
        })
    }

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
            // The log is the topic: retention decides what is deleted, so
            // openraft never snapshots or purges on its own. Retention
            // builds a snapshot at its cut and then asks for a purge up to
            // exactly that cut (`Group::compact_to`). A policy plus
            // `max_in_snapshot_log_to_keep` would not do: openraft snapshots
            // at the applied point and purges relative to it, i.e. by entry
            // counts, not at the segment boundary retention chose, so it
            // could delete data still inside retention.
            max_in_snapshot_log_to_keep: u64::MAX,
            snapshot_policy: openraft::SnapshotPolicy::Never,
            enable_pre_vote: Some(true),
            // A restarted leader must win a new term before it writes
            // (openraft's default lets it carry on in its old one). A leader
            // replicates entries before its own copy is durable, so a crash
            // can take from its log entries that followers hold; carrying on
            // in the same term it would write new entries under those very
            // log ids, and followers, already holding the ids, would keep
            // the old entries: diverged replicas and an overwritten
            // acknowledged batch (jepsen-like found it;
            // tests/tests/restarted_leader_takes_a_new_term.rs).
            enable_leader_restore: Some(false),
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
        self.registry.set_pool(self.pool.clone());
        // The node's quiescer starts with its first group (the controller).
        if let Some(cfg) = self.timing.quiet_config() {
            self.registry.start_quiet(
                Quiescer::new(self.node_id, cfg, new_incarnation()),
                self.pool.clone(),
            );
        }
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

/// How long [`Group::compact_to`] waits for the snapshot at the cut: a build
/// is a few words of state, so this only covers a state machine busy
/// applying a backlog; retention retries at its next check anyway.
pub const COMPACT_SNAPSHOT_WAIT: Duration = Duration::from_secs(10);

impl<A: Applier> Group<A> {
    /// Stop the group (it stops answering RPCs first) and close its log.
    pub async fn shutdown(&self, registry: &GroupRegistry) {
        registry.remove(self.id);
        let _ = self.raft.shutdown().await;
        self.store.log().close();
    }

    /// Retention through Raft: make entries up to partition-log index
    /// `log_index` (a segment boundary chosen by
    /// [`PartitionLog::retention_cut`], at or below the applied index)
    /// deletable. Builds a snapshot at `log_index` unless the current one
    /// already covers it, then asks openraft to purge up to it. openraft
    /// never purges past its snapshot's last log id, and as leader it
    /// postpones the purge while a replication stream still reads those
    /// entries; a follower that needs them afterwards gets the snapshot.
    ///
    /// Returns false when the snapshot did not appear in time (retry later);
    /// true once the purge is requested (it may complete later).
    pub async fn compact_to(&self, log_index: u64) -> io::Result<bool> {
        let raft_index = types::from_log_index(log_index);
        let covered = |m: &openraft::RaftMetrics<types::TypeConfig>| {
            m.snapshot.is_some_and(|s| s.index >= raft_index)
        };
        let fatal = |e: openraft::errors::Fatal<types::TypeConfig>| {
            io::Error::other(format!("group {}: {e}", self.id))
        };
        if !covered(&self.raft.metrics().borrow_watched()) {
            self.sm.request_snapshot_at(log_index);
            self.raft.trigger().snapshot().await.map_err(fatal)?;
            let built = tokio::time::timeout(
                COMPACT_SNAPSHOT_WAIT,
                self.raft
                    .wait(None)
                    .metrics(covered, "snapshot at the retention cut"),
            )
            .await;
            if !matches!(built, Ok(Ok(_))) {
                tracing::info!(
                    group = self.id,
                    log_index,
                    "no snapshot at the retention cut yet; retrying at the next check"
                );
                return Ok(false);
            }
        }
        self.raft
            .trigger()
            .purge_log(raft_index)
            .await
            .map_err(fatal)?;
        Ok(true)
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
    /// How far this replica has applied, as a restart hint.
    applied_hint: HintFile,
    next_offset: u64,
    last: Option<LogId>,
    hint_written: Instant,
}

impl PartitionApplier {
    pub fn new(log: &Arc<PartitionLog>, dir: &Path) -> Self {
        Self {
            log: log.clone(),
            applied_hint: HintFile::new(&dir.join(APPLIED_HINT)),
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
            let _ = self.applied_hint.write(log_id);
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
        let Some(id) = self.applied_hint.read() else {
            return Ok(None);
        };
        // The hint must name an entry this log holds, durably, with the
        // same log id (or the position a snapshot reset it to); otherwise
        // re-apply from the snapshot or the start.
        match self.log.next_offset_after(&types::stored_log_id(&id)) {
            Ok(Some(next_offset)) => {
                self.next_offset = next_offset;
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
        PartitionState {
            next_offset: self.next_offset,
            ..PartitionState::default()
        }
        .encode()
    }

    fn snapshot_at(&self, log_index: u64) -> io::Result<Option<(LogId, Vec<u8>)>> {
        // The state at an entry is the offset after it (no producer state
        // exists yet; once it does, it must be kept as of segment
        // boundaries to be describable here).
        let purged = self.log.purged_position();
        let at = if purged.last_index == log_index {
            purged.last_log_id.map(|id| (id, purged.next_offset))
        } else {
            self.log
                .entry(log_index)
                .map_err(crate::store::io_err)?
                .map(|b| (b.header.log_id, b.header.next_offset()))
        };
        let Some((id, next_offset)) = at else {
            return Ok(None);
        };
        let state = PartitionState {
            next_offset,
            ..PartitionState::default()
        };
        Ok(Some((types::from_stored(&id), state.encode()?)))
    }

    fn restore(&mut self, last: Option<&LogId>, data: &[u8]) -> io::Result<Option<RestoreDone>> {
        let state = PartitionState::decode(data)?;
        let Some(last) = last.copied() else {
            return Err(types::invalid(
                "a partition snapshot without a last log id (nothing to continue from)",
            ));
        };
        self.next_offset = state.next_offset;
        self.last = Some(last);
        let log = self.log.clone();
        let stored = types::stored_log_id(&last);
        Ok(Some(Box::pin(async move {
            // Decide on durable entries only: an entry still being flushed
            // may be the very one the snapshot ends at.
            log.wait_flushed().await.map_err(crate::store::io_err)?;
            match log
                .next_offset_after(&stored)
                .map_err(crate::store::io_err)?
            {
                // The log already continues from the snapshot's last entry
                // (e.g. reinstalled at restart, or a follower that had it):
                // keep it; openraft purges what the snapshot covers.
                Some(n) if n == state.next_offset => Ok(()),
                Some(n) => Err(types::invalid(format!(
                    "snapshot ending at {last} says the next offset is {}, but this replica's \
                     log has {n} after that entry",
                    state.next_offset
                ))),
                // Missing or a different entry there: everything local is
                // behind or off the committed log; start over after it.
                None => log
                    .reset_to(stored, state.next_offset)
                    .await
                    .map_err(crate::store::io_err),
            }
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot;
    use crate::types::{log_id, Membership, SnapshotMeta, StoredMembership};
    use arrowbus_wire::BatchHeader;
    use bytes::Bytes;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use std::collections::{BTreeMap, BTreeSet};

    fn cfg() -> LogConfig {
        LogConfig {
            segment_max_bytes: 4096,
            index_interval_bytes: 256,
            ..LogConfig::default()
        }
    }

    fn membership() -> StoredMembership {
        let nodes: BTreeMap<u64, crate::BasicNode> = (1..=3)
            .map(|i| {
                (
                    i,
                    crate::BasicNode {
                        addr: format!("n{i}"),
                    },
                )
            })
            .collect();
        let m = Membership::new(vec![(1..=3).collect::<BTreeSet<u64>>()], nodes).unwrap();
        StoredMembership::new(Some(log_id(1, 1, 0)), m)
    }

    /// A data entry of `rows` rows at Raft index `raft_index`, term 1.
    fn entry(raft_index: u64, rows: u32) -> crate::log::Entry {
        let body = vec![raft_index as u8; 300];
        let mut header = BatchHeader::for_body(&body, rows, 1).unwrap();
        header.log_id = types::stored_log_id(&log_id(1, 1, raft_index));
        crate::log::Entry {
            header,
            body: Bytes::from(body),
        }
    }

    async fn open(dir: &Path) -> (Arc<PartitionLog>, StateMachine<PartitionApplier>) {
        let (log, _) = PartitionLog::open(dir, cfg()).unwrap();
        let sm = StateMachine::new(PartitionApplier::new(&log, dir), dir).unwrap();
        (log, sm)
    }

    /// A node with one group, `group-1` with this node as its only voter,
    /// led here. The peer pool is real but never used: there are no peers.
    async fn single_voter_group(dir: &Path) -> (GroupEnv, Group<PartitionApplier>) {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        // Trusts a throwaway certificate: the config must have a root.
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let mut roots = quinn::rustls::RootCertStore::empty();
        roots.add(ca.cert.der().clone()).unwrap();
        let client = quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
        let env = GroupEnv {
            node_id: 1,
            pool: PeerPool::new(1, endpoint, client, "localhost".into()),
            registry: Arc::new(GroupRegistry::default()),
            timing: RaftTiming::default(),
        };
        let g = env
            .open(1, dir, cfg(), |log| Ok(PartitionApplier::new(log, dir)))
            .await
            .unwrap();
        let nodes = BTreeMap::from([(
            1,
            crate::BasicNode {
                addr: "127.0.0.1:1".into(),
            },
        )]);
        g.raft.initialize(nodes).await.unwrap();
        g.raft
            .wait(Some(Duration::from_secs(10)))
            .state(openraft::ServerState::Leader, "single voter leads")
            .await
            .unwrap();
        (env, g)
    }

    /// A quiet group's leader renews its lease before a write. With no other
    /// voter there is no one to hear a heartbeat from: the lease is its own,
    /// and waiting for a quorum ack that never comes stalled the first
    /// publish after every idle second by the whole lease (500 ms) on every
    /// single-replica partition, i.e. on every `busd dev` topic.
    #[tokio::test]
    async fn a_single_voter_leader_renews_its_lease_without_waiting() {
        use crate::network::GroupRpc;
        let dir = tempfile::tempdir().unwrap();
        let (env, g) = single_voter_group(dir.path()).await;
        // Quiet: no timer, so no heartbeat bookkeeping either.
        GroupRpc::set_ticking(&g.raft, false);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            GroupRpc::renew_lease(&g.raft, Duration::from_secs(3)).await,
            "a single voter's lease renewal must succeed"
        );
        GroupRpc::set_ticking(&g.raft, true);
        g.shutdown(&env.registry).await;
    }

    #[tokio::test]
    async fn installing_a_snapshot_resets_the_log_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut sm) = open(dir.path()).await;
        // A replica that holds Raft entries 0..=9 (10 rows each).
        let entries: Vec<_> = (0..10).map(|i| entry(i, 10)).collect();
        log.append(entries).unwrap().await.unwrap();
        // The leader's snapshot ends at Raft index 500, term 4, offset 9_000.
        let last = log_id(4, 2, 500);
        let data = crate::snapshot::PartitionState {
            next_offset: 9_000,
            ..Default::default()
        }
        .encode()
        .unwrap();
        let meta = SnapshotMeta {
            last_log_id: Some(last),
            last_membership: membership(),
        };
        sm.install_snapshot(&meta, Bytes::from(data.clone()))
            .await
            .unwrap();
        assert_eq!(
            *sm.position().borrow(),
            crate::sm::AppliedPosition {
                index: 501,
                next_offset: 9_000
            }
        );
        assert_eq!(
            log.purged_position().last_log_id,
            Some(types::stored_log_id(&last))
        );
        assert_eq!(log.start_offset(), 9_000);
        assert_eq!(log.stats().batches, 0);
        assert_eq!(sm.applied_state().await.unwrap().0, Some(last));
        let cur = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(cur.meta, meta);
        // Durable: the file says the same, and a restarted state machine
        // offers it to openraft (which installs it again at start: the log
        // already continues from it, so it is kept).
        let (fm, fd) = snapshot::read_file(dir.path()).unwrap().unwrap();
        assert_eq!((fm, &fd[..]), (meta.clone(), &data[..]));
        log.append(vec![entry(501, 5)]).unwrap().await.unwrap();
        log.close();
        drop((log, sm));
        let (log, mut sm) = open(dir.path()).await;
        let cur = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(cur.meta, meta);
        sm.install_snapshot(&cur.meta, cur.snapshot).await.unwrap();
        assert_eq!(
            log.last_enqueued().last_index,
            502,
            "entry after the snapshot kept"
        );
        assert_eq!(log.entry(502).unwrap().unwrap().header.base_offset, 9_000);
        assert_eq!(sm.position().borrow().next_offset, 9_000);
    }

    #[tokio::test]
    async fn a_snapshot_that_does_not_decode_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut sm) = open(dir.path()).await;
        log.append(vec![entry(0, 3)]).unwrap().await.unwrap();
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(2, 1, 50)),
            last_membership: membership(),
        };
        let e = sm
            .install_snapshot(&meta, Bytes::from_static(b"not a partition state"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(snapshot::read_file(dir.path()).unwrap().is_none());
        assert_eq!(log.last_enqueued().last_index, 1);
        assert!(log.entry(1).unwrap().is_some());
    }

    #[tokio::test]
    async fn snapshots_are_built_at_the_requested_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut sm) = open(dir.path()).await;
        // Raft index 0 is the membership; 1..=40 data of 7 rows each.
        let mut first = entry(0, 0);
        first.header.kind = arrowbus_wire::BatchKind::Raft;
        let mut es = vec![first];
        es.extend((1..=40).map(|i| entry(i, 7)));
        log.append(es.clone()).unwrap().await.unwrap();
        // Apply them, as openraft would (membership first).
        let cmds: Vec<_> = es[1..]
            .iter()
            .map(|e| {
                let id = types::from_stored(&e.header.log_id);
                let mut header = e.header;
                header.base_offset = (id.index - 1) * 7;
                let body = e.body.clone();
                (id, crate::types::Command { header, body })
            })
            .collect();
        sm.apply_for_test(membership(), &cmds).unwrap();
        // Cut at log index 21 (Raft index 20): 20 batches of 7 rows.
        sm.request_snapshot_at(21);
        let snap = sm.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 1, 20)));
        let st = crate::snapshot::PartitionState::decode(&snap.snapshot).unwrap();
        assert_eq!(st.next_offset, 140);
        assert_eq!(sm.snapshot_last(), Some(log_id(1, 1, 20)));
        // A cut beyond the applied point is not describable: the applied
        // point is used instead.
        sm.request_snapshot_at(1000);
        let snap = sm.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 1, 40)));
        let st = crate::snapshot::PartitionState::decode(&snap.snapshot).unwrap();
        assert_eq!(st.next_offset, 280);
        // An older build never replaces a newer current snapshot.
        sm.request_snapshot_at(5);
        let older = sm.build_snapshot().await.unwrap();
        assert_eq!(older.meta.last_log_id, Some(log_id(1, 1, 4)));
        assert_eq!(sm.snapshot_last(), Some(log_id(1, 1, 40)));
        let (fm, _) = snapshot::read_file(dir.path()).unwrap().unwrap();
        assert_eq!(fm.last_log_id, Some(log_id(1, 1, 40)));
        log.close();
    }
}
