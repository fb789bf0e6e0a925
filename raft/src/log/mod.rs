//! The partition log on disk: an append-only sequence of batches in segment
//! files. It is both the topic log subscribers read and (later) the openraft
//! log store, so there is exactly one write path.
//!
//! # What it owns
//! - The segment files and their sparse indexes in one directory, and the
//!   only writer of them: a dedicated thread that commits appends in groups
//!   (one `fdatasync` per group) and applies suffix truncations in order.
//! - Offset assignment: an entry's `base_offset` is the log's next offset at
//!   its position, so every replica computes the same offsets from the same
//!   entries. Offsets count rows ([`BatchHeader::offset_count`]).
//! - Recovery: the last segment's torn tail is cut off; anything else that
//!   does not verify refuses to open ([`LogError::Corrupt`]).
//!
//! # What it must never do
//! - Acknowledge an append (complete its ticket) or publish a flushed
//!   position before the bytes are fsynced (with [`FsyncPolicy::Always`]).
//! - Hand a reader bytes beyond the flushed position.
//! - Write after an fsync failed: the page cache may have dropped the dirty
//!   pages, so the file no longer says what we think ("fsyncgate"). The log
//!   goes [`LogError::Failed`] for good and the node must restart.
//! - Keep per-batch state in memory: only a sparse index (one point per
//!   `index_interval_bytes`), a few words per segment, and the newest
//!   entries up to a byte budget while the log is being written
//!   ([`tail`], `LogConfig::tail_cache_bytes`).
//! - Interpret bodies (Arrow IPC): they are stored and returned verbatim.
//!
//! # On-disk layout
//! ```text
//! <dir>/
//!   00000000000000000001.seg    sealed segment, named by its first log index
//!   00000000000000000001.idx    its sparse index (sealed segments only)
//!   00000000000000000873.seg    the active segment: the only one written
//!   *.tmp                       half-made files; deleted on open
//!   reset                       only while a reset is under way (below)
//!
//! segment file:
//!   off size
//!     0    8 magic "ABSEG\0\0\x01" (last byte: segment format version)
//!     8    8 base_index   first log index (== the file name)
//!    16    8 base_offset  first offset
//!    24    8 prev_term    log id of entry base_index-1, so that an empty
//!    32    8 prev_leader  log still knows its last log id
//!    40    4 flags        bit 0: prev log id present
//!    44    4 crc32c of bytes 0..44
//!    48      record*      each: 80-byte BatchHeader + body (arrowbus_wire::batch),
//!                         strictly consecutive log indexes; offsets follow next_offset()
//!
//! idx file (written + fsynced when its segment is sealed):
//!     0    8 magic "ABIDX\0\0\x01"
//!     8   88 u64 x 11: base_index, base_offset, segment_len, next_offset,
//!                      last_base_offset, last_ts, last_term, last_leader,
//!                      last_index, last_record_pos, n
//!    96 n*32 entries: (index, offset, position, timestamp) u64 each,
//!                      one per index_interval_bytes of records
//!   end    4 crc32c of everything before
//! ```
//! The active segment may end with fewer than 4,096 zero bytes after its
//! last record: the padding of a direct (`O_DIRECT`) write (module `direct`).
//! Recovery cuts it; a segment is cut to its last record when sealed.
//!
//! New files are written as `*.tmp`, fsynced, renamed, and the directory is
//! fsynced, so a file with a final name is always complete.
//!
//! # Reset (a replica installing a snapshot)
//! [`PartitionLog::reset_to`] replaces the whole log by an empty one that
//! starts after a given log id and offset. It is a redo operation: first the
//! `reset` marker (the new segment's header) is made durable, then every
//! segment and index is deleted, the new empty segment is created, and the
//! marker is removed. A crash before the marker is durable leaves the old
//! log; a crash after it leaves a marker, and [`PartitionLog::open`] finishes
//! the reset before anything else. So a kill -9 at any point ends in either
//! the old or the new log, never a mix.
//!
//! # Durability and failure
//! Records are written with positioned writes at a position the writer
//! tracks. A write that fails with ENOSPC rolls the whole group back
//! (`ftruncate` to the group start, delete segments the group created), fails
//! every request queued behind it ([`LogError::DiskFull`]) and the log keeps
//! serving; the next group overwrites from the same position.
//!
//! [`FsyncPolicy::Interval`] is weaker: tickets complete and readers see data
//! after the write reaches the page cache; an fsync runs every interval. A
//! machine crash loses up to one interval of acknowledged appends.

mod direct;
mod disk;
mod tail;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use arrowbus_wire::{BatchHeader, LogId, BATCH_HEADER_BYTES};
use bytes::Bytes;
use tokio::sync::{oneshot, watch};

pub use disk::MAX_ENTRY_BODY_BYTES;
use disk::{IndexEntry, SegMeta, SEG_HEADER_BYTES};
pub use writer::OnDurable;

/// Smallest accepted `segment_max_bytes`: below one page a segment is all
/// header and file overhead (tests use this to force many rolls).
pub const MIN_SEGMENT_BYTES: u64 = 4096;
/// Largest accepted `segment_max_bytes`: 64 GiB keeps retention granular.
pub const MAX_SEGMENT_BYTES: u64 = 64 * 1024 * 1024 * 1024;
/// Smallest `index_interval_bytes`: one index point per 128 bytes is 32 bytes
/// of memory per 128 bytes of log — denser would be a per-batch index.
pub const MIN_INDEX_INTERVAL_BYTES: u64 = 128;
/// Smallest `max_group_bytes`.
pub const MIN_GROUP_BYTES: u64 = 4096;
/// Largest `max_group_bytes`: 1 GiB, the most a crash can tear off the tail.
pub const MAX_GROUP_BYTES: u64 = 1024 * 1024 * 1024;
/// Most append requests in one fsync group: bounds the ticket list a group
/// holds and the latency the first request waits for the last.
pub const MAX_GROUP_REQUESTS: usize = 4096;
/// Most bytes enqueued but not yet written. Beyond it `append` says
/// [`LogError::Busy`] instead of growing the queue: 256 MiB is four default
/// groups, enough to keep the disk busy.
pub const MAX_QUEUED_BYTES: u64 = 256 * 1024 * 1024;
/// Most entries enqueued but not yet durable: each costs ~48 bytes of
/// bookkeeping (for `truncate_from` of an in-flight suffix); 256 Ki is 12 MiB.
pub const MAX_QUEUED_ENTRIES: u64 = 256 * 1024;
/// Largest `tail_cache_bytes`: it is held per partition while the partition
/// is written.
pub const MAX_TAIL_CACHE_BYTES: u64 = 1024 * 1024 * 1024;
/// Longest accepted `FsyncPolicy::Interval`.
pub const MAX_FSYNC_INTERVAL: Duration = Duration::from_secs(60);

/// When appended bytes are fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Complete a ticket only after its group is written and `fdatasync`ed.
    #[default]
    Always,
    /// Complete after the write; `fdatasync` every interval. Weaker: a machine
    /// crash loses up to one interval of acknowledged appends.
    Interval(Duration),
}

/// Configuration of one partition log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Roll to a new segment when the active one would exceed this many bytes.
    /// Retention deletes whole segments, so this is also its granularity.
    /// Default 128 MiB.
    pub segment_max_bytes: u64,
    /// One sparse index point per this many bytes of records: 32 bytes of
    /// memory each, and a seek scans at most about this many bytes. Default 64 KiB.
    pub index_interval_bytes: u64,
    /// Default [`FsyncPolicy::Always`].
    pub fsync: FsyncPolicy,
    /// Most bytes written per fsync group, and so the most a crash can tear
    /// from the tail. One `append` call may not exceed it. Default 64 MiB.
    pub max_group_bytes: u64,
    /// Bodies of the newest entries kept in memory after they are written,
    /// so that subscribers at the head and replication read them without
    /// touching the file (dropped after the log is idle for 2 s). 0: none.
    /// Default 8 MiB; at most [`MAX_TAIL_CACHE_BYTES`].
    pub tail_cache_bytes: u64,
    /// With [`FsyncPolicy::Always`], write segments with `O_DIRECT`
    /// (module `direct`: no copy into the page cache) where the file system
    /// allows it. Default true.
    pub direct_io: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_max_bytes: 128 * 1024 * 1024,
            index_interval_bytes: 64 * 1024,
            fsync: FsyncPolicy::Always,
            max_group_bytes: 64 * 1024 * 1024,
            tail_cache_bytes: 8 * 1024 * 1024,
            direct_io: true,
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), LogError> {
        let bad = |m: String| Err(LogError::InvalidConfig(m));
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_max_bytes) {
            return bad(format!(
                "segment_max_bytes = {} is outside {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES}",
                self.segment_max_bytes
            ));
        }
        if !(MIN_INDEX_INTERVAL_BYTES..=self.segment_max_bytes).contains(&self.index_interval_bytes)
        {
            return bad(format!(
                "index_interval_bytes = {} is outside {MIN_INDEX_INTERVAL_BYTES}..=segment_max_bytes ({})",
                self.index_interval_bytes, self.segment_max_bytes
            ));
        }
        if !(MIN_GROUP_BYTES..=MAX_GROUP_BYTES).contains(&self.max_group_bytes) {
            return bad(format!(
                "max_group_bytes = {} is outside {MIN_GROUP_BYTES}..={MAX_GROUP_BYTES}",
                self.max_group_bytes
            ));
        }
        if self.tail_cache_bytes > MAX_TAIL_CACHE_BYTES {
            return bad(format!(
                "tail_cache_bytes = {} exceeds {MAX_TAIL_CACHE_BYTES}",
                self.tail_cache_bytes
            ));
        }
        if let FsyncPolicy::Interval(d) = self.fsync {
            if d.is_zero() || d > MAX_FSYNC_INTERVAL {
                return bad(format!(
                    "fsync interval {d:?} is outside (0, {MAX_FSYNC_INTERVAL:?}]"
                ));
            }
        }
        Ok(())
    }
}

/// One entry to append. `header.base_offset` is assigned by the log; every
/// other field (log id, timestamp, kind, producer fields, body CRC and length,
/// rows, schema id) is the caller's.
#[derive(Clone, Debug)]
pub struct Entry {
    pub header: BatchHeader,
    pub body: Bytes,
}

/// What the log assigned to one appended entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub log_id: LogId,
    pub base_offset: u64,
    pub row_count: u32,
    pub timestamp_ms: i64,
}

/// A position in the log: its last entry and the offset after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LogPosition {
    /// 0 = empty log; indexes start at 1.
    pub last_index: u64,
    pub last_log_id: Option<LogId>,
    pub next_offset: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LogStats {
    pub start_offset: u64,
    /// Flushed next offset.
    pub next_offset: u64,
    /// Bytes of all segment files (headers included).
    pub bytes: u64,
    /// Entries retained.
    pub batches: u64,
    pub segments: usize,
    pub first_index: u64,
    /// Flushed last index.
    pub last_index: u64,
}

/// What [`PartitionLog::open`] found and repaired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub entries: u64,
    /// Bytes of torn tail cut from the last segment.
    pub truncated_bytes: u64,
    /// Sealed segments whose `.idx` was missing or invalid and was rebuilt.
    pub rebuilt_indexes: usize,
}

/// One stored entry, exactly as on disk: `encoded` then `body` is the
/// record, sent verbatim to subscribers (as two buffers, uncopied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBatch {
    pub header: BatchHeader,
    /// The header's 80 bytes as stored.
    pub encoded: [u8; BATCH_HEADER_BYTES],
    pub body: Bytes,
}

impl StoredBatch {
    /// Header + body bytes.
    pub fn record_len(&self) -> u64 {
        (BATCH_HEADER_BYTES + self.body.len()) as u64
    }

    /// The record in one buffer (a copy).
    pub fn record(&self) -> Vec<u8> {
        let mut r = Vec::with_capacity(self.record_len() as usize);
        r.extend_from_slice(&self.encoded);
        r.extend_from_slice(&self.body);
        r
    }

    fn from_cache(c: &tail::Cached) -> Self {
        Self {
            header: c.header,
            encoded: c.encoded,
            body: c.body.clone(),
        }
    }
}

/// What [`PartitionLog::read_cached`] found at a cursor.
#[derive(Debug)]
pub enum CachedRead {
    /// The entry, from memory; the cursor moved past it.
    Hit(StoredBatch),
    /// Nothing at the cursor is visible yet (its index is past `max_index`).
    NotVisible,
    /// The entry is not in the cache: [`PartitionLog::read`] it.
    Miss,
}

/// The entry at `cursor` if the tail cache holds it, advancing the cursor.
/// The cache holds only published entries of the current log; the offset
/// check keeps a cursor from before a truncation on the disk path, which
/// relocates it.
fn read_tail(tail: &tail::TailCache, cursor: &mut Cursor) -> Option<StoredBatch> {
    let c = tail
        .get(cursor.next_index)
        .filter(|c| c.header.base_offset == cursor.next_offset)?;
    *cursor = Cursor {
        seg: c.seg,
        pos: c.pos + c.record_len(),
        next_index: cursor.next_index + 1,
        next_offset: c.header.next_offset(),
    };
    Some(StoredBatch::from_cache(c))
}

/// A read position. Cheap to clone; holds no file or lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// Base index of the segment the cursor is in.
    seg: u64,
    /// File position of the next record.
    pos: u64,
    next_index: u64,
    next_offset: u64,
}

impl Cursor {
    /// Base offset of the next entry this cursor reads (or the log's next
    /// offset at the end).
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }
    /// Log index of the next entry this cursor reads.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }
}

#[non_exhaustive]
#[derive(thiserror::Error, Debug)]
pub enum LogError {
    #[error("entry index {got} does not continue the log: expected {expected}")]
    NonContiguous { expected: u64, got: u64 },
    #[error("offset {requested} is outside the log's retained range {start}..={end}")]
    OffsetOutOfRange {
        requested: u64,
        start: u64,
        end: u64,
    },
    #[error("log index {requested} is outside the retained range {first}..={last}")]
    IndexOutOfRange {
        requested: u64,
        first: u64,
        last: u64,
    },
    #[error("disk full writing {path}: nothing of the failed group was acknowledged; the log resumes once space is freed")]
    DiskFull { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt partition log {path} at byte {position}: {reason}. This is not a torn tail, so it is not repaired automatically: restore the partition from a replica (remove the partition directory and let it re-replicate), or move the file aside to inspect it")]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    #[error("an fsync of the partition log failed; the log refuses all writes. Restart the node so it recovers from what is on disk")]
    Failed,
    #[error("the partition log is closed")]
    Closed,
    #[error("partition log {path} is already open (another busd, or another instance of this partition in this one, holds its lock): two writers would corrupt it. Stop the other process using this data directory")]
    Locked { path: PathBuf },
    #[error("invalid log config: {0}")]
    InvalidConfig(String),
    #[error("invalid entry {index}: {reason}")]
    InvalidEntry { index: u64, reason: String },
    #[error("the partition log's write queue is full ({queued_bytes} bytes, {queued_entries} entries): retry after earlier appends complete")]
    Busy {
        queued_bytes: u64,
        queued_entries: u64,
    },
}

impl LogError {
    /// A copy for every request failed by the same cause (io::Error is not Clone).
    fn duplicate(&self) -> LogError {
        match self {
            Self::NonContiguous { expected, got } => Self::NonContiguous {
                expected: *expected,
                got: *got,
            },
            Self::OffsetOutOfRange {
                requested,
                start,
                end,
            } => Self::OffsetOutOfRange {
                requested: *requested,
                start: *start,
                end: *end,
            },
            Self::IndexOutOfRange {
                requested,
                first,
                last,
            } => Self::IndexOutOfRange {
                requested: *requested,
                first: *first,
                last: *last,
            },
            Self::DiskFull { path } => Self::DiskFull { path: path.clone() },
            Self::Locked { path } => Self::Locked { path: path.clone() },
            Self::Io { op, path, source } => Self::Io {
                op,
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Self::Corrupt {
                path,
                position,
                reason,
            } => Self::Corrupt {
                path: path.clone(),
                position: *position,
                reason: reason.clone(),
            },
            Self::Failed => Self::Failed,
            Self::Closed => Self::Closed,
            Self::InvalidConfig(s) => Self::InvalidConfig(s.clone()),
            Self::InvalidEntry { index, reason } => Self::InvalidEntry {
                index: *index,
                reason: reason.clone(),
            },
            Self::Busy {
                queued_bytes,
                queued_entries,
            } => Self::Busy {
                queued_bytes: *queued_bytes,
                queued_entries: *queued_entries,
            },
        }
    }
}

/// Completes when the append's group is durable (see [`PartitionLog::append`]).
pub struct AppendTicket {
    inner: TicketInner,
}

enum TicketInner {
    Ready(Option<Result<Vec<Appended>, LogError>>),
    Waiting(oneshot::Receiver<Result<Vec<Appended>, LogError>>),
}

impl Future for AppendTicket {
    type Output = Result<Vec<Appended>, LogError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.inner {
            TicketInner::Ready(r) => Poll::Ready(r.take().unwrap_or(Err(LogError::Closed))),
            // The writer dropping the sender without answering means it stopped.
            TicketInner::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(LogError::Closed))),
        }
    }
}

/// A published segment: what readers, purge and retention see.
struct Segment {
    meta: SegMeta,
    path: PathBuf,
    file: Arc<File>,
    /// Sparse index, ascending by position.
    index: Vec<IndexEntry>,
    /// All segments but the last are sealed.
    sealed: bool,
}

struct Segs {
    list: VecDeque<Segment>,
    /// Bumped by every truncation so a reader that hit changed bytes can tell
    /// a race with truncation from corruption.
    truncations: u64,
    /// The newest published entries, in memory.
    tail: tail::TailCache,
}

impl Segs {
    /// Position of the segment with this base index.
    fn find_base(&self, base: u64) -> Option<usize> {
        self.list
            .binary_search_by_key(&base, |s| s.meta.base_index)
            .ok()
    }
    /// Position of the segment that holds (or would hold) entry `index`.
    fn find_index(&self, index: u64) -> Option<usize> {
        let i = self.list.partition_point(|s| s.meta.base_index <= index);
        i.checked_sub(1)
    }
    fn first(&self) -> Option<&Segment> {
        self.list.front()
    }
    fn last(&self) -> Option<&Segment> {
        self.list.back()
    }
    fn start_offset(&self) -> u64 {
        self.first().map_or(0, |s| s.meta.base_offset)
    }
    fn next_offset(&self) -> u64 {
        self.last().map_or(0, |s| s.meta.next_offset())
    }
    fn position(&self) -> LogPosition {
        self.last()
            .map_or_else(LogPosition::default, |s| LogPosition {
                last_index: s.meta.last_index(),
                last_log_id: s.meta.last_log_id(),
                next_offset: s.meta.next_offset(),
            })
    }
    fn out_of_range(&self, requested: u64) -> LogError {
        LogError::OffsetOutOfRange {
            requested,
            start: self.start_offset(),
            end: self.next_offset(),
        }
    }
}

/// An enqueued entry not yet durable: lets `truncate_from` of an in-flight
/// suffix know the position it goes back to.
#[derive(Clone, Copy)]
struct Inflight {
    seq: u64,
    log_id: LogId,
    next_offset: u64,
}

/// The enqueue side: what the next append must continue from.
struct Enq {
    pos: LogPosition,
    /// Bumped when a failed group aborts everything queued behind it.
    epoch: u64,
    /// Request sequence number, to retire `inflight` entries once written.
    seq: u64,
    inflight: VecDeque<Inflight>,
    /// Why requests of an old epoch fail.
    abort_reason: Option<LogError>,
    /// None once closed.
    tx: Option<mpsc::Sender<writer::Request>>,
}

struct Inner {
    dir: PathBuf,
    cfg: LogConfig,
    segs: RwLock<Segs>,
    enq: Mutex<Enq>,
    flushed_tx: watch::Sender<LogPosition>,
    failed: AtomicBool,
    fsyncs: AtomicU64,
    queued_bytes: AtomicU64,
    queued_entries: AtomicU64,
    /// Held by whoever deletes or replaces segment files outside the writer's
    /// appends (purge, retention, reset), so that a purge that already took
    /// segments out of the list cannot unlink a file a reset just created
    /// under the same name.
    removal: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a bug already reported by the panic;
    // the protected state is plain data, still usable for shutting down.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn segs(&self) -> RwLockReadGuard<'_, Segs> {
        self.segs.read().unwrap_or_else(PoisonError::into_inner)
    }
    fn segs_mut(&self) -> std::sync::RwLockWriteGuard<'_, Segs> {
        self.segs.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The partition log. `Send + Sync`; share it as `Arc<PartitionLog>`.
pub struct PartitionLog {
    inner: Arc<Inner>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The directory's lock ([`lock_dir`]), released by `close` once the
    /// writer has stopped.
    dir_lock: Mutex<Option<File>>,
}

impl Drop for PartitionLog {
    fn drop(&mut self) {
        self.close();
    }
}

impl PartitionLog {
    /// Blocking. Creates the directory if missing, recovers (module doc) and
    /// starts the writer thread.
    pub fn open(
        dir: &Path,
        cfg: LogConfig,
    ) -> Result<(Arc<PartitionLog>, RecoveryReport), LogError> {
        cfg.validate()?;
        std::fs::create_dir_all(dir).map_err(|e| disk::io_err("create directory", dir, e))?;
        let dir_lock = lock_dir(dir)?;
        let (list, report) = recover(dir, &cfg)?;
        let segs = Segs {
            list,
            truncations: 0,
            tail: tail::TailCache::new(cfg.tail_cache_bytes),
        };
        let pos = segs.position();
        let (flushed_tx, _) = watch::channel(pos);
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            cfg,
            segs: RwLock::new(segs),
            enq: Mutex::new(Enq {
                pos,
                epoch: 0,
                seq: 0,
                inflight: VecDeque::new(),
                abort_reason: None,
                tx: Some(tx),
            }),
            flushed_tx,
            failed: AtomicBool::new(false),
            fsyncs: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            queued_entries: AtomicU64::new(0),
            removal: Mutex::new(()),
        });
        let handle = writer::spawn(inner.clone(), rx)?;
        tracing::info!(dir = %dir.display(), segments = report.segments, entries = report.entries,
            truncated_bytes = report.truncated_bytes, rebuilt_indexes = report.rebuilt_indexes,
            "partition log opened");
        Ok((
            Arc::new(PartitionLog {
                inner,
                writer: Mutex::new(Some(handle)),
                dir_lock: Mutex::new(Some(dir_lock)),
            }),
            report,
        ))
    }

    /// Checks and enqueues `entries` (in call order). Their indexes must
    /// continue the enqueued log contiguously. Assigns base offsets. The
    /// ticket completes once the group holding them is written and fsynced.
    /// The body CRC is verified here: a bad one would read back as a torn
    /// tail after a crash.
    pub fn append(&self, entries: Vec<Entry>) -> Result<AppendTicket, LogError> {
        if entries.is_empty() {
            return Ok(AppendTicket {
                inner: TicketInner::Ready(Some(Ok(Vec::new()))),
            });
        }
        let (tx, rx) = oneshot::channel();
        self.enqueue(
            entries,
            Box::new(move |res| {
                let _ = tx.send(res);
            }),
        )?;
        Ok(AppendTicket {
            inner: TicketInner::Waiting(rx),
        })
    }

    /// Like [`append`](Self::append), but instead of a ticket to await,
    /// `on_durable` is called with the outcome on the log's writer thread,
    /// right after the group's fsync: no task has to wake up to pass the
    /// news on. It must be quick and must not block. It should not own a
    /// reference to this log: if it holds the last one, the log closes in
    /// the background once its queue is empty. Not called when this
    /// returns an error. Empty `entries` complete at once, here.
    pub fn append_then(&self, entries: Vec<Entry>, on_durable: OnDurable) -> Result<(), LogError> {
        if entries.is_empty() {
            on_durable(Ok(Vec::new()));
            return Ok(());
        }
        self.enqueue(entries, on_durable)
    }

    fn enqueue(&self, mut entries: Vec<Entry>, on_durable: OnDurable) -> Result<(), LogError> {
        let mut bytes = 0u64;
        for e in &entries {
            let h = &e.header;
            let index = h.log_id.index;
            let invalid = |reason: String| Err(LogError::InvalidEntry { index, reason });
            if h.body_len > MAX_ENTRY_BODY_BYTES {
                return invalid(format!(
                    "body of {} bytes exceeds {MAX_ENTRY_BODY_BYTES}",
                    h.body_len
                ));
            }
            if let Err(err) = h.verify_body(&e.body) {
                return invalid(err.to_string());
            }
            bytes += h.record_len();
        }
        if bytes > self.inner.cfg.max_group_bytes {
            return Err(LogError::InvalidEntry {
                index: entries[0].header.log_id.index,
                reason: format!(
                    "one append of {bytes} bytes exceeds max_group_bytes ({})",
                    self.inner.cfg.max_group_bytes
                ),
            });
        }
        let mut enq = lock(&self.inner.enq);
        if self.inner.failed.load(Ordering::Acquire) {
            return Err(LogError::Failed);
        }
        if enq.tx.is_none() {
            return Err(LogError::Closed);
        }
        let n = entries.len() as u64;
        let (qb, qe) = (
            self.inner.queued_bytes.load(Ordering::Acquire),
            self.inner.queued_entries.load(Ordering::Acquire),
        );
        if qb + bytes > MAX_QUEUED_BYTES || qe + n > MAX_QUEUED_ENTRIES {
            return Err(LogError::Busy {
                queued_bytes: qb,
                queued_entries: qe,
            });
        }
        let mut expected = enq.pos.last_index + 1;
        for e in &entries {
            if e.header.log_id.index != expected {
                return Err(LogError::NonContiguous {
                    expected,
                    got: e.header.log_id.index,
                });
            }
            expected += 1;
        }
        enq.seq += 1;
        let seq = enq.seq;
        let mut next_offset = enq.pos.next_offset;
        let mut records = Vec::with_capacity(entries.len());
        for e in entries.iter_mut() {
            e.header.base_offset = next_offset;
            next_offset = e.header.next_offset();
            enq.inflight.push_back(Inflight {
                seq,
                log_id: e.header.log_id,
                next_offset,
            });
            records.push(writer::Record {
                header: e.header,
                encoded: e.header.encode(),
                body: std::mem::take(&mut e.body),
            });
        }
        let last_log_id = entries.last().map(|e| e.header.log_id);
        enq.pos = LogPosition {
            last_index: expected - 1,
            last_log_id,
            next_offset,
        };
        let req = writer::Request::Append(writer::AppendReq {
            epoch: enq.epoch,
            seq,
            bytes,
            records,
            done: writer::Durable::new(on_durable),
        });
        self.inner.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        self.inner.queued_entries.fetch_add(n, Ordering::AcqRel);
        // Sent under the enqueue lock: channel order is index order.
        match enq.tx.as_ref().map(|t| t.send(req)) {
            Some(Ok(())) => Ok(()),
            Some(Err(unsent)) => {
                // The error below is the answer; the completion is not.
                if let writer::Request::Append(a) = unsent.0 {
                    a.done.disarm();
                }
                Err(LogError::Closed)
            }
            None => Err(LogError::Closed),
        }
    }

    /// What the next append must continue from.
    pub fn last_enqueued(&self) -> LogPosition {
        lock(&self.inner.enq).pos
    }

    /// The durable position: advanced after each durable group, moved back
    /// by truncation.
    pub fn flushed(&self) -> watch::Receiver<LogPosition> {
        self.inner.flushed_tx.subscribe()
    }

    /// Index of the first retained entry (the first segment's base index).
    pub fn first_index(&self) -> u64 {
        self.inner.segs().first().map_or(1, |s| s.meta.base_index)
    }

    /// Offset of the first retained entry.
    pub fn start_offset(&self) -> u64 {
        self.inner.segs().start_offset()
    }

    pub fn stats(&self) -> LogStats {
        let s = self.inner.segs();
        let pos = s.position();
        LogStats {
            start_offset: s.start_offset(),
            next_offset: pos.next_offset,
            bytes: s.list.iter().map(|g| g.meta.len).sum(),
            batches: s.list.iter().map(|g| g.meta.entries()).sum(),
            segments: s.list.len(),
            first_index: s.first().map_or(1, |g| g.meta.base_index),
            last_index: pos.last_index,
        }
    }

    /// The directory holding this log's segment files.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The position just before the first retained entry: its log id is the
    /// last purged one (what Raft calls `last_purged_log_id`).
    pub fn purged_position(&self) -> LogPosition {
        let s = self.inner.segs();
        match s.first() {
            Some(g) => LogPosition {
                last_index: g.meta.base_index - 1,
                last_log_id: g.meta.prev,
                next_offset: g.meta.base_offset,
            },
            None => LogPosition::default(),
        }
    }

    /// fdatasync calls made by this log since open (for tests and metrics).
    pub fn fsyncs(&self) -> u64 {
        self.inner.fsyncs.load(Ordering::Acquire)
    }

    /// Removes entries with index >= `index` (Raft conflict truncation).
    /// Serialized with appends through the writer; durable before it completes.
    /// Truncating below the first retained index is refused (`IndexOutOfRange`).
    pub fn truncate_from(
        &self,
        index: u64,
    ) -> impl Future<Output = Result<(), LogError>> + Send + 'static {
        let index = index.max(1);
        let res = self.enqueue_truncate(index);
        async move {
            match res {
                Ok(Some(rx)) => rx.await.unwrap_or(Err(LogError::Closed)),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            }
        }
    }

    fn enqueue_truncate(
        &self,
        index: u64,
    ) -> Result<Option<oneshot::Receiver<Result<(), LogError>>>, LogError> {
        let mut enq = lock(&self.inner.enq);
        if self.inner.failed.load(Ordering::Acquire) {
            return Err(LogError::Failed);
        }
        if enq.tx.is_none() {
            return Err(LogError::Closed);
        }
        if index > enq.pos.last_index {
            return Ok(None);
        }
        // The position entry `index - 1` leaves: in flight, or on disk.
        let new_pos = if let Some(f) = enq
            .inflight
            .iter()
            .rev()
            .find(|f| f.log_id.index == index - 1)
        {
            LogPosition {
                last_index: index - 1,
                last_log_id: Some(f.log_id),
                next_offset: f.next_offset,
            }
        } else {
            self.durable_position_before(index)?
        };
        enq.inflight.retain(|f| f.log_id.index < index);
        enq.pos = new_pos;
        let (tx, rx) = oneshot::channel();
        let req = writer::Request::Truncate(writer::TruncateReq {
            epoch: enq.epoch,
            index,
            new_pos,
            tx,
        });
        match enq.tx.as_ref().map(|t| t.send(req)) {
            Some(Ok(())) => Ok(Some(rx)),
            _ => Err(LogError::Closed),
        }
    }

    /// The position after entry `index - 1`, read from the published log.
    fn durable_position_before(&self, index: u64) -> Result<LogPosition, LogError> {
        let (first, last, first_meta) = {
            let s = self.inner.segs();
            let f = s.first().map(|g| g.meta);
            (f.map_or(1, |m| m.base_index), s.position().last_index, f)
        };
        if index < first {
            return Err(LogError::IndexOutOfRange {
                requested: index,
                first,
                last,
            });
        }
        if index == first {
            let m = first_meta.unwrap_or(SegMeta::empty(1, 0, None));
            return Ok(LogPosition {
                last_index: index - 1,
                last_log_id: m.prev,
                next_offset: m.base_offset,
            });
        }
        match self.entry_header(index - 1)? {
            Some(h) => Ok(LogPosition {
                last_index: index - 1,
                last_log_id: Some(h.log_id),
                next_offset: h.next_offset(),
            }),
            None => Err(LogError::IndexOutOfRange {
                requested: index,
                first,
                last,
            }),
        }
    }

    /// Deletes whole sealed segments whose entries all have index <= `index`.
    pub fn purge_to(&self, index: u64) -> Result<u64, LogError> {
        self.delete_oldest(|seg, _| seg.meta.last_index() <= index)
    }

    /// Deletes the oldest sealed segments while the log holds more than
    /// `retention_bytes`, or while a segment's newest timestamp is older than
    /// `now_ms - retention_ms`. Never the active segment.
    ///
    /// This bypasses Raft: only for a log that is not a replicated group's
    /// (tests, tools). A group's retention goes through
    /// [`PartitionLog::retention_cut`] and a snapshot, see
    /// [`crate::group::Group::compact_to`].
    pub fn enforce_retention(
        &self,
        now_ms: i64,
        retention_ms: Option<u64>,
        retention_bytes: Option<u64>,
    ) -> Result<u64, LogError> {
        self.delete_oldest(retention_pred(now_ms, retention_ms, retention_bytes))
    }

    /// Where retention would cut: the last log index of the oldest sealed
    /// segments [`PartitionLog::enforce_retention`] would delete, limited to
    /// segments whose entries all have index <= `max_index` (the applied
    /// index: a snapshot can only describe applied state). `None`: nothing
    /// beyond what is already purged. Reads segment metadata only.
    pub fn retention_cut(
        &self,
        now_ms: i64,
        retention_ms: Option<u64>,
        retention_bytes: Option<u64>,
        max_index: u64,
    ) -> Option<u64> {
        let mut pred = retention_pred(now_ms, retention_ms, retention_bytes);
        let s = self.inner.segs();
        let purged = s.first().map_or(0, |g| g.meta.base_index - 1);
        let mut total: u64 = s.list.iter().map(|g| g.meta.len).sum();
        let mut cut = None;
        // Bounded by the segment count; the last (active) one always stays.
        for seg in s.list.iter().take(s.list.len().saturating_sub(1)) {
            if !seg.sealed || seg.meta.last_index() > max_index || !pred(seg, total) {
                break;
            }
            total -= seg.meta.len;
            cut = Some(seg.meta.last_index());
        }
        cut.filter(|c| *c > purged)
    }

    /// The offset after entry `id` if this log holds it, as a retained entry
    /// or as its purged position (the log id just before its first entry);
    /// `None` when it does not (not retained, never written, or another
    /// entry at that index). Only durable entries count.
    pub fn next_offset_after(&self, id: &LogId) -> Result<Option<u64>, LogError> {
        let purged = self.purged_position();
        if purged.last_index == id.index {
            return Ok((purged.last_log_id == Some(*id)).then_some(purged.next_offset));
        }
        Ok(self
            .entry(id.index)?
            .filter(|b| b.header.log_id == *id)
            .map(|b| b.header.next_offset()))
    }

    /// Waits until everything enqueued so far is durable (or the log fails
    /// or closes).
    pub async fn wait_flushed(&self) -> Result<(), LogError> {
        let target = self.last_enqueued().last_index;
        let mut rx = self.flushed();
        rx.wait_for(|p| p.last_index >= target)
            .await
            .map(|_| ())
            .map_err(|_| LogError::Closed)
    }

    /// Replaces the whole log by an empty one whose last log id is `last`
    /// and whose next offset is `next_offset` (a replica installing a
    /// snapshot that ends at `last`). Serialized with appends and
    /// truncations through the writer: appends enqueued before it are
    /// written and then discarded; appends enqueued after it continue at
    /// `last.index + 1`. Crash-safe (module doc, "Reset"). A failure leaves
    /// the log [`LogError::Failed`]: the on-disk state is then only known to
    /// recovery.
    pub fn reset_to(
        &self,
        last: LogId,
        next_offset: u64,
    ) -> impl Future<Output = Result<(), LogError>> + Send + 'static {
        let res = self.enqueue_reset(last, next_offset);
        async move {
            match res {
                Ok(rx) => rx.await.unwrap_or(Err(LogError::Closed)),
                Err(e) => Err(e),
            }
        }
    }

    fn enqueue_reset(
        &self,
        last: LogId,
        next_offset: u64,
    ) -> Result<oneshot::Receiver<Result<(), LogError>>, LogError> {
        if last.index == 0 {
            return Err(LogError::InvalidEntry {
                index: 0,
                reason: "a reset needs a last log id with index >= 1".into(),
            });
        }
        let mut enq = lock(&self.inner.enq);
        if self.inner.failed.load(Ordering::Acquire) {
            return Err(LogError::Failed);
        }
        if enq.tx.is_none() {
            return Err(LogError::Closed);
        }
        enq.pos = LogPosition {
            last_index: last.index,
            last_log_id: Some(last),
            next_offset,
        };
        // Nothing before the reset can be truncated back to any more.
        enq.inflight.clear();
        let (tx, rx) = oneshot::channel();
        let req = writer::Request::Reset(writer::ResetReq {
            epoch: enq.epoch,
            last,
            next_offset,
            tx,
        });
        match enq.tx.as_ref().map(|t| t.send(req)) {
            Some(Ok(())) => Ok(rx),
            _ => Err(LogError::Closed),
        }
    }

    fn delete_oldest(&self, mut pred: impl FnMut(&Segment, u64) -> bool) -> Result<u64, LogError> {
        let _removal = lock(&self.inner.removal);
        let removed: Vec<Segment> = {
            let mut s = self.inner.segs_mut();
            let mut total: u64 = s.list.iter().map(|g| g.meta.len).sum();
            let mut out = Vec::new();
            // Bounded by the segment count; the last (active) one always stays.
            while s.list.len() > 1 {
                let go = s.list.front().is_some_and(|f| f.sealed && pred(f, total));
                if !go {
                    break;
                }
                if let Some(seg) = s.list.pop_front() {
                    total -= seg.meta.len;
                    out.push(seg);
                }
            }
            if let Some(first) = s.first().map(|g| g.meta.base_index) {
                s.tail.purge_before(first);
            }
            out
        };
        // Oldest first, so a crash part-way leaves a contiguous suffix.
        // Readers holding the file keep reading the unlinked inode.
        for seg in &removed {
            disk::remove_if_exists(&seg.path)?;
            disk::remove_if_exists(&disk::idx_path(&self.inner.dir, seg.meta.base_index))?;
        }
        if !removed.is_empty() {
            disk::fsync_dir(&self.inner.dir)?;
            tracing::debug!(dir = %self.inner.dir.display(), segments = removed.len(), "deleted old segments");
        }
        Ok(removed.len() as u64)
    }

    /// Cursor at the first entry whose offsets contain `offset`, or the first
    /// entry with `base_offset >= offset`; at the end when `offset` is the
    /// flushed next offset.
    pub fn seek_offset(&self, offset: u64) -> Result<Cursor, LogError> {
        let s = self.inner.segs();
        if offset < s.start_offset() || offset > s.next_offset() {
            return Err(s.out_of_range(offset));
        }
        // The predicate is monotone over entries (offsets never decrease).
        let hit = |base: u64, next: u64| next > offset || base >= offset;
        let i = s.list.partition_point(|g| {
            g.meta.last.is_none() || !hit(g.meta.last_base_offset(), g.meta.next_offset())
        });
        let Some(seg) = s.list.get(i) else {
            return Ok(end_cursor(&s));
        };
        let k = seg.index.partition_point(|e| e.offset < offset);
        let from = k.checked_sub(1).map(|k| seg.index[k]);
        let (file, path, meta) = (seg.file.clone(), seg.path.clone(), seg.meta);
        drop(s);
        let start = from.map_or((SEG_HEADER_BYTES, meta.base_index, meta.base_offset), |e| {
            (e.pos, e.index, e.offset)
        });
        let end = disk::scan_headers(&file, &path, start.0, meta.len, |h| {
            hit(h.base_offset, h.next_offset())
        })?;
        Ok(cursor_at(&meta, start, &end))
    }

    /// Cursor at the first entry with `timestamp_ms >= ts_ms` (end cursor if none).
    pub fn seek_timestamp(&self, ts_ms: i64) -> Result<Cursor, LogError> {
        let s = self.inner.segs();
        let i = s
            .list
            .partition_point(|g| g.meta.last.is_none() || g.meta.last_ts() < ts_ms);
        let Some(seg) = s.list.get(i) else {
            return Ok(end_cursor(&s));
        };
        let k = seg.index.partition_point(|e| e.ts < ts_ms);
        let from = k.checked_sub(1).map(|k| seg.index[k]);
        let (file, path, meta) = (seg.file.clone(), seg.path.clone(), seg.meta);
        drop(s);
        let start = from.map_or((SEG_HEADER_BYTES, meta.base_index, meta.base_offset), |e| {
            (e.pos, e.index, e.offset)
        });
        let end = disk::scan_headers(&file, &path, start.0, meta.len, |h| h.timestamp_ms >= ts_ms)?;
        Ok(cursor_at(&meta, start, &end))
    }

    /// Reads the entry at the cursor if its log index is <= `max_index`, and
    /// advances. `Ok(None)`: nothing visible at the cursor yet.
    pub fn read(
        &self,
        cursor: &mut Cursor,
        max_index: u64,
    ) -> Result<Option<StoredBatch>, LogError> {
        // Each round either returns or moves the cursor to the next segment
        // or re-locates it once after a truncation.
        let mut relocated = false;
        loop {
            if cursor.next_index > max_index {
                return Ok(None);
            }
            let (file, path, len, truncations) = {
                let s = self.inner.segs();
                if let Some(b) = read_tail(&s.tail, cursor) {
                    return Ok(Some(b));
                }
                let Some(i) = s.find_base(cursor.seg) else {
                    let first = s.first().map_or(1, |g| g.meta.base_index);
                    if cursor.seg < first || relocated {
                        return Err(s.out_of_range(cursor.next_offset));
                    }
                    drop(s);
                    // Its segment was removed by a truncation: find the index again.
                    *cursor = self.locate_index(cursor.next_index, cursor.next_offset)?;
                    relocated = true;
                    continue;
                };
                let seg = &s.list[i];
                if cursor.pos >= seg.meta.len {
                    match s.list.get(i + 1) {
                        Some(next) if seg.sealed && cursor.pos == seg.meta.len => {
                            *cursor = Cursor {
                                seg: next.meta.base_index,
                                pos: SEG_HEADER_BYTES,
                                next_index: next.meta.base_index,
                                next_offset: next.meta.base_offset,
                            };
                            continue;
                        }
                        _ => return Ok(None),
                    }
                }
                (
                    seg.file.clone(),
                    seg.path.clone(),
                    seg.meta.len,
                    s.truncations,
                )
            };
            match read_record(&file, &path, cursor.pos, len, Some(cursor.next_index)) {
                Ok(b) => {
                    cursor.pos += b.record_len();
                    cursor.next_index += 1;
                    cursor.next_offset = b.header.next_offset();
                    return Ok(Some(b));
                }
                Err(e) => {
                    // Changed bytes after a concurrent truncation are a race, not corruption.
                    if relocated || self.inner.segs().truncations == truncations {
                        return Err(e);
                    }
                    *cursor = self.locate_index(cursor.next_index, cursor.next_offset)?;
                    relocated = true;
                }
            }
        }
    }

    /// [`PartitionLog::read`] from the tail cache only: it never touches a
    /// file, so an async task may call it where `read` belongs on a
    /// blocking thread. A subscriber that keeps up is served here. It takes
    /// the segment lock for reading; only a truncation or a reset (leader
    /// changes, snapshot installs: rare) holds it across file operations.
    pub fn read_cached(&self, cursor: &mut Cursor, max_index: u64) -> CachedRead {
        if cursor.next_index > max_index {
            return CachedRead::NotVisible;
        }
        match read_tail(&self.inner.segs().tail, cursor) {
            Some(b) => CachedRead::Hit(b),
            None => CachedRead::Miss,
        }
    }

    /// Reads one entry by log index (None if not retained or not yet flushed).
    pub fn entry(&self, index: u64) -> Result<Option<StoredBatch>, LogError> {
        if let Some(c) = self.inner.segs().tail.get(index) {
            return Ok(Some(StoredBatch::from_cache(c)));
        }
        let Some(Located {
            file,
            path,
            pos,
            len,
        }) = self.find_entry(index)?
        else {
            return Ok(None);
        };
        read_record(&file, &path, pos, len, Some(index)).map(Some)
    }

    fn entry_header(&self, index: u64) -> Result<Option<BatchHeader>, LogError> {
        Ok(self.entry(index)?.map(|b| b.header))
    }

    /// File, path, position and readable length of entry `index`.
    fn find_entry(&self, index: u64) -> Result<Option<Located>, LogError> {
        let s = self.inner.segs();
        let Some(seg) = s.find_index(index).map(|i| &s.list[i]) else {
            return Ok(None);
        };
        if index > seg.meta.last_index() {
            return Ok(None);
        }
        let k = seg.index.partition_point(|e| e.index <= index);
        let from = k
            .checked_sub(1)
            .map_or(SEG_HEADER_BYTES, |k| seg.index[k].pos);
        let (file, path, len) = (seg.file.clone(), seg.path.clone(), seg.meta.len);
        drop(s);
        let end = disk::scan_headers(&file, &path, from, len, |h| h.log_id.index >= index)?;
        match end.found {
            Some(h) if h.log_id.index == index => Ok(Some(Located {
                file,
                path,
                pos: end.pos,
                len,
            })),
            _ => Err(LogError::Corrupt {
                path,
                position: end.pos,
                reason: format!("entry {index} is not where the segment's index says"),
            }),
        }
    }

    /// Cursor at entry `index` (or the end); OffsetOutOfRange when it is not retained.
    fn locate_index(&self, index: u64, offset_hint: u64) -> Result<Cursor, LogError> {
        let s = self.inner.segs();
        let pos = s.position();
        let first = s.first().map_or(1, |g| g.meta.base_index);
        if index < first || index > pos.last_index + 1 {
            return Err(s.out_of_range(offset_hint));
        }
        if index == pos.last_index + 1 {
            return Ok(end_cursor(&s));
        }
        drop(s);
        match self.find_entry(index)? {
            Some(Located {
                file,
                path,
                pos: p,
                len,
            }) => {
                let b = read_record(&file, &path, p, len, Some(index))?;
                let s = self.inner.segs();
                let seg = s
                    .find_index(index)
                    .map_or(first, |i| s.list[i].meta.base_index);
                Ok(Cursor {
                    seg,
                    pos: p,
                    next_index: index,
                    next_offset: b.header.base_offset,
                })
            }
            None => Err(self.inner.segs().out_of_range(offset_hint)),
        }
    }

    /// Stops the writer after it drained queued requests. Idempotent; blocks.
    pub fn close(&self) {
        // Dropping the sender ends the writer's loop once the queue is empty.
        lock(&self.inner.enq).tx = None;
        let handle = lock(&self.writer).take();
        if let Some(h) = handle {
            if h.thread().id() == std::thread::current().id() {
                // Dropped from its own writer thread (a completion that held
                // the last reference): joining here would wait forever. It
                // stops by itself once the queue is empty; the directory
                // stays locked until then.
                tracing::error!(dir = %self.inner.dir.display(), "partition log closed from its own writer thread");
                let dir_lock = lock(&self.dir_lock).take();
                let _ = std::thread::Builder::new()
                    .name("arrowbus-log-closer".into())
                    .spawn(move || {
                        let _ = h.join();
                        drop(dir_lock);
                    });
                return;
            }
            if h.join().is_err() {
                tracing::error!(dir = %self.inner.dir.display(), "partition log writer panicked");
            }
        }
        // Nothing writes any more: the directory may be opened again.
        lock(&self.dir_lock).take();
    }
}

/// The lock file of a partition log directory.
const LOCK_FILE: &str = "LOCK";

/// Take an exclusive `flock` on `DIR/LOCK` without waiting. flock locks
/// belong to an open file description, so a second `open` of the same
/// directory fails whether it comes from another process or from this one;
/// the kernel drops the lock when the holder exits, even on kill -9.
fn lock_dir(dir: &Path) -> Result<File, LogError> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| disk::io_err("open", &path, e))?;
    // SAFETY: flock takes a file descriptor and flags and touches no
    // memory; the descriptor is open and owned by `f` for the call.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(f);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(LogError::Locked {
            path: dir.to_owned(),
        })
    } else {
        Err(disk::io_err("lock", &path, e))
    }
}

/// Where one entry is: its segment's file, the record position and the
/// segment's readable length.
struct Located {
    file: Arc<File>,
    path: PathBuf,
    pos: u64,
    len: u64,
}

fn end_cursor(s: &Segs) -> Cursor {
    s.last().map_or(
        Cursor {
            seg: 1,
            pos: SEG_HEADER_BYTES,
            next_index: 1,
            next_offset: 0,
        },
        |g| Cursor {
            seg: g.meta.base_index,
            pos: g.meta.len,
            next_index: g.meta.last_index() + 1,
            next_offset: g.meta.next_offset(),
        },
    )
}

/// The cursor a header scan ended at (start = where the scan began).
fn cursor_at(meta: &SegMeta, start: (u64, u64, u64), end: &disk::ScanEnd) -> Cursor {
    let (next_index, next_offset) = match (end.found, end.prev) {
        (Some(h), _) => (h.log_id.index, h.base_offset),
        (None, Some((p, _))) => (p.log_id.index + 1, p.next_offset()),
        (None, None) => (start.1, start.2),
    };
    Cursor {
        seg: meta.base_index,
        pos: end.pos,
        next_index,
        next_offset,
    }
}

/// Reads and verifies one whole record at `pos` (within the readable `len`).
fn read_record(
    file: &File,
    path: &Path,
    pos: u64,
    len: u64,
    want_index: Option<u64>,
) -> Result<StoredBatch, LogError> {
    let corrupt = |reason: String| LogError::Corrupt {
        path: path.to_owned(),
        position: pos,
        reason,
    };
    let hb = BATCH_HEADER_BYTES as u64;
    if pos + hb > len {
        return Err(corrupt("record header past the flushed end".into()));
    }
    let mut head = [0u8; BATCH_HEADER_BYTES];
    file.read_exact_at(&mut head, pos)
        .map_err(|e| disk::io_err("read", path, e))?;
    let h = BatchHeader::decode(&head).map_err(|e| corrupt(e.to_string()))?;
    if let Some(want) = want_index {
        if h.log_id.index != want {
            return Err(corrupt(format!(
                "entry {} where {want} was expected",
                h.log_id.index
            )));
        }
    }
    if h.body_len > MAX_ENTRY_BODY_BYTES || pos + h.record_len() > len {
        return Err(corrupt(format!(
            "body length {} runs past the flushed end",
            h.body_len
        )));
    }
    let mut body = vec![0u8; h.body_len as usize];
    file.read_exact_at(&mut body, pos + hb)
        .map_err(|e| disk::io_err("read", path, e))?;
    h.verify_body(&body).map_err(|e| corrupt(e.to_string()))?;
    Ok(StoredBatch {
        header: h,
        encoded: head,
        body: Bytes::from(body),
    })
}

/// Retention's predicate over the oldest segments: more than
/// `retention_bytes` in total, or newest entry older than the horizon.
fn retention_pred(
    now_ms: i64,
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
) -> impl FnMut(&Segment, u64) -> bool {
    let horizon =
        retention_ms.map(|ms| now_ms.saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX)));
    move |seg: &Segment, total: u64| {
        retention_bytes.is_some_and(|b| total > b)
            || horizon.is_some_and(|h| seg.meta.last_ts() < h)
    }
}

/// Deletes every segment and index file in `dir` and creates the empty
/// segment `meta` in their place (durably). Idempotent, so recovery can
/// repeat it after a crash part-way.
fn replace_all_segments(dir: &Path, meta: &SegMeta) -> Result<(PathBuf, File), LogError> {
    let rd = std::fs::read_dir(dir).map_err(|e| disk::io_err("list", dir, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| disk::io_err("list", dir, e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if parse_name(name, ".seg").is_some() || parse_name(name, ".idx").is_some() {
            disk::remove_if_exists(&ent.path())?;
        }
    }
    // Its directory fsync also makes the deletions durable.
    create_segment(dir, meta)
}

/// Finishes a reset that a crash interrupted (module doc, "Reset"): with a
/// durable marker, the new empty log is what was decided.
fn complete_reset(dir: &Path) -> Result<(), LogError> {
    let marker = disk::reset_marker_path(dir);
    let Some(meta) = disk::read_reset_marker(&marker)? else {
        return Ok(());
    };
    tracing::warn!(dir = %dir.display(), base_index = meta.base_index, base_offset = meta.base_offset,
        "finishing an interrupted log reset (snapshot install)");
    replace_all_segments(dir, &meta)?;
    disk::remove_if_exists(&marker)?;
    disk::fsync_dir(dir)
}

fn open_rw(path: &Path) -> Result<File, LogError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| disk::io_err("open", path, e))
}

/// Writes a new, empty segment durably: tmp file, fsync, rename, dir fsync.
fn create_segment(dir: &Path, meta: &SegMeta) -> Result<(PathBuf, File), LogError> {
    let path = disk::seg_path(dir, meta.base_index);
    let tmp = disk::tmp_path(&path);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| disk::write_err("create", &tmp, e))?;
    let res = f
        .write_all_at(&disk::encode_seg_header(meta), 0)
        .map_err(|e| disk::write_err("write", &tmp, e))
        .and_then(|()| f.sync_all().map_err(|e| disk::io_err("fsync", &tmp, e)))
        .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| disk::write_err("rename", &tmp, e)))
        .and_then(|()| disk::fsync_dir(dir));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok((path, f))
}

/// Writes a sealed segment's `.idx` durably (tmp, fsync, rename; the caller
/// fsyncs the directory).
fn write_idx(dir: &Path, meta: &SegMeta, index: &[IndexEntry]) -> Result<(), LogError> {
    let path = disk::idx_path(dir, meta.base_index);
    disk::replace_file(&path, &disk::encode_idx(meta, index))
}

/// Recovery (module doc): verify and load every segment, cut a torn tail.
fn recover(dir: &Path, cfg: &LogConfig) -> Result<(VecDeque<Segment>, RecoveryReport), LogError> {
    let mut report = RecoveryReport::default();
    complete_reset(dir)?;
    let mut bases = Vec::new();
    let mut idxs = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| disk::io_err("list", dir, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| disk::io_err("list", dir, e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") {
            disk::remove_if_exists(&ent.path())?;
        } else if let Some(b) = parse_name(name, ".seg") {
            bases.push(b);
        } else if let Some(b) = parse_name(name, ".idx") {
            idxs.push(b);
        }
    }
    bases.sort_unstable();
    // An index without its segment is left over from a deletion.
    for b in idxs.iter().filter(|b| bases.binary_search(b).is_err()) {
        disk::remove_if_exists(&disk::idx_path(dir, *b))?;
    }
    if bases.is_empty() {
        let meta = SegMeta::empty(1, 0, None);
        let (path, f) = create_segment(dir, &meta)?;
        let mut list = VecDeque::new();
        list.push_back(Segment {
            meta,
            path,
            file: Arc::new(f),
            index: Vec::new(),
            sealed: false,
        });
        report.segments = 1;
        return Ok((list, report));
    }
    let mut list: VecDeque<Segment> = VecDeque::with_capacity(bases.len());
    let n = bases.len();
    for (i, &base) in bases.iter().enumerate() {
        let path = disk::seg_path(dir, base);
        let file = open_rw(&path)?;
        let file_len = file
            .metadata()
            .map_err(|e| disk::io_err("stat", &path, e))?
            .len();
        let corrupt = |position: u64, reason: String| LogError::Corrupt {
            path: path.clone(),
            position,
            reason,
        };
        let mut hb = [0u8; SEG_HEADER_BYTES as usize];
        if file_len < SEG_HEADER_BYTES {
            return Err(corrupt(
                0,
                format!("segment file is {file_len} bytes, shorter than its header"),
            ));
        }
        file.read_exact_at(&mut hb, 0)
            .map_err(|e| disk::io_err("read", &path, e))?;
        let header = disk::decode_seg_header(&hb).map_err(|r| corrupt(0, r))?;
        if header.base_index != base {
            return Err(corrupt(
                0,
                format!(
                    "header says base index {}, file name {base}",
                    header.base_index
                ),
            ));
        }
        if let Some(prev) = list.back() {
            let p = prev.meta;
            if header.base_index != p.last_index() + 1
                || header.base_offset != p.next_offset()
                || header.prev != p.last_log_id()
            {
                return Err(corrupt(
                    0,
                    format!(
                        "segment starts at index {} offset {} but the previous one ends at index {} offset {}",
                        header.base_index,
                        header.base_offset,
                        p.last_index(),
                        p.next_offset()
                    ),
                ));
            }
        }
        let idx_path = disk::idx_path(dir, base);
        let last = i + 1 == n;
        let (meta, index) = if !last {
            match disk::load_idx(&idx_path, &header, &file, file_len) {
                Some(loaded) => loaded,
                None => {
                    let w = disk::walk_segment(
                        &file,
                        &path,
                        header,
                        file_len,
                        cfg.index_interval_bytes,
                    )?;
                    if let Some(stop) = w.stop {
                        return Err(corrupt(stop.pos, stop.reason));
                    }
                    write_idx(dir, &w.meta, &w.index)?;
                    report.rebuilt_indexes += 1;
                    tracing::warn!(segment = %path.display(), "rebuilt missing or invalid sparse index");
                    (w.meta, w.index)
                }
            }
        } else {
            // The active segment's index lives in memory; a stale file from
            // an interrupted truncation or roll must not be trusted later.
            disk::remove_if_exists(&idx_path)?;
            let w = disk::walk_segment(&file, &path, header, file_len, cfg.index_interval_bytes)?;
            if let Some(stop) = w
                .stop
                .as_ref()
                .filter(|s| !is_direct_padding(&file, &path, s.pos, file_len).unwrap_or(false))
            {
                let tail = file_len - stop.pos;
                // A torn write only affects the last, unsynced group, which is at
                // most max_group_bytes. A longer tail with a valid record after
                // the bad one means acknowledged data is damaged.
                let window = match cfg.fsync {
                    FsyncPolicy::Always => cfg.max_group_bytes,
                    FsyncPolicy::Interval(_) => u64::MAX,
                };
                if tail > window {
                    let want = w.meta.last_index() + 1;
                    if let Some(at) =
                        disk::later_record_exists(&file, &path, stop.pos + 1, file_len, want)?
                    {
                        return Err(corrupt(
                            stop.pos,
                            format!("{} (a valid later record at byte {at} shows this is not a torn tail)", stop.reason),
                        ));
                    }
                }
                tracing::warn!(segment = %path.display(), position = stop.pos, bytes = tail,
                    reason = %stop.reason, "cutting torn tail");
                file.set_len(stop.pos)
                    .map_err(|e| disk::io_err("truncate", &path, e))?;
                file.sync_all()
                    .map_err(|e| disk::io_err("fsync", &path, e))?;
                report.truncated_bytes = tail;
            } else if let Some(stop) = &w.stop {
                // Only the zero padding of the last direct write (module
                // `direct`): nothing was torn.
                tracing::debug!(segment = %path.display(), position = stop.pos,
                    bytes = file_len - stop.pos, "cutting direct-write padding");
                file.set_len(stop.pos)
                    .map_err(|e| disk::io_err("truncate", &path, e))?;
                file.sync_all()
                    .map_err(|e| disk::io_err("fsync", &path, e))?;
            }
            (w.meta, w.index)
        };
        report.entries += meta.entries();
        list.push_back(Segment {
            meta,
            path,
            file: Arc::new(file),
            index,
            sealed: !last,
        });
    }
    report.segments = list.len();
    Ok((list, report))
}

/// Is `from..file_len` the zero padding a direct write leaves after the
/// last record: shorter than one alignment block, ending on a block
/// boundary, all zeros?
fn is_direct_padding(file: &File, path: &Path, from: u64, file_len: u64) -> Result<bool, LogError> {
    let align = direct::DIRECT_ALIGN as u64;
    if file_len - from >= align || !file_len.is_multiple_of(align) {
        return Ok(false);
    }
    let mut tail = vec![0u8; (file_len - from) as usize];
    file.read_exact_at(&mut tail, from)
        .map_err(|e| disk::io_err("read", path, e))?;
    Ok(tail.iter().all(|b| *b == 0))
}

fn parse_name(name: &str, ext: &str) -> Option<u64> {
    let stem = name.strip_suffix(ext)?;
    (stem.len() == 20 && stem.bytes().all(|c| c.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}
