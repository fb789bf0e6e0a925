//! The one writer of a partition log: a dedicated thread that drains the
//! request channel, writes groups of appends with positioned writes, makes
//! each group durable with one `fdatasync`, publishes it to readers, and only
//! then completes the tickets. Truncations go through the same thread, so they
//! are ordered with appends. It must never complete a ticket or publish a
//! position for bytes that are not durable (with `FsyncPolicy::Always`), and
//! never write again after an fsync failed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Instant;

use arrowbus_wire::{BatchHeader, BATCH_HEADER_BYTES};
use bytes::Bytes;
use tokio::sync::oneshot;

use super::direct::Appender;
use super::disk::{self, IndexEntry, LastEntry, SegMeta, SEG_HEADER_BYTES};
use super::tail::{Cached, TAIL_IDLE_EXPIRY};
use super::{
    create_segment, lock, replace_all_segments, write_idx, Appended, FsyncPolicy, Inner, LogError,
    LogPosition, Segment, MAX_GROUP_REQUESTS,
};

/// Records of one group are copied into a buffer of this size and written
/// with one `pwrite` each time it fills: few syscalls for small batches, a
/// bounded copy for large ones (records larger than it are written directly).
const WRITE_BUFFER_BYTES: usize = 1024 * 1024;

pub(crate) struct Record {
    pub header: BatchHeader,
    pub encoded: [u8; BATCH_HEADER_BYTES],
    pub body: Bytes,
}

pub(crate) struct AppendReq {
    pub epoch: u64,
    pub seq: u64,
    pub bytes: u64,
    pub records: Vec<Record>,
    pub done: Durable,
}

/// What to do with an append's outcome, called on the writer thread once
/// its group is durable (or has failed). It must be quick and must not
/// block: the next group waits for it.
pub type OnDurable = Box<dyn FnOnce(Result<Vec<Appended>, LogError>) + Send>;

/// An append's completion, answered exactly once: by [`Durable::send`], or
/// with [`LogError::Closed`] when the request is dropped unanswered (the
/// writer stopped), so a waiter never hangs.
pub(crate) struct Durable(Option<OnDurable>);

impl Durable {
    pub fn new(f: OnDurable) -> Self {
        Self(Some(f))
    }

    pub fn send(mut self, res: Result<Vec<Appended>, LogError>) {
        if let Some(f) = self.0.take() {
            f(res);
        }
    }

    /// Forget the completion without calling it: the caller reports the
    /// failure itself.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(LogError::Closed));
        }
    }
}

pub(crate) struct TruncateReq {
    pub epoch: u64,
    pub index: u64,
    pub new_pos: LogPosition,
    pub tx: oneshot::Sender<Result<(), LogError>>,
}

pub(crate) struct ResetReq {
    pub epoch: u64,
    /// The log id the new, empty log ends at.
    pub last: arrowbus_wire::LogId,
    pub next_offset: u64,
    pub tx: oneshot::Sender<Result<(), LogError>>,
}

pub(crate) enum Request {
    Append(AppendReq),
    Truncate(TruncateReq),
    Reset(ResetReq),
}

/// How a group or truncation failed.
enum Fail {
    /// Nothing durable changed (or it was rolled back): the log keeps serving.
    Write(LogError),
    /// The on-disk state is unknown (an fsync failed, a rollback failed):
    /// the log refuses all further writes.
    Fatal(LogError),
}

/// A segment as the writer sees it, ahead of what readers see.
struct Pending {
    meta: SegMeta,
    path: PathBuf,
    file: Arc<File>,
    /// Index points written since the last publish.
    new_index: Vec<IndexEntry>,
    /// Position of the newest index point (published or not).
    last_indexed: Option<u64>,
    sealed: bool,
}

struct Writer {
    inner: Arc<Inner>,
    rx: Receiver<Request>,
    active: Pending,
    /// Segments sealed during the current group, oldest first. The first one
    /// is the segment that was active when the group started.
    rolled: Vec<Pending>,
    /// Buffered writes (no `O_DIRECT`): records staged here, written at
    /// `wbuf_pos` with one `pwrite` when it fills or the group ends.
    wbuf: Vec<u8>,
    wbuf_pos: u64,
    /// Direct writes (module `direct`), when configured and the file system
    /// takes them; `None`: the buffered path above.
    direct: Option<Appender>,
    /// Written but not fsynced (Interval policy).
    dirty: bool,
    last_sync: Instant,
    /// The current group's entries for the tail cache, added when the group
    /// is published.
    group_tail: Vec<Cached>,
    /// The tail cache holds entries; it is cleared once the log has been
    /// idle for `TAIL_IDLE_EXPIRY` after `last_publish`.
    tail_held: bool,
    last_publish: Instant,
}

pub(crate) fn spawn(
    inner: Arc<Inner>,
    rx: Receiver<Request>,
) -> Result<std::thread::JoinHandle<()>, LogError> {
    let active = {
        let s = inner.segs();
        let Some(last) = s.last() else {
            return Err(LogError::Corrupt {
                path: inner.dir.clone(),
                position: 0,
                reason: "no segment after recovery".into(),
            });
        };
        Pending {
            meta: last.meta,
            path: last.path.clone(),
            file: last.file.clone(),
            new_index: Vec::new(),
            last_indexed: last.index.last().map(|e| e.pos),
            sealed: false,
        }
    };
    let dir = inner.dir.clone();
    // Direct writes only pay off when every group is synced anyway; with an
    // fsync interval the page cache is what batches the writes.
    let direct =
        (inner.cfg.direct_io && inner.cfg.fsync == FsyncPolicy::Always).then(Appender::new);
    let w = Writer {
        inner,
        rx,
        active,
        rolled: Vec::new(),
        wbuf: Vec::with_capacity(WRITE_BUFFER_BYTES),
        wbuf_pos: 0,
        direct,
        dirty: false,
        last_sync: Instant::now(),
        group_tail: Vec::new(),
        tail_held: false,
        last_publish: Instant::now(),
    };
    std::thread::Builder::new()
        .name("arrowbus-log-writer".into())
        .spawn(move || w.run())
        .map_err(|e| disk::io_err("spawn writer thread for", &dir, e))
}

impl Writer {
    fn run(mut self) {
        let span = tracing::info_span!("log_writer", dir = %self.inner.dir.display());
        let _g = span.enter();
        let max = self.inner.cfg.max_group_bytes;
        let mut carry = None;
        // Ends when every sender is gone (close) and the queue is drained.
        loop {
            let first = match carry.take() {
                Some(r) => r,
                None => match self.next_request() {
                    Some(r) => r,
                    None => break,
                },
            };
            match first {
                Request::Truncate(t) => self.truncate(t),
                Request::Reset(r) => self.reset(r),
                Request::Append(a) => {
                    let mut bytes = a.bytes;
                    let mut group = vec![a];
                    while group.len() < MAX_GROUP_REQUESTS {
                        match self.rx.try_recv() {
                            Ok(Request::Append(a)) if bytes + a.bytes <= max => {
                                bytes += a.bytes;
                                group.push(a);
                            }
                            Ok(other) => {
                                carry = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.group(group);
                }
            }
        }
        if self.dirty {
            self.periodic_sync();
        }
    }

    fn next_request(&mut self) -> Option<Request> {
        // Bounded: each round either returns or does what was due (the
        // sync, the cache expiry), after which that deadline is gone; with
        // none left the next round blocks in recv.
        loop {
            let sync_due = match (self.inner.cfg.fsync, self.dirty) {
                (FsyncPolicy::Interval(iv), true) => Some(self.last_sync + iv),
                _ => None,
            };
            let expiry_due = self.tail_held.then(|| self.last_publish + TAIL_IDLE_EXPIRY);
            let Some(deadline) = sync_due.into_iter().chain(expiry_due).min() else {
                return self.rx.recv().ok();
            };
            let now = Instant::now();
            if now < deadline {
                match self.rx.recv_timeout(deadline - now) {
                    Ok(r) => return Some(r),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return None,
                }
            }
            let now = Instant::now();
            if sync_due.is_some_and(|d| now >= d) {
                self.periodic_sync();
            }
            if expiry_due.is_some_and(|d| now >= d) {
                self.inner.segs_mut().tail.clear();
                self.tail_held = false;
            }
        }
    }

    fn periodic_sync(&mut self) {
        if self.inner.failed.load(Ordering::Acquire) {
            self.dirty = false;
            return;
        }
        if let Err(e) = self.sync_active() {
            self.go_failed(&e);
        }
        self.dirty = false;
        self.last_sync = Instant::now();
    }

    fn sync_active(&self) -> Result<(), LogError> {
        self.inner.fsyncs.fetch_add(1, Ordering::AcqRel);
        self.active
            .file
            .sync_data()
            .map_err(|e| disk::io_err("fdatasync", &self.active.path, e))
    }

    fn go_failed(&self, e: &LogError) {
        self.inner.failed.store(true, Ordering::Release);
        tracing::error!(error = %e, "partition log failed: refusing all further writes; restart the node");
    }

    /// The error for a request that belongs to an aborted epoch, or None if current.
    fn stale(&self, epoch: u64) -> Option<LogError> {
        let enq = lock(&self.inner.enq);
        (enq.epoch != epoch).then(|| {
            enq.abort_reason
                .as_ref()
                .map_or(LogError::Failed, LogError::duplicate)
        })
    }

    fn group(&mut self, reqs: Vec<AppendReq>) {
        for r in &reqs {
            self.inner.queued_bytes.fetch_sub(r.bytes, Ordering::AcqRel);
            self.inner
                .queued_entries
                .fetch_sub(r.records.len() as u64, Ordering::AcqRel);
        }
        if self.inner.failed.load(Ordering::Acquire) {
            for r in reqs {
                r.done.send(Err(LogError::Failed));
            }
            return;
        }
        let mut live = Vec::with_capacity(reqs.len());
        for r in reqs {
            match self.stale(r.epoch) {
                Some(e) => {
                    r.done.send(Err(e));
                }
                None => live.push(r),
            }
        }
        if live.is_empty() {
            return;
        }
        let start = (self.active.meta, self.active.last_indexed);
        self.group_tail.clear();
        let mut results = Vec::with_capacity(live.len());
        let written = self.write_group(&live, &mut results);
        let durable = written.and_then(|()| match self.inner.cfg.fsync {
            FsyncPolicy::Always => self.sync_active().map_err(Fail::Fatal),
            FsyncPolicy::Interval(_) => {
                self.dirty = true;
                Ok(())
            }
        });
        match durable {
            Ok(()) => {}
            Err(Fail::Write(e)) => {
                if let Err(fatal) = self.rollback(start.0, start.1) {
                    self.go_failed(&fatal);
                    for r in live {
                        r.done.send(Err(LogError::Failed));
                    }
                    return;
                }
                self.abort_queue(&e, start.0);
                for r in live {
                    r.done.send(Err(e.duplicate()));
                }
                return;
            }
            Err(Fail::Fatal(e)) => {
                self.go_failed(&e);
                for r in live {
                    r.done.send(Err(LogError::Failed));
                }
                return;
            }
        }
        self.publish();
        let last_seq = live.last().map_or(0, |r| r.seq);
        {
            let mut enq = lock(&self.inner.enq);
            // Bounded by the queued-entries limit.
            while enq.inflight.front().is_some_and(|f| f.seq <= last_seq) {
                enq.inflight.pop_front();
            }
        }
        for (r, out) in live.into_iter().zip(results) {
            r.done.send(Ok(out));
        }
    }

    fn write_group(
        &mut self,
        live: &[AppendReq],
        results: &mut Vec<Vec<Appended>>,
    ) -> Result<(), Fail> {
        for r in live {
            let mut out = Vec::with_capacity(r.records.len());
            for rec in &r.records {
                self.write_record(rec)?;
                let h = &rec.header;
                out.push(Appended {
                    log_id: h.log_id,
                    base_offset: h.base_offset,
                    row_count: h.row_count,
                    timestamp_ms: h.timestamp_ms,
                });
            }
            results.push(out);
        }
        self.flush_wbuf()
    }

    fn write_record(&mut self, rec: &Record) -> Result<(), Fail> {
        let h = &rec.header;
        let m = self.active.meta;
        if h.log_id.index != m.last_index() + 1 || h.base_offset != m.next_offset() {
            // The enqueue side and the writer disagree: a bug. Refuse rather
            // than write a log that recovery would reject.
            tracing::error!(
                index = h.log_id.index,
                expected = m.last_index() + 1,
                offset = h.base_offset,
                expected_offset = m.next_offset(),
                "writer out of step"
            );
            return Err(Fail::Write(LogError::NonContiguous {
                expected: m.last_index() + 1,
                got: h.log_id.index,
            }));
        }
        let rec_len = h.record_len();
        if m.last.is_some() && m.len + rec_len > self.inner.cfg.segment_max_bytes {
            self.roll(h)?;
        }
        let pos = self.active.meta.len;
        let interval = self.inner.cfg.index_interval_bytes;
        if self.active.last_indexed.is_none_or(|p| pos - p >= interval) {
            self.active.new_index.push(IndexEntry {
                index: h.log_id.index,
                offset: h.base_offset,
                pos,
                ts: h.timestamp_ms,
            });
            self.active.last_indexed = Some(pos);
        }
        if self.stage_direct(rec, pos)? {
            // Staged for a direct write.
        } else if rec_len as usize > WRITE_BUFFER_BYTES {
            self.flush_wbuf()?;
            let f = &self.active.file;
            f.write_all_at(&rec.encoded, pos)
                .and_then(|()| f.write_all_at(&rec.body, pos + BATCH_HEADER_BYTES as u64))
                .map_err(|e| Fail::Write(disk::write_err("write", &self.active.path, e)))?;
        } else {
            if self.wbuf.len() + rec_len as usize > WRITE_BUFFER_BYTES {
                self.flush_wbuf()?;
            }
            if self.wbuf.is_empty() {
                self.wbuf_pos = pos;
            }
            self.wbuf.extend_from_slice(&rec.encoded);
            self.wbuf.extend_from_slice(&rec.body);
        }
        self.active.meta.push(h, pos);
        if self.inner.cfg.tail_cache_bytes > 0 {
            self.group_tail.push(Cached {
                header: *h,
                encoded: rec.encoded,
                body: rec.body.clone(),
                seg: self.active.meta.base_index,
                pos,
            });
        }
        Ok(())
    }

    /// Stage `rec` (at `pos`) on the direct path. `Ok(false)`: there is no
    /// direct path (not configured, or the file system refused `O_DIRECT`,
    /// which switches this log to buffered writes for good).
    fn stage_direct(&mut self, rec: &Record, pos: u64) -> Result<bool, Fail> {
        let Some(d) = self.direct.as_mut() else {
            return Ok(false);
        };
        let path = &self.active.path;
        let attached = d
            .attach(self.active.meta.base_index, path, &self.active.file, pos)
            .map_err(|e| Fail::Write(disk::write_err("open for direct writes", path, e)))?;
        if !attached {
            tracing::info!(dir = %self.inner.dir.display(),
                "the file system does not support O_DIRECT; the log writes through the page cache");
            self.direct = None;
            return Ok(false);
        }
        d.append(&rec.encoded)
            .and_then(|()| d.append(&rec.body))
            .map_err(|e| Fail::Write(disk::write_err("write", path, e)))?;
        Ok(true)
    }

    /// Drop what is staged for writing: the active segment is about to
    /// change other than by appending (roll, truncation, reset, rollback),
    /// so the direct path re-reads its partial block before the next write.
    fn discard_staged(&mut self) {
        self.wbuf.clear();
        if let Some(d) = self.direct.as_mut() {
            d.invalidate();
        }
    }

    fn flush_wbuf(&mut self) -> Result<(), Fail> {
        if let Some(d) = self.direct.as_mut() {
            return d
                .flush()
                .map_err(|e| Fail::Write(disk::write_err("write", &self.active.path, e)));
        }
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let res = self.active.file.write_all_at(&self.wbuf, self.wbuf_pos);
        self.wbuf.clear();
        res.map_err(|e| Fail::Write(disk::write_err("write", &self.active.path, e)))
    }

    /// Seals the active segment (fsync, `.idx`) and starts a new one whose
    /// first entry is `next`.
    fn roll(&mut self, next: &BatchHeader) -> Result<(), Fail> {
        self.flush_wbuf()?;
        if self.direct.is_some() {
            // A sealed segment ends at its last record: cut the direct
            // path's zero padding before the seal is made durable.
            self.discard_staged();
            self.active
                .file
                .set_len(self.active.meta.len)
                .map_err(|e| Fail::Write(disk::io_err("truncate", &self.active.path, e)))?;
        }
        self.sync_active().map_err(Fail::Fatal)?;
        let mut all = {
            let s = self.inner.segs();
            s.find_base(self.active.meta.base_index)
                .map(|i| s.list[i].index.clone())
                .unwrap_or_default()
        };
        all.extend_from_slice(&self.active.new_index);
        write_idx(&self.inner.dir, &self.active.meta, &all).map_err(Fail::Write)?;
        let meta = SegMeta::empty(
            next.log_id.index,
            next.base_offset,
            self.active.meta.last_log_id(),
        );
        // create_segment fsyncs the directory, which also makes the idx rename durable.
        let (path, file) = create_segment(&self.inner.dir, &meta).map_err(Fail::Write)?;
        let mut old = std::mem::replace(
            &mut self.active,
            Pending {
                meta,
                path,
                file: Arc::new(file),
                new_index: Vec::new(),
                last_indexed: None,
                sealed: false,
            },
        );
        old.sealed = true;
        self.rolled.push(old);
        tracing::debug!(
            base_index = meta.base_index,
            base_offset = meta.base_offset,
            "rolled segment"
        );
        Ok(())
    }

    /// Undoes a failed group: deletes segments it created, un-seals the one
    /// it started in and cuts that back to the group's start.
    fn rollback(&mut self, start: SegMeta, start_indexed: Option<u64>) -> Result<(), LogError> {
        self.discard_staged();
        self.group_tail.clear();
        let dir = self.inner.dir.clone();
        if !self.rolled.is_empty() {
            let created = std::mem::replace(&mut self.active, self.rolled.remove(0));
            // Newest first, so a crash part-way leaves a contiguous prefix.
            for p in self.rolled.drain(..).chain(std::iter::once(created)).rev() {
                disk::remove_if_exists(&p.path)?;
                disk::remove_if_exists(&disk::idx_path(&dir, p.meta.base_index))?;
            }
            disk::remove_if_exists(&disk::idx_path(&dir, self.active.meta.base_index))?;
        }
        self.active
            .file
            .set_len(start.len)
            .map_err(|e| disk::io_err("truncate", &self.active.path, e))?;
        disk::fsync_dir(&dir)?;
        self.active.meta = start;
        self.active.new_index.clear();
        self.active.last_indexed = start_indexed;
        self.active.sealed = false;
        Ok(())
    }

    /// After a rolled-back group: everything queued behind it fails too (it
    /// would leave a gap), and appends continue from the durable position.
    fn abort_queue(&self, e: &LogError, start: SegMeta) {
        let mut enq = lock(&self.inner.enq);
        enq.epoch += 1;
        enq.pos = LogPosition {
            last_index: start.last_index(),
            last_log_id: start.last_log_id(),
            next_offset: start.next_offset(),
        };
        enq.inflight.clear();
        enq.abort_reason = Some(e.duplicate());
        tracing::warn!(error = %e, last_index = enq.pos.last_index, "append group rolled back; queued appends aborted");
    }

    /// Makes the group visible to readers and moves the flushed position.
    fn publish(&mut self) {
        let pos = LogPosition {
            last_index: self.active.meta.last_index(),
            last_log_id: self.active.meta.last_log_id(),
            next_offset: self.active.meta.next_offset(),
        };
        {
            let mut s = self.inner.segs_mut();
            let rolled = std::mem::take(&mut self.rolled);
            let mut pending: Vec<&mut Pending> = Vec::with_capacity(rolled.len() + 1);
            let mut rolled = rolled;
            pending.extend(rolled.iter_mut());
            pending.push(&mut self.active);
            for p in pending {
                let published = s
                    .list
                    .back_mut()
                    .filter(|b| b.meta.base_index == p.meta.base_index);
                match published {
                    Some(b) => {
                        b.meta = p.meta;
                        b.index.append(&mut p.new_index);
                        b.sealed = p.sealed;
                    }
                    None => s.list.push_back(Segment {
                        meta: p.meta,
                        path: p.path.clone(),
                        file: p.file.clone(),
                        index: std::mem::take(&mut p.new_index),
                        sealed: p.sealed,
                    }),
                }
            }
            if !self.group_tail.is_empty() {
                for c in self.group_tail.drain(..) {
                    s.tail.push(c);
                }
                self.tail_held = !s.tail.is_empty();
                self.last_publish = Instant::now();
            }
        }
        self.inner.flushed_tx.send_replace(pos);
    }

    fn reset(&mut self, r: ResetReq) {
        if self.inner.failed.load(Ordering::Acquire) {
            let _ = r.tx.send(Err(LogError::Failed));
            return;
        }
        if let Some(e) = self.stale(r.epoch) {
            let _ = r.tx.send(Err(e));
            return;
        }
        let meta = SegMeta::empty(r.last.index + 1, r.next_offset, Some(r.last));
        self.discard_staged();
        // On failure part of the old log may be gone: only recovery (which
        // finishes the reset from the marker) knows the state now.
        let res = self.do_reset(meta).inspect_err(|e| self.go_failed(e));
        let _ = r.tx.send(res);
    }

    /// The reset itself (module doc of `log`, "Reset"): marker, delete,
    /// create, unmark. Readers are kept out (write lock) for its duration:
    /// it is rare and a few file operations long.
    fn do_reset(&mut self, meta: SegMeta) -> Result<(), LogError> {
        let dir = self.inner.dir.clone();
        let marker = disk::reset_marker_path(&dir);
        disk::replace_file(&marker, &disk::encode_seg_header(&meta))?;
        disk::fsync_dir(&dir)?;
        // From here a crash ends in the new log (recovery finishes it).
        let _removal = lock(&self.inner.removal);
        let mut s = self.inner.segs_mut();
        s.truncations += 1;
        s.list.clear();
        s.tail.clear();
        let (path, file) = replace_all_segments(&dir, &meta)?;
        disk::remove_if_exists(&marker)?;
        disk::fsync_dir(&dir)?;
        let file = Arc::new(file);
        s.list.push_back(Segment {
            meta,
            path: path.clone(),
            file: file.clone(),
            index: Vec::new(),
            sealed: false,
        });
        self.active = Pending {
            meta,
            path,
            file,
            new_index: Vec::new(),
            last_indexed: None,
            sealed: false,
        };
        let pos = s.position();
        drop(s);
        self.inner.flushed_tx.send_replace(pos);
        tracing::info!(
            base_index = meta.base_index,
            base_offset = meta.base_offset,
            "log reset: now empty after the snapshot position"
        );
        Ok(())
    }

    fn truncate(&mut self, t: TruncateReq) {
        if self.inner.failed.load(Ordering::Acquire) {
            let _ = t.tx.send(Err(LogError::Failed));
            return;
        }
        if let Some(e) = self.stale(t.epoch) {
            let _ = t.tx.send(Err(e));
            return;
        }
        self.discard_staged();
        let res = match self.do_truncate(t.index, t.new_pos) {
            Ok(()) => Ok(()),
            Err(Fail::Write(e)) => Err(e),
            Err(Fail::Fatal(e)) => {
                self.go_failed(&e);
                Err(e)
            }
        };
        let _ = t.tx.send(res);
    }

    fn do_truncate(&mut self, index: u64, new_pos: LogPosition) -> Result<(), Fail> {
        if index > self.active.meta.last_index() {
            // Nothing at or after `index` was written (it was all still queued
            // behind a truncation that already removed it).
            return Ok(());
        }
        let dir = self.inner.dir.clone();
        let fatal = Fail::Fatal;
        let mut s = self.inner.segs_mut();
        s.truncations += 1;
        s.tail.truncate_from(index);
        let first = s.first().map_or(1, |g| g.meta.base_index);
        if index < first {
            return Err(Fail::Write(LogError::IndexOutOfRange {
                requested: index,
                first,
                last: s.position().last_index,
            }));
        }
        let mut deleted = Vec::new();
        while s.list.len() > 1 && s.list.back().is_some_and(|g| g.meta.base_index >= index) {
            if let Some(g) = s.list.pop_back() {
                deleted.push(g);
            }
        }
        // Newest first: a crash part-way leaves a prefix, i.e. a partial truncation.
        for g in &deleted {
            disk::remove_if_exists(&g.path).map_err(fatal)?;
            disk::remove_if_exists(&disk::idx_path(&dir, g.meta.base_index)).map_err(fatal)?;
        }
        if !deleted.is_empty() {
            disk::fsync_dir(&dir).map_err(fatal)?;
        }
        let Some(seg) = s.list.back_mut() else {
            return Err(fatal(LogError::Corrupt {
                path: dir,
                position: 0,
                reason: "no segment left while truncating".into(),
            }));
        };
        let disagree = |path: &std::path::Path, position: u64, what: String| {
            Fail::Fatal(LogError::Corrupt {
                path: path.to_owned(),
                position,
                reason: format!("truncation at {index}: {what}"),
            })
        };
        if seg.meta.base_index >= index {
            // Everything retained goes: replace the segment by an empty one
            // with the same name (atomic rename) that remembers where it starts.
            if seg.meta.base_offset != new_pos.next_offset || seg.meta.prev != new_pos.last_log_id {
                return Err(disagree(
                    &seg.path,
                    0,
                    "segment start disagrees with the enqueued position".into(),
                ));
            }
            let meta = SegMeta::empty(index, seg.meta.base_offset, seg.meta.prev);
            disk::remove_if_exists(&disk::idx_path(&dir, seg.meta.base_index)).map_err(fatal)?;
            let (path, file) = create_segment(&dir, &meta).map_err(fatal)?;
            *seg = Segment {
                meta,
                path,
                file: Arc::new(file),
                index: Vec::new(),
                sealed: false,
            };
        } else if index == seg.meta.last_index() + 1 {
            // The cut is exactly at this segment's end: it stays whole and
            // becomes the active segment again.
            if seg.meta.next_offset() != new_pos.next_offset
                || seg.meta.last_log_id() != new_pos.last_log_id
            {
                return Err(disagree(
                    &seg.path,
                    seg.meta.len,
                    "segment end disagrees with the enqueued position".into(),
                ));
            }
            if seg.sealed {
                disk::remove_if_exists(&disk::idx_path(&dir, seg.meta.base_index))
                    .map_err(fatal)?;
                disk::fsync_dir(&dir).map_err(fatal)?;
            }
            seg.sealed = false;
        } else {
            let k = seg.index.partition_point(|e| e.index < index);
            let from = k
                .checked_sub(1)
                .map_or(SEG_HEADER_BYTES, |k| seg.index[k].pos);
            let end = disk::scan_headers(&seg.file, &seg.path, from, seg.meta.len, |h| {
                h.log_id.index >= index
            })
            .map_err(fatal)?;
            let (Some(found), Some((prev, prev_pos))) = (end.found, end.prev) else {
                return Err(disagree(
                    &seg.path,
                    end.pos,
                    "entry not found in its segment".into(),
                ));
            };
            if found.log_id.index != index
                || prev.next_offset() != new_pos.next_offset
                || Some(prev.log_id) != new_pos.last_log_id
            {
                return Err(disagree(
                    &seg.path,
                    end.pos,
                    "disk disagrees with the enqueued position".into(),
                ));
            }
            if seg.sealed {
                disk::remove_if_exists(&disk::idx_path(&dir, seg.meta.base_index))
                    .map_err(fatal)?;
                disk::fsync_dir(&dir).map_err(fatal)?;
            }
            seg.file
                .set_len(end.pos)
                .map_err(|e| fatal(disk::io_err("truncate", &seg.path, e)))?;
            self.inner.fsyncs.fetch_add(1, Ordering::AcqRel);
            seg.file
                .sync_data()
                .map_err(|e| fatal(disk::io_err("fdatasync", &seg.path, e)))?;
            seg.meta.len = end.pos;
            seg.meta.last = Some(LastEntry {
                log_id: prev.log_id,
                base_offset: prev.base_offset,
                next_offset: prev.next_offset(),
                ts: prev.timestamp_ms,
                pos: prev_pos,
            });
            seg.index.retain(|e| e.index < index);
            seg.sealed = false;
        }
        self.active = Pending {
            meta: seg.meta,
            path: seg.path.clone(),
            file: seg.file.clone(),
            new_index: Vec::new(),
            last_indexed: seg.index.last().map(|e| e.pos),
            sealed: false,
        };
        let pos = s.position();
        drop(s);
        self.inner.flushed_tx.send_replace(pos);
        tracing::debug!(index, last_index = pos.last_index, "truncated log suffix");
        Ok(())
    }
}
