//! Restart hints: a log id a group records as it goes (how far it has
//! committed, how far it has applied) so that a restart can skip work. A
//! hint is never a durability point: a missing, stale or damaged one only
//! means re-applying from the last snapshot, and every reader checks a hint
//! against the log before trusting it.
//!
//! The file is 28 bytes (term, leader, index as little-endian u64s, then a
//! CRC32C of those 24 bytes), overwritten in place with one positioned write
//! and never fsynced. In place matters: openraft records the commit index on
//! every commit, and the usual write-a-temporary-and-rename made ext4 flush
//! the new file's blocks at the rename (its `auto_da_alloc` safeguard) and
//! discard the replaced file's blocks: two device round trips per commit on
//! the write path. A torn overwrite (power loss inside the 28 bytes) fails
//! the CRC and reads as no hint.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::types::{self, LogId};

const HINT_BYTES: usize = 28;

/// One hint file. Opened on the first write.
pub struct HintFile {
    path: PathBuf,
    file: Option<File>,
}

impl HintFile {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            file: None,
        }
    }

    /// The recorded log id; `None` when there is no file or it is damaged.
    pub fn read(&self) -> Option<LogId> {
        let b = std::fs::read(&self.path).ok()?;
        decode(&b)
    }

    /// Overwrite the hint (page cache only; see the module doc).
    pub fn write(&mut self, id: &LogId) -> io::Result<()> {
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&self.path)?,
            ),
        };
        file.write_all_at(&encode(id), 0)
    }
}

fn encode(id: &LogId) -> [u8; HINT_BYTES] {
    let mut b = [0u8; HINT_BYTES];
    b[0..8].copy_from_slice(&id.leader_id.term.to_le_bytes());
    b[8..16].copy_from_slice(&id.leader_id.node_id.to_le_bytes());
    b[16..24].copy_from_slice(&id.index.to_le_bytes());
    let crc = crc32c::crc32c(&b[..24]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<LogId> {
    if b.len() != HINT_BYTES || crc32c::crc32c(&b[..24]).to_le_bytes() != b[24..28] {
        return None;
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    Some(types::log_id(word(0), word(1), word(2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_reads_back_what_was_last_written_and_damage_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("committed");
        let mut h = HintFile::new(&path);
        assert_eq!(h.read(), None, "no file yet");

        h.write(&types::log_id(3, 2, 1_000)).unwrap();
        h.write(&types::log_id(4, 1, 77)).unwrap();
        // A second handle sees the page cache, as a restarted process does.
        assert_eq!(HintFile::new(&path).read(), Some(types::log_id(4, 1, 77)));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 28);

        // One flipped bit anywhere: the CRC rejects it.
        for byte in [0usize, 17, 27] {
            let mut b = std::fs::read(&path).unwrap();
            b[byte] ^= 0x10;
            let damaged = dir.path().join(format!("damaged-{byte}"));
            std::fs::write(&damaged, &b).unwrap();
            assert_eq!(HintFile::new(&damaged).read(), None, "byte {byte}");
        }
        // A short file (an older writer cut off mid-write) is no hint either.
        std::fs::write(&path, [0u8; 20]).unwrap();
        assert_eq!(h.read(), None);
        // Writing again over it restores a valid hint, in place.
        h.write(&types::log_id(5, 1, 78)).unwrap();
        assert_eq!(h.read(), Some(types::log_id(5, 1, 78)));
    }
}
