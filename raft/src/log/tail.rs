//! The log's newest entries, kept in memory after they are written.
//!
//! Why: the entries read most are the ones just written. A subscriber at
//! the head reads each batch right after it commits, and a leader sends each
//! entry to its followers right after its own flush. Reading them back from
//! the segment file costs a buffer allocation (zeroed), a copy out of the
//! page cache and a CRC per byte; the profile of a 1 MiB publish put that at
//! 8 % of a leader's CPU. The writer already holds every entry's body as a
//! shared `Bytes`, so keeping the last few costs no copy at all.
//!
//! Bounds: at most `LogConfig::tail_cache_bytes` of bodies (0 disables it),
//! and nothing once the log has been idle for [`TAIL_IDLE_EXPIRY`] (the
//! writer clears it), so a node with many quiet partitions holds no tails.
//! An entry larger than the whole budget is not kept. A body that is a
//! slice of a larger buffer (a follower's entries share the buffer of the
//! append frame they came in) keeps that buffer alive: what a cache pins is
//! at most the budget plus one frame (`MAX_BODY_BYTES`).
//!
//! Consistency: the cache lives under the same lock as the segment list and
//! changes only with it. The writer adds a group's entries when it publishes
//! the group (so the cache never holds anything readers may not see), and
//! truncation, reset and purge remove what they remove from disk. Each entry
//! remembers its segment and file position, so a cursor advanced from the
//! cache continues on disk exactly where the file has the next record.

use std::collections::VecDeque;
use std::time::Duration;

use arrowbus_wire::{BatchHeader, BATCH_HEADER_BYTES};
use bytes::Bytes;

/// How long the log must go without a write before the writer drops the
/// cached tail: long enough to cover a follower's or subscriber's catch-up
/// after a burst, short enough that idle partitions do not pin memory.
pub(crate) const TAIL_IDLE_EXPIRY: Duration = Duration::from_secs(2);

/// One cached entry, exactly as stored.
#[derive(Clone)]
pub(crate) struct Cached {
    pub header: BatchHeader,
    pub encoded: [u8; BATCH_HEADER_BYTES],
    pub body: Bytes,
    /// Base index of the segment the record is in, and its position there.
    pub seg: u64,
    pub pos: u64,
}

impl Cached {
    pub fn index(&self) -> u64 {
        self.header.log_id.index
    }
    pub fn record_len(&self) -> u64 {
        (BATCH_HEADER_BYTES + self.body.len()) as u64
    }
}

/// Consecutive entries `first..first + len`, newest last.
pub(crate) struct TailCache {
    entries: VecDeque<Cached>,
    /// Body bytes held.
    bytes: u64,
    cap: u64,
}

impl TailCache {
    pub fn new(cap: u64) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            cap,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of bodies held.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Adds the entry after the newest one. An entry that does not continue
    /// the cached run (the log moved underneath, e.g. a failed group) starts
    /// a new run; one larger than the budget empties the cache.
    pub fn push(&mut self, c: Cached) {
        let len = c.body.len() as u64;
        if self.cap == 0 || len > self.cap {
            self.clear();
            return;
        }
        if self
            .entries
            .back()
            .is_some_and(|b| b.index() + 1 != c.index())
        {
            self.clear();
        }
        while self.bytes + len > self.cap {
            match self.entries.pop_front() {
                Some(old) => self.bytes -= old.body.len() as u64,
                None => break,
            }
        }
        self.bytes += len;
        self.entries.push_back(c);
    }

    pub fn get(&self, index: u64) -> Option<&Cached> {
        let first = self.entries.front()?.index();
        let k = usize::try_from(index.checked_sub(first)?).ok()?;
        self.entries.get(k)
    }

    /// Drops entries `index..` (a suffix truncation).
    pub fn truncate_from(&mut self, index: u64) {
        while self.entries.back().is_some_and(|b| b.index() >= index) {
            if let Some(old) = self.entries.pop_back() {
                self.bytes -= old.body.len() as u64;
            }
        }
    }

    /// Drops entries before `index` (their segments were deleted).
    pub fn purge_before(&mut self, index: u64) {
        while self.entries.front().is_some_and(|f| f.index() < index) {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= old.body.len() as u64;
            }
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrowbus_wire::LogId;

    fn entry(index: u64, len: usize) -> Cached {
        let body = Bytes::from(vec![index as u8; len]);
        let mut header = BatchHeader::for_body(&body, 1, 1).unwrap();
        header.log_id = LogId {
            term: 1,
            leader: 1,
            index,
        };
        Cached {
            encoded: header.encode(),
            header,
            body,
            seg: 1,
            pos: 0,
        }
    }

    fn indexes(t: &TailCache) -> Vec<u64> {
        t.entries.iter().map(Cached::index).collect()
    }

    #[test]
    fn keeps_the_newest_entries_within_the_budget() {
        let mut t = TailCache::new(300);
        for i in 1..=5 {
            t.push(entry(i, 100));
        }
        assert_eq!(indexes(&t), [3, 4, 5]);
        assert_eq!(t.bytes(), 300);
        assert!(t.get(2).is_none());
        assert_eq!(t.get(4).map(|c| c.body[0]), Some(4));
        assert!(t.get(6).is_none());
        // Larger than the whole budget: nothing stale may stay behind it.
        t.push(entry(6, 301));
        assert!(t.is_empty());
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn a_gap_starts_a_new_run() {
        let mut t = TailCache::new(1000);
        t.push(entry(1, 10));
        t.push(entry(2, 10));
        t.push(entry(7, 10));
        assert_eq!(indexes(&t), [7]);
        assert_eq!(t.bytes(), 10);
    }

    #[test]
    fn truncation_and_purge_remove_their_ends() {
        let mut t = TailCache::new(1000);
        for i in 10..=20 {
            t.push(entry(i, 10));
        }
        t.truncate_from(18);
        t.purge_before(12);
        assert_eq!(indexes(&t), (12..=17).collect::<Vec<_>>());
        assert_eq!(t.bytes(), 60);
        t.truncate_from(5);
        assert!(t.is_empty());
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let mut t = TailCache::new(0);
        t.push(entry(1, 1));
        assert!(t.is_empty());
        t.push(entry(2, 0));
        assert!(t.is_empty());
    }
}
