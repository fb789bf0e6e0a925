//! Snapshot formats: the snapshot file every group keeps, and a partition's
//! small state inside it.
//!
//! A partition's snapshot is not its data: the batches stay in the segment
//! files until retention deletes them. It is the state a replica needs to
//! continue *after* a point in the log without the entries before it: the
//! next offset, and (once idempotent producers and transactions exist) the
//! producer table and the open transactions. Retention builds one at the
//! point it cuts the log (see [`crate::group::Group::compact_to`]); a
//! follower that missed entries retention deleted installs the leader's and
//! continues from there.
//!
//! What this module must never do: hand back state from bytes that failed
//! their checksum or version check, or panic on any input (a damaged file
//! is a clear `InvalidData` error naming the file).
//!
//! # The snapshot file (`<group dir>/snapshot`)
//! ```text
//! off  size
//!   0     8  magic "ABSNAP\0\x01" (last byte: file format version)
//!   8     4  n: length of the record, u32 LE
//!  12     n  rkyv SnapshotRecord { last_log_id, membership_log_id, membership, data }
//! 12+n    4  crc32c of bytes 0..12+n
//! ```
//! Written as `snapshot.tmp`, fsynced, renamed over `snapshot`, directory
//! fsynced ([`crate::store::write_atomic`]): after a crash it is the old or
//! the new snapshot, whole.
//!
//! # A partition's state (the `data` of a partition group's snapshot)
//! ```text
//!   0     8  magic "ABPST\0\0\x01" (last byte: state format version)
//!   8     .  rkyv PartitionState
//! ```

use std::io;
use std::path::{Path, PathBuf};

use arrowbus_wire::peer::{WireLogId, WireMembership};
use bytes::Bytes;
use rkyv::rancor;

use crate::types::{self, invalid, SnapshotMeta, StoredMembership};

/// The snapshot file's name in a group's directory.
pub const SNAPSHOT_FILE: &str = "snapshot";
const FILE_MAGIC: [u8; 8] = *b"ABSNAP\0\x01";
const FILE_HEAD_BYTES: usize = 12;
const FILE_CRC_BYTES: usize = 4;
/// Largest snapshot file read back. Checked before reading: a partition's
/// state is a few words per producer, and the controller's metadata at its
/// limits (10,000 topics) is far below this; anything larger is not ours.
pub const MAX_SNAPSHOT_FILE_BYTES: u64 = 256 * 1024 * 1024;

const STATE_MAGIC: [u8; 8] = *b"ABPST\0\0\x01";
const STATE_VERSION: u8 = 1;

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct SnapshotRecord {
    last_log_id: Option<WireLogId>,
    membership_log_id: Option<WireLogId>,
    membership: WireMembership,
    data: Vec<u8>,
}

pub fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join(SNAPSHOT_FILE)
}

/// The bytes of a snapshot file for `meta` and `data`.
pub fn encode_file(meta: &SnapshotMeta, data: &[u8]) -> io::Result<Vec<u8>> {
    let rec = SnapshotRecord {
        last_log_id: meta.last_log_id.as_ref().map(types::wire_log_id),
        membership_log_id: meta
            .last_membership
            .log_id()
            .as_ref()
            .map(types::wire_log_id),
        membership: types::wire_membership(meta.last_membership.membership()),
        data: data.to_vec(),
    };
    let body = rkyv::to_bytes::<rancor::Error>(&rec)
        .map_err(|e| invalid(format!("encode snapshot: {e}")))?;
    let n = u32::try_from(body.len())
        .ok()
        .filter(|n| u64::from(*n) + 16 <= MAX_SNAPSHOT_FILE_BYTES)
        .ok_or_else(|| {
            invalid(format!(
                "snapshot of {} bytes exceeds {MAX_SNAPSHOT_FILE_BYTES}",
                body.len()
            ))
        })?;
    let mut out = Vec::with_capacity(FILE_HEAD_BYTES + body.len() + FILE_CRC_BYTES);
    out.extend_from_slice(&FILE_MAGIC);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes a snapshot file's bytes; `Err(reason)` for anything that is not
/// a whole, valid snapshot of a version this build reads.
pub fn decode_file(bytes: &[u8]) -> Result<(SnapshotMeta, Bytes), String> {
    if bytes.len() < FILE_HEAD_BYTES + FILE_CRC_BYTES {
        return Err(format!("{} bytes, shorter than the header", bytes.len()));
    }
    if bytes[..7] != FILE_MAGIC[..7] {
        return Err("not a snapshot file (bad magic)".into());
    }
    if bytes[7] != FILE_MAGIC[7] {
        return Err(format!(
            "snapshot file format version {} (this busd reads {})",
            bytes[7], FILE_MAGIC[7]
        ));
    }
    let mut n = [0u8; 4];
    n.copy_from_slice(&bytes[8..12]);
    let n = u32::from_le_bytes(n) as usize;
    if bytes.len() != FILE_HEAD_BYTES + n + FILE_CRC_BYTES {
        return Err(format!(
            "{} bytes, but the header says {}",
            bytes.len(),
            FILE_HEAD_BYTES + n + FILE_CRC_BYTES
        ));
    }
    let end = FILE_HEAD_BYTES + n;
    let mut stored = [0u8; 4];
    stored.copy_from_slice(&bytes[end..]);
    let (stored, computed) = (u32::from_le_bytes(stored), crc32c::crc32c(&bytes[..end]));
    if stored != computed {
        return Err(format!(
            "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(n);
    aligned.extend_from_slice(&bytes[FILE_HEAD_BYTES..end]);
    let rec = rkyv::from_bytes::<SnapshotRecord, rancor::Error>(&aligned)
        .map_err(|e| format!("record does not decode: {e}"))?;
    let membership = types::from_wire_membership(&rec.membership).map_err(|e| e.to_string())?;
    let meta = SnapshotMeta {
        last_log_id: rec.last_log_id.as_ref().map(types::from_wire_log_id),
        last_membership: StoredMembership::new(
            rec.membership_log_id.as_ref().map(types::from_wire_log_id),
            membership,
        ),
    };
    Ok((meta, Bytes::from(rec.data)))
}

/// Writes the group's snapshot file durably (old or new after a crash).
pub fn write_file(dir: &Path, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
    let bytes = encode_file(meta, data)?;
    crate::store::write_atomic(dir, &snapshot_path(dir), &bytes)
}

/// Reads the group's snapshot file: `Ok(None)` when there is none. A file
/// that exists but does not verify is an error that names it and says what
/// to do: it is written atomically, so damage is not a torn write.
pub fn read_file(dir: &Path) -> io::Result<Option<(SnapshotMeta, Bytes)>> {
    let path = snapshot_path(dir);
    let len = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let damaged = |why: String| {
        invalid(format!(
            "snapshot file {} is damaged: {why}. It is replaced atomically, so this is not a torn \
             write: restore the file, or remove this replica's directory so that it re-replicates \
             from the other replicas",
            path.display()
        ))
    };
    if len > MAX_SNAPSHOT_FILE_BYTES {
        return Err(damaged(format!(
            "{len} bytes, more than {MAX_SNAPSHOT_FILE_BYTES}"
        )));
    }
    let bytes = std::fs::read(&path)?;
    decode_file(&bytes).map(Some).map_err(damaged)
}

/// One producer's idempotence state (reserved: idempotent producers are not
/// built yet, so a snapshot holds none; the field keeps the format stable).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ProducerEntry {
    pub producer_id: i64,
    pub epoch: i16,
    pub last_sequence: i32,
    pub last_offset: u64,
}

/// A transaction open at the snapshot point (reserved, like [`ProducerEntry`]).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OpenTransaction {
    pub producer_id: i64,
    pub epoch: i16,
    pub first_offset: u64,
}

/// A partition's state at a log position: what a replica whose log starts
/// after that position needs to continue.
#[derive(
    rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq, Eq, Default,
)]
pub struct PartitionState {
    /// The offset of the first row after the position.
    pub next_offset: u64,
    pub producers: Vec<ProducerEntry>,
    pub open_transactions: Vec<OpenTransaction>,
}

impl PartitionState {
    pub fn encode(&self) -> io::Result<Vec<u8>> {
        let body = rkyv::to_bytes::<rancor::Error>(self)
            .map_err(|e| invalid(format!("encode partition state: {e}")))?;
        let mut out = Vec::with_capacity(STATE_MAGIC.len() + body.len());
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&body);
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> io::Result<Self> {
        let bad = |why: String| invalid(format!("partition snapshot state: {why}"));
        if bytes.len() < STATE_MAGIC.len() || bytes[..7] != STATE_MAGIC[..7] {
            return Err(bad("not a partition state (bad magic)".into()));
        }
        if bytes[7] != STATE_VERSION {
            return Err(bad(format!(
                "format version {} (this busd reads {STATE_VERSION})",
                bytes[7]
            )));
        }
        let body = &bytes[STATE_MAGIC.len()..];
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
        aligned.extend_from_slice(body);
        rkyv::from_bytes::<PartitionState, rancor::Error>(&aligned)
            .map_err(|e| bad(format!("does not decode: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{log_id, Membership};
    use openraft::impls::BasicNode;
    use std::collections::{BTreeMap, BTreeSet};

    fn meta() -> SnapshotMeta {
        let nodes: BTreeMap<u64, BasicNode> = (1..=3)
            .map(|i| {
                (
                    i,
                    BasicNode {
                        addr: format!("127.0.0.1:{}", 7446 + i),
                    },
                )
            })
            .collect();
        let m = Membership::new(vec![(1..=3).collect::<BTreeSet<u64>>()], nodes).unwrap();
        SnapshotMeta {
            last_log_id: Some(log_id(3, 2, 41)),
            last_membership: StoredMembership::new(Some(log_id(1, 1, 0)), m),
        }
    }

    fn state() -> PartitionState {
        PartitionState {
            next_offset: 12_345,
            producers: vec![ProducerEntry {
                producer_id: 9,
                epoch: 2,
                last_sequence: 17,
                last_offset: 12_000,
            }],
            open_transactions: vec![OpenTransaction {
                producer_id: 9,
                epoch: 2,
                first_offset: 11_000,
            }],
        }
    }

    #[test]
    fn snapshot_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            read_file(dir.path()).unwrap().is_none(),
            "no file: no snapshot"
        );
        let data = state().encode().unwrap();
        write_file(dir.path(), &meta(), &data).unwrap();
        let (m, d) = read_file(dir.path()).unwrap().unwrap();
        assert_eq!(m, meta());
        assert_eq!(&d[..], &data[..]);
        assert_eq!(PartitionState::decode(&d).unwrap(), state());
        // A newer one replaces it whole; no temp file is left behind.
        let mut newer = meta();
        newer.last_log_id = Some(log_id(4, 1, 90));
        write_file(dir.path(), &newer, b"x").unwrap();
        let (m, d) = read_file(dir.path()).unwrap().unwrap();
        assert_eq!(m.last_log_id, Some(log_id(4, 1, 90)));
        assert_eq!(&d[..], b"x");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![SNAPSHOT_FILE.to_owned()]);
    }

    #[test]
    fn a_damaged_snapshot_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        write_file(dir.path(), &meta(), &state().encode().unwrap()).unwrap();
        let path = snapshot_path(dir.path());
        let good = std::fs::read(&path).unwrap();
        let expect_err = |bytes: &[u8], what: &str| {
            std::fs::write(&path, bytes).unwrap();
            let e = read_file(dir.path()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e}");
            let msg = e.to_string();
            assert!(msg.contains("is damaged"), "{what}: {msg}");
            assert!(msg.contains(&path.display().to_string()), "{what}: {msg}");
            msg
        };
        // Every single flipped bit is caught (CRC32C covers header and body).
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            expect_err(&b, &format!("bit flip at byte {i}"));
        }
        // Every truncation, including the empty file.
        for len in 0..good.len() {
            expect_err(&good[..len], &format!("truncated to {len}"));
        }
        let mut longer = good.clone();
        longer.push(0);
        expect_err(&longer, "trailing byte");
        let mut v2 = good.clone();
        v2[7] = 2;
        let msg = expect_err(&v2, "future version");
        assert!(msg.contains("version 2"), "{msg}");
        // A valid frame around a body that is not a snapshot record.
        let mut forged = FILE_MAGIC.to_vec();
        forged.extend_from_slice(&5u32.to_le_bytes());
        forged.extend_from_slice(&[0xff; 5]);
        let crc = crc32c::crc32c(&forged);
        forged.extend_from_slice(&crc.to_le_bytes());
        let msg = expect_err(&forged, "forged body");
        assert!(msg.contains("does not decode"), "{msg}");
        // Restoring the good bytes reads again.
        std::fs::write(&path, &good).unwrap();
        assert!(read_file(dir.path()).unwrap().is_some());
    }

    #[test]
    fn partition_state_checks_magic_and_version() {
        let good = state().encode().unwrap();
        assert_eq!(PartitionState::decode(&good).unwrap(), state());
        let empty = PartitionState::default().encode().unwrap();
        assert_eq!(
            PartitionState::decode(&empty).unwrap(),
            PartitionState::default()
        );
        for bad in [&b""[..], b"ABPST", b"ABSEG\0\0\x01"] {
            let e = PartitionState::decode(bad).unwrap_err();
            assert!(e.to_string().contains("bad magic"), "{e}");
        }
        let mut v9 = good.clone();
        v9[7] = 9;
        let e = PartitionState::decode(&v9).unwrap_err();
        assert!(e.to_string().contains("format version 9"), "{e}");
        let e = PartitionState::decode(&good[..good.len() - 3]).unwrap_err();
        assert!(e.to_string().contains("does not decode"), "{e}");
    }
}
