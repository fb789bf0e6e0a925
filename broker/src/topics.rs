//! Topics and their partitions, as this node sees them in a cluster.
//!
//! Topic metadata lives in the controller group ([`crate::controller`]);
//! every node applies the same controller log and reconciles what it hosts
//! from it: for each partition it is a replica of, it runs that partition's
//! Raft group over a partition log in `data_dir/topics/<name>-<topic id>/p-<n>/`,
//! and it stops and removes the groups of deleted topics. A single node is a
//! cluster of one: the same controller, one-replica partition groups.
//!
//! Writes to metadata (create, delete, set schema) are proposed to the
//! controller leader; a node that is not the leader answers `NotLeader` with
//! the leader's id.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arrowbus_raft::group::{Group, GroupEnv, PartitionApplier};
use arrowbus_raft::log::{LogConfig, LogError, PartitionLog};
use arrowbus_raft::sm::AppliedPosition;
use arrowbus_raft::types::{Applied, Command, NodeId, TypeConfig};
use arrowbus_raft::{BasicNode, ServerState};
use arrowbus_wire::limits::MAX_TOPIC_NAME_BYTES;
use arrowbus_wire::peer::{partition_group, CONTROLLER_GROUP};
use arrowbus_wire::{BatchHeader, ErrorCode, NodeInfo, PartitionInfo, TopicInfo};
use bytes::Bytes;
use openraft::async_runtime::WatchReceiver;
use tokio::sync::{oneshot, watch};

use crate::controller::{
    decode_reply, ControllerApplier, ControllerCommand, ControllerReply, TopicRecord,
};
use crate::error::BrokerError;
use crate::ipc::{self, TopicSchema};

mod moves;
mod revive;
pub use moves::NodeChange;

/// Free space a partition's file system keeps in reserve: Raft's own
/// entries, segment headers and index files must always fit.
pub const MIN_FREE_BYTES: u64 = 4 * 1024 * 1024;

/// Bytes available to this process on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a zeroed out-struct.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (rc == 0).then(|| (st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Topics with a schema use schema id 1 (schemas never change in place).
const SCHEMA_ID: u32 = 1;
/// How long an admin request waits for the new state to be applied here.
const ADMIN_APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A replicated partition hosted on this node.
pub struct Partition {
    pub topic: String,
    pub id: u32,
    group: Group<PartitionApplier>,
    node_id: NodeId,
    /// Last assigned append time (leader side): timestamps never go backwards
    /// within a leader's term, so seeking by time can binary-search the log.
    /// With it, the offset after the last proposed batch.
    last_ts: Mutex<(i64, u64)>,
}

/// A proposed batch: `rx` completes when it is committed and applied.
pub struct Proposal {
    pub rx: oneshot::Receiver<openraft_result::WriteResult>,
    /// Where the batch will land if nothing else is proposed in between
    /// (for the test-only unsafe mode that acknowledges before commit).
    pub predicted_base_offset: u64,
    pub rows: u32,
    pub timestamp_ms: i64,
}

/// Re-exported result type of a proposal, kept behind one name.
pub mod openraft_result {
    pub type WriteResult = Result<
        openraft::raft::ClientWriteResponse<arrowbus_raft::types::TypeConfig>,
        openraft::errors::ClientWriteError<arrowbus_raft::types::TypeConfig>,
    >;
}

impl Partition {
    pub fn log(&self) -> &Arc<PartitionLog> {
        self.group.store.log()
    }

    /// The applied (committed) position: readers never see past it.
    pub fn visible(&self) -> watch::Receiver<AppliedPosition> {
        self.group.sm.position()
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.group.raft.metrics().borrow_watched().current_leader
    }

    /// `StorageFull` when the partition's file system cannot take `bytes`
    /// more while keeping [`MIN_FREE_BYTES`] free. Checked before proposing:
    /// openraft treats a failed log write as fatal for the group, so the
    /// broker stops accepting data before the disk is actually full.
    pub fn ensure_space(&self, bytes: u64) -> Result<(), BrokerError> {
        let Some(free) = free_bytes(self.log().dir()) else {
            return Ok(());
        };
        if free < bytes.saturating_add(MIN_FREE_BYTES) {
            return Err(BrokerError::new(
                ErrorCode::StorageFull,
                format!(
                    "the broker's disk is full ({} has {free} bytes free, the broker keeps {MIN_FREE_BYTES} in reserve); nothing was stored. Free space and retry",
                    self.log().dir().display()
                ),
            ));
        }
        Ok(())
    }

    /// `NotLeader` unless this replica leads its group.
    pub fn ensure_leader(&self) -> Result<(), BrokerError> {
        let m = self.group.raft.metrics().borrow_watched().clone();
        if m.state == ServerState::Leader {
            return Ok(());
        }
        Err(not_leader(
            m.current_leader.filter(|l| *l != self.node_id),
            format!("partition {}/{}", self.topic, self.id),
        ))
    }

    /// Propose a validated batch. Submission order is the log order, so a
    /// pipeline calls this in arrival order and awaits the results later.
    pub async fn propose(
        &self,
        mut header: BatchHeader,
        body: Bytes,
    ) -> Result<Proposal, BrokerError> {
        self.ensure_leader()?;
        let predicted_base_offset = {
            let mut last = self.last_ts.lock().unwrap_or_else(|p| p.into_inner());
            let ts = now_ms().max(last.0);
            header.timestamp_ms = ts;
            let base = last.1.max(self.log().last_enqueued().next_offset);
            *last = (ts, base + header.offset_count());
            base
        };
        let (rows, timestamp_ms) = (header.row_count, header.timestamp_ms);
        let (responder, rx) = openraft::impls::ProgressResponder::complete_only();
        self.group
            .raft
            .write(Command { header, body })
            .responder(responder)
            .await
            .map_err(|e| {
                BrokerError::new(ErrorCode::ShuttingDown, format!("partition stopped: {e}"))
            })?;
        Ok(Proposal {
            rx,
            predicted_base_offset,
            rows,
            timestamp_ms,
        })
    }

    /// Retention for this replica: when the topic's limits (whole sealed
    /// segments, by age or total bytes) allow deleting a prefix of the log,
    /// snapshot the partition at that cut and let Raft purge up to it.
    /// Only applied entries are ever cut. Each replica does this for its own
    /// log; a follower that falls behind the leader's cut installs the
    /// leader's snapshot. Returns the cut (partition-log index) when a purge
    /// was requested.
    pub async fn enforce_retention(
        &self,
        now_ms: i64,
        retention_ms: Option<u64>,
        retention_bytes: Option<u64>,
    ) -> Result<Option<u64>, BrokerError> {
        let applied = self.group.sm.position().borrow().index;
        let Some(cut) = self
            .log()
            .retention_cut(now_ms, retention_ms, retention_bytes, applied)
        else {
            return Ok(None);
        };
        let requested = self.group.compact_to(cut).await.map_err(storage_err)?;
        Ok(requested.then_some(cut))
    }

    /// Its state as this replica sees it; `replicas` and `moving_to` come
    /// from the controller's record of the topic.
    pub fn info(&self, replicas: Vec<NodeId>, moving_to: Vec<NodeId>) -> PartitionInfo {
        let s = self.log().stats();
        let m = self.group.raft.metrics().borrow_watched().clone();
        let pos = *self.group.sm.position().borrow();
        let in_sync = match (&m.replication, m.state) {
            // A follower is in sync when it holds everything committed.
            (Some(rep), ServerState::Leader) => {
                let committed = m.cluster_committed.map_or(0, |c| c.index);
                rep.iter()
                    .filter(|(_, matched)| matched.map_or(0, |l| l.index) >= committed)
                    .map(|(id, _)| *id)
                    .collect()
            }
            _ => Vec::new(),
        };
        PartitionInfo {
            partition: self.id,
            leader: m.current_leader.unwrap_or(0),
            replicas,
            moving_to,
            in_sync,
            earliest_offset: s.start_offset,
            latest_offset: pos.next_offset,
            bytes: s.bytes,
            batches: s.batches,
        }
    }
}

/// Map a failed proposal to the error a client sees.
pub fn write_error(
    e: openraft::errors::ClientWriteError<arrowbus_raft::types::TypeConfig>,
    what: &str,
) -> BrokerError {
    use openraft::errors::ClientWriteError as E;
    match e {
        E::ForwardToLeader(f) => not_leader(f.leader_id, what.to_owned()),
        E::LogEntryDiscarded(f) => {
            let mut err = not_leader(f.leader_id, what.to_owned());
            err.message = format!(
                "{}; the batch may or may not have been stored (leader changed before it committed)",
                err.message
            );
            err
        }
        other => BrokerError::new(ErrorCode::Internal, format!("{what}: {other}")),
    }
}

/// How long a starting node waits to catch up with the controller before it
/// serves clients (see [`Topics::open`]).
const STARTUP_CATCH_UP_WAIT: Duration = Duration::from_secs(10);

pub fn not_leader(hint: Option<NodeId>, what: String) -> BrokerError {
    let mut e = BrokerError::new(
        ErrorCode::NotLeader,
        match hint {
            Some(l) => format!("this node does not lead {what}; node {l} does: retry there"),
            None => format!("{what} has no leader right now (election in progress); retry shortly"),
        },
    );
    e.leader_hint = hint;
    e
}

/// A topic as this node knows it: controller metadata plus local replicas.
pub struct Topic {
    pub meta: TopicRecord,
    schema: Option<Arc<TopicSchema>>,
    /// One slot per partition; `Some` where this node hosts a replica.
    local: Vec<Option<Arc<Partition>>>,
}

impl Topic {
    pub fn schema(&self) -> Option<Arc<TopicSchema>> {
        self.schema.clone()
    }

    pub fn partitions(&self) -> u32 {
        self.meta.assignments.len() as u32
    }

    /// This node's replica of partition `p` (`NotLeader` pointing at a
    /// replica if it hosts none).
    pub fn partition(&self, p: u32) -> Result<&Arc<Partition>, BrokerError> {
        let Some(slot) = self.local.get(p as usize) else {
            return Err(BrokerError::new(
                ErrorCode::PartitionNotFound,
                format!(
                    "topic '{}' has partitions 0..{}; partition {p} does not exist",
                    self.meta.name,
                    self.partitions()
                ),
            ));
        };
        slot.as_ref().ok_or_else(|| {
            let hint = self.meta.assignments[p as usize].first().copied();
            not_leader(
                hint,
                format!("partition {}/{p} (no replica on this node)", self.meta.name),
            )
        })
    }

    pub fn info(&self) -> TopicInfo {
        let schema = self.schema();
        TopicInfo {
            name: self.meta.name.clone(),
            replication_factor: self.meta.replication_factor,
            retention_ms: self.meta.retention_ms,
            retention_bytes: self.meta.retention_bytes,
            schema_id: schema.as_ref().map_or(0, |s| s.id),
            schema_ipc: schema.map(|s| s.ipc.to_vec()).unwrap_or_default(),
            created_ms: self.meta.created_ms,
            partitions: self
                .local
                .iter()
                .enumerate()
                .map(|(p, local)| {
                    let replicas = self.meta.assignments.get(p).cloned().unwrap_or_default();
                    let moving_to = self
                        .meta
                        .moving
                        .get(&(p as u32))
                        .cloned()
                        .unwrap_or_default();
                    (p, local, replicas, moving_to)
                })
                .map(|(p, local, replicas, moving_to)| match local {
                    Some(part) => part.info(replicas, moving_to),
                    None => PartitionInfo {
                        partition: p as u32,
                        leader: 0,
                        replicas,
                        moving_to,
                        in_sync: Vec::new(),
                        earliest_offset: 0,
                        latest_offset: 0,
                        bytes: 0,
                        batches: 0,
                    },
                })
                .collect(),
        }
    }
}

pub struct NewTopic {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u16,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub schema_ipc: Option<Vec<u8>>,
}

/// All topics, and the groups this node runs.
pub struct Topics {
    node_id: NodeId,
    dir: PathBuf,
    log_cfg: LogConfig,
    env: GroupEnv,
    controller: Group<ControllerApplier>,
    map: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Local partition replicas by group id (kept across metadata changes
    /// such as a schema being set).
    groups: Mutex<HashMap<u64, Arc<Partition>>>,
    /// Serializes reconciliation runs.
    reconcile_lock: tokio::sync::Mutex<()>,
    /// Partition moves this node drives as their leader (see [`moves`]).
    moves: moves::Running,
    /// The last reconcile acted on the newest controller state: false while
    /// this node catches up (see [`Topics::controller_caught_up`]). A topic
    /// unknown here then may just not have reached this node yet.
    caught_up: std::sync::atomic::AtomicBool,
    /// Set by [`Topics::close_all`]: nothing opens a group after it.
    closed: std::sync::atomic::AtomicBool,
}

impl Topics {
    /// Start the controller group (initializing it on first boot, from the
    /// lowest-id initial peer; a node that joins an existing cluster has no
    /// initial peers and waits to be added) and the partitions this node
    /// hosts.
    pub async fn open(
        data_dir: &Path,
        env: GroupEnv,
        log_cfg: LogConfig,
        initial_peers: Option<&BTreeMap<NodeId, String>>,
    ) -> Result<Arc<Self>, BrokerError> {
        let node_id = env.node_id;
        let dir = data_dir.join("topics");
        std::fs::create_dir_all(&dir).map_err(|e| BrokerError::io("creating", &dir, e))?;
        let cdir = data_dir.join("controller");
        std::fs::create_dir_all(&cdir).map_err(|e| BrokerError::io("creating", &cdir, e))?;
        let applier_dir = cdir.clone();
        let controller = env
            .open(CONTROLLER_GROUP, &cdir, log_cfg.clone(), move |_| {
                ControllerApplier::open(&applier_dir)
            })
            .await
            .map_err(storage_err)?;
        let pristine = controller.store.vote().is_none()
            && controller.store.log().last_enqueued().last_index == 0;
        let Some(initial_peers) = initial_peers else {
            if pristine {
                tracing::info!(node_id, "joining a cluster: waiting for `busctl cluster add-node {node_id} <this node's address>`");
            }
            return Self::finish_open(node_id, dir, log_cfg, env, controller).await;
        };
        if pristine && initial_peers.keys().next() == Some(&node_id) {
            let members: BTreeMap<NodeId, BasicNode> = initial_peers
                .iter()
                .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                .collect();
            tracing::info!(?members, "initializing the controller group");
            controller
                .raft
                .initialize(members)
                .await
                .map_err(|e| BrokerError::internal(format!("initialize controller: {e}")))?;
        }
        Self::finish_open(node_id, dir, log_cfg, env, controller).await
    }

    async fn finish_open(
        node_id: NodeId,
        dir: PathBuf,
        log_cfg: LogConfig,
        env: GroupEnv,
        controller: Group<ControllerApplier>,
    ) -> Result<Arc<Self>, BrokerError> {
        let topics = Arc::new(Self {
            node_id,
            dir,
            log_cfg,
            env,
            controller,
            map: RwLock::new(BTreeMap::new()),
            groups: Mutex::new(HashMap::new()),
            reconcile_lock: tokio::sync::Mutex::new(()),
            moves: moves::Running::default(),
            caught_up: std::sync::atomic::AtomicBool::new(false),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        // Serve clients only with the partitions of a current state: a
        // restarted node replays its controller log first. One that cannot
        // catch up in time (no controller quorum) starts anyway and
        // answers for unknown topics with a retriable NotLeader; the loop
        // reconciles once it has caught up.
        if let Err(e) = topics.reconcile_caught_up(STARTUP_CATCH_UP_WAIT).await {
            tracing::warn!(error = %e, "starting before catching up with the controller");
        }
        let t = topics.clone();
        tokio::spawn(async move { t.reconcile_loop().await });
        let t = topics.clone();
        tokio::spawn(async move { t.move_loop().await });
        let t = topics.clone();
        tokio::spawn(async move { t.revive_loop().await });
        Ok(topics)
    }

    async fn reconcile_loop(self: Arc<Self>) {
        let mut pos = self.controller.sm.position();
        let mut metrics = self.controller.raft.metrics();
        // A controller change not reconciled yet: this node was still
        // catching up when it was applied (see `Topics::reconcile`), and
        // the next metrics change may tell it that it has caught up.
        // At start too: the first reconcile (in `finish_open`) may have
        // found this node catching up.
        let mut pending = true;
        loop {
            if pending {
                match self.reconcile().await {
                    Ok(done) => pending = !done,
                    Err(e) => {
                        tracing::error!(error = %e, "reconciling partitions with the controller failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            tokio::select! {
                changed = pos.changed() => {
                    if changed.is_err() { return }
                    pending = true;
                }
                changed = metrics.changed(), if pending => {
                    if changed.is_err() { return }
                }
            }
        }
    }

    /// [`Topics::reconcile`], waiting (up to `wait`) until this node has
    /// caught up with the controller so that it can.
    async fn reconcile_caught_up(&self, wait: Duration) -> Result<(), BrokerError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut pos = self.controller.sm.position();
        let mut metrics = self.controller.raft.metrics();
        while !self.reconcile().await? {
            let woke = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    r = pos.changed() => r.is_ok(),
                    r = metrics.changed() => r.is_ok(),
                }
            })
            .await;
            if !matches!(woke, Ok(true)) {
                return Err(BrokerError::new(
                    ErrorCode::Timeout,
                    "this node has not caught up with the cluster metadata (controller) in time",
                ));
            }
        }
        Ok(())
    }

    /// Whether the controller state at partition-log index `applied` (the
    /// state machine's, read together with that state) holds everything the
    /// controller leader has told this node is committed.
    ///
    /// A node catching up (restarted after missing changes, or joining and
    /// receiving the whole history) applies the controller's log entry by
    /// entry, and the states in between are history: a partition that moved
    /// away from this node and back is, in real time, a group that counts
    /// this node as a voter again. Acting on the "moved away" state in
    /// between would delete a replica Raft counts on (its acknowledged
    /// entries with it), and a "first replica set" state from long ago would
    /// initialize a second, different group. So partitions follow only a
    /// state that was the newest committed one when this node held it.
    ///
    /// The metrics must also be at least as new as that state: the state
    /// machine may apply entries before the core publishes the leader's
    /// commit index that came with them.
    fn controller_caught_up(&self, applied: u64) -> bool {
        let m = self.controller.raft.metrics().borrow_watched().clone();
        let metrics_applied = m
            .last_applied
            .map_or(0, |l| arrowbus_raft::types::to_log_index(l.index));
        let leader_committed = m
            .cluster_committed
            .map_or(0, |l| arrowbus_raft::types::to_log_index(l.index));
        metrics_applied >= applied && leader_committed <= applied
    }

    /// Make the local groups match the controller's metadata; `false` (and
    /// nothing done) while this node is still catching up with the
    /// controller (see [`Topics::controller_caught_up`]).
    async fn reconcile(&self) -> Result<bool, BrokerError> {
        let _guard = self.reconcile_lock.lock().await;
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(true); // shutting down: nothing is opened any more
        }
        let pos = self.controller.sm.position();
        // Under the state machine's lock: the records and their index agree.
        let (records, applied) = self
            .controller
            .sm
            .with_applier(|a| (a.topics(), pos.borrow().index));
        if !self.controller_caught_up(applied) {
            self.caught_up
                .store(false, std::sync::atomic::Ordering::Release);
            return Ok(false);
        }
        let mut wanted = HashMap::new();
        let mut new_map = BTreeMap::new();
        for rec in records {
            let schema = if rec.schema_ipc.is_empty() {
                None
            } else {
                Some(Arc::new(
                    ipc::canonical_schema(SCHEMA_ID, &rec.schema_ipc).map_err(|e| {
                        BrokerError::internal(format!(
                            "controller holds a bad schema for '{}': {e}",
                            rec.name
                        ))
                    })?,
                ))
            };
            let mut local = Vec::with_capacity(rec.assignments.len());
            for (p, replicas) in rec.assignments.iter().enumerate() {
                let p = p as u32;
                // A replica, or the target of a move: a node keeps hosting a
                // partition moving away from it until the move is complete.
                if !rec.hosts(p).any(|n| n == self.node_id) {
                    local.push(None);
                    continue;
                }
                let gid = partition_group(rec.id, p);
                wanted.insert(gid, ());
                let existing = self.lock_groups().get(&gid).cloned();
                let part = match existing {
                    Some(part) => part,
                    None => {
                        // Only a partition's first replica set is created
                        // here; nodes a move adds are made members by the
                        // partition's leader, before and after the move
                        // completes.
                        let create = (!rec.moving.contains_key(&p) && !rec.moved.contains(&p))
                            .then_some(replicas.as_slice());
                        let part = Arc::new(self.open_partition(&rec, p, create).await?);
                        self.lock_groups().insert(gid, part.clone());
                        part
                    }
                };
                local.push(Some(part));
            }
            new_map.insert(
                rec.name.clone(),
                Arc::new(Topic {
                    meta: rec,
                    schema,
                    local,
                }),
            );
        }
        let removed: Vec<(u64, Arc<Partition>)> = {
            let mut groups = self.lock_groups();
            let gone: Vec<u64> = groups
                .keys()
                .filter(|g| !wanted.contains_key(g))
                .copied()
                .collect();
            gone.into_iter()
                .filter_map(|g| groups.remove(&g).map(|p| (g, p)))
                .collect()
        };
        let old_dirs: Vec<PathBuf> = {
            let map = self.map.read().unwrap_or_else(|p| p.into_inner());
            map.values()
                .filter(|t| !new_map.contains_key(&t.meta.name))
                .map(|t| self.topic_dir(&t.meta))
                .collect()
        };
        let moved_away: Vec<bool> = removed
            .iter()
            .map(|(_, p)| new_map.contains_key(&p.topic))
            .collect();
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = new_map;
        for ((_, p), moved_away) in removed.into_iter().zip(moved_away) {
            p.group.shutdown(&self.env.registry).await;
            // The partition moved to other nodes (its Raft group no longer
            // counts this one): its files here are dead weight, and a later
            // move back must start from an empty replica.
            if moved_away {
                let dir = p.log().dir().to_owned();
                tracing::info!(topic = %p.topic, partition = p.id, path = %dir.display(),
                    "partition moved away; removing its replica");
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(path = %dir.display(), error = %e, "could not remove a moved partition's files");
                }
            }
        }
        for d in old_dirs {
            if let Err(e) = std::fs::remove_dir_all(&d) {
                tracing::warn!(path = %d.display(), error = %e, "could not remove a deleted topic's files");
            }
        }
        self.caught_up
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(true)
    }

    fn lock_groups(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Partition>>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn topic_dir(&self, t: &TopicRecord) -> PathBuf {
        self.dir.join(format!("{}-{}", t.name, t.id))
    }

    /// Open (or create) the local replica of partition `p`. `create`: the
    /// partition's initial replicas, if this node may create its group.
    async fn open_partition(
        &self,
        t: &TopicRecord,
        p: u32,
        create: Option<&[NodeId]>,
    ) -> Result<Partition, BrokerError> {
        let gid = partition_group(t.id, p);
        let pdir = self.topic_dir(t).join(format!("p-{p}"));
        std::fs::create_dir_all(&pdir).map_err(|e| BrokerError::io("creating", &pdir, e))?;
        let adir = pdir.clone();
        let group = self
            .env
            .open(gid, &pdir, self.log_cfg.clone(), move |log| {
                Ok(PartitionApplier::new(log, &adir))
            })
            .await
            .map_err(storage_err)?;
        // From here on the group runs and answers RPCs: a failure must stop
        // it again, or the next reconcile would open a second instance on
        // the same files beside it.
        match self.start_partition(&group, t, p, create).await {
            Ok(last_ts) => {
                tracing::info!(topic = %t.name, partition = p, replicas = ?t.assignments.get(p as usize),
                    moving_to = ?t.moving.get(&p), "partition replica started");
                Ok(Partition {
                    topic: t.name.clone(),
                    id: p,
                    group,
                    node_id: self.node_id,
                    last_ts: Mutex::new((last_ts, 0)),
                })
            }
            Err(e) => {
                group.shutdown(&self.env.registry).await;
                Err(e)
            }
        }
    }

    /// The steps of [`Topics::open_partition`] after its group is open:
    /// the newest batch's timestamp, and the group's creation if this node
    /// is the one to create it.
    async fn start_partition(
        &self,
        group: &Group<PartitionApplier>,
        t: &TopicRecord,
        p: u32,
        create: Option<&[NodeId]>,
    ) -> Result<i64, BrokerError> {
        let last = group.store.log().last_enqueued();
        let last_ts = match last.last_log_id {
            Some(id) => group
                .store
                .log()
                .entry(id.index)?
                .map_or(0, |b| b.header.timestamp_ms),
            None => 0,
        };
        let pristine = group.store.vote().is_none() && last.last_index == 0;
        // The preferred leader (first replica) creates the group; the others
        // join when its first messages arrive.
        if let Some(replicas) = create.filter(|r| pristine && r.first() == Some(&self.node_id)) {
            let nodes = self.node_addrs();
            let members: BTreeMap<NodeId, BasicNode> = replicas
                .iter()
                .map(|id| {
                    (
                        *id,
                        BasicNode {
                            addr: nodes.get(id).cloned().unwrap_or_default(),
                        },
                    )
                })
                .collect();
            group.raft.initialize(members).await.map_err(|e| {
                BrokerError::internal(format!("initialize partition {}/{p}: {e}", t.name))
            })?;
            // Campaign now instead of after an election timeout: the topic
            // is usable as soon as its creation returns.
            let _ = group.raft.trigger().elect(false).await;
        }
        Ok(last_ts)
    }

    /// The controller group's membership: the node registry.
    fn controller_membership(&self) -> Arc<arrowbus_raft::types::StoredMembership> {
        self.controller
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone()
    }

    /// The controller's voters (every node of the cluster).
    fn controller_voters(&self) -> Vec<NodeId> {
        self.controller_membership().voter_ids().collect()
    }

    /// Node ids and addresses, from the controller's membership.
    pub fn node_addrs(&self) -> BTreeMap<NodeId, String> {
        let m = self.controller_membership();
        m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect()
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.node_addrs()
            .into_iter()
            .map(|(id, addr)| NodeInfo { id, addr })
            .collect()
    }

    pub fn registry(&self) -> Arc<arrowbus_raft::network::GroupRegistry> {
        self.env.registry.clone()
    }

    /// This node's view of its groups, for `busctl cluster`.
    pub fn status(&self, addr: String) -> arrowbus_wire::NodeStatus {
        fn group_status<A: arrowbus_raft::sm::Applier>(
            g: &Group<A>,
            topic: &str,
            partition: u32,
        ) -> arrowbus_wire::GroupStatus {
            let m = g.raft.metrics().borrow_watched().clone();
            let role = match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            };
            arrowbus_wire::GroupStatus {
                group: g.id,
                topic: topic.to_owned(),
                partition,
                role: role.to_owned(),
                leader: m.current_leader.unwrap_or(0),
                term: m.current_term,
                last_log_index: m.last_log_index.unwrap_or(0),
                committed: m.cluster_committed.map_or(0, |c| c.index),
                applied: m.last_applied.map_or(0, |c| c.index),
                followers: m
                    .replication
                    .as_ref()
                    .map(|r| {
                        r.iter()
                            .filter(|(id, _)| **id != m.id)
                            .map(|(id, l)| (*id, l.map_or(0, |l| l.index)))
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        }
        let mut partitions: Vec<arrowbus_wire::GroupStatus> = self
            .local_partitions()
            .iter()
            .map(|p| group_status(&p.group, &p.topic, p.id))
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        arrowbus_wire::NodeStatus {
            id: self.node_id,
            addr,
            nodes: self.nodes(),
            controller: group_status(&self.controller, "", 0),
            partitions,
        }
    }

    pub fn controller(&self) -> &Group<ControllerApplier> {
        &self.controller
    }

    pub fn get(&self, name: &str) -> Result<Arc<Topic>, BrokerError> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| {
                if !self.caught_up.load(std::sync::atomic::Ordering::Acquire) {
                    // Retriable: clients try again (or another node).
                    return BrokerError::new(
                        ErrorCode::NotLeader,
                        format!("this node is still catching up with the cluster metadata and does not know topic '{name}' yet; retry shortly or ask another node"),
                    );
                }
                BrokerError::new(
                    ErrorCode::TopicNotFound,
                    format!("topic '{name}' does not exist; create it with `busctl topics create {name}`"),
                )
            })
    }

    /// [`Topics::get`], waiting (up to `wait`) while the topic has no
    /// schema here: a client sets the schema at the controller leader and
    /// then publishes to a partition leader, which may apply that change a
    /// moment later.
    pub async fn get_with_schema(
        &self,
        name: &str,
        wait: Duration,
    ) -> Result<Arc<Topic>, BrokerError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let t = self.get(name)?;
            if t.schema().is_some() || tokio::time::Instant::now() >= deadline {
                return Ok(t);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn list(&self) -> Vec<Arc<Topic>> {
        self.map
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every local partition replica.
    pub fn local_partitions(&self) -> Vec<Arc<Partition>> {
        self.lock_groups().values().cloned().collect()
    }

    /// Propose a controller command at the controller leader and wait until
    /// this node has applied it.
    async fn propose(&self, cmd: ControllerCommand) -> Result<ControllerReply, BrokerError> {
        let m = self.controller.raft.metrics().borrow_watched().clone();
        if m.state != ServerState::Leader {
            return Err(not_leader(
                m.current_leader.filter(|l| *l != self.node_id),
                "the cluster metadata (controller)".into(),
            ));
        }
        let command = cmd
            .encode()
            .map_err(|e| BrokerError::internal(e.to_string()))?;
        let resp = tokio::time::timeout(ADMIN_APPLY_TIMEOUT, self.controller.raft.client_write(command))
            .await
            .map_err(|_| BrokerError::new(ErrorCode::Timeout, "the controller did not commit the change in time (is a majority of controller nodes up?)"))?
            .map_err(|e| match e {
                openraft::errors::RaftError::APIError(e) => write_error(e, "the cluster metadata (controller)"),
                other => BrokerError::internal(other.to_string()),
            })?;
        let applied: &Applied = &resp.data;
        let reply = decode_reply(applied).map_err(|e| BrokerError::internal(e.to_string()))?;
        // Our own groups follow the change before we answer.
        self.reconcile_caught_up(ADMIN_APPLY_TIMEOUT).await?;
        Ok(reply)
    }

    pub async fn create(
        &self,
        req: NewTopic,
        default_retention: (Option<u64>, Option<u64>),
    ) -> Result<Arc<Topic>, BrokerError> {
        validate_topic_name(&req.name)?;
        let schema_ipc = match &req.schema_ipc {
            Some(bytes) => ipc::canonical_schema(SCHEMA_ID, bytes)?.ipc.to_vec(),
            None => Vec::new(),
        };
        let nodes = self.controller_voters();
        let cmd = ControllerCommand::CreateTopic {
            name: req.name.clone(),
            partitions: req.partitions,
            replication_factor: req.replication_factor,
            retention_ms: req.retention_ms.or(default_retention.0),
            retention_bytes: req.retention_bytes.or(default_retention.1),
            created_ms: now_ms(),
            schema_ipc,
            nodes,
        };
        match self.propose(cmd).await? {
            ControllerReply::Topic(_) => {}
            ControllerReply::Refused { code, message } => return Err(refused(code, message)),
            other => {
                return Err(BrokerError::internal(format!(
                    "controller answered create with {other:?}"
                )))
            }
        }
        let topic = self.get(&req.name)?;
        // Wait (bounded) for local partitions to elect, so that a publish
        // right after creation finds a leader.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for (p, replicas) in topic.local.iter().zip(&topic.meta.assignments) {
            let Some(p) = p else { continue };
            if replicas.first() != Some(&self.node_id) {
                continue;
            }
            let _ = tokio::time::timeout_at(
                deadline,
                wait_metrics(&p.group.raft, |m| {
                    // Ready: a leader that has applied its own term's first
                    // (blank) entry, so the log holds no pending bookkeeping.
                    m.current_leader.is_some()
                        && m.last_applied
                            .is_some_and(|a| a.leader_id.term == m.current_term)
                }),
            )
            .await;
        }
        Ok(topic)
    }

    pub async fn delete(&self, name: &str) -> Result<(), BrokerError> {
        match self
            .propose(ControllerCommand::DeleteTopic {
                name: name.to_owned(),
            })
            .await?
        {
            ControllerReply::Refused { code, message } => Err(refused(code, message)),
            _ => Ok(()),
        }
    }

    /// Fix the schema of a topic that has none; return the topic's schema.
    pub async fn set_schema_if_absent(
        &self,
        name: &str,
        schema_ipc: &[u8],
    ) -> Result<Arc<TopicSchema>, BrokerError> {
        let topic = self.get(name)?;
        if let Some(s) = topic.schema() {
            return Ok(s);
        }
        let canonical = ipc::canonical_schema(SCHEMA_ID, schema_ipc)?;
        let cmd = ControllerCommand::SetSchemaIfAbsent {
            name: name.to_owned(),
            schema_ipc: canonical.ipc.to_vec(),
        };
        match self.propose(cmd).await? {
            ControllerReply::Refused { code, message } => Err(refused(code, message)),
            _ => self
                .get(name)?
                .schema()
                .ok_or_else(|| BrokerError::internal("schema was not applied")),
        }
    }

    /// Hand leadership of every group this node leads to another replica
    /// (graceful shutdown), waiting a bounded time for it to move.
    pub async fn transfer_leadership(&self) {
        let mut moves: Vec<futures::future::BoxFuture<'static, ()>> = Vec::new();
        for p in self.local_partitions() {
            let m = p.group.raft.metrics().borrow_watched().clone();
            if m.state != ServerState::Leader {
                continue;
            }
            // The group's own voters: during a move they differ from the
            // controller's replica list.
            let to = m.membership_config.voter_ids().find(|r| *r != self.node_id);
            if let Some(to) = to {
                let raft = p.group.raft.clone();
                let registry = self.env.registry.clone();
                let group = p.group.id;
                moves.push(Box::pin(async move {
                    // A quiet leader runs its timers again first, so the
                    // group is awake when leadership moves.
                    registry.ready_to_write(group).await;
                    let _ = raft.trigger().transfer_leader(to).await;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        wait_metrics(&raft, |m| m.state != ServerState::Leader),
                    )
                    .await;
                }));
            }
        }
        let cm = self.controller.raft.metrics().borrow_watched().clone();
        if cm.state == ServerState::Leader {
            if let Some(to) = cm
                .membership_config
                .voter_ids()
                .find(|v| *v != self.node_id)
            {
                let raft = self.controller.raft.clone();
                moves.push(Box::pin(async move {
                    let _ = raft.trigger().transfer_leader(to).await;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        wait_metrics(&raft, |m| m.state != ServerState::Leader),
                    )
                    .await;
                }));
            }
        }
        futures::future::join_all(moves).await;
    }

    /// Stop every group and close every log.
    pub async fn close_all(&self) {
        {
            let _guard = self.reconcile_lock.lock().await;
            self.closed
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let parts: Vec<Arc<Partition>> = self.lock_groups().drain().map(|(_, p)| p).collect();
        for p in parts {
            p.group.shutdown(&self.env.registry).await;
        }
        self.controller.shutdown(&self.env.registry).await;
    }
}

/// Wait until a group's metrics satisfy `pred` (callers bound the wait).
async fn wait_metrics<SM: openraft::storage::RaftStateMachine<TypeConfig>>(
    raft: &openraft::Raft<TypeConfig, SM>,
    pred: impl Fn(&openraft::RaftMetrics<TypeConfig>) -> bool,
) {
    let mut rx = raft.metrics();
    loop {
        if pred(&rx.borrow_watched()) {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn refused(code: u16, message: String) -> BrokerError {
    BrokerError::new(
        ErrorCode::from_u16(code).unwrap_or(ErrorCode::Internal),
        message,
    )
}

fn storage_err(e: std::io::Error) -> BrokerError {
    BrokerError::new(ErrorCode::StorageError, e.to_string())
}

/// Topic names become directory names: keep them to a safe alphabet.
pub fn validate_topic_name(name: &str) -> Result<(), BrokerError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME_BYTES
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(BrokerError::new(
            ErrorCode::InvalidTopicName,
            format!(
                "invalid topic name {name:?}: use 1 to {MAX_TOPIC_NAME_BYTES} characters of A-Z a-z 0-9 . _ -, not starting with '.'"
            ),
        ))
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl From<LogError> for BrokerError {
    fn from(e: LogError) -> Self {
        let code = match &e {
            LogError::DiskFull { .. } => ErrorCode::StorageFull,
            LogError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            LogError::Closed => ErrorCode::TopicNotFound,
            LogError::Busy { .. } => ErrorCode::Busy,
            // The broker built an entry the log refuses: our bug, not the client's.
            LogError::InvalidEntry { .. } | LogError::NonContiguous { .. } => ErrorCode::Internal,
            _ => ErrorCode::StorageError,
        };
        let msg = match &e {
            LogError::DiskFull { path } => format!(
                "the broker's disk is full ({}); nothing was stored. Free space and retry",
                path.display()
            ),
            LogError::Closed => {
                "the partition was closed (topic deleted or broker shutting down)".to_owned()
            }
            other => other.to_string(),
        };
        BrokerError::new(code, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_are_checked() {
        for good in ["ticks", "a", "trades.v2", "x_y-z", &"a".repeat(249)] {
            validate_topic_name(good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "ünï",
            &"a".repeat(250),
        ] {
            let e = validate_topic_name(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidTopicName, "{bad:?}");
        }
    }
}
