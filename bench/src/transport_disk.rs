//! The disk of `busbench transport --sync-dir`: each relay appends the
//! messages it holds to a file the way busd's log writer does with
//! `fsync = always`: one thread, `O_DIRECT` writes from an aligned buffer,
//! `fdatasync` after each group, every message queued meanwhile in the same
//! group. Each message starts on a 4 KiB boundary (busd packs records and
//! rewrites the last partial block instead; at the sizes measured the
//! difference is a few percent of the bytes). The file is unlinked as soon
//! as it is open: nothing is left behind, whatever ends the relay.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;

use anyhow::Context;
use bytes::Bytes;

/// Alignment of direct writes (memory, file position, length).
const ALIGN: usize = 4096;
/// At most this many messages per write and sync.
const MAX_GROUP: usize = 64;

pub struct DirectFile {
    file: File,
    path: PathBuf,
    pos: u64,
    /// Staging memory; the aligned window starts `buf.as_ptr().align_offset(ALIGN)` in.
    buf: Vec<u8>,
}

impl DirectFile {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("relay-{}.log", std::process::id()));
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.create(true).truncate(true).write(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&path)
        };
        // As busd: file systems without O_DIRECT (tmpfs) get buffered writes.
        let file = match open(true) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(false),
            other => other,
        }
        .with_context(|| format!("opening {}", path.display()))?;
        std::fs::remove_file(&path).with_context(|| format!("unlinking {}", path.display()))?;
        Ok(Self {
            file,
            path,
            pos: 0,
            buf: Vec::new(),
        })
    }

    /// Write `group` after what is there and make it durable.
    fn append(&mut self, group: &[Bytes]) -> anyhow::Result<()> {
        let total: usize = group.iter().map(|m| m.len().div_ceil(ALIGN) * ALIGN).sum();
        if self.buf.len() < total + ALIGN {
            self.buf = vec![0u8; total + ALIGN];
        }
        let start = self.buf.as_ptr().align_offset(ALIGN);
        let window = &mut self.buf[start..start + total];
        let mut at = 0;
        for m in group {
            let padded = m.len().div_ceil(ALIGN) * ALIGN;
            window[at..at + m.len()].copy_from_slice(m);
            window[at + m.len()..at + padded].fill(0);
            at += padded;
        }
        self.file
            .write_all_at(window, self.pos)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.file
            .sync_data()
            .with_context(|| format!("fdatasync of {}", self.path.display()))?;
        self.pos += total as u64;
        Ok(())
    }
}

/// Append what arrives on `rx` until its senders are gone; after each
/// group's `fdatasync`, report how many messages became durable.
pub fn write_loop(
    mut file: DirectFile,
    rx: &Receiver<Bytes>,
    mut durable: impl FnMut(u64),
) -> anyhow::Result<()> {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(m) => group.push(m),
                Err(_) => break,
            }
        }
        file.append(&group)?;
        durable(group.len() as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_written_aligned_and_reported_in_order() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = DirectFile::create(dir.path())?;
        // Unlinked at once: nothing stays in the directory.
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
        let (tx, rx) = std::sync::mpsc::channel();
        for len in [10usize, 4096, 5000] {
            tx.send(Bytes::from(vec![7u8; len]))?;
        }
        drop(tx);
        let mut reported = Vec::new();
        write_loop(file, &rx, |n| reported.push(n))?;
        assert_eq!(reported, vec![3], "one group of three");
        Ok(())
    }

    #[test]
    fn a_group_lands_at_aligned_offsets_with_zero_padding() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut f = DirectFile::create(dir.path())?;
        let a = Bytes::from(vec![1u8; 100]);
        let b = Bytes::from(vec![2u8; 4097]);
        f.append(&[a, b])?;
        assert_eq!(f.pos, 4096 * 3);
        let mut back = vec![0u8; 4096 * 3];
        // The unlinked file is still readable through a second handle
        // opened from /proc before it goes away with this test.
        let reader = File::open(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            f.file.as_raw_fd()
        }))?;
        reader.read_exact_at(&mut back, 0)?;
        assert!(back[..100].iter().all(|&x| x == 1));
        assert!(back[100..4096].iter().all(|&x| x == 0));
        assert!(back[4096..4096 + 4097].iter().all(|&x| x == 2));
        assert!(back[4096 + 4097..].iter().all(|&x| x == 0));
        Ok(())
    }
}
