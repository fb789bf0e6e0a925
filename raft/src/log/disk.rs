//! On-disk formats of the partition log (segment header, sparse index file)
//! and the record walk shared by recovery, index rebuild and seeks. Pure
//! positioned reads: nothing here writes records or holds locks.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use arrowbus_wire::{BatchHeader, LogId, BATCH_HEADER_BYTES};

use super::LogError;

/// Size of the fixed segment file header.
pub(crate) const SEG_HEADER_BYTES: u64 = 48;
/// Segment magic; the last byte is the segment format version.
const SEG_MAGIC: [u8; 8] = *b"ABSEG\0\0\x01";
/// Sparse index magic; the last byte is the index format version.
const IDX_MAGIC: [u8; 8] = *b"ABIDX\0\0\x01";
/// Fixed part of an `.idx` file before its entries.
const IDX_FIXED_BYTES: usize = 96;
/// Bytes per sparse index entry (index, offset, position, timestamp).
const IDX_ENTRY_BYTES: usize = 32;
/// Trailing CRC32C of an `.idx` file.
const IDX_CRC_BYTES: usize = 4;
/// Largest `.idx` file we read: 64 MiB holds 2 Mi entries, i.e. a 128 GiB
/// segment at 64 KiB density; anything larger is not ours and is rebuilt.
const MAX_IDX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Largest body the log stores or reads back. Checked before allocating a
/// record buffer, so a corrupt length can never make us allocate gigabytes.
/// Batches are bounded by the wire limit; Raft-internal entries are tiny.
pub const MAX_ENTRY_BODY_BYTES: u32 = arrowbus_wire::limits::MAX_BODY_BYTES;

/// Read-ahead of sequential walks (recovery, index rebuild, seek scans):
/// 1 MiB turns a walk over small records into few syscalls while keeping the
/// buffer small next to a segment.
pub(crate) const WALK_BUFFER_BYTES: usize = 1024 * 1024;
/// Read-ahead of the short scans after a sparse-index lookup: about one index
/// interval's worth of headers.
pub(crate) const SEEK_BUFFER_BYTES: usize = 64 * 1024;

pub(crate) fn seg_path(dir: &Path, base_index: u64) -> PathBuf {
    dir.join(format!("{base_index:020}.seg"))
}

pub(crate) fn idx_path(dir: &Path, base_index: u64) -> PathBuf {
    dir.join(format!("{base_index:020}.idx"))
}

/// Replace `path` with `bytes` so that a crash leaves the old file or the
/// new one: write a temporary beside it, fsync it, rename it over. The
/// caller fsyncs the directory when the rename itself must be durable. A
/// failed attempt removes its temporary.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    let tmp = tmp_path(path);
    let res = std::fs::write(&tmp, bytes)
        .map_err(|e| write_err("write", &tmp, e))
        .and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err("fsync", &tmp, e))
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| write_err("rename", &tmp, e)));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

pub(crate) fn tmp_path(final_path: &Path) -> PathBuf {
    let mut s = final_path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

pub(crate) fn io_err(op: &'static str, path: &Path, source: io::Error) -> LogError {
    LogError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// ENOSPC / EDQUOT: the disk (or quota) is full — recoverable by rolling back.
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Maps a write-side error: disk full is its own, recoverable, class.
pub(crate) fn write_err(op: &'static str, path: &Path, e: io::Error) -> LogError {
    if is_disk_full(&e) {
        LogError::DiskFull {
            path: path.to_owned(),
        }
    } else {
        io_err(op, path, e)
    }
}

/// Makes creations, renames and deletions in `dir` durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), LogError> {
    let d = File::open(dir).map_err(|e| io_err("open directory", dir, e))?;
    d.sync_all().map_err(|e| io_err("fsync directory", dir, e))
}

/// Removes a file; a file that is already gone is fine (idempotent cleanup).
pub(crate) fn remove_if_exists(path: &Path) -> Result<(), LogError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path, e)),
    }
}

/// One sparse index point: the record at `pos` is entry `index`, starts at
/// `offset` and was appended at `ts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub index: u64,
    pub offset: u64,
    pub pos: u64,
    pub ts: i64,
}

/// The last entry of a segment: what the next segment and readers continue from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LastEntry {
    pub log_id: LogId,
    pub base_offset: u64,
    pub next_offset: u64,
    pub ts: i64,
    pub pos: u64,
}

/// What a segment holds, in a few words: no per-batch state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegMeta {
    /// Index of the first entry this segment holds (or will hold). Never 0.
    pub base_index: u64,
    /// Offset of the first entry.
    pub base_offset: u64,
    /// Log id of entry `base_index - 1` (None only for index 1): lets an empty
    /// log still report its last log id after a truncation.
    pub prev: Option<LogId>,
    /// Bytes of the file that hold whole, valid records (header included).
    pub len: u64,
    pub last: Option<LastEntry>,
}

impl SegMeta {
    pub fn empty(base_index: u64, base_offset: u64, prev: Option<LogId>) -> Self {
        Self {
            base_index,
            base_offset,
            prev,
            len: SEG_HEADER_BYTES,
            last: None,
        }
    }
    pub fn last_index(&self) -> u64 {
        self.last
            .map_or(self.base_index.saturating_sub(1), |l| l.log_id.index)
    }
    pub fn next_offset(&self) -> u64 {
        self.last.map_or(self.base_offset, |l| l.next_offset)
    }
    pub fn last_log_id(&self) -> Option<LogId> {
        self.last.map(|l| l.log_id).or(self.prev)
    }
    pub fn entries(&self) -> u64 {
        (self.last_index() + 1).saturating_sub(self.base_index)
    }
    /// Base offset of the newest entry, or the segment base when empty.
    pub fn last_base_offset(&self) -> u64 {
        self.last.map_or(self.base_offset, |l| l.base_offset)
    }
    /// Newest timestamp; `i64::MIN` when empty (an empty sealed segment is
    /// older than any retention horizon).
    pub fn last_ts(&self) -> i64 {
        self.last.map_or(i64::MIN, |l| l.ts)
    }
    /// Accounts one record written at `pos`.
    pub fn push(&mut self, h: &BatchHeader, pos: u64) {
        self.last = Some(LastEntry {
            log_id: h.log_id,
            base_offset: h.base_offset,
            next_offset: h.next_offset(),
            ts: h.timestamp_ms,
            pos,
        });
        self.len = pos + h.record_len();
    }
}

pub(crate) fn encode_seg_header(m: &SegMeta) -> [u8; SEG_HEADER_BYTES as usize] {
    let mut b = [0u8; SEG_HEADER_BYTES as usize];
    b[0..8].copy_from_slice(&SEG_MAGIC);
    b[8..16].copy_from_slice(&m.base_index.to_le_bytes());
    b[16..24].copy_from_slice(&m.base_offset.to_le_bytes());
    let (term, leader, flags) = m.prev.map_or((0, 0, 0u32), |p| (p.term, p.leader, 1));
    b[24..32].copy_from_slice(&term.to_le_bytes());
    b[32..40].copy_from_slice(&leader.to_le_bytes());
    b[40..44].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&b[..44]);
    b[44..48].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a segment header; `Err(reason)` when it is not a valid one.
pub(crate) fn decode_seg_header(b: &[u8]) -> Result<SegMeta, String> {
    let b = b
        .get(..SEG_HEADER_BYTES as usize)
        .ok_or_else(|| format!("segment header is {} bytes, short", b.len()))?;
    if b[0..8] != SEG_MAGIC {
        return Err("bad segment magic or unsupported segment version".into());
    }
    let stored = le32(&b[44..48]);
    let computed = crc32c::crc32c(&b[..44]);
    if stored != computed {
        return Err(format!(
            "segment header CRC mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    let base_index = le64(&b[8..16]);
    if base_index == 0 {
        return Err("segment base index 0".into());
    }
    let prev = (le32(&b[40..44]) & 1 == 1).then(|| LogId {
        term: le64(&b[24..32]),
        leader: le64(&b[32..40]),
        index: base_index - 1,
    });
    Ok(SegMeta::empty(base_index, le64(&b[16..24]), prev))
}

/// Name of the reset marker: while it exists, the log is being replaced by
/// an empty one (see [`super::PartitionLog::reset_to`]). It holds the header
/// of the segment that replaces every other one, so it has the segment
/// header's magic, CRC and version.
pub(crate) const RESET_MARKER: &str = "reset";

pub(crate) fn reset_marker_path(dir: &Path) -> PathBuf {
    dir.join(RESET_MARKER)
}

/// Reads a reset marker: `Ok(None)` when there is none; `Err(reason)` when
/// one exists but is not a valid segment header with a previous log id
/// (it is written atomically, so that is damage, not a torn write).
pub(crate) fn read_reset_marker(path: &Path) -> Result<Option<SegMeta>, LogError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", path, e)),
    };
    let corrupt = |reason: String| LogError::Corrupt {
        path: path.to_owned(),
        position: 0,
        reason: format!("reset marker: {reason}"),
    };
    if bytes.len() as u64 != SEG_HEADER_BYTES {
        return Err(corrupt(format!(
            "{} bytes, expected {SEG_HEADER_BYTES}",
            bytes.len()
        )));
    }
    let meta = decode_seg_header(&bytes).map_err(corrupt)?;
    if meta.prev.is_none() {
        return Err(corrupt("no previous log id".into()));
    }
    Ok(Some(meta))
}

/// Encodes a sealed segment's sparse index with its trailing CRC.
pub(crate) fn encode_idx(m: &SegMeta, entries: &[IndexEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(IDX_FIXED_BYTES + entries.len() * IDX_ENTRY_BYTES + 4);
    b.extend_from_slice(&IDX_MAGIC);
    let last = m.last;
    for v in [
        m.base_index,
        m.base_offset,
        m.len,
        m.next_offset(),
        m.last_base_offset(),
        m.last_ts() as u64,
        last.map_or(0, |l| l.log_id.term),
        last.map_or(0, |l| l.log_id.leader),
        m.last_index(),
        last.map_or(0, |l| l.pos),
        entries.len() as u64,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for e in entries {
        for v in [e.index, e.offset, e.pos, e.ts as u64] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Loads a sealed segment's `.idx` and checks it against the segment: `None`
/// when it is missing, corrupt or does not describe this segment (the caller
/// rebuilds it). `header` is the segment's own header (base index/offset/prev).
pub(crate) fn load_idx(
    path: &Path,
    header: &SegMeta,
    seg: &File,
    seg_len: u64,
) -> Option<(SegMeta, Vec<IndexEntry>)> {
    let f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    if len > MAX_IDX_FILE_BYTES || (len as usize) < IDX_FIXED_BYTES + IDX_CRC_BYTES {
        return None;
    }
    let mut b = vec![0u8; len as usize];
    f.read_exact_at(&mut b, 0).ok()?;
    let (body, crc) = b.split_at(b.len() - IDX_CRC_BYTES);
    if body[0..8] != IDX_MAGIC || crc32c::crc32c(body) != le32(crc) {
        return None;
    }
    let w = |i: usize| le64(&body[8 + i * 8..16 + i * 8]);
    let (base_index, base_offset, seg_file_len) = (w(0), w(1), w(2));
    let (next_offset, last_base_offset, last_ts) = (w(3), w(4), w(5) as i64);
    let (term, leader, last_index, last_pos, n) = (w(6), w(7), w(8), w(9), w(10));
    if base_index != header.base_index
        || base_offset != header.base_offset
        || seg_file_len != seg_len
        || n.checked_mul(IDX_ENTRY_BYTES as u64)? != (body.len() - IDX_FIXED_BYTES) as u64
    {
        return None;
    }
    let mut meta = *header;
    meta.len = seg_len;
    if last_index >= base_index {
        // Cheap check that the index describes the file: the last record
        // must be where the index says and be the entry it says.
        let mut hb = [0u8; BATCH_HEADER_BYTES];
        seg.read_exact_at(&mut hb, last_pos).ok()?;
        let h = BatchHeader::decode(&hb).ok()?;
        if h.log_id.index != last_index
            || h.log_id.term != term
            || h.log_id.leader != leader
            || last_pos + h.record_len() != seg_len
            || h.base_offset != last_base_offset
            || h.next_offset() != next_offset
            || h.timestamp_ms != last_ts
        {
            return None;
        }
        meta.push(&h, last_pos);
    } else if seg_len != SEG_HEADER_BYTES || next_offset != base_offset {
        return None;
    }
    let mut entries = Vec::with_capacity(n as usize);
    for c in body[IDX_FIXED_BYTES..].chunks_exact(IDX_ENTRY_BYTES) {
        entries.push(IndexEntry {
            index: le64(&c[0..8]),
            offset: le64(&c[8..16]),
            pos: le64(&c[16..24]),
            ts: le64(&c[24..32]) as i64,
        });
    }
    let sane = entries
        .windows(2)
        .all(|p| p[0].pos < p[1].pos && p[0].index < p[1].index)
        && entries
            .iter()
            .all(|e| e.pos >= SEG_HEADER_BYTES && e.pos < seg_len && e.index <= last_index);
    sane.then_some((meta, entries))
}

/// Positioned reads through a small read-ahead window.
pub(crate) struct ChunkReader<'a> {
    file: &'a File,
    buf: Vec<u8>,
    buf_pos: u64,
    cap: usize,
}

impl<'a> ChunkReader<'a> {
    pub fn new(file: &'a File, cap: usize) -> Self {
        Self {
            file,
            buf: Vec::new(),
            buf_pos: 0,
            cap,
        }
    }

    /// `n` bytes at `pos`; the caller has checked `pos + n <= limit` and that
    /// `n` is bounded (a record, at most [`MAX_ENTRY_BODY_BYTES`] + header).
    pub fn get(&mut self, pos: u64, n: usize, limit: u64) -> io::Result<&[u8]> {
        let have = pos >= self.buf_pos && pos + n as u64 <= self.buf_pos + self.buf.len() as u64;
        if !have {
            let want = (n.max(self.cap) as u64)
                .min(limit.saturating_sub(pos))
                .max(n as u64);
            self.buf.resize(want as usize, 0);
            self.file.read_exact_at(&mut self.buf, pos)?;
            self.buf_pos = pos;
        }
        let start = (pos - self.buf_pos) as usize;
        Ok(&self.buf[start..start + n])
    }
}

/// Where a walk stopped early: the first record that is incomplete or invalid.
pub(crate) struct Stop {
    pub pos: u64,
    pub reason: String,
}

pub(crate) struct Walk {
    pub meta: SegMeta,
    pub index: Vec<IndexEntry>,
    pub stop: Option<Stop>,
}

/// Walks every record of a segment from its header to `file_len`, verifying
/// header CRC, body CRC and index/offset contiguity, and builds the sparse
/// index. Stops at the first record that fails; I/O errors are returned.
pub(crate) fn walk_segment(
    file: &File,
    path: &Path,
    start: SegMeta,
    file_len: u64,
    interval_bytes: u64,
) -> Result<Walk, LogError> {
    let mut meta = start;
    meta.len = SEG_HEADER_BYTES;
    meta.last = None;
    let mut index = Vec::new();
    let mut last_indexed: Option<u64> = None;
    let mut r = ChunkReader::new(file, WALK_BUFFER_BYTES);
    let mut pos = SEG_HEADER_BYTES;
    let hb = BATCH_HEADER_BYTES as u64;
    let stop = |pos: u64, reason: String| Some(Stop { pos, reason });
    // Bounded by the file length: every iteration advances by at least a header.
    while pos < file_len {
        if file_len - pos < hb {
            let s = stop(
                pos,
                format!("incomplete record header ({} bytes)", file_len - pos),
            );
            return Ok(Walk {
                meta,
                index,
                stop: s,
            });
        }
        let bytes = r
            .get(pos, hb as usize, file_len)
            .map_err(|e| io_err("read", path, e))?;
        let h = match BatchHeader::decode(bytes) {
            Ok(h) => h,
            Err(e) => {
                return Ok(Walk {
                    meta,
                    index,
                    stop: stop(pos, e.to_string()),
                })
            }
        };
        let (want_index, want_offset) = (meta.last_index() + 1, meta.next_offset());
        let bad = if h.log_id.index != want_index {
            Some(format!(
                "entry index {} where {want_index} was expected",
                h.log_id.index
            ))
        } else if h.base_offset != want_offset {
            Some(format!(
                "base offset {} where {want_offset} was expected",
                h.base_offset
            ))
        } else if h.body_len > MAX_ENTRY_BODY_BYTES {
            Some(format!("body length {} exceeds the limit", h.body_len))
        } else if pos + h.record_len() > file_len {
            Some(format!(
                "incomplete record: {} of {} bytes",
                file_len - pos,
                h.record_len()
            ))
        } else {
            None
        };
        if let Some(reason) = bad {
            return Ok(Walk {
                meta,
                index,
                stop: stop(pos, reason),
            });
        }
        let body = r
            .get(pos + hb, h.body_len as usize, file_len)
            .map_err(|e| io_err("read", path, e))?;
        if let Err(e) = h.verify_body(body) {
            return Ok(Walk {
                meta,
                index,
                stop: stop(pos, e.to_string()),
            });
        }
        if last_indexed.is_none_or(|p| pos - p >= interval_bytes) {
            index.push(IndexEntry {
                index: h.log_id.index,
                offset: h.base_offset,
                pos,
                ts: h.timestamp_ms,
            });
            last_indexed = Some(pos);
        }
        meta.push(&h, pos);
        pos = meta.len;
    }
    Ok(Walk {
        meta,
        index,
        stop: None,
    })
}

/// Is there a valid record header for entry `min_index` or later anywhere in
/// `from..file_len`? Used to tell a torn tail (only garbage after the bad
/// record) from corruption in the middle of acknowledged data.
pub(crate) fn later_record_exists(
    file: &File,
    path: &Path,
    from: u64,
    file_len: u64,
    min_index: u64,
) -> Result<Option<u64>, LogError> {
    let magic = arrowbus_wire::batch::BATCH_MAGIC;
    let hb = BATCH_HEADER_BYTES as u64;
    let mut chunk = vec![0u8; WALK_BUFFER_BYTES];
    let mut pos = from;
    // Bounded by the file length: each chunk advances at least one byte.
    while pos + hb <= file_len {
        let n = (WALK_BUFFER_BYTES as u64).min(file_len - pos) as usize;
        file.read_exact_at(&mut chunk[..n], pos)
            .map_err(|e| io_err("read", path, e))?;
        for i in 0..n.saturating_sub(1) {
            if chunk[i] == magic[0] && chunk[i + 1] == magic[1] && pos + i as u64 + hb <= file_len {
                let mut b = [0u8; BATCH_HEADER_BYTES];
                file.read_exact_at(&mut b, pos + i as u64)
                    .map_err(|e| io_err("read", path, e))?;
                if let Ok(h) = BatchHeader::decode(&b) {
                    if h.log_id.index >= min_index {
                        return Ok(Some(pos + i as u64));
                    }
                }
            }
        }
        pos += n.saturating_sub(1).max(1) as u64;
    }
    Ok(None)
}

/// Scans headers (bodies are skipped, not verified) from the sparse index
/// point `from` until `stop(header)` holds. Returns the position, and the
/// header found there (None: the scan reached `limit`, the end of the
/// readable data) plus the header of the record just before it.
pub(crate) fn scan_headers(
    file: &File,
    path: &Path,
    from: u64,
    limit: u64,
    mut stop: impl FnMut(&BatchHeader) -> bool,
) -> Result<ScanEnd, LogError> {
    let mut r = ChunkReader::new(file, SEEK_BUFFER_BYTES);
    let mut pos = from;
    let mut prev = None;
    let hb = BATCH_HEADER_BYTES as u64;
    // Bounded by `limit`: each step advances by a whole record.
    while pos + hb <= limit {
        let bytes = r
            .get(pos, hb as usize, limit)
            .map_err(|e| io_err("read", path, e))?;
        let h = BatchHeader::decode(bytes).map_err(|e| LogError::Corrupt {
            path: path.to_owned(),
            position: pos,
            reason: e.to_string(),
        })?;
        if stop(&h) {
            return Ok(ScanEnd {
                pos,
                found: Some(h),
                prev,
            });
        }
        pos += h.record_len();
        prev = Some((h, pos - h.record_len()));
    }
    Ok(ScanEnd {
        pos,
        found: None,
        prev,
    })
}

pub(crate) struct ScanEnd {
    pub pos: u64,
    pub found: Option<BatchHeader>,
    /// The record before `pos` and its position, if the scan passed one.
    pub prev: Option<(BatchHeader, u64)>,
}

fn le64(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[..8]);
    u64::from_le_bytes(x)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
