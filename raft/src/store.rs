//! openraft's log store on top of the partition log: entries are stored once,
//! in the segment files, through the log's group-committing writer; the flush
//! callback fires only after the entry's group is fsynced. The vote lives in
//! its own small file, replaced atomically and fsynced before `save_vote`
//! returns.
//!
//! openraft needs entries readable as soon as `append` returns, before they
//! are flushed; the partition log shows readers only flushed bytes. So the
//! store keeps appended-but-unflushed entries in memory (`pending`) until
//! their group is durable. That window is bounded by the log's group size.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{self, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::RaftLogReader;

use crate::hint::HintFile;
use crate::lock;
use crate::log::{LogError, PartitionLog};
use crate::types::{self, from_stored, Entry, LogId, TypeConfig, Vote};

const VOTE_FILE: &str = "vote";
const COMMITTED_FILE: &str = "committed";
const VOTE_MAGIC: &[u8; 8] = b"ABVOTE\0\x01";

/// A Raft group's log store. Cheap to clone: clones share everything (the
/// reader handed to replication tasks is a clone).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    log: Arc<PartitionLog>,
    dir: PathBuf,
    /// Appended, not yet durable, by index. Each carries the base offset the
    /// log assigns it, so a reader sees the same header before and after
    /// the flush. Shared on its own with the log's flush callbacks, which
    /// must not hold the log itself (see `append`).
    pending: Arc<Mutex<BTreeMap<u64, Entry>>>,
    vote: Mutex<Option<Vote>>,
    /// The commit index, as a restart hint.
    committed: Mutex<HintFile>,
}

impl LogStore {
    /// `dir` holds the vote file; the log may live in the same directory.
    pub fn open(log: Arc<PartitionLog>, dir: &Path) -> io::Result<Self> {
        let vote = read_vote_file(&dir.join(VOTE_FILE))?;
        Ok(Self {
            inner: Arc::new(Inner {
                log,
                dir: dir.to_owned(),
                pending: Arc::new(Mutex::new(BTreeMap::new())),
                vote: Mutex::new(vote),
                committed: Mutex::new(HintFile::new(&dir.join(COMMITTED_FILE))),
            }),
        })
    }

    pub fn log(&self) -> &Arc<PartitionLog> {
        &self.inner.log
    }

    pub fn vote(&self) -> Option<Vote> {
        *lock(&self.inner.vote)
    }

    fn entry_at(&self, index: u64) -> io::Result<Option<Entry>> {
        if let Some(e) = lock(&self.inner.pending).get(&index) {
            return Ok(Some(e.clone()));
        }
        let log_index = types::to_log_index(index);
        match self.inner.log.entry(log_index) {
            Ok(Some(rec)) => types::from_record(rec).map(Some),
            Ok(None) => {
                // Flushed between the two looks: the pending entry is on disk now.
                match lock(&self.inner.pending).get(&index) {
                    Some(e) => Ok(Some(e.clone())),
                    None => self
                        .inner
                        .log
                        .entry(log_index)
                        .map_err(io_err)?
                        .map(types::from_record)
                        .transpose(),
                }
            }
            Err(LogError::IndexOutOfRange { .. }) => Ok(None),
            Err(e) => Err(io_err(e)),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        // Raft indexes of the first retained and the last enqueued entry
        // (the log's own indexes are one higher).
        let first = self.inner.log.purged_position().last_index;
        let Some(last) = self
            .inner
            .log
            .last_enqueued()
            .last_log_id
            .map(|l| types::from_log_index(l.index))
        else {
            return Ok(Vec::new());
        };
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => first,
        }
        .max(first);
        let end = match range.end_bound() {
            Bound::Included(&e) => e,
            Bound::Excluded(&e) => e.saturating_sub(1),
            Bound::Unbounded => last,
        }
        .min(last);
        let mut out = Vec::with_capacity(end.saturating_sub(start).saturating_add(1) as usize);
        for index in start..=end {
            match self.entry_at(index)? {
                Some(e) => out.push(e),
                // A purge racing this read removed the head: a gap is only
                // tolerated at the beginning.
                None if out.is_empty() => continue,
                None => {
                    return Err(io::Error::other(format!(
                        "log entry {index} is missing inside the range {start}..={end}"
                    )))
                }
            }
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.vote())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged = self.inner.log.purged_position();
        let last = self.inner.log.last_enqueued();
        let last_purged_log_id = purged.last_log_id.map(|l| from_stored(&l));
        Ok(LogState {
            last_log_id: last
                .last_log_id
                .map(|l| from_stored(&l))
                .or(last_purged_log_id),
            last_purged_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        // Raft's writes are ordered: appends queued before this vote must be
        // durable before the vote is.
        self.wait_flushed().await?;
        let path = self.inner.dir.join(VOTE_FILE);
        let mut bytes = Vec::with_capacity(36);
        bytes.extend_from_slice(VOTE_MAGIC);
        bytes.extend_from_slice(&vote.leader_id.term.to_le_bytes());
        bytes.extend_from_slice(&vote.leader_id.node_id.to_le_bytes());
        bytes.extend_from_slice(&u64::from(vote.committed).to_le_bytes());
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || write_atomic(&dir, &path, &bytes))
            .await
            .map_err(io::Error::other)??;
        *lock(&self.inner.vote) = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // A hint for restart (how far the state machine may claim to have
        // applied), not a durability point: see `hint`. Called on every
        // commit, so it must stay one cheap write.
        let Some(c) = committed else { return Ok(()) };
        lock(&self.inner.committed).write(&c)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let Some(id) = lock(&self.inner.committed).read() else {
            return Ok(None);
        };
        // Never claim more than this log holds (the leader may commit an
        // entry before its own copy is durable).
        let last = self.inner.log.flushed().borrow().last_index;
        Ok((types::to_log_index(id.index) <= last).then_some(id))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut next_offset = self.inner.log.last_enqueued().next_offset;
        let mut records = Vec::new();
        let mut kept = Vec::new();
        for mut e in entries {
            let mut rec = types::to_record(&e)?;
            // The log assigns the same offsets in the same order.
            rec.header.base_offset = next_offset;
            next_offset = rec.header.next_offset();
            if let openraft::EntryPayload::Normal(cmd) = &mut e.payload {
                cmd.header.base_offset = rec.header.base_offset;
                cmd.header.log_id = rec.header.log_id;
            }
            kept.push(e);
            records.push(rec);
        }
        let Some(last) = kept.last().map(|e| e.log_id()) else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        let first = kept.first().map_or(last.index, |e| e.index());
        {
            let mut pending = lock(&self.inner.pending);
            for e in &kept {
                pending.insert(e.index(), e.clone());
            }
        }
        // Completed on the log's writer thread right after the fsync: no
        // task wakes up in between to tell openraft (one hop less on every
        // publish's path to its ack). It holds the pending map only: were
        // it to hold the last reference to the log, dropping it on the
        // writer thread would make that thread wait for itself to stop.
        let pending_map = self.inner.pending.clone();
        let on_durable: crate::log::OnDurable = Box::new(move |res| {
            {
                let mut pending = lock(&pending_map);
                // Only what this append put there: a truncation may have
                // replaced entries at these indexes meanwhile.
                for e in &kept {
                    if pending.get(&e.index()).map(|p| p.log_id()) == Some(e.log_id()) {
                        pending.remove(&e.index());
                    }
                }
            }
            match res {
                Ok(_) => callback.io_completed(Ok(())),
                Err(e) => {
                    tracing::error!(last = %last, error = %e, "log append failed");
                    callback.io_completed(Err(io_err(e)))
                }
            }
        });
        if let Err(e) = self.inner.log.append_then(records, on_durable) {
            // Not called on an error: undo what this append registered.
            // Nothing else changed them meanwhile (openraft calls the store
            // one method at a time, `&mut self`).
            let mut pending = lock(&self.inner.pending);
            for index in first..=last.index {
                pending.remove(&index);
            }
            return Err(io_err(e));
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        lock(&self.inner.pending).retain(|i, _| *i < from);
        tracing::info!(from, "truncating conflicting log suffix");
        self.inner
            .log
            .truncate_from(types::to_log_index(from))
            .await
            .map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Whole sealed segments only; entries up to `log_id` that share a
        // segment with newer ones stay readable until that segment goes.
        // openraft only asks for this up to a snapshot's last log id.
        let n = self
            .inner
            .log
            .purge_to(types::to_log_index(log_id.index))
            .map_err(io_err)?;
        if n > 0 {
            let log = &self.inner.log;
            tracing::info!(dir = %log.dir().display(), segments = n, up_to = %log_id,
                earliest_offset = log.start_offset(), "purged log segments covered by the snapshot");
        }
        Ok(())
    }
}

impl LogStore {
    async fn wait_flushed(&self) -> io::Result<()> {
        let target = self.inner.log.last_enqueued().last_index;
        let mut rx = self.inner.log.flushed();
        rx.wait_for(|p| p.last_index >= target)
            .await
            .map(|_| ())
            .map_err(|_| io::Error::other("partition log closed"))
    }
}

fn read_vote_file(path: &Path) -> io::Result<Option<Vote>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // The file is replaced atomically, so anything but a whole valid
    // record is damage, not a torn write: refuse rather than forget a vote
    // (forgetting could let this node vote twice in one term).
    if bytes.len() != 36 || &bytes[..8] != VOTE_MAGIC {
        return Err(types::invalid(format!(
            "{} is damaged ({} bytes); restore it or remove this node's data and re-add it",
            path.display(),
            bytes.len()
        )));
    }
    if crc32c::crc32c(&bytes[..32]).to_le_bytes() != bytes[32..36] {
        return Err(types::invalid(format!(
            "{} fails its checksum; restore it or remove this node's data and re-add it",
            path.display()
        )));
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[8 + i * 8..16 + i * 8]);
        u64::from_le_bytes(b)
    };
    let (term, node, committed) = (word(0), word(1), word(2) != 0);
    Ok(Some(if committed {
        Vote::new_committed(term, node)
    } else {
        Vote::new(term, node)
    }))
}

/// Write `bytes` to `path` so that a crash leaves the old or the new
/// content, never a mix: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

pub(crate) fn io_err(e: LogError) -> io::Error {
    io::Error::other(e.to_string())
}
