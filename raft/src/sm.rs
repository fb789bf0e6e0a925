//! The state machine side of a Raft group. openraft drives [`StateMachine`];
//! what applying means is the group's [`Applier`]: a partition's applier only
//! moves its visible position (the data already sits in the log), the
//! controller's writes metadata into sled.
//!
//! Restart: openraft re-applies committed entries after the state machine's
//! `applied_state`. The applier says how far its own durable state goes; the
//! membership applied so far is kept in a small fsynced file of the group.
//!
//! Snapshots: the current one lives in the group's snapshot file
//! ([`crate::snapshot`]), written durably before openraft learns of it, so
//! `get_current_snapshot` survives a restart. A snapshot is built at the
//! point a caller asked for ([`StateMachine::request_snapshot_at`], a
//! retention cut) when the applier can describe its state there, otherwise
//! at the applied point. Installing one writes the file first, then lets
//! the applier finish its durable work (a partition resets its log); a crash
//! in between is finished at restart, when openraft installs the snapshot
//! from the file again.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::EntryPayload;
use rkyv::rancor;
use tokio::sync::watch;

use crate::lock;
use crate::snapshot;
use crate::store::write_atomic;
use crate::types::{
    self, wire_log_id, Applied, Command, LogId, Snapshot, SnapshotMeta, StoredMembership,
    TypeConfig,
};
use arrowbus_wire::peer::{WireLogId, WireMembership};

const MEMBERSHIP_FILE: &str = "membership";

/// Where a group's applied state stands: subscribers read up to `index`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppliedPosition {
    /// Partition-log index of the last applied entry (0: nothing), the
    /// bound readers pass to [`crate::log::PartitionLog::read`].
    pub index: u64,
    /// The offset after the last applied batch.
    pub next_offset: u64,
}

/// What a group does with committed commands.
pub trait Applier: Send + Sync + 'static {
    /// Apply one committed command. `cmd.header` carries its stored log id
    /// and base offset. Must be deterministic: every replica applies the
    /// same commands in the same order.
    fn apply(&mut self, log_id: &LogId, cmd: &Command) -> io::Result<Applied>;

    /// A blank or membership entry was applied (it takes no offsets).
    fn apply_raft_entry(&mut self, _log_id: &LogId) -> io::Result<()> {
        Ok(())
    }

    /// How far this applier's own state reaches after a restart (`None`:
    /// nothing applied; openraft re-applies from the start of the log).
    fn recovered_applied(&mut self) -> io::Result<Option<LogId>>;

    /// The offset after the last applied batch (the high watermark).
    fn next_offset(&self) -> u64;

    /// The applier's whole state, for a snapshot.
    fn snapshot(&self) -> io::Result<Vec<u8>>;

    /// The applier's state as of partition-log index `log_index` (at or
    /// below the applied index): that entry's log id and the encoded state,
    /// for a snapshot at a retention cut. `None`: this applier can only
    /// describe its current state (the snapshot is then taken there).
    fn snapshot_at(&self, _log_index: u64) -> io::Result<Option<(LogId, Vec<u8>)>> {
        Ok(None)
    }

    /// Replace the state with a snapshot's (the snapshot ends at `last`).
    /// In-memory state changes before it returns; durable work that must be
    /// finished before the snapshot counts as installed (a partition's log
    /// reset) is returned as a future, which the state machine awaits.
    fn restore(&mut self, last: Option<&LogId>, data: &[u8]) -> io::Result<Option<RestoreDone>>;
}

/// Durable work a [`Applier::restore`] started.
pub type RestoreDone = Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'static>>;

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct MembershipRecord {
    log_id: Option<WireLogId>,
    membership: WireMembership,
}

struct SmInner<A> {
    applier: A,
    applied: Option<LogId>,
    membership: StoredMembership,
    /// The current snapshot, as in the snapshot file.
    snapshot: Option<(SnapshotMeta, Bytes)>,
    /// Partition-log index the next snapshot build should describe.
    snapshot_target: Option<u64>,
}

/// openraft's state machine for one group. Clones share state.
pub struct StateMachine<A: Applier> {
    inner: Arc<Mutex<SmInner<A>>>,
    dir: PathBuf,
    position: watch::Sender<AppliedPosition>,
    /// Serializes snapshot builds (openraft runs them in their own task)
    /// with installs, so the file and `snapshot` only ever move forward.
    snapshot_io: Arc<tokio::sync::Mutex<()>>,
}

impl<A: Applier> Clone for StateMachine<A> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            dir: self.dir.clone(),
            position: self.position.clone(),
            snapshot_io: self.snapshot_io.clone(),
        }
    }
}

impl<A: Applier> StateMachine<A> {
    pub fn new(mut applier: A, dir: &Path) -> io::Result<Self> {
        let membership = read_membership(&dir.join(MEMBERSHIP_FILE))?;
        let applied = applier.recovered_applied()?;
        // A recorded membership newer than the recovered applied point is
        // re-applied from the log; an older one is exactly the state at it.
        let membership = match (membership.log_id(), applied) {
            (Some(m), Some(a)) if m.index > a.index => StoredMembership::default(),
            (Some(_), None) => StoredMembership::default(),
            _ => membership,
        };
        let applied = if membership.log_id().is_none() && applied.is_some() {
            // Without the membership of the applied prefix, re-apply it all.
            None
        } else {
            applied
        };
        let pos = AppliedPosition {
            index: applied.map_or(0, |a| types::to_log_index(a.index)),
            next_offset: applier.next_offset(),
        };
        // openraft installs it at start when it is ahead of `applied`.
        let snapshot = snapshot::read_file(dir)?;
        Ok(Self {
            inner: Arc::new(Mutex::new(SmInner {
                applier,
                applied,
                membership,
                snapshot,
                snapshot_target: None,
            })),
            dir: dir.to_owned(),
            position: watch::channel(pos).0,
            snapshot_io: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Ask that the next snapshot build describe the state as of
    /// partition-log index `log_index` (see [`Applier::snapshot_at`]).
    pub fn request_snapshot_at(&self, log_index: u64) {
        lock(&self.inner).snapshot_target = Some(log_index);
    }

    /// The current snapshot's last log id.
    pub fn snapshot_last(&self) -> Option<LogId> {
        lock(&self.inner)
            .snapshot
            .as_ref()
            .and_then(|(m, _)| m.last_log_id)
    }

    /// Persist `meta`/`data` as the current snapshot unless a newer one is
    /// already current. Callers hold `snapshot_io`.
    async fn save_snapshot(&self, meta: &SnapshotMeta, data: &Bytes) -> io::Result<()> {
        let current = lock(&self.inner)
            .snapshot
            .as_ref()
            .map(|(m, _)| m.last_log_id);
        if current.is_some_and(|c| c >= meta.last_log_id) {
            return Ok(());
        }
        let (dir, m, d) = (self.dir.clone(), meta.clone(), data.clone());
        tokio::task::spawn_blocking(move || snapshot::write_file(&dir, &m, &d))
            .await
            .map_err(io::Error::other)??;
        lock(&self.inner).snapshot = Some((meta.clone(), data.clone()));
        Ok(())
    }

    /// Watch the applied position (readers' visibility bound).
    pub fn position(&self) -> watch::Receiver<AppliedPosition> {
        self.position.subscribe()
    }

    /// Run `f` on the applier (e.g. to read controller state).
    pub fn with_applier<R>(&self, f: impl FnOnce(&A) -> R) -> R {
        f(&lock(&self.inner).applier)
    }

    fn save_membership(&self, m: &StoredMembership) -> io::Result<()> {
        let rec = MembershipRecord {
            log_id: m.log_id().as_ref().map(wire_log_id),
            membership: types::wire_membership(m.membership()),
        };
        let bytes = rkyv::to_bytes::<rancor::Error>(&rec)
            .map_err(|e| types::invalid(format!("encode membership: {e}")))?;
        write_atomic(&self.dir, &self.dir.join(MEMBERSHIP_FILE), &bytes)
    }
}

#[cfg(test)]
impl<A: Applier> StateMachine<A> {
    /// Apply commands the way `apply` does, without openraft's stream.
    pub(crate) fn apply_for_test(
        &self,
        membership: StoredMembership,
        cmds: &[(LogId, Command)],
    ) -> io::Result<()> {
        let mut s = lock(&self.inner);
        s.membership = membership;
        for (id, cmd) in cmds {
            s.applier.apply(id, cmd)?;
            s.applied = Some(*id);
        }
        Ok(())
    }
}

fn read_membership(path: &Path) -> io::Result<StoredMembership> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(StoredMembership::default()),
        Err(e) => return Err(e),
    };
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(&bytes);
    match rkyv::from_bytes::<MembershipRecord, rancor::Error>(&aligned) {
        Ok(rec) => Ok(StoredMembership::new(
            rec.log_id.as_ref().map(types::from_wire_log_id),
            types::from_wire_membership(&rec.membership)?,
        )),
        // Written atomically, so damage means the file was tampered with or
        // the disk lies; the log still has every membership entry: re-apply.
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "membership record unreadable; re-applying the log");
            Ok(StoredMembership::default())
        }
    }
}

impl<A: Applier> RaftStateMachine<TypeConfig> for StateMachine<A> {
    type SnapshotData = Bytes;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let s = lock(&self.inner);
        Ok((s.applied, s.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id();
            let reply = {
                let mut s = lock(&self.inner);
                let reply = match &entry.payload {
                    EntryPayload::Normal(cmd) => s.applier.apply(&log_id, cmd)?,
                    EntryPayload::Blank => {
                        s.applier.apply_raft_entry(&log_id)?;
                        Applied::default()
                    }
                    EntryPayload::Membership(m) => {
                        s.applier.apply_raft_entry(&log_id)?;
                        let stored = StoredMembership::new(Some(log_id), m.clone());
                        self.save_membership(&stored)?;
                        s.membership = stored;
                        Applied::default()
                    }
                };
                s.applied = Some(log_id);
                let pos = AppliedPosition {
                    index: types::to_log_index(log_id.index),
                    next_offset: s.applier.next_offset(),
                };
                self.position.send_replace(pos);
                reply
            };
            if let Some(r) = responder {
                r.send(reply);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        data: Bytes,
    ) -> Result<(), io::Error> {
        let _io = self.snapshot_io.clone().lock_owned().await;
        // Decoding (in restore) comes first: a snapshot that does not decode
        // must not become the durable current snapshot.
        let done = lock(&self.inner)
            .applier
            .restore(meta.last_log_id.as_ref(), &data)?;
        // Durable before the applier's own work: a crash after this point
        // restarts with this snapshot, and openraft installs it again.
        self.save_snapshot(meta, &data).await?;
        if let Some(done) = done {
            done.await?;
        }
        self.save_membership(&meta.last_membership)?;
        let mut s = lock(&self.inner);
        s.applied = meta.last_log_id;
        s.membership = meta.last_membership.clone();
        let pos = AppliedPosition {
            index: meta.last_log_id.map_or(0, |l| types::to_log_index(l.index)),
            next_offset: s.applier.next_offset(),
        };
        self.position.send_replace(pos);
        tracing::info!(dir = %self.dir.display(), last = ?meta.last_log_id, next_offset = pos.next_offset, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let s = lock(&self.inner);
        Ok(s.snapshot.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: data.clone(),
        }))
    }
}

impl<A: Applier> RaftSnapshotBuilder<TypeConfig> for StateMachine<A> {
    type SnapshotData = Bytes;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let _io = self.snapshot_io.clone().lock_owned().await;
        let (meta, data) = {
            let mut s = lock(&self.inner);
            let target = s.snapshot_target.take();
            let at = match target {
                Some(t) => state_at(&s, t)?,
                None => None,
            };
            let (last, data) = match at {
                Some((last, data)) => (Some(last), data),
                // The applied point is always describable: its membership
                // is the applied one by definition.
                None => (s.applied, s.applier.snapshot()?),
            };
            let meta = SnapshotMeta {
                last_log_id: last,
                last_membership: s.membership.clone(),
            };
            (meta, Bytes::from(data))
        };
        // An older build than the current snapshot (e.g. one installed from
        // the leader meanwhile) is returned but not kept; openraft ignores it.
        self.save_snapshot(&meta, &data).await?;
        tracing::info!(dir = %self.dir.display(), last = ?meta.last_log_id, "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}

/// The applier's state at partition-log index `target`, when a snapshot can
/// be taken there: not beyond the applied point, and not before the applied
/// membership (its predecessor is not kept, so the membership as of an
/// earlier point is unknown here).
fn state_at<A: Applier>(s: &SmInner<A>, target: u64) -> io::Result<Option<(LogId, Vec<u8>)>> {
    let applied = s.applied.map_or(0, |a| types::to_log_index(a.index));
    let membership = s
        .membership
        .log_id()
        .map_or(0, |m| types::to_log_index(m.index));
    if target == 0 || target > applied || target < membership {
        tracing::debug!(
            target,
            applied,
            membership,
            "snapshot target not describable; snapshotting the applied point"
        );
        return Ok(None);
    }
    s.applier.snapshot_at(target)
}
