//! The state machine side of a Raft group. openraft drives [`StateMachine`];
//! what applying means is the group's [`Applier`]: a partition's applier only
//! moves its visible position (the data already sits in the log), the
//! controller's writes metadata into sled.
//!
//! Restart: openraft re-applies committed entries after the state machine's
//! `applied_state`. The applier says how far its own durable state goes; the
//! membership applied so far is kept in a small fsynced file of the group.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::EntryPayload;
use rkyv::rancor;
use tokio::sync::watch;

use crate::lock;
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

    /// Replace the state with a snapshot's (the snapshot ends at `last`).
    fn restore(&mut self, last: Option<&LogId>, data: &[u8]) -> io::Result<()>;
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct MembershipRecord {
    log_id: Option<WireLogId>,
    membership: WireMembership,
}

struct SmInner<A> {
    applier: A,
    applied: Option<LogId>,
    membership: StoredMembership,
    snapshot: Option<(SnapshotMeta, Bytes)>,
}

/// openraft's state machine for one group. Clones share state.
pub struct StateMachine<A: Applier> {
    inner: Arc<Mutex<SmInner<A>>>,
    dir: PathBuf,
    position: watch::Sender<AppliedPosition>,
}

impl<A: Applier> Clone for StateMachine<A> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            dir: self.dir.clone(),
            position: self.position.clone(),
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
        Ok(Self {
            inner: Arc::new(Mutex::new(SmInner {
                applier,
                applied,
                membership,
                snapshot: None,
            })),
            dir: dir.to_owned(),
            position: watch::channel(pos).0,
        })
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
        let mut s = lock(&self.inner);
        s.applier.restore(meta.last_log_id.as_ref(), &data)?;
        self.save_membership(&meta.last_membership)?;
        s.applied = meta.last_log_id;
        s.membership = meta.last_membership.clone();
        s.snapshot = Some((meta.clone(), data));
        let pos = AppliedPosition {
            index: meta.last_log_id.map_or(0, |l| types::to_log_index(l.index)),
            next_offset: s.applier.next_offset(),
        };
        self.position.send_replace(pos);
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
        let mut s = lock(&self.inner);
        let data = Bytes::from(s.applier.snapshot()?);
        let last = s.applied;
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: s.membership.clone(),
        };
        s.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}
